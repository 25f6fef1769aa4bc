"""The trained model as a product: one self-contained Keras model, chosen on validation, registered in MLflow.

The exported model takes a batch of RGB uint8 images of any size and returns class
probabilities: resizing and normalisation are layers inside it, built from the run's
preprocessing record, so nobody can apply the wrong preprocessing at inference. Only
standard Keras layers are used (no custom code to import before loading); they are
checked to reproduce ``images.resize`` + ``backbones.normalise`` bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import zipfile
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from transferlab import backbones, data, layout, precision, predict, provenance, tracking, train, weights

ALIAS = "champion"
# Probabilities of the exported model vs evaluate's softmax(logits): same weights and bit-identical
# pixels, only the batch composition differs (oneDNN's summation order), which moves float32 logits
# by ~1e-6 relative; softmax changes by at most half the largest logit change. Mixed precision
# (16-bit activations, ~3 significant digits) gets a tolerance to match.
TOLERANCE = {"float32": 1e-4, "mixed": 2e-2}
SELECTION_RULE = (
    "highest validation accuracy of the kept epoch (the saved weights; early stopping's best, else the last) "
    "among the trained, scored runs; ties: that epoch's lower validation loss, then run name in alphabetical "
    "order (test results are never read)"
)


class ExportError(ValueError):
    pass


def candidates(runs_root: Path, eval_root: Path) -> list[dict]:
    """The trained runs evaluate scored, with their kept epoch's validation figures (never test ones)."""
    found = []
    for predictions in sorted(Path(eval_root).glob(f"**/{layout.PREDICTIONS}")):
        name = predictions.parent.relative_to(eval_root).as_posix()
        record = provenance.load(layout.run_dir(name, runs_root) / layout.RUN_RECORD, provenance.RunRecord)
        if record.status != "trained":
            continue
        history = pd.read_csv(layout.run_dir(name, runs_root) / layout.HISTORY)
        last = history.iloc[(record.epoch_chosen or len(history)) - 1]  # early stopping kept that epoch
        loss = float(last["val_loss"])
        found.append(
            {
                "run_name": name,
                "val_accuracy": float(last["val_accuracy"]),
                "val_loss": loss if math.isfinite(loss) else None,
            }
        )
    return found


def choose(found: list[dict], wanted: str | None) -> dict:
    """``export.run`` if set, else the best on validation (see SELECTION_RULE)."""
    if not found:
        raise ExportError("no trained run has been scored by evaluate: nothing to export")
    if wanted:
        match = [c for c in found if c["run_name"] == wanted]
        if not match:
            raise ExportError(
                f"export.run {wanted!r} is not a trained, scored run; choose one of: "
                + ", ".join(c["run_name"] for c in found)
            )
        return match[0]
    return min(
        found, key=lambda c: (-c["val_accuracy"], math.inf if c["val_loss"] is None else c["val_loss"], c["run_name"])
    )


def preprocessing_layers(inputs, record: dict):
    """uint8 RGB of any size -> the network's input, as images.resize + backbones.normalise compute it."""
    x = keras.layers.Rescaling(1.0, dtype="float32", name="to_float")(inputs)  # Resizing rounds integer input
    height, width = record["input_size"]
    x = keras.layers.Resizing(
        height,
        width,
        interpolation=record["interpolation"],
        antialias=record["antialias"],
        dtype="float32",
        name="resize",
    )(x)
    if record["colour_order"] == "BGR":  # a fixed permutation matrix: x*1 + y*0 + z*0 is exact
        flip = keras.layers.Dense(
            3,
            use_bias=False,
            trainable=False,
            dtype="float32",
            name="rgb_to_bgr",
            kernel_initializer=keras.initializers.Constant(np.eye(3)[::-1]),
        )
        x = flip(x)
    std = np.asarray(record["std"], np.float32)
    variance = std.astype(np.float64) ** 2  # exact squares of the float32 stds: sqrt gives them back exactly
    return keras.layers.Normalization(mean=record["mean"], variance=variance, dtype="float32", name="normalise")(x)


def build(record: provenance.RunRecord, run_dir: Path, n_classes: int, weights_root: Path) -> keras.Model:
    """Images -> preprocessing -> backbone -> pooling -> head -> softmax, with the run's trained weights."""
    bb, head_cfg = backbones.get(record.backbone), record.params["head"]
    with precision.policy(record.precision):  # the precision it was trained and scored in
        if record.method == layout.TRAIN_HEAD:  # the features came from these very backbone weights
            base = weights.load_backbone(bb, Path(weights_root) / bb.name, input_size=record.input_size)
            head = train.head_for(base, n_classes, head_cfg, 0)
            head.load_weights(run_dir / layout.HEAD_WEIGHTS)
            network = train.end_to_end(base, head, head_cfg["pooling"])
        else:
            network = train.load_end_to_end(record, run_dir, n_classes)
        inputs = keras.Input((None, None, 3), dtype="uint8", name="images")
        logits = network(preprocessing_layers(inputs, record.preprocessing))
        probabilities = keras.layers.Softmax(dtype="float32", name="probabilities")(logits)
    return keras.Model(inputs, probabilities, name=f"transferlab_{bb.name}")


def metadata(record: provenance.RunRecord, classes: list[str], selection: dict) -> dict:
    """What travels with the model: classes, preprocessing, weights and data identity, source run, choice."""
    pre = record.preprocessing
    return {
        "format": "transferlab-export/1",
        "source_run": record.run_name,
        "mlflow_run_id": record.mlflow_run_id,
        "method": record.method,
        "backbone": record.backbone,
        "classes": classes,
        "input": {
            "dtype": "uint8",
            "shape": [None, None, None, 3],
            "colour_order": "RGB",
            "size": "any height and width; resized inside the model to "
            f"{pre['input_size']} ({pre['interpolation']}, "
            f"antialias {pre['antialias']}). One batch holds images of one size.",
        },
        "output": {
            "dtype": "float32",
            "shape": [None, len(classes)],
            "meaning": "class probabilities (softmax), in the order of 'classes'",
        },
        "preprocessing": pre,
        "preprocessing_fingerprint": record.preprocessing_fingerprint,
        "weights": dataclasses.asdict(record.weights),
        "manifest_sha256": record.manifest_sha256,
        "precision": record.precision,
        "selection": selection,
    }


def save(model: keras.Model, meta: dict, out: Path) -> None:
    """model.keras (with the metadata inside the archive) and saved_model/ for TF Serving."""
    model.save(out / "model.keras")
    with zipfile.ZipFile(out / "model.keras", "a") as archive:  # Keras ignores members it does not know
        archive.writestr(predict.META_MEMBER, json.dumps(meta, indent=2, default=str))
    model.export(str(out / "saved_model"), format="tf_saved_model", verbose=False)


def tolerance(precision: str) -> float:
    return TOLERANCE["float32"] if precision in (None, "float32") else TOLERANCE["mixed"]


def check_equivalence(model, predictions_csv: Path, split_dir: Path, classes: list[str], precision: str) -> dict:
    """The exported model on the test images vs evaluate's predictions: same argmax, probabilities within tolerance."""
    reference = pd.read_csv(predictions_csv, dtype={"id": str}, keep_default_na=False)
    manifest = data.load_manifest(split_dir).set_index("id")
    rows = manifest.loc[reference["id"]]
    paths = data.resolve_paths(rows, split_dir)
    result = predict.predict_files(model.predict_on_batch, paths)
    if result.errors:
        raise ExportError("test images unreadable now: " + "; ".join(f"{p}: {e}" for p, e in result.errors.items()))
    probs = np.stack([result.probabilities[p] for p in paths])
    logits = reference[[f"logit_{c}" for c in classes]].to_numpy(np.float64)
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    differ = reference["id"][probs.argmax(1) != reference["pred"].to_numpy()].tolist()
    max_diff = float(np.abs(probs - expected).max())
    limit = tolerance(precision)
    if differ or max_diff > limit:
        raise ExportError(
            f"the exported model disagrees with evaluate's predictions ({predictions_csv}): "
            f"{len(differ)} different classes ({', '.join(differ[:10])}), "
            f"max |Δ probability| {max_diff:.2e} (tolerance {limit:g})"
        )
    return {
        "images": len(paths),
        "same_argmax": len(paths),
        "max_abs_probability_diff": max_diff,
        "tolerance": limit,
        "reference": predictions_csv.as_posix(),
    }


def model_name(data_params: dict, configured: str | None) -> str:
    """One registered model per dataset: transferlab-elpv, or transferlab-<folder name>."""
    if configured:
        return configured
    source = "elpv" if data_params["source"] == "elpv" else Path(str(data_params["folder"])).resolve().name
    return "transferlab-" + "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in source)


def version_tags(meta: dict) -> dict:
    return {
        "source_run": str(meta["mlflow_run_id"]),
        "source_run_name": meta["source_run"],
        "preprocessing_fingerprint": meta["preprocessing_fingerprint"],
        "weights_array_checksum": meta["weights"]["array_checksum"] or "none",
        "weights_pretrained": str(meta["weights"]["pretrained"]).lower(),
        "manifest_sha256": meta["manifest_sha256"],
        "precision": meta["precision"],
    }


def register(
    model: keras.Model, meta: dict, record: provenance.RunRecord, name: str, example: np.ndarray, alias: str = ALIAS
) -> dict:
    """Log the model to its training run, register it under ``name`` and point ``alias`` at it.

    A version with the same source run and preprocessing fingerprint is reused, so a re-export
    adds no duplicate. A training run missing from this store gets a linked run instead.
    """
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    mlflow.set_tracking_uri(tracking.tracking_uri())
    mlflow.set_experiment(tracking.EXPERIMENT)
    client = mlflow.MlflowClient()
    tags = version_tags(meta)
    existing = client.search_model_versions(
        f"name = '{name}' and tags.source_run = '{tags['source_run']}' and "
        f"tags.preprocessing_fingerprint = '{tags['preprocessing_fingerprint']}'"
    )
    if existing:
        version = min(existing, key=lambda v: int(v.version))
    else:
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3), "images")]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(meta["classes"])))]),
        )
        import tensorflow as tf

        with _training_run(mlflow, client, record):
            info = mlflow.tensorflow.log_model(
                model,
                name="model",
                signature=signature,
                input_example=example,
                metadata=meta,
                pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"],
            )
            mlflow.log_dict(meta, "export/model.json")
        version = mlflow.register_model(info.model_uri, name, tags=tags)
    client.set_registered_model_alias(name, alias, version.version)
    return {
        "name": name,
        "version": int(version.version),
        "alias": alias,
        "uri": f"models:/{name}@{alias}",
        "reused_existing_version": bool(existing),
        "tracking_uri": tracking.tracking_uri(),
    }


@contextlib.contextmanager
def _training_run(mlflow, client, record: provenance.RunRecord):
    """The training run, reopened with its end time and status put back (its duration stays honest)."""
    if not tracking.run_exists(client, record.mlflow_run_id):  # trained in another store: a linked run
        with mlflow.start_run(
            run_name=f"export/{record.run_name}",
            tags={**tracking.identity_tags(record), "linked_training_run": str(record.mlflow_run_id)},
        ) as active:
            yield active
        return
    previous = client.get_run(record.mlflow_run_id).info
    with mlflow.start_run(run_id=previous.run_id) as active:
        yield active
    client.set_terminated(previous.run_id, previous.status, previous.end_time)


def example_image(split_dir: Path) -> np.ndarray:
    """One real test image, as the model takes it: a batch of one uint8 RGB image."""
    manifest = data.load_manifest(split_dir)
    first = manifest[manifest["split"] == "test"].head(1)
    return predict.read_image(data.resolve_paths(first, split_dir)[0])[None]
