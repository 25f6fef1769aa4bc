"""Experiment tracking: MLflow runs with identity tags, DVCLive files for DVC.

MLflow's Keras autologging records params and per-epoch curves; DVCLive's Keras callback
writes the same curves where ``dvc exp show`` and ``dvc plots`` read them. What neither
knows (which data, weights and preprocessing made the run) is added here as tags.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from pathlib import Path

import mlflow

from transferlab import files

EXPERIMENT = "transferlab"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def group() -> str:
    """What ties the runs of one `dvc repro` together: the DVC experiment, else commit + params."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    params = Path("params.yaml").read_bytes() if Path("params.yaml").exists() else b""
    return "repro-" + hashlib.sha256(git_commit().encode() + params).hexdigest()[:12]


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def identity_tags(record: dict) -> dict:
    weights = record["weights"]
    return {
        "transferlab.group": group(),
        "stage": record["stage"],
        "method": record["method"],
        "backbone": record["backbone"],
        "preprocessing": record["preprocessing"]["variant"],
        "preprocessing_fingerprint": record["preprocessing_fingerprint"],
        "input_size": str(record["input_size"]),
        "precision": str(record.get("precision")),
        "weights": weights["label"],
        "weights_pretrained": str(weights["pretrained"]).lower(),
        "weights_array_checksum": weights.get("array_checksum") or "none",
        "weights_file_sha256": weights.get("file_sha256") or "none",
        "manifest_sha256": record["manifest_sha256"],
        "git_commit": git_commit(),
        "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
    }


@contextlib.contextmanager
def run(record: dict, params: dict):
    """An MLflow run with autologged Keras curves, flattened params and the identity tags."""
    import mlflow.keras

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(EXPERIMENT)
    mlflow.keras.autolog(log_models=False, log_datasets=False, silent=True)
    with mlflow.start_run(run_name=record["run_name"], tags=identity_tags(record)) as active:
        mlflow.log_params(flatten(params))
        yield active


def live_callback(directory: Path):
    """DVCLive's Keras callback writing metrics.json and per-epoch plots; dvc.yaml declares them."""
    from dvclive import Live
    from dvclive.keras import DVCLiveCallback

    return DVCLiveCallback(live=Live(str(directory), dvcyaml=None, save_dvc_exp=False))


def log_evaluation(record: dict, metrics: dict, artifacts_dir: Path) -> str:
    """Log test metrics into the run that trained the model (a linked run if it is gone)."""
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(EXPERIMENT)
    values = {f"test_{k}": metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}
    values["test_accuracy_ci95_lo"], values["test_accuracy_ci95_hi"] = metrics["accuracy_ci95"]
    run_id = record.get("mlflow_run_id")
    try:
        mlflow.MlflowClient().get_run(run_id)
        context = mlflow.start_run(run_id=run_id)
    except Exception:  # the training run lives in another store: keep the link as a tag
        context = mlflow.start_run(run_name=f"evaluate/{record['run_name']}",
                                   tags={**identity_tags(record), "linked_training_run": str(run_id)})
    with context as active:
        mlflow.log_metrics(values)
        mlflow.log_artifacts(str(artifacts_dir), artifact_path="evaluation")
        return active.info.run_id


def finish(out_dir: Path, record: dict, history) -> None:
    """Write the run's record and curves beside its weights, and attach them to the MLflow run."""
    history.to_csv(out_dir / "history.csv", index=False)
    files.write_json(out_dir / "preprocessing.json", record["preprocessing"])
    files.write_json(out_dir / "run.json", record)
    mlflow.log_artifacts(str(out_dir))


def skip_unavailable(out_dir: Path, live_dir: Path, record: dict) -> None:
    """A run that cannot happen still leaves its declared outputs, saying why, and no numbers."""
    record.update(status="unavailable")
    files.write_json(out_dir / "run.json", record)
    (live_dir / "plots").mkdir(parents=True, exist_ok=True)  # declared in dvc.yaml: exists, empty
    files.write_json(live_dir / "metrics.json", {"weights_unavailable": 1})
    print(f"{record['run_name']}: skipped, weights unavailable. {record['weights'].get('message', '')}")
