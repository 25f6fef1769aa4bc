"""Scale: peak memory, time per 1,000 images and disk per stage, on synthetic folders of N JPEGs.

For each N, writes N textured 160x160 JPEGs in class folders (both cores) into a temporary directory,
builds a git + DVC workspace with this checkout's pipeline and a params.yaml for that folder (small input
size, ``weights.init: none``, one epoch: memory and time are measured here, not accuracy), and runs every
stage of dvc.yaml up to evaluate as its own ``dvc repro --single-item --no-commit`` process, in order.
Per stage it records the peak RSS of the process tree (wait4's ru_maxrss: the largest process), the wall
and CPU seconds per 1,000 images, and the bytes the stage added to the workspace on disk. ``split`` is
run a second time on the unchanged folder ("split (again)"), which its per-file cache makes fast.
The targets compare the two largest N: peak RSS ratio <= 1.5, seconds-per-1,000 ratio <= 1.25.

    nice -n 5 python benchmarks/scale.py                     # N = 2,000, 20,000, 100,000 (about 30 min on 2 cores)
    python benchmarks/scale.py --sizes 200,2000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RSS_TARGET, SPEED_TARGET = 1.5, 1.25


def texture(index: int, n_classes: int, size: int) -> np.ndarray:
    """Class k: stripes of the k-th orientation, over smooth colour blobs and fine noise (real JPEG work)."""
    rng = np.random.default_rng(index)
    k = index % n_classes
    blobs = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = np.pi * k / n_classes
    stripes = 60 * np.sin(2 * np.pi * 6 * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 2 * np.pi))
    pixels = np.asarray(blobs, np.float32) * 0.6 + stripes[..., None] + rng.normal(0, 12, (size, size, 3)) + 50
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _write(job) -> int:
    folder, start, stop, n_classes, size = job
    for i in range(start, stop):
        path = Path(folder) / f"class_{i % n_classes}" / f"img_{i:06d}.jpg"
        Image.fromarray(texture(i, n_classes, size)).save(path, quality=90)
    return stop - start


def make_images(folder: Path, n: int, n_classes: int, size: int) -> float:
    """N JPEGs in class folders, written by one process per core; returns the seconds taken."""
    start = time.perf_counter()
    for k in range(n_classes):
        (folder / f"class_{k}").mkdir(parents=True, exist_ok=True)
    chunk = 500
    jobs = [(str(folder), a, min(a + chunk, n), n_classes, size) for a in range(0, n, chunk)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write, jobs))
    return time.perf_counter() - start


def disk_bytes(path: Path, skip=(".git", ".dvc")) -> int:
    """Bytes allocated on disk below path (sparse files count what they use), skipping DVC's and git's folders."""
    total = 0
    for directory, subdirs, names in os.walk(path):
        subdirs[:] = [d for d in subdirs if not (Path(directory) == path and d in skip)]
        for name in names:
            total += os.lstat(os.path.join(directory, name)).st_blocks * 512
    return total


def workspace(repo: Path, code: Path, images: Path, args) -> list[str]:
    """A git + DVC repository with the pipeline and a params.yaml for this folder; returns the stages in order."""
    for name in ("stages", "transferlab"):
        shutil.copytree(code / name, repo / name)
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(code / name, repo / name)
    params = yaml.safe_load((code / "params.yaml").read_text())
    bb = args.backbone
    params["data"].update(source="folder", folder=str(images), stratify_by=[])
    params["weights"]["init"] = "none"
    params["extract"].update(backbones=[bb], preprocessing=["native"], input_size={bb: args.input_size})
    params["train"]["epochs"] = args.epochs
    params["finetune"].update(backbones=[bb], methods=["finetune_top"], epochs=args.epochs)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"]):
        subprocess.run(cmd, cwd=repo, check=True)
    subprocess.run(
        ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "scale benchmark"],
        cwd=repo,
        check=True,
    )
    listed = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=repo, check=True, capture_output=True)
    stages = listed.stdout.decode().split()
    return stages[: stages.index(args.until) + 1]


def run_stage(name: str, repo: Path, env: dict, log: Path, force: bool = False) -> dict:
    """One stage as its own process tree: wall and CPU seconds, peak RSS (the largest process, from wait4)."""
    cmd = ["dvc", "repro", "--single-item", "--no-commit", *(["--force"] if force else []), name]
    before = disk_bytes(repo)
    start = time.perf_counter()
    with open(log, "ab") as out:
        process = subprocess.Popen(cmd, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        tail = log.read_text(errors="replace")[-4000:]
        raise SystemExit(f"scale: stage {name} failed (exit {process.returncode}):\n{tail}")
    return {
        "seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # KiB on Linux
        "disk_bytes_added": disk_bytes(repo) - before,
    }


def measure(n: int, code: Path, args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"transferlab-scale-{n}-", dir=args.tmp))
    try:
        images, repo = tmp / "images", tmp / "repo"
        repo.mkdir()
        generated = make_images(images, n, args.classes, args.image_size)
        print(f"N={n}: {n} JPEGs written in {generated:.0f} s ({disk_bytes(images) / 2**20:.0f} MiB)", file=sys.stderr)
        env = {
            **os.environ,
            "PYTHONPATH": str(repo),  # the copied pipeline, not whatever checkout is installed
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
            "TRANSFERLAB_CACHE": str(tmp / "cache"),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "CUDA_VISIBLE_DEVICES": "",
        }
        result = {"n": n, "images_bytes": disk_bytes(images), "stages": {}}
        for name in workspace(repo, code, images, args):
            runs = [(name, False)] + ([("split (again)", True)] if name == "split" else [])
            for label, force in runs:
                stats = run_stage(name, repo, env, tmp / "stages.log", force)
                result["stages"][label] = stats
                print(
                    f"N={n} {label}: {stats['seconds']:.1f} s, peak RSS {stats['peak_rss_bytes'] / 2**20:.0f} MiB",
                    file=sys.stderr,
                )
        return result
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def table(results: list[dict]) -> str:
    """Markdown: one row per stage, per N peak RSS / s per 1k images (wall, CPU) / disk added; then the ratios."""
    sizes = [r["n"] for r in results]
    head = "| stage | " + " | ".join(f"N={n:,}: peak RSS MiB, s/1k (CPU s/1k), disk MiB" for n in sizes)
    lines = [head + " |", "|---" * (len(sizes) + 1) + "|"]
    for stage in results[0]["stages"]:
        cells = []
        for r in results:
            s = r["stages"][stage]
            per_k = 1000 / r["n"]
            cells.append(
                f"{s['peak_rss_bytes'] / 2**20:.0f}, {s['seconds'] * per_k:.2f} ({s['cpu_seconds'] * per_k:.2f}), "
                f"{s['disk_bytes_added'] / 2**20:.1f}"
            )
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    if len(results) >= 2:
        small, big = results[-2], results[-1]
        lines += [
            "",
            f"Ratios N={big['n']:,} / N={small['n']:,} (targets: RSS <= {RSS_TARGET}, s per 1k <= {SPEED_TARGET}):",
            "",
            "| stage | peak RSS ratio | s per 1k ratio (wall) | CPU s per 1k ratio | met |",
            "|---|---|---|---|---|",
        ]
        for stage, a in small["stages"].items():
            b = big["stages"][stage]
            rss = b["peak_rss_bytes"] / a["peak_rss_bytes"]
            wall = (b["seconds"] / big["n"]) / (a["seconds"] / small["n"])
            cpu = (b["cpu_seconds"] / big["n"]) / (a["cpu_seconds"] / small["n"])
            met = "yes" if rss <= RSS_TARGET and wall <= SPEED_TARGET else "**no**"
            lines.append(f"| {stage} | {rss:.2f} | {wall:.2f} | {cpu:.2f} | {met} |")
    return "\n".join(lines)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,20000,100000", help="comma-separated numbers of images")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--until", default="evaluate", help="the last stage run (e.g. split to measure the split)")
    parser.add_argument("--tmp", default=None, help="where the temporary folders go (default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders (for debugging)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    # the pipeline is copied once, so editing the checkout during a long run changes nothing
    code = Path(tempfile.mkdtemp(prefix="transferlab-scale-code-", dir=args.tmp))
    try:
        for name in ("stages", "transferlab"):
            shutil.copytree(ROOT / name, code / name, ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("dvc.yaml", ".gitignore", ".dvcignore", "params.yaml"):
            shutil.copy(ROOT / name, code / name)
        results = [measure(n, code, args) for n in sizes]
    finally:
        shutil.rmtree(code, ignore_errors=True)
    header = (
        f"{args.backbone} at {args.input_size} px, weights.init none, {args.epochs} epoch(s), "
        f"{args.classes} classes of {args.image_size}x{args.image_size} JPEGs; {cpu_model()}, {os.cpu_count()} cores"
    )
    print(header + "\n\n" + table(results))
    if args.json:
        args.json.write_text(json.dumps({"setup": header, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
