"""DVC stage: resolve one backbone's pretrained weights into models/weights/<backbone>.

Usage: python stages/weights.py <backbone>
Exits non-zero when a file named in weights.paths cannot be used, or with weights.missing: error;
otherwise a missing backbone is recorded as "weights unavailable" for later stages to skip and name.
"""

import argparse
import sys
from pathlib import Path

from transferlab import backbones, weights
from transferlab.params import load_for_stage

ROOT = Path(__file__).resolve().parents[1]


def summary(identity: dict) -> str:
    checksum = identity["array_checksum"] or "-"
    file_sha = identity["file_sha256"] or "-"
    return (
        f"{identity['backbone']}: {identity['status']} | {identity['label']} | source {identity['source']} | "
        f"file sha256 {file_sha[:16]} | arrays {checksum[:16]} | top {'yes' if identity['top_available'] else 'no'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbone", choices=sorted(backbones.REGISTRY))
    args = parser.parse_args(argv)
    params = load_for_stage("weights", ROOT / "params.yaml")["weights"]
    try:
        identity = weights.resolve(backbones.get(args.backbone), params, ROOT / "models" / "weights" / args.backbone)
    except (weights.WeightsUnavailable, weights.WeightsFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary(identity))
    if identity["message"]:
        print(identity["message"], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
