#!/usr/bin/env bash
# Accuracy cost of mixed precision (README, "Precision"): the default pipeline once per precision, every
# stage forced (`dvc exp run -f`, so each wall time is a whole `dvc repro`), then the test accuracy of each
# scored run side by side with the paired difference and its 95% interval (benchmarks/precision_compare.py,
# paired on the same test images through results/eval/<run>/predictions.csv).
#
#   benchmarks/precision_pipeline.sh                     float32 vs auto (the default), ~2 x the default run
#   PRECISIONS="float32 mixed_bfloat16" benchmarks/precision_pipeline.sh
#   OUT=dir                                              where each run's results/eval, reports and times go
#                                                        (default: results/precision_pipeline, git-ignored)
#
# Run it on an otherwise idle machine: the wall times are part of the result. The experiments run one
# after another in the workspace; params.yaml, dvc.lock and the outputs are put back as they were.
set -euo pipefail
cd "$(dirname "$0")/.."

read -ra precisions <<<"${PRECISIONS:-float32 auto}"
[[ ${#precisions[@]} -eq 2 ]] || { echo "PRECISIONS must name two settings" >&2; exit 1; }
OUT=${OUT:-results/precision_pipeline}
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}

source study/workspace.sh
save_workspace

mkdir -p "$OUT"
for p in "${precisions[@]}"; do
  cp "$backup/params.yaml" params.yaml
  echo "== dvc exp run -f --name precision-$p -S compute.precision=$p"
  t0=$(date +%s)
  dvc exp run -f --name "precision-$p" -S "compute.precision=$p"
  seconds=$(( $(date +%s) - t0 ))
  rm -rf "${OUT:?}/$p" && mkdir -p "$OUT/$p"
  cp -r results/eval "$OUT/$p/eval"
  cp reports/results.csv reports/results.md "$OUT/$p/"
  resolved=$(python -c "import pandas as pd; print(*sorted(set(pd.read_csv('reports/results.csv')['precision'].dropna())))")
  echo "$p: resolved to $resolved, whole pipeline ${seconds} s" | tee "$OUT/$p/wall_time.txt"
done

echo
for p in "${precisions[@]}"; do cat "$OUT/$p/wall_time.txt"; done
python benchmarks/precision_compare.py "$OUT/${precisions[0]}/eval" "$OUT/${precisions[1]}/eval" \
  --names "${precisions[0]}" "${precisions[1]}" | tee "$OUT/comparison.txt"
