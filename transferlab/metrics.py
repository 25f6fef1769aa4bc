"""Test-set metrics as one JSON-able dict: scikit-learn's scores plus seeded bootstrap intervals.

Point estimates come from scikit-learn (``confusion_matrix``, ``precision_recall_fscore_support``
with ``zero_division=0``, ``balanced_accuracy_score``), whose conventions for a zero denominator are:

* precision of a class that is never predicted is 0.0;
* recall of a class with no support (absent from ``y_true``) is 0.0;
* F1 is 0.0 whenever precision + recall is 0, which includes a class with neither
  predictions nor support: such a class still counts in ``macro_f1`` (the mean over *all*
  classes), so a label set that the test split does not cover pulls macro-F1 down rather
  than silently disappearing from it;
* ``balanced_accuracy`` averages recall over the classes present in ``y_true`` or ``y_pred``
  that have support, since a class without support has no recall to average.

Every headline figure has a 95% percentile-bootstrap interval over test examples, drawn in closed
form with ``seed``: a proportion (accuracy, binary accuracy, accuracy within a group) as a binomial
count, balanced accuracy and macro-F1 as multinomial counts of the confusion matrix's cells.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support


def compute(
    y_true,
    y_pred,
    classes: list[str],
    groups: dict[str, object] | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    binary: dict | None = None,
) -> dict:
    """Accuracy, balanced accuracy and macro-F1 with seeded 95% bootstrap CIs, per-class scores,
    the confusion matrix, accuracy per group and, when ``binary`` names positive classes, the
    binary (positive vs the rest) accuracy.

    ``y_true`` and ``y_pred`` hold integer class indices into ``classes``. ``groups`` maps a
    metadata column (ELPV: ``cell_type``) to one value per example; accuracy is reported for
    each value, with missing values (None/NaN) pooled under ``"missing"``. ``binary`` is
    ``{"positive_classes": [...], ...}`` (e.g. from :func:`transferlab.data.binary_task`; its other
    keys are kept), or ``{"skipped": reason}``, which is recorded as it is.
    """
    classes = [str(c) for c in classes]
    if not classes:
        raise ValueError("classes is empty")
    if len(set(classes)) != len(classes):
        raise ValueError(f"class names must be unique, got {classes}")
    k = len(classes)
    y_true = _labels(y_true, "y_true", k)
    y_pred = _labels(y_pred, "y_pred", k)
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    n = len(y_true)
    if n == 0:
        raise ValueError("no examples: y_true and y_pred are empty")
    bootstrap = int(bootstrap)
    if bootstrap < 1:
        raise ValueError(f"bootstrap must be at least 1, got {bootstrap}")

    labels = np.arange(k)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    with warnings.catch_warnings():  # a predicted class without support has no recall: left out, as documented
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = balanced_accuracy_score(y_true, y_pred)
    balanced_ci, macro_f1_ci = _bootstrap_scores(cm, bootstrap, seed)

    correct = y_true == y_pred
    accuracy = float(correct.mean())
    by_group = {
        str(column): _group_accuracy(correct, values, str(column), bootstrap, seed)
        for column, values in (groups or {}).items()
    }
    return {
        "n": int(n),
        "classes": classes,
        "accuracy": accuracy,
        "accuracy_ci95": _bootstrap_ci(int(correct.sum()), n, bootstrap, seed),
        "balanced_accuracy": float(balanced),
        "balanced_accuracy_ci95": balanced_ci,
        "majority_class_accuracy": float(support.max() / n),  # the score of always guessing the largest class
        "macro_f1": float(f1.mean()),
        "macro_f1_ci95": macro_f1_ci,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
        "group_accuracy": {column: accuracy for column, (accuracy, _) in by_group.items()},
        "group_accuracy_ci95": {column: ci for column, (_, ci) in by_group.items()},
        "binary": _binary(y_true, y_pred, classes, binary, bootstrap, seed),
    }


def _labels(values, name: str, k: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= k)
    if bad.any():
        raise ValueError(
            f"{name} has {int(bad.sum())} label(s) outside 0..{k - 1} (e.g. {int(arr[bad][0])}); there are {k} classes"
        )
    return arr


def _binary(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], task: dict | None, bootstrap: int, seed: int):
    """Accuracy of positive-vs-rest, both sides mapped through the same class set."""
    if not task or not task.get("positive_classes"):
        return dict(task or {"skipped": "no positive classes given"})
    positive = np.isin(np.arange(len(classes)), [classes.index(c) for c in task["positive_classes"]])
    correct = positive[y_true] == positive[y_pred]
    return {
        **task,
        "accuracy": float(correct.mean()),
        "accuracy_ci95": _bootstrap_ci(int(correct.sum()), len(correct), bootstrap, seed),
        "n_positive": int(positive[y_true].sum()),
    }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0.0 where den is 0 (scikit-learn's zero_division=0)."""
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _bootstrap_ci(n_correct: int, n: int, bootstrap: int, seed: int) -> list[float]:
    """Percentile bootstrap of a proportion over examples, drawn in closed form.

    Resampling n examples with replacement and counting the correct ones gives a
    Binomial(n, accuracy) count exactly, so drawing that count is the same bootstrap as
    materialising a (bootstrap x n) index matrix, without its memory cost.
    """
    rng = np.random.default_rng(seed)
    return _percentiles(rng.binomial(n, n_correct / n, size=bootstrap) / n)


def _bootstrap_scores(cm: np.ndarray, bootstrap: int, seed: int) -> tuple[list[float], list[float]]:
    """Percentile bootstrap of balanced accuracy and macro-F1, in closed form like _bootstrap_ci.

    Resampling the examples draws the confusion matrix's cells as Multinomial(n, cell shares);
    the scores of all resampled matrices are computed at once (scikit-learn scores one matrix per
    call, ~1 ms, which for 1,000 resamples would cost a second per run), with its conventions.
    """
    n, k = int(cm.sum()), len(cm)
    rng = np.random.default_rng(seed)
    cms = rng.multinomial(n, cm.ravel() / n, size=bootstrap).reshape(bootstrap, k, k)
    tp = np.diagonal(cms, axis1=1, axis2=2)
    support, predicted = cms.sum(axis=2), cms.sum(axis=1)
    recall = _ratio(tp, support)
    f1 = _ratio(2 * tp, support + predicted)  # = 2PR / (P + R), 0 where nothing was predicted or present
    balanced = (recall * (support > 0)).sum(axis=1) / (support > 0).sum(axis=1)
    return _percentiles(balanced), _percentiles(f1.mean(axis=1))


def _percentiles(values: np.ndarray) -> list[float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def _group_accuracy(correct: np.ndarray, values, column: str, bootstrap: int, seed: int) -> tuple[dict, dict]:
    """Accuracy and n per value of one metadata column, and the accuracy's bootstrap CI per value."""
    values = pd.Series(np.asarray(values, dtype=object))
    if len(values) != len(correct):
        raise ValueError(f"group {column!r} has {len(values)} values but there are {len(correct)} examples")
    keys = values.where(values.notna(), "missing").astype(str).to_numpy()
    out, ci = {}, {}
    for key in sorted(set(keys)):
        mask = keys == key
        out[key] = {"accuracy": float(correct[mask].mean()), "n": int(mask.sum())}
        ci[key] = _bootstrap_ci(int(correct[mask].sum()), int(mask.sum()), bootstrap, seed)
    return out, ci


def t_interval(values, confidence: float = 0.95) -> dict:
    """Mean of ``values`` with its two-sided t-interval (n - 1 degrees of freedom).

    NaNs are dropped. With fewer than two values there is no interval (lo = hi = NaN).
    """
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": math.nan, "lo": math.nan, "hi": math.nan}
    mean = float(x.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "lo": math.nan, "hi": math.nan}
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half}


def headline(y_true, y_pred, classes: list[str], binary: dict | None) -> dict:
    """The four figures a configuration search compares, without intervals (``bootstrap=1``); ``binary``
    as in :func:`compute` (None or a skipped task: no binary figure)."""
    m = compute(y_true, y_pred, classes, bootstrap=1, binary=binary)
    figures = {k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}
    return {**figures, "binary_accuracy": m.get("binary", {}).get("accuracy")}
