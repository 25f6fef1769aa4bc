"""dvc.yaml must name every source file a stage runs, or DVC's cache would serve stale results."""

import ast
import re

import pytest
import yaml
from helpers import ROOT

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
# Backbone constructors are imported by name from the registry (backbones.Backbone.build).
DYNAMIC = {"transferlab/backbones.py": {"transferlab/efficientnet_lite.py"}}


def imported(path: str, seen: set) -> set:
    """transferlab modules a file imports, transitively."""
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("transferlab"):
            names = [f"{node.module}.{a.name}" if node.module == "transferlab" else node.module for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("transferlab.")]
        for name in names:
            module = name.replace(".", "/") + ".py"
            if (ROOT / module).exists() and module not in seen:
                seen.add(module)
                seen |= DYNAMIC.get(module, set())
                imported(module, seen)
    return seen


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_depends_on_all_the_code_it_runs(name):
    stage = STAGES[name].get("do", STAGES[name])
    script = re.search(r"python (stages/\w+\.py)", stage["cmd"]).group(1)
    deps = {d for d in stage["deps"] if isinstance(d, str)}
    needed = {script} | imported(script, set())
    assert needed <= deps, f"{name}: add to deps: {sorted(needed - deps)}"
    stale = {d for d in deps if d.endswith(".py")} - needed
    assert not stale, f"{name}: deps it does not use: {sorted(stale)}"


def test_finetune_depends_on_every_finetune_param():
    """finetune lists its section key by key (so another backbone's cut point leaves it current): a key
    added to the section but not here would change results without re-running the stage."""
    listed = set(STAGES["finetune"]["params"])
    section = yaml.safe_load((ROOT / "params.yaml").read_text())["finetune"]
    missing = {f"finetune.{k}" for k in section if k != "cut_point"} - listed
    assert not missing, f"finetune: add to params: {sorted(missing)}"
    assert "finetune.cut_point.${item.backbone}" in listed and "finetune.cut_point" not in listed


def test_git_tracks_no_lock_file_and_no_stage_output():
    """A committed dvc.lock names output hashes that no clone can fetch (there is no DVC remote) and goes
    stale as dvc.yaml changes: one restored from git by the study scripts listed outputs the stages no
    longer write, and `dvc checkout` refused to run. Outputs belong to DVC's cache, never to git."""
    import subprocess

    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    tracked = set(listed.stdout.splitlines())
    outs = set()
    for stage in STAGES.values():
        stage = stage.get("do", stage)
        for out in [*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])]:
            path = next(iter(out)) if isinstance(out, dict) else out
            outs.add(path.split("${")[0].rstrip("/"))
    assert "dvc.lock" not in tracked
    inside = sorted(f for f in tracked for out in outs if f == out or f.startswith(out + "/"))
    assert not inside, f"stage outputs tracked by git: {inside}"
