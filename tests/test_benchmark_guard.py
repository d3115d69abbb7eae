"""Our CI benchmark guard (RELIABILITY N7), as .ci/run configures it.

.ci/run times benchmarks/test_bench_e2e.py and compares the medians with a
baseline stored in benchmarks/.baseline, failing on a regression. The guard only
works if the baseline it names exists and holds the benchmarks the file defines
(pytest-benchmark compares by name and passes silently when nothing matches),
and if its options fail a 2x slowdown but not noise.

The last test replays the stored numbers through the very command of .ci/run, in
a scratch folder: a stand-in test_bench_e2e.py with the same test names, whose
measured time (a fake clock given to ``--benchmark-timer``) is the stored median
scaled by a chosen factor. No model runs; each replay takes about a second.
"""

from __future__ import annotations

import ast
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

pytest.importorskip("pytest_benchmark")

from pytest_benchmark.utils import get_machine_id

ROOT = Path(__file__).resolve().parents[1]
BENCH_FILE = "benchmarks/test_bench_e2e.py"


def guard_args() -> list[str]:
    """The arguments after ``python -m pytest`` on the benchmark line of .ci/run."""
    text = (ROOT / ".ci" / "run").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if "pytest" in words and BENCH_FILE in words:
            return words[words.index("pytest") + 1 :]
    raise AssertionError(f"no `pytest {BENCH_FILE}` line in .ci/run")


def option(args: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
    assert len(values) == 1, f"{name} given {len(values)} times in {args}"
    return values[0]


def storage_dir(args: list[str]) -> str:
    """The storage folder, relative to the repository root as CI runs it."""
    storage = option(args, "--benchmark-storage")
    assert storage.startswith("file://"), storage
    return storage.removeprefix("file://")


def baselines(args: list[str], platform: str = "*") -> list[Path]:
    compare = option(args, "--benchmark-compare")
    return sorted((ROOT / storage_dir(args)).glob(f"{platform}/{compare}_*.json"))


def defined_benchmarks() -> set[str]:
    """Full names of the tests of test_bench_e2e.py that take ``benchmark``."""
    tree = ast.parse((ROOT / BENCH_FILE).read_text())
    return {
        f"{BENCH_FILE}::{node.name}"
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and node.name.startswith("test_")
        and "benchmark" in [a.arg for a in node.args.args]
    }


BENCH_NAMES = sorted(n.split("::test_")[1] for n in defined_benchmarks())


def stored_medians(path: Path) -> dict[str, float]:
    data = json.loads(path.read_text())
    return {b["fullname"]: b["stats"]["median"] for b in data["benchmarks"]}


def test_ci_times_the_benchmarks_and_fails_past_twice_the_median() -> None:
    args = guard_args()
    assert args[0] == BENCH_FILE
    # Timed (the project's addopts disable benchmarks), compared, failing.
    assert "--benchmark-enable" in args
    assert option(args, "--benchmark-compare").isdigit()
    assert option(args, "--benchmark-compare-fail") == "median:100%"


def test_the_baseline_exists_and_names_every_benchmark() -> None:
    args = guard_args()
    found = baselines(args)
    assert len(found) >= 1, f"no baseline {option(args, '--benchmark-compare')}"
    expected = defined_benchmarks()
    assert len(expected) >= 2, expected
    for path in found:
        medians = stored_medians(path)
        assert set(medians) == expected, path
        assert all(m > 0 for m in medians.values()), path


CLOCK = """
import json
import os

_now = 0.0
STEPS = json.loads(os.environ["GUARD_STEPS"])


def timer():
    global _now
    _now += 1e-9  # never stands still
    return _now


def advance(seconds):
    global _now
    _now += seconds
"""

STANDIN_HEAD = """
import guard_clock


def _run(benchmark, name):
    step = guard_clock.STEPS[name]
    benchmark.pedantic(guard_clock.advance, args=(step,), rounds=5)
"""


def _replay(tmp: Path, steps: dict[str, float]) -> subprocess.CompletedProcess[str]:
    """Run .ci/run's benchmark command in ``tmp`` with the given medians."""
    args = guard_args()
    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())
    addopts = ini["tool"]["pytest"]["ini_options"].get("addopts", "")
    (tmp / "pytest.ini").write_text(f"[pytest]\naddopts = {addopts}\n")
    env = dict(os.environ)
    env["GUARD_STEPS"] = json.dumps({k.split("::")[1]: v for k, v in steps.items()})
    env["PYTHONPATH"] = str(tmp)
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # only pytest-benchmark: fast start
    cmd = [
        *(sys.executable, "-m", "pytest", *args),
        *("-p", "pytest_benchmark.plugin", "-c", str(tmp / "pytest.ini")),
        *("--rootdir", str(tmp), "--benchmark-timer=guard_clock.timer"),
    ]
    return subprocess.run(
        cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=120
    )


Scratch = tuple[Path, dict[str, float]]


@pytest.fixture
def scratch(tmp_path: Path) -> Scratch:
    """A folder laid out like the repository for the guard: the stored baseline
    and a stand-in benchmark file; and the baseline's medians."""
    args = guard_args()
    stored = baselines(args, get_machine_id())
    if not stored:
        pytest.skip(f"no baseline stored for {get_machine_id()}: CI compares within it")
    shutil.copytree(ROOT / storage_dir(args), tmp_path / storage_dir(args))
    body = "".join(
        f"\n\ndef test_{n}(benchmark):\n    _run(benchmark, 'test_{n}')\n"
        for n in BENCH_NAMES
    )
    bench = tmp_path / BENCH_FILE
    bench.parent.mkdir(parents=True, exist_ok=True)
    bench.write_text(STANDIN_HEAD + body)
    (tmp_path / "guard_clock.py").write_text(CLOCK)
    return tmp_path, stored_medians(stored[-1])


def _scaled(medians: dict[str, float], **factors: float) -> dict[str, float]:
    return {k: m * factors.get(k.split("::test_")[1], 1.0) for k, m in medians.items()}


def test_noise_passes(scratch: Scratch) -> None:
    tmp, medians = scratch
    # 30% slower and 30% faster, in turn.
    factors = {n: (1.3, 0.7)[i % 2] for i, n in enumerate(BENCH_NAMES)}
    run = _replay(tmp, _scaled(medians, **factors))
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    # It did compare: both benchmarks were matched against the baseline.
    assert out.count(f"({option(guard_args(), '--benchmark-compare')}_") >= 2, out


@pytest.mark.parametrize("slow", BENCH_NAMES)
def test_a_2x_slowdown_of_either_benchmark_fails(scratch: Scratch, slow: str) -> None:
    tmp, medians = scratch
    run = _replay(tmp, _scaled(medians, **{slow: 2.2}))
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    assert "Performance has regressed" in out, out
    regressed = out.split("Performance has regressed", 1)[1]
    assert f"test_{slow} " in regressed
    others = [n for n in BENCH_NAMES if n != slow]
    assert all(f"test_{o} " not in regressed for o in others), regressed
