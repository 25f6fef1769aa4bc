"""Configuration search for the ELPV protocol (reports/elpv_benchmark.md) on cached cut-point activations.

Run in a workspace where `dvc repro extract_cut` produced features/<backbone>-native and cut/<backbone>-native
(the activations of the cut point searched, finetune.cut_point in params.yaml). Each call trains one configuration
of finetune_top (head first trained on the pooled features with the train section's settings, as the pipeline
does) and appends its validation AND test figures to search.jsonl, so every configuration tried is reported;
configurations are chosen on the validation columns only.

  PYTHONPATH=<worktree> python <worktree>/study/elpv_search.py NAME [section.key=value ...]

e.g. `... elpv_search.py cos-cw finetune.lr_schedule=cosine finetune.warmup_epochs=1 finetune.class_weight=balanced`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from transferlab import backbones, cut, data, features, layout, metrics, precision, provenance, tracking, train, weights
from transferlab.params import validate, with_overrides


def finetune_top(params: dict, bb, boundary: str, meta, head, split: dict, n_classes: int):
    """finetune_top on the cached cut activations, as stages/finetune.py trains it; returns (model, summary)."""
    ft, head_cfg, seed = params["finetune"], params["head"], params["train"]["seed"]
    train.seed_everything(seed)
    base = weights.load_backbone(bb, layout.weights_dir(bb.name), input_size=meta.input_size)
    train.configure_base(base, boundary, False)
    top_head = train.head_for(base, n_classes, head_cfg, seed)
    if ft["head_init"] == "trained":
        top_head.set_weights(head.get_weights())
    model = train.top_model(base, boundary, top_head, head_cfg["pooling"])
    train.compile_for(model, ft, len(split["train"][0]))
    history, _, summary = train.fit_with(
        ft,
        model,
        train.feature_dataset(split["train"][1], split["train"][0], ft["batch_size"], seed, ft["oversample"]),
        train.feature_dataset(split["val"][1], split["val"][0], ft["batch_size"]),
        split["train"][0],
        n_classes,
    )
    return model, summary


def test_activations(bb, boundary: str, meta, batch_size: int):
    """(labels, cut activations) of the test split, computed here: extract_cut stores train and val only."""
    rows = data.load_manifest().query("split == 'test'")
    base = weights.load_backbone(bb, layout.weights_dir(bb.name), input_size=meta.input_size)
    model = features.extractor(base, boundary, conv_map=False, pooled=False)
    ds = features.image_dataset(data.resolve_paths(rows), rows["class_index"].tolist(), meta.preprocessing, batch_size)
    return rows["class_index"].to_numpy(), np.concatenate([model(x, training=False)["cut"].numpy() for x, _ in ds])


def not_applied(params: dict) -> list[str]:
    """Settings the pipeline would apply and this search cannot (it trains on the cached activations, with no
    ablation): search.jsonl records the overrides beside the figures, so they are refused."""
    ablation = [f"ablation.{k}={v}" for k, v in params["ablation"].items() if v != tracking.ABLATION_OFF[k]]
    augmentation = params["finetune"]["augmentation"]
    return ablation + ([f"finetune.augmentation={augmentation}"] if augmentation != "none" else [])


def main(name: str, overrides: list[str], out: Path = Path("search.jsonl")) -> None:
    params = validate(with_overrides(yaml.safe_load(Path("params.yaml").read_text()), overrides))
    ft, head_cfg, seed = params["finetune"], params["head"], params["train"]["seed"]
    (backbone,) = ft["backbones"]
    bb, classes = backbones.get(backbone), data.load_classes()
    boundary, n_classes = backbones.cut_boundary(bb, ft["cut_point"][backbone]), len(classes)
    features_dir, cut_dir = layout.features_dir(backbone, "native"), layout.cut_dir(backbone, "native")
    meta = provenance.load(cut_dir / layout.FEATURES_META, provenance.CutRecord)
    if meta.status != cut.WRITTEN or meta.boundary != boundary:
        raise SystemExit(
            f"{cut_dir} holds no activations at {boundary}; run `dvc repro extract_cut` with this cut point"
        )
    refused = not_applied(params)
    if refused:
        raise SystemExit(f"{', '.join(refused)}: the search trains on cached activations; use the pipeline")
    split = {s: features.load_split(cut_dir, s, "cut")[1:] for s in cut.SPLITS}
    pooled = {s: features.load_split(features_dir, s, "pooled")[1:] for s in ("train", "val", "test")}
    policy = precision.from_params(params)[0]
    start = time.perf_counter()
    with precision.policy(policy):
        (y_tr, x_tr), (y_va, x_va) = pooled["train"], pooled["val"]
        head, _, _, chosen = train.train_head(x_tr, y_tr, x_va, y_va, n_classes, params["train"], head_cfg)
        if not ft["methods"]:  # finetune.methods=[]: score train_head itself, on the pooled features
            model, summary, split = head, chosen, pooled
        else:
            model, summary = finetune_top(params, bb, boundary, meta, head, split, n_classes)
            split["test"] = test_activations(bb, boundary, meta, ft["batch_size"])
        row = {"name": name, "overrides": " ".join(overrides), "seed": seed, **summary}
        row.pop("class_weights")
        for s in ("val", "test"):
            y, x = split[s]
            pred = train.predict_logits(model, train.feature_dataset(x, y, ft["batch_size"])).argmax(1)
            figures = metrics.headline(y, pred, classes, data.binary_task("auto", classes))
            row.update({f"{s}_{k}": round(v, 4) for k, v in figures.items()})
    row["seconds"] = round(time.perf_counter() - start, 1)
    print(row)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
