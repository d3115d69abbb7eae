"""The semantic response cache: answer a prompt that means the same as one answered.

Opt-in. Each stored answer is indexed by the embedding of its prompt text
(all-MiniLM-L6-v2, mean-pooled and L2-normalised, so a dot product is the cosine
similarity). A lookup embeds the new text, takes one matrix product against the
index, and returns the best stored answer whose similarity reaches
``threshold``, among entries with the same model fingerprint, the same sampling
fields (every :class:`~llmprod.sampling_params.SamplingParams` field but
``extra``) and the same ``context`` (e.g. the system prompt and earlier turns).

The default threshold, :data:`DEFAULT_THRESHOLD`, comes from
``benchmarks/semantic_eval.py`` on ``benchmarks/data/paraphrases.jsonl``; the
table is in ``docs/caching.md``. It favours few false hits over many hits: a
false hit returns the answer to another question.

Persistence: the index lives in the backend beside the answers, so it survives
restarts and is shared by every process on the same store. Under the prefix
``<namespace>:v1:<hash of model fingerprint and embedder>:`` there are

* ``manifest``: JSON listing the index's chunks (id and creation time);
* ``chunk:<id>``: JSON, one chunk's entries (entry id and sampling group) and
  the key of its vectors;
* ``vec:<sha256>``: the chunk's vectors, ``np.save(..., allow_pickle=False)``
  bytes of a float32 ``[rows, dim]`` array, keyed by their own hash, so a chunk
  document and its vectors always match;
* ``entry:<id>``: the answer, as :func:`~llmprod.answers.exact.completion_to_bytes`.

Each cache instance appends to chunks of its own (``chunk_size`` entries), so
two processes never overwrite each other's chunks; the manifest is merged on
every write. The index is reloaded on construction and refreshed every
``refresh_interval_s`` in the background. ``max_entries`` bounds the index:
the oldest chunk is evicted whole (its answers deleted) when it is exceeded.

Writes (embedding the text, storing the answer, persisting the index) run in one
background thread; :meth:`SemanticCache.add` never blocks. A backend that fails
or returns garbage is a miss, counted; nothing read is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from llmprod.answers.exact import (
    STORED_FINISH_REASONS,
    _snapshot,
    as_failsafe,
    backend_stats,
    canonical_json,
    completion_from_bytes,
    completion_to_bytes,
    get_with_label,
    sampling_key_fields,
)
from llmprod.cache._background import BackgroundWriter
from llmprod.cache.protocol import CacheBackend, check_ttl
from llmprod.config import DEFAULT_SEMANTIC_THRESHOLD
from llmprod.outputs import Completion, Timings
from llmprod.sampling_params import SamplingParams

__all__ = ["DEFAULT_THRESHOLD", "SemanticCache", "TextEmbedder"]

logger = logging.getLogger("llmprod.cache")

DEFAULT_THRESHOLD = DEFAULT_SEMANTIC_THRESHOLD
"""Cosine similarity at which a stored answer is reused (see docs/caching.md)."""

INDEX_VERSION = 1
_MANIFEST_FORMAT = "llmprod.semantic-index"
_CHUNK_FORMAT = "llmprod.semantic-chunk"
_MAX_CANDIDATES = 3
_MEMO_SIZE = 1024


@runtime_checkable
class TextEmbedder(Protocol):
    """What the semantic cache needs from an embedder (:class:`~llmprod.answers.embeddings.Embedder` fits).

    Attributes:
        model_id: names the embedding model; part of the index identity.
        dim: the vector size.
    """

    model_id: str
    dim: int

    def embed(self, texts: Sequence[str] | str) -> np.ndarray:
        """Return unit vectors, float32 ``[len(texts), dim]``."""
        ...


@dataclasses.dataclass
class _Chunk:
    cid: str
    created: float
    own: bool
    entries: dict[str, str] = dataclasses.field(default_factory=dict)
    """entry id -> sampling group, in insertion order."""
    vec_key: str | None = None
    doc_digest: str | None = None
    """Digest of the last chunk document read (foreign chunks) or written (own)."""


class SemanticCache:
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
        model_fingerprint: from :func:`~llmprod.answers.exact.model_fingerprint`.
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
        ident = hashlib.sha256(
            canonical_json([model_fingerprint, embedder.model_id, self.dim])
        ).hexdigest()[:32]
        self.prefix = f"{namespace}:v{INDEX_VERSION}:{ident}:"
        self.writer_id = uuid.uuid4().hex[:16]

        self._lock = threading.RLock()
        self._embed_lock = threading.Lock()
        self._matrix = np.zeros((64, self.dim), dtype=np.float32)
        self._codes = np.zeros(64, dtype=np.int32)
        self._ids: list[str] = []
        self._row_chunk: list[str] = []
        self._rows: dict[str, int] = {}
        self._group_codes: dict[str, int] = {}
        self._chunks: dict[str, _Chunk] = {}
        self._tombstones: set[str] = set()
        self._own_seq = 0
        self._own_current: str | None = None
        self._dirty: set[str] = set()
        self._manifest_dirty = False
        self._to_delete: list[str] = []
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self._closed = False
        self._last_refresh = time.monotonic()
        self._refresh_queued = False
        self._hits: dict[str, int] = {}
        self._misses = 0
        self._errors = 0
        self._adds = 0
        self._skipped = 0
        self._evicted = 0
        self._writer = BackgroundWriter(
            "llmprod-semantic-cache", max_pending_writes, on_idle=self._persist
        )
        self.refresh()

    # -------------------------------------------------------------- policy
    def is_cacheable(self, params: SamplingParams) -> bool:
        """Whether requests with ``params`` are looked up and added.

        Args:
            params: the sampling parameters.

        Returns:
            True for deterministic requests (greedy or seeded), and for all
            requests when ``cache_sampled`` is set.
        """
        return self.cache_sampled or params.is_deterministic

    @staticmethod
    def group_of(params: SamplingParams, context: str | None = None) -> str:
        """Return the group a request is matched within.

        Args:
            params: the sampling parameters (every field but ``extra``).
            context: text that must match exactly (system prompt, earlier turns).

        Returns:
            A hex digest.
        """
        doc = {"sampling": sampling_key_fields(params), "context": context}
        return hashlib.sha256(canonical_json(doc)).hexdigest()[:32]

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)

    # -------------------------------------------------------------- reads
    def lookup(
        self, text: str, params: SamplingParams, *, context: str | None = None
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
        group = self.group_of(params, context)
        vector = self._vector(text)
        with self._lock:
            code = self._group_codes.get(group)
            n = len(self._ids)
            if code is None or n == 0:
                candidates: list[tuple[str, float]] = []
            else:
                sims = self._matrix[:n] @ vector
                sims[self._codes[:n] != code] = -np.inf
                k = min(_MAX_CANDIDATES, n)
                top = np.argpartition(-sims, k - 1)[:k]
                top = top[np.argsort(-sims[top])]
                candidates = [
                    (self._ids[i], float(sims[i]))
                    for i in top
                    if sims[i] >= self.threshold
                ]
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
        key = self._entry_key(entry_id)
        try:
            blob, tier = get_with_label(self.backend, key)
        except Exception as exc:
            logger.warning("semantic cache read failed: %r", exc)
            with self._lock:
                self._errors += 1
            return None
        if blob is None:
            # Expired or evicted elsewhere: forget it here too.
            self._forget(entry_id)
            return None
        try:
            completion = completion_from_bytes(blob)
        except ValueError as exc:
            logger.warning("dropping a bad semantic-cache entry %s: %s", key, exc)
            with self._lock:
                self._errors += 1
            self._forget(entry_id)
            self._safe_delete(key)
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
            context: as passed to :meth:`lookup`.

        Returns:
            Whether the add was queued.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if (
            self._closed
            or not self.is_cacheable(params)
            or completion.finish_reason not in STORED_FINISH_REASONS
            or completion.cache_hit is not None
        ):
            with self._lock:
                self._skipped += 1
            return False
        group = self.group_of(params, context)
        snap = _snapshot(completion)
        return self._writer.submit(lambda: self._add_now(text, group, snap))

    def entry_key(
        self, text: str, params: SamplingParams, *, context: str | None = None
    ) -> str:
        """Return the backend key an answer to ``text`` is stored under.

        Args:
            text: the prompt text.
            params: the sampling parameters.
            context: as passed to :meth:`add`.

        Returns:
            The key (under :attr:`prefix`).
        """
        return self._entry_key(_entry_id(self.group_of(params, context), text))

    def _add_now(self, text: str, group: str, completion: Completion) -> None:
        entry_id = _entry_id(group, text)
        vector = self._vector(text)
        try:
            blob = completion_to_bytes(completion)
        except (TypeError, ValueError) as exc:
            logger.warning("semantic cache: cannot serialise a completion: %s", exc)
            with self._lock:
                self._errors += 1
            return
        self.backend.set(self._entry_key(entry_id), blob, self.ttl)
        with self._lock:
            self._adds += 1
            if entry_id in self._rows:
                return  # same text and group: the answer was replaced above
            cid = self._own_current
            if cid is None or len(self._chunks[cid].entries) >= self.chunk_size:
                cid = f"{self.writer_id}-{self._own_seq:06d}"
                self._own_seq += 1
                self._chunks[cid] = _Chunk(cid, time.time(), own=True)
                self._own_current = cid
                self._manifest_dirty = True
            self._chunks[cid].entries[entry_id] = group
            self._append_row(entry_id, group, vector, cid)
            self._dirty.add(cid)
            self._evict_over_limit()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued adds are stored and the index is persisted.

        Args:
            timeout: the most seconds to wait (``None``: no limit).

        Returns:
            Whether everything queued finished in time.
        """
        return self._writer.flush(timeout)

    def refresh(self) -> int:
        """Load index entries that other processes (or earlier runs) persisted.

        Runs in the caller's thread; construction calls it once, and lookups
        schedule it in the writer thread every ``refresh_interval_s``.

        Returns:
            How many entries were added to this process's index.
        """
        self._last_refresh = time.monotonic()
        manifest = self._read_json(self.prefix + "manifest", _MANIFEST_FORMAT)
        if manifest is None:
            return 0
        listed: dict[str, float] = {}
        for item in manifest.get("chunks", []):
            if (
                isinstance(item, dict)
                and isinstance(item.get("id"), str)
                and isinstance(item.get("created"), (int, float))
            ):
                listed[item["id"]] = float(item["created"])
        added = 0
        with self._lock:
            foreign = {c.cid for c in self._chunks.values() if not c.own}
        for cid in foreign - set(listed):
            self._drop_chunk(cid, delete=False)  # evicted by another process
        for cid, created in sorted(listed.items(), key=lambda kv: kv[1]):
            with self._lock:
                known = self._chunks.get(cid)
                if cid in self._tombstones or (known is not None and known.own):
                    continue
            added += self._load_chunk(cid, created, known)
        with self._lock:
            self._evict_over_limit()
        return added

    def close(self, timeout: float | None = 5.0) -> None:
        """Store what is queued and persist the index (up to ``timeout`` s), then
        stop the writer and close the backend. Calling it again does nothing.

        Args:
            timeout: the most seconds to wait for queued writes.
        """
        if self._closed:
            return
        self._closed = True
        self._writer.close(timeout)
        if self.close_backend:
            try:
                self.backend.close()
            except Exception as exc:
                logger.warning("semantic cache: closing the backend failed: %r", exc)

    def __enter__(self) -> SemanticCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        backend_errors = sum(
            s.get("errors", 0) + s.get("set_errors", 0) for s in tiers.values()
        )
        with self._lock:
            hits = dict(self._hits)
            return {
                "hits": hits,
                "hits_total": sum(hits.values()),
                "misses": self._misses,
                "errors": self._errors + backend_errors,
                "adds": self._adds,
                "dropped_writes": self._writer.dropped,
                "pending_writes": self._writer.pending,
                "skipped": self._skipped,
                "evicted": self._evicted,
                "entries": len(self._ids),
                "chunks": len(self._chunks),
                "backend": tiers,
            }

    # -------------------------------------------------------------- embedding
    def _vector(self, text: str) -> np.ndarray:
        with self._embed_lock:
            cached = self._memo.get(text)
            if cached is not None:
                self._memo.move_to_end(text)
                return cached
            # One call at a time: fast tokenizers refuse concurrent use.
            vector = np.asarray(self.embedder.embed([text]), dtype=np.float32)[0]
            norm = float(np.linalg.norm(vector))
            if norm > 0 and abs(norm - 1.0) > 1e-3:
                vector = vector / norm
            self._memo[text] = vector
            if len(self._memo) > _MEMO_SIZE:
                self._memo.popitem(last=False)
            return vector

    # -------------------------------------------------------------- index
    def _append_row(
        self, entry_id: str, group: str, vector: np.ndarray, cid: str
    ) -> None:
        n = len(self._ids)
        if n == len(self._matrix):
            grown = np.zeros((2 * n, self.dim), dtype=np.float32)
            grown[:n] = self._matrix
            self._matrix = grown
            codes = np.zeros(2 * n, dtype=np.int32)
            codes[:n] = self._codes
            self._codes = codes
        code = self._group_codes.setdefault(group, len(self._group_codes))
        self._matrix[n] = vector
        self._codes[n] = code
        self._ids.append(entry_id)
        self._row_chunk.append(cid)
        self._rows[entry_id] = n

    def _remove_row(self, entry_id: str) -> None:
        row = self._rows.pop(entry_id, None)
        if row is None:
            return
        last = len(self._ids) - 1
        if row != last:
            moved = self._ids[last]
            self._matrix[row] = self._matrix[last]
            self._codes[row] = self._codes[last]
            self._ids[row] = moved
            self._row_chunk[row] = self._row_chunk[last]
            self._rows[moved] = row
        self._ids.pop()
        self._row_chunk.pop()

    def _forget(self, entry_id: str) -> None:
        with self._lock:
            row = self._rows.get(entry_id)
            if row is None:
                return
            chunk = self._chunks.get(self._row_chunk[row])
            self._remove_row(entry_id)
            if chunk is not None:
                chunk.entries.pop(entry_id, None)
                if chunk.own:
                    self._dirty.add(chunk.cid)

    def _drop_chunk(self, cid: str, *, delete: bool) -> int:
        """Remove a chunk from the index; with ``delete``, also from the store."""
        with self._lock:
            chunk = self._chunks.pop(cid, None)
            if chunk is None:
                return 0
            for entry_id in chunk.entries:
                row = self._rows.get(entry_id)
                if row is not None and self._row_chunk[row] == cid:
                    self._remove_row(entry_id)
            self._dirty.discard(cid)
            if self._own_current == cid:
                self._own_current = None
            if delete:
                self._tombstones.add(cid)
                self._manifest_dirty = True
                self._to_delete.append(self.prefix + "chunk:" + cid)
                if chunk.vec_key is not None:
                    self._to_delete.append(chunk.vec_key)
                self._to_delete.extend(self._entry_key(e) for e in chunk.entries)
            return len(chunk.entries)

    def _evict_over_limit(self) -> None:
        with self._lock:
            while len(self._ids) > self.max_entries and len(self._chunks) > 1:
                oldest = min(self._chunks.values(), key=lambda c: c.created)
                self._evicted += self._drop_chunk(oldest.cid, delete=True)

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

    # -------------------------------------------------------------- persistence
    def _entry_key(self, entry_id: str) -> str:
        return self.prefix + "entry:" + entry_id

    def _load_chunk(self, cid: str, created: float, known: _Chunk | None) -> int:
        raw = self._get(self.prefix + "chunk:" + cid)
        if raw is None:
            return 0
        digest = hashlib.sha256(raw).hexdigest()
        if known is not None and known.doc_digest == digest:
            return 0
        doc = self._parse_json(raw, _CHUNK_FORMAT, cid)
        loaded = self._parse_chunk(doc, cid) if doc is not None else None
        if loaded is None:
            return 0
        vec_key, entries = loaded
        blob = self._get(vec_key)
        if blob is None:
            return 0  # being rewritten by its writer; picked up next time
        vectors = _decode_matrix(blob, len(entries), self.dim)
        if vectors is None:
            logger.warning("semantic cache: ignoring chunk %s with bad vectors", cid)
            with self._lock:
                self._errors += 1
            return 0
        added = 0
        with self._lock:
            if cid in self._tombstones:
                return 0
            chunk = self._chunks.get(cid)
            if chunk is None:
                chunk = _Chunk(cid, created, own=False)
                self._chunks[cid] = chunk
            chunk.vec_key = vec_key
            chunk.doc_digest = digest
            for (entry_id, group), vector in zip(entries, vectors):
                chunk.entries[entry_id] = group
                if entry_id not in self._rows:
                    self._append_row(entry_id, group, vector, cid)
                    added += 1
        return added

    def _parse_chunk(
        self, doc: dict[str, Any], cid: str
    ) -> tuple[str, list[tuple[str, str]]] | None:
        vec = doc.get("vectors")
        items = doc.get("entries")
        ok = (
            isinstance(vec, str)
            and vec.startswith("vec:")
            and doc.get("dim") == self.dim
            and isinstance(items, list)
            and all(
                isinstance(i, list)
                and len(i) == 2
                and all(isinstance(s, str) and s for s in i)
                for i in items
            )
        )
        if not ok:
            logger.warning("semantic cache: ignoring malformed chunk %s", cid)
            with self._lock:
                self._errors += 1
            return None
        assert isinstance(items, list) and isinstance(vec, str)
        return self.prefix + vec, [(e, g) for e, g in items]

    def _persist(self) -> None:
        """Write dirty chunks, the manifest and pending deletes (writer thread)."""
        with self._lock:
            jobs = []
            for cid in sorted(self._dirty):
                chunk = self._chunks.get(cid)
                if chunk is None:
                    continue
                entries = [(e, g) for e, g in chunk.entries.items() if e in self._rows]
                rows = [self._rows[e] for e, _ in entries]
                jobs.append((chunk, entries, self._matrix[rows].copy()))
            self._dirty.clear()
            manifest_dirty, self._manifest_dirty = self._manifest_dirty, False
            deletes, self._to_delete = self._to_delete, []
        for chunk, entries, vectors in jobs:
            buf = io.BytesIO()
            np.save(buf, vectors, allow_pickle=False)
            blob = buf.getvalue()
            vec_name = "vec:" + hashlib.sha256(blob).hexdigest()[:32]
            self.backend.set(self.prefix + vec_name, blob)
            doc = {
                "format": _CHUNK_FORMAT,
                "version": INDEX_VERSION,
                "dim": self.dim,
                "created": chunk.created,
                "vectors": vec_name,
                "entries": [[e, g] for e, g in entries],
            }
            raw = canonical_json(doc)
            self.backend.set(self.prefix + "chunk:" + chunk.cid, raw)
            old = chunk.vec_key
            with self._lock:
                chunk.vec_key = self.prefix + vec_name
                chunk.doc_digest = hashlib.sha256(raw).hexdigest()
            if old is not None and old != chunk.vec_key:
                self._safe_delete(old)
        if manifest_dirty:
            self._write_manifest()
        for key in deletes:
            self._safe_delete(key)

    def _write_manifest(self) -> None:
        remote = self._read_json(self.prefix + "manifest", _MANIFEST_FORMAT) or {}
        merged: dict[str, float] = {}
        for item in remote.get("chunks", []):
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                created = item.get("created")
                if isinstance(created, (int, float)):
                    merged[item["id"]] = float(created)
        with self._lock:
            for cid in self._tombstones:
                merged.pop(cid, None)
            for chunk in self._chunks.values():
                merged[chunk.cid] = chunk.created
        doc = {
            "format": _MANIFEST_FORMAT,
            "version": INDEX_VERSION,
            "dim": self.dim,
            "chunks": [
                {"id": cid, "created": created}
                for cid, created in sorted(merged.items(), key=lambda kv: kv[1])
            ],
        }
        self.backend.set(self.prefix + "manifest", canonical_json(doc))

    def _get(self, key: str) -> bytes | None:
        try:
            return self.backend.get(key)
        except Exception as exc:
            logger.warning("semantic cache read failed: %r", exc)
            with self._lock:
                self._errors += 1
            return None

    def _read_json(self, key: str, fmt: str) -> dict[str, Any] | None:
        raw = self._get(key)
        return None if raw is None else self._parse_json(raw, fmt, key)

    def _parse_json(self, raw: bytes, fmt: str, where: str) -> dict[str, Any] | None:
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            doc = None
        if (
            not isinstance(doc, dict)
            or doc.get("format") != fmt
            or doc.get("version") != INDEX_VERSION
        ):
            logger.warning("semantic cache: ignoring an unreadable %s (%s)", fmt, where)
            with self._lock:
                self._errors += 1
            return None
        return doc

    def _safe_delete(self, key: str) -> None:
        try:
            self.backend.delete(key)
        except Exception as exc:
            logger.warning("semantic cache delete failed: %r", exc)


def _entry_id(group: str, text: str) -> str:
    return hashlib.sha256(canonical_json([group, text])).hexdigest()[:32]


def _decode_matrix(blob: bytes, rows: int, dim: int) -> np.ndarray | None:
    try:
        array: Any = np.load(io.BytesIO(blob), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None
    if (
        not isinstance(array, np.ndarray)
        or array.dtype != np.float32
        or array.shape != (rows, dim)
        or not np.isfinite(array).all()
    ):
        return None
    return array
