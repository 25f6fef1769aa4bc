"""train_head: the classification head on cached bottleneck features of one backbone x preprocessing pair.

Usage: python stages/train_head.py BACKBONE PREPROCESSING
Writes runs/train_head/PAIR/ (head weights, history, run.json) and DVCLive files in results/train_head/PAIR/.
"""

import sys
from pathlib import Path

from transferlab import data, features, files, precision, provenance, tracking, train
from transferlab.params import load_for_stage


def main(name: str, variant: str) -> None:
    params = load_for_stage("train_head")
    cfg, head_cfg = params["train"], params["head"]
    pair = f"{name}-{variant}"
    meta = provenance.load(Path("features") / pair / "meta.json")
    record = {
        k: meta[k]
        for k in ("backbone", "input_size", "preprocessing", "preprocessing_fingerprint", "weights", "manifest_sha256")
    }
    record["precision"], record["precision_reason"] = precision.from_params(params)
    record.update(
        run_name=f"train_head/{pair}",
        stage="train_head",
        method="bottleneck",
        status="trained",
        params={"train": cfg, "head": head_cfg, "compute": {"precision": record["precision"]}},
    )
    with (
        files.atomic_dir(Path("runs/train_head") / pair) as out,
        files.atomic_dir(Path("results/train_head") / pair) as live_dir,
    ):
        if meta["status"] == "unavailable":
            tracking.skip_unavailable(out, live_dir, record, params)
            return
        provenance.require_precision(meta.get("precision"), record["precision"], f"features/{pair}")
        output = train.feature_output(head_cfg["pooling"])
        _, y_train, x_train = features.load_split(Path("features") / pair, "train", output)
        _, y_val, x_val = features.load_split(Path("features") / pair, "val", output)
        with tracking.run(record, params) as active, precision.policy(record["precision"]):
            head, history, seconds, chosen = train.train_head(
                x_train, y_train, x_val, y_val, len(data.load_classes()), cfg, head_cfg, tracking.callbacks(live_dir)
            )
            head.save_weights(out / "head.weights.h5")
            record.update(train_seconds=round(seconds, 2), mlflow_run_id=active.info.run_id, **chosen)
            tracking.finish(out, record, history)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    try:
        main(*sys.argv[1:])
    except (provenance.ProvenanceMismatch, FloatingPointError) as error:
        raise SystemExit(f"train_head: {error}") from None
