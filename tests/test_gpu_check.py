"""scripts/gpu-check.sh cannot rot: its dry run checks that every test file,
script option and module it would call on a GPU machine is still there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_dry_run_passes(tmp_path: Path) -> None:
    out = subprocess.run(
        ["bash", "scripts/gpu-check.sh", "--dry-run", f"--out={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    steps = [line for line in out.stdout.splitlines() if line.startswith("== ")]
    names = [s.split(":")[0][3:] for s in steps]
    assert names == [
        "machine",
        "kernel-tests",
        "engine-triton-vs-torch",
        "bnb-tests",
        "bnb-engine-and-4bit",
        "bench-paged-attention",
        "bench-store-kv",
    ]
    assert "every step's test, script and module is in place" in out.stdout


def test_the_gpu_check_refuses_an_unknown_option() -> None:
    out = subprocess.run(
        ["bash", "scripts/gpu-check.sh", "--fast"], cwd=ROOT, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "unknown argument: --fast" in out.stderr
