"""Read a PyTorch legacy (pre-zip, ``_use_new_zipfile_serialization=False``) state dict without PyTorch.

A .pth file is pickled code as much as data: a plain ``pickle.load`` of one would call any
function it names. This reader admits only the handful of globals a state dict needs
(the tensor rebuild functions, the storage types, ``OrderedDict``) and refuses all else
with an ``UnpicklingError`` naming the class, so a converted checkpoint cannot run code.

Layout of the legacy format (``torch.serialization._legacy_save``): five consecutive
pickles (magic number, protocol version 1001, system info, the object with storages
replaced by persistent ids, the list of storage keys), then for each key in that list an
int64 element count followed by the storage's raw little-endian bytes.
"""

from __future__ import annotations

import collections
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),  # widened to float32 after reading, numpy has no bfloat16
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.name]


@dataclass(frozen=True)
class _StorageRef:
    """A persistent id resolved to (root storage, element offset, element count) of a view."""

    key: str
    storage_type: _StorageType
    root_numel: int
    offset: int
    numel: int


@dataclass(frozen=True)
class _PendingTensor:
    """A tensor whose bytes come after the pickle; materialised once all storages are read."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """Stand-in for ``torch._utils._rebuild_tensor(_v2)``; the extra v2 args (requires_grad, hooks) are dropped."""
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError(f"tensor built from {type(storage).__name__}, expected a storage")
    return _PendingTensor(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only tensors, storages and OrderedDict are allowed "
                "in a state dict (a checkpoint naming other classes could execute code)"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, root_numel, view = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"persistent id names {storage_type!r}, not a storage type")
        if view is None:
            return _StorageRef(str(key), storage_type, int(root_numel), 0, int(root_numel))
        _view_key, offset, numel = view
        return _StorageRef(str(key), storage_type, int(root_numel), int(offset), int(numel))


def _restricted_load(f):
    return _RestrictedUnpickler(f).load()


def _materialise(t: _PendingTensor, storages: dict[str, np.ndarray]) -> np.ndarray:
    flat = storages[t.storage.key][t.storage.offset : t.storage.offset + t.storage.numel]
    if len(t.size) != len(t.stride) or any(n < 0 for n in t.size):
        raise ValueError(f"tensor of size {t.size} with stride {t.stride} is malformed")
    if any(n == 0 for n in t.size):
        return np.zeros(t.size, flat.dtype)
    if t.offset < 0 or any(s < 0 for s in t.stride):
        raise ValueError("negative storage offset or stride")
    last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
    if last >= flat.size:
        raise ValueError(f"tensor of size {t.size} stride {t.stride} runs past its storage ({flat.size} elements)")
    if (numel := math.prod(t.size)) > flat.size:  # stride-0 expansion: a few stored bytes would become a huge array
        raise ValueError(
            f"tensor of size {t.size} stride {t.stride} has {numel} elements, more than its storage holds ({flat.size})"
        )
    view = np.lib.stride_tricks.as_strided(
        flat[t.offset :], shape=t.size, strides=tuple(s * flat.itemsize for s in t.stride), writeable=False
    )
    array = np.array(view, order="C")  # an owned copy: tensors sharing a storage must not alias each other
    if t.storage.storage_type.name == "BFloat16Storage":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Tensor name -> numpy array (native layout, e.g. OIHW convs) from a legacy .pth state dict."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        raise ValueError(f"{path} is a zip-format checkpoint (torch>=1.6 default); only the legacy format is supported")
    with open(path, "rb") as f:
        if _restricted_load(f) != MAGIC_NUMBER:
            raise ValueError(f"{path} is not a legacy PyTorch file (bad magic number)")
        if (protocol := _restricted_load(f)) != PROTOCOL_VERSION:
            raise ValueError(f"{path}: unsupported legacy protocol version {protocol}")
        sys_info = _restricted_load(f)
        if not (isinstance(sys_info, dict) and sys_info.get("little_endian")):
            raise ValueError(f"{path} was not written on a little-endian machine")
        obj = _restricted_load(f)
        keys = _restricted_load(f)
        if not isinstance(obj, dict) or not all(isinstance(v, _PendingTensor) for v in obj.values()):
            raise ValueError(f"{path} does not hold a flat state dict of tensors")
        roots = {t.storage.key: t.storage for t in obj.values()}
        if set(keys) != set(roots):
            raise ValueError(f"{path}: storage list does not match the storages its tensors use")
        storages = {key: _read_storage(f, roots[key], path) for key in keys}
    return {name: _materialise(t, storages) for name, t in obj.items()}


def _read_storage(f, root: _StorageRef, path: Path) -> np.ndarray:
    """One storage record: int64 element count, then the raw bytes."""
    header = f.read(8)
    numel = int(np.frombuffer(header, "<i8")[0]) if len(header) == 8 else -1
    if numel != root.root_numel:
        raise ValueError(f"{path}: storage {root.key} holds {numel} elements, its tensors expect {root.root_numel}")
    raw = f.read(numel * root.storage_type.dtype.itemsize)
    if len(raw) != numel * root.storage_type.dtype.itemsize:
        raise ValueError(f"{path} is truncated inside storage {root.key}")
    return np.frombuffer(raw, root.storage_type.dtype)
