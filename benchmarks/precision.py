"""float32 vs the resolved mixed precision, side by side in one run, with real ImageNet weights on ELPV images.

For VGG16 at 128 px and EfficientNet-Lite0 at 224 px (the CPU defaults of params.yaml):
- forward img/s of the feature extractor on in-memory preprocessed images (best of --repeats);
- seconds per epoch of finetune_top on cached cut activations and of frozen_end_to_end on images
  (fastest epoch after the first, which traces; benchmarks/finetune_speed.py's timer);
- parity: max |logit difference| between the head on extracted pooled features and the frozen base + head
  end to end on the same images, within each precision (frozen_end_to_end's parity check, at inference);
- agreement on --images ELPV images: cosine similarity of the pooled features between the two
  precisions (min and mean), and the share of images whose head prediction changes. The head is
  trained once (train_head's routine, float32) on the float32 features of --train-images other ELPV
  images; each precision then runs it with the same weights on its own features, as evaluate would.
The mixed precision is compute.precision: auto resolved on this machine (mixed_bfloat16 when auto gives
float32, so there is something to compare; --mixed overrides). Weights come from the weights stage's code
(weights.resolve into a temporary folder, using the converted-weights cache).

    python benchmarks/precision.py
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from finetune_speed import HEAD, epoch_seconds

from transferlab import backbones, data, features, params, precision, train, weights

ROOT = Path(__file__).resolve().parents[1]

CASES = (("vgg16", 128), ("efficientnet_lite0", 224))
TRAIN = {"seed": 0, "epochs": 6, "batch_size": 32, "optimizer": "adam", "learning_rate": 0.001, "momentum": 0.9}


def machine() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return "GPU " + ", ".join(tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    flags = sorted(precision.cpu_flags() & {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"})
    return f"CPU {model}, {len(tf.config.list_logical_devices('CPU'))} TF device(s), flags: {' '.join(flags) or 'none'}"


def elpv_sample(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``n`` ELPV images in a seeded random order, with their class indices from labels.csv."""
    root = data.elpv_root()
    rows = [line.split() for line in (root / "labels.csv").read_text().splitlines() if line.strip()]
    rows = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))[:n]]
    return [str(root / path) for path, _, _ in rows], np.array([data.elpv_class(p) for _, p, _ in rows])


def load_images(paths, labels, record) -> np.ndarray:
    return np.concatenate([x.numpy() for x, _ in features.image_dataset(paths, labels, record, 64)])


def forward(extractor, x: np.ndarray, batch_size: int, repeats: int) -> tuple[float, dict]:
    """(best img/s, outputs as float32 arrays)."""
    fn = tf.function(lambda b: extractor(b, training=False), reduce_retracing=True, autograph=False)
    fn(x[:batch_size])  # trace
    best, outputs = 0.0, None
    for _ in range(repeats):
        start = time.perf_counter()
        parts = [fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        outputs = {k: np.concatenate([np.asarray(p[k], np.float32) for p in parts]) for k in parts[0]}
        best = max(best, len(x) / (time.perf_counter() - start))
    return best, outputs


def run_case(name: str, size: int, mixed: str, args, weights_root: Path) -> dict:
    bb = backbones.get(name)
    weights_dir = weights_root / name
    identity = weights.resolve(bb, {"init": "imagenet", "paths": {}, "missing": "error"}, weights_dir)
    boundary = backbones.cut_boundary(bb, params.load(ROOT / "params.yaml")["finetune"]["cut_point"][name])
    record = backbones.preprocessing_record(bb, "native", size)
    paths, labels = elpv_sample(args.images + args.train_images)
    x = load_images(paths, labels, record)
    x_train, y_train, x_eval = x[: args.train_images], labels[: args.train_images], x[args.train_images :]
    eval_labels = labels[args.train_images :]
    out = {"weights": identity["label"], "boundary": boundary}
    head_weights = None
    for p in ("float32", mixed):
        with precision.policy(p):
            base = weights.load_backbone(bb, weights_dir, input_size=size)
            extractor = features.extractor(base, boundary, False)
        ips, outs = forward(extractor, x_eval, args.batch_size, args.repeats)
        train_feats = forward(extractor, x_train, args.batch_size, 1)[1]
        if head_weights is None:  # float32: the head every precision then runs
            head, *_ = train.train_head(
                train_feats["pooled"], y_train, train_feats["pooled"][:32], y_train[:32], 4, TRAIN, HEAD
            )
            head_weights = head.get_weights()
        with precision.policy(p):
            head = train.build_head(outs["pooled"].shape[1:], 4, HEAD, 0)
            head.set_weights(head_weights)
            logits = train.predict_logits(head, train.feature_dataset(outs["pooled"], eval_labels, args.batch_size))
            # parity: the same head on the frozen base end to end, on the images, in the same precision
            end_to_end = train.end_to_end(base, head, "avg")
            parity = float(
                np.abs(
                    train.predict_logits(end_to_end, train.feature_dataset(x_eval, eval_labels, args.batch_size))
                    - logits
                ).max()
            )
            # finetune_top on cached cut activations: the layers above the boundary + the head
            train.configure_base(base, boundary, False)
            head = train.head_for(base, 4, HEAD, 0)
            top = epoch_seconds(
                train.top_model(base, boundary, head, "avg"),
                train.feature_dataset(train_feats["cut"], y_train, args.batch_size, 0),
                train.make_optimizer("sgd", 1e-4, 0.9),
                args.epochs,
            )
            # frozen_end_to_end: the whole frozen base + the head, on images
            train.configure_base(base, None, False)
            head = train.head_for(base, 4, HEAD, 0)
            frozen = epoch_seconds(
                train.end_to_end(base, head, "avg"),
                train.feature_dataset(x_train, y_train, args.batch_size, 0),
                train.make_optimizer("adam", 1e-3),
                args.epochs,
            )
        out[p] = {
            "img_s": ips,
            "pooled": outs["pooled"],
            "pred": logits.argmax(1),
            "top": top,
            "frozen": frozen,
            "parity": parity,
        }
    a, b = out["float32"]["pooled"], out[mixed]["pooled"]
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    out.update(
        cos_min=float(cosine.min()),
        cos_mean=float(cosine.mean()),
        changed=float(np.mean(out["float32"]["pred"] != out[mixed]["pred"])),
        accuracy={p: float(np.mean(out[p]["pred"] == eval_labels)) for p in ("float32", mixed)},
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixed", choices=precision.PRECISIONS[1:], help="default: auto, resolved here")
    parser.add_argument("--images", type=int, default=256, help="ELPV images for speed and agreement")
    parser.add_argument("--train-images", type=int, default=256, help="other ELPV images: head and epoch timings")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs = epochs - 1")
    args = parser.parse_args()
    resolved, why = precision.resolve("auto")
    mixed = args.mixed or (resolved if resolved != "float32" else "mixed_bfloat16")
    print(f"machine: {machine()}")
    print(f"compute.precision auto resolves to {resolved} ({why}); comparing float32 with {mixed}")
    print(
        f"{args.images} ELPV images for speed and agreement, {args.train_images} others for the head and "
        f"epoch timings; batch {args.batch_size}"
    )
    train.seed_everything(0)  # op determinism on from the start, as in the training stages: same for both precisions
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run_case(name, size, mixed, args, Path(tmp)) for name, size in CASES}
    for (name, size), r in zip(CASES, results.values()):
        f, m = r["float32"], r[mixed]
        print(f"\n{name} at {size} px ({r['weights']}; finetune_top cut boundary {r['boundary']})")
        print(f"  {'':36s} {'float32':>10s} {mixed:>16s} {'ratio':>7s}")
        for label, key, fmt in (
            ("forward img/s", "img_s", ".1f"),
            ("finetune_top (cached) s/epoch", "top", ".2f"),
            ("frozen_end_to_end s/epoch", "frozen", ".2f"),
        ):
            ratio = m[key] / f[key] if key == "img_s" else f[key] / m[key]
            print(f"  {label:36s} {f[key]:>10{fmt}} {m[key]:>16{fmt}} {ratio:>6.2f}x")
        print(f"  pooled-feature cosine, {mixed} vs float32: min {r['cos_min']:.5f}, mean {r['cos_mean']:.5f}")
        print(
            f"  parity, head on extracted features vs frozen end-to-end on images, max |logit diff|: "
            f"{f['parity']:.2e} float32, {m['parity']:.2e} {mixed}"
        )
        print(
            f"  head predictions changed: {r['changed']:.2%} of {args.images} images "
            f"(head accuracy {r['accuracy']['float32']:.3f} float32, {r['accuracy'][mixed]:.3f} {mixed})"
        )
    print("\nratio: speed-up of the mixed precision over float32 (> 1: mixed is faster)")


if __name__ == "__main__":
    main()
