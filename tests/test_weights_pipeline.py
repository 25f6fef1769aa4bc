"""Weights under real DVC: the run cache never brings back bad weights, and user-supplied files for the
backbones whose ImageNet weights cannot be reached offline run the whole pipeline, labelled as such.

The end-to-end tests are marked ``slow`` (about 1-2 min each on 2 CPU cores): `pytest -m "not slow"` skips them.
"""

import json
import os
import shutil
import subprocess

import h5py
import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import ROOT, make_image_tree, pipeline_repo, private_weights_cache, run_cmd

from transferlab import backbones, train, weights

pytestmark = pytest.mark.slow  # end to end: README, "Tests"

UNVERIFIED = "user-supplied, unverified"


def read(repo, path):
    return json.loads((repo / path).read_text())


def test_dvc_run_cache_never_restores_corrupted_weights(tmp_path):
    """Corrupt the machine cache, re-run, repair, repro: the run cache's newest entry must be good weights.

    Before the weights were verified, the forced run copied the corrupted file, DVC's run cache kept
    that output, and after the repair `dvc repro` restored it ("is cached - checking out outputs").
    """
    cache = private_weights_cache(tmp_path / "cache")
    env = {**os.environ, "TRANSFERLAB_CACHE": str(cache), "KERAS_HOME": str(tmp_path / "no-keras")}
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["extract"]["backbones"] = ["vgg16"]
    params["finetune"]["backbones"] = ["vgg16"]
    repo = pipeline_repo(tmp_path / "repo", params, env)
    pin = backbones.get("vgg16").imagenet_checksums["notop"]

    run_cmd("dvc", "repro", "weights@vgg16", cwd=repo, env=env)
    with h5py.File(next(cache.glob("vgg16_onnx_mirror/*/notop.weights.h5")), "r+") as f:
        bias = f["layers/conv2d/vars/1"]
        bias[0] = bias[0] + 0.05  # still loads; features would be off
    run_cmd("dvc", "repro", "-f", "weights@vgg16", cwd=repo, env=env)
    assert read(repo, "models/weights/vgg16/identity.json")["array_checksum"] == pin

    shutil.rmtree(cache / "vgg16_onnx_mirror")  # the user's repair, and a lost output
    shutil.rmtree(repo / "models/weights/vgg16")
    out = run_cmd("dvc", "repro", "weights@vgg16", cwd=repo, env=env)
    assert "is cached" in out  # restored from the run cache, without running
    identity = read(repo, "models/weights/vgg16/identity.json")
    assert identity["array_checksum"] == pin
    assert weights.file_checksum(backbones.get("vgg16"), repo / "models/weights/vgg16/notop.weights.h5") == pin
    assert "up to date" in run_cmd("dvc", "repro", "weights@vgg16", cwd=repo, env=env)


def test_a_broken_weights_paths_file_stops_the_stage_with_one_line(tmp_path):
    notes = tmp_path / "vgg16 weights.h5"
    notes.write_text("not weights\n")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["extract"]["backbones"] = ["vgg16"]
    params["finetune"]["backbones"] = ["vgg16"]
    params["weights"]["paths"] = {"vgg16": str(notes)}
    env = {**os.environ, "TRANSFERLAB_CACHE": str(tmp_path / "cache"), "KERAS_HOME": str(tmp_path / "no-keras")}
    repo = pipeline_repo(tmp_path / "repo", params, env)
    done = subprocess.run(["dvc", "repro", "weights@vgg16"], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode != 0
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("weights: weights.paths")]
    assert line.startswith(f"weights: weights.paths.vgg16: {notes} cannot be loaded as vgg16 notop weights: OSError")
    assert "Traceback" not in done.stdout + done.stderr
    assert not (repo / "models/weights/vgg16").exists() and not (tmp_path / "cache").exists()  # no fallback


# --- ResNet50 and InceptionV3 from a user's file, end to end -------------------------------------------


def _user_weights(backbone, path, size):
    """Random arrays of the right shapes in Keras' own layout, written the way a user's Keras would."""
    keras.utils.set_random_seed(7)
    model = backbone.build(False, None, size)
    model.save_weights(path)
    return model


def _run_pipeline(tmp_path, name, size, cut_point):
    images = make_image_tree(tmp_path / "images", classes={"a": 10, "b": 10}, size=size)
    user_file = tmp_path / f"my_{name}_notop.weights.h5"
    user_model = _user_weights(backbones.get(name), user_file, size)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="folder", folder=str(images))
    params["weights"].update(paths={name: str(user_file)}, missing="error")
    params["extract"].update(backbones=[name], preprocessing=["native"], input_size={name: size}, batch_size=8)
    params["train"].update(epochs=1, batch_size=8)
    params["finetune"].update(backbones=[name], epochs=1, batch_size=8)
    params["finetune"]["cut_point"][name] = cut_point
    params["evaluate"].update(bootstrap=50, group_by=[])
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "TRANSFERLAB_CACHE": str(tmp_path / "cache"),
        "KERAS_HOME": str(tmp_path / "no-keras"),
    }
    repo = pipeline_repo(tmp_path / "repo", params, env)
    run_cmd("dvc", "repro", cwd=repo, env=env)
    return repo, env, user_file, user_model


def _assert_labelled_user_supplied(repo, env, name, user_file):
    runs = [f"train_head/{name}-native", f"frozen_end_to_end/{name}-native", f"finetune_top/{name}-native"]
    identity = read(repo, f"models/weights/{name}/identity.json")
    assert identity["label"] == UNVERIFIED and identity["verified"] is None
    assert identity["source"] == f"params:{user_file}"
    assert identity["source_file_sha256"] == weights.files.sha256_file(user_file)
    assert read(repo, f"features/{name}-native/meta.json")["weights"]["label"] == UNVERIFIED
    for run in runs:
        record = read(repo, f"runs/{run}/run.json")
        assert record["weights"]["label"] == UNVERIFIED and record["status"] == "trained"
    table = pd.read_csv(repo / "reports/results.csv")
    assert sorted(table["run_name"]) == sorted(runs)
    assert set(table["weights"]) == {UNVERIFIED} and table["accuracy"].notna().all()
    assert "ImageNet" not in (repo / "reports/results.md").read_text()
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    mlflow_runs = [
        r
        for r in client.search_runs([client.get_experiment_by_name("transferlab").experiment_id])
        if r.data.tags.get("transferlab.role") != "group"
    ]  # the group's run trains nothing
    assert sorted(r.info.run_name for r in mlflow_runs) == sorted(runs)
    assert {r.data.tags["weights"] for r in mlflow_runs} == {UNVERIFIED}
    assert all("test_accuracy" in r.data.metrics for r in mlflow_runs)


def _assert_parity_and_frozen_batchnorm(repo, name, size, boundary, user_model):
    parity = read(repo, f"runs/frozen_end_to_end/{name}-native/run.json")["parity"]
    assert parity["parity_val_accuracy_diff"] == 0.0
    assert parity["parity_max_abs_logit_diff"] < 1e-3
    record = read(repo, f"runs/finetune_top/{name}-native/run.json")
    assert record["params"]["cut_boundary"] == boundary and record["cached_path"] is True
    # finetune_top's saved model: BatchNorm statistics untouched everywhere (inference mode),
    # kernels below the cut untouched, the top block trained
    base = backbones.get(name).build(False, None, size)
    head = train.head_for(base, 2, yaml.safe_load((repo / "params.yaml").read_text())["head"], 0)
    full = train.end_to_end(base, head, "avg")
    full.load_weights(repo / f"runs/finetune_top/{name}-native/model.weights.h5")
    above = [layer.name for layer in base.layers].index(boundary) + 1
    changed = [  # positions, not names: InceptionV3's auto-named layers are numbered per process
        (i, layer)
        for i, (layer, start) in enumerate(zip(base.layers, user_model.layers, strict=True))
        if any(not np.array_equal(a, b) for a, b in zip(layer.get_weights(), start.get_weights()))
    ]
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for _, layer in changed)
    assert changed and all(i >= above for i, _ in changed)


def test_resnet50_from_a_user_file_runs_end_to_end(tmp_path):
    """32 px: ResNet50's smallest input (conv5 maps are 1x1); the test checks wiring and labels, not accuracy."""
    repo, env, user_file, user_model = _run_pipeline(tmp_path, "resnet50", 32, "conv5")
    _assert_labelled_user_supplied(repo, env, "resnet50", user_file)
    _assert_parity_and_frozen_batchnorm(repo, "resnet50", 32, "conv4_block6_out", user_model)


def test_inception_v3_from_a_user_file_runs_end_to_end(tmp_path):
    """75 px, not 299: Keras' smallest InceptionV3 input, at which mixed8/mixed9 still have 1x1 maps;
    299 px would cost ~16x the pixels for the same check of wiring and labels."""
    repo, env, user_file, user_model = _run_pipeline(tmp_path, "inception_v3", 75, "mixed9")
    _assert_labelled_user_supplied(repo, env, "inception_v3", user_file)
    _assert_parity_and_frozen_batchnorm(repo, "inception_v3", 75, "mixed8", user_model)
