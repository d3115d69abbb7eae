"""The semantic response cache: answer a prompt that means the same as one answered.

Opt-in. Each stored answer is indexed by the embedding of its prompt text
(all-MiniLM-L6-v2, mean-pooled and L2-normalised, so a dot product is the cosine
similarity). A lookup embeds the new text, takes one matrix product against the
index, and returns the best stored answer whose similarity reaches
``threshold``, among entries with the same model fingerprint, the same sampling
fields (every :class:`~llmprod.sampling_params.SamplingParams` field but
``extra``), the same ``context`` (e.g. the system prompt and earlier turns) and
the same ``scope`` (e.g. ``"tenant:acme"``; ``None`` is shared).

The default threshold, :data:`DEFAULT_THRESHOLD`, comes from
``benchmarks/semantic_eval.py`` on ``benchmarks/data/paraphrases.jsonl``; the
table is in ``docs/caching.md``. It favours few false hits over many hits: a
false hit returns the answer to another question.

The index of prompt vectors is persisted in the backend beside the answers, so
it survives restarts and is shared by every process on the same store (see
:mod:`llmprod.answers.index`); it is reloaded on construction and refreshed every
``refresh_interval_s`` in the background.

Writes (embedding the text, storing the answer, persisting the index) run in one
background thread; :meth:`SemanticCache.add` never blocks. A backend that fails
or returns garbage is a miss, counted; nothing read is unpickled.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from llmprod.answers.codec import (
    completion_from_bytes,
    completion_to_bytes,
    is_storable,
    snapshot,
)
from llmprod.answers.index import SemanticIndex
from llmprod.answers.keys import index_prefix, semantic_entry_id, semantic_group
from llmprod.answers.stores import (
    AnswerStore,
    as_failsafe,
    backend_errors,
    backend_stats,
    get_with_label,
)
from llmprod.answers.vectors import EmbeddingMemo, TextEmbedder
from llmprod.cache._background import BackgroundWriter
from llmprod.cache.protocol import CacheBackend, check_ttl
from llmprod.config import DEFAULT_SEMANTIC_THRESHOLD
from llmprod.outputs import Completion, Timings
from llmprod.sampling_params import SamplingParams

__all__ = ["DEFAULT_THRESHOLD", "SemanticCache", "TextEmbedder"]

logger = logging.getLogger("llmprod.cache")

DEFAULT_THRESHOLD = DEFAULT_SEMANTIC_THRESHOLD
"""Cosine similarity at which a stored answer is reused (see docs/caching.md)."""

_MAX_CANDIDATES = 3
_MEMO_SIZE = 1024


class SemanticCache(AnswerStore):
    """A response cache keyed by the meaning of the prompt text.

    >>> from llmprod.answers.embeddings import Embedder  # doctest: +SKIP
    >>> cache = SemanticCache("diskcache:///tmp/sem", Embedder(), fp)  # doctest: +SKIP
    >>> cache.add("What is the capital of France?", params, completion)  # doctest: +SKIP
    >>> cache.flush()  # doctest: +SKIP
    >>> cache.lookup("What's France's capital city?", params)  # doctest: +SKIP
    (Completion(...), 0.97)

    Args:
        backend: a cache URL, a bare backend (wrapped in
            :class:`~llmprod.cache.failsafe.FailSafeCache`), or a fail-safe or
            tiered cache (used as given).
        embedder: turns texts into unit vectors (an
            :class:`~llmprod.answers.embeddings.Embedder`).
        model_fingerprint: from
            :func:`~llmprod.models.fingerprint.model_fingerprint`.
        threshold: the lowest cosine similarity that counts as a hit, in (0, 1].
        max_entries: the most entries in the index; the oldest chunks go first.
        namespace: the key prefix, to keep several indexes on one store apart.
        ttl: lifetime of stored answers in seconds (``None``: until evicted).
        cache_sampled: also cache unseeded sampled requests.
        chunk_size: entries per persisted chunk (capped at ``max_entries``).
        max_pending_writes: the most adds waiting; more are dropped and counted.
        refresh_interval_s: how often lookups schedule a background reload of
            entries that other processes added (``None``: only at construction
            and on :meth:`refresh`).
        close_backend: close the backend in :meth:`close`.
        backend_options: options for ``open_cache`` when ``backend`` is a URL.
    """

    kind = "semantic cache"

    def __init__(
        self,
        backend: CacheBackend | str,
        embedder: TextEmbedder,
        model_fingerprint: str,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        max_entries: int = 10_000,
        namespace: str = "semantic",
        ttl: float | None = None,
        cache_sampled: bool = False,
        chunk_size: int = 256,
        max_pending_writes: int = 256,
        refresh_interval_s: float | None = 30.0,
        close_backend: bool = True,
        backend_options: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold must be a number, got {threshold!r}")
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int):
            raise TypeError(f"max_entries must be an int, got {max_entries!r}")
        if max_entries < 1 or chunk_size < 1:
            raise ValueError("max_entries and chunk_size must be >= 1")
        if not isinstance(model_fingerprint, str) or not model_fingerprint:
            raise ValueError("model_fingerprint must be a non-empty str")
        if not namespace or ":" in namespace:
            raise ValueError(
                f"namespace must be non-empty without ':', got {namespace!r}"
            )
        self.backend = as_failsafe(backend, **(backend_options or {}))
        self.embedder = embedder
        self.model_fingerprint = model_fingerprint
        self.threshold = float(threshold)
        self.max_entries = max_entries
        self.chunk_size = min(chunk_size, max_entries)
        self.ttl = check_ttl(ttl)
        self.cache_sampled = cache_sampled
        self.refresh_interval_s = refresh_interval_s
        self.close_backend = close_backend
        self.dim = int(embedder.dim)
        self.prefix = index_prefix(
            namespace, model_fingerprint, embedder.model_id, self.dim
        )
        self.index = SemanticIndex(
            self.backend,
            self.prefix,
            self.dim,
            max_entries=max_entries,
            chunk_size=self.chunk_size,
        )
        """The vectors of the stored prompts (persisted beside the answers)."""
        self.writer_id = self.index.writer_id

        self._lock = threading.Lock()
        self._vector = EmbeddingMemo(embedder, _MEMO_SIZE)
        self._closed = False
        self._last_refresh = time.monotonic()
        self._refresh_queued = False
        self._hits: dict[str, int] = {}
        self._misses = 0
        self._errors = 0
        self._adds = 0
        self._skipped = 0
        self._writer = BackgroundWriter(
            "llmprod-semantic-cache", max_pending_writes, on_idle=self.index.persist
        )
        self.refresh()

    # -------------------------------------------------------------- policy
    @staticmethod
    def group_of(
        params: SamplingParams, context: str | None = None, scope: str | None = None
    ) -> str:
        """Return the group a request is matched within.

        Args:
            params: the sampling parameters (every field but ``extra``).
            context: text that must match exactly (system prompt, earlier turns).
            scope: whose entries (from :func:`~llmprod.answers.keys.scope_key`).

        Returns:
            A hex digest.
        """
        return semantic_group(params, context, scope)

    def __len__(self) -> int:
        return len(self.index)

    # -------------------------------------------------------------- reads
    def lookup(
        self,
        text: str,
        params: SamplingParams,
        *,
        context: str | None = None,
        scope: str | None = None,
    ) -> tuple[Completion, float] | None:
        """Return a stored answer to a prompt that means the same, or ``None``.

        Runs in the caller's thread: one embedding (a few ms on CPU), one
        matrix product, one backend read.

        Args:
            text: the prompt text (for a chat, the user's question; put the
                system prompt and earlier turns in ``context``).
            params: the sampling parameters; only entries with the same fields
                match.
            context: text that must match exactly.
            scope: whose entries to search (``None``: the shared ones).

        Returns:
            ``(completion, similarity)`` on a hit. The completion is a new
            object with ``cache_hit="semantic"``, ``usage.cost`` 0, empty
            ``timings`` and ``flags["semantic_similarity"]``; its
            ``prompt_token_ids`` and token counts are those of the stored
            prompt, which the caller replaces with the current request's.
            ``None`` on a miss, for uncacheable params and after :meth:`close`.
        """
        if self._closed or not self.is_cacheable(params):
            return None
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        self._maybe_schedule_refresh()
        group = self.group_of(params, context, scope)
        vector = self._vector(text)
        candidates = self.index.search(vector, group, self.threshold, _MAX_CANDIDATES)
        for entry_id, sim in candidates:
            found = self._read_entry(entry_id)
            if found is None:
                continue
            completion, tier = found
            completion.cache_hit = "semantic"
            completion.usage.cost = 0.0
            completion.timings = Timings()
            completion.flags["semantic_similarity"] = round(sim, 6)
            with self._lock:
                self._hits[tier] = self._hits.get(tier, 0) + 1
            return completion, sim
        with self._lock:
            self._misses += 1
        return None

    def _read_entry(self, entry_id: str) -> tuple[Completion, str] | None:
        key = self.index.entry_key(entry_id)
        try:
            blob, tier = get_with_label(self.backend, key)
        except Exception as exc:
            logger.warning("semantic cache read failed: %r", exc)
            with self._lock:
                self._errors += 1
            return None
        if blob is None:
            # Expired or evicted elsewhere: forget it here too.
            self.index.forget(entry_id)
            return None
        try:
            completion = completion_from_bytes(blob)
        except ValueError as exc:
            logger.warning("dropping a bad semantic-cache entry %s: %s", key, exc)
            with self._lock:
                self._errors += 1
            self.index.forget(entry_id)
            self.index.delete(key)
            return None
        return completion, tier or "cache"

    # -------------------------------------------------------------- writes
    def add(
        self,
        text: str,
        params: SamplingParams,
        completion: Completion,
        *,
        context: str | None = None,
        scope: str | None = None,
    ) -> bool:
        """Queue a finished answer for the index; never blocks.

        Embedding (reused from a recent :meth:`lookup` of the same text),
        storing and persisting happen in the writer thread. Skipped for
        uncacheable params, answers that did not finish with ``"stop"`` or
        ``"length"``, and answers that came from a cache.

        Args:
            text: the prompt text, as passed to :meth:`lookup`.
            params: the sampling parameters.
            completion: the finished answer.
            context, scope: as passed to :meth:`lookup`.

        Returns:
            Whether the add was queued.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self._closed or not self.is_cacheable(params) or not is_storable(completion):
            with self._lock:
                self._skipped += 1
            return False
        group = self.group_of(params, context, scope)
        snap = snapshot(completion)
        return self._writer.submit(lambda: self._add_now(text, group, snap))

    def entry_key(
        self,
        text: str,
        params: SamplingParams,
        *,
        context: str | None = None,
        scope: str | None = None,
    ) -> str:
        """Return the backend key an answer to ``text`` is stored under.

        Args:
            text: the prompt text.
            params: the sampling parameters.
            context, scope: as passed to :meth:`add`.

        Returns:
            The key (under :attr:`prefix`).
        """
        entry_id = semantic_entry_id(self.group_of(params, context, scope), text)
        return self.index.entry_key(entry_id)

    def _add_now(self, text: str, group: str, completion: Completion) -> None:
        entry_id = semantic_entry_id(group, text)
        vector = self._vector(text)
        try:
            blob = completion_to_bytes(completion)
        except (TypeError, ValueError) as exc:
            logger.warning("semantic cache: cannot serialise a completion: %s", exc)
            with self._lock:
                self._errors += 1
            return
        self.backend.set(self.index.entry_key(entry_id), blob, self.ttl)
        with self._lock:
            self._adds += 1
        # Already indexed (same text and group): the answer was replaced above.
        self.index.add(entry_id, group, vector)

    def refresh(self) -> int:
        """Load index entries that other processes (or earlier runs) persisted.

        Runs in the caller's thread; construction calls it once, and lookups
        schedule it in the writer thread every ``refresh_interval_s``.

        Returns:
            How many entries were added to this process's index.
        """
        self._last_refresh = time.monotonic()
        return self.index.refresh()

    def stats(self) -> dict[str, Any]:
        """Return the counters.

        Returns:
            ``hits`` (tier label to count), ``hits_total``, ``misses``,
            ``errors`` (bad entries and chunks, plus the backend's failures),
            ``adds`` (answers stored), ``dropped_writes``, ``pending_writes``,
            ``skipped``, ``evicted`` (entries), ``entries``, ``chunks``, and
            ``backend``: the backend's per-tier counters.
        """
        tiers = backend_stats(self.backend)
        index = self.index.counts()
        with self._lock:
            hits = dict(self._hits)
            return {
                "hits": hits,
                "hits_total": sum(hits.values()),
                "misses": self._misses,
                "errors": self._errors + index["errors"] + backend_errors(tiers),
                "adds": self._adds,
                "dropped_writes": self._writer.dropped,
                "pending_writes": self._writer.pending,
                "skipped": self._skipped,
                "evicted": index["evicted"],
                "entries": index["entries"],
                "chunks": index["chunks"],
                "backend": tiers,
            }

    def _maybe_schedule_refresh(self) -> None:
        interval = self.refresh_interval_s
        if interval is None or time.monotonic() - self._last_refresh < interval:
            return
        with self._lock:
            if self._refresh_queued:
                return
            self._refresh_queued = True
            self._last_refresh = time.monotonic()

        def job() -> None:
            try:
                self.refresh()
            finally:
                with self._lock:
                    self._refresh_queued = False

        if not self._writer.submit(job):
            with self._lock:
                self._refresh_queued = False
