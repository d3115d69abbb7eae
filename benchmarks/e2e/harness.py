"""Helpers shared by the small e2e benchmarks: a per-call timer and runs of one
case per fresh process (so that no case shares its process, and its OpenMP thread
teams, with another)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any


def time_per_call(fn: Callable[[], object], n: int) -> float:
    """Mean seconds per call of ``fn`` over ``n`` calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def run_each_in_own_process(
    module: str, flag: str, names: Iterable[str], repeats: int, args: list[str]
) -> dict[str, list[Any]]:
    """Run ``python -m module flag NAME *args`` once per name per round, the names
    taking turns for ``repeats`` rounds; each child prints its result as JSON on
    its last line. Returns the results by name, in round order."""
    names = list(names)
    runs: dict[str, list[Any]] = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            out = subprocess.run(
                [sys.executable, "-m", module, flag, name, *args],
                check=True,
                capture_output=True,
                text=True,
            )
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs


def profile_compute_thread(fn: Callable[[], object], rows: int = 25) -> str:
    """Run ``fn`` (which drives engines) with torch's profiler recording the ops
    of llmprod's compute thread, where every CPU engine's model steps run; the
    table of the ``rows`` ops with the most self CPU time. (A profiler entered on
    the calling thread would see none of them.)"""
    import torch

    from llmprod.exec.threads import run_on_compute_thread

    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    run_on_compute_thread(prof.__enter__)
    try:
        fn()
    finally:
        run_on_compute_thread(prof.__exit__, None, None, None)
    table: str = prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=rows
    )
    return table
