"""The whole pipeline under real DVC and MLflow, in a temporary git repository, on tiny images.

VGG16 runs at 32 px with `weights.init: none`, which also checks that random weights are
labelled "not pretrained" wherever a result appears.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import ROOT, make_image_tree

from transferlab import dvcfiles, precision

pytestmark = pytest.mark.slow  # end to end: README, "Tests"

RUNS = [
    "train_head/vgg16-native",
    "train_head/vgg16-rescale",
    "frozen_end_to_end/vgg16-native",
    "finetune_top/vgg16-native",
]


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
    shutil.copytree(ROOT / ".dvc/plots", repo / ".dvc/plots")  # the by_run plot template
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
    experiment = client.get_experiment_by_name("transferlab").experiment_id
    (group,) = client.search_runs([experiment], "tags.\"transferlab.role\" = 'group'")
    runs = client.search_runs([experiment], f"tags.\"mlflow.parentRunId\" = '{group.info.run_id}'")
    by_name = {r.info.run_name: r for r in runs}
    assert sorted(by_name) == sorted(RUNS)  # every run a child of the one group run of this repro
    assert len(client.search_runs([experiment])) == len(RUNS) + 1
    assert {r.data.tags["transferlab.group"] for r in runs} == {group.data.tags["transferlab.group"]}
    assert {"results.md", "plots"} <= {a.path for a in client.list_artifacts(group.info.run_id)}
    head = by_name["train_head/vgg16-native"]
    meta = read(repo, "features/vgg16-native/meta.json")
    assert head.data.tags["preprocessing_fingerprint"] == meta["preprocessing_fingerprint"]
    assert head.data.tags["weights_pretrained"] == "false"
    assert head.data.tags["manifest_sha256"] == meta["manifest_sha256"]
    assert head.data.params["train.epochs"] == "2"
    assert "dvc_experiment" not in head.data.tags
    for run in runs:  # comparable in MLflow's plots: identity and the sections used, as params
        params, tags = run.data.params, run.data.tags
        assert {k: params[k] for k in ("backbone", "method", "preprocessing", "input_size")} == {
            k: tags[k] for k in ("backbone", "method", "preprocessing", "input_size")
        }
        assert params["extract.input_size"] == "32" and "ablation.bn_training" in params
        assert not [k for k in run.data.metrics if k.startswith("validation_")]  # no autologged duplicates
    top = by_name["finetune_top/vgg16-native"].data.params
    assert top["finetune.cut_point"] == "block5_conv1"
    assert top["train.seed"] == "0" and top["train.epochs"] == "2"  # its seed, and the head it started from
    curve = client.get_metric_history(head.info.run_id, "val_accuracy")
    assert [m.step for m in curve] == [1, 2]  # epochs, counted as in history.csv and the report
    history = pd.read_csv(repo / "runs/train_head/vgg16-native/history.csv")
    assert [m.value for m in curve] == pytest.approx(history["val_accuracy"].tolist())
    for run in runs:
        evaluated = read(repo, f"results/eval/{run.info.run_name}/metrics.json")
        assert run.data.metrics["test_accuracy"] == pytest.approx(evaluated["accuracy"])
        # evaluate added its metrics later, without moving the run's end: its duration is the training's
        (logged,) = client.get_metric_history(run.info.run_id, "test_accuracy")
        assert run.info.status == "FINISHED" and run.info.end_time < logged.timestamp
        assert "confusion_matrix.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_the_resolved_precision_is_recorded_everywhere_and_checked(repo):
    repo, env = repo
    resolved, why = precision.resolve("auto")  # params.yaml's default, resolved on this machine
    assert read(repo, "features/vgg16-native/meta.json")["precision"] == resolved
    assert read(repo, "results/selftest.json")["precision"] == resolved
    assert {read(repo, f"runs/{run}/run.json")["precision"] for run in RUNS} == {resolved}
    assert set(pd.read_csv(repo / "reports/results.csv")["precision"]) == {resolved}
    assert f"**Precision:** `{resolved}` ({why})" in (repo / "reports/results.md").read_text()
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    trained = [
        run
        for run in client.search_runs([client.get_experiment_by_name("transferlab").experiment_id])
        if run.data.tags.get("transferlab.role") != "group"
    ]  # the group's run trains nothing
    assert sorted(run.info.run_name for run in trained) == sorted(RUNS)
    for run in trained:
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
    assert (
        f"features/vgg16-native was computed under precision '{other}', but this run uses '{resolved}'"
        in refusals["stages/train_head.py"]
    )
    assert f"precision: trained with '{resolved}', scoring with '{other}'" in refusals["stages/evaluate.py"]
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=repo, env=env)


def test_frozen_end_to_end_reproduces_train_head(repo):
    repo, _ = repo
    parity = read(repo, "runs/frozen_end_to_end/vgg16-native/run.json")["parity"]
    # Same model, seed, batch order and optimizer; the features are recomputed from images in
    # another batch composition, so only float rounding (~1e-6 relative) may differ.
    assert parity["parity_max_abs_logit_diff"] < 1e-3
    assert parity["parity_val_accuracy_diff"] == 0.0


def test_dvc_metrics_show_is_one_row_per_scored_run_with_the_same_keys(repo):
    repo, env = repo
    files = json.loads(sh("dvc", "metrics", "show", "--json", cwd=repo, env=env))[""]["data"]
    assert sorted(files) == sorted(f"results/metrics/{run}.json" for run in RUNS)  # no timings, no DVCLive
    keys = {path: sorted(content["data"]) for path, content in files.items()}
    assert all(k == sorted(dvcfiles.KEYS) for k in keys.values()), keys  # 7 columns + the path
    head = files["results/metrics/train_head/vgg16-native.json"]["data"]
    evaluated = read(repo, "results/eval/train_head/vgg16-native/metrics.json")
    assert head["accuracy"] == round(evaluated["accuracy"], 4)
    assert [head["accuracy_ci95_lo"], head["accuracy_ci95_hi"]] == [round(v, 4) for v in evaluated["accuracy_ci95"]]
    table = sh("dvc", "metrics", "show", "--md", cwd=repo, env=env).strip().splitlines()
    assert len(table) == 2 + len(RUNS) and table[0].count("|") - 1 == 1 + len(dvcfiles.KEYS)


def test_exp_show_with_the_readmes_patterns_is_a_column_pair_per_run(repo):
    """README's `dvc exp show --only-changed` patterns: dependency hashes and the secondary metrics go."""
    repo, env = repo
    readme = (ROOT / "README.md").read_text()
    drop = [
        "(stages|transferlab|data|models|features|cut|runs)(/|$)|results/(selftest|eval)",
        ".*:(?!(balanced_)?accuracy$)",
    ]
    assert f"dvc exp show --only-changed --drop '{drop[0]}' --drop '{drop[1]}'" in readme
    table = sh(
        "dvc", "exp", "show", "--only-changed", "--md", *(a for d in drop for a in ("--drop", d)), cwd=repo, env=env
    )
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert sorted(header) == sorted(
        [
            "Experiment",
            "Created",
            *(f"results/metrics/{run}.json:{key}" for run in RUNS for key in ("accuracy", "balanced_accuracy")),
        ]
    )


def test_dvc_plots_group_the_curves_by_run_and_draw_a_confusion_matrix_per_run(repo):
    repo, env = repo
    plots = json.loads(sh("dvc", "plots", "show", "--json", cwd=repo, env=env))["data"]
    assert sorted(plots) == sorted(
        [
            "reports/plots/accuracy.csv",
            "accuracy_by_epoch",
            "loss_by_epoch",
            *(f"reports/plots/confusion/{run}.csv" for run in RUNS),
        ]
    )
    for figure, field in (("accuracy_by_epoch", "accuracy"), ("loss_by_epoch", "loss")):
        (render,) = plots[figure]
        points = render["content"]["data"]["values"]
        assert render["content"]["spec"]["encoding"]["color"]["field"] == "run"
        assert {p["run"] for p in points} == set(RUNS) and {p["split"] for p in points} == {"train", "val"}
        history = pd.read_csv(repo / "runs/train_head/vgg16-native/history.csv")
        val = [float(p[field]) for p in points if p["run"] == "train_head/vgg16-native" and p["split"] == "val"]
        assert val == pytest.approx(history[f"val_{field}"].tolist(), rel=1e-5)
    predictions = pd.read_csv(repo / "results/eval/finetune_top/vgg16-native/predictions.csv")
    (render,) = plots["reports/plots/confusion/finetune_top/vgg16-native.csv"]
    pairs = sorted((p["actual"], p["predicted"]) for p in render["content"]["data"]["values"])
    classes = ["a", "b", "c"]
    assert pairs == sorted(zip([classes[i] for i in predictions["label"]], [classes[i] for i in predictions["pred"]]))
    assert (repo / "results/train_head/vgg16-native/plots/metrics/eval/accuracy.tsv").exists()  # DVCLive's own files
    assert (repo / "results/extract_features/vgg16-native.json").exists()  # the extraction speed: a file
    assert (repo / "reports/plots/comparison.png").stat().st_size > 5000


def test_binary_figure_is_skipped_with_its_reason_and_unknown_positive_classes_are_refused(repo):
    """Folder classes a, b, c have no ELPV mapping: the report says why; a list naming a missing class stops."""
    repo, env = repo
    assert (
        "Binary accuracy: not computed (evaluate.positive_classes is auto" in (repo / "reports/results.md").read_text()
    )
    params = (repo / "params.yaml").read_text()
    try:
        (repo / "params.yaml").write_text(params.replace("positive_classes: auto", "positive_classes: [b, zz]"))
        out = subprocess.run(
            [sys.executable, "stages/evaluate.py"], cwd=repo, env=env, capture_output=True, text=True, timeout=600
        )
    finally:
        (repo / "params.yaml").write_text(params)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        "evaluate: evaluate.positive_classes: must name some, not all, of the classes ['a', 'b', 'c'], "
        "got ['b', 'zz'] (unknown: zz)"
    )


def test_retraining_with_the_same_seed_gives_identical_metrics(repo):
    repo, env = repo
    before = read(repo, "results/eval/train_head/vgg16-native/metrics.json")
    history = (repo / "runs/train_head/vgg16-native/history.csv").read_text()
    sh("dvc", "repro", "-f", "-s", "train_head@vgg16-native", cwd=repo, env=env)
    assert (repo / "runs/train_head/vgg16-native/history.csv").read_text() == history
    sh("dvc", "repro", cwd=repo, env=env)  # evaluate and export: leaves the workspace up to date
    assert read(repo, "results/eval/train_head/vgg16-native/metrics.json") == before


def test_linear_probe_runs_as_an_experiment_beside_the_workspace(repo, tmp_path):
    repo, env = repo
    before = {name: (repo / name).read_bytes() for name in ("params.yaml", "dvc.lock")}
    db = f"sqlite:///{tmp_path / 'probe.db'}"
    out = sh(
        "bash",
        "study/linear_probe.sh",
        str(repo.parent / "images"),
        cwd=repo,
        env={**env, "PROBE_NAME": "probe-test", "MLFLOW_TRACKING_URI": db},
    )
    assert {name: (repo / name).read_bytes() for name in before} == before
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=repo, env=env)
    client = mlflow.MlflowClient(db)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("transferlab").experiment_id], "tags.stage = 'train_head'"
    )
    assert run.info.run_name == "train_head/vgg16-native"  # the only run: no fine-tuning, no rescale
    assert run.data.params["head.units"] == "0"
    accuracy = run.data.metrics["test_accuracy"]
    assert f"probe-test: train_head/vgg16-native, {repo.parent / 'images'}, input size 32 px" in out
    assert f"test accuracy {accuracy:.3f} (always guessing the largest class: " in out


# ---------------------------------------------------------------- export (the trained model as a product)

KERAS_ONLY = """
import json, sys, keras, numpy as np
from PIL import Image
model = keras.saving.load_model(sys.argv[1])
probs = [model.predict_on_batch(np.asarray(Image.open(p).convert("RGB"))[None])[0].tolist() for p in sys.argv[2:]]
print(json.dumps(probs))
"""


def evaluated(repo, run):
    """evaluate's test predictions for one run, with image paths and probabilities."""
    frame = pd.read_csv(repo / f"results/eval/{run}/predictions.csv", dtype={"id": str})
    manifest = pd.read_csv(repo / "data/split/manifest.csv", dtype={"id": str}).set_index("id")
    root = read(repo, "data/split/source.json")["root"]
    frame["path"] = [os.path.join(root, manifest.loc[i, "path"]) for i in frame["id"]]
    logits = frame[[c for c in frame if c.startswith("logit_")]].to_numpy(float)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return frame, probs / probs.sum(1, keepdims=True)


def test_export_picks_the_best_validation_run_and_loads_with_keras_alone(repo, tmp_path):
    repo, env = repo
    meta = read(repo, "models/export/model.json")
    last = {run: pd.read_csv(repo / f"runs/{run}/history.csv").iloc[-1] for run in RUNS}
    best = min(RUNS, key=lambda r: (-last[r]["val_accuracy"], last[r]["val_loss"], r))
    assert meta["source_run"] == best and meta["selection"]["chosen_by"] == "validation accuracy"
    assert meta["classes"] == ["a", "b", "c"] and meta["weights"]["label"] == "not pretrained"
    run = read(repo, f"runs/{best}/run.json")
    assert meta["preprocessing"] == run["preprocessing"] and meta["manifest_sha256"] == run["manifest_sha256"]
    frame, expected = evaluated(repo, best)
    # no transferlab on the path: the preprocessing is inside the model, nothing else is needed
    out = sh(
        sys.executable,
        "-c",
        KERAS_ONLY,
        str(repo / "models/export/model.keras"),
        *frame["path"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": ""},
    )
    probs = np.array(json.loads(out.splitlines()[-1]))
    assert (probs.argmax(1) == frame["pred"].to_numpy()).all()
    assert np.abs(probs - expected).max() < 1e-4  # batch composition only (README, "Using the trained model")
    assert meta["equivalence_on_test"]["same_argmax"] == len(frame) > 0


def test_saved_model_for_tf_serving_has_the_documented_signature(repo):
    import tensorflow as tf

    repo, _ = repo
    loaded = tf.saved_model.load(str(repo / "models/export/saved_model"))
    serve = loaded.signatures["serving_default"]
    (spec,) = serve.structured_input_signature[1].values()
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, None, None, 3]
    (output,) = serve(tf.zeros([2, 50, 30, 3], tf.uint8)).values()
    assert output.shape == (2, 3) and np.allclose(output.numpy().sum(1), 1.0, atol=1e-5)


def test_champion_alias_carries_the_identity_and_a_reexport_adds_no_version(repo):
    repo, env = repo
    # in-process tests before this one may have set MLflow's global URIs, which win over the variable
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(env["MLFLOW_TRACKING_URI"])
    try:
        check_champion(repo, env, mlflow.MlflowClient())
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


def check_champion(repo, env, client):
    meta = read(repo, "models/export/model.json")
    name = meta["mlflow"]["name"]
    assert name == "transferlab-images"  # the folder's name: one registered model per dataset
    count = len(client.search_model_versions(f"name = '{name}'"))
    champion = client.get_model_version_by_alias(name, "champion")
    run = read(repo, f"runs/{meta['source_run']}/run.json")
    assert champion.run_id == run["mlflow_run_id"] == champion.tags["source_run"]  # logged to the training run
    assert champion.tags["preprocessing_fingerprint"] == run["preprocessing_fingerprint"]
    assert champion.tags["weights_array_checksum"] == run["weights"]["array_checksum"]
    assert champion.tags["manifest_sha256"] == run["manifest_sha256"]
    assert champion.tags["weights_pretrained"] == "false"
    logged = mlflow.get_logged_model(champion.source.removeprefix("models:/"))
    assert client.get_run(champion.run_id).info.end_time < logged.creation_timestamp  # training time kept
    sh("dvc", "repro", "-f", "-s", "export", cwd=repo, env=env)
    assert len(client.search_model_versions(f"name = '{name}'")) == count
    again = read(repo, "models/export/model.json")["mlflow"]
    assert again["reused_existing_version"] is True and again["version"] == int(champion.version)
    signature = mlflow.models.get_model_info(f"models:/{name}@champion").signature
    assert signature.inputs.to_dict() == [
        {"type": "tensor", "name": "images", "tensor-spec": {"dtype": "uint8", "shape": (-1, -1, -1, 3)}}
    ]


def odd_images(folder, source):
    """The same picture as RGBA (alpha dropped: same pixels), plus grayscale, palette, 16-bit and a broken file."""
    from PIL import Image

    folder.mkdir()
    rgb = Image.open(source).convert("RGB")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("P").save(folder / "palette.png")
    Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257).save(folder / "gray16.png")
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def test_predict_command_and_served_model_agree_with_evaluate(repo, tmp_path):
    import requests

    repo, env = repo
    meta = read(repo, "models/export/model.json")
    frame, expected = evaluated(repo, meta["source_run"])
    odd = odd_images(tmp_path / "odd", frame["path"].iloc[0])
    csv = tmp_path / "predictions.csv"
    out = sh(
        sys.executable,
        "-m",
        "transferlab.predict",
        "models:/transferlab-images@champion",
        *frame["path"],
        str(odd),
        "-o",
        str(csv),
        cwd=repo,
        env=env,
    )
    assert f"{len(frame) + 4} images predicted" in out and "broken.png: not an image" in out
    table = pd.read_csv(csv, keep_default_na=False).set_index("path")
    probs = table.loc[frame["path"], ["p_a", "p_b", "p_c"]].to_numpy(float)
    assert list(table.loc[frame["path"], "predicted_class"]) == [meta["classes"][i] for i in frame["pred"]]
    assert np.abs(probs - expected).max() < 1e-4
    np.testing.assert_allclose(
        table.loc[str(odd / "rgba.png"), ["p_a", "p_b", "p_c"]].to_numpy(float), probs[0], atol=1e-6
    )
    assert set(table.loc[[str(odd / n) for n in ("gray.png", "palette.png", "gray16.png")], "error"]) == {""}
    # nothing readable: exit status 1, and the reason is still written
    failed = subprocess.run(
        [
            sys.executable,
            "-m",
            "transferlab.predict",
            "models/export",
            str(odd / "broken.png"),
            "-o",
            str(tmp_path / "none.csv"),
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 1 and "not an image" in pd.read_csv(tmp_path / "none.csv")["error"][0]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/transferlab-images@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if requests.get(f"{url}/ping", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None, "mlflow models serve exited"
            time.sleep(0.5)
        from PIL import Image

        batch = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in frame["path"][:3]])
        answer = requests.post(f"{url}/invocations", json={"inputs": batch.tolist()}, timeout=60)
        assert answer.ok, answer.text
        np.testing.assert_allclose(np.array(answer.json()["predictions"]), probs[:3], atol=1e-5)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
