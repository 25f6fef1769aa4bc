"""Training: parity of bottleneck and frozen end-to-end, ablation switches, cached fine-tuning,
determinism, non-finite losses, atomic outputs and tf.distribute. Small real Keras models."""

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from transferlab import backbones, features, files, precision, train
from transferlab.params import CONTROL_DEFAULTS

HEAD = {"units": 16, "dropout": 0.5, "dropout_position": "after_dense", "pooling": "avg"}
# a train section as params.yaml gives it, training controls off
TRAIN = {"seed": 0, "epochs": 2, "batch_size": 8, "optimizer": "adam", "learning_rate": 0.01, "momentum": 0.9}
TRAIN |= {**CONTROL_DEFAULTS, "probe_solver": "keras"}


def small_base(seed=0):
    """conv-BN-relu, pool, conv-BN-relu: a BatchNorm base with a cut boundary ("pool")."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((12, 12, 3))
    for i, name in enumerate(("low", "high")):
        x = keras.layers.Conv2D(6, 3, padding="same", name=f"{name}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
        if i == 0:
            x = keras.layers.MaxPooling2D(name="pool")(x)
    base = keras.Model(inputs, x, name="base")
    for layer in base.layers:  # non-trivial moving statistics, as in a pretrained base
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.full(6, 0.3, "float32"))
            layer.moving_variance.assign(np.full(6, 2.0, "float32"))
    return base


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 12, 12, 3)).astype("float32")
    y = (x[..., 0].mean(axis=(1, 2)) > 0).astype("int32") + (x[..., 1].mean(axis=(1, 2)) > 0)
    return x, y


@pytest.fixture(params=[p if p == "float32" else pytest.param(p, marks=pytest.mark.slow) for p in precision.PRECISIONS])
def policy(request):
    """Run the test with models built under each precision policy (float32 alone in the fast subset)."""
    with precision.policy(request.param):
        yield request.param


def bottleneck_run(base, x, y, epochs=3, batch_size=8):
    features = precision.pooled(base(x, training=False)).numpy()
    train.seed_everything(0)
    head = train.build_head(features.shape[1:], 3, HEAD, 0)
    train.compile_model(head, train.make_optimizer("adam", 1e-2))
    history, _ = train.fit(head, train.feature_dataset(features, y, batch_size, 0), None, epochs)
    return head(features).numpy(), history


def end_to_end_run(base, x, y, bn_training=False, epochs=3, batch_size=8, head_cfg=HEAD):
    train.seed_everything(0)
    head = train.build_head(base.output.shape[-1:], 3, head_cfg, 0)
    train.configure_base(base, None, bn_training)
    model = train.end_to_end(base, head, "avg")
    train.compile_model(model, train.make_optimizer("adam", 1e-2))
    history, _ = train.fit(model, train.feature_dataset(x, y, batch_size, 0), None, epochs)
    return model(x).numpy(), history


def test_frozen_end_to_end_reproduces_bottleneck_head(toy, policy):
    x, y = toy
    a, ha = bottleneck_run(small_base(), x, y)
    b, hb = end_to_end_run(small_base(), x, y)
    # Same seeds, order and optimizer: only float summation order can differ, far below 1e-4.
    assert np.abs(a - b).max() < 1e-4
    assert np.allclose(ha["loss"], hb["loss"], atol=1e-5)


def test_bn_training_ablation_breaks_parity_and_moves_statistics(toy, policy):
    x, y = toy
    a, _ = bottleneck_run(small_base(), x, y)
    base = small_base()
    kernel = base.get_layer("low_conv").kernel.numpy().copy()
    gamma = base.get_layer("low_bn").gamma.numpy().copy()
    b, _ = end_to_end_run(base, x, y, bn_training=True)
    assert np.abs(a - b).max() > 1e-2
    bn = base.get_layer("low_bn")
    assert not np.allclose(bn.moving_mean.numpy(), 0.3)  # statistics drifted...
    assert np.array_equal(bn.gamma.numpy(), gamma)  # ...but gamma stayed frozen,
    assert np.array_equal(base.get_layer("low_conv").kernel.numpy(), kernel)  # and so did the convs


def test_frozen_base_keeps_batchnorm_in_inference_mode(toy, policy):
    x, y = toy
    base = small_base()
    before = [w.numpy().copy() for w in base.weights]
    end_to_end_run(base, x, y)
    assert all(np.array_equal(w0, w.numpy()) for w0, w in zip(before, base.weights))


def test_dropout_position_changes_only_the_dropout_place():
    after = train.build_head((8,), 3, HEAD, 0)
    before = train.build_head((8,), 3, {**HEAD, "dropout_position": "before_dense"}, 0)
    names = lambda m: [layer.name for layer in m.layers]  # noqa: E731
    assert names(after) == ["features", "head_dense", "head_dropout", "logits"]
    assert names(before) == ["features", "head_dropout", "head_dense", "logits"]
    for wa, wb in zip(after.weights, before.weights):
        assert np.array_equal(wa.numpy(), wb.numpy())
    x = np.ones((2, 8), "float32")
    assert np.array_equal(after(x, training=False).numpy(), before(x, training=False).numpy())


def test_linear_head_is_one_dense_layer_that_learns_a_linear_rule():
    head = {**HEAD, "units": 0, "dropout": 0.0}
    model = train.build_head((8,), 3, head, 0)
    assert [layer.name for layer in model.layers] == ["features", "head_dropout", "logits"]
    assert [tuple(w.shape) for w in model.weights] == [(8, 3), (3,)]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 3))).argmax(1)  # classes a linear map separates exactly
    cfg = {**TRAIN, "epochs": 30, "batch_size": 32, "learning_rate": 0.05}
    model, _, _, _ = train.train_head(x[:400], y[:400], x[400:500], y[400:500], 3, cfg, head)
    accuracy = (model(x[500:], training=False).numpy().argmax(1) == y[500:]).mean()
    assert accuracy >= 0.9  # head.units < 0 is refused by transferlab.params (tests/test_params.py)


def test_configure_base_unfreezes_exactly_above_the_boundary():
    base = small_base()
    train.configure_base(base, "pool", bn_training=False)
    trainable = {w.path.split("/")[0] for w in base.trainable_weights}
    assert trainable == {"high_conv"}  # BatchNorm above the cut stays frozen, in inference mode
    train.configure_base(base, "pool", bn_training=True)
    assert {w.path for w in base.trainable_weights} == {
        "high_conv/kernel",
        "high_conv/bias",
        "high_bn/gamma",
        "high_bn/beta",
    }
    with pytest.raises(ValueError, match="not a layer"):
        train.configure_base(base, "block5_pool", False)
    # the whole network (cut point "all"): every layer trains, BatchNorm still in inference mode
    train.configure_base(base, backbones.cut_boundary(backbones.get("vgg16"), "all"), bn_training=False)
    assert {w.path.split("/")[0] for w in base.trainable_weights} == {"low_conv", "high_conv"}


@pytest.mark.parametrize("name", sorted(backbones.REGISTRY))
def test_every_backbone_has_the_whole_network_as_a_cut_point(name):
    bb = backbones.get(name)
    assert backbones.cut_boundary(bb, "all") == backbones.INPUT and "all" in backbones.cut_point_names(bb)
    with pytest.raises(ValueError, match="known: .*all"):
        backbones.cut_boundary(bb, "everything")


@pytest.mark.parametrize("boundary", ["pool", backbones.INPUT])
def test_cached_and_full_finetuning_agree_on_first_epoch(toy, policy, boundary):
    """The cached path (activations at the boundary, from features.extractor) trains as the full one does;
    at the whole network's boundary the stored activations are the inputs themselves."""
    x, y = toy
    results = []
    for cached in (True, False):
        base = small_base()
        train.seed_everything(0)
        head = train.build_head(base.output.shape[-1:], 3, HEAD, 0)
        train.configure_base(base, boundary, False)
        full = train.end_to_end(base, head, "avg")
        model = train.top_model(base, boundary, head, "avg") if cached else full
        inputs = features.extractor(base, boundary, conv_map=False, pooled=False)(x)["cut"].numpy() if cached else x
        if boundary == backbones.INPUT:
            assert not cached or np.array_equal(inputs, x)
        train.compile_model(model, train.make_optimizer("sgd", 0.05, 0.9))
        history, _ = train.fit(model, train.feature_dataset(inputs, y, 8, 0), None, 1)
        results.append((full(x).numpy(), history["loss"].iloc[0], base.get_layer("high_conv").kernel.numpy()))
    (logits_c, loss_c, k_c), (logits_f, loss_f, k_f) = results
    assert abs(loss_c - loss_f) < 1e-5
    assert np.abs(k_c - k_f).max() < 1e-5
    assert np.abs(logits_c - logits_f).max() < 1e-4
    assert np.abs(k_c - small_base().get_layer("high_conv").kernel.numpy()).max() > 1e-4  # it did train


def test_float16_cut_activations_train_like_float32_ones(toy):
    """finetune.cut_dtype float16: the cached path on rounded activations stays close to the full path."""
    x, y = toy
    results = []
    for dtype in ("float16", None):
        base = small_base()
        train.seed_everything(0)
        head = train.build_head(base.output.shape[-1:], 3, HEAD, 0)
        train.configure_base(base, "pool", False)
        full = train.end_to_end(base, head, "avg")
        model = train.top_model(base, "pool", head, "avg") if dtype else full
        inputs = keras.Model(base.input, base.get_layer("pool").output)(x).numpy().astype(dtype) if dtype else x
        train.compile_model(model, train.make_optimizer("sgd", 0.05, 0.9))
        history, _ = train.fit(model, train.feature_dataset(inputs, y, 8, 0), None, 2)
        results.append((full(x).numpy(), history["loss"].to_numpy(), base.get_layer("high_conv").kernel.numpy()))
    (logits_h, loss_h, k_h), (logits_f, loss_f, k_f) = results
    assert np.abs(loss_h - loss_f).max() < 1e-4  # measured: 2e-7 (2 epochs, float32 policy)
    assert np.abs(k_h - k_f).max() < 1e-4
    assert np.abs(logits_h - logits_f).max() < 1e-3
    assert (logits_h.argmax(1) == logits_f.argmax(1)).mean() >= 0.95


def test_two_identical_runs_match_exactly(toy, policy):
    x, y = toy
    a, ha = bottleneck_run(small_base(), x, y)
    b, hb = bottleneck_run(small_base(), x, y)
    assert np.array_equal(a, b)
    assert ha.equals(hb)


def test_non_finite_loss_stops_with_a_clear_message(toy):
    x, y = toy
    features = np.random.default_rng(0).normal(size=(48, 6)).astype("float32")
    head = train.build_head((6,), 3, HEAD, 0)
    train.compile_model(head, train.make_optimizer("sgd", 1e30))  # the first step blows the weights up
    with pytest.raises(FloatingPointError, match=r"training loss became nan at epoch 1, batch 2; nothing was saved"):
        train.fit(head, train.feature_dataset(features, y, 8), None, 1)


def test_interrupted_output_leaves_previous_result(tmp_path):
    out = tmp_path / "runs" / "x"
    with files.atomic_dir(out) as d:
        (d / "done.txt").write_text("first")
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_dir(out) as d:
            (d / "half.bin").write_bytes(b"\0" * 10)
            raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["done.txt"]
    assert not list(tmp_path.glob("runs/*.partial"))


def test_non_finite_validation_loss_stops_the_run(toy):
    """One batch per epoch: the training loss is computed before the step that blows the weights up,
    so only the validation loss shows it (Keras would end the run with rc 0 and an empty val_loss)."""
    _, y = toy
    features = np.random.default_rng(0).normal(size=(48, 6)).astype("float32")
    head = train.build_head((6,), 3, HEAD, 0)
    train.compile_model(head, train.make_optimizer("adam", 1e30))
    ds = train.feature_dataset(features, y, 64)
    with pytest.raises(FloatingPointError, match=r"validation loss became (nan|inf) at epoch 1; nothing was saved"):
        train.fit(head, ds, ds, 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["float32", "mixed_bfloat16"])
def test_mirrored_strategy_on_two_logical_cpus(name):
    """Logical devices must be set before TF starts, hence a fresh interpreter."""
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from transferlab import precision, train
        head_cfg = {{**{HEAD!r}, "dropout": 0.0}}  # dropout masks differ per replica
        def run(strategy):
            train.seed_everything(0)
            with strategy.scope(), precision.policy({name!r}):
                head = train.build_head((6,), 3, head_cfg, 0)
                train.compile_model(head, train.make_optimizer("sgd", 0.1))
            x = np.random.default_rng(0).normal(size=(64, 6)).astype("float32"); y = (x[:, 0] > 0).astype("int32")
            history, _ = train.fit(head, train.feature_dataset(x, y, 16), None, 2)
            return strategy.num_replicas_in_sync, history["loss"].to_numpy()
        n2, mirrored = run(train.strategy(["/cpu:0", "/cpu:1"]))
        n1, single = run(train.strategy())
        print(n2, n1, float(np.abs(mirrored - single).max()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    replicas, single, diff = out.stdout.split()[-3:]
    assert (replicas, single) == ("2", "1")
    assert float(diff) < 1e-4  # the same global batch, split over two replicas, gives the same loss
