"""train_head: the classification head on cached bottleneck features of one backbone x preprocessing pair.

Writes runs/train_head/PAIR/ (head weights, history, run.json) and DVCLive files in results/train_head/PAIR/.
"""

import dataclasses

from transferlab import backbones, cli, data, features, files, layout, precision, provenance, tracking, train


def main(params: dict, name: str, variant: str) -> None:
    cfg, head_cfg = params["train"], params["head"]
    features_dir, run_name = layout.features_dir(name, variant), layout.run_name(layout.TRAIN_HEAD, name, variant)
    meta = provenance.load(features_dir / layout.FEATURES_META, provenance.FeaturesRecord)
    resolved, reason = precision.from_params(params)
    record = provenance.RunRecord.of(
        meta,
        precision=resolved,
        precision_reason=reason,
        run_name=run_name,
        stage="train_head",
        method=layout.TRAIN_HEAD,
        status="trained",
        params={"train": cfg, "head": head_cfg, "compute": {"precision": resolved}},
    )
    with (
        files.atomic_dir(layout.run_dir(run_name)) as out,
        files.atomic_dir(layout.live_dir(run_name)) as live_dir,
    ):
        if meta.status == "unavailable":
            tracking.skip_unavailable(out, live_dir, record, params)
            return
        provenance.require_precision(meta.precision, record.precision, features_dir.as_posix())
        output = train.feature_output(head_cfg["pooling"])
        _, y_train, x_train = features.load_split(features_dir, "train", output)
        _, y_val, x_val = features.load_split(features_dir, "val", output)
        with tracking.run(record, params) as active, precision.policy(record.precision):
            head, history, seconds, chosen = train.train_head(
                x_train, y_train, x_val, y_val, len(data.load_classes()), cfg, head_cfg, tracking.callbacks(live_dir)
            )
            head.save_weights(out / layout.HEAD_WEIGHTS)
            record = dataclasses.replace(
                record,
                train_seconds=round(seconds, 2),
                mlflow_run_id=active.info.run_id,
                **chosen,
            )
            tracking.finish(out, record, history)


if __name__ == "__main__":
    cli.run(
        "train_head",
        main,
        __doc__,
        {"backbone": sorted(backbones.REGISTRY), "preprocessing": backbones.VARIANTS},
        (provenance.ProvenanceMismatch, FloatingPointError),
    )
