"""What the finetune stage does for one (method, backbone), decided before any model is built.

frozen_end_to_end must reproduce train_head, so it takes train's settings; finetune_top takes
finetune's. The ablation switches override one thing each. finetune_top trains on the cached
cut-point activations (the "cached path") unless augmentation or a different input size needs
the images themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferlab import backbones, cut, features, layout, provenance, train


@dataclass(frozen=True)
class Plan:
    method: str
    backbone: str
    preprocessing: str
    run_name: str
    section: str  # the params section the method trains with: "train" or "finetune"
    cfg: dict  # that section
    head_cfg: dict  # head, with the ablation's dropout position
    seed: int
    batch_size: int
    input_size: int | list[int]
    boundary: str | None  # the lowest unfrozen layer (finetune_top), None: the whole base stays frozen
    cached: bool  # train the top on the stored cut-point activations instead of on images
    augment: tuple[str | None, str | None]  # the augmentation preset of (train, val), None: none
    trained_head: bool  # start from train_head's head weights
    recorded: dict  # the params sections the run depends on (run.json and MLflow params; compute aside)


def plan(method: str, backbone: str, params: dict, features_meta: provenance.FeaturesRecord) -> Plan:
    """The plan for ``method`` on ``backbone`` given the checked params and its features' meta.json."""
    ft, ablation, head = params["finetune"], params["ablation"], params["head"]
    section = "train" if method == "frozen_end_to_end" else "finetune"
    # finetune_top records this backbone's cut point only: the stage depends on finetune.cut_point.<backbone> alone
    cfg = params["train"] if section == "train" else {**ft, "cut_point": ft["cut_point"].get(backbone)}
    input_size = ablation["input_size"] or features_meta.input_size
    top = method == "finetune_top"
    trained_head = top and ft["head_init"] == "trained"
    boundary = backbones.cut_boundary(backbones.get(backbone), ft["cut_point"].get(backbone, "")) if top else None
    head_cfg = {**head, "dropout_position": ablation["dropout_position"] or head["dropout_position"]}
    # finetune_top seeds its head, shuffle and augmentation with train.seed, and a trained head is train_head's:
    # recorded without the train section, its runs at different seeds would look alike
    trains_with = params["train"] if trained_head else {"seed": params["train"]["seed"]}
    return Plan(
        method=method,
        backbone=backbone,
        preprocessing=ft["preprocessing"],
        run_name=layout.run_name(method, backbone, ft["preprocessing"]),
        section=section,
        cfg=cfg,
        head_cfg=head_cfg,
        seed=params["train"]["seed"],
        batch_size=ablation["batch_size"] or cfg["batch_size"],
        input_size=input_size,
        boundary=boundary,
        cached=top and cut.images_needed(ablation, features_meta.input_size, ft["augmentation"]) is None,
        augment=train.augmentation(method, ft["augmentation"], ablation["augmentation"]),
        trained_head=trained_head,
        recorded={
            **({"train": trains_with} if top else {}),
            section: cfg,
            "head": head_cfg,
            "ablation": ablation,
            "cut_boundary": boundary,
        },
    )


def parity(
    model, head_cfg: dict, n_classes: int, features_dir: Path, head_weights: Path, val_images, batch_size: int
) -> dict:
    """Compare with train_head on the validation split: same model, so logits should agree.

    ``head_cfg``: train_head's own head settings (no ablation), whose weights are ``head_weights``."""
    _, y_val, x_val = features.load_split(features_dir, "val", train.feature_output(head_cfg["pooling"]))
    head = train.load_head(head_weights, x_val.shape[1:], n_classes, head_cfg)
    on_features = train.predict_logits(head, train.feature_dataset(x_val, y_val, batch_size))
    end_to_end = train.predict_logits(model, val_images)
    acc = lambda logits: float(np.mean(logits.argmax(1) == y_val))  # noqa: E731
    return {
        "parity_max_abs_logit_diff": float(np.abs(on_features - end_to_end).max()),
        "parity_val_accuracy_diff": acc(end_to_end) - acc(on_features),
    }
