"""Numeric precision: resolve ``compute.precision`` once per stage and apply Keras' mixed-precision policy.

Mixed precision changes the numbers a model computes, so it is provenance like the preprocessing:
the resolved value (never ``auto``) is recorded on every artifact, and stages refuse inputs made
under another precision. Keras does the work: layers built under a ``mixed_*`` policy compute in
bfloat16/float16 with float32 variables; the head's logits and the pooled features are float32
layers, so losses and stored features stay float32; ``Model.compile`` wraps the optimizer in a
``LossScaleOptimizer`` under ``mixed_float16``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
SETTINGS = (*PRECISIONS, "auto")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
BF16_GPU_CAPABILITY = (8, 0)  # Ampere on: bfloat16 tensor cores


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags Linux reports (empty where /proc/cpuinfo does not exist)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def gpu_capabilities() -> list[tuple[int, int]]:
    """Compute capability of each visible GPU."""
    import tensorflow as tf

    return [
        tuple(tf.config.experimental.get_device_details(g).get("compute_capability") or (0, 0))
        for g in tf.config.list_physical_devices("GPU")
    ]


def resolve(setting: str, flags: set[str] | None = None, gpus: list[tuple[int, int]] | None = None) -> tuple[str, str]:
    """(precision, why) for a ``compute.precision`` setting on this machine; ``auto`` never comes back."""
    if setting not in SETTINGS:
        raise ValueError(f"compute.precision must be one of {SETTINGS}, got {setting!r}")
    if setting != "auto":
        return setting, "set in params"
    gpus = gpu_capabilities() if gpus is None else gpus
    if gpus:
        capability = min(gpus)
        name = "mixed_bfloat16" if capability >= BF16_GPU_CAPABILITY else "mixed_float16"
        return name, f"auto: GPU compute capability {capability[0]}.{capability[1]}"
    found = sorted(set(BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags))
    if found:
        return "mixed_bfloat16", f"auto: CPU flags {' '.join(found)}"
    return "float32", "auto: no bfloat16 units (no GPU, no CPU flag amx_bf16 or avx512_bf16)"


def from_params(params: dict) -> tuple[str, str]:
    """The resolved precision of params.yaml's ``compute.precision`` (validated by transferlab.params)."""
    return resolve(params["compute"]["precision"])


@contextlib.contextmanager
def policy(precision: str):
    """Build models under ``precision``'s Keras policy; the previous global policy comes back afterwards."""
    import keras

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def pooled(x):
    """Global average pooling in float32: a float32 mean of the base's output, whatever its precision."""
    import keras

    return keras.layers.GlobalAveragePooling2D(name="pooled", dtype="float32")(x)
