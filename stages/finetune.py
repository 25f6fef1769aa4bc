"""finetune: the frozen end-to-end model or top-block fine-tuning, for one backbone.

Usage: python stages/finetune.py METHOD BACKBONE    (METHOD: frozen_end_to_end | finetune_top)
frozen_end_to_end: the frozen base + the head, trained on images with train_head's settings;
  it must reproduce train_head, and the parity figures say whether it does.
finetune_top: unfreezes the base above its cut point, starting from train_head's head; trains on the
  cached cut-point activations unless augmentation or a different input size needs the images.
Writes runs/METHOD/PAIR/ (model weights, history, run.json) and DVCLive files in results/METHOD/PAIR/.
"""

import sys
from pathlib import Path

import mlflow
import numpy as np

from transferlab import backbones, data, features, files, precision, provenance, tracking, train, weights
from transferlab.params import FINETUNE_METHODS, load_for_stage


def parity(model, head_cfg: dict, n_classes: int, pair: str, val_images, pooling: str, batch_size: int) -> dict:
    """Compare with train_head on the validation split: same model, so logits should agree."""
    _, y_val, x_val = features.load_split(Path("features") / pair, "val", train.feature_output(pooling))
    head = train.load_head(Path("runs/train_head") / pair / "head.weights.h5", x_val.shape[1:], n_classes, head_cfg)
    bottleneck = train.predict_logits(head, train.feature_dataset(x_val, y_val, batch_size))
    end_to_end = train.predict_logits(model, val_images)
    acc = lambda logits: float(np.mean(logits.argmax(1) == y_val))  # noqa: E731
    return {
        "parity_max_abs_logit_diff": float(np.abs(bottleneck - end_to_end).max()),
        "parity_val_accuracy_diff": acc(end_to_end) - acc(bottleneck),
    }


def main(method: str, name: str) -> None:
    if method not in FINETUNE_METHODS:
        raise SystemExit(f"finetune: method must be one of {FINETUNE_METHODS}, got {method!r}")
    params = load_for_stage("finetune")
    ft, ablation, head_params = params["finetune"], params["ablation"], params["head"]
    cfg = params["train"] if method == "frozen_end_to_end" else ft
    seed, pair, bb = params["train"]["seed"], f"{name}-{ft['preprocessing']}", backbones.get(name)
    meta = provenance.load(Path("features") / pair / "meta.json")
    head_cfg = {**head_params, "dropout_position": ablation["dropout_position"] or head_params["dropout_position"]}
    batch_size = ablation["batch_size"] or cfg["batch_size"]
    input_size = ablation["input_size"] or meta["input_size"]
    boundary = backbones.cut_boundary(bb, ft["cut_point"].get(name, "")) if method == "finetune_top" else None
    record = provenance.describe(name, ft["preprocessing"], input_size, precision.from_params(params))
    record.update(
        run_name=f"{method}/{pair}",
        stage="finetune",
        method=method,
        status="trained",
        params={
            "train" if method == "frozen_end_to_end" else "finetune": cfg,
            "head": head_cfg,
            "ablation": ablation,
            "cut_boundary": boundary,
            "compute": {"precision": record["precision"]},
        },
    )
    with (
        files.atomic_dir(Path("runs") / method / pair) as out,
        files.atomic_dir(Path("results") / method / pair) as live_dir,
    ):
        if meta["status"] == "unavailable":
            tracking.skip_unavailable(out, live_dir, record, params)
            return
        # train_head's head and the cut activations come from these features: same precision, or refuse
        provenance.require_precision(meta.get("precision"), record["precision"], f"features/{pair}")
        manifest = data.load_manifest()
        manifest["abspath"] = data.resolve_paths(manifest)
        splits = {s: manifest[manifest["split"] == s] for s in ("train", "val")}
        n_classes = len(data.load_classes())
        augment = train.augmentation(method, ft["augmentation"], ablation["augmentation"])  # (train, val) presets
        cached = method == "finetune_top" and augment[0] is None and input_size == meta["input_size"]

        def images(split: str, shuffle: bool, preset: str | None):
            rows = splits[split]
            return features.image_dataset(
                rows["abspath"].tolist(),
                rows["class_index"].tolist(),
                record["preprocessing"],
                batch_size,
                seed if shuffle else None,
                seed + (split == "val") if preset else None,
                preset or "keras",
            )

        with tracking.run(record, params) as active:
            train.seed_everything(seed)
            with train.strategy().scope(), precision.policy(record["precision"]):
                base = weights.load_backbone(bb, Path("models/weights") / name, input_size=input_size)
                train.configure_base(base, boundary, ablation["bn_training"])
                head = train.head_for(base, n_classes, head_cfg, seed)
                if method == "finetune_top" and ft["head_init"] == "trained":
                    head.load_weights(Path("runs/train_head") / pair / "head.weights.h5")
                full = train.end_to_end(base, head, head_cfg["pooling"])
                model = train.top_model(base, boundary, head, head_cfg["pooling"]) if cached else full
                train.compile_for(model, cfg, len(splits["train"]), batch_size)
            if cached:
                data_sets = []
                for split in ("train", "val"):
                    _, labels, cut = features.load_split(Path("features") / pair, split, "cut")
                    data_sets.append(train.feature_dataset(cut, labels, batch_size, seed if split == "train" else None))
            else:
                data_sets = [images("train", True, augment[0]), images("val", False, augment[1])]
            y_train, live = splits["train"]["class_index"].to_numpy(), tracking.callbacks(live_dir)
            history, seconds, chosen = train.fit_with(cfg, model, *data_sets, y_train, n_classes, live)
            full.save_weights(out / "model.weights.h5")
            record.update(
                train_seconds=round(seconds, 2), mlflow_run_id=active.info.run_id, cached_path=cached, **chosen
            )
            if method == "frozen_end_to_end":
                with precision.policy(record["precision"]):  # both paths compute the base in this precision
                    record["parity"] = parity(
                        full,
                        params["head"],
                        n_classes,
                        pair,
                        images("val", False, None),
                        head_cfg["pooling"],
                        batch_size,
                    )
                mlflow.log_metrics(record["parity"])
                print("parity with train_head:", record["parity"])
            tracking.finish(out, record, history)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    try:
        main(*sys.argv[1:])
    except (provenance.ProvenanceMismatch, FloatingPointError) as error:
        raise SystemExit(f"finetune: {error}") from None
