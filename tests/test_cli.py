"""Every stage script has the same command line (transferlab.cli), and finetune's plan is decided in the library."""

import runpy
import sys
from types import SimpleNamespace

import pytest
import yaml
from helpers import ROOT

from transferlab import backbones, cli, layout
from transferlab import finetune as planning
from transferlab.params import load as load_params

STAGES = sorted(p.stem for p in (ROOT / "stages").glob("*.py"))


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_answers_help_with_its_docstring(stage, monkeypatch, capsys):
    script = ROOT / "stages" / f"{stage}.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: stages/{stage}.py")
    doc = runpy.run_path(str(script))["__doc__"]
    assert doc.strip().splitlines()[0] in out


def test_arguments_are_checked_before_params_are_read(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: a bad argument must be reported first
    with pytest.raises(SystemExit) as done:
        cli.run("x", lambda params, backbone: None, "doc", {"backbone": ["vgg16"]}, argv=["resnet"])
    assert done.value.code == 2
    assert "argument BACKBONE: invalid choice: 'resnet'" in capsys.readouterr().err


def test_params_are_loaded_once_and_user_errors_become_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    seen = []

    def main(params, backbone):
        seen.append((params["train"]["seed"], backbone))
        raise FloatingPointError("train loss is nan at epoch 2")

    with pytest.raises(SystemExit) as done:
        cli.run("train_head", main, "doc", {"backbone": ["vgg16"]}, (FloatingPointError,), argv=["vgg16"])
    assert done.value.code == "train_head: train loss is nan at epoch 2"  # printed as one line, exit status 1
    assert seen == [(0, "vgg16")]
    with pytest.raises(KeyError):  # anything else is a bug: it keeps its traceback
        cli.run("x", lambda params: {}["missing"], "doc", errors=(FloatingPointError,), argv=[])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {}}))
    with pytest.raises(SystemExit) as done:
        cli.run("x", lambda params: None, "doc", argv=[])
    assert str(done.value.code).startswith("x: ") and "bad value(s) in params.yaml" in str(done.value.code)


META = SimpleNamespace(input_size=128)  # plan reads only the features record's input size


def params(**ablation) -> dict:
    p = load_params(ROOT / "params.yaml")
    p["ablation"].update(ablation)
    return p


def test_finetune_plan_frozen_end_to_end_takes_trains_settings():
    p = params()
    plan = planning.plan("frozen_end_to_end", "vgg16", p, META)
    assert plan.run_name == layout.run_name("frozen_end_to_end", "vgg16", p["finetune"]["preprocessing"])
    assert (plan.section, plan.cfg, plan.batch_size) == ("train", p["train"], p["train"]["batch_size"])
    assert plan.boundary is None and not plan.cached and not plan.trained_head
    assert plan.head_cfg == p["head"] and plan.input_size == 128 and plan.seed == p["train"]["seed"]


def test_finetune_plan_finetune_top_uses_the_cache_unless_the_images_differ():
    p = params()
    plan = planning.plan("finetune_top", "vgg16", p, META)
    own_cut = {**p["finetune"], "cut_point": p["finetune"]["cut_point"]["vgg16"]}  # this backbone's only
    assert (plan.section, plan.cfg) == ("finetune", own_cut)
    assert plan.boundary == backbones.REGISTRY["vgg16"].cut_points[p["finetune"]["cut_point"]["vgg16"]]
    assert plan.cached and plan.trained_head
    assert not planning.plan("finetune_top", "vgg16", params(augmentation="train"), META).cached
    resized = planning.plan("finetune_top", "vgg16", params(input_size=160), META)
    assert not resized.cached and resized.input_size == 160
    ablated = planning.plan("finetune_top", "vgg16", params(batch_size=1, dropout_position="before_dense"), META)
    assert ablated.batch_size == 1 and ablated.head_cfg["dropout_position"] == "before_dense"


def test_finetune_plan_records_the_seed_and_the_head_each_method_depends_on():
    """Runs at seeds 0 and 1 must not look alike in run.json and MLflow: finetune_top trains with train.seed."""
    p = params()
    top = planning.plan("finetune_top", "vgg16", p, META)
    assert top.recorded["train"] == p["train"] and top.recorded["train"]["seed"] == p["train"]["seed"]
    assert top.recorded["finetune"] == top.cfg and top.recorded["head"] == top.head_cfg
    assert top.recorded["cut_boundary"] == top.boundary and top.recorded["ablation"] == p["ablation"]
    p["train"]["seed"], p["finetune"]["head_init"] = 3, "random"
    random_head = planning.plan("finetune_top", "vgg16", p, META)
    assert random_head.recorded["train"] == {"seed": 3}  # no train_head settings behind a random head
    frozen = planning.plan("frozen_end_to_end", "vgg16", p, META)
    assert frozen.recorded["train"] == p["train"] and "finetune" not in frozen.recorded
    assert frozen.recorded["cut_boundary"] is None
