"""The whole pipeline under real DVC and MLflow, in a temporary git repository, on tiny images.

VGG16 runs at 32 px with `weights.init: none`, which also checks that random weights are
labelled "not pretrained" wherever a result appears.
"""
import json
import os
import shutil
import subprocess
import sys

import mlflow
import pandas as pd
import pytest
import yaml
from helpers import ROOT, make_image_tree

from transferlab import precision

RUNS = ["train_head/vgg16-native", "train_head/vgg16-rescale", "frozen_end_to_end/vgg16-native",
        "finetune_top/vgg16-native"]


def sh(*cmd, cwd, env=None, timeout=1200):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    for name in ("stages", "transferlab", "study"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    images = make_image_tree(repo.parent / "images", classes={"a": 14, "b": 14, "c": 14}, size=40)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="folder", folder=str(images))
    params["weights"]["init"] = "none"
    params["extract"].update(backbones=["vgg16"], input_size={"vgg16": 32}, batch_size=8)
    params["train"].update(epochs=2, batch_size=8)
    params["finetune"].update(backbones=["vgg16"], epochs=1, batch_size=8)
    params["evaluate"]["bootstrap"] = 200
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow-test.db'}"}
    sh("git", "init", "-q", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", cwd=repo)
    sh("dvc", "repro", cwd=repo, env=env)
    return repo, env


def read(repo, path):
    return json.loads((repo / path).read_text())


def test_every_stage_ran_and_a_second_repro_does_nothing(repo):
    repo, env = repo
    manifest = pd.read_csv(repo / "data/split/manifest.csv")
    assert len(manifest) == 42 and set(manifest["class_name"]) == {"a", "b", "c"}
    out = sh("dvc", "repro", cwd=repo, env=env)
    assert "Data and pipelines are up to date" in out


def test_random_weights_are_labelled_not_pretrained_everywhere(repo):
    repo, _ = repo
    assert read(repo, "models/weights/vgg16/identity.json")["label"] == "not pretrained"
    assert read(repo, "features/vgg16-native/meta.json")["weights"]["pretrained"] is False
    for run in RUNS:
        assert read(repo, f"runs/{run}/run.json")["weights"]["label"] == "not pretrained"
    table = pd.read_csv(repo / "reports/results.csv")
    assert sorted(table["run_name"]) == sorted(RUNS)  # one row per run
    assert set(table["weights"]) == {"not pretrained"}
    assert "not pretrained" in (repo / "reports/results.md").read_text()


def test_mlflow_holds_grouped_runs_with_curves_tags_and_test_metrics(repo):
    repo, env = repo
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("transferlab").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert sorted(by_name) == sorted(RUNS)
    assert len({r.data.tags["transferlab.group"] for r in runs}) == 1
    head = by_name["train_head/vgg16-native"]
    meta = read(repo, "features/vgg16-native/meta.json")
    assert head.data.tags["preprocessing_fingerprint"] == meta["preprocessing_fingerprint"]
    assert head.data.tags["weights_pretrained"] == "false"
    assert head.data.tags["manifest_sha256"] == meta["manifest_sha256"]
    assert head.data.params["train.epochs"] == "2"
    curve = client.get_metric_history(head.info.run_id, "val_accuracy")
    assert [m.step for m in curve] == [0, 1]
    history = pd.read_csv(repo / "runs/train_head/vgg16-native/history.csv")
    assert [m.value for m in curve] == pytest.approx(history["val_accuracy"].tolist())
    for run in runs:
        evaluated = read(repo, f"results/eval/{run.info.run_name}/metrics.json")
        assert run.data.metrics["test_accuracy"] == pytest.approx(evaluated["accuracy"])


def test_the_resolved_precision_is_recorded_everywhere_and_checked(repo):
    repo, env = repo
    resolved, why = precision.resolve("auto")  # params.yaml's default, resolved on this machine
    assert read(repo, "features/vgg16-native/meta.json")["precision"] == resolved
    assert read(repo, "results/selftest.json")["precision"] == resolved
    assert {read(repo, f"runs/{run}/run.json")["precision"] for run in RUNS} == {resolved}
    assert set(pd.read_csv(repo / "reports/results.csv")["precision"]) == {resolved}
    assert f"**Precision:** `{resolved}` ({why})" in (repo / "reports/results.md").read_text()
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    for run in client.search_runs([client.get_experiment_by_name("transferlab").experiment_id]):
        assert run.data.tags["precision"] == run.data.params["compute.precision"] == resolved
    # features computed in another precision are refused for training and for scoring, naming both
    meta_file = repo / "features/vgg16-native/meta.json"
    original = meta_file.read_bytes()
    other = "float32" if resolved != "float32" else "mixed_bfloat16"
    meta_file.write_text(json.dumps({**json.loads(original), "precision": other}))
    try:
        refusals = {}
        for cmd in (["stages/train_head.py", "vgg16", "native"], ["stages/evaluate.py"]):
            out = subprocess.run([sys.executable, *cmd], cwd=repo, env=env, capture_output=True, text=True)
            assert out.returncode != 0
            refusals[cmd[0]] = out.stderr
    finally:
        meta_file.write_bytes(original)
    assert (f"features/vgg16-native was computed under precision '{other}', but this run uses '{resolved}'"
            in refusals["stages/train_head.py"])
    assert f"precision: trained with '{resolved}', scoring with '{other}'" in refusals["stages/evaluate.py"]
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=repo, env=env)


def test_frozen_end_to_end_reproduces_train_head(repo):
    repo, _ = repo
    parity = read(repo, "runs/frozen_end_to_end/vgg16-native/run.json")["parity"]
    # Same model, seed, batch order and optimizer; the features are recomputed from images in
    # another batch composition, so only float rounding (~1e-6 relative) may differ.
    assert parity["parity_max_abs_logit_diff"] < 1e-3
    assert parity["parity_val_accuracy_diff"] == 0.0


def test_dvc_sees_the_metrics_and_plots(repo):
    repo, env = repo
    metrics = json.loads(sh("dvc", "metrics", "show", "--json", cwd=repo, env=env))
    text = json.dumps(metrics)
    assert "reports/metrics.json" in text and "results/train_head/vgg16-native/metrics.json" in text
    assert (repo / "results/train_head/vgg16-native/plots/metrics/eval/accuracy.tsv").exists()
    assert (repo / "reports/plots/comparison.png").stat().st_size > 5000


def test_retraining_with_the_same_seed_gives_identical_metrics(repo):
    repo, env = repo
    before = read(repo, "results/eval/train_head/vgg16-native/metrics.json")
    history = (repo / "runs/train_head/vgg16-native/history.csv").read_text()
    sh("dvc", "repro", "-f", "-s", "train_head@vgg16-native", cwd=repo, env=env)
    assert (repo / "runs/train_head/vgg16-native/history.csv").read_text() == history
    sh("dvc", "repro", "evaluate", cwd=repo, env=env)
    assert read(repo, "results/eval/train_head/vgg16-native/metrics.json") == before


def test_linear_probe_runs_as_an_experiment_beside_the_workspace(repo, tmp_path):
    repo, env = repo
    before = {name: (repo / name).read_bytes() for name in ("params.yaml", "dvc.lock")}
    db = f"sqlite:///{tmp_path / 'probe.db'}"
    out = sh("bash", "study/linear_probe.sh", str(repo.parent / "images"),
             cwd=repo, env={**env, "PROBE_NAME": "probe-test", "MLFLOW_TRACKING_URI": db})
    assert {name: (repo / name).read_bytes() for name in before} == before
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=repo, env=env)
    client = mlflow.MlflowClient(db)
    (run,) = client.search_runs([client.get_experiment_by_name("transferlab").experiment_id])
    assert run.info.run_name == "train_head/vgg16-native"  # the only run: no fine-tuning, no rescale
    assert run.data.params["head.units"] == "0"
    accuracy = run.data.metrics["test_accuracy"]
    assert f"probe-test: train_head/vgg16-native, {repo.parent / 'images'}, input size 32 px" in out
    assert f"test accuracy {accuracy:.3f} (always guessing the largest class: " in out
