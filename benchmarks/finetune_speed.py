"""Per-epoch training speed of the finetune stage's paths, side by side in one run.

(1) finetune_top from cached cut-point activations vs the full path (images through the
    whole network, layers below the cut frozen): target speed-up >= 4x for VGG16 from block5_conv1;
(2) the bottleneck head on pooled features vs the frozen end-to-end model on images.
Epoch times are the fastest epoch after the first (which includes tracing); caching the activations is
paid once, by extract_features, and is not counted. Weights are random: speed does not depend on them.

    python benchmarks/finetune_speed.py --backbone vgg16 --cut block5_conv1 --input-size 128 --images 256
"""

import argparse
import time

import keras

from transferlab import backbones, data, features, train

HEAD = {"units": 256, "dropout": 0.5, "dropout_position": "after_dense", "pooling": "avg"}


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)


def epoch_seconds(model, ds, optimizer, epochs: int) -> float:
    """Fastest epoch after the first (which traces): the least disturbed by a noisy machine."""
    train.compile_model(model, optimizer)
    timer = EpochTimer()
    model.fit(ds, epochs=epochs, verbose=0, callbacks=[timer])
    return min(timer.seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--cut", default="block5_conv1", help="a cut point of the backbone's registry record")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs = epochs - 1")
    args = parser.parse_args()

    bb = backbones.get(args.backbone)
    boundary = backbones.cut_boundary(bb, args.cut)
    record = backbones.preprocessing_record(bb, "native", args.input_size)
    paths = [str(p) for p in sorted(data.elpv_root().glob("images/*.png"))[: args.images]]
    labels = [i % 4 for i in range(len(paths))]
    base = bb.build(False, None, args.input_size)
    images = features.image_dataset(paths, labels, record, args.batch_size, shuffle_seed=0)
    print(
        f"{bb.name} at {args.input_size}px, cut {args.cut} (boundary {boundary}), "
        f"batch {args.batch_size}, {len(paths)} ELPV images"
    )

    cache = features.extractor(base, boundary, False).predict(
        features.image_dataset(paths, labels, record, args.batch_size), verbose=0
    )

    def sgd():
        return train.make_optimizer("sgd", 1e-4, 0.9)

    train.configure_base(base, boundary, False)
    head = train.head_for(base, 4, HEAD, 0)
    full = epoch_seconds(train.end_to_end(base, head, "avg"), images, sgd(), args.epochs)
    cached = epoch_seconds(
        train.top_model(base, boundary, head, "avg"),
        train.feature_dataset(cache["cut"], labels, args.batch_size, 0),
        sgd(),
        args.epochs,
    )

    train.configure_base(base, None, False)
    head = train.head_for(base, 4, HEAD, 0)
    frozen = epoch_seconds(train.end_to_end(base, head, "avg"), images, train.make_optimizer("adam", 1e-3), args.epochs)
    on_features = epoch_seconds(
        head,
        train.feature_dataset(cache["pooled"], labels, args.batch_size, 0),
        train.make_optimizer("adam", 1e-3),
        args.epochs,
    )

    print(f"finetune_top, full path (images)         : {full:8.2f} s/epoch")
    print(f"finetune_top, cached cut activations     : {cached:8.2f} s/epoch")
    print(f"frozen end-to-end (images)               : {frozen:8.2f} s/epoch")
    print(f"head on pooled features                  : {on_features:8.2f} s/epoch")
    print(f"cached speed-up over full path = {full / cached:.1f}x  (target >= 4)")
    print(f"head-on-features speed-up over frozen end-to-end = {frozen / on_features:.0f}x")


if __name__ == "__main__":
    main()
