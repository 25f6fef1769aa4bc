"""The backbone registry against Keras, fingerprints, and row alignment of extracted features."""

import dataclasses
import importlib
import json

import numpy as np
import pytest
from helpers import make_image_tree, tiny_conv_base, weights_identity

from transferlab import backbones, features, files, provenance

KERAS_BACKBONES = [b for b in backbones.REGISTRY.values() if b.keras_preprocess]


@pytest.mark.parametrize("bb", backbones.REGISTRY.values(), ids=lambda b: b.name)
def test_record_is_complete_and_its_layers_exist(bb):
    assert bb.colour_order in ("RGB", "BGR") and len(bb.mean) == len(bb.std) == 3 and all(s > 0 for s in bb.std)
    assert bb.input_size >= 32 and bb.cut_points and bb.interpolation == "bilinear"
    size = 75 if bb.name == "inception_v3" else 64  # small inputs: the layer graph is what matters
    names = {layer.name for layer in bb.build(False, None, size).layers}
    assert bb.last_conv in names
    assert set(bb.cut_points.values()) <= names


@pytest.mark.parametrize("bb", KERAS_BACKBONES, ids=lambda b: b.name)
def test_native_normalisation_agrees_with_keras_preprocess_input(bb):
    x = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3)).astype("float32")
    module, fn = bb.keras_preprocess.rsplit(".", 1)
    expected = getattr(importlib.import_module(module), fn)(x.copy())
    got = backbones.normalise(x, backbones.preprocessing_record(bb, "native")).numpy()
    assert np.abs(got - expected).max() < 1e-4


def test_rescale_is_x_over_255_in_rgb():
    x = np.array([[[[255.0, 51.0, 0.0]]]], "float32")
    record = backbones.preprocessing_record(backbones.get("vgg16"), "rescale")
    assert np.allclose(backbones.normalise(x, record).numpy(), [[[[1.0, 0.2, 0.0]]]], atol=1e-7)


def test_fingerprint_changes_with_every_preprocessing_fact():
    vgg = backbones.get("vgg16")
    base = backbones.fingerprint(backbones.preprocessing_record(vgg, "native", 128))
    assert base == backbones.fingerprint(backbones.preprocessing_record(vgg, "native", 128))
    others = {
        backbones.fingerprint(backbones.preprocessing_record(vgg, "rescale", 128)),
        backbones.fingerprint(backbones.preprocessing_record(vgg, "native", 224)),
        backbones.fingerprint(backbones.preprocessing_record(backbones.get("resnet50"), "native", 128)),
    }
    assert base not in others and len(others) == 3


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown backbone 'resnet18'"):
        backbones.get("resnet18")
    with pytest.raises(ValueError, match="unknown preprocessing variant"):
        backbones.preprocessing_record(backbones.get("vgg16"), "imagenet")
    with pytest.raises(
        ValueError, match="vgg16 has no cut point 'conv5'; known: block5_conv1, block4_conv1, block3_conv1"
    ):
        backbones.cut_boundary(backbones.get("vgg16"), "conv5")


def _identity(tmp_path, checksum):
    (tmp_path / "models/weights/vgg16").mkdir(parents=True, exist_ok=True)
    identity = dataclasses.asdict(weights_identity(array_checksum=checksum))
    (tmp_path / "models/weights/vgg16/identity.json").write_text(json.dumps(identity))


def test_provenance_check_refuses_any_mismatch_naming_both_records(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/split").mkdir(parents=True)
    (tmp_path / "data/split/manifest.csv").write_text("id\n")
    _identity(tmp_path, "aaa")

    def describe(variant, size, precision="mixed_bfloat16"):
        return provenance.describe("vgg16", variant, size, (precision, "set in params"))

    trained = describe("native", 128)
    provenance.check_same(trained, describe("native", 128), "x")
    with pytest.raises(provenance.ProvenanceMismatch) as err:
        provenance.check_same(trained, describe("rescale", 128), "train_head/vgg16-native")
    assert "preprocessing_fingerprint" in str(err.value) and trained.preprocessing_fingerprint in str(err.value)
    with pytest.raises(provenance.ProvenanceMismatch, match="input_size: trained with 128, scoring with 160"):
        provenance.check_same(trained, describe("native", 160), "x")
    _identity(tmp_path, "bbb")
    with pytest.raises(provenance.ProvenanceMismatch, match="weights_array_checksum: trained with 'aaa'"):
        provenance.check_same(trained, describe("native", 128), "x")
    (tmp_path / "data/split/manifest.csv").write_text("id\nnew\n")
    _identity(tmp_path, "aaa")
    with pytest.raises(provenance.ProvenanceMismatch, match="manifest_sha256"):
        provenance.check_same(trained, describe("native", 128), "x")
    _identity(tmp_path, "aaa")
    (tmp_path / "data/split/manifest.csv").write_text("id\n")
    with pytest.raises(
        provenance.ProvenanceMismatch, match="precision: trained with 'mixed_bfloat16', scoring with 'float32'"
    ):
        provenance.check_same(trained, describe("native", 128, "float32"), "x")


@pytest.fixture(scope="module")
def tiny_model():
    return features.extractor(tiny_conv_base(), "pool", conv_map=True)


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_features_stay_aligned_with_ids_and_labels(tmp_path, tiny_model, batch_size):
    root = make_image_tree(tmp_path / "img", classes={"a": 5, "b": 4, "c": 3}, size=20)
    paths = sorted(str(p) for p in root.rglob("*.png"))[::-1]  # an order unlike the folder's
    ids = [p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1] for p in paths]
    labels = ["abc".index(i[0]) for i in ids]
    record = backbones.preprocessing_record(backbones.get("vgg16"), "native", 16)
    stats = features.extract_split(tiny_model, paths, labels, ids, record, batch_size, tmp_path / "out", "t")
    assert stats["n"] == 12 and stats["shapes"] == {"pooled": [5], "conv_map": [8, 8, 5], "cut": [8, 8, 4]}
    files.write_json(tmp_path / "meta.json", {"splits": {"out": stats}})
    got_ids, got_labels, pooled = features.load_split(tmp_path, "out", "pooled")
    assert got_ids == ids and got_labels.tolist() == labels
    # each row equals that image run alone through the model
    for i in (0, 5, 11):
        one = next(iter(features.image_dataset([paths[i]], [labels[i]], record, 1)))[0]
        assert np.abs(tiny_model(one)["pooled"].numpy()[0] - pooled[i]).max() < 1e-5


def test_every_registry_field_is_read_somewhere():
    """A field nobody reads is a claim nobody checks (has_batchnorm and licence were such fields)."""
    import dataclasses

    from helpers import ROOT

    code = "".join(p.read_text() for d in ("transferlab", "study", "stages") for p in (ROOT / d).glob("*.py"))
    code += (ROOT / "study/pitfalls.sh").read_text()
    documentary = {"last_conv"}  # no code needs it; test_record_is_complete_and_its_layers_exist checks it
    for record in (backbones.Backbone, backbones.WheelWeights):
        unread = [f.name for f in dataclasses.fields(record) if f".{f.name}" not in code and f.name not in documentary]
        assert not unread, f"{record.__name__}: fields nobody reads: {unread}"


def test_the_registry_holds_the_weight_pins_and_names_the_studys_batchnorm_network():
    sources = {b.name: b.offline_source for b in backbones.REGISTRY.values() if b.offline_source}
    assert sorted(sources) == ["efficientnet_lite0", "vgg16"]
    for source in sources.values():
        assert "==" in source.requirement and len(source.sha256) == 64 and source.member and source.url
        assert source.url.startswith("https://pypi.org/project/")
    name = backbones.offline_batchnorm()
    assert name == "efficientnet_lite0" and backbones.get(name).has_batchnorm
    assert not backbones.get("vgg16").has_batchnorm
