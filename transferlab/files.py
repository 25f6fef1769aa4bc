"""Small file helpers shared by the stages: hashes, and writes that never leave half a result.

Scratch names end in ``.partial`` (folders) and ``.tmp`` (files); .dvcignore keeps DVC from
hashing them, so a killed stage's leftovers never change a directory dependency's hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """Machine-wide cache (weights, the split's per-file results), outside any checkout and DVC's outputs."""
    return Path(os.environ.get("TRANSFERLAB_CACHE") or Path.home() / ".cache" / "transferlab").expanduser()


def write_json(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a scratch directory that replaces ``path`` only if the block finishes.

    An interrupted stage then leaves either the previous complete output or nothing,
    never a half-written directory that a later stage could mistake for a result.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
