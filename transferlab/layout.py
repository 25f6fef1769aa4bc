"""Where every artifact lives and what every run is called, from (method, backbone, preprocessing).

The one place that knows the pipeline's file layout: stages, evaluate, export, the study and the
tests build paths here, and ``tests/test_layout.py`` checks that dvc.yaml's rendered stages declare
exactly these outputs. Paths are relative to the project root (where DVC runs the stages);
functions that locate a file inside a folder take that folder as ``root``.

A run is named ``<method>/<backbone>-<preprocessing>``, e.g. ``train_head/vgg16-native``: the same
name is its folder under runs/, its DVCLive folder under results/, its evaluation under
results/eval/, its DVC metrics file under results/metrics/ and its MLflow run name.
"""

from __future__ import annotations

from pathlib import Path

# One name per method, in pipeline order: the record's ``method``, the MLflow tag, the run name's prefix.
TRAIN_HEAD = "train_head"  # the head on cached (bottleneck) features
METHODS = (TRAIN_HEAD, "frozen_end_to_end", "finetune_top")
FINETUNE_METHODS = METHODS[1:]  # the finetune stage's methods: they train on images (or cut activations)

SPLIT = Path("data/split")
WEIGHTS = Path("models/weights")
FEATURES = Path("features")
CUT = Path("cut")  # finetune_top's cached cut-point activations, per fine-tuned backbone
RUNS = Path("runs")
RESULTS = Path("results")
EVAL = RESULTS / "eval"
METRICS = RESULTS / "metrics"  # the DVC metrics: one flat file per scored run
EXTRACT_SPEED = RESULTS / "extract_features"  # timings, kept out of features/ so they never invalidate it
SELFTEST_RESULTS = RESULTS / "selftest.json"
REPORTS = Path("reports")
SELFTEST_REPORT = REPORTS / "selftest.md"
PLOTS = REPORTS / "plots"
RESULTS_TABLE = REPORTS / "results.md"
RESULTS_CSV = REPORTS / "results.csv"
EXPORT = Path("models/export")

# File names inside those folders.
FEATURES_META = "meta.json"  # how a features folder was made
RUN_RECORD = "run.json"
HISTORY = "history.csv"
HEAD_WEIGHTS = "head.weights.h5"  # train_head's output
MODEL_WEIGHTS = "model.weights.h5"  # the finetune methods' output: base + head
PREDICTIONS = "predictions.csv"
EVAL_METRICS = "metrics.json"


def pair(backbone: str, preprocessing: str) -> str:
    """``vgg16-native``: names a features folder and, after the method, a run."""
    return f"{backbone}-{preprocessing}"


def run_name(method: str, backbone: str, preprocessing: str) -> str:
    return f"{method}/{pair(backbone, preprocessing)}"


def parse_run_name(name: str) -> tuple[str, str, str]:
    """(method, backbone, preprocessing) of a run name; backbone names hold no hyphen."""
    method, _, rest = name.partition("/")
    backbone, _, preprocessing = rest.rpartition("-")
    if not (method and backbone and preprocessing):
        raise ValueError(f"not a run name (<method>/<backbone>-<preprocessing>): {name!r}")
    return method, backbone, preprocessing


def weights_dir(backbone: str) -> Path:
    return WEIGHTS / backbone


def features_dir(backbone: str, preprocessing: str) -> Path:
    return FEATURES / pair(backbone, preprocessing)


def cut_dir(backbone: str, preprocessing: str) -> Path:
    return CUT / pair(backbone, preprocessing)


def extract_speed(backbone: str, preprocessing: str) -> Path:
    return EXTRACT_SPEED / f"{pair(backbone, preprocessing)}.json"


def run_dir(name: str, root: Path = RUNS) -> Path:
    """A training run's output folder: weights, history.csv, run.json."""
    return Path(root) / name


def live_dir(name: str) -> Path:
    """A training run's DVCLive folder."""
    return RESULTS / name


def eval_dir(name: str, root: Path = EVAL) -> Path:
    """evaluate's predictions.csv and metrics.json of one run."""
    return Path(root) / name


def metrics_file(name: str, root: Path = METRICS) -> Path:
    return Path(root) / f"{name}.json"


def planned_runs(params: dict) -> list[str]:
    """Every run the params define, in pipeline order: train_head per extracted pair, then each
    finetune method per fine-tuned backbone (on finetune.preprocessing's features)."""
    extract, finetune = params["extract"], params["finetune"]
    heads = [run_name(TRAIN_HEAD, b, p) for b in extract["backbones"] for p in extract["preprocessing"]]
    return heads + [
        run_name(m, b, finetune["preprocessing"]) for m in finetune["methods"] for b in finetune["backbones"]
    ]
