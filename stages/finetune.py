"""finetune: the frozen end-to-end model or top-block fine-tuning, for one backbone.

frozen_end_to_end: the frozen base + the head, trained on images with train_head's settings;
  it must reproduce train_head, and the parity figures say whether it does.
finetune_top: unfreezes the base above its cut point, starting from train_head's head; trains on the
  cached cut-point activations unless augmentation or a different input size needs the images.
Writes runs/METHOD/PAIR/ (model weights, history, run.json) and DVCLive files in results/METHOD/PAIR/.
"""

import dataclasses

import mlflow

from transferlab import (
    backbones,
    cli,
    cut,
    data,
    features,
    files,
    layout,
    precision,
    provenance,
    tracking,
    train,
    weights,
)
from transferlab import finetune as planning


def main(params: dict, method: str, name: str) -> None:
    ablation, preprocessing = params["ablation"], params["finetune"]["preprocessing"]
    features_dir = layout.features_dir(name, preprocessing)
    head_weights = layout.run_dir(layout.run_name(layout.TRAIN_HEAD, name, preprocessing)) / layout.HEAD_WEIGHTS
    meta = provenance.load(features_dir / layout.FEATURES_META, provenance.FeaturesRecord)
    plan = planning.plan(method, name, params, meta)
    seed, batch_size, cfg = plan.seed, plan.batch_size, plan.cfg
    source = provenance.describe(name, plan.preprocessing, plan.input_size, precision.from_params(params))
    record = provenance.RunRecord.of(
        source,
        run_name=plan.run_name,
        stage="finetune",
        method=method,
        status="trained",
        params={**plan.recorded, "compute": {"precision": source.precision}},
    )
    with (
        files.atomic_dir(layout.run_dir(plan.run_name)) as out,
        files.atomic_dir(layout.live_dir(plan.run_name)) as live_dir,
    ):
        if meta.status == "unavailable":
            tracking.skip_unavailable(out, live_dir, record, params)
            return
        # train_head's head and the cut activations come from these features: same precision, or refuse
        provenance.require_precision(meta.precision, record.precision, features_dir.as_posix())
        manifest = data.load_manifest()
        manifest["abspath"] = data.resolve_paths(manifest)
        splits = {s: manifest[manifest["split"] == s] for s in ("train", "val")}
        n_classes = len(data.load_classes())
        cut_dir = layout.cut_dir(name, preprocessing)
        if plan.cached:  # the activations must come from this run's boundary and inputs, or it refuses them
            cut.check(
                provenance.load(cut_dir / layout.FEATURES_META, provenance.CutRecord),
                record,
                plan.boundary,
                f"{cut_dir}",
            )

        def images(split: str, shuffle: bool, preset: str | None):
            rows = splits[split]
            return features.image_dataset(
                rows["abspath"].tolist(),
                rows["class_index"].tolist(),
                record.preprocessing,
                batch_size,
                seed if shuffle else None,
                seed + (split == "val") if preset else None,
                preset or "keras",
                cfg["oversample"],  # unshuffled (validation): in order, never resampled
            )

        with tracking.run(record, params) as active:
            train.seed_everything(seed)
            with train.strategy().scope(), precision.policy(record.precision):
                base = weights.load_backbone(backbones.get(name), layout.weights_dir(name), input_size=plan.input_size)
                train.configure_base(base, plan.boundary, ablation["bn_training"])
                head = train.head_for(base, n_classes, plan.head_cfg, seed)
                if plan.trained_head:
                    head.load_weights(head_weights)
                full = train.end_to_end(base, head, plan.head_cfg["pooling"])
                model = train.top_model(base, plan.boundary, head, plan.head_cfg["pooling"]) if plan.cached else full
                train.compile_for(model, cfg, len(splits["train"]), batch_size)
            if plan.cached:
                data_sets = []
                for split in ("train", "val"):
                    _, labels, x = features.load_split(cut_dir, split, "cut")
                    shuffle_seed = seed if split == "train" else None
                    data_sets.append(train.feature_dataset(x, labels, batch_size, shuffle_seed, cfg["oversample"]))
            else:
                data_sets = [images("train", True, plan.augment[0]), images("val", False, plan.augment[1])]
            y_train, live = splits["train"]["class_index"].to_numpy(), tracking.callbacks(live_dir)
            history, seconds, chosen = train.fit_with(cfg, model, *data_sets, y_train, n_classes, live)
            full.save_weights(out / layout.MODEL_WEIGHTS)
            record = dataclasses.replace(
                record,
                train_seconds=round(seconds, 2),
                mlflow_run_id=active.info.run_id,
                cached_path=plan.cached,
                **chosen,
            )
            if method == "frozen_end_to_end":
                with precision.policy(record.precision):  # both paths compute the base in this precision
                    agreement = planning.parity(
                        full,
                        params["head"],
                        n_classes,
                        features_dir,
                        head_weights,
                        images("val", False, None),
                        batch_size,
                    )
                record = dataclasses.replace(record, parity=provenance.Parity(**agreement))
                mlflow.log_metrics(agreement)
                print("parity with train_head:", agreement)
            tracking.finish(out, record, history)


if __name__ == "__main__":
    cli.run(
        "finetune",
        main,
        __doc__,
        {"method": layout.FINETUNE_METHODS, "backbone": sorted(backbones.REGISTRY)},
        (provenance.ProvenanceMismatch, FloatingPointError, data.DataError),
    )
