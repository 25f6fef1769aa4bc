"""The ELPV protocol's figures per seed and their mean with a t-interval (reports/elpv_benchmark.md).

Reads each experiment's DVC metrics file (results/metrics/<run>.json, written by evaluate) and run record
from DVC (`dvc exp run` outputs, no checkout), and prints a markdown table: 4-class accuracy, the
literature's binary defective-vs-functional accuracy (evaluate.positive_classes auto: a defect probability
>= 0.5, i.e. likely_defective or defective, is defective), balanced accuracy, macro-F1, accuracy per cell
type, and the validation accuracy of the epoch kept.

  python study/elpv_summary.py                       every experiment named elpv-cpu-s<seed>
  python study/elpv_summary.py --protocol gpu        elpv-gpu-s<seed>
  python study/elpv_summary.py --run finetune_top/efficientnet_lite0-native EXP [EXP ...]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess

import dvc.api
import pandas as pd

from transferlab import layout, metrics

RUNS = {
    "cpu": layout.run_name("finetune_top", "efficientnet_lite0", "native"),
    "gpu": layout.run_name("finetune_top", "vgg16", "native"),
    "gpu-resnet50": layout.run_name("finetune_top", "resnet50", "native"),
}
FIGURES = ("accuracy", "binary_accuracy", "balanced_accuracy", "macro_f1")


def figures(exp: str, run: str) -> dict:
    read = lambda path: json.loads(dvc.api.read(str(path), repo=".", rev=exp))  # noqa: E731
    scored, record = read(layout.metrics_file(run)), read(layout.run_dir(run) / layout.RUN_RECORD)
    out = {"experiment": exp, "epoch_chosen": record["epoch_chosen"], "train_seconds": record["train_seconds"]}
    out.update({f: scored[f] for f in FIGURES})
    out.update({f"accuracy_{kind}": v["accuracy"] for kind, v in scored.get("cell_type", {}).items()})
    return {**out, "val_accuracy": record["val_accuracy"]}


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

    def interval(values) -> str:
        t = metrics.t_interval(values)
        return f"{t['mean']:.3f}" if t["n"] < 2 else f"{t['mean']:.3f} [{t['lo']:.3f}, {t['hi']:.3f}]"

    title = f"mean [95% t-interval, {len(rows)} seeds]"
    seconds = rows["train_seconds"].mean()
    print(f"| {title} | | {seconds:.0f} | " + " | ".join(interval(rows[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
