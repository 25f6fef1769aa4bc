"""evaluate: score every trained run on the test split and write the comparison reports.

Each run is scored with exactly the preprocessing, input size, weights and manifest it was
trained with; a mismatch is refused, naming both records. Every run's inputs are checked
and scored before anything is written or logged, so a refusal leaves no partial evaluation.
Test metrics go into results/eval/, results/metrics/ (the DVC metrics: one flat file per scored
run), reports/ (tables, audit, plots, and the tables `dvc plots` draws) and the MLflow run that
trained the model, with its figures; the reports also go into the MLflow run of this
`dvc repro`'s group.
"""

import pandas as pd

from transferlab import (
    cli,
    data,
    dvcfiles,
    features,
    files,
    layout,
    metrics,
    precision,
    provenance,
    report,
    tracking,
    train,
)


def test_logits(record: provenance.RunRecord, run_dir, manifest: pd.DataFrame, n_classes: int, batch_size: int):
    """(ids, labels, logits) on the test split, after checking the inputs match the training record."""
    head_cfg = record.params["head"]
    if record.method == layout.TRAIN_HEAD:
        features_dir = layout.features_dir(record.backbone, record.variant)
        meta = provenance.load(features_dir / layout.FEATURES_META, provenance.FeaturesRecord)
        provenance.check_same(record, meta, record.run_name)
        ids, labels, x = features.load_split(features_dir, "test", train.feature_output(head_cfg["pooling"]))
        with precision.policy(record.precision):
            head = train.load_head(run_dir / layout.HEAD_WEIGHTS, x.shape[1:], n_classes, head_cfg)
        return ids, labels, train.predict_logits(head, train.feature_dataset(x, labels, batch_size))  # streamed
    provenance.check_current(record)
    model = train.load_end_to_end(record, run_dir, n_classes)
    rows = manifest[manifest["split"] == "test"]
    ds = features.image_dataset(
        data.resolve_paths(rows), rows["class_index"].tolist(), record.preprocessing, batch_size
    )
    return rows["id"].tolist(), rows["class_index"].to_numpy(), train.predict_logits(model, ds)


def main(all_params: dict) -> None:
    params = all_params["evaluate"]
    manifest = data.load_manifest()
    classes = data.load_classes()
    try:
        binary = data.binary_task(params["positive_classes"], classes)
    except ValueError as error:
        raise SystemExit(f"evaluate: {error}") from None
    by_id = manifest.set_index("id")
    runs, scored = [], []
    # Check and score everything first, so a refusal logs nothing. Only the runs the current params
    # define are scored: leftovers of other settings under runs/ are not.
    for name in layout.planned_runs(all_params):
        run_dir = layout.run_dir(name)
        record = provenance.load(run_dir / layout.RUN_RECORD, provenance.RunRecord)
        run = {"record": record, "metrics": None, "history": None}
        if record.status == "trained":
            ids, labels, logits = test_logits(record, run_dir, manifest, len(classes), params["batch_size"])
            if list(by_id.loc[ids, "class_index"]) != list(labels):
                raise SystemExit(f"{record.run_name}: test labels are not aligned with the manifest")
            scored.append((run, run_dir, ids, labels, logits))
        runs.append(run)
    for run, run_dir, ids, labels, logits in scored:
        record, pred = run["record"], logits.argmax(1)
        groups = {c: by_id.loc[ids, c].to_numpy() for c in params["group_by"] if c in by_id}
        run["metrics"] = metrics.compute(labels, pred, classes, groups, params["bootstrap"], params["seed"], binary)
        run["history"] = pd.read_csv(run_dir / layout.HISTORY)
        out = layout.eval_dir(record.run_name)
        out.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(
            {"id": ids, "label": labels, "pred": pred, **{f"logit_{c}": logits[:, i] for i, c in enumerate(classes)}}
        ).to_csv(out / layout.PREDICTIONS, index=False)
        files.write_json(out / layout.EVAL_METRICS, run["metrics"])
        print(
            f"{record.run_name}: test accuracy {run['metrics']['accuracy']:.3f} "
            f"[{run['metrics']['accuracy_ci95'][0]:.3f}, {run['metrics']['accuracy_ci95'][1]:.3f}]"
        )
    urls = tracking.link_runs(runs)
    report.write(runs, layout.REPORTS, urls)
    tracking.log_evaluation(runs, layout.REPORTS, layout.EVAL)
    dvcfiles.write(runs, layout.METRICS, layout.PLOTS)
    print(f"MLflow (`mlflow ui`): this run group {urls['group']}\n  all training runs {urls['runs']}")


if __name__ == "__main__":
    cli.run("evaluate", main, __doc__, errors=(provenance.ProvenanceMismatch, data.DataError))
