"""Turn every backend failure into a miss, count it, and log it sparingly.

A cache must never fail the call it serves. :class:`FailSafeCache` wraps any
backend: a store that is down, slow, full, or returns garbage (a
``ConnectionError``, a timeout, botocore's ``EndpointConnectionError``, which is
not an ``OSError``, a :class:`~llmprod.cache.protocol.CorruptEntryError`...) reads
as a miss and a write that fails is dropped. Each is counted, and a warning is
logged at most once per ``log_interval_s`` with the number held back.

After an availability failure the backend is left alone for ``cooldown_s``: calls
in that window return a miss at once (and are counted as errors) instead of each
paying a timeout. The first call after the window probes the backend again, so
service resumes by itself when the store comes back. A corrupt or unsafe entry is
not an availability failure and starts no cooldown.

Programming errors are not swallowed: a non-``str`` key, a non-``bytes`` value or
a bad ``ttl`` raise as they would on the bare backend.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import ClassVar
from urllib.parse import urlsplit, urlunsplit

from llmprod.cache.protocol import (
    CacheBackend,
    CorruptEntryError,
    UnsafeEntryError,
    check_key,
    check_ttl,
    check_value,
)

logger = logging.getLogger("llmprod.cache")

DEFAULT_LOG_INTERVAL_S = 60.0
DEFAULT_COOLDOWN_S = 1.0

_PING_KEY = "llmprod:ping"


def backend_label(backend: CacheBackend) -> str:
    """Return the label that names ``backend`` in logs and metrics.

    Args:
        backend: any cache backend.

    Returns:
        Its ``label`` attribute if it has one, else its class ``name``.
    """
    label = getattr(backend, "label", None)
    return label if isinstance(label, str) and label else backend.name


def backend_target(backend: CacheBackend) -> str:
    """Name ``backend`` and where it lives, for a log line.

    >>> from llmprod.cache.memory import MemoryCache
    >>> backend_target(FailSafeCache(MemoryCache()))
    'memory'

    Args:
        backend: any backend, bare or wrapped in a :class:`FailSafeCache`.

    Returns:
        Its label, followed by its URL or directory in parentheses when it has
        one. Passwords and query strings (which may hold keys) are left out.
    """
    inner = backend.backend if isinstance(backend, FailSafeCache) else backend
    where = getattr(inner, "url", None)
    if isinstance(where, str) and where:
        where = redact_url(where)
    else:
        directory = getattr(inner, "directory", None)
        where = "" if directory is None else str(directory)
    label = backend_label(backend)
    return f"{label} ({where})" if where else label


def redact_url(url: str) -> str:
    """Return ``url`` without its user info, query string and fragment.

    >>> redact_url("redis://:pw@cachehost:6379/0?ssl_cert_reqs=none")
    'redis://***@cachehost:6379/0'

    Args:
        url: any URL.

    Returns:
        The URL safe to log: user info becomes ``***``.
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class FailSafeCache:
    """A backend wrapper for which failure is a miss.

    >>> from llmprod.cache.memory import MemoryCache
    >>> cache = FailSafeCache(MemoryCache())
    >>> cache.get("k") is None
    True
    >>> cache.set("k", b"v"); cache.get("k")
    b'v'
    >>> cache.stats()
    {'hits': 1, 'misses': 1, 'errors': 0, 'sets': 1, 'set_errors': 0}

    Args:
        backend: the backend to protect.
        label: the name used in logs and metrics (default: the backend's label).
        log_interval_s: at most one warning per this many seconds.
        cooldown_s: after an availability failure, skip the backend this long.
    """

    name: ClassVar[str] = "failsafe"

    def __init__(
        self,
        backend: CacheBackend,
        *,
        label: str | None = None,
        log_interval_s: float = DEFAULT_LOG_INTERVAL_S,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
    ) -> None:
        self.backend = backend
        self.label = label or backend_label(backend)
        self.log_interval_s = log_interval_s
        self.cooldown_s = cooldown_s
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._errors = 0
        self._sets = 0
        self._set_errors = 0
        self._down_until = 0.0
        self._is_down = False
        self._last_log = -float("inf")
        self._suppressed = 0
        self.last_error: BaseException | None = None

    @property
    def is_down(self) -> bool:
        """Whether the last call to the backend failed to reach it."""
        return self._is_down

    def ping(self) -> bool:
        """Probe the backend now, bypassing the cooldown, and log if it is down.

        Uses the backend's own ``ping()`` when it has one, else a ``get`` of a
        probe key. Call it at start-up to warn early about a store that is down.

        Returns:
            Whether the backend answered.
        """
        probe = getattr(self.backend, "ping", None)
        try:
            if callable(probe):
                ok = bool(probe())
                if not ok:
                    raise ConnectionError(f"{self.label} did not answer a ping")
            else:
                self.backend.get(_PING_KEY)
        except (CorruptEntryError, UnsafeEntryError):
            self._mark_up()
            return True
        except Exception as exc:
            self._fail("ping", exc, count=False)
            return False
        self._mark_up()
        return True

    def get(self, key: str) -> bytes | None:
        """Return the value, or ``None`` on a miss or any backend failure."""
        check_key(key)
        if self._skipping():
            self._count(errors=1, misses=1)
            return None
        try:
            value = self.backend.get(key)
        except (CorruptEntryError, UnsafeEntryError) as exc:
            self._bad_entry("get", exc)
            return None
        except Exception as exc:
            self._fail("get", exc)
            self._count(misses=1)
            return None
        self._mark_up()
        if value is None:
            self._count(misses=1)
        else:
            self._count(hits=1)
        return value

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """Store the value; a backend failure is counted and dropped."""
        check_key(key)
        check_value(value)
        check_ttl(ttl)
        if self._skipping():
            self._count(set_errors=1)
            return
        try:
            self.backend.set(key, value, ttl)
        except Exception as exc:
            self._fail("set", exc, count=False)
            self._count(set_errors=1)
            return
        self._mark_up()
        self._count(sets=1)

    def delete(self, key: str) -> None:
        """Remove the key; a backend failure is counted and dropped."""
        check_key(key)
        if self._skipping():
            self._count(errors=1)
            return
        try:
            self.backend.delete(key)
        except Exception as exc:
            self._fail("delete", exc)
            return
        self._mark_up()

    def close(self) -> None:
        """Close the backend; a failure while closing is logged, not raised."""
        try:
            self.backend.close()
        except Exception as exc:
            logger.warning("cache backend %s failed to close: %r", self.label, exc)

    def stats(self) -> dict[str, int]:
        """Return the counters.

        Returns:
            ``hits`` and ``misses`` (every ``get``, failures included in misses),
            ``errors`` (gets and deletes that failed or were skipped while the
            backend was down, and entries dropped as corrupt), ``sets`` (writes
            that succeeded) and ``set_errors`` (writes that failed or were
            skipped).
        """
        with self._lock:
            return {
                "hits": self._hits,
                "misses": self._misses,
                "errors": self._errors,
                "sets": self._sets,
                "set_errors": self._set_errors,
            }

    def _skipping(self) -> bool:
        return self._is_down and time.monotonic() < self._down_until

    def _mark_up(self) -> None:
        if self._is_down:
            self._is_down = False
            logger.info("cache backend %s is answering again", self.label)

    def _count(
        self,
        *,
        hits: int = 0,
        misses: int = 0,
        errors: int = 0,
        sets: int = 0,
        set_errors: int = 0,
    ) -> None:
        with self._lock:
            self._hits += hits
            self._misses += misses
            self._errors += errors
            self._sets += sets
            self._set_errors += set_errors

    def _bad_entry(self, op: str, exc: BaseException) -> None:
        # The store answered; only the entry was bad (and is gone by now).
        self._mark_up()
        self._count(errors=1, misses=1)
        self._log(op, exc)

    def _fail(self, op: str, exc: BaseException, *, count: bool = True) -> None:
        self.last_error = exc
        self._is_down = True
        self._down_until = time.monotonic() + self.cooldown_s
        if count:
            self._count(errors=1)
        self._log(op, exc)

    def _log(self, op: str, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last_log < self.log_interval_s:
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
            self._last_log = now
        logger.warning(
            "cache backend %s: %s failed (%s: %s); treated as a miss "
            "(%d similar failures not logged since the last warning)",
            backend_target(self),
            op,
            type(exc).__name__,
            exc,
            suppressed,
        )
