"""The files `dvc metrics` and `dvc plots` read, written by evaluate from the scored runs.

`dvc metrics show` makes one row per metrics file and one column per key, so every scored run
gets its own flat file with the same keys (the path names the run: ``<method>/<pair>.json``).
A run whose weights were unavailable has no file, hence no row: a row of dashes could not say
why, and a status key would add a column to every run; reports/results.md names such runs.
`dvc plots` draws one figure per file, so the per-epoch curves of all runs go into one long
table with a ``run`` column, drawn by the ``by_run`` template (.dvc/plots/) as one figure per
metric with a line per run; the confusion matrices are one table of (actual, predicted) class
names per run, for DVC's ``confusion`` template.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from transferlab import files, layout
from transferlab.provenance import RunRecord

# Test metrics, each with its bootstrap 95% interval, the share of the largest test class (the floor any
# model must beat) and the last-epoch validation accuracy the run was chosen on; rounded, so `dvc metrics diff`
# reads easily. Where the dataset has a binary mapping (ELPV), binary_accuracy and its interval follow, and
# the accuracy per metadata group (ELPV: cell type), nested as <column>.<value>.accuracy[_ci95_lo|_hi]: the
# same for every run of one evaluation, so every file has the same keys. (A key left empty would not do:
# `dvc metrics show` leaves out null values, so the files would differ.)
FIGURES = ("accuracy", "balanced_accuracy", "macro_f1")
KEYS = (
    *(f"{figure}{end}" for figure in FIGURES for end in ("", "_ci95_lo", "_ci95_hi")),
    "majority_class_accuracy",
    "val_accuracy",
)
DIGITS = 4


def run_metrics(record: RunRecord, metrics: dict) -> dict:
    """One scored run's flat metrics under KEYS (val_accuracy None if training did not record it), then
    the binary accuracy and the group accuracies where there are any."""
    values = {**metrics, "val_accuracy": record.val_accuracy}
    for figure in FIGURES:
        values[f"{figure}_ci95_lo"], values[f"{figure}_ci95_hi"] = values[f"{figure}_ci95"]
    out = {k: _round(values[k]) for k in KEYS}
    binary = metrics.get("binary") or {}
    if "accuracy" in binary:
        out["binary_accuracy"] = _round(binary["accuracy"])
        out["binary_accuracy_ci95_lo"], out["binary_accuracy_ci95_hi"] = map(_round, binary["accuracy_ci95"])
    for column, by_value in metrics["group_accuracy"].items():
        ci = metrics["group_accuracy_ci95"][column]
        out[_key(column)] = {
            _key(value): {
                "accuracy": _round(stats["accuracy"]),
                "accuracy_ci95_lo": _round(ci[value][0]),
                "accuracy_ci95_hi": _round(ci[value][1]),
            }
            for value, stats in by_value.items()
        }
    return out


def _round(value) -> float | None:
    return None if value is None else round(float(value), DIGITS)


def _key(name: str) -> str:
    """A group name DVC's dotted column names can hold."""
    return re.sub(r"[^\w-]", "_", str(name))


def curves(runs: list[dict]) -> pd.DataFrame:
    """Per-epoch accuracy and loss of every run with a history, long format: run, epoch, split."""
    frames = []
    for run in runs:
        history = run.get("history")
        if history is None or not len(history):
            continue
        h = pd.DataFrame(history)
        epoch = h["epoch"] if "epoch" in h else pd.Series(np.arange(1, len(h) + 1))
        for split, prefix in (("train", ""), ("val", "val_")):
            frames.append(
                pd.DataFrame(
                    {
                        "run": run["record"].run_name,
                        "epoch": epoch,
                        "split": split,
                        "accuracy": h[f"{prefix}accuracy"],
                        "loss": h[f"{prefix}loss"],
                    }
                )
            )
    return (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["run", "epoch", "split", "accuracy", "loss"])
    )


def confusion_pairs(metrics: dict) -> pd.DataFrame:
    """The (actual, predicted) class name of every test example, rebuilt from the confusion matrix."""
    cm = np.asarray(metrics["confusion_matrix"])
    classes = np.asarray(metrics["classes"], dtype=object)
    actual, predicted = np.nonzero(cm)
    counts = cm[actual, predicted]
    return pd.DataFrame(
        {"actual": np.repeat(classes[actual], counts), "predicted": np.repeat(classes[predicted], counts)}
    )


def write(runs: list[dict], metrics_dir: Path, plots_dir: Path) -> None:
    """metrics_dir/<run>.json per scored run; plots_dir/curves.csv and plots_dir/confusion/<run>.csv.

    Both folders are replaced whole, so a run that is no longer scored leaves no stale row."""
    scored = [run for run in runs if run.get("metrics")]
    with files.atomic_dir(metrics_dir) as metrics_out, files.atomic_dir(plots_dir / "confusion") as confusion_out:
        for run in scored:
            name = run["record"].run_name
            metrics_file, confusion_file = layout.metrics_file(name, metrics_out), confusion_out / f"{name}.csv"
            for path in (metrics_file, confusion_file):
                path.parent.mkdir(parents=True, exist_ok=True)
            files.write_json(metrics_file, run_metrics(run["record"], run["metrics"]))
            confusion_pairs(run["metrics"]).to_csv(confusion_file, index=False)
    curves(runs).to_csv(plots_dir / "curves.csv", index=False, float_format="%.6g")
