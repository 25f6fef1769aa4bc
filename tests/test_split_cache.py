"""The split's per-file cache: a second split of an unchanged folder opens no file and writes the same bytes;
a changed file, a damaged cache or a file changed just before the split is never trusted."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import make_image_tree

from transferlab import data


def params(root, **overrides) -> dict:
    return {
        "source": "folder",
        "folder": str(root),
        "bad_files": "skip",
        "test_fraction": 0.25,
        "val_fraction": 0.15,
        "stratify_by": [],
        "seed": 42,
        **overrides,
    }


@pytest.fixture
def tree(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "RACY_NS", 0)  # the files were written just now; see test_recent_files_*
    return make_image_tree(tmp_path / "img", classes={"a": 8, "b": 8, "c": 8}, size=16)


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The files inspect_image reads."""
    calls, inspect = [], data.inspect_image
    monkeypatch.setattr(data, "inspect_image", lambda path: calls.append(Path(path).name) or inspect(path))
    return calls


def written(split: data.Split, out: Path) -> dict[str, bytes]:
    data.write_split(split, out)
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_second_split_reads_no_file_and_writes_the_same_bytes(tree, tmp_path, opened):
    first = written(data.make_split(params(tree)), tmp_path / "first")
    assert len(opened) == 24
    second = written(data.make_split(params(tree)), tmp_path / "second")
    assert len(opened) == 24  # nothing opened again
    assert second == first
    os.environ["TRANSFERLAB_CACHE"] = str(tmp_path / "empty-cache")  # restored by monkeypatch
    assert written(data.make_split(params(tree)), tmp_path / "uncached") == first


def test_a_changed_file_is_checked_again_even_with_its_old_size_and_mtime(tree, tmp_path, opened):
    data.make_split(params(tree))
    victim = tree / "b" / "img_003.png"
    st = victim.stat()
    victim.write_bytes(b"\0" * st.st_size)  # same size, not an image any more
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime (the ctime still moves)
    opened.clear()
    split = data.make_split(params(tree))
    assert opened == ["img_003.png"]
    assert split.bad_files.values.tolist() == [["b/img_003.png", "not an image (Pillow cannot identify it)"]]


def test_a_damaged_cache_is_ignored(tree, tmp_path, opened):
    first = written(data.make_split(params(tree)), tmp_path / "first")
    (cache,) = (tmp_path / "cache" / "split").glob("*.npz")
    entries = data._read_cache(cache)
    assert entries["size"].tolist() == [[16, 16]] * 24
    entries["size"][3] = 17, 16
    checksum = cache.read_bytes()[:65]
    data._write_cache(cache, entries)
    cache.write_bytes(checksum + cache.read_bytes()[65:])  # plausible entries, but the checksum no longer matches
    opened.clear()
    assert written(data.make_split(params(tree)), tmp_path / "again") == first
    assert len(opened) == 24


def test_recent_files_are_not_cached(tree, tmp_path, opened, monkeypatch):
    """A file written within RACY_NS of the split could change again within the same mtime tick."""
    monkeypatch.setattr(data, "RACY_NS", 60 * 10**9)
    data.make_split(params(tree))
    data.make_split(params(tree))
    assert len(opened) == 48


def test_concurrent_writers_leave_one_whole_cache(tmp_path):
    path = tmp_path / "split" / "x.npz"
    versions = [{"stat": np.full((50_000, 3), i)} for i in range(8)]
    threads = [threading.Thread(target=data._write_cache, args=(path, v)) for v in versions for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    read = data._read_cache(path)["stat"]
    assert read.shape == (50_000, 3) and len(np.unique(read)) == 1
    assert [p.name for p in path.parent.iterdir()] == ["x.npz"]  # no scratch file left


def test_cache_lives_under_transferlab_cache(tree, tmp_path):
    data.make_split(params(tree))
    (cache,) = (tmp_path / "cache" / "split").glob("*.npz")
    entries = data._read_cache(cache)
    assert entries["path"].astype(str).tolist() == sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*.png"))
