# Sourced by the scripts that run `dvc exp run` one after another in the workspace (study/pitfalls.sh,
# benchmarks/precision_pipeline.sh). save_workspace keeps params.yaml and dvc.lock in $backup and sets
# restore_workspace as the EXIT trap; restore_workspace puts them back and checks the outputs out of DVC's cache.
save_workspace() {
  backup=$(mktemp -d)
  cp params.yaml "$backup/params.yaml"
  if [[ -f dvc.lock ]]; then cp dvc.lock "$backup/dvc.lock"; fi
  trap restore_workspace EXIT
}

restore_workspace() {
  cp "$backup/params.yaml" params.yaml
  if [[ -f $backup/dvc.lock ]]; then
    cp "$backup/dvc.lock" dvc.lock
    dvc checkout -q || echo "$(basename "$0"): 'dvc checkout' failed; run it to restore the outputs" >&2
  else
    rm -f dvc.lock
  fi
  rm -rf "$backup"
  trap - EXIT
}
