"""extract_cut: the cut-point activations of one fine-tuned backbone, finetune_top's cached inputs.

Usage: python stages/extract_cut.py BACKBONE
Writes cut/BACKBONE-PREPROCESSING/ (PREPROCESSING: finetune.preprocessing): {train,val}/cut.npy with ids and
labels, and meta.json naming the boundary layer, cut point, input size, preprocessing, precision, weights
and bytes. The activations are written only when a cached finetune_top run will read them; otherwise
meta.json alone says why none were. A stage per backbone, so one backbone's cut point re-runs only its own.
"""

import sys
from pathlib import Path

from transferlab import backbones, cut, features, files, precision, provenance, weights
from transferlab.params import load_for_stage


def main(name: str) -> None:
    params = load_for_stage("extract_cut")
    extract, ft = params["extract"], params["finetune"]
    bb, variant = backbones.get(name), ft["preprocessing"]
    meta = provenance.describe(name, variant, extract["input_size"].get(name), precision.from_params(params))
    point = ft["cut_point"][name]
    meta.update(
        cut_point=point,
        boundary=backbones.cut_boundary(bb, point),
        dtype=ft["cut_dtype"],
        batch_size=extract["batch_size"],
        versions=features.versions(),
        bytes=0,
    )
    reason = cut.not_needed(params, meta["input_size"])
    if meta["weights"]["status"] == "unavailable":
        reason = "weights unavailable"
    with files.atomic_dir(Path("cut") / f"{name}-{variant}") as out:
        if reason:
            meta.update(status=cut.NOT_NEEDED, reason=reason)
            print(f"{name}: no cut activations written: {reason}")
        else:
            with precision.policy(meta["precision"]):
                base = weights.load_backbone(bb, Path("models/weights") / name, input_size=meta["input_size"])
                model = features.extractor(base, meta["boundary"], conv_map=False, pooled=False)
            meta["splits"], _ = features.extract_splits(
                model, cut.SPLITS, meta["preprocessing"], extract["batch_size"], out, f"{name} cut", ft["cut_dtype"]
            )
            meta.update(status=cut.WRITTEN, bytes=features.report_bytes(out, meta["splits"]))
        files.write_json(out / "meta.json", meta)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
