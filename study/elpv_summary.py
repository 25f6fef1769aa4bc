"""The ELPV protocol's figures per seed and their mean with a t-interval (reports/elpv_benchmark.md).

Reads each experiment's predictions, run record and split manifest from DVC (`dvc exp run` outputs, no
checkout), and prints a markdown table: 4-class accuracy, the literature's binary defective-vs-functional
accuracy (a predicted class whose defect probability is >= 0.5, i.e. likely_defective or defective, counts as
defective), balanced accuracy, macro-F1, accuracy per cell type, the validation accuracy of the epoch kept.

  python study/elpv_summary.py                       every experiment named elpv-cpu-s<seed>
  python study/elpv_summary.py --protocol gpu        elpv-gpu-s<seed>
  python study/elpv_summary.py --run finetune_top/efficientnet_lite0-native EXP [EXP ...]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import subprocess

import dvc.api
import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, f1_score

DEFECTIVE = ("likely_defective", "defective")  # defect probability 2/3 and 1
RUNS = {"cpu": "finetune_top/efficientnet_lite0-native", "gpu": "finetune_top/vgg16-native"}
RUNS["gpu-resnet50"] = "finetune_top/resnet50-native"


def figures(exp: str, run: str) -> dict:
    read = lambda path: dvc.api.read(path, repo=".", rev=exp)  # noqa: E731
    classes = json.loads(read("data/split/classes.json"))["classes"]
    pred = pd.read_csv(io.StringIO(read(f"results/eval/{run}/predictions.csv")))
    manifest = pd.read_csv(io.StringIO(read("data/split/manifest.csv")), dtype={"id": str})
    record = json.loads(read(f"runs/{run}/run.json"))
    y, p = pred["label"].to_numpy(), pred["pred"].to_numpy()
    defective = np.isin(np.asarray(classes), DEFECTIVE)
    out = {
        "experiment": exp,
        "val_accuracy": record["val_accuracy"],
        "epoch_chosen": record.get("epoch_chosen"),
        "train_seconds": record["train_seconds"],
        "accuracy": float(np.mean(y == p)),
        "binary_accuracy": float(np.mean(defective[y] == defective[p])),
        "balanced_accuracy": float(balanced_accuracy_score(y, p)),
        "macro_f1": float(f1_score(y, p, average="macro")),
    }
    if "cell_type" in manifest:
        cell = pred["id"].map(manifest.set_index("id")["cell_type"])
        for kind in sorted(cell.dropna().unique()):
            out[f"accuracy_{kind}"] = float(np.mean((y == p)[cell.to_numpy() == kind]))
    return out


def t_interval(values) -> str:
    x = np.asarray(values, float)
    if len(x) < 2:
        return f"{x.mean():.3f}"
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return f"{x.mean():.3f} [{x.mean() - half:.3f}, {x.mean() + half:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="*")
    parser.add_argument("--protocol", default="cpu", choices=sorted(RUNS))
    parser.add_argument("--run", help="the scored run to summarise (default: the protocol's finetune_top run)")
    args = parser.parse_args()
    exps = args.experiments or sorted(
        name
        for name in subprocess.run(
            ["dvc", "exp", "list", "--name-only"], capture_output=True, text=True, check=True
        ).stdout.split()
        if re.fullmatch(rf"elpv-{re.escape(args.protocol)}-s\d+", name)
    )
    if not exps:
        raise SystemExit(f"no experiment elpv-{args.protocol}-s<seed>; run study/elpv_protocol.sh first")
    rows = pd.DataFrame([figures(e, args.run or RUNS[args.protocol]) for e in exps])
    columns = [c for c in rows.columns if c not in ("experiment", "epoch_chosen", "train_seconds")]
    print("| experiment | epoch kept | train s | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 3) + "|")
    for _, r in rows.iterrows():
        cells = [f"{r[c]:.3f}" for c in columns]
        print(f"| `{r['experiment']}` | {r['epoch_chosen']} | {r['train_seconds']:.0f} | " + " | ".join(cells) + " |")
    t = f"mean [95% t-interval, {len(rows)} seeds]"
    print(f"| {t} | | {rows['train_seconds'].mean():.0f} | " + " | ".join(t_interval(rows[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
