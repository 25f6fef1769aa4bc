"""Cut-point activations: finetune_top's cached inputs, stored per fine-tuned backbone.

They are the output of the layer below what a cut point unfreezes (the boundary), for every
image of the train and val splits; finetune_top then trains only the layers above the boundary,
instead of running the whole base on every image of every epoch. They are large (VGG16 at 128 px:
128 KiB per image in float32), so they are written only when the cached path will read them, and
optionally in float16. Their record names everything that decides them, and finetune refuses a
record whose boundary (or inputs) differ from what it needs, naming both.
"""

from __future__ import annotations

from transferlab.provenance import CutRecord, ProvenanceMismatch, RunRecord

WRITTEN = "written"
NOT_NEEDED = "not needed"
SPLITS = ("train", "val")  # finetune_top trains on train and validates on val; test is scored on images
# the record's fields that must equal those of the run that reads the activations
CHECKED = (
    "boundary",
    "input_size",
    "preprocessing_fingerprint",
    "precision",
    "weights_array_checksum",
    "manifest_sha256",
)


def images_needed(ablation: dict, input_size: int, preset: str = "none") -> str | None:
    """Why finetune_top must train on images, or None when the cached activations serve.

    ``preset``: finetune.augmentation, the recipe's own augmentation of the train split."""
    if preset != "none":
        return f"finetune.augmentation is {preset!r} (augmented images are never cached)"
    if ablation["augmentation"] != "none":
        return f"ablation.augmentation is {ablation['augmentation']!r} (augmented images are never cached)"
    if ablation["input_size"] and ablation["input_size"] != input_size:
        return f"ablation.input_size {ablation['input_size']} differs from the extraction's {input_size}"
    return None


def not_needed(params: dict, input_size: int) -> str | None:
    """Why no cached fine-tuning run will read this backbone's activations, or None when one will."""
    if "finetune_top" not in params["finetune"]["methods"]:
        return "finetune.methods has no finetune_top"
    return images_needed(params["ablation"], input_size, params["finetune"]["augmentation"])


def _checked(record, boundary: str | None) -> dict:
    values = {k: getattr(record, k) for k in CHECKED if k not in ("boundary", "weights_array_checksum")}
    return {**values, "boundary": boundary, "weights_array_checksum": record.weights.array_checksum}


def check(stored: CutRecord, run_record: RunRecord, boundary: str, where: str) -> None:
    """Refuse cut activations that are not the ones this run needs; the message names both sides."""
    if stored.status != WRITTEN:
        raise ProvenanceMismatch(
            f"{where} holds no cut activations ({stored.reason or stored.status}), but this run "
            "trains on them; re-run `dvc repro` so extract_cut writes them"
        )
    found, needed = _checked(stored, stored.boundary), _checked(run_record, boundary)
    diff = [k for k in CHECKED if found[k] != needed[k]]
    if diff:
        lines = "; ".join(f"{k}: stored {found[k]!r}, needed {needed[k]!r}" for k in diff)
        raise ProvenanceMismatch(
            f"{where} holds cut activations other than the ones this run needs ({lines}); "
            "re-run `dvc repro` so extract_cut writes them again"
        )
