"""export: the chosen run as one self-contained Keras model, checked against evaluate and registered in MLflow.

Picks the trained run with the best validation accuracy (or export.run), builds images -> preprocessing ->
backbone -> head -> softmax, checks it reproduces evaluate's test predictions, and writes models/export/:
model.keras (metadata inside), model.json (the same metadata, the check and the registry entry) and
saved_model/ (TF Serving). The model is logged to its training run and registered as
export.registered_model (default transferlab-<dataset>) with the alias export.alias.
"""

from pathlib import Path

from transferlab import data, export, files, provenance
from transferlab.params import load_for_stage


def main() -> None:
    params = load_for_stage("export")
    cfg = params["export"]
    split_dir, weights_root = Path("data/split"), Path("models/weights")
    try:
        found = export.candidates(Path("runs"), Path("results/eval"))
        chosen = export.choose(found, cfg["run"])
        record = provenance.load(Path("runs") / chosen["run_name"] / "run.json", provenance.RunRecord)
        provenance.check_current(record, weights_root, split_dir)
        classes = data.load_classes(split_dir)
        model = export.build(record, Path("runs") / chosen["run_name"], len(classes), weights_root)
        equivalence = export.check_equivalence(
            model,
            Path("results/eval") / chosen["run_name"] / "predictions.csv",
            split_dir,
            classes,
            record.precision,
        )
    except (export.ExportError, provenance.ProvenanceMismatch) as error:
        raise SystemExit(f"export: {error}") from None
    selection = {
        "chosen_by": "export.run" if cfg["run"] else "validation accuracy",
        "rule": export.SELECTION_RULE,
        "candidates": found,
    }
    meta = {**export.metadata(record, classes, selection), "equivalence_on_test": equivalence}
    with files.atomic_dir(Path("models/export")) as out:
        export.save(model, meta, out)
        registry = export.register(
            model,
            meta,
            record,
            export.model_name(params["data"], cfg["registered_model"]),
            export.example_image(split_dir),
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
    main()
