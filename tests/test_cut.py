"""Cut-point activations: a DVC stage per fine-tuned backbone, written only when read, checked when read.

The DVC test runs the pipeline (up to finetune) on two backbones at 32 px with random weights, then
changes one backbone's cut point: only that backbone's stages may become stale.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from helpers import ROOT, make_image_tree, pipeline_repo, run_cmd, run_record, tiny_conv_base

from transferlab import backbones, cut, data, features, files, precision, provenance, train, weights
from transferlab.params import with_overrides
from transferlab.provenance import ProvenanceMismatch

LITE0 = "efficientnet_lite0"


def status(repo, env) -> set:
    return set(json.loads(run_cmd("dvc", "status", "--json", cwd=repo, env=env)))


def set_params(repo, *overrides):
    """`dvc exp run -S` style overrides ("section.key=value") written into the repo's params.yaml."""
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(with_overrides(raw, list(overrides)), sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cut")
    images = make_image_tree(tmp / "images", classes={"a": 8, "b": 8}, size=36)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="folder", folder=str(images))
    params["weights"]["init"] = "none"
    params["compute"]["precision"] = "float32"  # the same on every machine; equality is checked bit for bit
    params["extract"].update(
        backbones=["vgg16", LITE0], preprocessing=["native"], input_size={"vgg16": 32, LITE0: 32}, batch_size=4
    )
    params["train"].update(epochs=1, batch_size=4)
    params["finetune"].update(backbones=["vgg16", LITE0], epochs=1, batch_size=4)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    repo = pipeline_repo(tmp / "repo", params, env)
    run_cmd("dvc", "repro", "finetune", cwd=repo, env=env)
    return repo, env


@pytest.mark.slow
def test_one_backbones_cut_point_leaves_every_stage_of_the_others_current(repo):
    repo, env = repo
    before = status(repo, env)
    assert before <= {"evaluate", "export"}  # not run here
    set_params(repo, "finetune.cut_point.efficientnet_lite0=block4a")
    stale = status(repo, env) - before
    assert stale == {
        f"extract_cut@{LITE0}",
        f"finetune@frozen_end_to_end-{LITE0}",
        f"finetune@finetune_top-{LITE0}",
    }
    assert not [name for name in status(repo, env) if "vgg16" in name]

    # run directly (not through DVC), finetune refuses the stale activations, naming both boundaries
    out = subprocess.run(
        [sys.executable, "stages/finetune.py", "finetune_top", LITE0], cwd=repo, env=env, capture_output=True, text=True
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"cut/{LITE0}-native holds cut activations other than" in out.stderr
    assert "boundary: stored 'block5c_add', needed 'block3b_add'" in out.stderr
    set_params(repo, "finetune.cut_point.efficientnet_lite0=block6a")
    assert status(repo, env) == before


@pytest.mark.slow
def test_the_record_names_the_boundary_and_the_activations_equal_the_joint_extraction(repo):
    repo, _ = repo
    meta = provenance.load(repo / "cut/vgg16-native/meta.json", provenance.CutRecord)
    assert meta.status == cut.WRITTEN and meta.cut_point == "block5_conv1" and meta.boundary == "block4_pool"
    assert meta.dtype == "float32" and meta.input_size == 32 and meta.precision == "float32"
    features_meta = provenance.load(repo / "features/vgg16-native/meta.json", provenance.FeaturesRecord)
    for key in ("preprocessing_fingerprint", "manifest_sha256", "precision"):
        assert getattr(meta, key) == getattr(features_meta, key)
    assert meta.weights.array_checksum == features_meta.weights.array_checksum
    assert sorted(meta.splits) == ["train", "val"]
    assert meta.bytes == sum(p.stat().st_size for p in (repo / "cut/vgg16-native").glob("*/*")) > 0
    features_bytes = sum(p.stat().st_size for p in (repo / "features/vgg16-native").glob("*/*"))
    assert features_meta.bytes == features_bytes
    assert not list((repo / "features").rglob("cut.npy"))  # extract_features stores no cut activations now

    # the same values extract_features stored before: one model computing pooled and cut together
    manifest = data.load_manifest(repo / "data/split")
    rows = manifest[manifest["split"] == "train"]
    paths = data.resolve_paths(rows, repo / "data/split")
    bb = backbones.get("vgg16")
    with precision.policy(meta.precision):
        base = weights.load_backbone(bb, repo / "models/weights/vgg16", input_size=32)
        joint = features.extractor(base, "block4_pool", conv_map=False)
    stats = features.extract_split(
        joint,
        paths,
        rows["class_index"].tolist(),
        rows["id"].tolist(),
        meta.preprocessing,
        4,
        repo.parent / "joint",
        "j",
    )
    assert stats["shapes"]["cut"] == meta.splits["train"]["shapes"]["cut"]
    assert stats["sha256"]["cut.npy"] == meta.splits["train"]["sha256"]["cut.npy"]  # bit for bit


@pytest.mark.slow
def test_no_activations_are_written_where_no_cached_run_reads_them(repo):
    repo, env = repo
    for changes, reason in [
        (["finetune.methods=[frozen_end_to_end]"], "finetune.methods has no finetune_top"),
        (["ablation.augmentation=train"], "ablation.augmentation is 'train'"),
        (["ablation.input_size=48"], "ablation.input_size 48 differs from the extraction's 32"),
    ]:
        original = (repo / "params.yaml").read_text()
        set_params(repo, *changes)
        run_cmd(sys.executable, "stages/extract_cut.py", "vgg16", cwd=repo, env=env)
        (repo / "params.yaml").write_text(original)
        meta = files.read_json(repo / "cut/vgg16-native/meta.json")
        assert meta["status"] == cut.NOT_NEEDED and meta["reason"].startswith(reason) and meta["bytes"] == 0
        assert [p.name for p in (repo / "cut/vgg16-native").iterdir()] == ["meta.json"]


@pytest.mark.slow
def test_the_whole_network_cut_point_caches_the_normalised_images_and_trains_every_layer(repo, tmp_path):
    """Cut point `all`: its boundary is the input layer, so extract_cut stores exactly what image_dataset
    feeds the model, and finetune_top trains the first convolution too, on the cached path."""
    repo, env = repo
    work = tmp_path / "repo"
    shutil.copytree(repo, work, symlinks=True)  # the stages run in a copy: the shared repo stays current
    set_params(work, "finetune.cut_point.vgg16=all")
    run_cmd(sys.executable, "stages/extract_cut.py", "vgg16", cwd=work, env=env)
    meta = provenance.load(work / "cut/vgg16-native/meta.json", provenance.CutRecord)
    assert (meta.status, meta.cut_point, meta.boundary) == (cut.WRITTEN, "all", backbones.INPUT)
    manifest = data.load_manifest(work / "data/split")
    rows = manifest[manifest["split"] == "train"]
    paths, labels = data.resolve_paths(rows, work / "data/split"), rows["class_index"].tolist()
    images = np.concatenate([x.numpy() for x, _ in features.image_dataset(paths, labels, meta.preprocessing, 4)])
    assert np.array_equal(np.load(work / "cut/vgg16-native/train/cut.npy"), images)

    run_cmd(sys.executable, "stages/finetune.py", "finetune_top", "vgg16", cwd=work, env=env)
    run = work / "runs/finetune_top/vgg16-native"
    record = provenance.load(run / "run.json", provenance.RunRecord)
    assert record.cached_path and record.params["cut_boundary"] == backbones.INPUT
    bb, head_cfg = backbones.get("vgg16"), record.params["head"]
    start = weights.load_backbone(bb, work / "models/weights/vgg16", input_size=32)
    trained = bb.build(False, None, 32)
    model = train.end_to_end(trained, train.head_for(trained, 2, head_cfg, 0), head_cfg["pooling"])
    model.load_weights(run / "model.weights.h5")
    moved = trained.get_layer("block1_conv1").kernel.numpy() - start.get_layer("block1_conv1").kernel.numpy()
    assert np.abs(moved).max() > 0  # the lowest layer moved: nothing was frozen


def _record(**changes):
    """A cut record at block4_pool for the run below; ``changes`` override fields (``weights``: its checksum)."""
    source = run_record("finetune_top/vgg16-native", input_size=128)
    if "weights" in changes:
        changes["weights"] = dataclasses.replace(source.weights, array_checksum=changes["weights"])
    fields = {"status": cut.WRITTEN, "cut_point": "block5_conv1", "boundary": "block4_pool", "dtype": "float32"}
    return provenance.CutRecord.of(source, **{**fields, "batch_size": 8, "versions": {}, **changes})


def test_a_different_boundary_or_input_is_refused_naming_both():
    run = run_record("finetune_top/vgg16-native", input_size=128)
    cut.check(_record(), run, "block4_pool", "cut/vgg16-native")  # the same: accepted
    with pytest.raises(ProvenanceMismatch, match="boundary: stored 'block3_pool', needed 'block4_pool'"):
        cut.check(_record(boundary="block3_pool"), run, "block4_pool", "cut/vgg16-native")
    with pytest.raises(ProvenanceMismatch, match="precision: stored 'mixed_bfloat16', needed 'float32'"):
        cut.check(_record(precision="mixed_bfloat16"), run, "block4_pool", "cut/vgg16-native")
    with pytest.raises(ProvenanceMismatch, match="weights_array_checksum: stored 'aaaa"):
        cut.check(_record(weights="a" * 64), run, "block4_pool", "cut/vgg16-native")
    with pytest.raises(ProvenanceMismatch, match=r"holds no cut activations \(finetune.methods has no finetune_top\)"):
        cut.check(
            _record(status=cut.NOT_NEEDED, reason="finetune.methods has no finetune_top"), run, "block4_pool", "x"
        )


@pytest.fixture(scope="module")
def tiny():
    return tiny_conv_base()


def test_float16_storage_holds_the_float32_values_rounded_and_refuses_what_it_cannot_hold(tmp_path, tiny):
    root = make_image_tree(tmp_path / "img", classes={"a": 3, "b": 3}, size=20)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    ids, labels = [p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1] for p in paths], [0, 0, 0, 1, 1, 1]
    record = backbones.preprocessing_record(backbones.get("vgg16"), "native", 16)
    model = features.extractor(tiny, "pool", conv_map=False, pooled=False)
    assert list(model.output) == ["cut"]
    full = features.extract_split(model, paths, labels, ids, record, 4, tmp_path / "f32", "t")
    half = features.extract_split(model, paths, labels, ids, record, 4, tmp_path / "f16", "t", "float16")
    a, b = np.load(tmp_path / "f32/cut.npy"), np.load(tmp_path / "f16/cut.npy")
    assert a.dtype == np.float32 and b.dtype == np.float16
    assert np.array_equal(a.astype(np.float16), b)
    assert half["bytes"] < full["bytes"] and a.nbytes == 2 * b.nbytes
    tiny.get_layer("conv").bias.assign(np.full(4, 1e5, "float32"))  # beyond float16's 65504
    with pytest.raises(ValueError, match=r"t cut: a value of magnitude 1\d{5} does not fit float16"):
        features.extract_split(model, paths, labels, ids, record, 4, tmp_path / "big", "t", "float16")
