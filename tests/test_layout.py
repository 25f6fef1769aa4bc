"""dvc.yaml and transferlab.layout must agree: every rendered stage declares exactly the paths the
layout gives for its (method, backbone, preprocessing), and the training stages are the planned runs."""

import shlex
import shutil

import dvc.repo
import pytest
import yaml
from helpers import ROOT

from transferlab import layout
from transferlab.params import load as load_params


def expected(stage: str, args: list[str], params: dict) -> tuple[set, set]:
    """(outs, data deps) of one stage instance, from the layout alone."""
    pre = params["finetune"]["preprocessing"]
    if stage == "split":
        return {layout.SPLIT}, set()
    if stage == "weights":
        (backbone,) = args
        return {layout.weights_dir(backbone)}, set()
    if stage == "selftest":
        return {layout.SELFTEST_RESULTS, layout.SELFTEST_REPORT}, {layout.WEIGHTS}
    if stage == "extract_features":
        backbone, variant = args
        return (
            {layout.features_dir(backbone, variant), layout.extract_speed(backbone, variant)},
            {layout.SPLIT, layout.weights_dir(backbone), layout.SELFTEST_RESULTS},
        )
    if stage == "extract_cut":
        (backbone,) = args
        return {layout.cut_dir(backbone, pre)}, {layout.SPLIT, layout.WEIGHTS, layout.SELFTEST_RESULTS}
    if stage == "train_head":
        name = layout.run_name(layout.TRAIN_HEAD, *args)
        return {layout.run_dir(name), layout.live_dir(name)}, {layout.features_dir(*args)}
    if stage == "finetune":
        method, backbone = args
        name = layout.run_name(method, backbone, pre)
        head = layout.run_dir(layout.run_name(layout.TRAIN_HEAD, backbone, pre))
        return (
            {layout.run_dir(name), layout.live_dir(name)},
            {
                layout.SPLIT,
                layout.weights_dir(backbone),
                layout.features_dir(backbone, pre),
                layout.cut_dir(backbone, pre),
                head,
            },
        )
    if stage == "evaluate":
        return (
            {layout.EVAL, layout.PLOTS, layout.RESULTS_TABLE, layout.RESULTS_CSV, layout.METRICS},
            {layout.RUNS, layout.FEATURES, layout.SPLIT, layout.WEIGHTS},
        )
    if stage == "export":
        return {layout.EXPORT}, {layout.RUNS, layout.EVAL, layout.SPLIT, layout.WEIGHTS}
    raise AssertionError(f"a stage the layout does not know: {stage}")


def rendered(repo_dir) -> list[tuple[str, list[str], set, set]]:
    """(stage script, its arguments, outs, data deps) of every stage instance DVC renders."""
    found = []
    with dvc.repo.Repo(str(repo_dir)) as repo:
        for stage in repo.index.stages:
            python, script, *args = shlex.split(stage.cmd)
            assert python == "python" and script.startswith("stages/"), stage.cmd
            outs = {o.def_path for o in stage.outs}
            deps = {d.def_path for d in stage.deps if not d.def_path.endswith(".py") and d.def_path != "params.yaml"}
            found.append((script.removeprefix("stages/").removesuffix(".py"), args, outs, deps))
    return found


def other_params() -> dict:
    """Another grid: other backbones, only `rescale`, fine-tuning on it with one method."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["extract"].update(backbones=["resnet50", "efficientnet_lite0"], preprocessing=["rescale"])
    params["finetune"].update(backbones=["efficientnet_lite0"], preprocessing="rescale", methods=["finetune_top"])
    return params


@pytest.fixture(params=["params.yaml", "other grid"])
def project(request, tmp_path):
    """A DVC project with this checkout's dvc.yaml and either its params.yaml or another grid."""
    if request.param == "params.yaml":
        return ROOT, load_params(ROOT / "params.yaml")
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(other_params(), sort_keys=False))
    dvc.repo.Repo.init(str(tmp_path), no_scm=True)
    return tmp_path, load_params(tmp_path / "params.yaml")


def test_every_rendered_stage_declares_the_layouts_paths(project):
    repo_dir, params = project
    stages = rendered(repo_dir)
    for stage, args, outs, deps in stages:
        want_outs, want_deps = expected(stage, args, params)
        assert outs == {p.as_posix() for p in want_outs}, f"{stage} {args}: outs"
        assert deps == {p.as_posix() for p in want_deps}, f"{stage} {args}: data deps"
    pre = params["finetune"]["preprocessing"]
    trained = [layout.run_name(layout.TRAIN_HEAD, *args) for stage, args, _, _ in stages if stage == "train_head"]
    trained += [layout.run_name(*args, pre) for stage, args, _, _ in stages if stage == "finetune"]
    assert sorted(trained) == sorted(layout.planned_runs(params))  # evaluate scores exactly what DVC trains
    pairs = [tuple(args) for stage, args, _, _ in stages if stage == "extract_features"]
    assert sorted(pairs) == sorted(
        (b, p) for b in params["extract"]["backbones"] for p in params["extract"]["preprocessing"]
    )


def test_planned_runs_in_pipeline_order():
    params = load_params(ROOT / "params.yaml")
    params["extract"].update(backbones=["vgg16", "resnet50"], preprocessing=["native", "rescale"])
    params["finetune"].update(backbones=["vgg16"], methods=["finetune_top", "frozen_end_to_end"])
    assert layout.planned_runs(params) == [
        "train_head/vgg16-native",
        "train_head/vgg16-rescale",
        "train_head/resnet50-native",
        "train_head/resnet50-rescale",
        "finetune_top/vgg16-native",
        "frozen_end_to_end/vgg16-native",
    ]


@pytest.mark.parametrize("method", layout.METHODS)
def test_run_names_parse_back(method):
    name = layout.run_name(method, "efficientnet_lite0", "rescale")
    assert name == f"{method}/efficientnet_lite0-rescale"
    assert layout.parse_run_name(name) == (method, "efficientnet_lite0", "rescale")
    assert layout.metrics_file(name).as_posix() == f"results/metrics/{method}/efficientnet_lite0-rescale.json"
    with pytest.raises(ValueError, match="not a run name"):
        layout.parse_run_name("efficientnet_lite0-rescale")
