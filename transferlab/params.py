"""params.yaml, read once and checked against one schema before a stage does anything.

Every stage starts with :func:`load_for_stage`: a bad value anywhere in the file stops it
with one message listing every bad key and value, instead of a traceback deep in Keras
or a ``KeyError`` after training. Values are also normalised: YAML 1.1 reads ``1e-3``
as a string, which is accepted here as the number it means.

To add a section, add one entry to :data:`SCHEMA` (key -> check); checks that relate
keys to each other go in :data:`RELATIONS`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import yaml

from transferlab import backbones, layout, precision

Check = Callable[[Any], Any]  # returns the (normalised) value or raises Invalid("must be ..., got ...")


class ParamsError(ValueError):
    """params.yaml is missing or holds bad values; the message lists every one."""


class Invalid(ValueError):
    """Why a value is refused; ``problems`` holds (sub-key, message) pairs, e.g. (".vgg16", "must be ...")."""

    def __init__(self, message: str, at: str = "", problems: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.problems = problems or [(at, message)]


def _got(value) -> str:
    return f"got {value!r}"


def integer(minimum: int | None = None) -> Check:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            raise Invalid(f"must be an integer{f' >= {minimum}' if minimum is not None else ''}, {_got(value)}")
        return value

    return check


def number(
    low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = True
) -> Check:
    """A finite number in the given interval; a numeric string (YAML 1.1's ``1e-3``) becomes a float."""
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    span = f" in {lo}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{hi}"
    words = "a number" + (span if low is not None or high is not None else "")

    def check(value):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise Invalid(f"must be {words}, {_got(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise Invalid(f"must be {words}, {_got(value)}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise Invalid(f"must be {words}, {_got(value)}")
        return value

    return check


def choice(*options) -> Check:
    def check(value):
        if value not in options:
            raise Invalid(f"must be one of {', '.join(map(str, options))}, {_got(value)}")
        return value

    return check


def boolean(value):
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, {_got(value)}")
    return value


def text(value):
    if not isinstance(value, str) or not value:
        raise Invalid(f"must be a non-empty string, {_got(value)}")
    return value


def optional(inner: Check) -> Check:
    """null, or what ``inner`` accepts."""

    def check(value):
        if value is None:
            return None
        try:
            return inner(value)
        except Invalid as error:
            raise Invalid(f"{error} (or null)") from None

    return check


def list_of(inner: Check, unique: bool = True, allow_str: bool = False) -> Check:
    """A list whose items ``inner`` accepts; ``allow_str`` takes a lone string as a one-item list."""

    def check(value):
        if allow_str and isinstance(value, str):
            value = [value]
        if value is None and allow_str:
            value = []
        if not isinstance(value, list):
            raise Invalid(f"must be a list, {_got(value)}")
        items = [inner(item) for item in value]
        if unique and len(set(map(repr, items))) != len(items):
            raise Invalid(f"must not repeat an item, {_got(value)}")
        return items

    return check


def mapping(key: Check, value: Check | Callable[[Any, Any], Any], keyed: bool = False) -> Check:
    """A dict (null: empty) whose keys and values the checks accept; ``keyed``: value(key, value)."""

    def check(found):
        if found is None:
            return {}
        if not isinstance(found, dict):
            raise Invalid(f"must be a mapping, {_got(found)}")
        out, problems = {}, []
        for k, v in found.items():
            try:
                out[key(k)] = value(k, v) if keyed else value(v)
            except Invalid as error:
                problems += [(f".{k}{at}", message) for at, message in error.problems]
        if problems:
            raise Invalid(problems[0][1], problems=problems)
        return out

    return check


def cut_point(name: str, value):
    """A fine-tuning cut point that the backbone's registry record defines."""
    return choice(*backbones.cut_point_names(backbones.REGISTRY[name]))(value)


def positive_classes(value):
    """The binary figure's positive classes: auto (ELPV's), null (none) or class names, matched to the
    dataset's classes when evaluate runs (transferlab.data.binary_task)."""
    if value is None or value == "auto":
        return value
    try:
        return list_of(text)(value)
    except Invalid:
        raise Invalid(f"must be auto, null or a list of class names, {_got(value)}") from None


backbone = choice(*sorted(backbones.REGISTRY))
variant = choice(*backbones.VARIANTS)
OPTIMIZERS = ("adam", "sgd")
POOLINGS = ("avg", "flatten")
DROPOUT_POSITIONS = ("after_dense", "before_dense")
AUGMENTATIONS = ("none", "train", "train_and_val")
CUT_DTYPES = ("float32", "float16")  # how cut-point activations are stored (transferlab.cut)
AUGMENTATION_PRESETS = ("none", "keras", "el_cell")  # transferlab.features.augmenter
LR_SCHEDULES = ("constant", "cosine", "plateau")
OVERSAMPLING = ("sqrt", "balanced")  # transferlab.features.OVERSAMPLE_POWER
# The training controls of the train and finetune sections (README, "Training controls"); each is optional,
# and its default is the behaviour from before it existed: constant rate, no early stopping, no weighting.
CONTROLS = {
    "lr_schedule": (choice(*LR_SCHEDULES), "constant"),
    "warmup_epochs": (integer(0), 0),  # cosine only
    "early_stopping_patience": (integer(0), 0),  # 0: off; else stop after this many epochs without improvement
    "early_stopping_monitor": (choice("val_loss", "val_accuracy"), "val_loss"),  # also what plateau watches
    "class_weight": (choice("none", "balanced", "sqrt"), "none"),
    "label_smoothing": (number(0, 1), 0.0),
    "ema_momentum": (number(0, 1), 0.0),  # 0: off; else the weights scored and kept are a moving average
    "oversample": (choice("none", *OVERSAMPLING), "none"),  # draw the training rows by class (features.epoch_order)
}
CONTROL_DEFAULTS = {key: default for key, (_, default) in CONTROLS.items()}
# controls of Keras' fit that the converged linear probe (scikit-learn's L-BFGS) has no counterpart for
# (a run records its params: an ignored control would be recorded as if it had shaped the probe)
LBFGS_REFUSES = {
    "ema_momentum": "averages a Keras optimizer's weights, not lbfgs's",
    "oversample": "lbfgs fits every row once (class_weight weighs them)",
    "label_smoothing": "lbfgs fits the plain log-loss",
    "lr_schedule": "lbfgs takes no learning rate",
    "early_stopping_patience": "lbfgs fits each L2 strength to convergence and keeps the best on validation",
    "early_stopping_monitor": "lbfgs keeps the L2 strength with the best validation accuracy",
}

# section -> key -> check. A key is required unless listed in OPTIONAL (value: its default).
SCHEMA: dict[str, dict[str, Check]] = {
    "data": {
        "source": choice("elpv", "folder"),
        "folder": optional(text),
        "bad_files": choice("error", "skip"),
        # both > 0: training stops on its validation loss, evaluation scores the test split
        "test_fraction": number(0, 1, low_open=True),
        "val_fraction": number(0, 1, low_open=True),
        "stratify_by": list_of(text, allow_str=True),
        "seed": integer(),
    },
    "weights": {
        "init": choice("imagenet", "none"),
        "paths": mapping(backbone, text),
        "missing": choice("report", "error"),
        "download_top": boolean,
    },
    "extract": {
        "backbones": list_of(backbone),
        "preprocessing": list_of(variant),
        "input_size": mapping(backbone, optional(integer(32))),
        "batch_size": integer(1),
        "conv_map": boolean,
    },
    "train": {
        "seed": integer(),
        "epochs": integer(1),
        "batch_size": integer(1),
        "optimizer": choice(*OPTIMIZERS),
        "learning_rate": number(0, low_open=True),
        "momentum": number(0, 1),
        **{key: check for key, (check, _) in CONTROLS.items()},
        "probe_solver": choice("keras", "lbfgs"),  # lbfgs: the converged linear probe (head.units 0)
    },
    "head": {
        "pooling": choice(*POOLINGS),
        "units": integer(0),
        "dropout": number(0, 1),
        "dropout_position": choice(*DROPOUT_POSITIONS),
    },
    "finetune": {
        "backbones": list_of(backbone),
        "preprocessing": variant,
        "methods": list_of(choice(*layout.FINETUNE_METHODS)),
        "cut_point": mapping(backbone, cut_point, keyed=True),
        "cut_dtype": choice(*CUT_DTYPES),
        "epochs": integer(1),
        "batch_size": integer(1),
        "optimizer": choice(*OPTIMIZERS),
        "learning_rate": number(0, low_open=True),
        "momentum": number(0, 1),
        "head_init": choice("trained", "random"),
        **{key: check for key, (check, _) in CONTROLS.items()},
        "augmentation": choice(*AUGMENTATION_PRESETS),  # finetune_top's train split only
    },
    "ablation": {
        "bn_training": boolean,
        "dropout_position": optional(choice(*DROPOUT_POSITIONS)),
        "augmentation": choice(*AUGMENTATIONS),
        "input_size": optional(integer(32)),
        "batch_size": optional(integer(1)),
    },
    "evaluate": {
        "bootstrap": integer(1),
        "seed": integer(),
        "group_by": list_of(text, allow_str=True),
        "batch_size": integer(1),  # images per batch when scoring the models trained on images
        "positive_classes": positive_classes,
    },
    "compute": {
        "precision": choice(*precision.SETTINGS),  # auto: resolved per machine (transferlab.precision)
    },
    "export": {
        "run": optional(text),  # a run name such as finetune_top/vgg16-native; null: best validation accuracy
        "registered_model": optional(text),  # null: transferlab-<dataset>
        "alias": text,
    },
}
OPTIONAL = {
    ("data", "folder"): None,
    ("data", "stratify_by"): [],
    ("evaluate", "group_by"): [],
    ("evaluate", "positive_classes"): "auto",
    **{(section, key): default for section in ("train", "finetune") for key, default in CONTROL_DEFAULTS.items()},
    ("train", "probe_solver"): "keras",
    ("finetune", "augmentation"): "none",
}


def _relations(p: dict) -> list[str]:
    """Checks across keys, run on sections that passed their own checks."""
    problems = []
    for section in ("train", "finetune"):
        cfg = p.get(section)
        if cfg and cfg["warmup_epochs"] and cfg["lr_schedule"] != "cosine":
            problems.append(f"{section}.warmup_epochs: warm-up needs lr_schedule cosine, got {cfg['lr_schedule']!r}")
        elif cfg and cfg["warmup_epochs"] >= cfg["epochs"]:
            problems.append(
                f"{section}.warmup_epochs: must be below {section}.epochs ({cfg['epochs']}), got {cfg['warmup_epochs']}"
            )
    if "train" in p and "head" in p and p["train"]["probe_solver"] == "lbfgs" and p["head"]["units"]:
        units = p["head"]["units"]
        problems.append(f"train.probe_solver: lbfgs trains the linear probe only (head.units 0), got units {units}")
    if "train" in p and p["train"]["probe_solver"] == "lbfgs":
        for key, why in LBFGS_REFUSES.items():
            if p["train"][key] != CONTROL_DEFAULTS[key]:
                problems.append(f"train.{key}: {why}, got {p['train'][key]!r}")
        if "head" in p and p["head"]["dropout"]:
            problems.append(f"head.dropout: lbfgs fits no dropout (set 0), got {p['head']['dropout']!r}")
        if "finetune" in p and "frozen_end_to_end" in p["finetune"]["methods"]:
            problems.append(
                "finetune.methods: frozen_end_to_end reproduces train_head with a Keras fit of the train section, "
                "which an lbfgs probe has no counterpart for; leave it out or use train.probe_solver keras"
            )
    if "data" in p and p["data"]["source"] == "folder" and not p["data"]["folder"]:
        problems.append("data.folder: must name the image tree when data.source is folder, got None")
    if "finetune" in p:
        ft = p["finetune"]
        for name in ft["backbones"]:  # extract_cut@B and finetune@*-B depend on finetune.cut_point.B (dvc.yaml)
            if name not in ft["cut_point"]:
                problems.append(
                    f"finetune.cut_point.{name}: missing; every one of finetune.backbones needs a cut point"
                )
        if "extract" in p and ft["methods"]:  # fine-tuning reads that pair's features
            ex = p["extract"]
            for name in ft["backbones"]:
                if name not in ex["backbones"]:
                    problems.append(
                        f"finetune.backbones: {name!r} is not in extract.backbones "
                        f"{ex['backbones']} (fine-tuning starts from its features)"
                    )
            if ft["preprocessing"] not in ex["preprocessing"]:
                problems.append(
                    f"finetune.preprocessing: {ft['preprocessing']!r} is not in "
                    f"extract.preprocessing {ex['preprocessing']}"
                )
    return problems


RELATIONS: list[Callable[[dict], list[str]]] = [_relations]


def validate(raw) -> dict:
    """The checked, normalised params; raises :class:`ParamsError` listing every problem."""
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml must be a mapping of sections, got {type(raw).__name__}")
    checked = {}
    problems = [f"{name}: unknown section (known: {', '.join(SCHEMA)})" for name in raw if name not in SCHEMA]
    for section, schema in SCHEMA.items():
        given = raw.get(section)
        if not isinstance(given, dict):
            problems.append(
                f"{section}: missing section" if given is None else f"{section}: must be a mapping, got {given!r}"
            )
            continue
        values, ok = {}, True
        for key in sorted(set(given) - set(schema)):
            problems.append(f"{section}.{key}: unknown key (known: {', '.join(schema)})")
            ok = False
        for key, check in schema.items():
            if key not in given:
                if (section, key) in OPTIONAL:
                    values[key] = OPTIONAL[section, key]
                    continue
                problems.append(f"{section}.{key}: missing")
                ok = False
                continue
            try:
                values[key] = check(given[key])
            except Invalid as error:
                problems += [f"{section}.{key}{at}: {message}" for at, message in error.problems]
                ok = False
        if ok:
            checked[section] = values
    for relation in RELATIONS:
        problems += relation(checked)
    if problems:
        raise ParamsError(f"{len(problems)} bad value(s) in params.yaml:\n" + "\n".join(f"  {p}" for p in problems))
    return checked


def load(path: str | os.PathLike = "params.yaml") -> dict:
    """Read and validate the whole file (every section any stage uses)."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as error:
        raise ParamsError(f"cannot read {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path} is not valid YAML: {error}") from None
    return validate(raw)


def load_for_stage(stage: str, path: str | os.PathLike = "params.yaml") -> dict:
    """:func:`load`, or exit with the message (status 1, no traceback): what every stage starts with."""
    try:
        return load(path)
    except ParamsError as error:
        raise SystemExit(f"{stage}: {error}") from None


def with_overrides(raw: dict, overrides: list[str]) -> dict:
    """``raw`` with `dvc exp run -S key=value` overrides applied (a dotted key, a YAML value), as DVC applies them,
    for the study scripts and tests that must see the params an experiment will run with."""
    for item in overrides:
        key, value = item.split("=", 1)
        *parents, last = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[last] = yaml.safe_load(value)
    return raw
