"""extract_features: pooled (and cut-point) features of one backbone x preprocessing pair, per split.

Writes features/BACKBONE-PREPROCESSING/{train,val,test}/ and meta.json (how they were made), and the
extraction speed to results/extract_features/BACKBONE-PREPROCESSING.json.
"""

from transferlab import backbones, cli, data, features, files, layout, precision, provenance, weights


def main(params: dict, name: str, variant: str) -> None:
    extract, finetune = params["extract"], params["finetune"]
    bb = backbones.get(name)
    source = provenance.describe(name, variant, extract["input_size"].get(name), precision.from_params(params))
    cut, splits, speed = None, {}, {"weights_unavailable": 1}
    with files.atomic_dir(layout.features_dir(name, variant)) as out:
        if source.weights.status == "unavailable":
            print(f"{name}: weights unavailable, no features extracted. {source.weights.message}")
        else:
            # cut activations feed finetune_top's cached path; stored whatever finetune.backbones says
            if name in finetune["cut_point"] and variant == finetune["preprocessing"]:
                cut = backbones.cut_boundary(bb, finetune["cut_point"][name])
            with precision.policy(source.precision):  # features are stored as float32 whatever the policy
                base = weights.load_backbone(bb, layout.weights_dir(name), input_size=source.input_size)
                model = features.extractor(base, cut, extract["conv_map"])
            manifest = data.load_manifest()
            manifest["abspath"] = data.resolve_paths(manifest)
            speed = {}
            for split in features.SPLITS:
                rows = manifest[manifest["split"] == split]
                stats = features.extract_split(
                    model,
                    rows["abspath"].tolist(),
                    rows["class_index"].tolist(),
                    rows["id"].tolist(),
                    source.preprocessing,
                    extract["batch_size"],
                    out / split,
                    f"{layout.pair(name, variant)} {split}",
                )
                speed[split] = {k: stats.pop(k) for k in ("seconds", "images_per_second")}
                splits[split] = stats
        meta = provenance.FeaturesRecord.of(
            source,
            status=source.weights.status,
            batch_size=extract["batch_size"],
            versions=features.versions(),
            cut_boundary=cut,
            splits=splits,
        )
        provenance.write(meta, out / layout.FEATURES_META)
    # Timings vary run to run; kept out of features/ so identical features keep later stages cached.
    metrics = layout.extract_speed(name, variant)
    metrics.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(metrics, speed)


if __name__ == "__main__":
    cli.run(
        "extract_features", main, __doc__, {"backbone": sorted(backbones.REGISTRY), "preprocessing": backbones.VARIANTS}
    )
