"""Test accuracy of two pipeline runs side by side, per scored run, with the paired difference and its 95% interval.

Each argument is a copy of a finished pipeline's results/eval/ (benchmarks/precision_pipeline.sh makes them).
Both runs scored the same test images, so the comparison is paired image by image (rows matched on the
manifest id, never on row order): the difference is mean(correct_b - correct_a), its interval a seeded
percentile bootstrap over images. Runs whose test images or labels differ are refused.

    python benchmarks/precision_compare.py A_DIR B_DIR [--names A B]
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from transferlab import layout


def paired(a: pd.DataFrame, b: pd.DataFrame, bootstrap: int = 2000, seed: int = 0) -> dict:
    """Accuracies of two prediction tables of the same test images and their paired difference b - a."""
    if sorted(a["id"]) != sorted(b["id"]) or a["id"].duplicated().any():
        raise ValueError("the two runs did not score the same test images")
    m = a.merge(b, on="id", suffixes=("_a", "_b"))
    if (m["label_a"] != m["label_b"]).any():
        raise ValueError(f"labels differ for {int((m['label_a'] != m['label_b']).sum())} test images")
    ca, cb = (m["pred_a"] == m["label_a"]).to_numpy(float), (m["pred_b"] == m["label_b"]).to_numpy(float)
    d = cb - ca
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(bootstrap, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {
        "n": len(d),
        "accuracy_a": ca.mean(),
        "accuracy_b": cb.mean(),
        "difference": d.mean(),
        "ci95": (float(lo), float(hi)),
        "only_a_right": int((d < 0).sum()),
        "only_b_right": int((d > 0).sum()),
    }


def compare(dir_a: Path, dir_b: Path) -> pd.DataFrame:
    """One row per run scored in both directories."""
    runs = sorted(p.parent.relative_to(dir_a).as_posix() for p in Path(dir_a).rglob(layout.PREDICTIONS))
    rows = []
    for run in runs:
        a, b = (layout.eval_dir(run, d) / layout.PREDICTIONS for d in (dir_a, dir_b))
        if not b.is_file():
            continue
        stats = paired(pd.read_csv(a), pd.read_csv(b))
        rows.append({"run": run, **stats})
    if not rows:
        raise ValueError(f"no run was scored in both {dir_a} and {dir_b}")
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--names", nargs=2, default=None, help="column names for A and B (default: folder names)")
    args = parser.parse_args()
    name_a, name_b = args.names or (args.a.name, args.b.name)
    try:
        table = compare(args.a, args.b)
    except ValueError as error:
        sys.exit(f"precision_compare: {error}")
    width = max(len(r) for r in table["run"])
    print(
        f"{'run':{width}s}  {name_a:>16s}  {name_b:>16s}  {name_b + ' - ' + name_a:>22s}  95% interval (paired)"
        "  only-A-right  only-B-right"
    )
    for r in table.itertuples():
        print(
            f"{r.run:{width}s}  {r.accuracy_a:16.4f}  {r.accuracy_b:16.4f}  {r.difference:+22.4f}  "
            f"[{r.ci95[0]:+.4f}, {r.ci95[1]:+.4f}]  {r.only_a_right:12d}  {r.only_b_right:12d}"
        )
    print(f"(n = {table['n'].iloc[0]} test images per run; interval: bootstrap over images, 2000 resamples)")


if __name__ == "__main__":
    main()
