"""Answers in a byte store: what the exact and semantic caches share.

Both answer caches (:mod:`llmprod.answers.exact`, :mod:`llmprod.answers.semantic`)
are an :class:`AnswerStore`: they keep their answers in a backend of
:mod:`llmprod.cache` that never raises (a
:class:`~llmprod.cache.failsafe.FailSafeCache` or a
:class:`~llmprod.cache.tiered.TieredCache`, whose failures become counted misses),
read it in the caller's thread, and write it from one background thread.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from llmprod.cache._background import BackgroundWriter
from llmprod.cache.failsafe import FailSafeCache
from llmprod.cache.protocol import CacheBackend
from llmprod.cache.registry import open_cache
from llmprod.cache.tiered import TieredCache
from llmprod.sampling_params import SamplingParams

__all__ = [
    "AnswerStore",
    "as_failsafe",
    "backend_errors",
    "backend_stats",
    "get_with_label",
    "set_errors",
]

logger = logging.getLogger("llmprod.cache")

_S = TypeVar("_S", bound="AnswerStore")


class AnswerStore:
    """Base of the answer caches: a policy, a write-behind thread, a lifecycle.

    Subclasses set :attr:`backend` (from :func:`as_failsafe`), ``cache_sampled``,
    ``close_backend``, the writer and ``_closed = False`` in ``__init__``.
    """

    kind: ClassVar[str] = "answer cache"
    """Names the cache in log lines."""

    backend: CacheBackend
    cache_sampled: bool
    close_backend: bool
    _writer: BackgroundWriter
    _closed: bool

    def is_cacheable(self, params: SamplingParams) -> bool:
        """Whether requests with ``params`` are looked up and stored.

        Args:
            params: the sampling parameters.

        Returns:
            True for deterministic requests (greedy, or seeded), and for every
            request when ``cache_sampled`` is set.
        """
        return self.cache_sampled or params.is_deterministic

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued writes are done (and, for the semantic cache, the
        index is persisted).

        Args:
            timeout: the most seconds to wait (``None``: no limit).

        Returns:
            Whether every queued write finished in time.
        """
        return self._writer.flush(timeout)

    def close(self, timeout: float | None = 5.0) -> None:
        """Flush pending writes (up to ``timeout`` s), stop the writer, close the backend.

        Writes still pending after ``timeout`` are dropped and counted. Calling
        it again does nothing.

        Args:
            timeout: the most seconds to wait for pending writes.
        """
        if self._closed:
            return
        self._closed = True
        self._writer.close(timeout)
        if self.close_backend:
            try:
                self.backend.close()
            except Exception as exc:
                logger.warning("%s: closing the backend failed: %r", self.kind, exc)

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def as_failsafe(backend: CacheBackend | str, **options: Any) -> CacheBackend:
    """Return ``backend`` ready for a cache: fail-safe, opened if it is a URL.

    Args:
        backend: a URL for :func:`~llmprod.cache.registry.open_cache`, a bare
            backend, a :class:`FailSafeCache` or a :class:`TieredCache`.
        **options: passed to ``open_cache`` when ``backend`` is a URL.

    Returns:
        A :class:`FailSafeCache` or :class:`TieredCache` (returned as given when
        it already is one).
    """
    if isinstance(backend, str):
        return FailSafeCache(open_cache(backend, **options))
    if options:
        raise TypeError("options are only accepted with a URL")
    if isinstance(backend, (FailSafeCache, TieredCache)):
        return backend
    if not isinstance(backend, CacheBackend):
        raise TypeError(
            f"backend must be a cache URL or a CacheBackend, got {type(backend).__name__}"
        )
    return FailSafeCache(backend)


def get_with_label(backend: CacheBackend, key: str) -> tuple[bytes | None, str | None]:
    """Read ``key`` and name the tier that answered.

    Args:
        backend: a :class:`TieredCache`, or any other backend.
        key: the key.

    Returns:
        ``(value, label)``; ``(None, None)`` on a miss.
    """
    if isinstance(backend, TieredCache):
        return backend.get_with_tier(key)
    value = backend.get(key)
    if value is None:
        return None, None
    label = getattr(backend, "label", None)
    return value, label if isinstance(label, str) and label else backend.name


def backend_stats(backend: CacheBackend) -> dict[str, dict[str, int]]:
    """Return per-tier counters of a fail-safe backend, keyed by tier label.

    Args:
        backend: a :class:`TieredCache`, a :class:`FailSafeCache` or another backend.

    Returns:
        Tier label to counters (empty when the backend keeps none).
    """
    if isinstance(backend, TieredCache):
        return backend.stats()
    if isinstance(backend, FailSafeCache):
        return {backend.label: backend.stats()}
    return {}


def backend_errors(tiers: Mapping[str, Mapping[str, int]]) -> int:
    """Return the read and write failures in :func:`backend_stats` counters, all tiers.

    Args:
        tiers: tier label to counters, as :func:`backend_stats` returns them.

    Returns:
        The sum of every tier's ``errors`` and ``set_errors``.
    """
    return sum(s.get("errors", 0) + s.get("set_errors", 0) for s in tiers.values())


def set_errors(backend: CacheBackend) -> int:
    """Return how many writes the backend has failed so far, all tiers.

    Args:
        backend: a fail-safe or tiered backend (any other counts none).

    Returns:
        The sum of every tier's ``set_errors``.
    """
    return sum(s.get("set_errors", 0) for s in backend_stats(backend).values())
