"""The suite's own hygiene: what a run leaves on disk. The end-to-end tests write gigabytes into tmp_path;
kept from run to run, as pytest does by default, they filled CI's disk (ENOSPC in a DVC export)."""

import os
import subprocess
import sys

from helpers import ROOT

INNER = """
import pytest

@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    path = tmp_path_factory.mktemp("shared")
    (path / "big.bin").write_bytes(bytes(1 << 20))
    return path

def test_writes(tmp_path, shared):
    (tmp_path / "big.bin").write_bytes(bytes(1 << 20))

def test_also_writes(tmp_path, shared):
    (tmp_path / "big.bin").write_bytes(bytes(1 << 20))
    assert FAIL == 0
"""


def run_inner(tmp_path, fail: int) -> list[str]:
    """Run two tests under the project's pytest.ini with their own temporary root; return the files left."""
    work = tmp_path / f"fail{fail}"
    root = work / "temproot"
    root.mkdir(parents=True)
    (work / "test_inner.py").write_text(INNER.replace("FAIL", str(fail)))
    env = {**os.environ, "PYTEST_DEBUG_TEMPROOT": str(root)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-c",
            str(ROOT / "pytest.ini"),
            "--rootdir",
            str(work),
            "-p",
            "no:cacheprovider",
            str(work / "test_inner.py"),
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == (1 if fail else 0), out.stdout[-2000:] + out.stderr[-2000:]
    return sorted(str(p.relative_to(root)).split("/", 2)[-1] for p in root.rglob("big.bin"))


def test_a_passing_run_leaves_no_files_and_a_failing_one_keeps_only_the_failure(tmp_path):
    assert run_inner(tmp_path, fail=0) == []
    assert run_inner(tmp_path, fail=1) == ["shared0/big.bin", "test_also_writes0/big.bin"]
