"""The exact response cache: the same request on the same weights, answered once.

A finished :class:`~llmprod.outputs.Completion` is stored as versioned JSON
(:mod:`llmprod.answers.codec`) under :func:`~llmprod.answers.keys.response_key`,
a hash of the model fingerprint, the prompt token ids, the sampling fields and,
when given, a scope (``"tenant:acme"``: only that tenant's lookups find it).

Only deterministic requests are cached by default (greedy, or sampled with a
``seed``): for those the key fixes the answer. Unseeded sampling is meant to vary
and is skipped unless ``cache_sampled=True``. Requests that ask for ``logprobs``
or ``prompt_logprobs`` are cached too: log-probabilities are deterministic for a
deterministic request, they are part of the key, and they round-trip exactly.
Only completions that ended normally (``finish_reason`` ``"stop"`` or
``"length"``) are stored; an aborted or failed request never is.

Reads happen in the caller's thread (one ``get``, bounded by the backend's own
timeouts); writes never block: :meth:`ResponseCache.store` queues the write for
one background thread and returns. A backend that fails, times out or returns
garbage is a miss, counted in :meth:`ResponseCache.stats`.

The key and codec names are re-exported here, where they lived before they got
modules of their own.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from llmprod.answers.codec import (
    COMPLETION_FORMAT,
    STORED_FINISH_REASONS,
    completion_from_bytes,
    completion_to_bytes,
    is_storable,
    snapshot,
)
from llmprod.answers.keys import FORMAT_VERSION, response_key, sampling_key_fields
from llmprod.answers.stores import (
    AnswerStore,
    as_failsafe,
    backend_errors,
    backend_stats,
    get_with_label,
    set_errors,
)
from llmprod.cache._background import BackgroundWriter
from llmprod.cache.protocol import CacheBackend, check_ttl
from llmprod.canonical import canonical_json
from llmprod.outputs import Completion, Timings
from llmprod.sampling_params import SamplingParams

__all__ = [
    "COMPLETION_FORMAT",
    "FORMAT_VERSION",
    "STORED_FINISH_REASONS",
    "ResponseCache",
    "as_failsafe",
    "canonical_json",
    "completion_from_bytes",
    "completion_to_bytes",
    "response_key",
    "sampling_key_fields",
]

logger = logging.getLogger("llmprod.cache")


class ResponseCache(AnswerStore):
    """The exact response cache over any backend.

    >>> from llmprod.outputs import Completion
    >>> cache = ResponseCache("memory://", "fp")
    >>> params = SamplingParams(temperature=0, max_tokens=4)
    >>> cache.store([1, 2], params, Completion("r1", "hi", [5], "stop", [1, 2]))
    True
    >>> cache.flush(5.0)
    True
    >>> completion, tier = cache.lookup([1, 2], params)
    >>> completion.text, tier, completion.cache_hit
    ('hi', 'memory', 'memory')
    >>> cache.close()

    Args:
        backend: a cache URL (opened with ``open_cache`` and wrapped in
            :class:`~llmprod.cache.failsafe.FailSafeCache`), a bare backend
            (wrapped), or a :class:`~llmprod.cache.failsafe.FailSafeCache` /
            :class:`~llmprod.cache.tiered.TieredCache` (used as given).
        model_fingerprint: from
            :func:`~llmprod.models.fingerprint.model_fingerprint`.
        ttl: lifetime of stored answers in seconds (``None``: until evicted).
        cache_sampled: also cache unseeded sampled requests (the same prompt
            then always gets the first sampled answer).
        max_pending_writes: the most writes waiting for the writer thread; more
            are dropped and counted in ``dropped_writes``.
        close_backend: close the backend in :meth:`close` (default: yes).
        backend_options: options for ``open_cache`` when ``backend`` is a URL
            (e.g. ``{"namespace": "llmprod:"}`` for Redis).
    """

    kind = "response cache"

    def __init__(
        self,
        backend: CacheBackend | str,
        model_fingerprint: str,
        *,
        ttl: float | None = None,
        cache_sampled: bool = False,
        max_pending_writes: int = 256,
        close_backend: bool = True,
        backend_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(model_fingerprint, str) or not model_fingerprint:
            raise ValueError("model_fingerprint must be a non-empty str")
        self.backend = as_failsafe(backend, **(backend_options or {}))
        self.model_fingerprint = model_fingerprint
        self.ttl = check_ttl(ttl)
        self.cache_sampled = cache_sampled
        self.close_backend = close_backend
        self._writer = BackgroundWriter("llmprod-response-cache", max_pending_writes)
        self._lock = threading.Lock()
        self._hits: dict[str, int] = {}
        self._misses = 0
        self._decode_errors = 0
        self._write_errors = 0
        self._writes = 0
        self._failed_writes = 0
        self._skipped = 0
        self._closed = False

    # -------------------------------------------------------------- policy
    def key(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        messages: Sequence[Mapping[str, Any]] | None = None,
        *,
        scope: str | None = None,
    ) -> str:
        """Return this cache's key for a request (see :func:`response_key`)."""
        return response_key(self.model_fingerprint, prompt_ids, params, messages, scope)

    # -------------------------------------------------------------- reads
    def lookup(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        messages: Sequence[Mapping[str, Any]] | None = None,
        *,
        scope: str | None = None,
    ) -> tuple[Completion, str] | None:
        """Return the cached answer to a request, or ``None``.

        Runs in the caller's thread: one read per tier at most, bounded by the
        backends' timeouts. Never raises for a backend failure or a bad entry;
        both are a miss, and a bad entry is deleted.

        Args:
            prompt_ids: the token ids the model would see.
            params: the sampling parameters.
            messages: the chat messages, when the ids were rendered from them.
            scope: whose entries to search (e.g. ``"tenant:acme"``, from
                :func:`~llmprod.answers.keys.scope_key`); ``None``: the shared
                entries.

        Returns:
            ``(completion, tier)`` on a hit, where ``tier`` names the backend or
            tier that answered (``"memory"``, ``"redis"``, ``"diskcache"``...).
            The completion is a new object with ``cache_hit`` set to the tier,
            ``usage.cost`` 0 and empty ``timings``; its token counts are those of
            the original run (the tokens saved). The caller sets ``request_id``
            and the timings. ``None`` on a miss, for uncacheable params, and
            after :meth:`close`.
        """
        if self._closed or not self.is_cacheable(params):
            return None
        key = self.key(prompt_ids, params, messages, scope=scope)
        try:
            blob, tier = get_with_label(self.backend, key)
        except Exception as exc:  # a fail-safe backend should not raise; be sure
            logger.warning("response cache lookup failed: %r", exc)
            self._count_miss(error=True)
            return None
        if blob is None:
            self._count_miss()
            return None
        try:
            completion = completion_from_bytes(blob)
            stored_ids = completion.prompt_token_ids
            if stored_ids and stored_ids != [int(t) for t in prompt_ids]:
                raise ValueError("stored completion answers another prompt")
        except ValueError as exc:
            logger.warning("dropping a bad response-cache entry %s: %s", key, exc)
            self._delete(key)
            self._count_miss(error=True)
            return None
        label = tier or "cache"
        completion.cache_hit = label
        completion.usage.cost = 0.0
        completion.timings = Timings()
        with self._lock:
            self._hits[label] = self._hits.get(label, 0) + 1
        return completion, label

    # -------------------------------------------------------------- writes
    def store(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        completion: Completion,
        messages: Sequence[Mapping[str, Any]] | None = None,
        *,
        scope: str | None = None,
    ) -> bool:
        """Queue a finished completion for storing; never blocks.

        The key is computed and the completion copied in the caller's thread;
        serialising and writing happen in the writer thread. Completions that
        did not finish with ``"stop"`` or ``"length"``, answers that came from a
        cache, and uncacheable params are skipped.

        Args:
            prompt_ids: the token ids the model saw.
            params: the sampling parameters.
            completion: the finished completion.
            messages: the chat messages, when the ids were rendered from them.
            scope: whose entry it is, as passed to :meth:`lookup`.

        Returns:
            Whether the write was queued (``False``: skipped, dropped because
            the queue is full, or the cache is closed).
        """
        if self._closed or not self.is_cacheable(params) or not is_storable(completion):
            with self._lock:
                self._skipped += 1
            return False
        key = self.key(prompt_ids, params, messages, scope=scope)
        snap = snapshot(completion)
        return self._writer.submit(lambda: self._write(key, snap))

    def _write(self, key: str, completion: Completion) -> None:
        try:
            blob = completion_to_bytes(completion)
        except (TypeError, ValueError) as exc:
            logger.warning("response cache: cannot serialise a completion: %s", exc)
            with self._lock:
                self._write_errors += 1
            return
        before = set_errors(self.backend)
        try:
            self.backend.set(key, blob, self.ttl)
        except Exception as exc:  # fail-safe backends swallow; be sure
            logger.warning("response cache write failed: %r", exc)
            with self._lock:
                self._write_errors += 1
            return
        # The fail-safe backend swallowed any failure and counted it; a write
        # that failed on some tier is not counted as written.
        failed = set_errors(self.backend) > before
        with self._lock:
            if failed:
                self._failed_writes += 1
            else:
                self._writes += 1

    # -------------------------------------------------------------- metrics
    def stats(self) -> dict[str, Any]:
        """Return the counters.

        Returns:
            ``hits`` (tier label to count), ``hits_total``, ``misses`` (lookups
            that found nothing usable, failures included), ``errors`` (bad
            entries, writes that could not be serialised, plus the backend's
            read and write failures, every tier), ``writes`` (answers stored on
            every tier), ``failed_writes`` (answers the backend failed to store
            on at least one tier; told apart from ``writes`` by the backend's
            ``set_errors`` counter, so approximate when other writers share the
            backend object), ``dropped_writes`` (queue full, or still queued at
            :meth:`close`), ``pending_writes``, ``skipped`` (store calls for
            uncacheable, unfinished or cached answers), and ``backend``: the
            backend's per-tier counters.
        """
        tiers = backend_stats(self.backend)
        failures = backend_errors(tiers)
        with self._lock:
            hits = dict(self._hits)
            return {
                "hits": hits,
                "hits_total": sum(hits.values()),
                "misses": self._misses,
                "errors": self._decode_errors + self._write_errors + failures,
                "writes": self._writes,
                "failed_writes": self._failed_writes,
                "dropped_writes": self._writer.dropped,
                "pending_writes": self._writer.pending,
                "skipped": self._skipped,
                "backend": tiers,
            }

    def _count_miss(self, *, error: bool = False) -> None:
        with self._lock:
            self._misses += 1
            if error:
                self._decode_errors += 1

    def _delete(self, key: str) -> None:
        try:
            self.backend.delete(key)
        except Exception as exc:
            logger.warning("response cache: deleting a bad entry failed: %r", exc)


def __getattr__(name: str) -> Any:
    # model_fingerprint was importable from here; it lives in models/ now.
    if name == "model_fingerprint":
        return importlib.import_module("llmprod.models.fingerprint").model_fingerprint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
