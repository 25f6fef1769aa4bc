"""extract_features: pooled features (and the last conv map) of one backbone x preprocessing pair, per split.

Usage: python stages/extract_features.py BACKBONE PREPROCESSING
Writes features/BACKBONE-PREPROCESSING/{train,val,test}/ and meta.json (how they were made), and the
extraction speed to results/extract_features/BACKBONE-PREPROCESSING.json.
"""

import sys
from pathlib import Path

from transferlab import backbones, features, files, precision, provenance, weights
from transferlab.params import load_for_stage


def main(name: str, variant: str) -> None:
    params = load_for_stage("extract_features")
    extract = params["extract"]
    bb = backbones.get(name)
    meta = provenance.describe(name, variant, extract["input_size"].get(name), precision.from_params(params))
    meta.update(status=meta["weights"]["status"], batch_size=extract["batch_size"], versions=features.versions())
    speed = {"weights_unavailable": 1}
    with files.atomic_dir(Path("features") / f"{name}-{variant}") as out:
        if meta["status"] == "unavailable":
            print(f"{name}: weights unavailable, no features extracted. {meta['weights']['message']}")
        else:
            with precision.policy(meta["precision"]):  # features are stored as float32 whatever the policy
                base = weights.load_backbone(bb, Path("models/weights") / name, input_size=meta["input_size"])
                model = features.extractor(base, None, extract["conv_map"])
            meta["splits"], speed = features.extract_splits(
                model, features.SPLITS, meta["preprocessing"], extract["batch_size"], out, f"{name}-{variant}"
            )
            meta["bytes"] = features.report_bytes(out, meta["splits"])
        files.write_json(out / "meta.json", meta)
    # Timings vary run to run; kept out of features/ so identical features keep later stages cached.
    metrics = Path("results/extract_features") / f"{name}-{variant}.json"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(metrics, speed)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
