"""The CI benchmark guard (RELIABILITY N7): ``--benchmark-compare-fail`` fails a
run whose median regressed against a stored baseline, and passes one that did not.

A tiny self-contained benchmark (a timed sleep) runs in a subprocess three times
against one storage folder: once to save the baseline, once unchanged, once with
an injected 5x slowdown.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

BENCH = """
import os
import time


def test_sleep(benchmark):
    delay = float(os.environ["GUARD_SLEEP_S"])
    benchmark.pedantic(time.sleep, args=(delay,), rounds=5, iterations=1)
"""

BASE_SLEEP_S = 0.01
THRESHOLD = "median:100%"


def _pytest(tmp: Path, sleep_s: float, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["GUARD_SLEEP_S"] = str(sleep_s)
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # only pytest-benchmark: fast start
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "bench_sleep.py",
        "-q",
        "-p",
        "pytest_benchmark.plugin",
        "-p",
        "no:cacheprovider",
        "-c",
        str(tmp / "pytest.ini"),
        "--rootdir",
        str(tmp),
        f"--benchmark-storage=file://{tmp / 'storage'}",
        *extra,
    ]
    return subprocess.run(
        cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=120
    )


def test_compare_fail_exits_nonzero_on_injected_regression(tmp_path: Path) -> None:
    (tmp_path / "bench_sleep.py").write_text(BENCH)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")

    saved = _pytest(tmp_path, BASE_SLEEP_S, "--benchmark-save=baseline")
    assert saved.returncode == 0, saved.stdout + saved.stderr
    assert list((tmp_path / "storage").rglob("0001_baseline.json"))

    compare = ("--benchmark-compare=0001", f"--benchmark-compare-fail={THRESHOLD}")
    same = _pytest(tmp_path, BASE_SLEEP_S, *compare)
    assert same.returncode == 0, same.stdout + same.stderr

    slower = _pytest(tmp_path, 5 * BASE_SLEEP_S, *compare)
    output = slower.stdout + slower.stderr
    assert slower.returncode == 1, output
    assert "Performance has regressed" in output
