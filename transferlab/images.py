"""Decode any image file into the RGB uint8 array every backbone starts from, and resize it.

Decoding goes through Pillow so that every mode the split stage accepts (grayscale,
palette, CMYK, RGBA, 16-bit) is handled by one function; the manifest records which
conversion was applied to which file.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# mode -> what open_rgb does to it; recorded per file in the manifest
CONVERSIONS = {
    "RGB": "none",
    "L": "gray->RGB (channel replicated)",
    "1": "bilevel->RGB",
    "P": "palette->RGB",
    "PA": "palette+alpha->RGB (alpha dropped)",
    "LA": "gray+alpha->RGB (alpha dropped)",
    "RGBA": "RGBA->RGB (alpha dropped)",
    "CMYK": "CMYK->RGB",
    "YCbCr": "YCbCr->RGB",
    "I;16": "16-bit gray->8-bit (>>8)->RGB",
    "I;16B": "16-bit gray->8-bit (>>8)->RGB",
    "I;16L": "16-bit gray->8-bit (>>8)->RGB",
    "I": "32-bit int gray->8-bit (clipped 0..65535, >>8)->RGB",
}


def to_rgb(image: Image.Image) -> np.ndarray:
    """Pillow image of any supported mode -> HxWx3 uint8 RGB."""
    mode = image.mode
    if mode not in CONVERSIONS:
        raise ValueError(f"unsupported image mode {mode!r}")
    if mode.startswith("I"):
        arr = np.asarray(image, dtype=np.int64)
        gray = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode in ("P", "PA"):
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def open_rgb(path) -> np.ndarray:
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def resize(images, record: dict):
    """Resize RGB images (HxWx3 or NxHxWx3) exactly as the preprocessing record says."""
    import tensorflow as tf

    return tf.image.resize(
        tf.cast(images, tf.float32),
        record["input_size"],
        method=record["interpolation"],
        antialias=record["antialias"],
    )
