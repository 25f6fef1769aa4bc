"""params.yaml is checked once, against one schema, before a stage does anything."""

import os
import shutil
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT

from transferlab import params

DEFAULTS = yaml.safe_load((ROOT / "params.yaml").read_text())


def changed(**edits) -> dict:
    """The repository's params with ``{"section.key": value}`` edits (dots in keys as __)."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in edits.items():
        section, key = dotted.split("__", 1)
        p[section][key] = value
    return p


def test_the_repository_params_are_valid_and_unchanged_by_checking():
    assert params.load(ROOT / "params.yaml") == DEFAULTS


def test_evaluate_batch_size_is_a_param_of_32_images_by_default():
    assert DEFAULTS["evaluate"]["batch_size"] == 32  # what evaluate hard-coded before: same results
    with pytest.raises(params.ParamsError, match="evaluate.batch_size: must be an integer >= 1, got 0"):
        params.validate(changed(evaluate__batch_size=0))


def test_every_bad_key_is_listed_in_one_message():
    bad = changed(
        train__epochs=0,
        finetune__epochs=0,
        data__val_fraction=0,
        extract__preprocessing=["native", "raw"],
        finetune__cut_point={"vgg16": "block9"},
        extract__backbones=["vgg16", "vgg99"],
        head__pooling="max",
        weights__init="imagenet21k",
        ablation__augmentation="always",
        train__optimizer="rmsprop",
        evaluate__bootstrap=-1,
        data__bad_files="ignore",
    )
    bad["train"]["epoch"] = 3  # a typo
    bad["ablaton"] = {"bn_training": True}  # a section's name mistyped: its switches would silently stay off
    with pytest.raises(params.ParamsError) as error:
        params.validate(bad)
    message = str(error.value)
    for line in [
        "train.epochs: must be an integer >= 1, got 0",
        "finetune.epochs: must be an integer >= 1, got 0",
        "data.val_fraction: must be a number in (0, 1), got 0",
        "extract.preprocessing: must be one of native, rescale, got 'raw'",
        "finetune.cut_point.vgg16: must be one of block5_conv1, block4_conv1, block3_conv1, all, got 'block9'",
        "extract.backbones: must be one of densenet121, efficientnet_lite0, inception_v3, resnet50, vgg16, got 'vgg99'",
        "head.pooling: must be one of avg, flatten, got 'max'",
        "weights.init: must be one of imagenet, none, got 'imagenet21k'",
        "ablation.augmentation: must be one of none, train, train_and_val, got 'always'",
        "train.optimizer: must be one of adam, sgd, got 'rmsprop'",
        "evaluate.bootstrap: must be an integer >= 1, got -1",
        "data.bad_files: must be one of error, skip, got 'ignore'",
        "train.epoch: unknown key",
        "ablaton: unknown section (known: data, weights, extract, train, head, finetune, ablation, evaluate, "
        "compute, export)",
    ]:
        assert f"\n  {line}" in message
    assert message.startswith("14 bad value(s) in params.yaml:")


def test_yaml_1_1_exponents_are_numbers():
    text = (ROOT / "params.yaml").read_text().replace("learning_rate: 0.001", "learning_rate: 1e-3")
    raw = yaml.safe_load(text)
    assert raw["train"]["learning_rate"] == "1e-3"  # what PyYAML gives: a string
    assert params.validate(raw)["train"]["learning_rate"] == 0.001
    with pytest.raises(params.ParamsError, match=r"train.learning_rate: must be a number in \(0, inf\), got 'fast'"):
        params.validate(changed(train__learning_rate="fast"))
    with pytest.raises(params.ParamsError, match="train.learning_rate: must be a number"):
        params.validate(changed(train__learning_rate=".nan"))


@pytest.mark.parametrize(
    "edits, words",
    [
        ({"data__source": "folder", "data__folder": None}, "data.folder: must name the image tree"),
        (
            {"finetune__backbones": ["resnet50", "densenet121"], "extract__backbones": ["resnet50"]},
            "finetune.backbones: 'densenet121' is not in extract.backbones",
        ),
        (
            {"finetune__cut_point": {"vgg16": "block5_conv1"}, "finetune__backbones": ["efficientnet_lite0"]},
            "finetune.cut_point.efficientnet_lite0: missing",
        ),
        ({"extract__input_size": {"vgg17": 128}}, "extract.input_size.vgg17: must be one of densenet121"),
        ({"data__test_fraction": 1.5}, "data.test_fraction: must be a number in (0, 1), got 1.5"),
        ({"ablation__batch_size": 0}, "ablation.batch_size: must be an integer >= 1, got 0 (or null)"),
        ({"head__units": True}, "head.units: must be an integer >= 0, got True"),
        ({"head__units": -1}, "head.units: must be an integer >= 0, got -1"),
    ],
)
def test_relations_and_edge_values(edits, words):
    with pytest.raises(params.ParamsError) as error:
        params.validate(changed(**edits))
    assert words in str(error.value)


def test_no_fine_tuning_needs_no_fine_tuning_features():
    # the linear probe: one backbone extracted, fine-tuning switched off
    assert params.validate(changed(extract__backbones=["vgg16"], finetune__methods=[]))


def test_missing_sections_and_keys_are_named():
    p = changed()
    del p["ablation"], p["train"]["seed"]
    with pytest.raises(params.ParamsError) as error:
        params.validate(p)
    assert "\n  ablation: missing section" in str(error.value) and "\n  train.seed: missing" in str(error.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, args",
    [
        ("split", []),
        ("weights", ["vgg16"]),
        ("selftest", []),
        ("extract_features", ["vgg16", "native"]),
        ("train_head", ["vgg16", "native"]),
        ("finetune", ["finetune_top", "vgg16"]),
        ("evaluate", []),
    ],
)
def test_every_stage_stops_on_bad_params_with_the_message(tmp_path, stage, args):
    for name in ("stages", "transferlab"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(changed(train__epochs=0, finetune__learning_rate="1e-3x")))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    out = subprocess.run(
        [sys.executable, f"stages/{stage}.py", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-3:] == [  # after TensorFlow's start-up lines
        f"{stage}: 2 bad value(s) in params.yaml:",
        "  train.epochs: must be an integer >= 1, got 0",
        "  finetune.learning_rate: must be a number in (0, inf), got '1e-3x'",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "stages", "transferlab"]  # nothing written


def test_overrides_apply_as_dvc_exp_run_dash_s_does():
    raw = {"finetune": {"cut_point": {"vgg16": "block5_conv1"}, "epochs": 4}}
    out = params.with_overrides(raw, ["finetune.cut_point.vgg16=all", "finetune.epochs=16", "finetune.methods=[a,b]"])
    assert out == {"finetune": {"cut_point": {"vgg16": "all"}, "epochs": 16, "methods": ["a", "b"]}}
    with pytest.raises(KeyError):
        params.with_overrides(raw, ["nosection.key=1"])
