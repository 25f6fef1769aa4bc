"""Image pipelines and bottleneck-feature extraction.

One ``tf.data`` pipeline feeds every consumer (extraction, end-to-end training,
evaluation), so the pixels a model sees depend only on the preprocessing record.
Extraction appends batches to ``.npy`` files and training reads them back through memory maps,
batch by batch: memory stays flat whatever the dataset's size, and rows stay aligned with ids
and labels by construction (the pipeline is ordered; ids and labels are written from the manifest).
Ids are stored as a JSON list, so any file name (spaces, Unicode, newlines) round-trips,
and every array's sha256 goes into the features' ``meta.json``: :func:`load_split` refuses
an array that changed after extraction.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from transferlab import backbones, data, files, layout, precision
from transferlab.images import open_rgb, resize
from transferlab.provenance import ProvenanceMismatch

SPLITS = ("train", "val", "test")
IDS = "ids.json"


def _decode(path):
    rgb = tf.numpy_function(lambda p: open_rgb(p.decode()), [path], tf.uint8, stateful=False)
    rgb.set_shape([None, None, 3])
    return rgb


def augmenter(seed: int, preset: str = "keras"):
    """A seeded augmentation preset (transferlab.params.AUGMENTATION_PRESETS), on 0..255 RGB batches.

    keras: flip, shift, rotation and zoom, the augmentation of the Keras recipes. el_cell: what leaves an
    electroluminescence cell image a valid cell (square, busbars on either axis): flips on both axes, 90-degree
    rotations, mild brightness and contrast changes; no shift or zoom, which would crop cell edges.
    Built in float32 whatever the precision policy: it is preprocessing, on 0..255 pixels, before the model.
    """
    with precision.policy("float32"):
        if preset == "el_cell":
            layers = [
                keras.layers.RandomFlip("horizontal_and_vertical", seed=seed),
                RandomRot90(seed=seed + 1),
                keras.layers.RandomBrightness(0.1, value_range=(0, 255), seed=seed + 2),
                keras.layers.RandomContrast(0.1, value_range=(0, 255), seed=seed + 3),
            ]
        else:
            layers = [
                keras.layers.RandomFlip("horizontal", seed=seed),
                keras.layers.RandomTranslation(0.1, 0.1, seed=seed + 1),
                keras.layers.RandomRotation(0.05, seed=seed + 2),
                keras.layers.RandomZoom(0.1, seed=seed + 3),
            ]
        return keras.Sequential(layers, name="augmentation")


class RandomRot90(keras.layers.Layer):
    """Rotates each square image of a batch by 0, 90, 180 or 270 degrees, drawn from a seeded generator."""

    def __init__(self, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        k = keras.random.randint((tf.shape(images)[0],), 0, 4, seed=self.generator)
        turns = tf.stack([tf.image.rot90(images, i) for i in range(4)], axis=1)  # (batch, 4, h, w, c)
        return tf.gather(turns, k, axis=1, batch_dims=1)


# oversample setting -> the power of a class's count its sampling probability is proportional to
OVERSAMPLE_POWER = {"sqrt": 0.5, "balanced": 0.0}


def epoch_order(labels, shuffle_seed: int | None = None, oversample: str = "none") -> tf.data.Dataset:
    """The row indices of one epoch: in order; every row once, reshuffled each epoch (``shuffle_seed``); or,
    oversampled, as many draws as rows, each from a class chosen with probability proportional to its count
    to the power OVERSAMPLE_POWER[oversample] (balanced: uniform), taking that class's next row in an order
    reshuffled on each pass. The epoch keeps its length, so schedules and budgets stay as they were, while rare
    classes are seen more often, each time under a new augmentation. Seeded: the same seed, the same epochs."""
    n = len(labels)
    if oversample == "none" or shuffle_seed is None:
        ds = tf.data.Dataset.range(n)  # tf.data's seeded permutation does not depend on the elements
        return ds if shuffle_seed is None else ds.shuffle(n, seed=shuffle_seed, reshuffle_each_iteration=True)
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    weights = counts.astype(np.float64) ** OVERSAMPLE_POWER[oversample]
    rows = [
        tf.data.Dataset.from_tensor_slices(np.flatnonzero(labels == c).astype(np.int64))
        .shuffle(count, seed=shuffle_seed + 1 + i, reshuffle_each_iteration=True)
        .repeat()
        for i, (c, count) in enumerate(zip(classes, counts))
    ]
    return tf.data.Dataset.sample_from_datasets(
        rows, (weights / weights.sum()).tolist(), seed=shuffle_seed, rerandomize_each_iteration=True
    ).take(n)


def image_dataset(
    paths,
    labels,
    record: dict,
    batch_size: int,
    shuffle_seed: int | None = None,
    augment_seed: int | None = None,
    augment_preset: str = "keras",
    oversample: str = "none",
) -> tf.data.Dataset:
    """(preprocessed images, labels) batches, in manifest order unless shuffled (:func:`epoch_order`).

    Augmentation acts on resized 0..255 RGB images, before normalisation, exactly
    where Keras' ImageDataGenerator recipes apply it.
    """
    paths, labels = tf.constant(list(paths), tf.string), np.asarray(labels, np.int32)
    ds = epoch_order(labels, shuffle_seed, oversample).map(
        lambda i: (resize(_decode(tf.gather(paths, i)), record), tf.gather(labels, i)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    ds = ds.batch(batch_size)
    if augment_seed is not None:
        aug = augmenter(augment_seed, augment_preset)
        ds = ds.map(lambda x, y: (aug(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda x, y: (backbones.normalise(x, record), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def extractor(base, cut_layer: str | None, conv_map: bool, pooled: bool = True):
    """A model with named outputs: the pooled vector, optionally the last conv map and the cut activations.

    The cut activations alone (``pooled=False``) need only the layers up to the cut: they are
    computed by the same layers as with the other outputs, so they are the same values.
    """
    import keras

    outputs = {"pooled": precision.pooled(base.output)} if pooled else {}
    if conv_map:
        outputs["conv_map"] = base.output
    if cut_layer:
        outputs["cut"] = backbones.boundary_layer(base, cut_layer).output
    return keras.Model(base.input, outputs)


def extract_split(
    model, paths, labels, ids, record: dict, batch_size: int, out_dir: Path, desc: str, dtype: str = "float32"
) -> dict:
    """Write <out_dir>/{ids.json, labels.npy, <output>.npy} for one split; returns counts, hashes, bytes and speed.

    Arrays are stored as ``dtype`` whatever the precision policy computed them in (float16 halves
    the disk and memory a cut-point cache takes; a value it cannot hold stops the extraction).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(out_dir / IDS, [str(i) for i in ids])
    np.save(out_dir / "labels.npy", np.asarray(labels, np.int64))
    n = len(paths)
    arrays = {
        name: RowWriter(out_dir / f"{name}.npy", (n, *tensor.shape[1:]), dtype) for name, tensor in model.output.items()
    }
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True, autograph=False)
    start = time.perf_counter()
    with tqdm(total=n, desc=desc, unit="img") as bar:
        for images, _ in image_dataset(paths, labels, record, batch_size):
            for name, value in forward(images).items():
                arrays[name].write(_stored(value.numpy(), dtype, f"{desc} {name}"))
            bar.update(len(images))
    for array in arrays.values():
        array.close()
    seconds = time.perf_counter() - start
    return {
        "n": n,
        "seconds": round(seconds, 2),
        "images_per_second": round(n / max(seconds, 1e-9), 2),
        "shapes": {k: list(v.shape[1:]) for k, v in model.output.items()},
        "sha256": array_hashes(out_dir),
        "bytes": sum(p.stat().st_size for p in out_dir.iterdir()),
    }


def extract_splits(model, splits, record: dict, batch_size: int, out: Path, desc: str, dtype: str = "float32"):
    """:func:`extract_split` for each of ``splits`` of data/split's manifest: (stats by split, speed by split)."""
    manifest = data.load_manifest()
    manifest["abspath"] = data.resolve_paths(manifest)
    stats, speed = {}, {}
    for split in splits:
        rows = manifest[manifest["split"] == split]
        stats[split] = extract_split(
            model,
            rows["abspath"].tolist(),
            rows["class_index"].tolist(),
            rows["id"].tolist(),
            record,
            batch_size,
            out / split,
            f"{desc} {split}",
            dtype,
        )
        speed[split] = {k: stats[split].pop(k) for k in ("seconds", "images_per_second")}
    return stats, speed


def _stored(values: np.ndarray, dtype: str, where: str) -> np.ndarray:
    """``values`` as stored; float16 must hold them (|x| <= 65504), or the stage stops naming the value."""
    if dtype == "float16":
        peak = float(np.abs(values.astype(np.float32)).max(initial=0.0))
        if not peak <= float(np.finfo(np.float16).max):  # as Python floats: no cast to float16
            raise ValueError(
                f"{where}: a value of magnitude {peak:g} does not fit float16 (largest 65504); store float32"
            )
    return values.astype(dtype)


def report_bytes(folder: Path, splits: dict) -> int:
    """Total bytes of a features folder's splits, printed per split (the disk a dataset's features take)."""
    total = sum(stats["bytes"] for stats in splits.values())
    sizes = ", ".join(f"{split} {stats['bytes'] / 1e6:.1f} MB" for split, stats in splits.items())
    print(f"{folder.name.removesuffix('.partial')}: {total / 1e6:.1f} MB on disk ({sizes})")
    return total


class RowWriter:
    """A .npy file of known shape, written row block by row block in order.

    Plain appends instead of a writable memory map: a map keeps every page written resident in the
    process until it is closed, so memory would grow with the dataset. The bytes are np.save's.
    """

    def __init__(self, path: Path, shape: tuple, dtype=np.float32):
        self.path, self.shape, self.dtype, self.rows = path, tuple(shape), np.dtype(dtype), 0
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self.file, header)

    def write(self, rows: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(rows, self.dtype).tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        self.file.close()
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path}: {self.rows} rows written, {self.shape[0]} expected")


def array_hashes(split_dir: Path) -> dict:
    """sha256 of every file of one split (ids, labels, feature arrays), stored in meta.json."""
    return {p.name: files.sha256_file(p) for p in sorted(Path(split_dir).iterdir()) if p.is_file()}


def load_split(features_dir: Path, split: str, output: str = "pooled"):
    """(ids, labels, features) for one split, aligned row for row, after checking their recorded sha256.

    The features are a read-only memory map, never loaded whole (the hashes are streamed too):
    train.feature_dataset reads them batch by batch, so memory does not grow with the dataset.
    """
    d = Path(features_dir) / split
    meta_path = Path(features_dir) / layout.FEATURES_META
    recorded = files.read_json(meta_path).get("splits", {}).get(split, {}).get("sha256", {})
    for name in (IDS, "labels.npy", f"{output}.npy"):
        if name not in recorded:
            raise ProvenanceMismatch(
                f"{meta_path} records no sha256 for {split}/{name}; re-run extract_features for these features"
            )
        got = files.sha256_file(d / name)
        if got != recorded[name]:
            raise ProvenanceMismatch(
                f"{d / name} changed after extraction: its sha256 is {got}, {meta_path} "
                f"records {recorded[name]}; re-run extract_features for these features"
            )
    ids = files.read_json(d / IDS)
    labels = np.load(d / "labels.npy")
    x = np.load(d / f"{output}.npy", mmap_mode="r")
    if not len(ids) == len(labels) == len(x):
        raise ValueError(f"{d}: ids, labels and {output} differ in length ({len(ids)}, {len(labels)}, {len(x)})")
    return ids, labels, x


def versions() -> dict:
    import keras

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
    }
