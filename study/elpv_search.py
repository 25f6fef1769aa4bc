"""Configuration search for the ELPV protocol (reports/elpv_benchmark.md) on cached cut-point activations.

Run in a workspace where `dvc repro extract_features` produced features/<backbone>-native with the cut
activations of the cut point searched (finetune.cut_point in params.yaml). Each call trains one configuration
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
from sklearn.metrics import balanced_accuracy_score, f1_score

from transferlab import backbones, data, features, precision, provenance, train, weights
from transferlab.params import validate

DEFECTIVE_FROM = 2  # class index from which the defect probability is >= 0.5 (likely_defective, defective)


def scores(y, pred) -> dict:
    return {
        "accuracy": float(np.mean(pred == y)),
        "binary_accuracy": float(np.mean((pred >= DEFECTIVE_FROM) == (y >= DEFECTIVE_FROM))),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro")),
    }


def finetune_top(params: dict, bb, boundary: str, meta: dict, head, split: dict, n_classes: int):
    """finetune_top on the cached cut activations, as stages/finetune.py trains it; returns (model, summary)."""
    ft, head_cfg, seed = params["finetune"], params["head"], params["train"]["seed"]
    train.seed_everything(seed)
    base = weights.load_backbone(bb, Path("models/weights") / bb.name, input_size=meta["input_size"])
    train.configure_base(base, boundary, False)
    top_head = train.head_for(base, n_classes, head_cfg, seed)
    if ft["head_init"] == "trained":
        top_head.set_weights(head.get_weights())
    model = train.top_model(base, boundary, top_head, head_cfg["pooling"])
    train.compile_for(model, ft, len(split["train"][0]))
    history, _, summary = train.fit_with(
        ft,
        model,
        train.feature_dataset(split["train"][1], split["train"][0], ft["batch_size"], seed),
        train.feature_dataset(split["val"][1], split["val"][0], ft["batch_size"]),
        split["train"][0],
        n_classes,
    )
    return model, summary


def main(name: str, overrides: list[str], out: Path = Path("search.jsonl")) -> None:
    raw = yaml.safe_load(Path("params.yaml").read_text())
    for item in overrides:
        key, value = item.split("=", 1)
        *parents, last = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[last] = yaml.safe_load(value)
    params = validate(raw)
    ft, head_cfg, seed = params["finetune"], params["head"], params["train"]["seed"]
    (backbone,) = ft["backbones"]
    pair, bb = f"{backbone}-native", backbones.get(backbone)
    boundary = backbones.cut_boundary(bb, ft["cut_point"][backbone])
    n_classes = len(data.load_classes())
    meta = provenance.load(Path("features") / pair / "meta.json")
    split = {s: features.load_split(Path("features") / pair, s, "cut")[1:] for s in ("train", "val", "test")}
    pooled = {s: features.load_split(Path("features") / pair, s, "pooled")[1:] for s in ("train", "val")}
    policy = precision.from_params(params)[0]
    start = time.perf_counter()
    with precision.policy(policy):
        (y_tr, x_tr), (y_va, x_va) = pooled["train"], pooled["val"]
        head, _, _, chosen = train.train_head(x_tr, y_tr, x_va, y_va, n_classes, params["train"], head_cfg)
        if not ft["methods"]:  # finetune.methods=[]: score train_head itself, on the pooled features
            model, summary, split = head, chosen, {**split, **pooled}
            split["test"] = features.load_split(Path("features") / pair, "test", "pooled")[1:]
        else:
            model, summary = finetune_top(params, bb, boundary, meta, head, split, n_classes)
        row = {"name": name, "overrides": " ".join(overrides), "seed": seed, **summary}
        row.pop("class_weights")
        for s in ("val", "test"):
            y, x = split[s]
            pred = train.predict_logits(model, train.feature_dataset(x, y, ft["batch_size"])).argmax(1)
            row.update({f"{s}_{k}": round(v, 4) for k, v in scores(y, pred).items()})
    row["seconds"] = round(time.perf_counter() - start, 1)
    print(row)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
