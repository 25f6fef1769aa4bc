"""Test-time augmentation over the 8 flips and quarter turns of a square cell, tried for the ELPV protocol
(reports/elpv_benchmark.md): a trained run's validation and test figures (4-class, binary and balanced
accuracy, macro-F1) with and without it, and each view's accuracy alone.

Run in the workspace of the experiment whose run it scores (`dvc exp apply <exp>` first):

  python study/elpv_tta.py [RUN]      RUN: finetune_top/efficientnet_lite0-native (default)

The views are taken after normalisation, which is per pixel and per channel, so it commutes with them.
"""

from __future__ import annotations

import sys

import numpy as np
import tensorflow as tf

from transferlab import backbones, data, features, layout, metrics, precision, provenance, train


def views(x: tf.Tensor) -> list[tf.Tensor]:
    """The 8 symmetries of the square (the identity first), on a batch of square images."""
    return [tf.image.rot90(tf.image.flip_left_right(x) if flip else x, k) for flip in (False, True) for k in range(4)]


def main(run: str) -> None:
    run_dir = layout.run_dir(run)
    record = provenance.load(run_dir / layout.RUN_RECORD, provenance.RunRecord)
    provenance.check_current(record)
    head_cfg, classes = record.params["head"], data.load_classes()
    with precision.policy(record.precision):
        base = backbones.get(record.backbone).build(False, None, record.input_size)
        model = train.end_to_end(base, train.head_for(base, len(classes), head_cfg, 0), head_cfg["pooling"])
    model.load_weights(run_dir / layout.MODEL_WEIGHTS)
    manifest = data.load_manifest()
    for split in ("val", "test"):
        rows = manifest[manifest["split"] == split]
        ds = features.image_dataset(data.resolve_paths(rows), rows["class_index"].tolist(), record.preprocessing, 64)
        probs = np.concatenate(
            [
                np.stack([tf.nn.softmax(tf.cast(model(v, training=False), tf.float32)) for v in views(x)], 1)
                for x, _ in ds
            ]
        )  # (images, views, classes)
        y = rows["class_index"].to_numpy()
        for name, p in (("without TTA", probs[:, 0]), ("with TTA", probs.mean(1))):
            figures = metrics.headline(y, p.argmax(1), classes, data.binary_task("auto", classes))
            print(f"{split} {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items() if v is not None))
        print(f"{split} each view alone:", [round(float((probs[:, v].argmax(1) == y).mean()), 4) for v in range(8)])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else layout.run_name("finetune_top", "efficientnet_lite0", "native"))
