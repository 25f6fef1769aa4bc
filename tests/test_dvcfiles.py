"""The files DVC reads: a flat metrics file per scored run, long per-epoch curves, confusion pairs."""

import json

import numpy as np
import pandas as pd
from helpers import run_record

from transferlab import dvcfiles, metrics


def scored(name, y_true, y_pred, val_accuracy=0.5):
    history = pd.DataFrame(
        {
            "epoch": [1, 2],
            "loss": [0.9, 0.7],
            "accuracy": [0.5, 0.6],
            "val_loss": [1.0, 0.8],
            "val_accuracy": [0.4, val_accuracy],
        }
    )
    return {
        "record": run_record(name, val_accuracy=val_accuracy),
        "metrics": metrics.compute(y_true, y_pred, ["good", "cracked", "dark"], bootstrap=100),
        "history": history,
    }


def test_one_flat_file_per_scored_run_and_nothing_stale(tmp_path):
    y_true, y_pred = np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 1, 1, 2, 2])
    runs = [
        scored("train_head/vgg16-native", y_true, y_pred),
        scored("finetune_top/vgg16-native", y_true, y_true, val_accuracy=0.75),
        {
            "record": run_record("train_head/resnet50-native", status="unavailable"),
            "metrics": None,
            "history": None,
        },
    ]
    stale = tmp_path / "metrics" / "train_head" / "old-run.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    dvcfiles.write(runs, tmp_path / "metrics", tmp_path / "plots")

    written = sorted(p.relative_to(tmp_path / "metrics").as_posix() for p in (tmp_path / "metrics").rglob("*.json"))
    assert written == ["finetune_top/vgg16-native.json", "train_head/vgg16-native.json"]  # no row when unavailable
    head = json.loads((tmp_path / "metrics/train_head/vgg16-native.json").read_text())
    assert list(head) == sorted(dvcfiles.KEYS)
    assert head["accuracy"] == round(4 / 6, 4) and head["majority_class_accuracy"] == 0.5
    assert head["accuracy_ci95_lo"] <= head["accuracy"] <= head["accuracy_ci95_hi"]
    assert json.loads((tmp_path / "metrics/finetune_top/vgg16-native.json").read_text())["val_accuracy"] == 0.75

    pairs = pd.read_csv(tmp_path / "plots/confusion/train_head/vgg16-native.csv")
    names = np.array(["good", "cracked", "dark"])
    assert sorted(zip(pairs["actual"], pairs["predicted"])) == sorted(zip(names[y_true], names[y_pred]))
    assert not (tmp_path / "plots/confusion/train_head/resnet50-native.csv").exists()

    curves = pd.read_csv(tmp_path / "plots/curves.csv")
    assert len(curves) == 2 * 2 * 2  # two runs with a history x train/val x two epochs
    val = curves[(curves["run"] == "finetune_top/vgg16-native") & (curves["split"] == "val")]
    assert val["epoch"].tolist() == [1, 2] and val["accuracy"].tolist() == [0.4, 0.75]
    assert val["loss"].tolist() == [1.0, 0.8]


def test_metrics_files_hold_every_figure_with_its_interval_and_the_groups_nested():
    y_true, y_pred = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 2, 0])
    m = metrics.compute(
        y_true,
        y_pred,
        ["good", "cracked", "dark"],
        {"cell type": list("mmppmp")},
        binary={"positive_classes": ["dark"]},
    )
    flat = dvcfiles.run_metrics(run_record("train_head/vgg16-native", val_accuracy=0.5), m)
    binary = ["binary_accuracy", "binary_accuracy_ci95_lo", "binary_accuracy_ci95_hi"]
    assert list(flat) == [*dvcfiles.KEYS, *binary, "cell_type"]  # a group name DVC's dotted columns can hold
    for figure, value, (lo, hi) in [
        ("balanced_accuracy", m["balanced_accuracy"], m["balanced_accuracy_ci95"]),
        ("macro_f1", m["macro_f1"], m["macro_f1_ci95"]),
        (
            "binary_accuracy",
            5 / 6,
            m["binary"]["accuracy_ci95"],
        ),  # dark vs the rest: only the dark predicted good differs
    ]:
        assert flat[figure] == round(value, 4)
        assert [flat[f"{figure}_ci95_lo"], flat[f"{figure}_ci95_hi"]] == [round(lo, 4), round(hi, 4)]
    lo, hi = m["group_accuracy_ci95"]["cell type"]["m"]
    assert flat["cell_type"]["m"] == {
        "accuracy": round(2 / 3, 4),
        "accuracy_ci95_lo": round(lo, 4),
        "accuracy_ci95_hi": round(hi, 4),
    }
    skipped = dvcfiles.run_metrics(
        run_record("train_head/vgg16-native"), metrics.compute(y_true, y_pred, ["good", "cracked", "dark"])
    )
    assert list(skipped) == list(dvcfiles.KEYS)  # no binary keys where the dataset has no binary mapping
