"""Run torch work on a thread that exits afterwards (OpenMP thread teams).

PyTorch's CPU wheels parallelise ops with GNU OpenMP, which keeps one team of
worker threads per thread that has run a parallel op, for as long as that thread
lives. Once the process has more of these workers than CPUs, libgomp stops
spinning between parallel regions: every worker goes to sleep after each op and
has to be woken for the next one. An engine's step thread runs thousands of
short parallel ops per second, and on a 2-CPU machine a second team (left by
loading the model on the caller's thread) cost a quarter of the batch-1 decode
speed: 21.7 against 29.8 ms per token (docs/benchmarks.md, "OpenMP teams").

The work llmprod does on a caller's thread (loading, embedding) therefore runs on
a short-lived thread, whose team goes away with it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["run_in_own_thread"]


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
