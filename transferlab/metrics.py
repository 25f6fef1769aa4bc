"""Test-set metrics as one JSON-able dict, in pure numpy.

Conventions for the cases where a ratio has a zero denominator (they match scikit-learn's
``precision_recall_fscore_support(labels=range(K), zero_division=0)`` and
``balanced_accuracy_score``, so the numbers can be cross-checked):

* precision of a class that is never predicted is 0.0;
* recall of a class with no support (absent from ``y_true``) is 0.0;
* F1 is 0.0 whenever precision + recall is 0, which includes a class with neither
  predictions nor support: such a class still counts in ``macro_f1`` (the mean over *all*
  classes), so a label set that the test split does not cover pulls macro-F1 down rather
  than silently disappearing from it;
* ``balanced_accuracy`` averages recall over the classes present in ``y_true`` only, since
  a class without support has no recall to average.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def compute(
    y_true,
    y_pred,
    classes: list[str],
    groups: dict[str, object] | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Accuracy with a seeded 95% bootstrap CI, per-class scores, confusion matrix, group accuracy.

    ``y_true`` and ``y_pred`` hold integer class indices into ``classes``. ``groups`` maps a
    metadata column (ELPV: ``cell_type``) to one value per example; accuracy is reported for
    each value, with missing values (None/NaN) pooled under ``"missing"``.
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
    if int(bootstrap) < 1:
        raise ValueError(f"bootstrap must be at least 1, got {bootstrap}")

    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)

    correct = y_true == y_pred
    accuracy = float(correct.mean())
    return {
        "n": int(n),
        "classes": classes,
        "accuracy": accuracy,
        "accuracy_ci95": _bootstrap_ci(int(correct.sum()), n, int(bootstrap), seed),
        "balanced_accuracy": float(recall[support > 0].mean()),
        "majority_class_accuracy": float(support.max() / n),  # the score of always guessing the largest class
        "macro_f1": float(f1.mean()),
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
        "group_accuracy": {
            str(column): _group_accuracy(correct, values, str(column)) for column, values in (groups or {}).items()
        },
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


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0.0 where den is 0 (the zero-division convention of this module)."""
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _bootstrap_ci(n_correct: int, n: int, bootstrap: int, seed: int) -> list[float]:
    """Percentile bootstrap over examples, drawn in closed form.

    Resampling n examples with replacement and counting the correct ones gives a
    Binomial(n, accuracy) count exactly, so drawing that count is the same bootstrap as
    materialising a (bootstrap x n) index matrix, without its memory cost.
    """
    rng = np.random.default_rng(seed)
    resampled = rng.binomial(n, n_correct / n, size=bootstrap) / n
    lo, hi = np.percentile(resampled, [2.5, 97.5])
    return [float(lo), float(hi)]


def _group_accuracy(correct: np.ndarray, values, column: str) -> dict:
    values = pd.Series(np.asarray(values, dtype=object))
    if len(values) != len(correct):
        raise ValueError(f"group {column!r} has {len(values)} values but there are {len(correct)} examples")
    keys = values.where(values.notna(), "missing").astype(str).to_numpy()
    out = {}
    for key in sorted(set(keys)):
        mask = keys == key
        out[key] = {"accuracy": float(correct[mask].mean()), "n": int(mask.sum())}
    return out
