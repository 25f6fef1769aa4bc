"""DVC stage: resolve one backbone's pretrained weights into models/weights/<backbone>.

Exits non-zero when a file named in weights.paths cannot be used, or with weights.missing: error;
otherwise a missing backbone is recorded as "weights unavailable" for later stages to skip and name.
"""

import sys

from transferlab import backbones, cli, layout, weights


def summary(identity: dict) -> str:
    checksum = identity["array_checksum"] or "-"
    file_sha = identity["file_sha256"] or "-"
    return (
        f"{identity['backbone']}: {identity['status']} | {identity['label']} | source {identity['source']} | "
        f"file sha256 {file_sha[:16]} | arrays {checksum[:16]} | top {'yes' if identity['top_available'] else 'no'}"
    )


def main(params: dict, name: str) -> None:
    identity = weights.resolve(backbones.get(name), params["weights"], layout.weights_dir(name))
    print(summary(identity))
    if identity["message"]:
        print(identity["message"], file=sys.stderr)


if __name__ == "__main__":
    cli.run(
        "weights",
        main,
        __doc__,
        {"backbone": sorted(backbones.REGISTRY)},
        (weights.WeightsUnavailable, weights.WeightsFileError),
    )
