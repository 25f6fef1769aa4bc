"""The stored records (features meta.json, run.json): typed, versioned, and refused when old or edited."""

import dataclasses
import json

import pytest
from helpers import run_record, weights_identity

from transferlab import provenance
from transferlab.provenance import FeaturesRecord, ProvenanceMismatch, RunRecord


def features_record(**fields) -> FeaturesRecord:
    source = run_record("train_head/vgg16-native")
    return FeaturesRecord.of(
        source,
        **{"status": "random", "batch_size": 8, "versions": {"keras": "3"}, **fields},
    )


def trained_record() -> RunRecord:
    return run_record(
        "frozen_end_to_end/vgg16-native",
        params={"train": {"epochs": 2}, "head": {"units": 8}},
        mlflow_run_id="abc",
        train_seconds=1.5,
        val_accuracy=0.75,
        cached_path=False,
        parity=provenance.Parity(parity_max_abs_logit_diff=1e-6, parity_val_accuracy_diff=0.0),
    )


@pytest.mark.parametrize("record", [features_record(splits={"train": {"rows": 3}}), trained_record()])
def test_a_written_record_reads_back_equal_with_its_schema_version(tmp_path, record):
    path = tmp_path / "record.json"
    provenance.write(record, path)
    stored = json.loads(path.read_text())
    assert stored["schema_version"] == 1 and stored["weights"]["array_checksum"] == "c" * 32
    back = provenance.load(path, type(record))
    assert back == record
    assert isinstance(back.weights, provenance.Weights) and back.variant == "native"
    if isinstance(back, RunRecord):
        assert back.parity.parity_max_abs_logit_diff == 1e-6


def test_optional_fields_default_to_none_and_read_back_as_none(tmp_path):
    record = run_record("train_head/vgg16-native", status="unavailable")
    assert (record.mlflow_run_id, record.train_seconds, record.val_accuracy, record.parity) == (None,) * 4
    provenance.write(record, tmp_path / "run.json")
    assert provenance.load(tmp_path / "run.json", RunRecord) == record


def _stored(tmp_path, record, change) -> str:
    path = tmp_path / "run.json"
    provenance.write(record, path)
    stored = json.loads(path.read_text())
    change(stored)
    path.write_text(json.dumps(stored))
    return path


@pytest.mark.parametrize("kind, record", [(FeaturesRecord, features_record()), (RunRecord, trained_record())])
def test_a_record_without_schema_version_is_refused_with_one_clear_message(tmp_path, kind, record):
    path = _stored(tmp_path, record, lambda r: r.pop("schema_version"))
    with pytest.raises(ProvenanceMismatch) as error:
        provenance.load(path, kind)
    message = str(error.value)
    assert message.startswith(f"{path}: this ") and "has no schema_version" in message
    assert message.endswith("Re-run `dvc repro` to rebuild it.") and "\n" not in message


def test_a_record_of_another_schema_version_is_refused(tmp_path):
    path = _stored(tmp_path, trained_record(), lambda r: r.update(schema_version=2))
    with pytest.raises(
        ProvenanceMismatch, match=r"run record is of schema 2; this version of transferlab reads schema 1"
    ):
        provenance.load(path, RunRecord)


def test_a_record_written_before_records_were_typed_is_refused(tmp_path):
    """run.json as the earlier code wrote it: no schema_version, method "bottleneck", no optional keys."""
    old = dataclasses.asdict(run_record("train_head/vgg16-native", method="bottleneck"))
    for key in ("schema_version", "cached_path", "parity", "val_accuracy"):
        old.pop(key)
    (tmp_path / "run.json").write_text(json.dumps(old))
    with pytest.raises(ProvenanceMismatch, match=r"has no schema_version .*Re-run `dvc repro`"):
        provenance.load(tmp_path / "run.json", RunRecord)


def test_missing_and_unknown_fields_are_named(tmp_path):
    def damage(stored):
        del stored["manifest_sha256"], stored["weights"]["array_checksum"]
        stored["extra"] = 1

    path = _stored(tmp_path, trained_record(), damage)
    with pytest.raises(ProvenanceMismatch) as error:
        provenance.load(path, RunRecord)
    assert "(missing manifest_sha256; unknown extra; missing weights.array_checksum)" in str(error.value)
    assert str(error.value).startswith(f"{path}: not a run record of schema 1")
    path = _stored(tmp_path, trained_record(), lambda r: r.update(weights=None))
    with pytest.raises(ProvenanceMismatch, match=r"\(weights is not an object\)"):
        provenance.load(path, RunRecord)
    with pytest.raises(ProvenanceMismatch, match="not a features record"):  # a run.json is no meta.json
        provenance.load(_stored(tmp_path, trained_record(), lambda r: None), FeaturesRecord)


def test_an_edited_preprocessing_record_is_refused_under_its_old_fingerprint(tmp_path):
    record = trained_record()
    path = _stored(tmp_path, record, lambda r: r["preprocessing"].update(mean=[0.0, 0.0, 0.0]))
    with pytest.raises(ProvenanceMismatch) as error:
        provenance.load(path, RunRecord)
    assert str(error.value).startswith(
        f"{path}: the stored preprocessing_fingerprint '{record.preprocessing_fingerprint}' does not match"
    )


def test_a_weights_identity_with_other_fields_is_refused_naming_the_file(tmp_path):
    identity = dataclasses.asdict(weights_identity())
    del identity["keras_version"]
    (tmp_path / "vgg16").mkdir()
    (tmp_path / "vgg16/identity.json").write_text(json.dumps(identity))
    with pytest.raises(ProvenanceMismatch, match=r"vgg16/identity.json: .*\(missing keras_version\)"):
        provenance.weights_identity(tmp_path, "vgg16")
