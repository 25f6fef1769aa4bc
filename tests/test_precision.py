"""compute.precision: resolution of `auto`, the Keras policy it applies, float32 where it must stay float32,
loss scaling and the non-finite-loss stop under float16. Tiny real Keras models."""

import importlib.util

import keras
import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import ROOT, make_image_tree

from transferlab import backbones, features, files, params, precision, train

HEAD = {"units": 16, "dropout": 0.0, "dropout_position": "after_dense", "pooling": "avg"}
CFG = {"seed": 0, "epochs": 2, "batch_size": 8, "optimizer": "adam", "learning_rate": 0.01, "momentum": 0.9}
CFG |= {**params.CONTROL_DEFAULTS, "probe_solver": "keras"}  # training controls off


@pytest.mark.parametrize(
    "flags, gpus, expected",
    [
        ({"avx2", "avx512_bf16"}, [], "mixed_bfloat16"),
        ({"amx_bf16", "amx_tile"}, [], "mixed_bfloat16"),
        ({"avx2", "avx512f"}, [], "float32"),
        (set(), [(8, 0)], "mixed_bfloat16"),
        ({"avx512_bf16"}, [(7, 5)], "mixed_float16"),  # a GPU decides, whatever the CPU
        (set(), [(9, 0), (7, 0)], "mixed_float16"),  # the oldest GPU decides
    ],
)
def test_auto_resolves_from_cpu_flags_and_gpu_capability(flags, gpus, expected):
    resolved, why = precision.resolve("auto", flags, gpus)
    assert resolved == expected and why.startswith("auto: ")


def test_explicit_settings_are_kept_and_bad_ones_refused(tmp_path):
    for name in precision.PRECISIONS:
        assert precision.resolve(name, {"avx512_bf16"}, [(8, 0)]) == (name, "set in params")
    with pytest.raises(ValueError, match=r"compute.precision must be one of .*'float16'"):
        precision.resolve("float16")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["compute"]["precision"] = "bf16"
    with pytest.raises(
        params.ParamsError,
        match="compute.precision: must be one of float32, mixed_bfloat16, mixed_float16, auto, got 'bf16'",
    ):
        params.validate(raw)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n")
    assert precision.cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert precision.cpu_flags(tmp_path / "missing") == set()


def test_policy_applies_and_restores_the_global_policy():
    before = keras.config.dtype_policy().name
    with precision.policy("mixed_bfloat16"):
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
    assert keras.config.dtype_policy().name == before
    with pytest.raises(ValueError, match="precision must be one of"):
        with precision.policy("auto"):
            pass


@pytest.mark.parametrize(
    "name, compute", [("float32", "float32"), ("mixed_bfloat16", "bfloat16"), ("mixed_float16", "float16")]
)
def test_mixed_models_compute_low_with_float32_variables_logits_and_features(name, compute):
    with precision.policy(name):
        x = inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3, name="conv")(x)
        extractor = features.extractor(keras.Model(inputs, x), "conv", conv_map=True)
        head = train.build_head((4,), 3, HEAD, 0)
        train.compile_model(head, train.make_optimizer("sgd", 0.1))
    out = extractor(np.ones((2, 8, 8, 3), "float32"))
    assert out["conv_map"].dtype == compute  # the convolution ran in the policy's precision...
    assert out["pooled"].dtype == "float32"  # ...the stored pooled vector is a float32 mean
    assert head(np.ones((2, 4), "float32")).dtype == "float32"  # logits, hence the loss, in float32
    assert head.get_layer("head_dense").compute_dtype == compute
    assert {w.dtype for w in head.weights} == {"float32"}
    assert isinstance(head.optimizer, keras.optimizers.LossScaleOptimizer) == (name == "mixed_float16")


def test_bfloat16_changes_the_numbers_but_not_much():
    """The policy is really in effect: features differ from float32 ones, by bfloat16's rounding only."""
    x = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype("float32")
    pooled = {}
    for name in ("float32", "mixed_bfloat16"):
        keras.utils.set_random_seed(0)
        with precision.policy(name):
            inputs = keras.Input((16, 16, 3))
            base = keras.Model(inputs, keras.layers.Conv2D(32, 3, activation="relu")(inputs))
            pooled[name] = features.extractor(base, None, False)(x)["pooled"].numpy()
    diff = np.abs(pooled["float32"] - pooled["mixed_bfloat16"]).max()
    assert 0 < diff < 2e-2 * np.abs(pooled["float32"]).max()


def test_a_float16_overflow_stops_with_the_non_finite_message():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32") * 1e6  # fine in float32, beyond float16's 65504
    y = (x[:, 0] > 0).astype("int32")
    with precision.policy("mixed_float16"):
        with pytest.raises(FloatingPointError, match=r"training loss became (nan|inf) at epoch 1, batch 1; nothing"):
            train.train_head(x, y, x, y, 2, CFG, HEAD)
    _, history, _, _ = train.train_head(x, y, x, y, 2, CFG, HEAD)  # float32: no overflow
    assert np.isfinite(history["loss"]).all()


def test_augmentation_stays_float32_preprocessing_under_a_mixed_policy(tmp_path):
    root = make_image_tree(tmp_path / "img", classes={"a": 2, "b": 2}, size=20)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    record = backbones.preprocessing_record(backbones.get("vgg16"), "native", 16)
    batches = {}
    for name in ("float32", "mixed_bfloat16"):
        with precision.policy(name):
            batches[name] = next(iter(features.image_dataset(paths, [0, 0, 1, 1], record, 4, augment_seed=3)))[0]
    assert batches["mixed_bfloat16"].dtype == "float32"
    assert np.array_equal(batches["float32"].numpy(), batches["mixed_bfloat16"].numpy())


# ---------------------------------------------------------------- the accuracy-cost comparison

spec = importlib.util.spec_from_file_location("precision_compare", ROOT / "benchmarks" / "precision_compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def _predictions(directory, run, ids, labels, preds):
    (directory / run).mkdir(parents=True)
    pd.DataFrame({"id": ids, "label": labels, "pred": preds, "logit_a": 0.0}).to_csv(
        directory / run / "predictions.csv", index=False
    )


def test_comparison_pairs_predictions_by_image_id_not_row_order(tmp_path):
    ids = [f"img{i:03d}" for i in range(200)]
    labels = np.arange(200) % 4
    a_pred = labels.copy()
    a_pred[:40] = (labels[:40] + 1) % 4  # A: 160/200 right
    b_pred = labels.copy()
    b_pred[30:50] = (labels[30:50] + 1) % 4  # B: 180/200 right; only-A-right 10 (40..49), only-B-right 30 (0..29)
    order = np.random.default_rng(0).permutation(200)  # B's rows in another order
    _predictions(tmp_path / "a", "train_head/vgg16-native", ids, labels, a_pred)
    _predictions(tmp_path / "b", "train_head/vgg16-native", [ids[i] for i in order], labels[order], b_pred[order])
    _predictions(tmp_path / "a", "finetune_top/vgg16-native", ids, labels, labels)  # scored in A only: left out
    (row,) = compare.compare(tmp_path / "a", tmp_path / "b").itertuples()
    assert row.run == "train_head/vgg16-native" and row.n == 200
    assert (row.accuracy_a, row.accuracy_b, row.difference) == (0.8, 0.9, pytest.approx(0.1))
    assert (row.only_a_right, row.only_b_right) == (10, 30)
    lo, hi = row.ci95
    # paired: the sd of the per-image differences is sqrt(0.2 - 0.01) / sqrt(200) = 0.031, so about +-0.06
    assert 0.03 < lo < 0.1 < hi < 0.17


def test_comparison_refuses_runs_on_different_test_images(tmp_path):
    _predictions(tmp_path / "a", "r", ["x", "y"], [0, 1], [0, 1])
    _predictions(tmp_path / "b", "r", ["x", "z"], [0, 1], [0, 1])
    with pytest.raises(ValueError, match="did not score the same test images"):
        compare.compare(tmp_path / "a", tmp_path / "b")
    _predictions(tmp_path / "c", "r", ["x", "y"], [0, 0], [0, 1])
    with pytest.raises(ValueError, match="labels differ for 1 test images"):
        compare.compare(tmp_path / "a", tmp_path / "c")


def test_end_to_end_logits_match_the_head_on_extracted_features_exactly_under_bfloat16(tmp_path):
    """Regression: eager and graph kernels round bfloat16 differently (fused bias + relu or not), so
    predict_logits must run as a graph like extraction does; eagerly, parity was off by ~1e-1 here."""
    with precision.policy("mixed_bfloat16"):
        keras.utils.set_random_seed(0)
        x = inputs = keras.Input((16, 16, 3))
        for i in range(2):  # non-zero biases: with zero ones fused and unfused agree
            x = keras.layers.Conv2D(
                32, 3, activation="relu", bias_initializer=keras.initializers.RandomNormal(0.5, 1.0, seed=i)
            )(x)
        base = keras.Model(inputs, x)
        head = train.build_head((32,), 2, HEAD, 0)
        end_to_end = train.end_to_end(base, head, "avg")
    root = make_image_tree(tmp_path / "img", classes={"a": 8, "b": 8}, size=16)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    labels = [0] * 8 + [1] * 8
    record = backbones.preprocessing_record(backbones.get("vgg16"), "native", 16)
    stats = features.extract_split(
        features.extractor(base, None, False), paths, labels, paths, record, 8, tmp_path / "f", "t"
    )
    files.write_json(tmp_path / "meta.json", {"splits": {"f": stats}})
    _, _, pooled = features.load_split(tmp_path, "f")
    bottleneck = train.predict_logits(head, train.feature_dataset(pooled, labels, 8))
    images = train.predict_logits(end_to_end, features.image_dataset(paths, labels, record, 8))
    assert np.array_equal(bottleneck, images)
