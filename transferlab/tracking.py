"""Experiment tracking: MLflow runs that the UI can compare, DVCLive files for DVC.

Every configuration in the params gets an MLflow run, even one that cannot train for want of
weights (it says why and has no metrics), so a filter on a backbone always shows it. MLflow's
compare plots read only params and metrics, so the run's identity (backbone, method,
preprocessing, input size, weights) and every params section it used, resolved for its
backbone, are params; the identity is also in tags, with the fingerprints for the audit. The
curves are logged here with step = epoch counted from 1, as in history.csv and the report:
Keras autologging logged the validation metrics twice, at step 0. The runs of one `dvc repro`
are children of one group run, which evaluate gives the comparison report. Evaluate adds test
metrics to a finished run without reopening it, so the run's duration stays the training's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import keras
import mlflow
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from transferlab import files, layout, provenance

EXPERIMENT = "transferlab"
UI_URL = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store (README)
CURVES = ("loss", "accuracy", "val_loss", "val_accuracy")
# train_head takes no ablation switch: its runs record them all off, the values that mean "correct"
ABLATION_OFF = {
    "bn_training": False,
    "dropout_position": None,
    "augmentation": "none",
    "input_size": None,
    "batch_size": None,
}


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def ui_url() -> str:
    """The MLflow UI's address: the tracking server when there is one, else `mlflow ui`'s default."""
    uri = tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_URL


# MLflow 3 opens an experiment in its GenAI mode, which shows no training runs: the UI's
# "Model training" mode is this query. Sorted by creation time (the default) the runs nest under
# their group's run; sorted by name they are listed flat, which is where the runs view starts.
ML_MODE = "workflowType=machine_learning"


def run_url(experiment_id: str, run_id: str) -> str:
    return f"{ui_url()}/#/experiments/{experiment_id}/runs/{run_id}?{ML_MODE}"


def runs_view_url(experiment_id: str) -> str:
    sort = "orderByKey=tags.%60mlflow.runName%60&orderByAsc=true"
    return f"{ui_url()}/#/experiments/{experiment_id}/runs?{ML_MODE}&{sort}"


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


def _context_tags() -> dict:
    tags = {"transferlab.group": group(), "git_commit": git_commit()}
    if os.environ.get("DVC_EXP_NAME"):  # no empty tag outside experiments
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    return tags


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def identity_tags(record: provenance.RunRecord) -> dict:
    weights = record.weights
    return {
        **_context_tags(),
        "stage": record.stage,
        "method": record.method,
        "backbone": record.backbone,
        "preprocessing": record.variant,
        "preprocessing_fingerprint": record.preprocessing_fingerprint,
        "input_size": str(record.input_size),
        "precision": record.precision,
        "weights": weights.label,
        "weights_pretrained": str(weights.pretrained).lower(),
        "weights_array_checksum": weights.array_checksum or "none",
        "weights_file_sha256": weights.file_sha256 or "none",
        "manifest_sha256": record.manifest_sha256,
    }


def _resolved(section: dict, backbone: str) -> dict:
    """A params section as one run used it: per-backbone maps reduced to its backbone's value,
    the grid's lists (backbones, methods, variants) left out: the run's own are params already."""
    return {k: v.get(backbone) if isinstance(v, dict) else v for k, v in section.items() if not isinstance(v, list)}


def run_params(record: provenance.RunRecord, params: dict) -> dict:
    """The run's identity and every params section it depends on, as MLflow params."""
    backbone = record.backbone
    sections = {"extract": params["extract"], "ablation": ABLATION_OFF, **record.params}
    return {
        "backbone": backbone,
        "method": record.method,
        "preprocessing": record.variant,
        "input_size": record.input_size,
        "weights": record.weights.label,
        **flatten({name: _resolved(s, backbone) if isinstance(s, dict) else s for name, s in sections.items()}),
    }


def _store() -> tuple[mlflow.MlflowClient, str]:
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient(), mlflow.set_experiment(EXPERIMENT).experiment_id


def group_run(client: mlflow.MlflowClient, experiment_id: str) -> str:
    """The run holding one `dvc repro`'s runs as children (found by tag, else created finished)."""
    name = group()
    found = client.search_runs(
        [experiment_id], f"tags.\"transferlab.group\" = '{name}' and tags.\"transferlab.role\" = 'group'", max_results=1
    )
    if found:
        return found[0].info.run_id
    note = (
        f"The runs of one `dvc repro` / `dvc exp run` (group `{name}`) are this run's children; "
        "`evaluate` adds `results.md`, `results.csv` and the comparison plots here."
    )
    parent = client.create_run(
        experiment_id,
        run_name=f"group/{name}",
        tags={**_context_tags(), "transferlab.role": "group", "mlflow.note.content": note},
    )
    client.set_terminated(parent.info.run_id)
    return parent.info.run_id


@contextlib.contextmanager
def run(record: provenance.RunRecord, params: dict):
    """An MLflow run, child of its group's run, with the run's params and identity tags.

    ``params`` is the whole params.yaml; ``record.params`` the sections the stage used."""
    client, experiment_id = _store()
    mark_killed_runs(record.run_name)
    owner = {"transferlab.host": socket.gethostname(), "transferlab.pid": str(os.getpid())}
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=record.run_name,
        tags={**identity_tags(record), **owner},
        parent_run_id=group_run(client, experiment_id),
    ) as active:
        mlflow.log_params(run_params(record, params))
        yield active


def mark_killed_runs(run_name: str) -> list[str]:
    """Runs of this stage left RUNNING by a process of this machine that is gone (a killed stage) become KILLED.

    A run of another machine, or of a live process (a parallel experiment), is left alone.
    """
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    quoted = run_name.replace("'", "\\'")
    stale = client.search_runs(
        [experiment.experiment_id],
        f"attributes.run_name = '{quoted}' and attributes.status = 'RUNNING' "
        f"and tags.`transferlab.host` = '{socket.gethostname()}'",
    )
    killed = []
    for found in stale:
        pid = int(found.data.tags.get("transferlab.pid", "0"))
        if pid and not _alive(pid):
            client.set_terminated(found.info.run_id, "KILLED")
            killed.append(found.info.run_id)
            print(f"{run_name}: marked the MLflow run {found.info.run_id} of a killed earlier attempt KILLED")
    return killed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def callbacks(directory: Path) -> list:
    """DVCLive's Keras callback, and the four curves into the active MLflow run, step = epoch from 1."""

    def log_epoch(epoch, logs):
        mlflow.log_metrics({k: float(logs[k]) for k in CURVES if k in logs}, step=epoch + 1)

    return [live_callback(directory), keras.callbacks.LambdaCallback(on_epoch_end=log_epoch)]


def live_callback(directory: Path):
    """DVCLive's Keras callback writing metrics.json and per-epoch plots; dvc.yaml declares them.

    ``directory`` is a scratch directory (files.atomic_dir): the files appear only when the stage finishes.
    """
    from dvclive import Live
    from dvclive.keras import DVCLiveCallback

    return DVCLiveCallback(live=Live(str(directory), dvcyaml=None, save_dvc_exp=False))


def finish(out_dir: Path, record: provenance.RunRecord, history) -> None:
    """Write the run's record and curves beside its weights, and attach them to the MLflow run."""
    history.to_csv(out_dir / layout.HISTORY, index=False)
    files.write_json(out_dir / "preprocessing.json", record.preprocessing)
    provenance.write(record, out_dir / layout.RUN_RECORD)
    mlflow.log_metric("train_seconds", record.train_seconds)
    stopping = {"epochs_run": record.epochs_run, "epoch_chosen": record.epoch_chosen}  # early stopping
    mlflow.log_metrics({k: v for k, v in stopping.items() if v is not None})
    mlflow.log_artifacts(str(out_dir))


def skip_unavailable(out_dir: Path, live_dir: Path, record: provenance.RunRecord, params: dict) -> provenance.RunRecord:
    """A run that cannot happen still leaves its declared outputs and a finished MLflow run without
    metrics, saying why and which file to supply, so the UI shows it beside the others. Returns its record."""
    record = dataclasses.replace(record, status="unavailable")
    message = " ".join((record.weights.message or "").split())
    with run(record, params) as active:
        mlflow.set_tag("mlflow.note.content", f"**Weights unavailable**: not trained, no metrics. {message}")
    record = dataclasses.replace(record, mlflow_run_id=active.info.run_id)
    provenance.write(record, out_dir / layout.RUN_RECORD)
    (live_dir / "plots").mkdir(parents=True, exist_ok=True)  # declared in dvc.yaml: exists, empty
    files.write_json(live_dir / "metrics.json", {"weights_unavailable": 1})
    print(f"{record.run_name}: skipped, weights unavailable. {message}")
    return record


# --- evaluate -----------------------------------------------------------------------------


def link_runs(runs: list[dict]) -> dict:
    """Set each run's ``mlflow_run_id`` and ``mlflow_url`` in this store; return the URLs of the
    group's run and of the runs view. A run trained into another store (runs/ restored from
    elsewhere) gets a linked run here, created finished, to hold its test metrics."""
    client, experiment_id = _store()
    parent = group_run(client, experiment_id)
    for run_ in runs:
        record = run_["record"]
        run_id = record.mlflow_run_id
        if not run_exists(client, run_id):
            tags = {**identity_tags(record), "linked_training_run": str(run_id), "mlflow.parentRunId": parent}
            run_id = client.create_run(experiment_id, run_name=f"evaluate/{record.run_name}", tags=tags).info.run_id
            client.set_terminated(run_id)
        run_.update(mlflow_run_id=run_id, mlflow_url=run_url(experiment_id, run_id))
    return {"group": run_url(experiment_id, parent), "runs": runs_view_url(experiment_id)}


def run_exists(client: mlflow.MlflowClient, run_id: str | None) -> bool:
    """Whether ``run_id`` is a live run of this store (runs/ may come from another machine's store)."""
    try:
        return run_id is not None and client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def evaluation_metrics(m: dict) -> dict:
    """Test metrics as MLflow metrics: overall, per class and per metadata group, each headline
    figure with its 95% interval (``_ci95_lo``/``_hi``); binary accuracy where the dataset has one."""
    values = {f"test_{k}": m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "majority_class_accuracy")}
    for k in ("accuracy", "balanced_accuracy", "macro_f1"):
        values[f"test_{k}_ci95_lo"], values[f"test_{k}_ci95_hi"] = m[f"{k}_ci95"]
    binary = m.get("binary") or {}
    if "accuracy" in binary:
        values["test_binary_accuracy"] = binary["accuracy"]
        values["test_binary_accuracy_ci95_lo"], values["test_binary_accuracy_ci95_hi"] = binary["accuracy_ci95"]
    for name, scores in m["per_class"].items():
        for k in ("precision", "recall"):
            values[f"test_{k}/{_key(name)}"] = scores[k]
    for column, groups in (m.get("group_accuracy") or {}).items():
        for value, stats in groups.items():
            key = f"test_group_accuracy/{_key(column)}/{_key(value)}"
            values[key] = stats["accuracy"]
            values[f"{key}/ci95_lo"], values[f"{key}/ci95_hi"] = m["group_accuracy_ci95"][column][value]
    return values


def _key(name) -> str:
    return re.sub(r"[^\w.\- ]", "_", str(name))


def log_evaluation(runs: list[dict], reports_dir: Path, eval_dir: Path) -> None:
    """Test metrics, evaluation files and figures into each scored run, through the client and
    without reopening the run, so its end time stays the training's; the report into the group's
    run, which ends now. ``runs`` have been through link_runs and report.write."""
    client, experiment_id = _store()
    now = int(time.time() * 1000)
    for run_ in runs:
        if not run_["metrics"]:
            continue
        run_id = run_["mlflow_run_id"]
        metrics = evaluation_metrics(run_["metrics"])
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        client.log_artifacts(run_id, str(eval_dir / run_["record"].run_name), "evaluation")
        with tempfile.TemporaryDirectory() as figures:  # at the top of the run's artifacts, one click away
            for kind, path in run_.get("plots", {}).items():
                shutil.copy(path, Path(figures) / f"{kind}.png")
            client.log_artifacts(run_id, figures)
    parent = group_run(client, experiment_id)
    for name in ("results.md", "results.csv"):
        client.log_artifact(parent, str(reports_dir / name))
    client.log_artifacts(parent, str(reports_dir / "plots"), "plots")
    client.set_terminated(parent)
