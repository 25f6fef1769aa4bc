"""extract_features: pooled features (and the last conv map) of one backbone x preprocessing pair, per split.

Writes features/BACKBONE-PREPROCESSING/{train,val,test}/ and meta.json (how they were made), and the
extraction speed to results/extract_features/BACKBONE-PREPROCESSING.json.
"""

from transferlab import backbones, cli, data, features, files, layout, precision, provenance, weights


def main(params: dict, name: str, variant: str) -> None:
    extract = params["extract"]
    bb = backbones.get(name)
    source = provenance.describe(name, variant, extract["input_size"].get(name), precision.from_params(params))
    splits, speed = {}, {"weights_unavailable": 1}
    with files.atomic_dir(layout.features_dir(name, variant)) as out:
        if source.weights.status == "unavailable":
            print(f"{name}: weights unavailable, no features extracted. {source.weights.message}")
        else:
            with precision.policy(source.precision):  # features are stored as float32 whatever the policy
                base = weights.load_backbone(bb, layout.weights_dir(name), input_size=source.input_size)
                model = features.extractor(base, None, extract["conv_map"])
            splits, speed = features.extract_splits(
                model, features.SPLITS, source.preprocessing, extract["batch_size"], out, layout.pair(name, variant)
            )
        meta = provenance.FeaturesRecord.of(
            source,
            status=source.weights.status,
            batch_size=extract["batch_size"],
            versions=features.versions(),
            splits=splits,
            bytes=features.report_bytes(out, splits) if splits else 0,
        )
        provenance.write(meta, out / layout.FEATURES_META)
    # Timings vary run to run; kept out of features/ so identical features keep later stages cached.
    metrics = layout.extract_speed(name, variant)
    metrics.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(metrics, speed)


if __name__ == "__main__":
    cli.run(
        "extract_features",
        main,
        __doc__,
        {"backbone": sorted(backbones.REGISTRY), "preprocessing": backbones.VARIANTS},
        (data.DataError,),
    )
