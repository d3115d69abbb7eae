"""The semantic cache's vector index: one matrix in memory, chunks in the store.

In memory, the index is a :class:`~llmprod.answers.vectors.VectorMatrix`, one
row per entry, tagged with the chunk the entry belongs to;
:meth:`SemanticIndex.search` is one matrix product against it.

The index lives in the backend beside the answers, so it survives restarts and
is shared by every process on the same store. Under the prefix
``<namespace>:v1:<hash of model fingerprint and embedder>:``
(:func:`~llmprod.answers.keys.index_prefix`) there are

* ``manifest``: JSON listing the index's chunks (id and creation time);
* ``chunk:<id>``: JSON, one chunk's entries (entry id and sampling group) and
  the key of its vectors;
* ``vec:<sha256>``: the chunk's vectors, ``np.save(..., allow_pickle=False)``
  bytes of a float32 ``[rows, dim]`` array
  (:func:`~llmprod.answers.vectors.encode_matrix`), keyed by their own hash, so
  a chunk document and its vectors always match;
* ``entry:<id>``: the answer, as :func:`~llmprod.answers.codec.completion_to_bytes`
  (written by the cache, under :meth:`SemanticIndex.entry_key`).

Each index appends to chunks of its own (``chunk_size`` entries), so two
processes never overwrite each other's chunks; the manifest is merged on every
write. ``max_entries`` bounds the index: the oldest chunk is evicted whole (its
answers deleted) when it is exceeded. Nothing read is unpickled; a chunk, vector
matrix or manifest that does not parse is ignored and counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
import uuid
from typing import Any

import numpy as np

from llmprod.answers.keys import INDEX_VERSION
from llmprod.answers.vectors import VectorMatrix, decode_matrix, encode_matrix
from llmprod.cache.protocol import CacheBackend
from llmprod.canonical import canonical_json

__all__ = ["SemanticIndex"]

logger = logging.getLogger("llmprod.cache")

_MANIFEST_FORMAT = "llmprod.semantic-index"
_CHUNK_FORMAT = "llmprod.semantic-chunk"


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


class SemanticIndex:
    """Unit vectors of entries, grouped, searchable, persisted in chunks.

    Thread-safe. Store reads and writes never raise: a failure is logged and
    counted in :meth:`counts`.

    Args:
        backend: a fail-safe or tiered backend.
        prefix: from :func:`~llmprod.answers.keys.index_prefix`.
        dim: the vector size.
        max_entries: the most entries; the oldest chunks go first.
        chunk_size: entries per persisted chunk (at most ``max_entries``).
    """

    def __init__(
        self,
        backend: CacheBackend,
        prefix: str,
        dim: int,
        *,
        max_entries: int,
        chunk_size: int,
    ) -> None:
        self.backend = backend
        self.prefix = prefix
        self.dim = dim
        self.max_entries = max_entries
        self.chunk_size = chunk_size
        self.writer_id = uuid.uuid4().hex[:16]
        """Names this index's own chunks."""
        self._lock = threading.RLock()
        self._vectors = VectorMatrix(dim)
        self._chunks: dict[str, _Chunk] = {}
        self._tombstones: set[str] = set()
        self._own_seq = 0
        self._own_current: str | None = None
        self._dirty: set[str] = set()
        self._manifest_dirty = False
        self._to_delete: list[str] = []
        self._errors = 0
        self._evicted = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._vectors)

    def entry_key(self, entry_id: str) -> str:
        """Return the backend key of an entry's answer."""
        return self.prefix + "entry:" + entry_id

    def counts(self) -> dict[str, int]:
        """Return ``errors`` (unreadable documents and failed reads), ``evicted``
        (entries), ``entries`` and ``chunks``."""
        with self._lock:
            return {
                "errors": self._errors,
                "evicted": self._evicted,
                "entries": len(self._vectors),
                "chunks": len(self._chunks),
            }

    # -------------------------------------------------------------- memory
    def search(
        self, vector: np.ndarray, group: str, threshold: float, k: int
    ) -> list[tuple[str, float]]:
        """Return up to ``k`` ``(entry id, similarity)`` of ``group``, at least
        ``threshold`` similar to ``vector``, most similar first (see
        :meth:`~llmprod.answers.vectors.VectorMatrix.search`)."""
        with self._lock:
            return self._vectors.search(vector, group, threshold, k)

    def add(self, entry_id: str, group: str, vector: np.ndarray) -> bool:
        """Add an entry to this index's current chunk, evicting over ``max_entries``.

        Returns:
            False when the entry is already indexed (nothing changes).
        """
        with self._lock:
            if entry_id in self._vectors:
                return False
            cid = self._own_current
            if cid is None or len(self._chunks[cid].entries) >= self.chunk_size:
                cid = f"{self.writer_id}-{self._own_seq:06d}"
                self._own_seq += 1
                self._chunks[cid] = _Chunk(cid, time.time(), own=True)
                self._own_current = cid
                self._manifest_dirty = True
            self._chunks[cid].entries[entry_id] = group
            self._vectors.append(entry_id, group, vector, cid)
            self._dirty.add(cid)
            self._evict_over_limit()
            return True

    def forget(self, entry_id: str) -> None:
        """Drop an entry from the index (its answer is gone)."""
        with self._lock:
            cid = self._vectors.tag_of(entry_id)
            if cid is None:
                return
            chunk = self._chunks.get(cid)
            self._vectors.remove(entry_id)
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
                if self._vectors.tag_of(entry_id) == cid:
                    self._vectors.remove(entry_id)
            self._dirty.discard(cid)
            if self._own_current == cid:
                self._own_current = None
            if delete:
                self._tombstones.add(cid)
                self._manifest_dirty = True
                self._to_delete.append(self.prefix + "chunk:" + cid)
                if chunk.vec_key is not None:
                    self._to_delete.append(chunk.vec_key)
                self._to_delete.extend(self.entry_key(e) for e in chunk.entries)
            return len(chunk.entries)

    def _evict_over_limit(self) -> None:
        with self._lock:
            while len(self._vectors) > self.max_entries and len(self._chunks) > 1:
                oldest = min(self._chunks.values(), key=lambda c: c.created)
                self._evicted += self._drop_chunk(oldest.cid, delete=True)

    # -------------------------------------------------------------- store
    def refresh(self) -> int:
        """Load the chunks listed in the stored manifest that are new or changed,
        and drop foreign chunks it no longer lists (evicted elsewhere).

        Returns:
            How many entries were added.
        """
        manifest = self._read_json(self.prefix + "manifest", _MANIFEST_FORMAT)
        if manifest is None:
            return 0
        listed = _listed_chunks(manifest)
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

    def persist(self) -> None:
        """Write changed chunks, the merged manifest and pending deletes."""
        with self._lock:
            jobs = []
            for cid in sorted(self._dirty):
                chunk = self._chunks.get(cid)
                if chunk is None:
                    continue
                entries = [
                    (e, g) for e, g in chunk.entries.items() if e in self._vectors
                ]
                jobs.append(
                    (chunk, entries, self._vectors.take([e for e, _ in entries]))
                )
            self._dirty.clear()
            manifest_dirty, self._manifest_dirty = self._manifest_dirty, False
            deletes, self._to_delete = self._to_delete, []
        for chunk, entries, vectors in jobs:
            blob = encode_matrix(vectors)
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
                self.delete(old)
        if manifest_dirty:
            self._write_manifest()
        for key in deletes:
            self.delete(key)

    def delete(self, key: str) -> None:
        """Delete a key from the store; a failure is logged, not raised."""
        try:
            self.backend.delete(key)
        except Exception as exc:
            logger.warning("semantic cache delete failed: %r", exc)

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
        vectors = decode_matrix(blob, len(entries), self.dim)
        if vectors is None:
            logger.warning("semantic cache: ignoring chunk %s with bad vectors", cid)
            self._count_error()
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
                if entry_id not in self._vectors:
                    self._vectors.append(entry_id, group, vector, cid)
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
            self._count_error()
            return None
        assert isinstance(items, list) and isinstance(vec, str)
        return self.prefix + vec, [(e, g) for e, g in items]

    def _write_manifest(self) -> None:
        remote = self._read_json(self.prefix + "manifest", _MANIFEST_FORMAT) or {}
        merged = _listed_chunks(remote)
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
            self._count_error()
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
            self._count_error()
            return None
        return doc

    def _count_error(self) -> None:
        with self._lock:
            self._errors += 1


def _listed_chunks(manifest: dict[str, Any]) -> dict[str, float]:
    """Chunk id -> creation time, for the well-formed items of a manifest."""
    listed: dict[str, float] = {}
    for item in manifest.get("chunks", []):
        if (
            isinstance(item, dict)
            and isinstance(item.get("id"), str)
            and isinstance(item.get("created"), (int, float))
        ):
            listed[item["id"]] = float(item["created"])
    return listed
