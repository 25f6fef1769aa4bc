"""extract_cut: the cut-point activations of one fine-tuned backbone, finetune_top's cached inputs.

Writes cut/BACKBONE-PREPROCESSING/ (PREPROCESSING: finetune.preprocessing): {train,val}/cut.npy with ids and
labels, and meta.json naming the boundary layer, cut point, input size, preprocessing, precision, weights
and bytes. The activations are written only when a cached finetune_top run will read them; otherwise
meta.json alone says why none were. A stage per backbone, so one backbone's cut point re-runs only its own.
At cut point `all` (the whole network trains) the stored activations are the normalised images themselves.
"""

from transferlab import backbones, cli, cut, features, files, layout, precision, provenance, weights


def main(params: dict, name: str) -> None:
    extract, ft = params["extract"], params["finetune"]
    bb, variant, point = backbones.get(name), ft["preprocessing"], ft["cut_point"][name]
    source = provenance.describe(name, variant, extract["input_size"].get(name), precision.from_params(params))
    boundary = backbones.cut_boundary(bb, point)
    reason = (
        "weights unavailable" if source.weights.status == "unavailable" else cut.not_needed(params, source.input_size)
    )
    splits, size = {}, 0
    with files.atomic_dir(layout.cut_dir(name, variant)) as out:
        if reason:
            print(f"{name}: no cut activations written: {reason}")
        else:
            with precision.policy(source.precision):
                base = weights.load_backbone(bb, layout.weights_dir(name), input_size=source.input_size)
                model = features.extractor(base, boundary, conv_map=False, pooled=False)
            splits, _ = features.extract_splits(
                model, cut.SPLITS, source.preprocessing, extract["batch_size"], out, f"{name} cut", ft["cut_dtype"]
            )
            size = features.report_bytes(out, splits)
        record = provenance.CutRecord.of(
            source,
            status=cut.NOT_NEEDED if reason else cut.WRITTEN,
            reason=reason,
            cut_point=point,
            boundary=boundary,
            dtype=ft["cut_dtype"],
            batch_size=extract["batch_size"],
            versions=features.versions(),
            splits=splits,
            bytes=size,
        )
        provenance.write(record, out / layout.FEATURES_META)


if __name__ == "__main__":
    cli.run(
        "extract_cut",
        main,
        __doc__,
        {"backbone": sorted(backbones.REGISTRY)},
        (provenance.ProvenanceMismatch, ValueError),
    )
