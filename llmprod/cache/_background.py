"""One background thread that runs cache writes so that callers never wait on I/O.

The response and semantic caches hand each write to a :class:`BackgroundWriter`:
``submit`` puts a job on a bounded queue and returns at once. When the queue is
full the job is dropped and counted, never waited for. One daemon thread runs the
jobs in order; a job that raises is logged and counted, and the thread goes on.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("llmprod.cache")

Job = Callable[[], None]

_STOP = object()


class BackgroundWriter:
    """A bounded queue of jobs served by one daemon thread, started on first use.

    Args:
        name: the thread's name.
        max_pending: the most jobs waiting; more are dropped (and counted).
        on_idle: called in the writer thread each time the queue runs empty
            after at least one job (used to coalesce work, e.g. persisting an
            index once per burst of writes).
    """

    def __init__(
        self, name: str, max_pending: int, on_idle: Callable[[], None] | None = None
    ) -> None:
        if isinstance(max_pending, bool) or not isinstance(max_pending, int):
            raise TypeError(f"max_pending must be an int, got {max_pending!r}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.name = name
        self.max_pending = max_pending
        self._on_idle = on_idle
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_pending)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._unfinished = 0  # submitted and not yet run to the end
        self._thread: threading.Thread | None = None
        self._closed = False
        self.done = 0
        self.failed = 0
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished yet (queued or running)."""
        with self._lock:
            return self._unfinished

    def submit(self, job: Job) -> bool:
        """Queue ``job`` without ever blocking.

        Args:
            job: a callable run later in the writer thread.

        Returns:
            Whether the job was queued; ``False`` when the queue is full or the
            writer is closed (the job is dropped and counted).
        """
        with self._lock:
            if self._closed:
                self.dropped += 1
                return False
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=self.name, daemon=True
                )
                self._thread.start()
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                self.dropped += 1
                return False
            self._unfinished += 1
            return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued job has run (or ``timeout`` seconds pass).

        Args:
            timeout: the most seconds to wait; ``None`` waits as long as it takes.

        Returns:
            Whether the queue was drained in time.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._unfinished:
                if deadline is None:
                    self._idle.wait()
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
            return True

    def close(self, timeout: float | None = None) -> bool:
        """Run what is queued (up to ``timeout`` seconds), then stop the thread.

        Jobs still queued when the time is up are dropped and counted. Further
        submits are dropped. Calling it again does nothing.

        Args:
            timeout: the most seconds to wait for queued jobs.

        Returns:
            Whether every queued job ran.
        """
        drained = self.flush(timeout)
        with self._lock:
            if self._closed:
                return drained
            self._closed = True
            thread = self._thread
            if not drained:
                # Count what is left as dropped; the thread may still be inside a
                # hung job, so the queue is emptied here, not by the thread.
                while True:
                    try:
                        self._queue.get_nowait()
                    except queue.Empty:
                        break
                    self.dropped += 1
                    self._unfinished -= 1
                self._idle.notify_all()
        if thread is not None:
            with contextlib.suppress(queue.Full):  # emptied above; never full
                self._queue.put_nowait(_STOP)
            thread.join(timeout if drained else 0.1)
        return drained

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            try:
                job()  # type: ignore[operator]
            except Exception:
                with self._lock:
                    self.failed += 1
                logger.exception("cache writer %s: a write failed", self.name)
            else:
                with self._lock:
                    self.done += 1
            idle = self._queue.empty()
            if idle and self._on_idle is not None:
                try:
                    self._on_idle()
                except Exception:
                    logger.exception("cache writer %s: idle hook failed", self.name)
            with self._lock:
                self._unfinished -= 1
                if not self._unfinished:
                    self._idle.notify_all()
