"""Metrics against hand-computed values, and the report's table, audit and plots."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pandas as pd
import pytest
from helpers import run_record, weights_identity

from transferlab import data, metrics, provenance, report

# 9 examples, 4 classes. Class "unsure" is never predicted; class "ghost" has neither
# support nor predictions, so both zero-division conventions are exercised.
CLASSES = ["functional", "defective", "unsure", "ghost"]
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2]
Y_PRED = [0, 0, 0, 1, 0, 1, 1, 0, 1]
CELL = ["mono", "poly", "poly", "mono", "mono", "poly", "mono", "poly", "mono"]
# rows true, columns predicted
CONFUSION = [
    [3, 1, 0, 0],
    [1, 2, 0, 0],
    [1, 1, 0, 0],
    [0, 0, 0, 0],
]


def test_metrics_match_hand_computed_values():
    m = metrics.compute(Y_TRUE, Y_PRED, CLASSES, groups={"cell_type": CELL}, bootstrap=200)
    assert m["n"] == 9
    assert m["confusion_matrix"] == CONFUSION
    assert m["accuracy"] == pytest.approx(5 / 9)
    pc = m["per_class"]
    # functional: 3 of 5 predictions right, 3 of 4 found; F1 = 2*.6*.75/1.35
    assert pc["functional"] == pytest.approx({"precision": 0.6, "recall": 0.75, "f1": 2 / 3, "support": 4})
    # defective: 2 of 4 predictions right, 2 of 3 found; F1 = 2*.5*(2/3)/(7/6)
    assert pc["defective"] == pytest.approx({"precision": 0.5, "recall": 2 / 3, "f1": 4 / 7, "support": 3})
    # unsure: never predicted -> precision 0.0 by definition
    assert pc["unsure"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    # ghost: no support and no predictions -> everything 0.0, and it still counts in macro-F1
    assert pc["ghost"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 7 + 0 + 0) / 4)  # 0.309524
    # balanced accuracy: mean recall over the 3 classes present in y_true, ghost excluded
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 2 / 3 + 0) / 3)  # 0.472222
    assert m["majority_class_accuracy"] == pytest.approx(4 / 9)  # functional, the largest class
    assert m["group_accuracy"] == {"cell_type": {"mono": {"accuracy": 0.4, "n": 5}, "poly": {"accuracy": 0.75, "n": 4}}}


def test_metrics_agree_with_sklearn_on_random_labels():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    y_true, y_pred = rng.integers(0, 4, 300), rng.integers(0, 5, 300)  # class 4: predicted, no support
    m = metrics.compute(y_true, y_pred, list("abcde"), bootstrap=10)
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=range(5), zero_division=0)
    np.testing.assert_allclose([m["per_class"][c]["precision"] for c in "abcde"], p)
    np.testing.assert_allclose([m["per_class"][c]["recall"] for c in "abcde"], r)
    np.testing.assert_allclose([m["per_class"][c]["f1"] for c in "abcde"], f)
    assert m["macro_f1"] == pytest.approx(f.mean())
    with warnings.catch_warnings():  # sklearn warns that class 4 is predicted but absent from y_true
        warnings.simplefilter("ignore")
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))
    assert m["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred, labels=range(5)).tolist()


def test_bootstrap_ci_contains_accuracy_is_seeded_and_narrows():
    small = metrics.compute(Y_TRUE, Y_PRED, CLASSES, seed=3)
    lo, hi = small["accuracy_ci95"]
    assert lo < small["accuracy"] < hi
    assert metrics.compute(Y_TRUE, Y_PRED, CLASSES, seed=3)["accuracy_ci95"] == [lo, hi]
    large = metrics.compute(Y_TRUE * 100, Y_PRED * 100, CLASSES, seed=3)
    assert large["accuracy"] == pytest.approx(small["accuracy"])
    llo, lhi = large["accuracy_ci95"]
    assert llo < large["accuracy"] < lhi
    assert (lhi - llo) < (hi - lo) / 5  # ~sqrt(100) narrower
    # with 900 examples the percentiles are fine-grained enough for the seed to show
    assert metrics.compute(Y_TRUE * 100, Y_PRED * 100, CLASSES, seed=4)["accuracy_ci95"] != [llo, lhi]


def test_bootstrap_matches_explicit_resampling_of_examples():
    """The closed-form draw is the same distribution as resampling example indices."""
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 2, 400)
    y_pred = np.where(rng.random(400) < 0.8, y_true, 1 - y_true)
    correct = y_true == y_pred
    idx = rng.integers(0, 400, size=(20000, 400))
    explicit = np.percentile(correct[idx].mean(axis=1), [2.5, 97.5])
    ci = metrics.compute(y_true, y_pred, ["a", "b"], bootstrap=20000)["accuracy_ci95"]
    np.testing.assert_allclose(ci, explicit, atol=0.006)


def test_binary_accuracy_and_the_intervals_of_every_figure_by_hand():
    """Binary accuracy maps the true and the predicted class alike; every figure has an interval around it."""
    m = metrics.compute(Y_TRUE, Y_PRED, CLASSES, groups={"cell_type": CELL}, binary={"positive_classes": ["defective"]})
    # positive (defective) vs the rest: true 0,0,0,0,1,1,1,0,0; predicted 0,0,0,1,0,1,1,0,1 -> 6 of 9 agree
    assert m["binary"]["accuracy"] == pytest.approx(6 / 9) and m["binary"]["n_positive"] == 3
    assert m["binary"]["positive_classes"] == ["defective"]
    for figure in ("accuracy", "balanced_accuracy", "macro_f1"):
        lo, hi = m[f"{figure}_ci95"]
        assert 0 <= lo <= m[figure] <= hi <= 1, figure
    lo, hi = m["binary"]["accuracy_ci95"]
    assert lo < 6 / 9 < hi
    for value, stats in m["group_accuracy"]["cell_type"].items():
        lo, hi = m["group_accuracy_ci95"]["cell_type"][value]
        assert lo <= stats["accuracy"] <= hi
    assert metrics.compute(Y_TRUE, Y_PRED, CLASSES)["binary"] == {"skipped": "no positive classes given"}


def test_elpv_binary_task_is_defect_probability_at_least_one_half():
    """The literature's defective-vs-functional figure: a confusion between neighbours can be right in binary."""
    task = data.binary_task("auto", list(data.ELPV_CLASSES))
    assert task["positive_classes"] == ["likely_defective", "defective"]
    # functional <-> possibly_defective and likely_defective <-> defective: 4-class 0, binary 1
    m = metrics.compute([0, 1, 2, 3], [1, 0, 3, 2], list(data.ELPV_CLASSES), binary=task)
    assert m["accuracy"] == 0.0 and m["binary"]["accuracy"] == 1.0
    m = metrics.compute([0, 1, 2, 3], [2, 0, 3, 0], list(data.ELPV_CLASSES), binary=task)
    assert m["binary"]["accuracy"] == 0.5  # functional -> likely, defective -> functional: two binary errors

    # the search scripts' headline: the same figures, and no binary one where the task is skipped
    elpv = list(data.ELPV_CLASSES)
    assert metrics.headline([0, 1, 2, 3], [2, 0, 3, 0], elpv, task) == {
        "accuracy": 0.0,
        "balanced_accuracy": 0.0,
        "macro_f1": 0.0,
        "binary_accuracy": 0.5,
    }
    assert metrics.headline([0, 1, 2, 3], [0, 1, 2, 0], elpv, None)["binary_accuracy"] is None


@pytest.mark.parametrize(
    "setting, classes, expected",
    [
        ("auto", ["cat", "dog"], "evaluate.positive_classes is auto, which maps only ELPV's classes"),
        (None, list(data.ELPV_CLASSES), "evaluate.positive_classes names no class"),
        (["dog"], ["cat", "dog"], {"positive_classes": ["dog"], "rule": "positive: dog"}),
    ],
)
def test_binary_task_for_other_datasets_is_a_list_or_skipped_with_the_reason(setting, classes, expected):
    task = data.binary_task(setting, classes)
    if isinstance(expected, dict):
        assert task == expected
    else:
        assert task["skipped"].startswith(expected) and "positive_classes" not in task


def test_binary_task_refuses_unknown_or_all_classes_naming_them():
    with pytest.raises(ValueError, match=r"some, not all, of the classes \['cat', 'dog'\].*\(unknown: cow, pig\)"):
        data.binary_task(["cow", "dog", "pig"], ["cat", "dog"])
    with pytest.raises(ValueError, match="some, not all"):
        data.binary_task(["cat", "dog"], ["cat", "dog"])


def test_bootstrap_of_balanced_accuracy_and_macro_f1_matches_resampling_examples_with_sklearn():
    """The multinomial draw of confusion-matrix cells is the bootstrap over examples, scored as sklearn does."""
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, 300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 3, 300))
    m = metrics.compute(y_true, y_pred, list("abc"), bootstrap=20000)
    idx = rng.integers(0, 300, size=(1000, 300))
    balanced = [skm.balanced_accuracy_score(y_true[i], y_pred[i]) for i in idx]
    f1 = [skm.f1_score(y_true[i], y_pred[i], labels=range(3), average="macro", zero_division=0) for i in idx]
    np.testing.assert_allclose(m["balanced_accuracy_ci95"], np.percentile(balanced, [2.5, 97.5]), atol=0.01)
    np.testing.assert_allclose(m["macro_f1_ci95"], np.percentile(f1, [2.5, 97.5]), atol=0.01)


@pytest.mark.parametrize(
    "y_true, y_pred, groups, match",
    [
        ([0, 1, 1], [0, 1], None, "y_true has 3 labels but y_pred has 2"),
        ([0, 1, 4], [0, 1, 1], None, r"y_true has 1 label\(s\) outside 0..3"),
        ([0, 1, 1], [0, -1, 1], None, r"y_pred has 1 label\(s\) outside 0..3"),
        ([0.0, 1.0], [0, 1], None, "integer class indices"),
        ([[0, 1]], [[0, 1]], None, "1-D"),
        ([], [], None, "no examples"),
        ([0, 1], [0, 1], {"cell_type": ["mono"]}, "group 'cell_type' has 1 values but there are 2 examples"),
    ],
)
def test_metrics_validate_inputs(y_true, y_pred, groups, match):
    with pytest.raises(ValueError, match=match):
        metrics.compute(y_true, y_pred, CLASSES, groups=groups)


def test_metrics_validate_classes_and_bootstrap():
    with pytest.raises(ValueError, match="unique"):
        metrics.compute([0], [0], ["a", "a"])
    with pytest.raises(ValueError, match="bootstrap"):
        metrics.compute([0], [0], ["a"], bootstrap=0)


# --- report ----------------------------------------------------------------------------------

VGG_NATIVE = {
    "variant": "native",
    "mode": "caffe",
    "colour_order": "BGR",
    "mean": [103.939, 116.779, 123.68],
    "std": [1.0, 1.0, 1.0],
    "input_size": [128, 128],
    "interpolation": "bilinear",
    "antialias": True,
    "keras_function": "keras.applications.vgg16.preprocess_input",
}
VGG_RESCALE = {
    **VGG_NATIVE,
    "variant": "rescale",
    "mode": "rescale",
    "colour_order": "RGB",
    "mean": [0.0, 0.0, 0.0],
    "std": [255.0, 255.0, 255.0],
    "keras_function": None,
}
IMAGENET = weights_identity(
    status="available",
    pretrained=True,
    label="ImageNet (Keras)",
    source="keras",
    file_sha256="f" * 64,
    array_checksum="c" * 32,
)
RANDOM = weights_identity(
    status="random",
    pretrained=False,
    label="not pretrained",
    source="random",
    file_sha256="9" * 64,
    array_checksum="e" * 32,
)
UNAVAILABLE = weights_identity(
    backbone="resnet50",
    status="unavailable",
    pretrained=False,
    label="weights unavailable",
    source="none",
    file_sha256=None,
    array_checksum=None,
    message="resnet50: no ImageNet weights;\nput the Keras file in ~/.keras/models/",
)


def _run(name, pre, fingerprint, weights, p_correct, seed):
    """A run of 120 binary predictions, each right with probability p_correct."""
    record = run_record(
        name,
        input_size=128,
        weights=weights,
        preprocessing=pre,
        preprocessing_fingerprint=fingerprint,
        train_seconds=41.2,
        mlflow_run_id=f"mlflow{seed}",
    )
    if weights.status == "unavailable":
        return {"record": dataclasses.replace(record, status="unavailable"), "metrics": None, "history": None}
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, 120)
    y_pred = np.where(rng.random(120) < p_correct, y_true, 1 - y_true)
    cell_type = np.where(np.arange(120) % 3, "mono", "poly")
    m = metrics.compute(y_true, y_pred, ["functional", "defective"], groups={"cell_type": cell_type})
    epochs = np.arange(1, 6)
    history = pd.DataFrame(
        {
            "epoch": epochs,
            "loss": 1 / epochs,
            "accuracy": 1 - 0.5 / epochs,
            "val_loss": 1.2 / epochs,
            "val_accuracy": 0.9 - 0.5 / epochs,
        }
    )
    return {"record": record, "metrics": m, "history": history}


def sample_runs():
    """Deliberately out of table order: the report must sort them."""
    return [
        _run("finetune_top/vgg16-native", VGG_NATIVE, "aaaa000011112222", RANDOM, 0.55, 3),
        _run("frozen_end_to_end/vgg16-native", VGG_NATIVE, "aaaa000011112222", IMAGENET, 0.8, 5),
        _run("train_head/vgg16-rescale", VGG_RESCALE, "bbbb333344445555", IMAGENET, 0.65, 2),
        _run("train_head/resnet50-native", VGG_NATIVE, "cccc666677778888", UNAVAILABLE, 0, 4),
        _run("train_head/vgg16-native", VGG_NATIVE, "aaaa000011112222", IMAGENET, 0.85, 1),
    ]


def test_table_one_row_per_run_sorted_with_unavailable_and_not_pretrained():
    df = report.table(sample_runs())
    assert list(df["run_name"]) == [  # backbone, preprocessing, then the methods in pipeline order
        "train_head/resnet50-native",
        "train_head/vgg16-native",
        "frozen_end_to_end/vgg16-native",
        "finetune_top/vgg16-native",
        "train_head/vgg16-rescale",
    ]
    unavailable = df.iloc[0]
    assert unavailable["weights"] == "weights unavailable"
    metric_columns = [
        "accuracy",
        "accuracy_lo",
        "accuracy_hi",
        "balanced_accuracy",
        "macro_f1",
        "accuracy[cell_type=mono]",
        "accuracy[cell_type=poly]",
    ]
    assert unavailable[metric_columns].isna().all()
    assert df.iloc[1]["weights"] == "ImageNet (Keras)"
    assert df.iloc[3]["weights"] == "not pretrained"
    assert (df["accuracy_lo"].dropna() <= df["accuracy"].dropna()).all()
    assert df.iloc[1]["weights_checksum"] == "c" * 12 and df.iloc[1]["manifest_sha256"] == "d" * 12


def test_table_rejects_duplicate_run_names():
    runs = sample_runs()
    with pytest.raises(ValueError, match="unique"):
        report.table(runs + runs[:1])


def test_write_outputs(tmp_path):
    import matplotlib.pyplot as plt

    runs = sample_runs()
    agreement = provenance.Parity(parity_max_abs_logit_diff=7.6e-6, parity_val_accuracy_diff=0.0)
    runs[0]["record"] = dataclasses.replace(runs[0]["record"], parity=agreement)
    for run in runs:
        run["mlflow_url"] = f"http://127.0.0.1:5000/#/experiments/1/runs/{run['record'].mlflow_run_id}"
    urls = {
        "group": "http://127.0.0.1:5000/#/experiments/1/runs/g",
        "runs": "http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning",
    }
    written = report.write(runs, tmp_path, urls)

    csv = pd.read_csv(tmp_path / "results.csv")
    assert len(csv) == 5
    row = csv[csv["run_name"] == "train_head/resnet50-native"].iloc[0]
    assert row["weights"] == "weights unavailable" and pd.isna(row["accuracy"])

    md = (tmp_path / "results.md").read_text()
    table_rows = [line for line in md.split("## Parity")[0].splitlines() if line.startswith("| `")]
    assert len(table_rows) == 5
    unavailable_row = next(r for r in table_rows if "resnet50" in r)
    assert "weights unavailable" in unavailable_row
    cells = unavailable_row.split(" | ")[5:-4]  # accuracy .. train seconds
    assert not any(ch.isdigit() for cell in cells for ch in cell), cells
    assert "not pretrained" in next(r for r in table_rows if "finetune_top" in r)
    m = runs[-1]["metrics"]
    lo, hi = m["accuracy_ci95"]
    assert f"{m['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]" in md
    assert f"[this run group]({urls['group']})" in md and f"[all training runs]({urls['runs']})" in md
    assert "[test accuracy](plots/comparison.png)" in md and "[learning curves](plots/learning_curves.png)" in md
    assert unavailable_row.endswith(" | [MLflow](http://127.0.0.1:5000/#/experiments/1/runs/mlflow4) |")
    head_row = next(r for r in table_rows if r.startswith("| `train_head/vgg16-native`"))
    assert head_row.endswith(
        " | [MLflow](http://127.0.0.1:5000/#/experiments/1/runs/mlflow1), "
        "[learning curves](plots/curves_train_head_vgg16-native.png), "
        "[confusion matrix](plots/confusion_train_head_vgg16-native.png) |"
    )

    parity = md.split("## Parity", 1)[1].split("## Audit", 1)[0]
    assert "| `finetune_top/vgg16-native` | 7.60e-06 | +0.0000 |" in parity

    audit = md.split("## Audit", 1)[1]
    for fingerprint in ["aaaa000011112222", "bbbb333344445555"]:
        assert f"`{fingerprint}`" in audit
    assert "caffe mode (`keras.applications.vgg16.preprocess_input`), BGR channel order" in audit
    assert "subtract mean [103.939, 116.779, 123.68] then divide by std [1, 1, 1]" in audit
    assert "`mlflow1`" in audit and "d" * 64 in audit and "f" * 64 in audit
    disagree = audit.split("### Where runs disagree", 1)[1]
    assert "**vgg16, preprocessing:** 2 fingerprints" in disagree
    assert "colour order (BGR vs RGB)" in disagree and "mode (caffe vs rescale)" in disagree
    assert "resnet50" not in disagree  # one run, nothing to disagree with
    assert "weights unavailable (resnet50: no ImageNet weights; put the Keras file in" in audit

    acc = pd.read_csv(tmp_path / "plots" / "accuracy.csv")
    assert list(acc.columns[:1]) == ["run_name"] and {"accuracy", "lo", "hi"} <= set(acc.columns)
    assert len(acc) == 4 and (acc["lo"] <= acc["accuracy"]).all() and (acc["accuracy"] <= acc["hi"]).all()
    labels = dict(zip(acc["run_name"], acc["label"]))
    assert labels["finetune_top/vgg16-native"] == "vgg16 / finetune_top / native (not pretrained)"

    plots = tmp_path / "plots"
    pngs = {p.name for p in plots.glob("*.png")}
    trained = [
        "train_head_vgg16-native",
        "train_head_vgg16-rescale",
        "finetune_top_vgg16-native",
        "frozen_end_to_end_vgg16-native",
    ]
    assert pngs == {
        "learning_curves.png",
        "comparison.png",
        *[f"{kind}_{name}.png" for name in trained for kind in ("confusion", "curves")],
    }
    assert {p.name for p in written if p.suffix == ".png"} == pngs
    for name in pngs:
        path = plots / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 10_000, name
        image = plt.imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 200 and image.std() > 0.05, name


def test_learning_curves_share_separate_accuracy_and_loss_axes():
    """No twin axes: accuracy and loss each on their own axis, one scale across panels."""
    runs = [r for r in sample_runs() if r["history"] is not None]
    runs[1]["history"] = runs[1]["history"].assign(loss=lambda h: 3 * h["loss"])
    fig = report._learning_curves(runs)
    used = [ax for ax in fig.axes if ax.axison]
    accuracy = [ax for ax in used if ax.get_ylabel() == "accuracy"]
    loss = [ax for ax in used if ax.get_ylabel() == "loss"]
    assert len(accuracy) == len(loss) == len(runs) == len(used) / 2
    assert len({ax.get_ylim() for ax in accuracy}) == 1 and len({ax.get_ylim() for ax in loss}) == 1
    assert loss[0].get_ylim()[1] >= 3.0 > accuracy[0].get_ylim()[1] >= 0.9  # loss up to 3, accuracy 0.4-0.9
    assert 0.3 < accuracy[0].get_ylim()[0] < 0.4  # scaled to the curves, not fixed at 0-1


def test_report_shows_every_figure_with_its_interval_and_says_what_binary_maps(tmp_path):
    runs = [r for r in sample_runs() if r["metrics"]]
    task = {"positive_classes": ["defective"], "rule": "defective: defect probability >= 0.5"}
    runs[0]["metrics"] = metrics.compute(
        [0, 1, 1, 0], [0, 1, 0, 0], ["functional", "defective"], groups={"cell_type": list("xyxy")}, binary=task
    )
    df = report.table(runs)
    row = df[df["run_name"] == runs[0]["record"].run_name].iloc[0]
    assert row["binary_accuracy"] == 0.75 and row["binary_accuracy_lo"] <= 0.75 <= row["binary_accuracy_hi"]
    assert (
        row["accuracy[cell_type=x]"] == 0.5
        and row["accuracy[cell_type=x]_lo"] <= 0.5 <= row["accuracy[cell_type=x]_hi"]
    )
    assert df["binary_accuracy"].isna().sum() == len(runs) - 1  # the others were scored without a mapping
    md = report.markdown(df, runs)
    header = next(line for line in md.splitlines() if line.startswith("| run |"))
    for name in ("balanced acc. [95% CI]", "macro-F1 [95% CI]", "binary acc. [95% CI]", "acc.[cell_type=x] [95% CI]"):
        assert f"| {name} |" in header
    m = runs[0]["metrics"]
    lo, hi = m["binary"]["accuracy_ci95"]
    assert f"| 0.750 [{lo:.3f}, {hi:.3f}] |" in md
    lo, hi = m["macro_f1_ci95"]
    assert f"macro-F1 {m['macro_f1']:.3f} [{lo:.3f}, {hi:.3f}]" in md  # the audit too
    assert "Binary accuracy: defective vs every other class (defective: defect probability >= 0.5)" in md
    assert "Binary accuracy: not computed (no positive classes given)." in md
