"""What produced a result: backbone, preprocessing, weights and data, as typed, versioned records.

Two records are stored: a features folder's ``meta.json`` (:class:`FeaturesRecord`) and a run's
``run.json`` (:class:`RunRecord`). Both start with the same :class:`Provenance` fields, and
evaluation refuses to score a model on inputs whose provenance differs from the one it was
trained with. Each record is built by one constructor (``of``), written by :func:`write` and read
by :func:`load`, which refuses a record of another schema version (written by an older
transferlab: re-run `dvc repro`) and recomputes the fingerprint from the stored preprocessing
record, so an edited record cannot pass under its old fingerprint. Readers use attributes: a
field the schema guarantees is always there; the optional ones say when they are None.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from transferlab import backbones, data, files, layout

# Bump a schema's version when its fields change; records of another version are refused on read.
# Version 1 is the first versioned schema: records written before it have no schema_version.
FEATURES_SCHEMA = 1
RUN_SCHEMA = 1
CUT_SCHEMA = 1

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


@dataclass(frozen=True, kw_only=True)
class Weights:
    """A backbone's weights as ``models/weights/<backbone>/identity.json`` describes them (transferlab.weights)."""

    backbone: str
    status: str  # available | random | unavailable
    pretrained: bool
    label: str
    verified: str | None
    source: str
    source_file_sha256: str | None
    file_sha256: str | None
    top_file_sha256: str | None
    array_checksum: str | None  # None: no weights file (unavailable)
    top_available: bool
    message: str | None  # why the weights are unavailable, or a note
    keras_version: str
    licence: str | None  # of the pinned ImageNet weights (the registry's); None for any other file


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """The fields every stored record starts with: what decides the numbers a model computes."""

    backbone: str
    input_size: int
    preprocessing: dict  # backbones.preprocessing_record, stored as is: the fingerprint hashes this dict
    preprocessing_fingerprint: str
    weights: Weights
    manifest_sha256: str
    precision: str
    precision_reason: str

    @property
    def variant(self) -> str:
        return self.preprocessing["variant"]

    @classmethod
    def of(cls, source: Provenance, **fields):
        """This kind of record with ``source``'s provenance; ``fields`` add the rest (or override)."""
        shared = {f.name: getattr(source, f.name) for f in dataclasses.fields(Provenance)}
        return cls(**{**shared, **fields})


@dataclass(frozen=True, kw_only=True)
class FeaturesRecord(Provenance):
    """``features/<pair>/meta.json``: how a features folder was made."""

    schema_version: int = FEATURES_SCHEMA
    status: str  # the weights' status; "unavailable": nothing extracted
    batch_size: int
    versions: dict  # library versions that extracted the features
    splits: dict = field(default_factory=dict)  # split -> rows, shapes, bytes and the sha256 of every file
    bytes: int = 0  # on disk, all splits


@dataclass(frozen=True, kw_only=True)
class CutRecord(Provenance):
    """``cut/<pair>/meta.json``: finetune_top's cached activations at one boundary (transferlab.cut)."""

    schema_version: int = CUT_SCHEMA
    status: str  # written | not needed
    reason: str | None = None  # why none were written
    cut_point: str
    boundary: str  # the layer whose output is stored
    dtype: str  # float32 | float16, as stored
    batch_size: int
    versions: dict
    splits: dict = field(default_factory=dict)
    bytes: int = 0


@dataclass(frozen=True, kw_only=True)
class Parity:
    """frozen_end_to_end vs train_head on the validation split: the same model, so these should be ~0."""

    parity_max_abs_logit_diff: float
    parity_val_accuracy_diff: float


@dataclass(frozen=True, kw_only=True)
class RunRecord(Provenance):
    """``runs/<method>/<pair>/run.json``: one training run, trained or skipped for want of weights."""

    schema_version: int = RUN_SCHEMA
    run_name: str
    stage: str
    method: str  # train_head | frozen_end_to_end | finetune_top
    status: str  # trained | unavailable
    params: dict  # the params sections the run used, resolved (its MLflow params)
    mlflow_run_id: str | None = None  # once its MLflow run exists
    train_seconds: float | None = None  # trained runs
    val_accuracy: float | None = None  # trained runs: the kept epoch's (the last, or early stopping's best)
    epochs_run: int | None = None  # trained runs
    epoch_chosen: int | None = None  # trained runs: the epoch whose weights were kept (1-based)
    class_weights: dict | None = None  # class index -> loss weight (class_weight: balanced or sqrt)
    probe_c: float | None = None  # the converged linear probe's L2 strength, chosen on validation
    cached_path: bool | None = None  # finetune methods: trained on stored cut-point activations
    parity: Parity | None = None  # frozen_end_to_end


Record = TypeVar("Record", FeaturesRecord, RunRecord, CutRecord)
_NESTED = {"weights": Weights, "parity": Parity}  # record fields holding a record of their own
_KINDS = {
    FeaturesRecord: ("features record", FEATURES_SCHEMA),
    RunRecord: ("run record", RUN_SCHEMA),
    CutRecord: ("cut activations record", CUT_SCHEMA),
}


def write(record: FeaturesRecord | RunRecord | CutRecord, path) -> None:
    files.write_json(path, dataclasses.asdict(record))


def load(path, kind: type[Record]) -> Record:
    """A stored record, refused (ProvenanceMismatch, naming the file) if it is of another schema or
    its preprocessing fingerprint does not match its preprocessing record."""
    stored = files.read_json(path)
    what, current = _KINDS[kind]
    found = stored.get("schema_version")  # an old record has none
    if found != current:
        written = "has no schema_version (written before records were versioned)"
        written = written if found is None else f"is of schema {found}"
        raise ProvenanceMismatch(
            f"{path}: this {what} {written}; this version of transferlab reads schema {current}. "
            "Re-run `dvc repro` to rebuild it."
        )
    problems = _problems(kind, stored)
    if problems:
        raise ProvenanceMismatch(
            f"{path}: not a {what} of schema {current} ({'; '.join(problems)}); "
            "the record was edited or damaged. Re-run `dvc repro` to rebuild it."
        )
    recomputed = backbones.fingerprint(stored["preprocessing"])
    if stored["preprocessing_fingerprint"] != recomputed:
        raise ProvenanceMismatch(
            f"{path}: the stored preprocessing_fingerprint {stored['preprocessing_fingerprint']!r} does not match "
            f"the fingerprint {recomputed!r} of the preprocessing record stored beside it; the record was edited "
            "or damaged. Re-run the stage that wrote it."
        )
    return _build(kind, stored)


def _problems(kind: type, stored: dict, prefix: str = "") -> list[str]:
    """Missing and unknown fields, nested ones included: every field is written, so none may be absent."""
    names = {f.name for f in dataclasses.fields(kind)}
    problems = [f"missing {prefix}{k}" for k in sorted(names - stored.keys())]
    problems += [f"unknown {prefix}{k}" for k in sorted(stored.keys() - names)]
    for name, nested in _NESTED.items():
        if name not in names or name not in stored:
            continue
        if isinstance(stored[name], dict):
            problems += _problems(nested, stored[name], f"{prefix}{name}.")
        elif stored[name] is not None or kind.__dataclass_fields__[name].default is not None:  # None: optional
            problems.append(f"{prefix}{name} is not an object")
    return problems


def _build(kind: type, stored: dict):
    nested = {k: _build(t, stored[k]) for k, t in _NESTED.items() if isinstance(stored.get(k), dict)}
    return kind(**{**stored, **nested})


def weights_identity(weights_root, backbone: str) -> Weights:
    """The weights stage's identity.json, refused like a stored record if its fields are not Weights'."""
    path = Path(weights_root) / backbone / "identity.json"
    identity = files.read_json(path)
    problems = _problems(Weights, identity)
    if problems:
        raise ProvenanceMismatch(
            f"{path}: not a weights identity this version of transferlab reads ({'; '.join(problems)}). "
            "Re-run `dvc repro` to rebuild it."
        )
    return Weights(**identity)


def describe(
    backbone: str,
    variant: str,
    input_size: int | None,
    precision: tuple[str, str],
    weights_root=layout.WEIGHTS,
    split_dir=layout.SPLIT,
) -> Provenance:
    """Today's provenance. ``precision`` is (resolved precision, why), as transferlab.precision.resolve gives it."""
    bb = backbones.get(backbone)
    record = backbones.preprocessing_record(bb, variant, input_size)
    return Provenance(
        backbone=bb.name,
        input_size=record["input_size"][0],
        preprocessing=record,
        preprocessing_fingerprint=backbones.fingerprint(record),
        weights=weights_identity(weights_root, bb.name),
        manifest_sha256=data.manifest_sha256(split_dir),
        precision=precision[0],
        precision_reason=precision[1],
    )


def check_current(record: RunRecord, weights_root=layout.WEIGHTS, split_dir=layout.SPLIT) -> None:
    """Today's inputs (weights, manifest, preprocessing) must be those a trained run recorded; it is
    scored or exported in the precision it was trained in, as with its input size and preprocessing."""
    current = describe(
        record.backbone,
        record.variant,
        record.input_size,
        (record.precision, "as trained"),
        weights_root,
        split_dir,
    )
    check_same(record, current, record.run_name)


def _checked(record: Provenance) -> dict:
    values = {k: getattr(record, k) for k in CHECKED if k != "weights_array_checksum"}
    values["weights_array_checksum"] = record.weights.array_checksum
    return values


def check_same(trained: Provenance, scored: Provenance, what: str) -> None:
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
