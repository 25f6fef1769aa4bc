"""export: the chosen run as one self-contained Keras model, checked against evaluate and registered in MLflow.

Picks the trained run with the best validation accuracy (or export.run), builds images -> preprocessing ->
backbone -> head -> softmax, checks it reproduces evaluate's test predictions, and writes models/export/:
model.keras (metadata inside), model.json (the same metadata, the check and the registry entry) and
saved_model/ (TF Serving). The model is logged to its training run and registered as
export.registered_model (default transferlab-<dataset>) with the alias export.alias.
"""

from transferlab import cli, data, export, files, layout, provenance


def main(params: dict) -> None:
    cfg = params["export"]
    found = export.candidates(layout.RUNS, layout.EVAL)
    chosen = export.choose(found, cfg["run"])
    run_dir = layout.run_dir(chosen["run_name"])
    record = provenance.load(run_dir / layout.RUN_RECORD, provenance.RunRecord)
    provenance.check_current(record, layout.WEIGHTS, layout.SPLIT)
    classes = data.load_classes(layout.SPLIT)
    model = export.build(record, run_dir, len(classes), layout.WEIGHTS)
    equivalence = export.check_equivalence(
        model,
        layout.eval_dir(chosen["run_name"]) / layout.PREDICTIONS,
        layout.SPLIT,
        classes,
        record.precision,
    )
    selection = {
        "chosen_by": "export.run" if cfg["run"] else "validation accuracy",
        "rule": export.SELECTION_RULE,
        "candidates": found,
    }
    meta = {**export.metadata(record, classes, selection), "equivalence_on_test": equivalence}
    with files.atomic_dir(layout.EXPORT) as out:
        export.save(model, meta, out)
        registry = export.register(
            model,
            meta,
            record,
            export.model_name(params["data"], cfg["registered_model"]),
            export.example_image(layout.SPLIT),
            cfg["alias"],
        )
        files.write_json(out / "model.json", {**meta, "mlflow": registry})
    print(
        f"export: {record.run_name} (validation accuracy {chosen['val_accuracy']:.3f}) -> models/export/, "
        f"{registry['uri']} = version {registry['version']}"
        + (" (existing version reused)" if registry["reused_existing_version"] else "")
        + f"; same classes as evaluate on all {equivalence['images']} test images, max |Δ probability| "
        f"{equivalence['max_abs_probability_diff']:.1e}"
    )


if __name__ == "__main__":
    cli.run("export", main, __doc__, errors=(export.ExportError, provenance.ProvenanceMismatch, data.DataError))
