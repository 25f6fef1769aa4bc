"""Decision rules tried on a trained run for the ELPV protocol (reports/elpv_benchmark.md): its validation
and test figures (4-class, binary and balanced accuracy, macro-F1) as trained, with test-time augmentation
over the 8 flips and quarter turns of a square cell, and with a prior correction chosen on validation.

Run in the workspace of the experiment whose run it scores (`dvc exp apply <exp>` first):

  python study/elpv_decision.py [RUN]      RUN: finetune_top/efficientnet_lite0-native (default)

The views are taken after normalisation, which is per pixel and per channel, so it commutes with them.
The prior correction predicts argmax log p(y|x) - tau log prior(y) (logit adjustment, Menon et al. 2021):
tau 0 is the trained model, tau 1 the rule that maximises balanced accuracy when p is calibrated, since it
weighs every class as if it were as frequent as the others; tau is chosen on validation balanced accuracy.
"""

from __future__ import annotations

import sys

import numpy as np
import tensorflow as tf
from sklearn.metrics import balanced_accuracy_score

from transferlab import data, features, layout, metrics, provenance, train

TAUS = np.round(np.arange(0.0, 2.01, 0.1), 2)  # the prior-correction strengths tried on validation


def views(x: tf.Tensor) -> list[tf.Tensor]:
    """The 8 symmetries of the square (the identity first), on a batch of square images."""
    return [tf.image.rot90(tf.image.flip_left_right(x) if flip else x, k) for flip in (False, True) for k in range(4)]


def prior_corrected(probs: np.ndarray, prior: np.ndarray, tau: float) -> np.ndarray:
    """Predicted classes of (images, classes) probabilities with the class prior divided out to the power tau."""
    return (np.log(np.clip(probs, 1e-12, None)) - tau * np.log(prior)).argmax(-1)


def choose_tau(probs: np.ndarray, y: np.ndarray, prior: np.ndarray) -> float:
    """The tau of TAUS with the best balanced accuracy on (validation) probs, the smallest on a tie."""
    scores = [balanced_accuracy_score(y, prior_corrected(probs, prior, t)) for t in TAUS]
    return float(TAUS[int(np.argmax(scores))])


def main(run: str) -> None:
    run_dir = layout.run_dir(run)
    record = provenance.load(run_dir / layout.RUN_RECORD, provenance.RunRecord)
    provenance.check_current(record)
    classes = data.load_classes()
    binary = data.binary_task("auto", classes)
    model = train.load_end_to_end(record, run_dir, len(classes))
    manifest = data.load_manifest()
    prior = np.bincount(manifest.loc[manifest["split"] == "train", "class_index"], minlength=len(classes))
    prior = prior / prior.sum()
    probs, y = {}, {}
    for split in ("val", "test"):
        rows = manifest[manifest["split"] == split]
        ds = features.image_dataset(data.resolve_paths(rows), rows["class_index"].tolist(), record.preprocessing, 64)
        probs[split] = np.concatenate(
            [
                np.stack([tf.nn.softmax(tf.cast(model(v, training=False), tf.float32)) for v in views(x)], 1)
                for x, _ in ds
            ]
        )  # (images, views, classes)
        y[split] = rows["class_index"].to_numpy()
    tau = choose_tau(probs["val"][:, 0], y["val"], prior)
    for split in ("val", "test"):
        p = probs[split]
        for name, pred in (
            ("as trained", p[:, 0].argmax(1)),
            ("with TTA", p.mean(1).argmax(1)),
            (f"prior-corrected, tau {tau:g} (chosen on val)", prior_corrected(p[:, 0], prior, tau)),
        ):
            figures = metrics.headline(y[split], pred, classes, binary)
            print(f"{split} {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items() if v is not None))
        print(f"{split} each view alone:", [round(float((p[:, v].argmax(1) == y[split]).mean()), 4) for v in range(8)])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else layout.run_name("finetune_top", "efficientnet_lite0", "native"))
