"""Decision rules tried on a trained run for the ELPV protocol (reports/elpv_benchmark.md): its validation
and test figures (4-class, binary and balanced accuracy, macro-F1) as trained, with test-time augmentation
over the 8 flips and quarter turns of a square cell, and with a prior correction chosen on validation.

Run in the workspace of the experiment whose run it scores (`dvc exp apply <exp>` first):

  python study/elpv_decision.py [RUN] [--save P.npz]   RUN: finetune_top/efficientnet_lite0-native (default)
  python study/elpv_decision.py --ensemble A.npz B.npz ...

--save keeps the run's probabilities (all views), labels, ids, classes and training prior; --ensemble scores
the mean of several saved runs' probabilities (a seed ensemble) by the same rules, tau again chosen on
validation. The files must agree on ids, labels, classes and prior: an ensemble over other images is refused.

The views are taken after normalisation, which is per pixel and per channel, so it commutes with them.
The prior correction predicts argmax log p(y|x) - tau log prior(y) (logit adjustment, Menon et al. 2021):
tau 0 is the trained model, tau 1 the rule that maximises balanced accuracy when p is calibrated, since it
weighs every class as if it were as frequent as the others; tau is chosen on validation balanced accuracy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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


def predict(run: str) -> dict:
    """The run's (images, views, classes) probabilities on val and test, with their labels and ids, and
    the classes and training prior they are scored against."""
    run_dir = layout.run_dir(run)
    record = provenance.load(run_dir / layout.RUN_RECORD, provenance.RunRecord)
    provenance.check_current(record)
    classes = data.load_classes()
    model = train.load_end_to_end(record, run_dir, len(classes))
    manifest = data.load_manifest()
    prior = np.bincount(manifest.loc[manifest["split"] == "train", "class_index"], minlength=len(classes))
    scored = {"classes": np.array(classes), "prior": prior / prior.sum()}
    for split in ("val", "test"):
        rows = manifest[manifest["split"] == split]
        ds = features.image_dataset(data.resolve_paths(rows), rows["class_index"].tolist(), record.preprocessing, 64)
        scored[f"{split}_probs"] = np.concatenate(
            [
                np.stack([tf.nn.softmax(tf.cast(model(v, training=False), tf.float32)) for v in views(x)], 1)
                for x, _ in ds
            ]
        )
        scored[f"{split}_y"] = rows["class_index"].to_numpy()
        scored[f"{split}_ids"] = rows["id"].to_numpy(dtype=str)
    return scored


def ensemble(paths: list[Path]) -> dict:
    """The mean probabilities of saved runs. A ValueError names every file whose images, labels, classes or
    prior differ from the first file's, and what differs."""
    runs = [dict(np.load(path, allow_pickle=False)) for path in paths]
    first = runs[0]
    bad = []
    for path, run in zip(paths, runs):
        differ = [k for k in first if not k.endswith("_probs") and not np.array_equal(run.get(k), first[k])]
        differ += [k for k in first if k.endswith("_probs") and run.get(k, np.empty(0)).shape != first[k].shape]
        if differ or set(run) != set(first):
            bad.append(f"{path} ({', '.join(differ or sorted(set(run) ^ set(first)))})")
    if bad:
        raise ValueError(f"not the same images, labels, classes and prior as {paths[0]}: " + "; ".join(bad))
    return {**first, **{k: np.mean([run[k] for run in runs], 0) for k in first if k.endswith("_probs")}}


def report(scored: dict) -> None:
    """Each rule's figures on val and test: as trained, with TTA, and prior-corrected with tau chosen on val."""
    classes, prior = [str(c) for c in scored["classes"]], scored["prior"]
    binary = data.binary_task("auto", classes)
    tau = choose_tau(scored["val_probs"][:, 0], scored["val_y"], prior)
    for split in ("val", "test"):
        p, y = scored[f"{split}_probs"], scored[f"{split}_y"]
        for name, pred in (
            ("as trained", p[:, 0].argmax(1)),
            ("with TTA", p.mean(1).argmax(1)),
            (f"prior-corrected, tau {tau:g} (chosen on val)", prior_corrected(p[:, 0], prior, tau)),
        ):
            figures = metrics.headline(y, pred, classes, binary)
            print(f"{split} {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items() if v is not None))
        print(
            f"{split} each view alone:", [round(float((p[:, v].argmax(1) == y).mean()), 4) for v in range(p.shape[1])]
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", default=layout.run_name("finetune_top", "efficientnet_lite0", "native"))
    mode = parser.add_mutually_exclusive_group()  # an ensemble scores saved files: nothing of its own to save
    mode.add_argument("--save", type=Path, help="write the run's probabilities, labels and ids to this .npz")
    mode.add_argument("--ensemble", nargs="+", type=Path, metavar="NPZ", help="score the mean of saved runs")
    args = parser.parse_args(argv)
    if args.ensemble:
        try:
            scored = ensemble(args.ensemble)
        except (OSError, ValueError) as err:
            parser.exit(2, f"elpv_decision: {err}\n")
        print("ensemble of " + json.dumps([str(p) for p in args.ensemble]))
    else:
        scored = predict(args.run)
        if args.save:
            np.savez(args.save, **scored)
    report(scored)


if __name__ == "__main__":
    main()
