"""Classify two reference photos with each backbone's ImageNet top, before any experiment runs.

A weight conversion with a transposed kernel, a wrong padding, or a preprocessing record
with the wrong mean, std or channel order still produces features and trains a head; the
damage only shows as a few points of accuracy. Classifying photos whose answer is known
catches it at once. The photos ship with scikit-image, so the check runs offline.

Each photo is run through both preprocessing variants: ``native`` must put an expected
class in the top 5; ``rescale`` (x / 255) is reported alongside to show what the common
mistake does to the same predictions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from transferlab import backbones, images

# photo (a skimage.data function) -> acceptable ImageNet classes
PHOTOS = {
    "chelsea": {281: "tabby", 282: "tiger cat", 285: "Egyptian cat"},
    "coffee": {967: "espresso", 968: "cup", 504: "coffee mug"},
}
TOP_K = 5
KERAS_CLASS_INDEX = Path("~/.keras/models/imagenet_class_index.json").expanduser()


def class_names() -> dict[int, str]:
    """Names of the expected classes, plus all 1000 if Keras has already cached its index file.

    The index is never downloaded here: the self-test must not depend on the network.
    """
    names = {i: n for expected in PHOTOS.values() for i, n in expected.items()}
    if KERAS_CLASS_INDEX.is_file():
        index = json.loads(KERAS_CLASS_INDEX.read_text())
        names.update({int(i): entry[1] for i, entry in index.items()})
    return names


def load_photo(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


def classify(model, backbone: backbones.Backbone, photo: np.ndarray, variant: str) -> tuple[dict, np.ndarray]:
    """(preprocessing record, class probabilities) for one photo under one variant."""
    record = backbones.preprocessing_record(backbone, variant, backbone.input_size)
    x = backbones.normalise(images.resize(photo[None], record), record)
    probs = np.asarray(model(x, training=False)).astype(np.float32)[0]  # bfloat16/float16 under a mixed policy
    return record, probs


def run(backbone, weights_dir, model=None) -> dict:
    """Self-test one backbone; ``model`` (a Keras model with its ImageNet top) defaults to the weights stage's."""
    backbone = backbones.get(backbone) if isinstance(backbone, str) else backbone
    if model is None:
        from transferlab import weights

        model = weights.load_backbone(backbone, weights_dir, include_top=True)
    names = class_names()
    photos = {}
    for photo_name, expected in PHOTOS.items():
        photo = load_photo(photo_name)
        variants = {}
        for variant in backbones.VARIANTS:
            record, probs = classify(model, backbone, photo, variant)
            top = np.argsort(-probs)[:TOP_K]
            variants[variant] = {
                "preprocessing": backbones.fingerprint(record),
                "top5": [{"index": int(i), "name": names.get(int(i)), "prob": round(float(probs[i]), 4)} for i in top],
                "expected_prob": round(float(probs[list(expected)].sum()), 4),
                "pass": bool(set(top.tolist()) & set(expected)),
            }
        photos[photo_name] = {"expected": {str(i): n for i, n in expected.items()}, "variants": variants}
    return {
        "backbone": backbone.name,
        "status": "ran",
        "weights_dir": str(weights_dir),
        "photos": photos,
        "passed": all(p["variants"]["native"]["pass"] for p in photos.values()),
        "rescale_would_pass": all(p["variants"]["rescale"]["pass"] for p in photos.values()),
    }
