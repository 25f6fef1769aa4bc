"""MLflow runs as the UI shows them, made by the real tracking code in a temporary sqlite store."""

import mlflow
import pandas as pd
import pytest
from helpers import make_tracking_store, run_record, weights_identity

from transferlab import tracking

CURVES = {"loss", "accuracy", "val_loss", "val_accuracy"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.delenv("DVC_EXP_NAME", raising=False)
        made = make_tracking_store(root)
        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name("transferlab").experiment_id
        runs = {r.info.run_name: r for r in client.search_runs([experiment])}
        yield {**made, "root": root, "client": client, "experiment": experiment, "by_name": runs}


@pytest.mark.slow
def test_curves_are_the_four_keras_metrics_per_epoch_from_1(store):
    client, root = store["client"], store["root"]
    for name in ("train_head/vgg16-native", "train_head/vgg16-rescale"):
        run = store["by_name"][name]
        trained = {k for k in run.data.metrics if not k.startswith("test_")}
        # no validation_* duplicates from autologging; the epochs run and the epoch kept (training controls)
        assert trained == CURVES | {"train_seconds", "epochs_run", "epoch_chosen"}
        assert run.data.metrics["epoch_chosen"] == run.data.metrics["epochs_run"] == 2
        history = pd.read_csv(root / "runs" / name / "history.csv")
        for key in CURVES:
            curve = client.get_metric_history(run.info.run_id, key)
            assert [m.step for m in curve] == [1, 2] == history["epoch"].tolist()
            assert [m.value for m in curve] == pytest.approx(history[key].tolist())
        assert run.data.metrics["train_seconds"] == pytest.approx(
            store["runs"][0 if "native" in name else 1]["record"].train_seconds
        )


@pytest.mark.slow
def test_identity_and_resolved_sections_are_params(store):
    run = store["by_name"]["train_head/vgg16-native"]
    params, tags = run.data.params, run.data.tags
    assert {k: params[k] for k in ("backbone", "method", "preprocessing", "input_size", "weights")} == {
        "backbone": "vgg16",
        "method": "train_head",
        "preprocessing": "native",
        "input_size": "32",
        "weights": "not pretrained",
    }
    # extract.* resolved for the run's backbone, the grid's lists left out; ablation switches all off
    assert params["extract.input_size"] == "128" and params["extract.batch_size"] == "32"
    assert "extract.backbones" not in params and "extract.input_size.vgg16" not in params
    assert params["ablation.bn_training"] == "False" and params["ablation.augmentation"] == "none"
    assert params["train.epochs"] == "2" and params["head.units"] == "256"
    assert params["train.lr_schedule"] == "constant" and params["train.early_stopping_patience"] == "0"
    assert params["train.class_weight"] == "none" and params["train.label_smoothing"] == "0.0"
    assert tags["backbone"] == "vgg16" and tags["method"] == "train_head" and tags["preprocessing"] == "native"
    assert "dvc_experiment" not in tags  # no empty tag outside DVC experiments


def test_finetune_sections_resolve_to_the_backbone():
    record = run_record(
        "finetune_top/vgg16-native",
        input_size=128,
        weights=weights_identity(label="ImageNet"),
        params={
            "finetune": {
                "backbones": ["vgg16"],
                "epochs": 4,
                "cut_point": {"vgg16": "block5_conv1", "resnet50": "conv5"},
            },
            "ablation": {"bn_training": True},
            "cut_boundary": "block4_pool",
        },
    )
    params = tracking.run_params(
        record, {"extract": {"backbones": ["vgg16"], "input_size": {"vgg16": 128}, "batch_size": 32}}
    )
    assert params == {
        "backbone": "vgg16",
        "method": "finetune_top",
        "preprocessing": "native",
        "input_size": 128,
        "weights": "ImageNet",
        "extract.input_size": 128,
        "extract.batch_size": 32,
        "ablation.bn_training": True,
        "finetune.cut_point": "block5_conv1",
        "finetune.epochs": 4,
        "cut_boundary": "block4_pool",
    }


@pytest.mark.slow
def test_unavailable_backbone_has_a_finished_run_that_says_why(store):
    client, experiment = store["client"], store["experiment"]
    run = store["by_name"]["train_head/resnet50-native"]
    assert run.info.status == "FINISHED" and run.data.metrics == {}
    assert run.data.params["weights"] == run.data.tags["weights"] == "weights unavailable"
    assert "put resnet50_notop.h5 in ~/.keras/models/" in run.data.tags["mlflow.note.content"]
    # the README's VGG16 vs ResNet50 filter (MLflow's search has neither OR nor IN for params)
    found = client.search_runs(
        [experiment],
        "params.method = 'train_head' and params.preprocessing = 'native' and params.backbone != 'efficientnet_lite0'",
    )
    assert sorted(r.info.run_name for r in found) == ["train_head/resnet50-native", "train_head/vgg16-native"]


@pytest.mark.slow
def test_evaluation_adds_metrics_and_figures_without_moving_the_end_time(store):
    client = store["client"]
    for run in store["runs"][:2]:
        info = client.get_run(run["mlflow_run_id"]).info
        assert info.status == "FINISHED"
        assert info.end_time < store["evaluated_at"]  # the training's end, not the evaluation's
        m = run["metrics"]
        logged = client.get_run(run["mlflow_run_id"]).data.metrics
        assert logged["test_accuracy"] == pytest.approx(m["accuracy"])
        per_class, mono = m["per_class"], m["group_accuracy"]["cell_type"]["mono"]
        assert logged["test_recall/possibly defective"] == pytest.approx(per_class["possibly defective"]["recall"])
        assert logged["test_precision/functional"] == pytest.approx(per_class["functional"]["precision"])
        assert logged["test_group_accuracy/cell_type/mono"] == pytest.approx(mono["accuracy"])
        assert client.get_metric_history(run["mlflow_run_id"], "test_accuracy")[0].timestamp >= store["evaluated_at"]
        artifacts = {a.path for a in client.list_artifacts(run["mlflow_run_id"])}
        assert {"confusion_matrix.png", "learning_curves.png", "evaluation", "run.json", "history.csv"} <= artifacts
        evaluation = {a.path for a in client.list_artifacts(run["mlflow_run_id"], "evaluation")}
        assert evaluation == {"evaluation/metrics.json"}


@pytest.mark.slow
def test_one_group_run_holds_the_runs_and_the_report(store):
    client, experiment = store["client"], store["experiment"]
    (group,) = client.search_runs([experiment], "tags.\"transferlab.role\" = 'group'")
    assert group.info.run_name == f"group/{tracking.group()}" and group.info.status == "FINISHED"
    assert group.info.end_time >= store["evaluated_at"]
    children = client.search_runs([experiment], f"tags.\"mlflow.parentRunId\" = '{group.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(r["record"].run_name for r in store["runs"])
    artifacts = {a.path for a in client.list_artifacts(group.info.run_id)}
    assert {"results.md", "results.csv", "plots"} <= artifacts
    assert "plots/comparison.png" in {a.path for a in client.list_artifacts(group.info.run_id, "plots")}
    md = (store["root"] / "reports/results.md").read_text()
    ui = f"http://127.0.0.1:5000/#/experiments/{experiment}/runs"
    assert f"[this run group]({ui}/{group.info.run_id}?workflowType=machine_learning)" in md
    assert f"[all training runs]({ui}?workflowType=machine_learning&orderByKey=" in md
    for run in store["runs"]:
        row = next(line for line in md.splitlines() if line.startswith(f"| `{run['record'].run_name}`"))
        assert f"[MLflow]({ui}/{run['mlflow_run_id']}?workflowType=machine_learning)" in row


@pytest.mark.slow
def test_evaluation_logs_every_figure_with_its_interval(store):
    client = store["client"]
    for run in store["runs"][:2]:
        m, logged = run["metrics"], client.get_run(run["mlflow_run_id"]).data.metrics
        for figure in ("accuracy", "balanced_accuracy", "macro_f1"):
            assert [logged[f"test_{figure}_ci95_lo"], logged[f"test_{figure}_ci95_hi"]] == pytest.approx(
                m[f"{figure}_ci95"]
            )
        mono = "test_group_accuracy/cell_type/mono"
        assert [logged[f"{mono}/ci95_lo"], logged[f"{mono}/ci95_hi"]] == pytest.approx(
            m["group_accuracy_ci95"]["cell_type"]["mono"]
        )
        assert "test_binary_accuracy" not in logged  # these classes have no binary mapping


def test_binary_accuracy_is_an_mlflow_metric_where_there_is_a_mapping():
    from transferlab import metrics

    m = metrics.compute([0, 1, 2, 2], [0, 2, 2, 1], ["a", "b", "c"], binary={"positive_classes": ["b", "c"]})
    logged = tracking.evaluation_metrics(m)
    assert logged["test_binary_accuracy"] == 1.0
    assert [logged["test_binary_accuracy_ci95_lo"], logged["test_binary_accuracy_ci95_hi"]] == [1.0, 1.0]
