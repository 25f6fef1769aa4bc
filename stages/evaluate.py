"""evaluate: score every trained run on the test split and write the comparison reports.

Each run is scored with exactly the preprocessing, input size, weights and manifest it was
trained with; a mismatch is refused, naming both records. Every run's inputs are checked
and scored before anything is written or logged, so a refusal leaves no partial evaluation.
Test metrics go into results/eval/, results/metrics/ (the DVC metrics: one flat file per scored
run), reports/ (tables, audit, plots, and the tables `dvc plots` draws) and the MLflow run that
trained the model, with its figures; the reports also go into the MLflow run of this
`dvc repro`'s group.
"""

from pathlib import Path

import pandas as pd

from transferlab import (
    backbones,
    data,
    dvcfiles,
    features,
    files,
    metrics,
    precision,
    provenance,
    report,
    tracking,
    train,
)
from transferlab.params import load_for_stage


def test_logits(record: dict, run_dir: Path, manifest: pd.DataFrame, n_classes: int):
    """(ids, labels, logits) on the test split, after checking the inputs match the training record."""
    pair = f"{record['backbone']}-{record['preprocessing']['variant']}"
    head_cfg = record["params"]["head"]
    if record["method"] == "bottleneck":
        meta = provenance.load(Path("features") / pair / "meta.json")
        provenance.check_same(record, meta, record["run_name"])
        ids, labels, x = features.load_split(Path("features") / pair, "test", train.feature_output(head_cfg["pooling"]))
        with precision.policy(record.get("precision")):
            head = train.load_head(run_dir / "head.weights.h5", x.shape[1:], n_classes, head_cfg)
        return ids, labels, train.predict_logits(head, train.feature_dataset(x, labels, 32))  # streamed
    provenance.check_current(record)
    with precision.policy(record.get("precision")):
        base = backbones.get(record["backbone"]).build(False, None, record["input_size"])
        model = train.end_to_end(base, train.head_for(base, n_classes, head_cfg, 0), head_cfg["pooling"])
    model.load_weights(run_dir / "model.weights.h5")
    rows = manifest[manifest["split"] == "test"]
    ds = features.image_dataset(data.resolve_paths(rows), rows["class_index"].tolist(), record["preprocessing"], 32)
    return rows["id"].tolist(), rows["class_index"].to_numpy(), train.predict_logits(model, ds)


def run_dirs(params: dict) -> list[Path]:
    """The runs the current params define; leftovers of other settings under runs/ are not scored."""
    extract, finetune = params["extract"], params["finetune"]
    pairs = [Path("runs/train_head") / f"{b}-{p}" for b in extract["backbones"] for p in extract["preprocessing"]]
    return pairs + [
        Path("runs") / m / f"{b}-{finetune['preprocessing']}"
        for m in finetune["methods"]
        for b in finetune["backbones"]
    ]


def main() -> None:
    all_params = load_for_stage("evaluate")
    params = all_params["evaluate"]
    manifest = data.load_manifest()
    classes = data.load_classes()
    by_id = manifest.set_index("id")
    runs, scored = [], []
    for run_dir in run_dirs(all_params):  # check and score everything first: a refusal logs nothing
        record = provenance.load(run_dir / "run.json")
        run = {"record": record, "metrics": None, "history": None}
        if record["status"] == "trained":
            ids, labels, logits = test_logits(record, run_dir, manifest, len(classes))
            if list(by_id.loc[ids, "class_index"]) != list(labels):
                raise SystemExit(f"{record['run_name']}: test labels are not aligned with the manifest")
            scored.append((run, run_dir, ids, labels, logits))
        runs.append(run)
    for run, run_dir, ids, labels, logits in scored:
        record, pred = run["record"], logits.argmax(1)
        groups = {c: by_id.loc[ids, c].to_numpy() for c in params["group_by"] if c in by_id}
        run["metrics"] = metrics.compute(labels, pred, classes, groups, params["bootstrap"], params["seed"])
        run["history"] = pd.read_csv(run_dir / "history.csv")
        out = Path("results/eval") / record["run_name"]
        out.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(
            {"id": ids, "label": labels, "pred": pred, **{f"logit_{c}": logits[:, i] for i, c in enumerate(classes)}}
        ).to_csv(out / "predictions.csv", index=False)
        files.write_json(out / "metrics.json", run["metrics"])
        print(
            f"{record['run_name']}: test accuracy {run['metrics']['accuracy']:.3f} "
            f"[{run['metrics']['accuracy_ci95'][0]:.3f}, {run['metrics']['accuracy_ci95'][1]:.3f}]"
        )
    urls = tracking.link_runs(runs)
    report.write(runs, Path("reports"), urls)
    tracking.log_evaluation(runs, Path("reports"), Path("results/eval"))
    dvcfiles.write(runs, Path("results/metrics"), Path("reports/plots"))
    print(f"MLflow (`mlflow ui`): this run group {urls['group']}\n  all training runs {urls['runs']}")


if __name__ == "__main__":
    try:
        main()
    except provenance.ProvenanceMismatch as error:
        raise SystemExit(f"evaluate: {error}") from None
