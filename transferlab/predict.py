"""Class probabilities for image files, with an exported model.

Usage: python -m transferlab.predict MODEL IMAGES... [--output predictions.csv] [--batch-size 32]

MODEL: an exported ``model.keras`` (or the folder holding it, e.g. models/export), a local MLflow
model folder, or an MLflow model URI such as ``models:/transferlab-elpv@champion`` (tracking store:
$MLFLOW_TRACKING_URI, else ./mlflow.db, as for the pipeline). IMAGES: files and/or folders (searched
recursively). Images are read with the split stage's rules (grayscale, palette, CMYK, RGBA, 16-bit ->
RGB; truncated or non-image files refused); a file that cannot be used is reported in the summary and
in the CSV's ``error`` column, and the others are still predicted. Exit status: 0 if at least one
image was predicted, 1 if none could be, 2 for a model that cannot be loaded or bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from transferlab import data
from transferlab.images import open_rgb

META_MEMBER = "transferlab.json"  # the export's metadata, stored inside the .keras archive


@dataclass
class Result:
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)  # path -> class probabilities
    errors: dict[str, str] = field(default_factory=dict)  # path -> why it could not be used


def read_image(path) -> np.ndarray:
    """HxWx3 uint8 RGB, accepted by exactly the rules of the split stage (raises data.BadFile with the reason)."""
    data.inspect_image(path)
    return open_rgb(path)


def collect(inputs: list[str]) -> tuple[list[str], dict[str, str]]:
    """Image paths from files and folders, in the order given (folders sorted); what cannot be searched is an error."""
    paths, errors = [], {}
    for item in inputs:
        if os.path.isdir(item):
            found, hidden = data.walk(Path(item))
            paths += [os.path.join(item, *rel.split("/")) for rel in found]
            errors.update({os.path.join(item, rel): reason for rel, reason in hidden})
        elif os.path.exists(item):
            paths.append(item)
        else:
            errors[item] = "no such file or folder"
    return paths, errors


def predict_files(predict_batch, paths: list[str], batch_size: int = 32) -> Result:
    """Decode, batch images of one size together (the model resizes inside), and predict.

    Memory stays bounded: at most ``batch_size`` decoded images wait per distinct size.
    """
    result, pending = Result(), {}

    def flush(shape):
        names, images = zip(*pending.pop(shape))
        for name, probs in zip(names, np.asarray(predict_batch(np.stack(images)), np.float32)):
            result.probabilities[name] = probs

    for path in paths:
        try:
            image = read_image(path)
        except data.BadFile as error:
            result.errors[path] = str(error)
            continue
        bucket = pending.setdefault(image.shape, [])
        bucket.append((path, image))
        if len(bucket) == batch_size:
            flush(image.shape)
    for shape in list(pending):
        flush(shape)
    return result


def load(model: str):
    """(predict_batch, metadata) for a .keras file, a folder holding one, or an MLflow model (URI or folder)."""
    path = Path(model)
    if path.is_dir() and (path / "model.keras").is_file():
        path = path / "model.keras"
    if path.is_file() and path.suffix == ".keras":
        import keras

        keras_model = keras.saving.load_model(path)
        with zipfile.ZipFile(path) as archive:
            meta = json.loads(archive.read(META_MEMBER))
        return keras_model.predict_on_batch, meta
    if not (path.is_dir() and (path / "MLmodel").is_file()) and ":/" not in model:
        raise FileNotFoundError(
            f"model {model!r}: not a .keras file, a folder with model.keras or MLmodel, "
            "nor an MLflow model URI (e.g. models:/transferlab-elpv@champion)"
        )
    import mlflow

    from transferlab import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    pyfunc = mlflow.pyfunc.load_model(model)
    meta = pyfunc.metadata.metadata or {}
    if "classes" not in meta:
        raise ValueError(
            f"model {model!r} has no transferlab metadata (class names); was it logged by the export stage?"
        )
    return lambda images: np.asarray(pyfunc.predict(images)), meta


def table(paths: list[str], result: Result, classes: list[str], errors: dict[str, str]) -> pd.DataFrame:
    """One row per file met: predictions for the images, the reason for the others."""
    rows = []
    for path in [*paths, *errors]:
        probs = result.probabilities.get(path)
        row = {
            "path": path,
            "predicted_class": classes[int(probs.argmax())] if probs is not None else "",
            "probability": float(probs.max()) if probs is not None else np.nan,
        }
        row.update({f"p_{c}": float(probs[i]) if probs is not None else np.nan for i, c in enumerate(classes)})
        row["error"] = result.errors.get(path) or errors.get(path, "")
        rows.append(row)
    return pd.DataFrame(rows, columns=["path", "predicted_class", "probability", *[f"p_{c}" for c in classes], "error"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transferlab.predict",
        description="Class probabilities for images with an exported transferlab model.",
    )
    parser.add_argument(
        "model", help="model.keras, models/export, an MLflow model folder or URI (models:/NAME@champion)"
    )
    parser.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("-o", "--output", default="predictions.csv", help="CSV to write (default: predictions.csv)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        predict_batch, meta = load(args.model)
    except Exception as error:  # noqa: BLE001 - one line for the user, whatever the loader raised
        print(f"predict: cannot load model {args.model!r}: {error}", file=sys.stderr)
        return 2
    paths, errors = collect(args.images)
    result = predict_files(predict_batch, paths, args.batch_size)
    frame = table(paths, result, meta["classes"], errors)
    frame.to_csv(args.output, index=False)
    counts = Counter(frame.loc[frame["error"] == "", "predicted_class"])
    print(
        f"{len(result.probabilities)} images predicted with {meta.get('source_run', args.model)} "
        f"({meta.get('backbone')}, preprocessing {meta.get('preprocessing_fingerprint')}): "
        + ", ".join(f"{c} {counts[c]}" for c in meta["classes"])
    )
    unreadable = frame[frame["error"] != ""]
    if len(unreadable):
        print(f"{len(unreadable)} files not predicted:")
        for path, reason in zip(unreadable["path"], unreadable["error"]):
            print(f"  {path}: {reason}")
    print(f"wrote {args.output}")
    return 0 if result.probabilities else 1


if __name__ == "__main__":
    sys.exit(main())
