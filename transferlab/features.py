"""Image pipelines and bottleneck-feature extraction.

One ``tf.data`` pipeline feeds every consumer (extraction, end-to-end training,
evaluation), so the pixels a model sees depend only on the preprocessing record.
Extraction streams batches into memory-mapped ``.npy`` files: memory stays flat
whatever the dataset's size, and rows stay aligned with ids and labels by
construction (the pipeline is ordered; ids and labels are written from the manifest).
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

from transferlab import backbones, files, precision
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


def image_dataset(
    paths,
    labels,
    record: dict,
    batch_size: int,
    shuffle_seed: int | None = None,
    augment_seed: int | None = None,
    augment_preset: str = "keras",
) -> tf.data.Dataset:
    """(preprocessed images, labels) batches, in manifest order unless shuffled.

    Augmentation acts on resized 0..255 RGB images, before normalisation, exactly
    where Keras' ImageDataGenerator recipes apply it.
    """
    ds = tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(labels, np.int32)))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda p, y: (resize(_decode(p), record), y), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size)
    if augment_seed is not None:
        aug = augmenter(augment_seed, augment_preset)
        ds = ds.map(lambda x, y: (aug(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda x, y: (backbones.normalise(x, record), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def extractor(base, cut_layer: str | None, conv_map: bool):
    """A model with named outputs: the pooled vector, optionally the last conv map and the cut activations."""
    import keras

    outputs = {"pooled": precision.pooled(base.output)}
    if conv_map:
        outputs["conv_map"] = base.output
    if cut_layer:
        outputs["cut"] = base.get_layer(cut_layer).output
    return keras.Model(base.input, outputs)


def extract_split(model, paths, labels, ids, record: dict, batch_size: int, out_dir: Path, desc: str) -> dict:
    """Write <out_dir>/{ids.json, labels.npy, <output>.npy} for one split; returns counts, hashes and speed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(out_dir / IDS, [str(i) for i in ids])
    np.save(out_dir / "labels.npy", np.asarray(labels, np.int64))
    n = len(paths)
    arrays = {
        name: np.lib.format.open_memmap(
            out_dir / f"{name}.npy", mode="w+", dtype=np.float32, shape=(n, *tensor.shape[1:])
        )
        for name, tensor in model.output.items()
    }
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True, autograph=False)
    start, row = time.perf_counter(), 0
    with tqdm(total=n, desc=desc, unit="img") as bar:
        for images, _ in image_dataset(paths, labels, record, batch_size):
            for name, value in forward(images).items():
                arrays[name][row : row + len(images)] = value.numpy()
            row += len(images)
            bar.update(len(images))
    for array in arrays.values():
        array.flush()
    seconds = time.perf_counter() - start
    del arrays  # close the memory maps before hashing the files
    return {
        "n": n,
        "seconds": round(seconds, 2),
        "images_per_second": round(n / max(seconds, 1e-9), 2),
        "shapes": {k: list(v.shape[1:]) for k, v in model.output.items()},
        "sha256": array_hashes(out_dir),
    }


def array_hashes(split_dir: Path) -> dict:
    """sha256 of every file of one split (ids, labels, feature arrays), stored in meta.json."""
    return {p.name: files.sha256_file(p) for p in sorted(Path(split_dir).iterdir()) if p.is_file()}


def load_split(features_dir: Path, split: str, output: str = "pooled", mmap: bool = False):
    """(ids, labels, features) for one split, aligned row for row, after checking their recorded sha256."""
    d = Path(features_dir) / split
    meta_path = Path(features_dir) / "meta.json"
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
    x = np.load(d / f"{output}.npy", mmap_mode="r" if mmap else None)
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
