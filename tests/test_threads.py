"""Where llmprod runs its torch work (OpenMP teams, llmprod/_threads.py)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

import llmprod.engine.loading
from llmprod import SamplingParams
from llmprod.exec.threads import (
    compute_thread,
    run_in_own_thread,
    run_on_compute_thread,
)


def test_runs_on_a_thread_that_ends_and_returns_its_value() -> None:
    seen: list[threading.Thread] = []

    def work(a: int, *, b: int) -> int:
        seen.append(threading.current_thread())
        return a + b

    assert run_in_own_thread(work, 2, b=3) == 5
    assert seen[0] is not threading.current_thread()
    assert not seen[0].is_alive()


def test_the_exception_reaches_the_caller() -> None:
    def fail() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        run_in_own_thread(fail)


def test_from_pretrained_loads_off_the_calling_thread(
    monkeypatch: pytest.MonkeyPatch, make_engine: Any
) -> None:
    # A spy around the real loader: where it runs, not what it does.
    threads: list[threading.Thread] = []
    real = llmprod.engine.loading.build_model

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(llmprod.engine.loading, "build_model", spy)
    eng = make_engine()
    assert threads and threads[0] is not threading.current_thread()
    out = eng.generate("Hi", SamplingParams(max_tokens=2, temperature=0))
    assert len(out[0].token_ids) == 2


def test_compute_thread_runs_calls_from_any_thread_on_one_thread() -> None:
    seen: list[threading.Thread] = []

    def where() -> threading.Thread:
        seen.append(threading.current_thread())
        # A call made on the compute thread runs at once (no deadlock).
        return run_on_compute_thread(threading.current_thread)

    callers = [threading.Thread(target=run_on_compute_thread, args=(where,))]
    callers[0].start()
    callers[0].join()
    assert run_on_compute_thread(where) is compute_thread()
    assert seen == [compute_thread(), compute_thread()]
    assert compute_thread() is not threading.current_thread()

    def fail() -> None:
        raise ValueError("bad step")

    with pytest.raises(ValueError, match="bad step"):
        run_on_compute_thread(fail)
    assert run_on_compute_thread(lambda: 7) == 7  # still serving after a failure


def test_engines_step_on_the_shared_compute_thread(make_engine: Any) -> None:
    # Two engines (as a router holds): both run their model steps on the one
    # compute thread, not on their own step threads.
    threads: list[threading.Thread] = []
    engines = [make_engine(), make_engine()]
    for eng in engines:
        real = eng.runner.execute

        def spy(out: Any, real: Any = real) -> Any:
            threads.append(threading.current_thread())
            return real(out)

        eng.runner.execute = spy
        eng.generate("Hi", SamplingParams(max_tokens=2, temperature=0))
    assert threads and set(threads) == {compute_thread()}


def test_each_engine_steps_with_its_own_thread_count(make_engine: Any) -> None:
    # The compute thread is shared: an engine's num_threads must hold for its
    # steps even after another engine asked for a different count.
    before = torch.get_num_threads()
    counts: dict[str, list[int]] = {"one": [], "two": []}
    try:
        engines = {
            "one": make_engine(num_threads=1),
            "two": make_engine(num_threads=2),
        }
        for name in ("one", "two", "one"):
            eng = engines[name]
            real = eng.runner.execute

            def spy(out: Any, real: Any = real, name: str = name) -> Any:
                counts[name].append(torch.get_num_threads())
                return real(out)

            eng.runner.execute = spy
            eng.generate("Hi", SamplingParams(max_tokens=2, temperature=0))
            eng.runner.execute = real
    finally:  # for the tests after this one, on both threads
        torch.set_num_threads(before)
        run_on_compute_thread(torch.set_num_threads, before)
    assert counts["one"] and set(counts["one"]) == {1}
    assert counts["two"] and set(counts["two"]) == {2}
