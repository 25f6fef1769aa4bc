#!/usr/bin/env bash
# Linear probe (README, "Checking the weights on natural photos"): VGG16 `native` features of a
# folder of natural photos, one subfolder per class (e.g. Imagenette), and a linear classifier on
# them, scored on the held-out test split. Real ImageNet weights with their own preprocessing land
# far above chance; random or mis-converted weights land near it.
#
#   study/linear_probe.sh /data/imagenette2-160/train
#   study/linear_probe.sh FOLDER -S extract.input_size.vgg16=224     more `dvc exp run` options
#   PROBE_NAME=my-probe study/linear_probe.sh FOLDER                  experiment name (default: linear-probe-<time>)
#
# It is one `dvc exp run evaluate --temp` of the pipeline with only its own params changed (up to evaluate: a
# probe is never exported or registered), so the workspace, params.yaml and dvc.lock are not touched;
# `dvc exp show` lists it beside the other experiments.
set -euo pipefail
if [[ $# -lt 1 || ! -d $1 ]]; then
  echo "usage: study/linear_probe.sh FOLDER [dvc exp run options]  (FOLDER: one subfolder of images per class)" >&2
  exit 2
fi
folder=$(cd "$1" && pwd)
shift
cd "$(dirname "$0")/.."

name=${PROBE_NAME:-linear-probe-$(date +%Y%m%d-%H%M%S)}
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}
dvc exp run evaluate --temp --name "$name" -S data.source=folder -S "data.folder=$folder" \
  -S 'extract.backbones=[vgg16]' -S 'extract.preprocessing=[native]' -S 'finetune.methods=[]' \
  -S head.units=0 -S head.dropout=0 "$@"

# the experiment's per-run metrics files (results/metrics/) and params, as `dvc exp show` holds them
read -r -d '' summary <<'PY' || true
import json, sys
from transferlab import layout
name = sys.argv[1]
(rev,) = [rev for baseline in json.load(sys.stdin) for exp in baseline.get("experiments") or []
          for rev in exp.get("revs") or [] if rev.get("name") == name]
prefix = layout.METRICS.as_posix() + "/"
metrics = {path[len(prefix):-len(".json")]: content.get("data") or content
           for path, content in rev["data"]["metrics"].items() if path.startswith(prefix)}
params = rev["data"]["params"]["params.yaml"]["data"]
size = params["extract"]["input_size"]["vgg16"]
if not metrics:
    sys.exit(f"{name}: no run was scored (weights unavailable?); see the stage output above")
for run, m in metrics.items():
    if "accuracy" not in m:
        sys.exit(f"{name}: {run} has no result ({m}); see its stage output above")
    print(f"{name}: {run}, {params['data']['folder']}, input size {size} px")
    print(f"  test accuracy {m['accuracy']:.3f} (always guessing the largest class: {m['majority_class_accuracy']:.3f})")
    print(f"  balanced accuracy {m['balanced_accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}")
PY
dvc exp show --json | python -c "$summary" "$name"
