"""The split stage: deterministic, stratified, leak-free splits, and every bad input caught."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import make_image, make_image_tree, tree_fingerprint
from PIL import Image

from transferlab import data, files
from transferlab.images import CONVERSIONS, open_rgb

REPO = Path(__file__).resolve().parents[1]
SIZES = {"a": 20, "b": 13, "c": 9}


def folder_params(root, **overrides) -> dict:
    return {
        "source": "folder",
        "folder": str(root),
        "bad_files": "error",
        "test_fraction": 0.25,
        "val_fraction": 0.15,
        "stratify_by": ["cell_type"],
        "seed": 42,
        **overrides,
    }


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_image_tree(tmp_path / "images", SIZES)


def png_bytes(pixels=None, fmt="PNG") -> bytes:
    image = Image.fromarray(make_image(0, 3, seed=123) if pixels is None else pixels)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


# ---------------------------------------------------------------- split properties


def test_split_is_deterministic_and_independent_of_listing_order(tree, monkeypatch):
    first = data.make_split(folder_params(tree)).manifest
    pd.testing.assert_frame_equal(first, data.make_split(folder_params(tree)).manifest)

    real_walk = os.walk

    def reversed_walk(*args, **kwargs):
        for directory, subdirs, names in real_walk(*args, **kwargs):
            subdirs.reverse()
            names.reverse()
            yield directory, subdirs, names

    monkeypatch.setattr(os, "walk", reversed_walk)
    pd.testing.assert_frame_equal(first, data.make_split(folder_params(tree)).manifest)


def test_split_is_stratified_and_leak_free(tree):
    manifest = data.make_split(folder_params(tree)).manifest
    assert len(manifest) == sum(SIZES.values())
    for name, n in SIZES.items():
        counts = manifest[manifest["class_name"] == name]["split"].value_counts()
        assert abs(counts["test"] - n * 0.25) <= 1
        assert abs(counts["val"] - (n - counts["test"]) * 0.15) <= 1
        assert counts["train"] == n - counts["test"] - counts["val"] >= 1
    assert manifest["id"].is_unique
    for column in ("id", "sha256"):
        assert manifest.groupby(column)["split"].nunique().max() == 1


def test_stratifies_on_metadata_and_keeps_duplicates_together():
    rng = np.random.default_rng(0)
    rows = []
    for name, types in {"ok": {"mono": 37, "poly": 11}, "bad": {"mono": 6, "poly": 19}}.items():
        for cell_type, n in types.items():
            for i in range(n):
                digest = f"{name}-{cell_type}-{rng.integers(0, n // 2 + 1)}"  # about half duplicates
                rows.append(
                    {"id": f"{name}/{cell_type}{i:03d}", "class_name": name, "cell_type": cell_type, "sha256": digest}
                )
    frame = pd.DataFrame(rows)
    unique = frame.assign(sha256=frame["id"])
    for seed in range(5):
        split = data.assign_splits(unique, ["cell_type"], 0.25, 0.15, seed)
        for (name, cell_type), group in unique.groupby(["class_name", "cell_type"]):
            n_test = (split[group.index] == "test").sum()
            assert abs(n_test - len(group) * 0.25) <= 1, (name, cell_type)
        with_duplicates = frame.assign(split=data.assign_splits(frame, ["cell_type"], 0.25, 0.15, seed))
        assert with_duplicates.groupby("sha256")["split"].nunique().max() == 1


def test_seed_changes_the_split_but_not_the_sizes(tree):
    one = data.make_split(folder_params(tree, seed=1)).manifest
    two = data.make_split(folder_params(tree, seed=2)).manifest
    assert (one["split"] != two["split"]).any()
    assert one.groupby(["class_name", "split"]).size().equals(two.groupby(["class_name", "split"]).size())


def test_a_smaller_validation_fraction_keeps_the_test_split_and_draws_from_the_larger_validation(tree):
    """The ELPV refit (reports/elpv_benchmark.md) trains on more of the training part by lowering val_fraction
    and is compared with the protocol on test: that is fair only if the test images are the same ones."""
    full = data.make_split(folder_params(tree, val_fraction=0.3)).manifest.set_index("id")["split"]
    small = data.make_split(folder_params(tree, val_fraction=0.1)).manifest.set_index("id")["split"]
    assert set(full[full == "test"].index) == set(small[small == "test"].index)
    assert set(small[small == "val"].index) < set(full[full == "val"].index)  # a strict subset: the rest trains
    assert set(full[full == "train"].index) < set(small[small == "train"].index)


# ---------------------------------------------------------------- outputs


def test_outputs_hashes_and_paths(tree, tmp_path):
    split_dir = tmp_path / "split"
    data.write_split(data.make_split(folder_params(tree)), split_dir)
    assert sorted(p.name for p in split_dir.iterdir()) == [
        "bad_files.csv",
        "classes.json",
        "manifest.csv",
        "source.json",
        "summary.json",
    ]
    manifest = data.load_manifest(split_dir)
    paths = data.resolve_paths(manifest, split_dir)
    assert [files.sha256_file(p) for p in paths] == list(manifest["sha256"])
    assert manifest["path"].iloc[0] == "a/img_000.png" and manifest["id"].iloc[0] == "a/img_000"
    assert list(manifest["id"]) == sorted(manifest["id"])
    assert str(tree) not in (split_dir / "manifest.csv").read_text()
    assert files.read_json(split_dir / "source.json") == {"source": "folder", "root": str(tree)}
    assert data.manifest_sha256(split_dir) == files.sha256_file(split_dir / "manifest.csv")
    assert data.load_classes(split_dir) == ["a", "b", "c"]
    assert files.read_json(split_dir / "classes.json")["index"] == {"a": 0, "b": 1, "c": 2}
    assert (split_dir / "bad_files.csv").read_text() == "path,reason\n"
    summary = files.read_json(split_dir / "summary.json")
    assert summary["splits"]["test"]["a"] == 5 and summary["images"] == 42
    assert summary["conversions"] == {"none": 42} and summary["duplicate_groups"] == []


def test_images_changed_since_the_split_are_refused_by_every_reader_naming_each_file(tree, tmp_path):
    """A stage must not read new bytes under the old manifest's hash: DVC does not re-split on an in-place edit."""
    split_dir = tmp_path / "split"
    data.write_split(data.make_split(folder_params(tree)), split_dir)
    manifest = data.load_manifest(split_dir)
    assert len(data.resolve_paths(manifest, split_dir)) == len(manifest)  # untouched: accepted
    (tree / "a" / "img_001.png").write_bytes(png_bytes(make_image(1, 3, seed=7)))  # same path, new bytes
    (tree / "b" / "img_002.png").unlink()
    with pytest.raises(data.DataError) as error:
        data.resolve_paths(manifest, split_dir)
    message = str(error.value)
    assert message.startswith(f"2 image(s) under {tree} are not the ones {split_dir / 'manifest.csv'} lists")
    assert "  a/img_001.png: changed" in message and "  b/img_002.png: missing or unreadable" in message
    assert "dvc repro --force --single-item split" in message
    others = manifest[~manifest["path"].isin(["a/img_001.png", "b/img_002.png"])]
    assert len(data.resolve_paths(others, split_dir)) == len(others)  # a stage reading only the others goes on


def test_class_map_is_stable_when_files_are_added_or_renamed(tree):
    before = data.make_split(folder_params(tree)).classes
    (tree / "b" / "img_000.png").rename(tree / "b" / "renamed.png")
    Image.fromarray(make_image(0, 3, seed=99)).save(tree / "a" / "new.png")
    after = data.make_split(folder_params(tree))
    assert after.classes == before == ["a", "b", "c"]
    assert "b/renamed" in set(after.manifest["id"])


def test_accepted_modes_are_converted_and_recorded(tree):
    pixels = make_image(2, 3, seed=7)
    gray = pixels[..., 0]
    samples = {
        "gray.png": Image.fromarray(gray),
        "gray_alpha.png": Image.fromarray(gray).convert("LA"),
        "bilevel.png": Image.fromarray(gray).convert("1"),
        "palette.png": Image.fromarray(pixels).convert("P"),
        "rgba.png": Image.fromarray(pixels).convert("RGBA"),
        "cmyk.jpg": Image.fromarray(pixels).convert("CMYK"),
        "cmyk_tiff.tif": Image.fromarray(pixels).convert("CMYK"),
        "sixteen.png": Image.fromarray(gray.astype(np.uint16) * 257),
        "int32.tif": Image.fromarray(gray.astype(np.int32) * 257),
        "rgb.jpg": Image.fromarray(pixels),
    }
    for name, image in samples.items():
        image.save(tree / "c" / name)
    manifest = data.make_split(folder_params(tree)).manifest.set_index("path")
    expected = {
        "gray.png": "L",
        "gray_alpha.png": "LA",
        "bilevel.png": "1",
        "palette.png": "P",
        "rgba.png": "RGBA",
        "cmyk.jpg": "CMYK",
        "cmyk_tiff.tif": "CMYK",
        "sixteen.png": "I;16",
        "int32.tif": "I",
        "rgb.jpg": "RGB",
    }
    for name, mode in expected.items():
        row = manifest.loc[f"c/{name}"]
        assert (row["mode"], row["conversion"]) == (mode, CONVERSIONS[mode])
        assert (row["width"], row["height"]) == (32, 32)
        assert open_rgb(tree / "c" / name).shape == (32, 32, 3)


def _png_48bit(path: Path) -> None:
    """16 bits per RGB channel, which Pillow opens as 8-bit "RGB" (keeping the high bytes)."""
    import struct
    import zlib

    rows = np.random.default_rng(3).integers(0, 65535, (8, 8 * 3)).astype(">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in rows)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_names_animation_deep_colour_and_outside_links_are_recorded(tree, tmp_path):
    """Kept, and said in the manifest: what open_rgb does to them, and where a link leads."""
    Image.fromarray(make_image(0, 3, seed=5)).save(tree / "c" / "my cat.png")
    Image.fromarray(make_image(0, 3, seed=6)).save(tree / "c" / "café ñ 猫.png")
    frames = [Image.fromarray(make_image(0, 3, seed=10 + i)).convert("P") for i in range(3)]
    frames[0].save(tree / "c" / "anim.gif", save_all=True, append_images=frames[1:])
    _png_48bit(tree / "c" / "deep.png")
    outside = tmp_path / "elsewhere.png"
    Image.fromarray(make_image(2, 3, seed=8)).save(outside)
    os.symlink(outside, tree / "c" / "linked.png")
    split = data.make_split(folder_params(tree))
    split_dir = tmp_path / "split"
    data.write_split(split, split_dir)
    manifest = data.load_manifest(split_dir).set_index("path")
    assert {"c/my cat", "c/café ñ 猫"} <= set(manifest["id"])
    assert manifest.loc["c/anim.gif", "conversion"] == "palette->RGB; first frame of 3 (animated)"
    assert manifest.loc["c/deep.png", "conversion"] == "16-bit per channel RGB->8-bit (>>8)"
    assert manifest.loc["c/linked.png", "notes"] == data.OUTSIDE_NOTE
    assert manifest.loc["c/my cat.png", "notes"] == "" and manifest.loc["c/my cat.png", "conversion"] == "none"
    assert str(tmp_path) not in (split_dir / "manifest.csv").read_text()  # the manifest stays portable
    assert files.read_json(split_dir / "source.json")["symlinks_outside_root"] == {
        "c/linked.png": str(outside.resolve())
    }


def test_duplicates_in_one_class_are_kept_together_and_reported(tree):
    for i in range(4):
        shutil.copy(tree / "a" / f"img_{i:03d}.png", tree / "a" / f"copy_{i}.png")
    split = data.make_split(folder_params(tree))
    manifest = split.manifest.set_index("path")
    for i in range(4):
        assert manifest.loc[f"a/copy_{i}.png", "split"] == manifest.loc[f"a/img_{i:03d}.png", "split"]
    assert split.summary["duplicate_groups"] == [[f"a/copy_{i}.png", f"a/img_{i:03d}.png"] for i in range(4)]
    assert len(split.bad_files) == 0


# ---------------------------------------------------------------- bad input


def _flip_a_byte(path: Path) -> None:
    pixels = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    raw = bytearray(png_bytes(pixels))
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _float_tiff(path: Path) -> None:
    Image.fromarray(np.zeros((8, 8), np.float32)).save(path)


def _write_bytes_name(folder: Path, name: bytes, content: bytes) -> None:
    """A file whose name is raw bytes (not valid UTF-8), as other systems can leave them."""
    with open(os.fsencode(folder) + b"/" + name, "wb") as f:
        f.write(content)


def _bad_idat_crc(path: Path) -> None:
    """The pixel data is intact, its CRC is not: Pillow decodes it without a word."""
    raw = bytearray(png_bytes())
    start = raw.index(b"IDAT") - 4
    length = int.from_bytes(raw[start : start + 4], "big")
    raw[start + 8 + length] ^= 0xFF
    path.write_bytes(bytes(raw))
    open_rgb(path)  # still decodes


def _non_utf8_folder(root: Path) -> None:
    os.mkdir(os.fsencode(root) + b"/d\xff")
    _write_bytes_name(root, b"d\xff/x.png", png_bytes())


# case -> (make it inside the tree, [(path that must be reported, words in its reason)])
BAD_CASES = {
    "text file": (lambda r: (r / "a/notes.txt").write_text("hello"), [("a/notes.txt", "not an image")]),
    "csv file": (lambda r: (r / "b/labels.csv").write_text("x,y\n1,2\n"), [("b/labels.csv", "not an image")]),
    "zero bytes": (lambda r: (r / "a/empty.png").write_bytes(b""), [("a/empty.png", "empty file (0 bytes)")]),
    "corrupt": (lambda r: _flip_a_byte(r / "a/corrupt.png"), [("a/corrupt.png", "corrupt or truncated image")]),
    "truncated png": (lambda r: (r / "a/half.png").write_bytes(png_bytes()[:300]), [("a/half.png", "truncated PNG")]),
    "png without its end": (
        lambda r: (r / "a/tail.png").write_bytes(png_bytes()[:-6]),
        [("a/tail.png", "truncated PNG")],
    ),
    "truncated jpeg": (
        lambda r: (r / "a/half.jpg").write_bytes(png_bytes(fmt="JPEG")[:-100]),
        [("a/half.jpg", "corrupt or truncated image")],
    ),
    "unsupported mode": (lambda r: _float_tiff(r / "a/float.tif"), [("a/float.tif", "unsupported image mode 'F'")]),
    "hidden file": (lambda r: (r / "a/.DS_Store").write_bytes(b"\0\0\0\1Bud1"), [("a/.DS_Store", "hidden file")]),
    "hidden folder": (
        lambda r: shutil.copytree(r / "a", r / "a/.ipynb_checkpoints"),
        [("a/.ipynb_checkpoints/", "hidden folder")],
    ),
    "file outside classes": (
        lambda r: (r / "README.txt").write_text("about"),
        [("README.txt", "outside any class folder")],
    ),
    "same id": (
        lambda r: (r / "a/img_000.jpg").write_bytes(png_bytes(fmt="JPEG")),
        [
            ("a/img_000.jpg", "same id 'a/img_000' as a/img_000.png"),
            ("a/img_000.png", "same id 'a/img_000' as a/img_000.jpg"),
        ],
    ),
    "label conflict": (
        lambda r: shutil.copy(r / "a/img_005.png", r / "b/stolen.png"),
        [
            ("a/img_005.png", "same bytes as b/stolen.png labelled b"),
            ("b/stolen.png", "same bytes as a/img_005.png labelled a"),
        ],
    ),
    "empty class folder": (lambda r: (r / "d").mkdir(), [("d/", "empty class folder")]),
    "class of bad files only": (
        lambda r: (r / "d").mkdir() or (r / "d/x.txt").write_text("x"),
        [("d/x.txt", "not an image"), ("d/", "empty class folder")],
    ),
    "name not UTF-8": (
        lambda r: _write_bytes_name(r / "a", b"bad\xff\xfe.png", png_bytes()),
        [("a/bad\\xff\\xfe.png", "file name is not valid UTF-8")],
    ),
    "folder name not UTF-8": (_non_utf8_folder, [("d\\xff/", "folder name is not valid UTF-8")]),
    "bad IDAT CRC": (lambda r: _bad_idat_crc(r / "a/crc.png"), [("a/crc.png", "chunk IDAT at byte 33 fails its CRC")]),
    "symlink loop": (lambda r: os.symlink(r / "a", r / "a/loop"), [("a/loop/", "symlink loop")]),
    "symlink to an ancestor": (lambda r: os.symlink(r, r / "b/up"), [("b/up/", "symlink loop")]),
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_stops_under_error_and_is_listed_under_skip(tree, case):
    make, expected = BAD_CASES[case]
    make(tree)
    before = tree_fingerprint(tree)

    with pytest.raises(data.DataError) as error:
        data.make_split(folder_params(tree))
    message = str(error.value)
    assert f"{len(expected)} bad file(s)" in message
    for path, reason in expected:
        assert f"  {path}: " in message and reason in message

    split = data.make_split(folder_params(tree, bad_files="skip"))
    bad = dict(zip(split.bad_files["path"], split.bad_files["reason"]))
    assert sorted(bad) == sorted(path for path, _ in expected)
    for path, reason in expected:
        assert reason in bad[path]
    kept = set(split.manifest["path"])
    assert not kept & set(bad)
    # every file is accounted for: in the manifest, or reported (itself or its hidden folder)
    for path in map(data.printable, before):
        assert path in kept or path in bad or any(path.startswith(b) for b in bad if b.endswith("/"))
    assert split.classes == ["a", "b", "c"]
    assert tree_fingerprint(tree) == before


def test_fatal_problems_stop_under_both_policies(tmp_path):
    one = make_image_tree(tmp_path / "one", {"only": 10})
    small = make_image_tree(tmp_path / "small", {"big": 10, "tiny": 2})
    for policy in ("error", "skip"):
        with pytest.raises(data.DataError, match="found only 'only': nothing to classify"):
            data.make_split(folder_params(one, bad_files=policy))
        with pytest.raises(
            data.DataError,
            match="class 'tiny' has 2 usable images; at least 3 are needed to put one in each of train, val, test",
        ):
            data.make_split(folder_params(small, bad_files=policy))
    (small / "tiny" / "img_002.png").write_bytes(png_bytes())  # 3rd image: now just big enough
    assert len(data.make_split(folder_params(small)).manifest) == 13


def test_skip_still_needs_two_classes(tmp_path):
    root = make_image_tree(tmp_path / "images", {"a": 10})
    (root / "b").mkdir()
    (root / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(
        data.DataError,
        match=r"(?s)found only 'a': nothing to classify.*"
        r"Left out as bad.*b/: empty class folder.*b/broken.png: not an image",
    ):
        data.make_split(folder_params(root, bad_files="skip"))


def test_missing_folder_is_named(tree):  # the values themselves are checked by transferlab.params
    with pytest.raises(data.DataError, match="data.folder '/no/such/dir' is not a directory"):
        data.make_split(folder_params(tree, folder="/no/such/dir"))


# ---------------------------------------------------------------- ELPV layout


@pytest.fixture
def fake_elpv(tmp_path, monkeypatch) -> Path:
    """A 32-image copy of the ELPV layout (images/ + labels.csv) with synthetic grayscale cells."""
    root = tmp_path / "elpv"
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(32):
        probability = data.ELPV_PROBABILITIES[i % 4]
        name = f"images/cell{i:04d}.png"
        Image.fromarray(make_image(i % 4, 4, seed=i)[..., 0]).save(root / name)
        lines.append(f"{name}  {probability!r:<20} {'mono' if i % 8 < 4 else 'poly'}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(data, "elpv_root", lambda: root)
    return root


def elpv_params(**overrides) -> dict:
    return {
        "source": "elpv",
        "bad_files": "error",
        "test_fraction": 0.25,
        "val_fraction": 0.15,
        "stratify_by": ["cell_type"],
        "seed": 42,
        **overrides,
    }


def test_elpv_labels_become_classes_and_metadata(fake_elpv):
    split = data.make_split(elpv_params(val_fraction=0))
    row = split.manifest.set_index("id").loc["images/cell0001"]
    assert (row["class_name"], row["class_index"], row["cell_type"]) == ("possibly_defective", 1, "mono")
    assert row["defect_probability"] == pytest.approx(1 / 3)
    assert split.classes == list(data.ELPV_CLASSES)
    assert split.source["licence"] == "CC BY-NC-SA 4.0" and split.source["package"].startswith("elpv-dataset==")
    assert set(split.summary["by_cell_type"]["test"]["defective"]) == {"mono", "poly"}
    assert (split.manifest["split"] == "val").sum() == 0


def test_elpv_label_problems(fake_elpv):
    labels = fake_elpv / "labels.csv"
    labels.write_text(labels.read_text() + "images/cell9999.png  1.0  mono\nimages/cell0031.png  0.5  poly\ngarbage\n")
    (fake_elpv / "images" / "cell0031.png").rename(fake_elpv / "images" / "cell0032.png")
    expected = {
        "images/cell9999.png": "listed in labels.csv (line 33) but the file is missing",
        "images/cell0031.png": "labelled more than once in labels.csv (lines 32, 34)",
        "images/cell0032.png": "no label in labels.csv",
        "labels.csv:35": "malformed line 'garbage'",
    }
    with pytest.raises(data.DataError) as error:
        data.make_split(elpv_params())
    for path, reason in expected.items():
        assert f"  {path}: {reason}" in str(error.value)
    split = data.make_split(elpv_params(bad_files="skip"))
    bad = dict(zip(split.bad_files["path"], split.bad_files["reason"]))
    assert sorted(bad) == sorted(expected) and len(split.manifest) == 31


@pytest.mark.slow
def test_real_elpv_dataset():
    split = data.make_split(elpv_params())
    manifest = split.manifest
    assert len(manifest) == 2624 and split.classes == list(data.ELPV_CLASSES)
    assert manifest["mode"].eq("L").all() and manifest["width"].eq(300).all()
    for name, group in manifest.groupby("class_name"):
        assert abs((group["split"] == "test").sum() - len(group) * 0.25) <= 1, name
        for cell_type, stratum in group.groupby("cell_type"):
            assert abs((stratum["split"] == "test").sum() - len(stratum) * 0.25) <= 1, (name, cell_type)
    assert split.summary["splits"]["test"]["total"] == 657  # 25% of each of the 8 strata


# ---------------------------------------------------------------- the stage, through the CLI and DVC


def _workspace(tmp_path, image_root, **overrides) -> Path:
    work = tmp_path / "work"
    (work / "stages").mkdir(parents=True)
    shutil.copy(REPO / "stages" / "split.py", work / "stages" / "split.py")
    shutil.copytree(REPO / "transferlab", work / "transferlab", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] = {**folder_params(image_root, **overrides), "stratify_by": ["cell_type"]}
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    return work


def _run(args, cwd) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_stage_exits_non_zero_and_writes_nothing_on_bad_files(tree, tmp_path):
    (tree / "a" / "notes.txt").write_text("x")
    (tree / "b" / "empty.png").write_bytes(b"")
    work = _workspace(tmp_path, tree)
    result = _run([sys.executable, "stages/split.py"], work)
    assert result.returncode == 1
    assert "a/notes.txt: not an image" in result.stderr and "b/empty.png: empty file" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (work / "data").exists()

    skip = _workspace(tmp_path / "skip", tree, bad_files="skip")
    result = _run([sys.executable, "stages/split.py"], skip)
    assert result.returncode == 0, result.stderr
    bad = pd.read_csv(skip / "data/split/bad_files.csv")
    assert list(bad["path"]) == ["a/notes.txt", "b/empty.png"]


@pytest.mark.slow
def test_dvc_repro_runs_the_stage_then_finds_it_up_to_date(tree, tmp_path):
    work = _workspace(tmp_path, tree)
    (work / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "split": {
                        "cmd": "python stages/split.py",
                        "deps": ["stages/split.py", "transferlab/data.py"],
                        "params": ["data"],
                        "outs": ["data/split"],
                    }
                }
            }
        )
    )
    for args in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        assert _run(args, work).returncode == 0
    first = _run([sys.executable, "-m", "dvc", "repro"], work)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Running stage 'split'" in first.stdout
    manifest = data.load_manifest(work / "data" / "split")
    assert len(manifest) == sum(SIZES.values())
    assert (work / "dvc.lock").exists()
    second = _run([sys.executable, "-m", "dvc", "repro"], work)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Stage 'split' didn't change" in second.stdout and "Running stage" not in second.stdout


# ---------------------------------------------------------------- outputs pinned to the bytes of the per-row code

# sha256 of data/split's files as the split wrote them before its records became columns (per-row dicts, a JSON
# file cache): memory per file went down, the bytes every downstream fingerprint hashes must not move
PINNED_FOLDER = {
    "bad_files.csv": "a7765fa801326601304f6853cc2368118b9dd083cbe95aa41f6cd9151479478b",
    "classes.json": "55b24af14c7be0a17eb26099a63328ecdae30358dc34b1884195ad9f44b5c36b",
    "manifest.csv": "401d73cd2051af9038f1286be7e2f015bb4e6fdd6d73381dcf34a869bda6727f",
    "summary.json": "6ed66d12620658311c2b529ccd60e684801a053ac6a7f6621c82386405f50b09",
}
PINNED_ELPV = {
    "bad_files.csv": "d1551e208269aee28abe97af78fd4f27ecfb6e656e98e06384506702de26a627",
    "classes.json": "780afa1c3af9ee73f3ec00684ab8ff9e431a51e39223a674312875484a90571f",
    "manifest.csv": "768a4a8e0b9f71d187bf0547ba0d2fa5725bc210500713f7ef3b1953e5c1a80b",
    "summary.json": "3ab5881f9ff2d6ce970ede846c3aa709e21d3b2736921cc8e218aba549382a77",
}


def pinned_outputs(split: data.Split, out: Path) -> dict[str, str]:
    data.write_split(split, out)
    return {p.name: files.sha256_file(p) for p in sorted(out.iterdir()) if p.name != "source.json"}


@pytest.mark.parametrize("cached", [False, True], ids=["first", "cached"])
def test_outputs_keep_the_bytes_of_the_per_row_split(tmp_path, monkeypatch, cached):
    """BMP files (uncompressed: the same bytes under any zlib) with a duplicate, a label conflict, a bad and a
    hidden file; and an ELPV-style tree with metadata stratified on. Run twice, the second from the file cache."""
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "RACY_NS", 0)
    root = make_image_tree(tmp_path / "images", SIZES, size=8, suffix=".bmp")
    shutil.copy(root / "a" / "img_001.bmp", root / "a" / "dup.bmp")
    shutil.copy(root / "b" / "img_002.bmp", root / "c" / "conflict.bmp")
    (root / "c" / "notes.txt").write_text("not an image")
    (root / "a" / ".DS_Store").write_bytes(b"\0\1")
    elpv = tmp_path / "elpv"
    (elpv / "images").mkdir(parents=True)
    lines = []
    for i in range(40):
        Image.fromarray(make_image(i % 4, 4, size=8, seed=i)[..., 0]).save(elpv / "images" / f"cell{i:04d}.bmp")
        lines.append(f"images/cell{i:04d}.bmp  {data.ELPV_PROBABILITIES[i % 4]!r} {'mono' if i % 8 < 3 else 'poly'}")
    (elpv / "labels.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(data, "elpv_root", lambda: elpv)
    for run in range(2 if cached else 1):
        folder = pinned_outputs(
            data.make_split(folder_params(root, bad_files="skip", stratify_by=[], seed=3)), tmp_path / f"f{run}"
        )
        elpv_split = pinned_outputs(data.make_split(elpv_params()), tmp_path / f"e{run}")
    assert folder == PINNED_FOLDER
    assert elpv_split == PINNED_ELPV
