#!/usr/bin/env bash
# The ELPV full protocol (reports/elpv_benchmark.md): EfficientNet-Lite0 fine-tuned from block4a on images with
# the el_cell augmentation (flips on both axes, 90-degree turns, mild brightness and contrast; train split only),
# Adam 3e-4 with one epoch of linear warm-up then cosine decay over 16 epochs, label smoothing 0.1, batch size 16,
# the epoch with the best validation accuracy kept (early stopping's restored weights), on the paper's 75/25 split
# (data.seed 42); one `dvc exp run` per seed (train.seed), named elpv-<protocol>-s<seed>, up to evaluate.
# The CPU variant pins float32: Lite0's depthwise convolutions have no fast bfloat16 path on either CPU
# measured (README "Precision"), so `auto`'s mixed_bfloat16 made it 1.5x slower on an AMX Xeon.
#
#   study/elpv_protocol.sh                  seeds 0 1 2 on this machine (CPU: 15-20 min per seed on 2 idle cores)
#   SEEDS="0 1 2 3 4" study/elpv_protocol.sh
#   PROTOCOL=gpu study/elpv_protocol.sh     the GPU variant: VGG16 at 224 px fine-tuned from block3_conv1 with
#                                           the el_cell augmentation on images (ResNet50: PROTOCOL=gpu-resnet50,
#                                           when its ImageNet weights are online)
#   CANDIDATE=ema EXTRA="finetune.ema_momentum=0.99" SEEDS=0 study/elpv_protocol.sh
#                                           a candidate: the protocol with EXTRA's overrides, each replacing
#                                           the protocol's value of its key, named elpv-cpu-ema-s0
#   CANDIDATE=refit EXTRA="data.val_fraction=0.02 finetune.early_stopping_patience=0" study/elpv_protocol.sh
#                                           the refit: the chosen recipe on 98% of the training part, all 16
#                                           epochs, scored on the same test images (reports/elpv_benchmark.md)
#   DRY_RUN=1 study/elpv_protocol.sh        print the commands, run nothing
#   RERUN=1 ...                             replace experiments that exist (default: keep them and go on)
#
# Experiments run one after another in the workspace; params.yaml, dvc.lock and the outputs are put back as
# they were at the end (study/workspace.sh). The figures: `python study/elpv_summary.py`, `dvc exp show`,
# results/metrics/ of each experiment, and MLflow (one group run per experiment).
set -euo pipefail
cd "$(dirname "$0")/.."

SEEDS=${SEEDS:-0 1 2}
PROTOCOL=${PROTOCOL:-cpu}
common="data.source=elpv data.seed=42 data.test_fraction=0.25 finetune.methods=[finetune_top]
  finetune.optimizer=adam finetune.lr_schedule=cosine finetune.early_stopping_monitor=val_accuracy"
case $PROTOCOL in
  cpu) settings="extract.backbones=[efficientnet_lite0] extract.preprocessing=[native]
    finetune.backbones=[efficientnet_lite0] finetune.cut_point.efficientnet_lite0=block4a finetune.epochs=16
    finetune.learning_rate=0.0003 finetune.warmup_epochs=1 finetune.early_stopping_patience=16
    finetune.augmentation=el_cell finetune.label_smoothing=0.1 finetune.batch_size=16 compute.precision=float32" ;;
  gpu) settings="extract.backbones=[vgg16] extract.preprocessing=[native] extract.input_size.vgg16=224
    finetune.backbones=[vgg16] finetune.cut_point.vgg16=block3_conv1 finetune.epochs=30
    finetune.warmup_epochs=2 finetune.early_stopping_patience=8 finetune.augmentation=el_cell
    finetune.learning_rate=0.0001" ;;
  gpu-resnet50) settings="extract.backbones=[resnet50] extract.preprocessing=[native] extract.input_size.resnet50=224
    finetune.backbones=[resnet50] finetune.cut_point.resnet50=conv4 finetune.epochs=30 finetune.warmup_epochs=2
    finetune.early_stopping_patience=8 finetune.augmentation=el_cell finetune.learning_rate=0.0001" ;;
  *) echo "unknown PROTOCOL '$PROTOCOL'; known: cpu gpu gpu-resnet50" >&2; exit 2 ;;
esac

# one line for read (it stops at a newline), which splits on whitespace without globbing the brackets
read -ra overrides <<<"$(tr '\n' ' ' <<<"$common $settings")"  # each key once (tests/test_elpv_protocol.py)
read -ra extra <<<"${EXTRA:-}"
if [[ ${#extra[@]} -gt 0 && -z ${CANDIDATE:-} ]]; then
  echo "EXTRA changes the recipe: name the candidate with CANDIDATE=... (its runs: elpv-$PROTOCOL-<CANDIDATE>-s<seed>)" >&2
  exit 2
fi
for e in "${extra[@]}"; do  # a candidate's override replaces the protocol's value of the same key
  kept=(); for p in "${overrides[@]}"; do [[ ${p%%=*} == "${e%%=*}" ]] || kept+=("$p"); done
  overrides=("${kept[@]}" "$e")
done
tag=$PROTOCOL${CANDIDATE:+-$CANDIDATE}
command_for() {  # seed -> the dvc command in $cmd; evaluate, not export: the protocol registers no champion
  cmd=(dvc exp run evaluate --name "elpv-$tag-s$1" -S "train.seed=$1")
  for p in "${overrides[@]}"; do cmd+=(-S "$p"); done
}

if [[ -n ${DRY_RUN:-} ]]; then
  for seed in $SEEDS; do command_for "$seed"; printf '%q ' "${cmd[@]}"; echo; done
  exit 0
fi

export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}
source study/workspace.sh
save_workspace
existing=$(dvc exp list --name-only 2>/dev/null || true)
start=$SECONDS
for seed in $SEEDS; do
  command_for "$seed"
  name="elpv-$tag-s$seed"
  if grep -qx "$name" <<<"$existing"; then
    if [[ -z ${RERUN:-} ]]; then echo "$name exists, kept (RERUN=1 replaces it)"; continue; fi
    dvc exp remove "$name"
  fi
  cp "$backup/params.yaml" params.yaml
  echo "$(printf '%q ' "${cmd[@]}")"
  t0=$SECONDS
  "${cmd[@]}"
  echo "$name done in $((SECONDS - t0)) s (protocol so far: $(( (SECONDS - start) / 60 )) min)"
done
restore_workspace
