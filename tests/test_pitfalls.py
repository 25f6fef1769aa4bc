"""The pitfall study's report: statistics, parsing `dvc exp show --json`, label alignment, the grid script.

Fast: one test runs real DVC on a two-stage toy pipeline (a running experiment); the rest parse a
fixture with the shape DVC 3.67 prints (checked on a tiny repository):
a list of baseline commits (and the workspace), each with `experiments`, groups of `revs` whose
`data` holds `params` and `metrics` by file, each file as {"data": ...} or {"error": ...}.
"""

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import ROOT

from transferlab import features, files, layout, metrics

spec = importlib.util.spec_from_file_location("pitfalls_report", ROOT / "study" / "pitfalls_report.py")
pr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pr)

T975 = {1: 12.706204736174707, 2: 4.302652729911275}  # Student t quantiles, from tables


# ---------------------------------------------------------------- statistics


def test_t_interval_matches_hand_computation():
    ci = metrics.t_interval([0.70, 0.72, 0.74])  # mean 0.72, sd 0.02
    half = T975[2] * 0.02 / math.sqrt(3)  # 0.0496827
    assert ci["n"] == 3 and ci["mean"] == pytest.approx(0.72)
    assert (ci["lo"], ci["hi"]) == pytest.approx((0.72 - half, 0.72 + half))
    assert (ci["lo"], ci["hi"]) == pytest.approx((0.670317, 0.769683), abs=1e-6)

    ci = metrics.t_interval([1.0, 3.0, float("nan")])  # NaN dropped; sd = sqrt(2), se = 1
    assert ci["n"] == 2 and (ci["lo"], ci["hi"]) == pytest.approx((2 - T975[1], 2 + T975[1]))


def test_t_interval_without_spread_or_without_values():
    assert metrics.t_interval([0.5, 0.5, 0.5]) == {"n": 3, "mean": 0.5, "lo": 0.5, "hi": 0.5}
    one = metrics.t_interval([0.4])
    assert one["n"] == 1 and one["mean"] == 0.4 and math.isnan(one["lo"]) and math.isnan(one["hi"])
    assert metrics.t_interval([])["n"] == 0
    assert pr.fmt(one) == "0.400 (1 seed, no interval)" and pr.fmt(None) == "—"


def test_paired_effect_uses_common_seeds_only():
    effect = pr.paired_effect({0: 0.8, 1: 0.7, 2: 0.9}, {0: 0.7, 1: 0.7, 2: 0.8, 3: 0.5})
    # differences 0.1, 0.0, 0.1: mean 1/15, sd 0.057735, se 0.033333
    half = T975[2] * np.std([0.1, 0.0, 0.1], ddof=1) / math.sqrt(3)
    assert effect["seeds"] == [0, 1, 2] and effect["n"] == 3
    assert effect["mean"] == pytest.approx(1 / 15)
    assert (effect["lo"], effect["hi"]) == pytest.approx((1 / 15 - half, 1 / 15 + half))
    assert pr.fmt(effect, signed=True) == "+0.067 [-0.077, +0.210]"


# ---------------------------------------------------------------- dvc exp show --json

BASE = {
    "train": {"seed": 0, "epochs": 6},
    "finetune": {
        "backbones": ["vgg16", "efficientnet_lite0"],
        "methods": ["frozen_end_to_end", "finetune_top"],
        "epochs": 4,
    },
    "ablation": {"bn_training": False, "batch_size": None},
    "data": {"source": "elpv"},
}
STUDY = {"finetune": {"backbones": ["efficientnet_lite0"], "epochs": 2}, "train": {"epochs": 3}}
L = "efficientnet_lite0"


def merge(*dicts):
    out = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def rev(name, timestamp, params, test, live=None, error=None, unavailable=()):
    """An experiment as `dvc exp show --json` gives it: evaluate's file per scored run, an output folder per run."""
    metrics = {
        layout.metrics_file(run).as_posix(): {"data": {**values, "val_accuracy": (live or {}).get(run)}}
        for run, values in test.items()
    }
    metrics[layout.metrics_file("missing/run").as_posix()] = {
        "error": {"type": "FileNotFoundError", "msg": "No storage files available"}
    }
    outs = {layout.run_dir(run).as_posix(): {"hash": "0" * 32, "use_cache": True} for run in [*test, *unavailable]}
    outs[layout.EVAL.as_posix()] = {"hash": "0" * 32, "use_cache": True}
    data = {
        "rev": "f" * 40,
        "timestamp": timestamp,
        "params": {"params.yaml": {"data": params}},
        "metrics": metrics,
        "deps": {},
        "outs": outs,
        "meta": {},
    }
    return {
        "revs": [{"rev": "f" * 40, "name": name, "data": data, "error": error, "experiments": None}],
        "executor": None,
        "name": name,
    }


def scores(acc):
    return {"accuracy": acc, "balanced_accuracy": acc - 0.2, "macro_f1": acc - 0.25}


def experiment(setting, seed, extra, frozen, head, tuned=None, val=None, timestamp="2026-11-24T09:00:00"):
    test = {
        f"train_head/{L}-native": scores(head),
        f"train_head/{L}-rescale": scores(head - 0.02),
        "train_head/vgg16-native": scores(0.73),
        "train_head/vgg16-rescale": scores(0.70 + seed / 100),
    }
    live = {}
    if frozen is not None:
        test[f"frozen_end_to_end/{L}-native"] = scores(frozen)
    if tuned is not None:
        test[f"finetune_top/{L}-native"] = scores(tuned)
        live[f"finetune_top/{L}-native"] = val
    params = merge(BASE, STUDY, {"train": {"seed": seed}}, extra)
    return rev(
        f"pitfall-{setting}-s{seed}",
        timestamp,
        params,
        test,
        live,
        unavailable=["train_head/resnet50-native", "train_head/resnet50-rescale"],
    )


@pytest.fixture(scope="module")
def exp_show():
    groups = []
    for seed, (head, bn_frozen, bn_tuned) in enumerate([(0.75, 0.60, 0.70), (0.74, 0.62, 0.69), (0.76, 0.58, 0.71)]):
        groups.append(experiment("correct", seed, {}, head, head, tuned=head + 0.02, val=0.78))
        groups.append(
            experiment(
                "bn-training", seed, {"ablation": {"bn_training": True}}, bn_frozen, head, tuned=bn_tuned, val=0.7
            )
        )
    groups.append(
        experiment(
            "bs1",
            0,
            {"ablation": {"batch_size": 1}, "finetune": {"methods": ["frozen_end_to_end"]}},
            0.70,
            0.75,
            timestamp="2026-11-24T08:00:00",
        )
    )
    groups.append(rev("exp-unrelated", "2026-11-24T09:00:00", BASE, {"train_head/x": scores(0.1)}))
    groups.append(rev("pitfall-correct-s9", "2026-11-24T09:00:00", BASE, {}, error={"type": "Failed"}))
    old_baseline = {
        "rev": "a" * 40,
        "name": "old",
        "data": {"params": {"params.yaml": {"data": BASE}}},
        "error": None,
        "experiments": [
            experiment("bs1", 0, {"ablation": {"batch_size": 1}}, 0.10, 0.75, timestamp="2026-11-20T08:00:00")
        ],
    }
    workspace = {
        "rev": "workspace",
        "name": None,
        "data": {"params": {"params.yaml": {"data": BASE}}},
        "error": None,
        "experiments": None,
    }
    head = {
        "rev": "b" * 40,
        "name": "main",
        "data": {"params": {"params.yaml": {"data": BASE}}},
        "error": None,
        "experiments": groups,
    }
    return [workspace, head, old_baseline]


def test_parse_exp_show_reads_pitfall_experiments_only(exp_show):
    table, experiments = pr.parse_exp_show(exp_show)
    assert sorted(experiments) == sorted(
        [f"pitfall-{s}-s{i}" for s in ("correct", "bn-training") for i in range(3)] + ["pitfall-bs1-s0"]
    )
    assert experiments["pitfall-bs1-s0"]["timestamp"] == "2026-11-24T08:00:00"  # the newer of two baselines
    assert pr.by_seed(table, "bs1", f"frozen_end_to_end/{L}-native") == {0: 0.70}
    assert pr.by_seed(table, "bn-training", f"frozen_end_to_end/{L}-native") == {0: 0.60, 1: 0.62, 2: 0.58}
    assert pr.by_seed(table, "correct", f"finetune_top/{L}-native", "val_accuracy") == {0: 0.78, 1: 0.78, 2: 0.78}
    assert pr.unavailable(table, "train_head/resnet50-native")
    assert not pr.unavailable(table, f"train_head/{L}-native")
    assert "missing/run" in set(table["run"]) and not pr.unavailable(table, "missing/run")  # unreadable, not absent
    assert "results/eval" not in set(table["run"])


TRAIN = """import os, time, yaml
seed = yaml.safe_load(open("params.yaml"))["train"]["seed"]
while seed == 1 and not os.path.exists("go"):  # the second experiment waits, as a long stage would
    time.sleep(0.1)
open("model.txt", "w").write(str(seed))
"""
SCORE = f"""import json, pathlib
p = pathlib.Path("{layout.metrics_file(f"finetune_top/{L}-native").as_posix()}")
p.parent.mkdir(parents=True, exist_ok=True)
p.write_text(json.dumps({{"accuracy": 0.5 + int(open("model.txt").read()) / 10}}))
"""
PIPELINE = {
    "stages": {
        "train": {"cmd": "python train.py", "deps": ["train.py"], "params": ["train.seed"], "outs": ["model.txt"]},
        "score": {
            "cmd": "python score.py",
            "deps": ["score.py", "model.txt"],
            "metrics": [layout.metrics_file(f"finetune_top/{L}-native").as_posix()],
        },
    }
}


def test_a_running_experiment_is_not_credited_with_the_workspace_files(tmp_path):
    """While `dvc exp run` is inside an early stage, `dvc exp show` lists the experiment with the
    workspace's metrics, which are still the previous experiment's (found when a preview of the
    study credited head-random-s1's 0.761 to adam-1e-3-s1, whose own score was 0.728)."""
    import os
    import time

    from helpers import run_cmd

    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    (tmp_path / "train.py").write_text(TRAIN)
    (tmp_path / "score.py").write_text(SCORE)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(PIPELINE))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"seed": 0}}))
    (tmp_path / ".gitignore").write_text("/model.txt\n/results\n/go\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        run_cmd(*cmd, cwd=tmp_path, env=env)
    run_cmd("dvc", "exp", "run", "--name", "pitfall-correct-s0", "-S", "train.seed=0", cwd=tmp_path, env=env)
    second = subprocess.Popen(
        ["dvc", "exp", "run", "--name", "pitfall-correct-s1", "-S", "train.seed=1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            rows = json_exp_show(tmp_path, env)
            if pr.unfinished(rows) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert pr.unfinished(rows) == {"pitfall-correct-s1": "running"}
        running = [g for c in rows for g in c.get("experiments") or [] if g.get("name") == "pitfall-correct-s1"]
        listed = running[0]["revs"][0]["data"]["metrics"]
        assert [v["data"]["accuracy"] for v in listed.values()] == [0.5]  # the previous experiment's score
        table, experiments = pr.parse_exp_show(rows)
        assert sorted(experiments) == ["pitfall-correct-s0"]
        assert pr.by_seed(table, "correct", f"finetune_top/{L}-native") == {0: 0.5}
        frozen, bn_at_bs1 = pr.item_frozen(table)
        page = pr.markdown(
            experiments,
            pr.item_preprocessing(table),
            frozen,
            bn_at_bs1,
            pr.item_finetune(table),
            [],
            [0],
            pr.unfinished(rows),
        )
        assert "Left out, not finished when this report was written: `pitfall-correct-s1` (running)." in page
    finally:
        (tmp_path / "go").touch()
        out, _ = second.communicate(timeout=120)
    assert second.returncode == 0, out
    rows = json_exp_show(tmp_path, env)
    table, experiments = pr.parse_exp_show(rows)
    assert pr.unfinished(rows) == {}
    assert pr.by_seed(table, "correct", f"finetune_top/{L}-native") == {0: 0.5, 1: 0.6}


def json_exp_show(repo, env) -> list:
    import json

    from helpers import run_cmd

    return json.loads(run_cmd("dvc", "exp", "show", "--json", cwd=repo, env=env))


def test_changes_study_wide_settings_and_commands(exp_show):
    _, experiments = pr.parse_exp_show(exp_show)
    wide = pr.study_wide(experiments)
    assert wide == {"finetune.backbones": ["efficientnet_lite0"], "finetune.epochs": 2, "train.epochs": 3}
    assert pr.describe_changes({}) == "none (every switch off)"
    cmd = pr.command("bn-training", experiments)
    assert 'SEEDS="0 1 2" study/pitfalls.sh bn-training' in cmd
    assert (
        "dvc exp run --name pitfall-bn-training-s$seed -S train.seed=$seed -S ablation.bn_training=true "
        "-S 'finetune.backbones=[efficientnet_lite0]' -S finetune.epochs=2 -S train.epochs=3"
    ) in cmd
    assert "not run yet" in pr.command("adam-1e-3", experiments)


def test_items_compute_gaps_and_effects_paired_by_seed(exp_show):
    table, _ = pr.parse_exp_show(exp_show)
    prep = {r["backbone"]: r for r in pr.item_preprocessing(table)}
    assert prep["resnet50"]["unavailable"] and prep["resnet50"]["native"]["n"] == 0
    assert prep[L]["effect"]["mean"] == pytest.approx(-0.02) and prep[L]["effect"]["lo"] == pytest.approx(-0.02)
    assert prep["vgg16"]["effect"]["mean"] == pytest.approx(-0.02)  # 0.70, 0.71, 0.72 - 0.73

    frozen, bn_at_bs1 = pr.item_frozen(table)
    rows = {r["setting"]: r for r in frozen}
    assert rows["correct"]["gap"]["mean"] == 0 and rows["correct"]["vs_correct"] is None
    gaps = [0.60 - 0.75, 0.62 - 0.74, 0.58 - 0.76]
    assert rows["bn-training"]["gap"]["mean"] == pytest.approx(np.mean(gaps))
    assert rows["bn-training"]["vs_correct"]["mean"] == pytest.approx(np.mean(gaps))
    assert rows["bs1"]["gap"]["n"] == 1 and rows["bs1"]["gap"]["mean"] == pytest.approx(-0.05)
    assert bn_at_bs1["n"] == 0  # bn-training-bs1 was not run

    tuned = {r["setting"]: r for r in pr.item_finetune(table)}
    assert tuned["correct"]["vs_bottleneck"]["mean"] == pytest.approx(0.02)
    assert tuned["bn-training"]["effect"]["mean"] == pytest.approx(np.mean([0.70 - 0.77, 0.69 - 0.76, 0.71 - 0.78]))
    assert tuned["bn-training"]["val_effect"]["mean"] == pytest.approx(0.7 - 0.78)
    assert tuned["head-random"]["tuned"]["n"] == 0


def test_markdown_and_plot(exp_show, tmp_path):
    table, experiments = pr.parse_exp_show(exp_show)
    prep, (frozen, bn_at_bs1), tuned = pr.item_preprocessing(table), pr.item_frozen(table), pr.item_finetune(table)
    alignment = [
        {
            "pair": f"{L}-native",
            "agreement": 0.3,
            "majority": 0.57,
            "chance_balanced": 0.25,
            "block_mix": {},
            "check": {
                s: {"rows": 5, "manifest_rows": 5, "ids_match": 5, "labels_match": 5, "feature_rows": 5}
                for s in ("train", "val", "test")
            },
            **{
                src: {
                    s: {"accuracy": a + s / 100, "balanced_accuracy": 0.4, "macro_f1": 0.4, "as_measured": 0.9}
                    for s in range(3)
                }
                for src, a in (("manifest", 0.75), ("counted", 0.3))
            },
        }
    ]
    text = pr.markdown(experiments, prep, frozen, bn_at_bs1, tuned, alignment, [0, 1, 2])
    for heading in ("## 1. Preprocessing", "## 2. Bottleneck vs frozen", "## 3. Fine-tuned", "## 4. Label alignment"):
        assert heading in text
    assert "| resnet50 (BatchNorm, Keras download) | weights unavailable |" in text
    assert "`ablation.bn_training=true`" in text and "— aligned." in text
    assert "-0.450 [-0.450, -0.450]" in text  # counted - manifest, paired by seed
    assert "t = 4.30 for 3 seeds" in text
    four = pr.markdown(experiments, prep, frozen, bn_at_bs1, tuned, alignment, [0, 1, 2, 3])
    assert "t = 3.18 for 4 seeds" in four and "4.30" not in four  # the quantile follows the seed count
    path = pr.plot(prep, frozen, tuned, alignment, tmp_path / "plots" / "pitfalls.png")
    assert path.stat().st_size > 10_000


# ---------------------------------------------------------------- label alignment


def test_counted_labels_keep_counts_not_places():
    assert pr.counted_labels([2, 0, 1, 0]).tolist() == [0, 0, 1, 2]
    assert np.bincount(pr.counted_labels([3, 3, 0, 1])).tolist() == [1, 1, 0, 2]


@pytest.mark.slow
def test_label_alignment_on_synthetic_features():
    rng = np.random.default_rng(0)
    direction = rng.normal(size=8)

    def split(n):  # the class is a band of one projection; rows in an order unrelated to it (file names)
        x = rng.normal(size=(n, 8)).astype("float32")
        return x, np.digitize(x @ direction, np.quantile(rng.normal(size=(5000, 8)) @ direction, [1 / 3, 2 / 3]))

    splits = {"train": split(600), "val": split(60), "test": split(300)}
    cfg = {"epochs": 15, "batch_size": 32, "optimizer": "adam", "learning_rate": 0.01, "momentum": 0.9}
    head = {"units": 32, "dropout": 0.1, "dropout_position": "after_dense", "pooling": "avg"}
    out = pr.label_alignment(splits, ["a", "b", "c"], cfg, head, seeds=[0, 1])
    manifest = [v["accuracy"] for v in out["manifest"].values()]
    counted = [v["accuracy"] for v in out["counted"].values()]
    assert out["agreement"] < 0.45  # counting puts ~1/3 of the labels on the right rows, by chance
    assert min(manifest) > 0.85
    assert max(counted) < 0.5  # chance is 1/3
    assert out["majority"] < 0.45 and out["chance_balanced"] == pytest.approx(1 / 3)


def write_features(directory, manifest, order=None):
    splits = {}
    for split, rows in manifest.groupby("split", sort=False):
        rows = rows if order is None else rows.iloc[order]
        d = directory / split
        d.mkdir(parents=True)
        files.write_json(d / features.IDS, rows["id"].tolist())
        np.save(d / "labels.npy", rows["class_index"].to_numpy())
        np.save(d / "pooled.npy", np.zeros((len(rows), 4), "float32"))
        splits[split] = {"sha256": features.array_hashes(d)}
    files.write_json(directory / "meta.json", {"splits": splits})


def test_pipeline_alignment_check_finds_misaligned_rows(tmp_path):
    manifest = pd.DataFrame(
        {"id": [f"img{i}" for i in range(9)], "class_index": [0, 1, 2] * 3, "split": ["train", "val", "test"] * 3}
    )
    write_features(tmp_path / "good", manifest)
    check = pr.pipeline_alignment(tmp_path / "good", manifest)
    assert all(c["ids_match"] == c["labels_match"] == c["rows"] == 3 for c in check.values())
    write_features(tmp_path / "bad", manifest, order=[1, 0, 2])
    check = pr.pipeline_alignment(tmp_path / "bad", manifest)
    assert check["train"]["ids_match"] == 1


# ---------------------------------------------------------------- the grid script


def grid_dry_run(*settings, **env):
    """study/pitfalls.sh's commands, run nothing; python is this interpreter (the settings reader)."""
    env = {"DRY_RUN": "1", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", **env}
    return subprocess.run(["bash", "study/pitfalls.sh", *settings], cwd=ROOT, env=env, capture_output=True, text=True)


def test_grid_script_runs_the_settings_of_the_one_settings_file():
    """study/pitfalls.yaml defines the settings; the script's commands and the report's sections come from it."""
    out = grid_dry_run().stdout.splitlines()
    names = [re.search(r"--name (\S+)", line)[1] for line in out]
    settings = sorted({n.rsplit("-s", 1)[0].removeprefix("pitfall-") for n in names})
    assert len(out) == 3 * len(settings) and {n[-3:] for n in names} == {"-s0", "-s1", "-s2"}
    assert all("-S train.seed=" in line and "finetune.backbones=\\[efficientnet_lite0\\]" in line for line in out)
    study = yaml.safe_load((ROOT / "study" / "pitfalls.yaml").read_text())
    assert settings == sorted(set(study["settings"]) - set(study["optional"]))
    in_report = {s for s, *_ in pr.FROZEN} | {s for s, *_ in pr.FINETUNE}
    assert in_report <= set(study["settings"]) and set(settings) <= in_report
    assert pr.STUDY == study
    bad = grid_dry_run("no-such-setting")
    assert bad.returncode != 0 and "unknown setting" in bad.stderr
    # every setting's params, formatted as `dvc exp run -S` takes them (a DVC params key, a YAML value)
    (line, *_) = grid_dry_run("adam-1e-3").stdout.splitlines()
    assert line.endswith(
        "-S finetune.methods=\\[finetune_top\\] -S finetune.optimizer=adam -S finetune.learning_rate=0.001 "
    ), line
    seeds = grid_dry_run("bs1", SEEDS="7").stdout
    assert seeds.count("--name pitfall-bs1-s7 ") == 1 and seeds.count("\n") == 1


def test_settings_print_as_bash_and_refuse_an_undefined_optional_setting():
    spec = importlib.util.spec_from_file_location("pitfalls_settings", ROOT / "study" / "pitfalls_settings.py")
    ps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ps)
    study = {
        "seeds": [0, 4],
        "study_params": {"train.epochs": 3},
        "settings": {"a": {"x.y": [1, "b"], "x.z": None}, "b": {"x.w": True}},
        "optional": ["b"],
    }
    out = subprocess.run(
        [
            "bash",
            "-c",
            f"{ps.shell(study)}\n" + 'echo "$DEFAULT_SEEDS|$DEFAULT_STUDY_PARAMS|$DEFAULT_SETTINGS|'
            '$OPTIONAL_SETTINGS|${SETTING_PARAMS[a]}|${SETTING_PARAMS[b]}"',
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == "0 4|finetune.backbones=[efficientnet_lite0] train.epochs=3|a|b|x.y=[1,b] x.z=null|x.w=true"
    with pytest.raises(SystemExit, match="optional settings that are not defined: c"):
        ps.shell({**study, "optional": ["c"]})
