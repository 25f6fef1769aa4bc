#!/usr/bin/env bash
# The pitfall study (README, "Pitfall study"): one `dvc exp run` per setting and seed, named
# pitfall-<setting>-s<seed>, using only the pipeline's own switches; then study/pitfalls_report.py
# writes reports/pitfalls.md and reports/pitfalls.png.
#
#   study/pitfalls.sh                        every default setting, seeds 0 1 2 (~2 h on 2 CPU cores)
#   study/pitfalls.sh correct bn-training    only these settings
#   SEEDS="0 1" study/pitfalls.sh ...        other seeds
#   DRY_RUN=1 study/pitfalls.sh              print the commands, run nothing
#   RERUN=1 study/pitfalls.sh ...            replace experiments that exist (default: keep them, so an
#                                            interrupted study resumes where it stopped); unchanged stages
#                                            still come from DVC's run-cache
#   STUDY_PARAMS="k=v k=v ..."               replace the study-wide settings (study/pitfalls.yaml)
#   NO_REPORT=1                              skip the report
#
# Experiments run one after another in the workspace. Each starts from the params.yaml the script
# found (so -S changes never accumulate), and at the end params.yaml, dvc.lock and the outputs are
# put back as they were (`dvc checkout` from the cache).
set -euo pipefail
cd "$(dirname "$0")/.."

# The settings, the study-wide params and the seeds are defined once, in study/pitfalls.yaml (which
# study/pitfalls_report.py reads too): DEFAULT_SEEDS, DEFAULT_STUDY_PARAMS, DEFAULT_SETTINGS,
# OPTIONAL_SETTINGS and SETTING_PARAMS (setting -> its params on top of the study-wide ones).
settings_sh=$(python study/pitfalls_settings.py)
eval "$settings_sh"
SEEDS=${SEEDS:-$DEFAULT_SEEDS}
STUDY_PARAMS=${STUDY_PARAMS:-$DEFAULT_STUDY_PARAMS}

setting_params() {
  if [[ -z ${SETTING_PARAMS[$1]+set} ]]; then
    echo "unknown setting '$1'; known: $DEFAULT_SETTINGS $OPTIONAL_SETTINGS" >&2
    return 1
  fi
  echo "${SETTING_PARAMS[$1]}"
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
