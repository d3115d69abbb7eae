"""Work moved off the caller's thread (OpenMP teams, llmprod/_threads.py)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

import llmprod.engine
from llmprod import SamplingParams
from llmprod._threads import run_in_own_thread


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
    real = llmprod.engine.build_model

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(llmprod.engine, "build_model", spy)
    eng = make_engine()
    assert threads and threads[0] is not threading.current_thread()
    out = eng.generate("Hi", SamplingParams(max_tokens=2, temperature=0))
    assert len(out[0].token_ids) == 2
