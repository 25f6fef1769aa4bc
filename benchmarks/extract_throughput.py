"""Feature-extraction throughput, three ways, side by side in one run on one machine.

(a) the backbone alone, forward on in-memory tensors: the ceiling;
(b) the extract_features stage's own code path, files on disk -> features on disk;
(c) the recipe people copy: ImageDataGenerator(...).flow_from_directory + model.predict,
    and its loading alone (the generator iterated without the model).
Targets: (b)/(a) >= 0.9 and (b)/(c) >= 2. Weights are random: speed does not depend on them.

The recipe loads a batch, then runs the model on it, so 1/(c) = 1/(forward) + 1/(loading). No loader,
however parallel, makes the forward pass faster than (a), so (b)/(c) <= (a)/(c): the script prints that
ceiling. (b)/(c) >= 2 needs a machine whose forward pass is at least as fast as the recipe's loading
(a GPU, many cores); where the forward pass dominates, as on a few CPU cores, the ceiling is near 1.

    python benchmarks/extract_throughput.py --backbone vgg16 --input-size 128 --images 512
"""

import argparse
import tempfile
import time
from pathlib import Path

import tensorflow as tf

from transferlab import backbones, data, features


def best_of(repeats: int, fn) -> float:
    """Images per second of the fastest repeat: the least disturbed by a noisy machine.

    It also favours the recipe: here about half of its ``model.predict`` calls ran the forward pass on
    one core instead of two (CPU time / wall time 1.0 instead of 1.9), and the best repeat skips those.
    """
    return max(fn() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=512, help="ELPV images used (from the installed package)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    bb = backbones.get(args.backbone)
    record = backbones.preprocessing_record(bb, "native", args.input_size)
    base = bb.build(False, None, args.input_size)
    model = features.extractor(base, None, False)
    paths = [str(p) for p in sorted(data.elpv_root().glob("images/*.png"))[: args.images]]
    labels = [i % 2 for i in range(len(paths))]  # two class folders for the recipe; speed ignores labels
    n, bs = len(paths), args.batch_size
    threads = tf.config.threading.get_inter_op_parallelism_threads() or "all"
    print(f"{bb.name} at {args.input_size}px, batch {bs}, {n} ELPV images, {threads} threads")

    forward = tf.function(lambda x: model(x, training=False), autograph=False)
    batch = tf.random.uniform((bs, args.input_size, args.input_size, 3), 0, 255)
    forward(batch)

    def in_memory():
        start = time.perf_counter()
        for _ in range(n // bs):
            forward(batch)["pooled"].numpy()
        return (n // bs) * bs / (time.perf_counter() - start)

    def stage():
        with tempfile.TemporaryDirectory() as tmp:
            stats = features.extract_split(
                model, paths, labels, [str(i) for i in range(n)], record, bs, Path(tmp), "stage path"
            )
        return stats["images_per_second"]

    def recipe(load_only: bool):
        from keras.src.legacy.preprocessing.image import ImageDataGenerator

        with tempfile.TemporaryDirectory() as tmp:
            for path, label in zip(paths, labels):  # the class-subfolder layout the recipe needs
                (Path(tmp) / str(label)).mkdir(exist_ok=True)
                (Path(tmp) / str(label) / Path(path).name).symlink_to(path)
            module, fn = bb.keras_preprocess.rsplit(".", 1)
            preprocess = getattr(__import__(module, fromlist=[fn]), fn)
            gen = ImageDataGenerator(preprocessing_function=preprocess).flow_from_directory(
                tmp, target_size=(args.input_size, args.input_size), batch_size=bs, class_mode=None, shuffle=False
            )
            start = time.perf_counter()
            if load_only:
                count = sum(len(gen[i]) for i in range(len(gen)))
            else:
                count = len(model.predict(gen, verbose=0)["pooled"])
            return count / (time.perf_counter() - start)

    a = best_of(args.repeats, in_memory)
    b = best_of(args.repeats, stage)
    c = best_of(args.repeats, lambda: recipe(load_only=False))
    loading = best_of(args.repeats, lambda: recipe(load_only=True))
    print(f"(a) backbone forward, in-memory tensors : {a:8.1f} img/s")
    print(f"(b) extract_features stage, from files  : {b:8.1f} img/s")
    print(f"(c) flow_from_directory + model.predict : {c:8.1f} img/s")
    print(f"    its loading alone, without the model  : {loading:8.1f} img/s")
    print(f"(b)/(a) = {b / a:.2f}  (target >= 0.9)")
    print(
        f"(b)/(c) = {b / c:.2f}  (target >= 2; no loader can exceed (a)/(c) = {a / c:.2f} here, "
        f"where the forward pass runs at {a:.0f} img/s and the recipe's loading at {loading:.0f})"
    )


if __name__ == "__main__":
    main()
