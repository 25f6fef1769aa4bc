"""Models and training loops: the bottleneck head, the frozen end-to-end model, fine-tuning.

The head is one Keras model built from explicit seeds and reused unchanged on top of
features, on top of a frozen base, and on top of a partly unfrozen base. That is what
makes "bottleneck + head" and "frozen base + head" the same model, so their parity can
be checked, and what makes each ablation switch change exactly one thing.
"""

from __future__ import annotations

import mmap
import time

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from transferlab import precision


def seed_everything(seed: int) -> None:
    """Same seed, same numbers: Python, NumPy and TF seeds plus TF's deterministic kernels."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def strategy(devices: list[str] | None = None) -> tf.distribute.Strategy:
    """MirroredStrategy over several GPUs (or the devices given), the default strategy otherwise."""
    if devices is None:
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] if len(gpus) > 1 else None
    return tf.distribute.MirroredStrategy(devices) if devices else tf.distribute.get_strategy()


def feature_output(pooling: str) -> str:
    """Which stored feature array a head with this pooling (checked by transferlab.params) reads."""
    return "pooled" if pooling == "avg" else "conv_map"


def build_head(input_shape, n_classes: int, head: dict, seed: int) -> keras.Model:
    """Dense(units, relu) + Dropout -> Dense(classes) logits; Dropout in front of the Dense is the ablation.

    ``units: 0`` is a linear classifier on the features (the linear probe); Dropout then acts on the features.
    The ``head`` values are checked by transferlab.params.
    """
    inputs = keras.Input(tuple(input_shape), name="features")
    x = keras.layers.Flatten(name="head_flatten")(inputs) if len(input_shape) > 1 else inputs
    dropout = keras.layers.Dropout(head["dropout"], seed=seed, name="head_dropout")
    linear = head["units"] == 0
    if linear or head["dropout_position"] == "before_dense":
        x = dropout(x)
    if not linear:
        x = keras.layers.Dense(
            head["units"],
            activation="relu",
            name="head_dense",
            kernel_initializer=keras.initializers.GlorotUniform(seed),
        )(x)
        if head["dropout_position"] == "after_dense":
            x = dropout(x)
    logits = keras.layers.Dense(
        n_classes,
        name="logits",
        dtype="float32",  # float32 logits and loss under mixed policies
        kernel_initializer=keras.initializers.GlorotUniform(seed + 1),
    )(x)
    return keras.Model(inputs, logits, name="head")


def load_head(weights_file, input_shape, n_classes: int, head: dict) -> keras.Model:
    """A head with the weights train_head saved (the seed only matters before weights are loaded)."""
    model = build_head(input_shape, n_classes, head, 0)
    model.load_weights(weights_file)
    return model


def head_for(base: keras.Model, n_classes: int, head: dict, seed: int) -> keras.Model:
    """The head that fits on ``base``: its pooled vector, or its last map flattened."""
    shape = base.output.shape[-1:] if head["pooling"] == "avg" else base.output.shape[1:]
    return build_head(shape, n_classes, head, seed)


def _pool(x, pooling: str):
    return precision.pooled(x) if pooling == "avg" else x


def configure_base(base: keras.Model, boundary: str | None, bn_training: bool) -> None:
    """Freeze the base up to and including ``boundary`` (all of it when None).

    BatchNorm stays in inference mode (Keras runs a non-trainable BatchNormalization
    with its moving statistics). ``bn_training`` is the ablation: BatchNorm layers use
    batch statistics and update their moving averages, while gamma/beta below the
    boundary stay frozen, which is what the old "frozen" Keras recipes silently did.
    """
    names = [layer.name for layer in base.layers]
    if boundary is not None and boundary not in names:
        raise ValueError(f"cut boundary {boundary!r} is not a layer of {base.name}")
    first_trainable = names.index(boundary) + 1 if boundary else len(names)
    base.trainable = True
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= first_trainable
        if isinstance(layer, keras.layers.BatchNormalization):
            frozen_below = i < first_trainable
            layer.trainable = bn_training
            if bn_training and frozen_below:
                layer.gamma.trainable = False
                layer.beta.trainable = False


def end_to_end(base: keras.Model, head: keras.Model, pooling: str) -> keras.Model:
    """Images -> base -> pooling -> head; trainability comes from configure_base."""
    return keras.Model(base.input, head(_pool(base.output, pooling)), name=f"{base.name}_end_to_end")


def top_model(base: keras.Model, boundary: str, head: keras.Model, pooling: str) -> keras.Model:
    """Cached activations at ``boundary`` -> the layers above it -> head, sharing the base's layers."""
    upper = keras.Model(base.get_layer(boundary).output, base.output, name=f"{base.name}_upper")
    inputs = keras.Input(tuple(upper.input.shape[1:]), name="cut_activations")
    return keras.Model(inputs, head(_pool(upper(inputs), pooling)), name=f"{base.name}_top")


def make_optimizer(name: str, learning_rate: float, momentum: float = 0.0):
    """``name`` is one of transferlab.params.OPTIMIZERS (checked there)."""
    return {
        "adam": lambda: keras.optimizers.Adam(learning_rate),
        "sgd": lambda: keras.optimizers.SGD(learning_rate, momentum=momentum),
    }[name]()


def compile_model(model: keras.Model, optimizer) -> None:
    model.compile(
        optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )


class StopOnNonFinite(keras.callbacks.Callback):
    """Fail loudly: Keras' TerminateOnNaN ends training quietly and the stage would 'succeed'."""

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._check("training loss", (logs or {}).get("loss", 0.0), f", batch {batch + 1}")

    def on_epoch_end(self, epoch, logs=None):
        # the last step can blow the weights up after the last training loss was computed
        self._check("validation loss", (logs or {}).get("val_loss", 0.0), "")

    def _check(self, what: str, value, where: str) -> None:
        value = float(value)
        if not np.isfinite(value):
            raise FloatingPointError(
                f"{what} became {value} at epoch {self.epoch + 1}{where}; "
                "nothing was saved. Lower the learning rate or check the inputs' preprocessing."
            )


def fit(model: keras.Model, train_ds, val_ds, epochs: int, callbacks=()) -> tuple[pd.DataFrame, float]:
    """Train; returns the per-epoch history (epoch from 1) and the wall time in seconds."""
    start = time.perf_counter()
    hist = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        verbose=2,
        shuffle=False,  # tf.data shuffles
        callbacks=[StopOnNonFinite(), *callbacks],
    )
    seconds = time.perf_counter() - start
    history = pd.DataFrame(hist.history)
    history.insert(0, "epoch", np.arange(1, len(history) + 1))
    return history, seconds


def feature_dataset(x, y, batch_size: int, shuffle_seed: int | None = None) -> tf.data.Dataset:
    """Features in batches, in the same shuffled order image_dataset gives the same rows.

    The shuffle acts on row indices (tf.data's seeded permutation does not depend on the elements),
    and each batch's rows are then read from ``x``: a memory-mapped array is never loaded whole.
    """
    y = np.asarray(y, np.int32)
    read = _row_reader(x)
    ds = tf.data.Dataset.range(len(y))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(y), seed=shuffle_seed, reshuffle_each_iteration=True)

    def rows(index):
        batch = tf.numpy_function(read, [index], tf.float32, stateful=False)
        batch.set_shape([None, *x.shape[1:]])
        return batch, tf.gather(y, index)

    return ds.batch(batch_size).map(rows).prefetch(tf.data.AUTOTUNE)


def _row_reader(x):
    """index -> x[index] as float32. A whole-file memory map (np.load's) is opened per batch and closed after it:
    the pages read leave the process with it, so its resident memory stays flat however large the file is.
    Anything else, a slice of a map included (its ``offset`` is the parent's), is read into memory once."""
    if isinstance(x, np.memmap) and isinstance(x.base, mmap.mmap) and x.filename:
        order = "F" if x.flags.f_contiguous and not x.flags.c_contiguous else "C"

        def read(index):
            mapped = np.memmap(x.filename, x.dtype, "r", offset=x.offset, shape=x.shape, order=order)
            return np.asarray(mapped[index], np.float32)

        return read
    array = np.asarray(x, np.float32)
    return lambda index: array[index]


def train_head(x_train, y_train, x_val, y_val, n_classes: int, cfg: dict, head: dict, callbacks=()):
    """The bottleneck head on in-memory features; returns (model, history, seconds)."""
    seed_everything(cfg["seed"])
    with strategy().scope():
        model = build_head(x_train.shape[1:], n_classes, head, cfg["seed"])
        compile_model(model, make_optimizer(cfg["optimizer"], cfg["learning_rate"], cfg["momentum"]))
    history, seconds = fit(
        model,
        feature_dataset(x_train, y_train, cfg["batch_size"], shuffle_seed=cfg["seed"]),
        feature_dataset(x_val, y_val, cfg["batch_size"]),
        cfg["epochs"],
        callbacks,
    )
    return model, history, seconds


def predict_logits(model: keras.Model, ds) -> np.ndarray:
    """Logits computed as a graph, like extraction's features: under bfloat16, eager and graph kernels round
    differently (fused or not), which alone moved VGG16's parity from 0 to 5e-2 in max |logit| difference."""
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True, autograph=False)
    return np.concatenate([np.asarray(forward(x), np.float32) for x, _ in ds])
