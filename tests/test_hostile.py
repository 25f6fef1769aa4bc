"""Hostile inputs under real DVC and MLflow: odd file names, killed training, edited or swapped records.

One tiny pipeline (VGG16 at 32 px, random weights, bottleneck head and finetune_top) in a
temporary git repository; each test damages something, checks the refusal, and puts it back.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import ROOT, make_image, make_image_tree
from PIL import Image

from transferlab import data, features

pytestmark = pytest.mark.slow  # end to end: README, "Tests"

ODD_NAMES = ["c/my cat.png", "c/café ñ 猫.png", "b/two  spaces .png"]
HEAD = "train_head/vgg16-native"


def run(*cmd, cwd, env, check=True, timeout=600):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("hostile")
    for name in ("stages", "transferlab"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    images = make_image_tree(tmp_path_factory.mktemp("hostile-images"), classes={"a": 10, "b": 10, "c": 10}, size=40)
    for i, name in enumerate(ODD_NAMES):
        Image.fromarray(make_image("abc".index(name[0]), 3, 40, seed=100 + i)).save(images / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="folder", folder=str(images))
    params["weights"]["init"] = "none"
    params["extract"].update(backbones=["vgg16"], preprocessing=["native"], input_size={"vgg16": 32}, batch_size=8)
    params["train"].update(epochs=2, batch_size=8)
    params["finetune"].update(backbones=["vgg16"], methods=["finetune_top"], epochs=1, batch_size=8)
    params["evaluate"]["bootstrap"] = 100
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow-test.db'}",
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
    }
    run("git", "init", "-q", cwd=repo, env=env)
    run("dvc", "init", "-q", cwd=repo, env=env)
    run("git", "add", "-A", cwd=repo, env=env)
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", cwd=repo, env=env)
    run("dvc", "repro", cwd=repo, env=env)
    return repo, env


def client(env):
    return mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])


def runs_named(env, name):
    c = client(env)
    experiment = c.get_experiment_by_name("transferlab")
    return c.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")


def test_any_file_name_round_trips_from_split_to_evaluation(repo):
    repo, _ = repo
    manifest = data.load_manifest(repo / "data/split")
    ids = {name.rsplit(".", 1)[0] for name in ODD_NAMES}
    assert ids <= set(manifest["id"])
    stored = []
    for split in features.SPLITS:
        got, labels, x = features.load_split(repo / "features/vgg16-native", split)
        rows = manifest[manifest["split"] == split]
        assert got == rows["id"].tolist() and labels.tolist() == rows["class_index"].tolist() and len(x) == len(got)
        stored += got
    assert ids <= set(stored)
    test_ids = manifest.loc[manifest["split"] == "test", "id"].tolist()
    for name in (HEAD, "finetune_top/vgg16-native"):
        assert (
            pd.read_csv(repo / f"results/eval/{name}/predictions.csv", keep_default_na=False)["id"].tolist() == test_ids
        )


def test_scratch_leftovers_do_not_change_what_dvc_hashes(repo):
    repo, env = repo
    (repo / "features/vgg16-native.partial/test").mkdir(parents=True)
    (repo / "features/vgg16-native.partial/test/pooled.npy").write_bytes(b"half")
    (repo / "features/vgg16-native/meta.json.tmp").write_text("{")
    try:
        assert "Data and pipelines are up to date" in run("dvc", "status", cwd=repo, env=env).stdout
    finally:
        shutil.rmtree(repo / "features/vgg16-native.partial")
        (repo / "features/vgg16-native/meta.json.tmp").unlink()


def results_bytes(repo) -> dict:
    """What evaluate wrote: the DVC metrics files and the report, byte for byte."""
    return {
        p: p.read_bytes() for p in [*sorted((repo / "results/metrics").rglob("*.json")), repo / "reports/results.md"]
    }


def test_swapped_test_features_are_refused_before_anything_is_logged(repo):
    repo, env = repo
    pooled = repo / "features/vgg16-native/test/pooled.npy"
    original = pooled.read_bytes()
    reports = results_bytes(repo)
    logged = {
        r.info.run_id: len(client(env).get_metric_history(r.info.run_id, "test_accuracy"))
        for r in runs_named(env, HEAD) + runs_named(env, "finetune_top/vgg16-native")
    }
    x = np.load(pooled)
    np.save(pooled, x[::-1].copy())  # same shape, rows swapped
    try:
        out = run(sys.executable, "stages/evaluate.py", cwd=repo, env=env, check=False)
    finally:
        pooled.write_bytes(original)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"{pooled.relative_to(repo)} changed after extraction: its sha256 is " in out.stderr
    assert results_bytes(repo) == reports
    assert logged == {r: len(client(env).get_metric_history(r, "test_accuracy")) for r in logged}


def run_with_edited_record(repo, env, path: str, stage: tuple, edit):
    """Run ``stage`` with the stored record at ``path`` changed by ``edit`` (then restored): it must stop with
    exit 1 and no traceback, and leave every result as it was (evaluate: all or nothing)."""
    record_file = repo / path
    original = record_file.read_bytes()
    record = json.loads(original)
    edit(record)
    record_file.write_text(json.dumps(record))
    results = results_bytes(repo)
    try:
        out = run(sys.executable, *stage, cwd=repo, env=env, check=False)
    finally:
        record_file.write_bytes(original)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert results_bytes(repo) == results
    return out


def test_an_edited_record_is_refused_even_with_its_old_fingerprint(repo):
    repo, env = repo
    for path, stage in [
        ("features/vgg16-native/meta.json", ("stages/train_head.py", "vgg16", "native")),
        ("runs/finetune_top/vgg16-native/run.json", ("stages/evaluate.py",)),
    ]:
        record = json.loads((repo / path).read_text())
        out = run_with_edited_record(repo, env, path, stage, lambda r: r["preprocessing"].update(mean=[0.0] * 3))
        assert (
            f"{path}: the stored preprocessing_fingerprint '{record['preprocessing_fingerprint']}' does not "
            "match the fingerprint '"
        ) in out.stderr


def test_a_record_of_an_older_schema_is_refused_in_one_line_saying_re_run_dvc_repro(repo):
    repo, env = repo
    for path, stage, kind in [
        ("features/vgg16-native/meta.json", ("stages/train_head.py", "vgg16", "native"), "features record"),
        ("runs/finetune_top/vgg16-native/run.json", ("stages/evaluate.py",), "run record"),
    ]:
        # as every record written before records were versioned
        out = run_with_edited_record(repo, env, path, stage, lambda r: r.pop("schema_version"))
        line = out.stderr.strip().splitlines()[-1]
        assert f"{path}: this {kind} has no schema_version" in line
        assert line.endswith("Re-run `dvc repro` to rebuild it.")


def test_killed_training_leaves_no_partial_output_and_its_run_is_marked_killed(repo):
    repo, env = repo
    outputs = [
        repo / "runs" / HEAD / "run.json",
        repo / "results" / HEAD / "metrics.json",
        repo / "results" / HEAD / "plots/metrics/train/loss.tsv",
    ]
    before = [p.read_bytes() for p in outputs]
    params = (repo / "params.yaml").read_text()
    slow = yaml.safe_load(params)
    slow["train"]["epochs"] = 5000
    (repo / "params.yaml").write_text(yaml.safe_dump(slow, sort_keys=False))
    known = {r.info.run_id for r in runs_named(env, HEAD)}
    stage = subprocess.Popen(
        [sys.executable, "stages/train_head.py", "vgg16", "native"],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline, killed = time.time() + 240, None
        while time.time() < deadline and killed is None:
            time.sleep(1)
            for r in runs_named(env, HEAD):
                if r.info.run_id not in known and len(client(env).get_metric_history(r.info.run_id, "loss")) >= 3:
                    stage.send_signal(signal.SIGKILL)  # at epoch 3 of 5000
                    killed = r.info.run_id
        assert killed, "the stage never reached epoch 3"
        stage.wait(30)
    finally:
        stage.kill()
        (repo / "params.yaml").write_text(params)
    assert [p.read_bytes() for p in outputs] == before  # the previous complete outputs, untouched
    assert client(env).get_run(killed).info.status == "RUNNING"
    run("dvc", "repro", "-f", "-s", "train_head@vgg16-native", cwd=repo, env=env)
    assert client(env).get_run(killed).info.status == "KILLED"
    assert [p.read_bytes() for p in outputs][1:] == before[1:]  # same seed, same curves
    assert not list(repo.glob("r*/**/*.partial"))  # the killed attempt's scratch folders are gone
