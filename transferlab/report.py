"""Results table, Markdown report with an audit trail, and plots, from finished runs.

A run is a dict with ``record`` (the training's :class:`~transferlab.provenance.RunRecord`), ``metrics`` (from
:func:`transferlab.metrics.compute`, or None) and ``history`` (per-epoch DataFrame with
epoch, loss, accuracy, val_loss, val_accuracy, or None), and once tracked ``mlflow_url``, the
run's page in the MLflow UI; :func:`write` adds ``plots``, the run's own figures. Runs whose
weights could not be obtained stay in every output as "weights unavailable", so a missing backbone is visible
instead of quietly absent; randomly initialised runs say "not pretrained" everywhere, so
they are never read as transfer-learning results.
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from transferlab import layout
from transferlab.provenance import RunRecord

UNAVAILABLE = "weights unavailable"
NOT_PRETRAINED = "not pretrained"
MISSING = "—"
SORT_KEYS = ["backbone", "preprocessing", "method"]
# the headline figures, each with its 95% interval (<figure>_lo, <figure>_hi); accuracy[<column>=<value>] follow
FIGURES = ("accuracy", "balanced_accuracy", "macro_f1", "binary_accuracy")


def weights_label(record: RunRecord) -> str:
    if record.weights.status == "unavailable" or record.status == "unavailable":
        return UNAVAILABLE
    if not record.weights.pretrained:
        return NOT_PRETRAINED
    return record.weights.label


def run_label(record: RunRecord) -> str:
    """backbone / method / variant, plus the weights caveat when there is one."""
    label = " / ".join((record.backbone, record.method, record.variant))
    caveat = weights_label(record)
    return f"{label} ({caveat})" if caveat in (UNAVAILABLE, NOT_PRETRAINED) else label


def table(runs: list[dict]) -> pd.DataFrame:
    """One row per run; metric cells are NaN (never a number) when there is no result."""
    names = [r["record"].run_name for r in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"run names must be unique; repeated: {duplicates}")
    rows = [_row(run) for run in runs]
    group_columns = sorted({c for row in rows for c in row if _is_group(c)})
    columns = [
        "run_name",
        "backbone",
        "method",
        "preprocessing",
        "precision",
        "weights",
        *(f"{figure}{end}" for figure in [*FIGURES, *group_columns] for end in ("", "_lo", "_hi")),
        "train_seconds",
        "preprocessing_fingerprint",
        "weights_checksum",
        "manifest_sha256",
    ]
    df = pd.DataFrame(rows, columns=columns)
    pipeline_order = lambda col: col.map({m: i for i, m in enumerate(layout.METHODS)}).fillna(len(layout.METHODS))  # noqa: E731
    return df.sort_values(
        SORT_KEYS, key=lambda col: pipeline_order(col) if col.name == "method" else col, kind="stable"
    ).reset_index(drop=True)


def _row(run: dict) -> dict:
    record = run["record"]
    metrics = run.get("metrics")
    label = weights_label(record)
    seconds = record.train_seconds
    row = {
        "run_name": record.run_name,
        "backbone": record.backbone,
        "method": record.method,
        "preprocessing": record.variant,
        "precision": record.precision,
        "weights": label,
        "train_seconds": np.nan if label == UNAVAILABLE or seconds is None else seconds,
        "preprocessing_fingerprint": record.preprocessing_fingerprint,
        "weights_checksum": _short(record.weights.array_checksum),
        "manifest_sha256": _short(record.manifest_sha256),
    }
    if metrics:
        binary = metrics.get("binary") or {}
        figures = {k: (metrics[k], metrics[f"{k}_ci95"]) for k in ("accuracy", "balanced_accuracy", "macro_f1")}
        if "accuracy" in binary:
            figures["binary_accuracy"] = binary["accuracy"], binary["accuracy_ci95"]
        for column, values in (metrics.get("group_accuracy") or {}).items():
            for value, stats in values.items():
                figures[f"accuracy[{column}={value}]"] = (
                    stats["accuracy"],
                    metrics["group_accuracy_ci95"][column][value],
                )
        for name, (value, (lo, hi)) in figures.items():
            row.update({name: value, f"{name}_lo": lo, f"{name}_hi": hi})
    return row


def _is_group(column: str) -> bool:
    return column.startswith("accuracy[") and column.endswith("]")


def _short(digest: str | None, n: int = 12) -> str | None:
    return digest[:n] if digest else None


def write(runs: list[dict], out_dir, mlflow_urls: dict | None = None) -> list[Path]:
    """Write results.csv, results.md and plots/ under ``out_dir``; return the paths written.

    ``mlflow_urls``: the MLflow pages of the run group (``group``) and of the runs view (``runs``)."""
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    df = table(runs)
    by_name = {r["record"].run_name: r for r in runs}
    ordered = [by_name[name] for name in df["run_name"]]

    written = []
    used: set[str] = set()
    for run in ordered:
        name = _file_safe(run["record"].run_name, used)
        run["plots"] = {}
        if run.get("history") is not None:
            run["plots"]["learning_curves"] = _save(_learning_curves([run]), plots / f"curves_{name}.png")
        if run.get("metrics"):
            run["plots"]["confusion_matrix"] = _save(_confusion(run), plots / f"confusion_{name}.png")
        written += run["plots"].values()

    csv, md, accuracy_csv = out_dir / "results.csv", out_dir / "results.md", plots / "accuracy.csv"
    df.to_csv(csv, index=False, float_format="%.6g")
    md.write_text(markdown(df, ordered, out_dir, mlflow_urls or {}))
    measured = df[df["accuracy"].notna()]
    pd.DataFrame(
        {
            "run_name": measured["run_name"],
            "label": [run_label(by_name[n]["record"]) for n in measured["run_name"]],
            "accuracy": measured["accuracy"],
            "lo": measured["accuracy_lo"],
            "hi": measured["accuracy_hi"],
        }
    ).to_csv(accuracy_csv, index=False, float_format="%.6g")

    written += [csv, md, accuracy_csv]
    written.append(_save(_learning_curves(ordered), plots / "learning_curves.png"))
    written.append(_save(_comparison(ordered), plots / "comparison.png"))
    return written


# --- Markdown -----------------------------------------------------------------------------


def markdown(df: pd.DataFrame, runs: list[dict], out_dir: Path = Path("."), mlflow_urls: dict | None = None) -> str:
    """The results table followed by the audit; ``runs`` in the table's row order."""
    lines = [
        "# Results",
        "",
        *_links(mlflow_urls or {}),
        _markdown_table(df, runs, out_dir),
        "",
        *_binary_note(runs),
        *_parity(runs),
        *_audit(runs),
    ]
    return "\n".join(lines) + "\n"


def _links(urls: dict) -> list[str]:
    plots = "Plots: [test accuracy](plots/comparison.png), [learning curves](plots/learning_curves.png)."
    if not urls:
        return [plots, ""]
    return [
        plots,
        f"MLflow (`mlflow ui`): [this run group]({urls['group']}) (its children are the training "
        f"runs it made), [all training runs]({urls['runs']}).",
        "",
    ]


def _run_links(run: dict, out_dir: Path) -> str:
    links = [f"[MLflow]({run['mlflow_url']})"] if run.get("mlflow_url") else []
    links += [
        f"[{kind.replace('_', ' ')}]({path.relative_to(out_dir).as_posix()})"
        for kind, path in (run.get("plots") or {}).items()
    ]
    return ", ".join(links) or MISSING


def _markdown_table(df: pd.DataFrame, runs: list[dict], out_dir: Path) -> str:
    group_columns = [c for c in df.columns if _is_group(c)]
    header = [
        "run",
        "backbone",
        "method",
        "preprocessing",
        "precision",
        "weights",
        "accuracy [95% CI]",
        "balanced acc. [95% CI]",
        "macro-F1 [95% CI]",
        "binary acc. [95% CI]",
        *[c.replace("accuracy", "acc.", 1) + " [95% CI]" for c in group_columns],
        "train s",
        "preprocessing fingerprint",
        "weights checksum",
        "manifest sha256",
        "links",
    ]
    body = []
    for (_, r), run in zip(df.iterrows(), runs):
        if pd.isna(r["accuracy"]):
            accuracy = UNAVAILABLE if r["weights"] == UNAVAILABLE else "no result"
        else:
            accuracy = _interval(r, "accuracy")
        cells = [
            f"`{r['run_name']}`",
            *[_text(r[c]) for c in ["backbone", "method", "preprocessing", "precision", "weights"]],
            accuracy,
            *[_interval(r, c) for c in ["balanced_accuracy", "macro_f1", "binary_accuracy", *group_columns]],
            _num(r["train_seconds"], 1),
            *[_code(r[c]) for c in ["preprocessing_fingerprint", "weights_checksum", "manifest_sha256"]],
            _run_links(run, out_dir),
        ]
        body.append(cells)
    return "\n".join(md_table(header, body))


def _interval(row, figure: str) -> str:
    """'0.781 [0.749, 0.811]': a figure and its 95% interval."""
    if pd.isna(row[figure]):
        return MISSING
    return f"{row[figure]:.3f} [{row[f'{figure}_lo']:.3f}, {row[f'{figure}_hi']:.3f}]"


def _binary_note(runs: list[dict]) -> list[str]:
    """What the binary accuracy column maps, or why it is empty (one line per distinct mapping)."""
    notes = []
    for run in runs:
        task = (run.get("metrics") or {}).get("binary")
        if not task:
            continue
        if "positive_classes" in task:
            notes.append(
                f"Binary accuracy: {', '.join(task['positive_classes'])} vs every other class "
                f"({task.get('rule', 'as listed')}), the true and the predicted class mapped alike."
            )
        else:
            notes.append(f"Binary accuracy: not computed ({task.get('skipped', 'no positive classes given')}).")
    return [*dict.fromkeys(notes), ""] if notes else []


def md_table(header: list[str], rows: list[list]) -> list[str]:
    """Markdown table lines; a '|' inside a cell is escaped so it cannot split the cell."""
    return [
        "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
        for cells in [header, ["---"] * len(header), *rows]
    ]


def _num(value, digits: int = 3) -> str:
    return MISSING if pd.isna(value) else f"{value:.{digits}f}"


def _text(value) -> str:
    return MISSING if pd.isna(value) else str(value)


def _parity(runs: list[dict]) -> list[str]:
    """frozen_end_to_end is train_head's model (bottleneck head) trained on images: these figures say if it is."""
    rows = [r["record"] for r in runs if r["record"].parity]
    if not rows:
        return []
    body = [
        [
            f"`{r.run_name}`",
            f"{r.parity.parity_max_abs_logit_diff:.2e}",
            f"{r.parity.parity_val_accuracy_diff:+.4f}",
        ]
        for r in rows
    ]
    return [
        "## Parity: train_head vs frozen_end_to_end",
        "",
        "Same head, seed, batch order and optimizer; on the validation split they should agree.",
        "",
        *md_table(["run", "max abs. logit difference", "validation accuracy difference"], body),
        "",
    ]


def _audit(runs: list[dict]) -> list[str]:
    lines = [
        "## Audit",
        "",
        "Which preprocessing, weights and data produced which result.",
    ]
    for run in runs:
        lines += ["", f"### `{run['record'].run_name}`", "", *_audit_run(run)]
    lines += ["", "### Where runs disagree", "", *_disagreements([r["record"] for r in runs])]
    return lines


def _audit_run(run: dict) -> list[str]:
    record, metrics = run["record"], run.get("metrics")
    w = record.weights
    label = weights_label(record)
    if metrics:
        row = _row(run)
        figures = [("accuracy", "accuracy"), ("balanced accuracy", "balanced_accuracy"), ("macro-F1", "macro_f1")]
        figures += [("binary accuracy", "binary_accuracy")] if "binary_accuracy" in row else []
        result = ", ".join(f"{words} {_interval(row, key)}" for words, key in figures)
        result += f" on {metrics['n']} test images"
    else:
        result = f"none ({UNAVAILABLE})" if label == UNAVAILABLE else "none (no metrics recorded)"
    if label == UNAVAILABLE:
        identity = UNAVAILABLE + (f" ({' '.join(w.message.split())})" if w.message else "")
    else:
        pretrained = "no" if label == NOT_PRETRAINED else "yes"
        identity = f"{label} (status {w.status}, pretrained: {pretrained})"
    weights = "; ".join(
        [
            identity,
            f"source {_code(w.source)}",
            f"file sha256 {_code(w.file_sha256)}",
            f"array checksum {_code(w.array_checksum)}",
        ]
    )
    run_info = [f"MLflow run id {_code(record.mlflow_run_id)}", f"stage {record.stage}"]
    if record.train_seconds is not None and label != UNAVAILABLE:
        run_info.append(f"trained in {record.train_seconds:.1f} s")
    return [
        f"- **Result:** {result}.",
        f"- **Preprocessing** {_code(record.preprocessing_fingerprint)}: "
        f"{describe_preprocessing(record.preprocessing)}.",
        f"- **Weights:** {weights}.",
        f"- **Precision:** {_code(record.precision)} ({record.precision_reason}).",
        f"- **Data:** split manifest sha256 {_code(record.manifest_sha256)}.",
        f"- **Run:** {'; '.join(run_info)}.",
    ]


def describe_preprocessing(pre: dict) -> str:
    """The preprocessing record (backbones.preprocessing_record) in words: everything that decides
    the pixels the network sees."""
    function = f" (`{pre['keras_function']}`)" if pre["keras_function"] else ""
    size = "×".join(str(s) for s in pre["input_size"])
    return (
        f"variant {pre['variant']}: {pre['mode']} mode{function}, "
        f"{pre['colour_order']} channel order, subtract mean {_vector(pre['mean'])} "
        f"then divide by std {_vector(pre['std'])} (0–255 scale), resized to {size} with "
        f"{pre['interpolation']} interpolation, antialias {'on' if pre['antialias'] else 'off'}"
    )


def _vector(values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]" if values is not None else MISSING


def _code(value) -> str:
    return MISSING if pd.isna(value) or not value else f"`{value}`"


def _disagreements(records: list[RunRecord]) -> list[str]:
    """Notes for runs that should be comparable but were not produced from the same inputs."""
    notes = []
    by_backbone: dict[str, list[RunRecord]] = {}
    for record in records:
        by_backbone.setdefault(record.backbone, []).append(record)
    for backbone, group in sorted(by_backbone.items()):
        fingerprints = _distinct(group, lambda r: r.preprocessing_fingerprint)
        if len(fingerprints) > 1:
            variants = " vs ".join(
                f"`{fp}` ({rs[0].variant}: {', '.join(r.run_name for r in rs)})" for fp, rs in fingerprints.items()
            )
            fields = _differing_fields([rs[0].preprocessing for rs in fingerprints.values()])
            notes.append(
                f"- **{backbone}, preprocessing:** {len(fingerprints)} fingerprints, {variants}; "
                f"they differ in {fields}. Accuracy differences between these runs include the "
                "preprocessing, not only the method."
            )
        pretrained = [r for r in group if weights_label(r) not in (UNAVAILABLE, NOT_PRETRAINED)]
        checksums = _distinct(pretrained, lambda r: r.weights.array_checksum)
        if len(checksums) > 1:
            notes.append(
                f"- **{backbone}, weights:** pretrained runs start from {len(checksums)} different "
                f"weight arrays ({_listing(checksums)})."
            )
    manifests = _distinct(records, lambda r: r.manifest_sha256)
    if len(manifests) > 1:
        notes.append(
            f"- **Data:** runs used {len(manifests)} different split manifests ({_listing(manifests)}); "
            "their accuracies were measured on different test sets and are not directly comparable."
        )
    precisions = _distinct(records, lambda r: r.precision)
    if len(precisions) > 1:
        notes.append(
            f"- **Precision:** runs were computed in {len(precisions)} precisions ({_listing(precisions)}); "
            "accuracy differences between them include the numeric precision."
        )
    return notes or [
        "None: each backbone's runs share one preprocessing fingerprint and one weights "
        "checksum, and all runs share one split manifest and one precision."
    ]


def _distinct(records: list[RunRecord], key) -> dict:
    out: dict = {}
    for record in records:
        if key(record):
            out.setdefault(key(record), []).append(record)
    return out


def _listing(groups: dict) -> str:
    return "; ".join(f"{_code(key)}: {', '.join(r.run_name for r in rs)}" for key, rs in groups.items())


def _differing_fields(records: list[dict]) -> str:
    """The preprocessing records' fields that differ, in words."""
    keys = sorted({k for r in records for k in r})
    parts = [
        f"{k.replace('_', ' ')} (" + " vs ".join(_plain(r.get(k)) for r in records) + ")"
        for k in keys
        if len({repr(r.get(k)) for r in records}) > 1
    ]
    return ", ".join(parts) or "fields outside the preprocessing record"


def _plain(value) -> str:
    if isinstance(value, (list, tuple)):
        return _vector(value) if all(isinstance(v, (int, float)) for v in value) else str(list(value))
    return str(value)


# --- plots --------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _file_safe(name: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"
    safe, i = base, 2
    while safe in used:
        safe, i = f"{base}-{i}", i + 1
    used.add(safe)
    return safe


def _wrap(text: str, width: int = 42) -> str:
    return "\n".join(textwrap.wrap(text, width))


def _learning_curves(runs: list[dict]) -> Figure:
    """Accuracy above loss for each run, each on its own axis, shared across panels so that the
    panels compare at a glance (twin axes would scale loss per panel)."""
    runs = [r for r in runs if r.get("history") is not None and len(pd.DataFrame(r["history"]))]
    ncols = max(1, min(3, len(runs)))
    nrows = max(1, math.ceil(len(runs) / ncols))
    fig = Figure(figsize=(5.2 * ncols, 5.0 * nrows), layout="constrained")
    grid = fig.subplots(2 * nrows, ncols, squeeze=False)
    acc_axes, loss_axes = grid[0::2].ravel(), grid[1::2].ravel()
    for axes in (acc_axes, loss_axes):
        for ax in axes[1:]:
            ax.sharey(axes[0])
    if not runs:
        acc_axes[0].text(0.5, 0.5, "no training history recorded", ha="center", va="center")
    for acc_ax, loss_ax, run in zip(acc_axes, loss_axes, runs):
        h = pd.DataFrame(run["history"])
        epoch = h["epoch"] if "epoch" in h else pd.Series(np.arange(1, len(h) + 1))
        for ax, metric in ((acc_ax, "accuracy"), (loss_ax, "loss")):
            for column, colour, label in [(metric, "C0", "train"), (f"val_{metric}", "C1", "val")]:
                if column in h:
                    ax.plot(epoch, h[column], color=colour, marker="o", ms=3, label=label)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        loss_ax.set_xlabel("epoch")
        acc_ax.set_title(_wrap(run_label(run["record"])), fontsize=10)
    for ax in [*acc_axes[len(runs) :], *loss_axes[len(runs) :]]:
        ax.set_axis_off()
    if runs:
        fig.legend(*acc_axes[0].get_legend_handles_labels(), loc="outside upper center", ncols=2)
    return fig


def _confusion(run: dict) -> Figure:
    """Counts, shaded by the row share (the recall of each true class)."""
    metrics = run["metrics"]
    cm = np.asarray(metrics["confusion_matrix"])
    classes = metrics.get("classes") or list(metrics["per_class"])
    k = len(classes)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    side = max(4.0, 0.9 * k + 2.5)
    fig = Figure(figsize=(side + 1, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of true class", shrink=0.8)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{cm[i, j]}\n{share[i, j]:.0%}",
                ha="center",
                va="center",
                color="white" if share[i, j] > 0.5 else "black",
                fontsize=9,
            )
    ax.set_xticks(range(k), classes, rotation=30, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    lo, hi = metrics["accuracy_ci95"]
    ax.set_title(
        _wrap(run_label(run["record"]), 50) + f"\naccuracy {metrics['accuracy']:.3f} [{lo:.3f}, {hi:.3f}], "
        f"n={metrics['n']}",
        fontsize=10,
    )
    return fig


def _comparison(runs: list[dict]) -> Figure:
    fig = Figure(figsize=(8.5, 1.2 + 0.45 * max(len(runs), 1)), layout="constrained")
    ax = fig.subplots()
    for y, run in enumerate(runs):
        metrics = run.get("metrics")
        caveat = weights_label(run["record"])
        if not metrics:
            ax.text(
                0.01,
                y,
                "no result" if caveat != UNAVAILABLE else UNAVAILABLE,
                va="center",
                style="italic",
                color="dimgray",
            )
            continue
        acc, (lo, hi) = metrics["accuracy"], metrics["accuracy_ci95"]
        not_pretrained = caveat == NOT_PRETRAINED
        ax.barh(
            y,
            acc,
            xerr=[[acc - lo], [hi - acc]],
            capsize=3,
            height=0.6,
            color="lightgray" if not_pretrained else "C0",
            hatch="//" if not_pretrained else None,
            edgecolor="dimgray",
        )
        ax.text(
            0.01,
            y,
            f"{acc:.3f} [{lo:.3f}, {hi:.3f}]",
            va="center",
            fontsize=9,
            color="black" if not_pretrained else "white",
            backgroundcolor="lightgray" if not_pretrained else "none",
        )
    baseline = _majority_baseline(runs)
    if baseline is not None:
        ax.axvline(baseline, color="C3", ls=":", label=f"majority class ({baseline:.3f})")
        fig.legend(loc="outside lower center", fontsize=9)
    ax.set_yticks(range(len(runs)), [run_label(r["record"]) for r in runs])
    ax.set_ylim(max(len(runs), 1) - 0.5, -0.5)  # first table row on top
    ax.set_xlim(0, 1)
    ax.set_xlabel("test accuracy (error bars: 95% bootstrap CI)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Test accuracy by backbone / method / preprocessing")
    return fig


def _majority_baseline(runs: list[dict]) -> float | None:
    """Share of the largest class, when all measured runs saw the same test labels."""
    baselines = {r["metrics"]["majority_class_accuracy"] for r in runs if r.get("metrics")}
    return baselines.pop() if len(baselines) == 1 else None
