#!/usr/bin/env bash
# The pitfall study (README, "Pitfall study"): one `dvc exp run` per setting and seed, named
# pitfall-<setting>-s<seed>, using only the pipeline's own switches; then study/pitfalls_report.py
# writes reports/pitfalls.md and reports/pitfalls.png.
#
#   study/pitfalls.sh                        every default setting, seeds 0 1 2 (~1 h on 2 CPU cores)
#   study/pitfalls.sh correct bn-training    only these settings
#   SEEDS="0 1" study/pitfalls.sh ...        other seeds
#   DRY_RUN=1 study/pitfalls.sh              print the commands, run nothing
#   RERUN=1 study/pitfalls.sh ...            replace experiments that exist (default: keep them, so an
#                                            interrupted study resumes where it stopped); unchanged stages
#                                            still come from DVC's run-cache
#   STUDY_PARAMS="k=v k=v ..."               replace the study-wide settings below
#   NO_REPORT=1                              skip the report
#
# Experiments run one after another in the workspace. Each starts from the params.yaml the script
# found (so -S changes never accumulate), and at the end params.yaml, dvc.lock and the outputs are
# put back as they were (`dvc checkout` from the cache).
set -euo pipefail
cd "$(dirname "$0")/.."

SEEDS=${SEEDS:-0 1 2}
# Study-wide, the same for both arms of every comparison: fine-tune only EfficientNet-Lite0 (the
# BatchNorm network with offline weights) and fewer epochs (defaults: 6 and 4), to keep the study near
# an hour. ~45 min: STUDY_PARAMS="finetune.backbones=[efficientnet_lite0] train.epochs=2 finetune.epochs=2"
# and leave out the bs1 control.
# the BatchNorm network with offline weights, from the registry (has_batchnorm, offline_source)
BN_NET=$(python -c 'from transferlab import backbones; print(backbones.offline_batchnorm())')
STUDY_PARAMS=${STUDY_PARAMS:-finetune.backbones=[$BN_NET] train.epochs=3 finetune.epochs=2}
DEFAULT_SETTINGS="correct bn-training bs1 bn-training-bs1 dropout-before-dense augment-train
  augment-train-and-val head-random adam-1e-3 input-size-229"
OPTIONAL_SETTINGS="vgg16-correct vgg16-input-size-160"  # VGG16 fine-tuning: +~6 min, re-extracts features

# The params that make each setting, on top of the study-wide ones. finetune.methods only selects
# which stages run: settings that change both methods share one experiment per seed.
setting_params() {
  case $1 in
    correct)               echo "finetune.methods=[frozen_end_to_end,finetune_top]" ;;
    bn-training)           echo "finetune.methods=[frozen_end_to_end,finetune_top] ablation.bn_training=true" ;;
    bs1)                   echo "finetune.methods=[frozen_end_to_end] ablation.batch_size=1" ;;
    bn-training-bs1)       echo "finetune.methods=[frozen_end_to_end] ablation.bn_training=true" \
                                "ablation.batch_size=1" ;;
    dropout-before-dense)  echo "finetune.methods=[frozen_end_to_end] ablation.dropout_position=before_dense" ;;
    augment-train)         echo "finetune.methods=[frozen_end_to_end,finetune_top] ablation.augmentation=train" ;;
    augment-train-and-val) echo "finetune.methods=[finetune_top] ablation.augmentation=train_and_val" ;;
    head-random)           echo "finetune.methods=[finetune_top] finetune.head_init=random" ;;
    adam-1e-3)             echo "finetune.methods=[finetune_top] finetune.optimizer=adam" \
                                "finetune.learning_rate=0.001" ;;
    input-size-229)        echo "finetune.methods=[finetune_top] ablation.input_size=229" ;;
    vgg16-correct)         echo "finetune.backbones=[vgg16] finetune.methods=[finetune_top]" ;;
    vgg16-input-size-160)  echo "finetune.backbones=[vgg16] finetune.methods=[finetune_top] ablation.input_size=160" ;;
    *) echo "unknown setting '$1'; known: $DEFAULT_SETTINGS $OPTIONAL_SETTINGS" >&2; return 1 ;;
  esac
}

settings=${*:-$DEFAULT_SETTINGS}
for setting in $settings; do setting_params "$setting" >/dev/null; done  # fail on a typo before any run

# `read -ra` splits on whitespace without globbing the brackets in list values
read -ra study <<<"$STUDY_PARAMS"
command_for() {  # setting seed -> the dvc command as an array in $cmd
  local extra
  read -ra extra <<<"$(setting_params "$1")"
  cmd=(dvc exp run evaluate --name "pitfall-$1-s$2" -S "train.seed=$2")  # not export: no study model becomes the champion
  for p in "${study[@]}" "${extra[@]}"; do cmd+=(-S "$p"); done  # later -S win: setting over study-wide
}

if [[ -n ${DRY_RUN:-} ]]; then
  for setting in $settings; do for seed in $SEEDS; do
    command_for "$setting" "$seed"; printf '%q ' "${cmd[@]}"; echo
  done; done
  exit 0
fi

export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}
source study/workspace.sh
save_workspace

existing=$(dvc exp list --name-only 2>/dev/null || true)
total=$(( $(wc -w <<<"$settings") * $(wc -w <<<"$SEEDS") ))
i=0 start=$SECONDS
for setting in $settings; do
  for seed in $SEEDS; do
    i=$((i + 1))
    name="pitfall-$setting-s$seed"
    if grep -qx "$name" <<<"$existing"; then
      if [[ -z ${RERUN:-} ]]; then echo "[$i/$total] $name exists, kept (RERUN=1 replaces it)"; continue; fi
      dvc exp remove "$name"
    fi
    cp "$backup/params.yaml" params.yaml
    command_for "$setting" "$seed"
    echo "[$i/$total] $(printf '%q ' "${cmd[@]}")"
    t0=$SECONDS
    "${cmd[@]}"
    echo "[$i/$total] $name done in $((SECONDS - t0)) s (study so far: $(( (SECONDS - start) / 60 )) min)"
  done
done

restore_workspace
[[ -n ${NO_REPORT:-} ]] || python study/pitfalls_report.py
