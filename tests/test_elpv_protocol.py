"""study/elpv_protocol.sh: each variant's `dvc exp run -S` overrides are valid params and make the recipe that
reports/elpv_benchmark.md reports, so a typo or a stale value fails here instead of an hour into a run; and
study/elpv_decision.py's prior correction, whose figures that report gives."""

import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import balanced_accuracy_score

from transferlab import backbones
from transferlab.params import validate, with_overrides

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("elpv_decision", ROOT / "study" / "elpv_decision.py")
decision = importlib.util.module_from_spec(spec)
spec.loader.exec_module(decision)


def protocol_overrides(protocol: str, seeds: str, **candidate: str) -> list[tuple[str, list[str]]]:
    """(experiment name, its `-S` overrides) for each command the script prints."""
    env = {"DRY_RUN": "1", "PROTOCOL": protocol, "SEEDS": seeds, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    env |= candidate
    out = subprocess.run(
        ["bash", "study/elpv_protocol.sh"], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    commands = []
    for line in out.splitlines():
        words = shlex.split(line)
        assert words[:4] == ["dvc", "exp", "run", "evaluate"], line
        overrides = [item for flag, item in zip(words, words[1:]) if flag == "-S"]
        keys = [item.split("=", 1)[0] for item in overrides]
        assert len(keys) == len(set(keys)), f"a key given twice: {line}"  # the command says each value once
        commands.append((words[words.index("--name") + 1], overrides))
    return commands


def protocol_runs(protocol: str, seeds: str = "0 1 2", **candidate: str) -> list[tuple[str, dict]]:
    """(experiment name, the validated params it runs with) for each command the script prints."""
    text = (ROOT / "params.yaml").read_text()  # with_overrides edits in place: a fresh copy for each run
    runs = protocol_overrides(protocol, seeds, **candidate)
    return [(name, validate(with_overrides(yaml.safe_load(text), overrides))) for name, overrides in runs]


def test_cpu_protocol_is_the_chosen_configuration_on_the_papers_split():
    runs = protocol_runs("cpu", "0 1 7")
    assert [name for name, _ in runs] == ["elpv-cpu-s0", "elpv-cpu-s1", "elpv-cpu-s7"]
    assert [p["train"]["seed"] for _, p in runs] == [0, 1, 7]
    params = runs[0][1]
    data, ft = params["data"], params["finetune"]
    assert (data["source"], data["seed"], data["test_fraction"]) == ("elpv", 42, 0.25)
    assert params["extract"]["backbones"] == ft["backbones"] == ["efficientnet_lite0"]
    assert params["extract"]["input_size"]["efficientnet_lite0"] == 224
    assert ft["methods"] == ["finetune_top"] and ft["cut_point"]["efficientnet_lite0"] == "block4a"
    assert (ft["optimizer"], ft["learning_rate"], ft["lr_schedule"], ft["warmup_epochs"]) == ("adam", 3e-4, "cosine", 1)
    assert (ft["augmentation"], ft["epochs"], ft["early_stopping_monitor"]) == ("el_cell", 16, "val_accuracy")
    assert (ft["label_smoothing"], ft["class_weight"]) == (0.1, "none")  # chosen on validation in session 8
    assert ft["batch_size"] == 16  # session 17: the 3-seed validation mean broke session 15's tie
    assert params["compute"]["precision"] == "float32"  # Lite0 is slower in bfloat16 on both CPUs measured
    assert ft["early_stopping_patience"] >= ft["epochs"]  # never stops early: the best of all epochs is kept
    # the split and everything but the seed are the same in every run
    assert all({**p, "train": None} == {**params, "train": None} for _, p in runs)


@pytest.mark.parametrize(("protocol", "backbone"), [("gpu", "vgg16"), ("gpu-resnet50", "resnet50")])
def test_gpu_protocols_fine_tune_at_the_registry_size_with_augmentation(protocol, backbone):
    ((name, params),) = protocol_runs(protocol, "3")
    assert name == f"elpv-{protocol}-s3"
    assert params["finetune"]["backbones"] == [backbone] and params["extract"]["input_size"][backbone] == 224
    assert params["finetune"]["augmentation"] == "el_cell" and params["data"]["test_fraction"] == 0.25


def test_the_pitfall_study_fine_tunes_by_the_cpu_protocols_recipe_on_a_shorter_budget():
    """study/pitfalls.yaml restates the CPU protocol's fine-tuning recipe and precision (on fewer epochs): if the
    protocol changes, the pitfall study's reference must follow, or the report would compare against another
    recipe (as it did between session 8's label smoothing and the study's re-run)."""
    (_, protocol), *_ = protocol_runs("cpu", seeds="0")
    study = yaml.safe_load((ROOT / "study" / "pitfalls.yaml").read_text())["study_params"]
    budget = {"finetune.epochs", "finetune.early_stopping_patience"}
    recipe = {k: v for k, v in study.items() if k.startswith(("finetune.", "compute.")) and k not in budget}
    ((_, overrides),) = protocol_overrides("cpu", seeds="0")
    set_by_protocol = {o.split("=", 1)[0] for o in overrides if o.startswith(("finetune.", "compute."))}
    assert set_by_protocol - set(recipe) - budget == {"finetune.methods", "finetune.backbones"}
    assert set(recipe) >= {"finetune.label_smoothing", "compute.precision", "finetune.cut_point.efficientnet_lite0"}
    for key, value in recipe.items():
        node = protocol
        for part in key.split("."):
            node = node[part]
        assert node == value, f"{key}: pitfalls.yaml {value!r}, elpv_protocol.sh {node!r}"
    assert study["finetune.early_stopping_patience"] == study["finetune.epochs"]  # the best epoch of all is kept


def test_a_candidate_is_the_protocol_with_its_overrides_replacing_the_protocols_values():
    ((_, protocol),) = protocol_runs("cpu", "0")
    extra = "finetune.ema_momentum=0.99 finetune.epochs=20"
    ((name, params),) = protocol_runs("cpu", "0", CANDIDATE="ema", EXTRA=extra)  # each key once: checked there
    assert name == "elpv-cpu-ema-s0"
    assert (params["finetune"]["ema_momentum"], params["finetune"]["epochs"]) == (0.99, 20)
    assert protocol["finetune"]["ema_momentum"] == 0.0 and protocol["finetune"]["epochs"] == 16
    assert {**params, "finetune": None} == {**protocol, "finetune": None}
    changed = {k for k in protocol["finetune"] if protocol["finetune"][k] != params["finetune"][k]}
    assert changed == {"ema_momentum", "epochs"}
    env = {"DRY_RUN": "1", "EXTRA": extra, "PATH": "/usr/bin:/bin"}  # unnamed, it would pass for the protocol
    out = subprocess.run(["bash", "study/elpv_protocol.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "name the candidate with CANDIDATE" in out.stderr and not out.stdout


def test_unknown_protocol_is_refused_before_anything_runs():
    env = {"DRY_RUN": "1", "PROTOCOL": "tpu", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(["bash", "study/elpv_protocol.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "unknown PROTOCOL 'tpu'" in out.stderr and not out.stdout


def test_prior_correction_recovers_a_rare_class_the_argmax_never_predicts():
    """A rare class that is always the runner-up: tau 0 is the plain argmax, and the tau chosen on these
    probabilities divides the prior out far enough to predict it, raising balanced accuracy from 2/3 to 1."""
    prior = np.array([0.6, 0.3, 0.1])
    y = np.array([0] * 6 + [1] * 3 + [2] * 2)
    probs = np.tile([0.7, 0.2, 0.1], (len(y), 1))
    probs[y == 1] = [0.2, 0.7, 0.1]
    probs[y == 2] = [0.55, 0.05, 0.4]  # log(0.55/0.4) = 0.32 < tau * log(0.6/0.1) = 1.79 tau from tau 0.2
    assert (decision.prior_corrected(probs, prior, 0.0) == probs.argmax(1)).all()
    assert balanced_accuracy_score(y, probs.argmax(1)) == pytest.approx(2 / 3)
    tau = decision.choose_tau(probs, y, prior)
    assert tau == pytest.approx(0.2)  # the smallest tau that predicts class 2 while class 0's 0.7 still wins
    assert (decision.prior_corrected(probs, prior, tau) == y).all()
    # too strong a correction loses the majority class: log(0.7/0.1) = 1.95 < tau * 1.79 from tau 1.1
    assert (decision.prior_corrected(probs, prior, 1.2)[y == 0] == 2).all()


def saved_run(path: Path, probs: np.ndarray, ids=("a", "b", "c")) -> Path:
    """A file as `elpv_decision.py --save` writes it: val and test alike, one view."""
    y, split = np.array([0, 1, 2]), {}
    for name in ("val", "test"):
        split |= {f"{name}_probs": probs[:, None], f"{name}_y": y, f"{name}_ids": np.array(ids)}
    np.savez(path, classes=np.array(["x", "y", "z"]), prior=np.array([0.5, 0.3, 0.2]), **split)
    return path


def test_an_ensemble_averages_saved_runs_and_refuses_other_images(tmp_path, capsys):
    """Two runs, each right on one image and both wrong on the third: their mean is right on all three (the
    argmax of the mean, not a vote); a file over other ids is refused, named, before anything is scored."""
    a = saved_run(tmp_path / "a.npz", np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.6, 0.0, 0.4]]))
    b = saved_run(tmp_path / "b.npz", np.array([[0.4, 0.6, 0.0], [0.0, 1.0, 0.0], [0.0, 0.6, 0.4]]))
    mean = decision.ensemble([a, b])
    assert mean["test_probs"][:, 0] == pytest.approx(np.array([[0.65, 0.35, 0.0], [0.3, 0.7, 0.0], [0.3, 0.3, 0.4]]))
    decision.main(["--ensemble", str(a), str(b)])
    assert "test as trained: accuracy 1.0000" in capsys.readouterr().out
    c = saved_run(tmp_path / "c.npz", np.eye(3), ids=("a", "b", "d"))
    with pytest.raises(SystemExit) as stop:
        decision.main(["--ensemble", str(a), str(c), str(b)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"{c} (val_ids, test_ids)" in err and str(b) + " (" not in err
    with pytest.raises(SystemExit) as stop:  # --save beside --ensemble would be ignored: refused instead
        decision.main(["--ensemble", str(a), str(b), "--save", str(tmp_path / "x.npz")])
    assert stop.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


search_spec = importlib.util.spec_from_file_location("elpv_search", ROOT / "study" / "elpv_search.py")
search = importlib.util.module_from_spec(search_spec)
search_spec.loader.exec_module(search)


def test_the_search_applies_oversampling_and_refuses_what_it_cannot_apply(monkeypatch):
    """search.jsonl writes the overrides beside the figures: each must have shaped the run, or be refused."""

    def params(*overrides):
        return validate(with_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), list(overrides)))

    assert search.not_applied(params()) == []
    changed = params("finetune.augmentation=el_cell", "ablation.bn_training=true", "ablation.batch_size=1")
    assert search.not_applied(changed) == [
        "ablation.bn_training=True",
        "ablation.batch_size=1",
        "finetune.augmentation=el_cell",
    ]

    class Drawn(Exception):
        pass

    def feature_dataset(x, y, batch_size, shuffle_seed=None, oversample="none"):
        raise Drawn(oversample)

    for name in ("seed_everything", "configure_base", "head_for", "top_model", "compile_for"):
        monkeypatch.setattr(search.train, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(search.weights, "load_backbone", lambda *args, **kwargs: None)
    monkeypatch.setattr(search.train, "feature_dataset", feature_dataset)
    sampled = params("finetune.oversample=sqrt", "finetune.head_init=random")
    split = {"train": (np.zeros(4, int), np.zeros((4, 2))), "val": (np.zeros(2, int), np.zeros((2, 2)))}
    with pytest.raises(Drawn, match="sqrt"):  # the training rows drawn as the pipeline draws them
        search.finetune_top(sampled, backbones.get("vgg16"), "b", type("Meta", (), {"input_size": 32}), None, split, 2)
