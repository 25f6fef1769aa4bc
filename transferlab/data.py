"""Find the images, check every file, and split them into train/val/test once for all stages.

The split stage is the only place that looks at the raw source. It writes ``data/split/``:

- ``manifest.csv``: one row per image (id, path, class, split, sha256, size, mode, the
  RGB conversion applied, metadata such as ELPV's ``cell_type``), sorted by id. Paths are
  relative to the source root, so the manifest (whose hash enters every downstream
  fingerprint) is the same on every machine;
- ``source.json``: where the root is on this machine, and where the data came from;
- ``classes.json``: class names in index order, which depend only on the class names;
- ``bad_files.csv``: files left out and why (``data.bad_files: skip``);
- ``summary.json``: counts per split and class, duplicates, conversions (DVC metrics).

Every file under the source is either in the manifest or in ``bad_files.csv``; nothing is
dropped silently. Rules for files that are not plainly images:

- hidden files and folders (name starting with ``.``, e.g. ``.DS_Store``) are flagged,
  not ignored: a hidden file can be a real image, and skipping it without a trace would
  change the dataset unnoticed. A hidden folder is flagged once and not read;
- files directly in a ``folder`` root (outside any class subfolder) are flagged;
- non-images, zero-byte, unreadable, corrupt or truncated files are flagged; images in a
  mode :data:`transferlab.images.CONVERSIONS` cannot convert are flagged;
- two files whose ids collide (``cat/a.png`` and ``cat/a.jpg``) are both flagged;
- byte-identical files in one class are kept and always put in the same split; the same
  bytes under two classes is a labelling conflict and every copy is flagged;
- a class with no usable images is flagged (and dropped under ``skip``);
- a file or folder name that is not valid UTF-8 is flagged (shown with ``\\xNN`` escapes):
  ids and the manifest are text, so such a name could not be written or read back;
- a PNG chunk whose CRC does not match its bytes is flagged, even when Pillow decodes it
  (Pillow does not check the pixel data's CRCs): damaged bytes are not trusted as pixels;
- a symlinked folder that leads back to one of its own ancestors is one "symlink loop" entry.

Handled and recorded instead of flagged: an animated image (GIF, APNG, WebP, multi-page
TIFF) is used as its first frame, said in ``conversion`` ("first frame of N"); a 16-bit per
channel colour image says it is reduced to 8 bits in ``conversion``; a file reached through a
symlink that leads outside the data folder is used and says so in ``notes`` (the targets are
listed in ``source.json``, which is machine-specific, so the manifest stays portable).

With ``bad_files: error`` any of these stops the stage, naming every one; with ``skip``
they are left out and listed. Fewer than two classes, or a class too small to appear in
every split, is always an error: leaving it out would silently change the task.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import struct
import sys
import tempfile
import time
import types
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import PIL
from PIL import Image, ImageFile, UnidentifiedImageError
from tqdm import tqdm

from transferlab import files, images, layout
from transferlab.images import CONVERSIONS, open_rgb

SPLITS = ("train", "val", "test")

ELPV_PACKAGE = "elpv-dataset"
ELPV_CLASSES = ("functional", "possibly_defective", "likely_defective", "defective")
# labels.csv gives the experts' defect probability; each value is one class
ELPV_PROBABILITIES = (0.0, 1 / 3, 2 / 3, 1.0)
# The ELPV literature's binary task (Deitsch et al. 2019): a cell is defective when its defect probability is >= 0.5
ELPV_DEFECTIVE = tuple(c for c, p in zip(ELPV_CLASSES, ELPV_PROBABILITIES) if p >= 0.5)
ELPV_INFO = {
    "licence": "CC BY-NC-SA 4.0",
    "url": "https://github.com/zae-bayern/elpv-dataset",
    "citation": "Buerhop-Lutz et al. 2018 (EU PVSEC); Deitsch et al. 2019 (Solar Energy 185)",
}

# a complete PNG ends with this chunk; Pillow decodes a PNG whose tail is cut off
# without complaint as long as the pixel data is complete, so it is checked by hand
_PNG_END = b"IEND\xaeB`\x82"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OUTSIDE_NOTE = "symlink to a file outside the data folder"
_NO_METADATA = types.MappingProxyType({})  # shared by every file of a folder source (one dict per file adds up)
# a file changed this shortly before a split may change again without its mtime moving: never cached
RACY_NS = 2 * 10**9

MANIFEST_COLUMNS = [
    "id",
    "path",
    "class_name",
    "class_index",
    "split",
    "sha256",
    "width",
    "height",
    "mode",
    "conversion",
    "notes",
]
_STRING_COLUMNS = ["id", "path", "class_name", "split", "sha256", "mode", "conversion", "notes"]


# threads that hash and decode files: Pillow's decoders, hashlib and zlib release the GIL
_IO_THREADS = min(32, (os.cpu_count() or 1) * 4)


class DataError(ValueError):
    """A problem with the data or the ``data:`` params that the user must fix; no traceback needed."""


class BadFile(Exception):
    """One file cannot be used; the message is the reason written to bad_files.csv."""


@dataclass
class Split:
    """Everything the split stage writes; built by :func:`make_split`, written by :func:`write_split`."""

    manifest: pd.DataFrame
    classes: list[str]
    bad_files: pd.DataFrame
    summary: dict
    source: dict


@dataclass
class _Scan:
    """What a source holds before any file is opened."""

    root: Path
    classes: list[str]  # in index order
    candidates: list[tuple[str, str, dict]]  # (path relative to root, class name, metadata)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    info: dict = field(default_factory=dict)  # for source.json


# ---------------------------------------------------------------- public API for other stages


def load_manifest(split_dir: str | os.PathLike = layout.SPLIT) -> pd.DataFrame:
    """The manifest with text columns kept as text (a class called "NA" or "1" stays a string)."""
    return pd.read_csv(
        Path(split_dir) / "manifest.csv",
        dtype={column: str for column in _STRING_COLUMNS},
        keep_default_na=False,
    )


def resolve_paths(df: pd.DataFrame, split_dir: str | os.PathLike = layout.SPLIT) -> list[str]:
    """Absolute paths of the manifest rows on this machine (the root lives in source.json), refused with
    DataError naming every file whose bytes are no longer the ones the split hashed.

    DVC re-runs the split when its code or ``data`` params change, not when an image is replaced in place;
    without this check a stage would read the new bytes while its record carries the old manifest's hash.
    """
    root = files.read_json(Path(split_dir) / "source.json")["root"]
    if not os.path.isdir(root):
        raise DataError(
            f"the image root {root} recorded in {Path(split_dir) / 'source.json'} does not exist "
            "on this machine; re-run the split stage here (dvc repro split)"
        )
    paths = [os.path.join(root, *path.split("/")) for path in df["path"]]
    changed = []
    with ThreadPoolExecutor(max_workers=_IO_THREADS) as pool:
        for path, expected, found in zip(df["path"], df["sha256"], _bounded_map(pool, _sha256_or_none, paths)):
            if found != expected:
                changed.append(f"  {printable(path)}: {'missing or unreadable' if found is None else 'changed'}")
    if changed:
        raise DataError(
            f"{len(changed)} image(s) under {root} are not the ones {Path(split_dir) / 'manifest.csv'} lists "
            "(its sha256 of each file): re-run the split to take them as they are now "
            "(dvc repro --force --single-item split, then dvc repro):\n" + "\n".join(changed)
        )
    return paths


def _sha256_or_none(path: str) -> str | None:
    try:
        return files.sha256_file(path)
    except OSError:
        return None


def manifest_sha256(split_dir: str | os.PathLike = layout.SPLIT) -> str:
    """Fingerprint of the exact images, labels and split every downstream result depends on."""
    return files.sha256_file(Path(split_dir) / "manifest.csv")


def load_classes(split_dir: str | os.PathLike = layout.SPLIT) -> list[str]:
    """Class names in index order."""
    return list(files.read_json(Path(split_dir) / "classes.json")["classes"])


def make_split(params: dict) -> Split:
    """Scan the source in ``params`` (the ``data:`` section, checked by transferlab.params), check every file, split.

    Raises :class:`DataError` naming every problem found, instead of returning a partial
    result, whenever the policy or the data does not allow a clean split.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise DataError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process, so truncated images "
            "would pass as valid; whatever set it must not run before the split stage"
        )
    scan = _scan_elpv(elpv_root()) if params["source"] == "elpv" else _scan_folder(params["folder"])
    bad = list(scan.bad)
    candidates = _drop_colliding_ids(scan.candidates, bad)

    scan.candidates = []  # the kept list is all that is needed: memory per file is what limits large folders
    rows, outside = [], {}  # rows: (path, class_name, (sha256, width, height, mode, conversion), notes, metadata)
    results = _inspect_all(scan.root, [path for path, _, _ in candidates])
    # strings, not pathlib, per file here and in _inspect_all: Python 3.11's pathlib interns every path part for good
    inside_prefix = os.path.join(scan.root, "")
    for (path, class_name, metadata), info in zip(candidates, results):
        if isinstance(info, str):
            bad.append((path, info))
            continue
        target = os.path.realpath(os.path.join(scan.root, path))
        inside = target.startswith(inside_prefix) or target == str(scan.root)
        if not inside:
            outside[path] = target
        rows.append((path, class_name, info, "" if inside else OUTSIDE_NOTE, metadata))
    del candidates, results
    rows = _drop_label_conflicts(rows, bad)

    counts = collections.Counter(row[1] for row in rows)
    for name in scan.classes:
        if name not in counts:
            bad.append(
                (f"{name}/", "empty class folder (no usable images)")
                if params["source"] == "folder"
                else ("labels.csv", f"no usable images labelled {name}")
            )
    classes = [name for name in scan.classes if name in counts]
    bad.sort()

    t, v = Fraction(str(params["test_fraction"])), Fraction(str(params["val_fraction"]))
    fatal = _structural_problems(classes, counts, t, v)
    if (bad and params["bad_files"] == "error") or fatal:
        raise DataError(_problems_message(bad, fatal, scan.root, params["bad_files"]))

    manifest = _manifest(rows, classes)
    del rows
    stratify_by = [c for c in params["stratify_by"] if c in manifest.columns]
    manifest["split"] = assign_splits(manifest, stratify_by, t, v, params["seed"])
    _check_every_split_used(manifest, classes, t, v)
    bad_files = pd.DataFrame(bad, columns=["path", "reason"])
    summary = _summary(manifest, classes, bad_files, stratify_by, params)
    source = {"source": params["source"], "root": str(scan.root), **scan.info}
    if outside:
        source["symlinks_outside_root"] = outside
    return Split(manifest, classes, bad_files, summary, source)


def write_split(split: Split, split_dir: str | os.PathLike = layout.SPLIT) -> None:
    """Write all outputs at once: a failure leaves the previous split_dir (or none), never half of one."""
    with files.atomic_dir(split_dir) as out:
        split.manifest.to_csv(out / "manifest.csv", index=False, lineterminator="\n")
        split.bad_files.to_csv(out / "bad_files.csv", index=False, lineterminator="\n")
        files.write_json(out / "source.json", split.source)
        files.write_json(
            out / "classes.json",
            {"classes": split.classes, "index": {name: i for i, name in enumerate(split.classes)}},
        )
        files.write_json(out / "summary.json", split.summary)


def assign_splits(frame: pd.DataFrame, stratify_by: list[str], test_fraction, val_fraction, seed: int) -> pd.Series:
    """Split name per row: seeded, stratified by class x ``stratify_by``, duplicates kept together.

    Per class, the test size is ``test_fraction`` of its images and the val size
    ``val_fraction`` of the rest (rounded half up, at least one each when the fraction is
    not zero); both are shared out over the strata by largest remainder, so every class
    and every stratum is within one image of its exact share. Within a stratum, files
    are taken in the order of ``sha256(seed:id)``: deterministic, independent of listing
    order, and adding a file does not reshuffle the others. Files with the same bytes
    (``sha256`` column) form one unit that goes to a single split. Test is taken first, so it depends on
    ``test_fraction`` and ``seed`` alone: a smaller ``val_fraction`` trains on more images, scored on the same test.
    """
    t, v = Fraction(str(test_fraction)), Fraction(str(val_fraction))
    # positions and numpy arrays, not per-row dicts: memory per row is what limits a 100k-image split
    ids = frame["id"].to_numpy()
    order = np.argsort(ids, kind="stable")
    codes = pd.factorize(frame["sha256"].to_numpy()[order])[0]  # one unit per distinct bytes, numbered in id order
    leaders = order[np.unique(codes, return_index=True)[1]]  # each unit's first row in id order
    unit_sizes = np.bincount(codes)
    class_names = frame["class_name"].to_numpy()
    strata_columns = [frame[column].to_numpy() for column in stratify_by]
    strata: dict[str, dict[tuple, list[int]]] = {}  # class -> stratum -> units
    for unit, row in enumerate(leaders.tolist()):
        key = tuple(str(column[row]) for column in strata_columns)
        strata.setdefault(class_names[row], {}).setdefault(key, []).append(unit)

    chosen = np.empty(len(leaders), dtype=object)  # unit -> split name
    for class_strata in strata.values():
        keys = sorted(class_strata)
        sizes = [int(unit_sizes[class_strata[key]].sum()) for key in keys]
        _, n_val, n_test = _split_sizes(sum(sizes), t, v)
        test_quota = _apportion(sizes, t, n_test)
        val_quota = _apportion([n - q for n, q in zip(sizes, test_quota)], v, n_val)
        for key, quota_test, quota_val in zip(keys, test_quota, val_quota):
            taken = {"test": 0, "val": 0}
            for unit in sorted(class_strata[key], key=lambda u: _order_key(seed, ids[leaders[u]])):
                name = "test" if taken["test"] < quota_test else "val" if taken["val"] < quota_val else "train"
                if name != "train":
                    taken[name] += int(unit_sizes[unit])
                chosen[unit] = name
    names = np.empty(len(frame), dtype=object)
    names[order] = chosen[codes]
    return pd.Series(names, index=frame.index, dtype=object)


def inspect_image(path: str | os.PathLike) -> dict:
    """sha256, size, mode and RGB conversion of one file, decoded exactly as later stages will.

    The bytes are read once, so the hash and the decode check describe the same content.
    Raises :class:`BadFile` with the reason when the file cannot be used.
    """
    try:
        with open(path, "rb") as file:  # not Path(path): pathlib interns the parts (see make_split)
            data = file.read()
    except OSError as error:
        raise BadFile(f"unreadable ({type(error).__name__}: {error.strerror})") from None
    if not data:
        raise BadFile("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            mode, (width, height), kind = image.mode, image.size, image.format
            frames = getattr(image, "n_frames", 1)
            wide = any(";16" in str(tile.args) for tile in image.tile) and not mode.startswith("I")
    except UnidentifiedImageError:
        raise BadFile("not an image (Pillow cannot identify it)") from None
    except Exception as error:  # noqa: BLE001 - any header failure means the file is unusable
        raise BadFile(f"corrupt image header ({type(error).__name__}: {error})") from None
    if mode not in CONVERSIONS:
        raise BadFile(f"unsupported image mode {mode!r} (supported: {', '.join(CONVERSIONS)})")
    if kind == "PNG" and _PNG_END not in data:
        raise BadFile("truncated PNG (no IEND chunk at the end)")
    try:
        open_rgb(io.BytesIO(data))
    except Exception as error:  # noqa: BLE001 - whatever stops a full decode makes it unusable
        raise BadFile(f"corrupt or truncated image ({type(error).__name__}: {error})") from None
    if kind == "PNG":
        _check_png_crcs(data)
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "width": width,
        "height": height,
        "mode": mode,
        "conversion": _conversion(mode, wide, frames),
    }


def _conversion(mode: str, wide: bool, frames: int) -> str:
    """What open_rgb does to this file, as recorded in the manifest."""
    steps = [f"16-bit per channel {mode}->8-bit (>>8)"] if wide else []
    steps += [CONVERSIONS[mode]] if CONVERSIONS[mode] != "none" else []
    steps += [f"first frame of {frames} (animated)"] if frames > 1 else []
    return "; ".join(steps) or "none"


def _check_png_crcs(data: bytes) -> None:
    """Every chunk's CRC, IDAT's included: Pillow skips those of the pixel data."""
    offset = len(_PNG_SIGNATURE)
    while offset + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        body = data[offset + 4 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length] or b"\0\0\0\0")
        if zlib.crc32(body) != crc:
            name = kind.decode("latin-1")
            raise BadFile(f"corrupt PNG: chunk {name} at byte {offset} fails its CRC check (damaged bytes)")
        if kind == b"IEND":
            return
        offset += 12 + length


def elpv_root() -> Path:
    """The ``data`` folder of the installed elpv-dataset package (labels.csv + images/)."""
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or spec.origin is None:
        raise DataError(
            "data.source is elpv but the elpv-dataset package is not installed (pip install elpv-dataset==1.0.0.post1)"
        )
    return Path(spec.origin).resolve().parent / "data"


# ---------------------------------------------------------------- sources


def walk(root: Path, under: str = "") -> tuple[list[str], list[tuple[str, str]]]:
    """Every file below root/under as a sorted POSIX path relative to root, and the hidden ones flagged.

    Symlinks are followed, except a folder link that leads back to an ancestor (a loop).
    """
    found, bad = [], []
    for directory, subdirs, names in os.walk(root / under, followlinks=True):
        rel = Path(directory).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        here = os.path.realpath(directory)
        for name in list(subdirs):
            reason = _unusable_name(name, "folder")
            if reason is None:
                target = os.path.realpath(os.path.join(directory, name))
                if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
                    reason = "symlink loop (the folder link leads back to an ancestor; not followed)"
            if reason:
                bad.append((printable(prefix + name) + "/", reason))
                subdirs.remove(name)
        for name in names:
            reason = _unusable_name(name, "file")
            if reason:
                bad.append((printable(prefix + name), reason))
            else:
                found.append(prefix + name)
    return sorted(found), bad


def printable(path: str) -> str:
    """A path as text that can be written anywhere: bytes that are not UTF-8 become \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _unusable_name(name: str, kind: str) -> str | None:
    """Why a file or folder is not read (hidden, or a name that is not text), else None."""
    if name != printable(name):
        return f"{kind} name is not valid UTF-8 (not read; ids must be text)"
    if name.startswith("."):
        return f"hidden {kind} (not read)"
    return None


def _scan_folder(folder) -> _Scan:
    """A tree of class subfolders (Keras flow_from_directory layout); classes in sorted name order."""
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data.folder {folder!r} is not a directory (resolved to {root})")
    found, bad = walk(root)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and _unusable_name(e.name, "folder") is None)
    candidates, class_names = [], {}  # one class-name string shared by its files
    for path in found:
        if "/" in path:
            name = path.split("/", 1)[0]
            candidates.append((path, class_names.setdefault(name, name), _NO_METADATA))
        else:
            bad.append((path, "file outside any class folder (only subfolders are classes)"))
    return _Scan(root, classes, candidates, bad)


def _scan_elpv(root: Path) -> _Scan:
    """ELPV: images/ plus labels.csv ("images/cell0001.png  1.0  mono"), cross-checked both ways."""
    labels = root / "labels.csv"
    if not labels.is_file():
        raise DataError(f"ELPV labels not found at {labels}; is the elpv-dataset package complete?")
    found, bad = walk(root, "images")
    on_disk = set(found)
    lines: dict[str, list[tuple[int, list[str]]]] = {}
    for number, line in enumerate(labels.read_text().splitlines(), 1):
        fields = line.split()
        if len(fields) == 3:
            lines.setdefault(fields[0], []).append((number, fields))
        elif fields:
            bad.append(
                (f"labels.csv:{number}", f"malformed line {line.strip()!r}: expected 'path probability cell_type'")
            )
    candidates = []
    for path, entries in sorted(lines.items()):
        numbers = ", ".join(str(number) for number, _ in entries)
        if len(entries) > 1:
            bad.append((path, f"labelled more than once in labels.csv (lines {numbers})"))
        elif path not in on_disk:
            bad.append((path, f"listed in labels.csv (line {numbers}) but the file is missing"))
        else:
            _, (_, probability, cell_type) = entries[0]
            index = elpv_class(probability)
            if index is None:
                bad.append(
                    (
                        path,
                        f"labels.csv line {numbers}: defect probability {probability!r} is not one of 0, 1/3, 2/3, 1",
                    )
                )
            else:
                metadata = {"cell_type": cell_type, "defect_probability": float(probability)}
                candidates.append((path, ELPV_CLASSES[index], metadata))
    bad += [(path, "no label in labels.csv") for path in sorted(on_disk - set(lines))]
    try:
        package = f"{ELPV_PACKAGE}=={importlib.metadata.version(ELPV_PACKAGE)}"
    except importlib.metadata.PackageNotFoundError:
        package = ELPV_PACKAGE
    info = {"package": package, "labels": "labels.csv", **ELPV_INFO}
    return _Scan(root, list(ELPV_CLASSES), candidates, bad, info)


def binary_task(setting, classes: list[str]) -> dict:
    """The binary figure's positive classes (``evaluate.positive_classes``), or why there is none.

    ``auto`` is ELPV's defective-vs-functional mapping (defect probability >= 0.5) when the classes are
    ELPV's; a list names the positive classes of any dataset; null (or ``auto`` elsewhere) skips the
    figure, saying why. Raises ValueError naming the bad names when a list does not fit ``classes``."""
    if setting == "auto":
        if list(classes) == list(ELPV_CLASSES):
            return {"positive_classes": list(ELPV_DEFECTIVE), "rule": "defective: defect probability >= 0.5"}
        return {
            "skipped": "evaluate.positive_classes is auto, which maps only ELPV's classes; "
            "list this dataset's positive classes there for a binary figure"
        }
    if not setting:
        return {"skipped": "evaluate.positive_classes names no class"}
    unknown = [c for c in setting if c not in classes]
    if unknown or len(set(setting)) == len(classes):
        raise ValueError(
            f"evaluate.positive_classes: must name some, not all, of the classes {list(classes)}, got {list(setting)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return {"positive_classes": list(setting), "rule": "positive: " + ", ".join(setting)}


def elpv_class(probability: str) -> int | None:
    """The class index of an ELPV defect probability as labels.csv writes it; None if it is not 0, 1/3, 2/3 or 1."""
    try:
        value = float(probability)
    except ValueError:
        return None
    matches = [i for i, p in enumerate(ELPV_PROBABILITIES) if abs(value - p) < 1e-6]
    return matches[0] if matches else None


# ---------------------------------------------------------------- checks


def _file_id(path: str) -> str:
    """Stable id: the path without its extension (``cat/img_001``), as PurePosixPath.with_suffix("") gives it.

    String operations, not pathlib: Python 3.11's pathlib interns every path part for good (~190 B per file)."""
    head, slash, name = path.rpartition("/")
    dot = name.rfind(".")
    return head + slash + name[:dot] if 0 < dot < len(name) - 1 else path


def _drop_colliding_ids(candidates, bad):
    """Two files with one id (``a.png``, ``a.jpg``) would make the id ambiguous downstream: flag both."""
    by_id: dict[str, list[str]] = {}
    for path, _, _ in candidates:
        by_id.setdefault(_file_id(path), []).append(path)
    kept = []
    for candidate in candidates:
        same = by_id[_file_id(candidate[0])]
        if len(same) == 1:
            kept.append(candidate)
        else:
            others = ", ".join(p for p in same if p != candidate[0])
            bad.append(
                (candidate[0], f"same id {_file_id(candidate[0])!r} as {others} (ids are paths without extension)")
            )
    return kept


def _inspect_all(root: Path, paths: list[str]) -> list[tuple | str]:
    """inspect_image for every path, as (sha256, width, height, mode, conversion) or the reason it is bad, reusing
    earlier results for files unchanged since (see _cache_file).

    New and changed files are checked in a thread pool: Pillow's decoders, hashlib and zlib release the GIL,
    so the threads use every core without pickling results between processes. Results are tuples whose
    repeated values are shared objects, and file stats are numpy columns: a few hundred bytes per file.
    """
    shared: dict = {}

    def check(path):
        try:
            info = inspect_image(os.path.join(root, path))
        except BadFile as reason:
            return str(reason)
        return (info["sha256"], *(shared.setdefault(info[key], info[key]) for key in _RESULT_FIELDS[1:]))

    started_ns = time.time_ns()
    cache_file = _cache_file(root)
    cached = _read_cache(cache_file)
    stats = np.full((len(paths), 3), -1, dtype=np.int64)  # size, mtime_ns, ctime_ns; size -1: no stat
    inodes = np.zeros(len(paths), dtype=np.uint64)
    for i, path in enumerate(paths):
        with contextlib.suppress(OSError):  # inspect_image says why the file cannot be read
            st = os.stat(os.path.join(root, path))
            stats[i], inodes[i] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns), st.st_ino
    where = _cache_rows(cached, paths, stats, inodes)
    todo = [path for path, row in zip(paths, where.tolist()) if row < 0]
    with ThreadPoolExecutor(max_workers=_IO_THREADS) as pool:
        fresh = iter(
            list(
                tqdm(
                    _bounded_map(pool, check, todo),
                    total=len(todo),
                    desc=f"split: hash + decode ({len(paths) - len(todo)} unchanged files from the cache)",
                    unit="img",
                )
            )
        )
    texts = cached["texts"].tolist() if cached else []
    results = [next(fresh) if row < 0 else _cached_result(cached, row, texts, shared) for row in where.tolist()]
    del fresh, where
    settled = started_ns - RACY_NS
    keep = (stats[:, 0] >= 0) & (stats[:, 1] < settled) & (stats[:, 2] < settled)
    if todo or not cached or not keep.all() or len(cached["path"]) != len(paths):  # else: the cache, row for row
        entries = _cache_entries(
            [p for p, k in zip(paths, keep.tolist()) if k],
            stats[keep],
            inodes[keep],
            [r for r, k in zip(results, keep.tolist()) if k],
        )
        if not cached or any(not np.array_equal(entries[key], cached.get(key)) for key in entries):
            _write_cache(cache_file, entries)
    return results


_RESULT_FIELDS = ("sha256", "width", "height", "mode", "conversion")


def _bounded_map(pool: ThreadPoolExecutor, function, items: list, window: int = 256):
    """pool.map's results in order, with at most ``window`` tasks in flight: pool.map submits every item at
    once, and a pending future per file (about 1.5 KiB each) made the split's memory grow with the folder."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _cache_entries(paths: list[str], stats: np.ndarray, inodes: np.ndarray, results: list) -> dict[str, np.ndarray]:
    """The cache's columns, sorted by path: path (UTF-8), stat, inode, sha256, width, height, and mode,
    conversion and bad-file reason as indices into texts (-1: none)."""
    texts: dict[str, int] = {}

    def code(text):
        return texts.setdefault(text, len(texts))

    good = [r if isinstance(r, tuple) else ("", 0, 0, None, None) for r in results]
    encoded = np.array([p.encode() for p in paths], dtype=bytes)
    columns = {
        "path": encoded,
        "stat": stats,
        "inode": inodes,
        "sha256": np.array([r[0].encode() for r in good], dtype="S64"),
        "size": np.fromiter((n for r in good for n in r[1:3]), dtype=np.int64, count=2 * len(good)).reshape(-1, 2),
        "mode": np.fromiter((-1 if r[3] is None else code(r[3]) for r in good), dtype=np.int32, count=len(good)),
        "conversion": np.fromiter((-1 if r[4] is None else code(r[4]) for r in good), dtype=np.int32, count=len(good)),
        "reason": np.fromiter((-1 if isinstance(r, tuple) else code(r) for r in results), np.int32, len(results)),
    }
    del good
    order = np.argsort(encoded, kind="stable")
    columns = {key: column[order] for key, column in columns.items()}
    columns["texts"] = np.array(list(texts), dtype=str)
    return columns


def _cache_rows(cached: dict, paths: list[str], stats: np.ndarray, inodes: np.ndarray) -> np.ndarray:
    """Per path, its row in the cache when its stat and inode are unchanged, else -1."""
    if not cached or not len(paths) or not len(cached["path"]):
        return np.full(len(paths), -1, dtype=np.int64)
    wanted = np.array([p.encode() for p in paths], dtype=bytes)
    rows = np.minimum(np.searchsorted(cached["path"], wanted), len(cached["path"]) - 1)
    same = (
        (cached["path"][rows] == wanted)
        & (cached["stat"][rows] == stats).all(axis=1)
        & (cached["inode"][rows] == inodes)
        & (stats[:, 0] >= 0)
    )
    return np.where(same, rows, -1)


def _cached_result(cached: dict, row: int, texts: list[str], shared: dict) -> tuple | str:
    reason = int(cached["reason"][row])
    if reason >= 0:
        return texts[reason]
    width, height = cached["size"][row].tolist()
    values = (width, height, texts[cached["mode"][row]], texts[cached["conversion"][row]])
    return (cached["sha256"][row].decode(), *(shared.setdefault(value, value) for value in values))


def _cache_file(root: Path) -> Path:
    """Where inspect_image's results for this root are kept between splits: under the machine's cache, since
    DVC deletes data/split before re-running the stage. Keyed by the root and by the checks' version (this
    module's and images.py's code, Pillow's version), so changed checks never reuse old results; an entry is
    reused only while its file's (size, mtime_ns, ctime_ns, inode) are unchanged."""
    version = [str(root), PIL.__version__, *(files.sha256_file(f) for f in (__file__, images.__file__))]
    key = hashlib.sha256(json.dumps(version).encode()).hexdigest()[:32]
    return files.cache_dir() / "split" / f"{key}.npz"


def _read_cache(path: Path) -> dict[str, np.ndarray]:
    """The cache's columns (see _cache_entries), or nothing when the file is missing or fails its checksum
    (its first line is the sha256 of the rest, an uncompressed .npz). Hashed and loaded from the file in
    pieces, never held whole as bytes."""
    try:
        with open(path, "rb") as file:
            checksum, digest = file.read(65)[:64], hashlib.sha256()
            while chunk := file.read(1 << 20):
                digest.update(chunk)
            if checksum.decode() == digest.hexdigest():
                file.seek(65)
                with np.load(file, allow_pickle=False) as npz:
                    return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile):
        pass
    return {}


def _write_cache(path: Path, entries: dict[str, np.ndarray]) -> None:
    """Replace the cache atomically under a unique scratch name: concurrent splits each leave a whole file.
    A cache that cannot be written only costs time next run, so it is reported, not fatal. The .npz goes
    straight to the file (its offsets count the checksum line) and is hashed back from it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w+b", dir=path.parent, suffix=".tmp", delete=False) as out:
            out.write(b"0" * 64 + b"\n")
            np.savez(out, **entries)
            out.seek(65)
            digest = hashlib.sha256()
            while chunk := out.read(1 << 20):
                digest.update(chunk)
            out.seek(0)
            out.write(digest.hexdigest().encode())
        os.replace(out.name, path)
    except OSError as error:
        print(f"split: cannot write the file cache {path} ({error}); all are read again next time", file=sys.stderr)
        with contextlib.suppress(OSError, NameError):
            os.unlink(out.name)


def _drop_label_conflicts(rows: list[tuple], bad) -> list[tuple]:
    """The same bytes under two classes cannot both be right: flag every copy."""
    first_class: dict[str, str] = {}
    conflicting = set()
    for _, class_name, info, _, _ in rows:
        if first_class.setdefault(info[0], class_name) != class_name:
            conflicting.add(info[0])
    del first_class
    conflicts: dict[str, list[tuple]] = {}
    for row in rows:
        if row[2][0] in conflicting:
            conflicts.setdefault(row[2][0], []).append(row)
    for group in conflicts.values():
        for path, class_name, _, _, _ in group:
            other = min((r for r in group if r[1] != class_name), key=lambda r: r[0])
            bad.append((path, f"same bytes as {other[0]} labelled {other[1]}"))
    return [row for row in rows if row[2][0] not in conflicts] if conflicts else rows


def _structural_problems(classes, counts, t, v) -> list[str]:
    """Problems no policy can skip: a task needs two classes, each present in every split."""
    problems = []
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        problems.append(f"at least 2 classes with usable images are needed, found {found}: nothing to classify")
    needed = _min_class_size(t, v)
    used = [s for s, f in zip(SPLITS, (1, v, t)) if f]
    for name in classes:
        if counts[name] < needed:
            problems.append(
                f"class {name!r} has {counts[name]} usable images; at least {needed} are "
                f"needed to put one in each of {', '.join(used)} "
                f"(test_fraction {float(t):g}, val_fraction {float(v):g})"
            )
    return problems


def _problems_message(bad, fatal, root, policy) -> str:
    """One message naming every problem, so a single run shows everything to fix."""
    listed = [f"  {path}: {reason}" for path, reason in bad]
    reasons = [f"  {problem}" for problem in fatal]
    if bad and policy == "error":
        lines = [
            f"{len(bad)} bad file(s) in {root} (data.bad_files: error), nothing written:",
            *listed,
            "Fix or remove them, or set data.bad_files: skip to leave them out "
            "(they are then listed in bad_files.csv).",
        ]
        return "\n".join(lines + (["Even without them the split is impossible:", *reasons] if fatal else []))
    lines = [f"cannot split {root}, nothing written:", *reasons]
    return "\n".join(lines + ([f"Left out as bad (data.bad_files: skip), {len(bad)} file(s):", *listed] if bad else []))


def _check_every_split_used(manifest, classes, t, v) -> None:
    """Duplicates travel as a unit, which can leave a split without a class after all."""
    used = [s for s, f in zip(SPLITS, (1, v, t)) if f]
    counts = manifest.groupby(["class_name", "split"]).size()
    problems = []
    for name in classes:
        per_split = {s: int(counts.get((name, s), 0)) for s in SPLITS}
        if any(per_split[s] == 0 for s in used):
            shown = ", ".join(f"{s} {per_split[s]}" for s in used)
            problems.append(
                f"class {name!r} is missing from a split after keeping duplicate files "
                f"together ({shown}); add images or remove duplicates"
            )
    if problems:
        raise DataError("cannot split, nothing written:\n" + "\n".join(f"  {p}" for p in problems))


# ---------------------------------------------------------------- split arithmetic


def _share(exact: Fraction) -> int:
    """Round half up, but at least 1: a non-zero fraction must give each class a member."""
    return max(1, math.floor(exact + Fraction(1, 2)))


def _split_sizes(n: int, t: Fraction, v: Fraction) -> tuple[int, int, int]:
    """(train, val, test) sizes for a class of n images; train may come out < 1 for tiny n."""
    n_test = _share(n * t) if t else 0
    n_val = _share((n - n_test) * v) if v else 0
    return n - n_test - n_val, n_val, n_test


def _min_class_size(t: Fraction, v: Fraction) -> int:
    """The smallest class that still gets an image in every split with a non-zero fraction."""
    n = 1
    while min(size for size, f in zip(_split_sizes(n, t, v), (1, v, t)) if f) < 1:
        n += 1
    return n


def _apportion(sizes: list[int], fraction: Fraction, total: int) -> list[int]:
    """Share ``total`` over strata in proportion to ``sizes`` (largest remainder), each within 1 of size*fraction."""
    exact = [n * fraction for n in sizes]
    quotas = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (quotas[i] - exact[i], i))
    for i in by_remainder[: total - sum(quotas)]:
        quotas[i] += 1
    return quotas


def _order_key(seed: int, file_id: str) -> str:
    return hashlib.sha256(f"{seed}:{file_id}".encode()).hexdigest()


# ---------------------------------------------------------------- outputs


def _manifest(rows: list[tuple], classes: list[str]) -> pd.DataFrame:
    """The manifest sorted by id, built column by column (no per-row dicts)."""
    ids = [_file_id(row[0]) for row in rows]
    order = sorted(range(len(rows)), key=ids.__getitem__)
    index = {name: i for i, name in enumerate(classes)}
    metadata = list(dict.fromkeys(key for row in rows for key in row[4]))
    columns = {
        "id": [ids[i] for i in order],
        "path": [rows[i][0] for i in order],
        "class_name": [rows[i][1] for i in order],
        "class_index": np.array([index[rows[i][1]] for i in order], dtype=np.int64),
        "split": [""] * len(rows),
        **{name: [rows[i][2][k] for i in order] for k, name in enumerate(_RESULT_FIELDS)},
        "notes": [rows[i][3] for i in order],
        **{key: [rows[i][4].get(key, np.nan) for i in order] for key in metadata},
    }
    del ids, order
    # text columns hold the records' own str objects: pandas' default (pyarrow) storage would copy every string
    # into Arrow's memory pool, and each filtered frame of the summary again
    text = pd.StringDtype("python", na_value=np.nan)
    return pd.DataFrame(
        {
            column: pd.array(columns.pop(column), dtype=text) if column in _STRING_COLUMNS else columns.pop(column)
            for column in MANIFEST_COLUMNS + metadata
        }
    )


def _summary(manifest, classes, bad_files, stratify_by, params) -> dict:
    def per_class(frame):
        counts = frame["class_name"].value_counts()
        return {"total": len(frame), **{name: int(counts.get(name, 0)) for name in classes}}

    summary = {
        "images": len(manifest),
        "classes": len(classes),
        "bad_files": len(bad_files),
        "seed": params["seed"],
        "fractions": {"test": params["test_fraction"], "val": params["val_fraction"]},
        "stratified_by": ["class_name", *stratify_by],
        "splits": {s: per_class(manifest[manifest["split"] == s]) for s in SPLITS},
        "modes": {k: int(n) for k, n in manifest["mode"].value_counts().sort_index().items()},
        "conversions": {k: int(n) for k, n in manifest["conversion"].value_counts().sort_index().items()},
    }
    for column in stratify_by:
        summary[f"by_{column}"] = {
            s: {
                name: {str(k): int(n) for k, n in group[column].value_counts().sort_index().items()}
                for name, group in manifest[manifest["split"] == s].groupby("class_name")
            }
            for s in SPLITS
        }
    groups = manifest[manifest.duplicated("sha256", keep=False)].groupby("sha256")["path"]
    summary["duplicate_groups"] = sorted(sorted(paths) for _, paths in groups)
    return summary
