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
