"""Where llmprod runs its torch work on CPU (OpenMP thread teams).

PyTorch's CPU wheels parallelise ops with GNU OpenMP, which keeps one team of
worker threads per thread that has run a parallel op, for as long as that thread
lives. Once the process has more of these workers than CPUs, libgomp stops
spinning between parallel regions: every worker goes to sleep after each op and
has to be woken for the next one. An engine step runs thousands of short parallel
ops per second; on a 2-CPU machine one extra team cost nearly a third of the batch-1
decode speed: 29.4 against 20.7 ms per token (docs/benchmarks.md, "OpenMP thread
teams"). So:

- every engine's model steps (and the MiniLM embedder's forward passes) run on
  one process-wide compute thread (:func:`run_on_compute_thread`), whose team is
  the only lasting one however many engines the process holds (a router's);
- loading runs on a short-lived thread (:func:`run_in_own_thread`), whose team
  goes away with it, so that loading a model never waits for another engine's
  steps.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["run_in_own_thread", "run_on_compute_thread"]


def run_in_own_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on a new thread that ends when it returns.

    Returns its result or raises its exception (with its traceback) in the
    caller. The caller waits; an interrupt while waiting leaves the (daemon)
    thread to finish on its own.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    worker = threading.Thread(target=target, name="llmprod-worker", daemon=True)
    worker.start()
    worker.join()
    if "error" in box:
        raise box.pop("error")
    return box["result"]  # type: ignore[no-any-return]


class _ComputeThread:
    """One daemon thread running submitted calls in order."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.thread = threading.Thread(
            target=self._run, name="llmprod-compute", daemon=True
        )
        self.thread.start()

    def _run(self) -> None:
        while True:
            fn, args, kwargs, future = self._calls.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to the caller's future
                future.set_exception(exc)

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        self._calls.put((fn, args, kwargs, future))
        return future


_compute: _ComputeThread | None = None
_compute_lock = threading.Lock()


def _forget_compute_thread() -> None:  # a forked child has no such thread
    global _compute, _compute_lock
    _compute, _compute_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_compute_thread)


def compute_thread() -> threading.Thread:
    """The process's compute thread (started on first use)."""
    global _compute
    with _compute_lock:
        if _compute is None:
            _compute = _ComputeThread()
        return _compute.thread


def run_on_compute_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on the process-wide compute thread; the caller
    waits for its result or exception. Calls from several threads run one at a
    time, in the order they arrive; a call made on the compute thread itself runs
    at once."""
    thread = compute_thread()
    if threading.current_thread() is thread:
        return fn(*args, **kwargs)
    assert _compute is not None
    return _compute.submit(fn, *args, **kwargs).result()
