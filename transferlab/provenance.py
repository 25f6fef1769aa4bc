"""What produced a result: backbone, preprocessing, weights and data, as one comparable record.

Features, trained runs and evaluations each carry this record; evaluation refuses to
score a model on inputs whose record differs from the one it was trained with. Every
read goes through :func:`load`, which recomputes the fingerprint from the stored
preprocessing record, so an edited record cannot pass under its old fingerprint.
"""

from __future__ import annotations

from pathlib import Path

from transferlab import backbones, data, files, layout

# the fields that must agree between training and scoring
CHECKED = (
    "backbone",
    "preprocessing_fingerprint",
    "input_size",
    "weights_array_checksum",
    "manifest_sha256",
    "precision",
)


class ProvenanceMismatch(ValueError):
    """Inputs or records differ from what produced a result; the message names both sides."""


def load(path) -> dict:
    """A stored record (features' meta.json, a run's run.json), refused if its fingerprint does not match it."""
    record = files.read_json(path)
    stored, recomputed = record.get("preprocessing_fingerprint"), backbones.fingerprint(record.get("preprocessing"))
    if stored != recomputed:
        raise ProvenanceMismatch(
            f"{path}: the stored preprocessing_fingerprint {stored!r} does not match the fingerprint "
            f"{recomputed!r} of the preprocessing record stored beside it; the record was edited or damaged. "
            "Re-run the stage that wrote it."
        )
    return record


def describe(
    backbone: str,
    variant: str,
    input_size: int | None,
    precision: tuple[str, str],
    weights_root=layout.WEIGHTS,
    split_dir=layout.SPLIT,
) -> dict:
    """``precision`` is (resolved precision, why), as transferlab.precision.resolve gives it."""
    bb = backbones.get(backbone)
    record = backbones.preprocessing_record(bb, variant, input_size)
    return {
        "backbone": bb.name,
        "input_size": record["input_size"][0],
        "preprocessing": record,
        "preprocessing_fingerprint": backbones.fingerprint(record),
        "weights": files.read_json(Path(weights_root) / bb.name / "identity.json"),
        "manifest_sha256": data.manifest_sha256(split_dir),
        "precision": precision[0],
        "precision_reason": precision[1],
    }


def check_current(record: dict, weights_root=layout.WEIGHTS, split_dir=layout.SPLIT) -> None:
    """Today's inputs (weights, manifest, preprocessing) must be those a trained run recorded; it is
    scored or exported in the precision it was trained in, as with its input size and preprocessing."""
    current = describe(
        record["backbone"],
        record["preprocessing"]["variant"],
        record["input_size"],
        (record.get("precision"), "as trained"),
        weights_root,
        split_dir,
    )
    check_same(record, current, record["run_name"])


def _checked(record: dict) -> dict:
    values = {k: record.get(k) for k in CHECKED if k != "weights_array_checksum"}
    values["weights_array_checksum"] = record["weights"].get("array_checksum")
    return values


def check_same(trained: dict, scored: dict, what: str) -> None:
    a, b = _checked(trained), _checked(scored)
    diff = [k for k in CHECKED if a[k] != b[k]]
    if diff:
        lines = "\n".join(f"  {k}: trained with {a[k]!r}, scoring with {b[k]!r}" for k in diff)
        raise ProvenanceMismatch(
            f"refusing to score {what}: its inputs differ from those it was trained on\n{lines}\n"
            f"  training record: {a}\n  scoring record:  {b}"
        )


def require_precision(found: str | None, expected: str, what: str) -> None:
    """Refuse inputs computed under another precision, naming both: precision is provenance too."""
    if found != expected:
        raise ProvenanceMismatch(
            f"{what} was computed under precision {found!r}, but this run uses {expected!r}; "
            "run the whole pipeline under one compute.precision (dvc repro re-runs what is stale)"
        )
