"""The semantic cache's vectors: embedded, searched in memory, stored as bytes.

A :class:`TextEmbedder` turns prompt texts into unit vectors; an
:class:`EmbeddingMemo` asks it for one text at a time and keeps the vectors of
recent texts, so that the lookup and the add of one prompt embed it once.

:class:`VectorMatrix` is what the semantic index searches: float32 rows that grow
by doubling, each with its entry id, a group (only rows of the asked group match)
and a tag (the chunk the row was loaded from or added to). Removing a row moves
the last row into its place, so the rows stay packed and a search is one matrix
product over them.

:func:`encode_matrix` and :func:`decode_matrix` are the stored form of a block of
rows: ``np.save(..., allow_pickle=False)`` bytes, read back only if they are a
finite float32 matrix of the expected shape.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "EmbeddingMemo",
    "TextEmbedder",
    "VectorMatrix",
    "decode_matrix",
    "encode_matrix",
]


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


class EmbeddingMemo:
    """The unit vector of a text, from an embedder, with the recent ones memoised.

    Thread-safe: the embedder is called by one thread at a time (fast tokenizers
    refuse concurrent use). A vector that is not of unit length is normalised.

    Args:
        embedder: turns texts into vectors.
        size: how many recent texts keep their vectors.
    """

    def __init__(self, embedder: TextEmbedder, size: int) -> None:
        self.embedder = embedder
        self.size = size
        self._lock = threading.Lock()
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()

    def __call__(self, text: str) -> np.ndarray:
        """Return the float32 unit vector of ``text``."""
        with self._lock:
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
            if len(self._memo) > self.size:
                self._memo.popitem(last=False)
            return vector


class VectorMatrix:
    """Unit vectors by entry id, with a group and a tag per row. Not thread-safe.

    Args:
        dim: the vector size.
        capacity: the rows allocated at first (doubled when full).
    """

    def __init__(self, dim: int, capacity: int = 64) -> None:
        self.dim = dim
        self._matrix = np.zeros((capacity, dim), dtype=np.float32)
        self._codes = np.zeros(capacity, dtype=np.int32)
        self._ids: list[str] = []
        self._tags: list[str] = []
        self._rows: dict[str, int] = {}
        self._group_codes: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._rows

    def tag_of(self, entry_id: str) -> str | None:
        """Return the tag of an entry's row (``None``: no such entry)."""
        row = self._rows.get(entry_id)
        return None if row is None else self._tags[row]

    def append(self, entry_id: str, group: str, vector: np.ndarray, tag: str) -> None:
        """Add a row for a new entry (the caller checks that it is new)."""
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
        self._tags.append(tag)
        self._rows[entry_id] = n

    def remove(self, entry_id: str) -> None:
        """Remove an entry's row (nothing if there is none)."""
        row = self._rows.pop(entry_id, None)
        if row is None:
            return
        last = len(self._ids) - 1
        if row != last:
            moved = self._ids[last]
            self._matrix[row] = self._matrix[last]
            self._codes[row] = self._codes[last]
            self._ids[row] = moved
            self._tags[row] = self._tags[last]
            self._rows[moved] = row
        self._ids.pop()
        self._tags.pop()

    def take(self, entry_ids: Sequence[str]) -> np.ndarray:
        """Return a copy of the rows of ``entry_ids`` (all present), in that order."""
        return self._matrix[[self._rows[e] for e in entry_ids]].copy()

    def search(
        self, vector: np.ndarray, group: str, threshold: float, k: int
    ) -> list[tuple[str, float]]:
        """Return the entries of ``group`` nearest to ``vector``.

        Args:
            vector: a unit vector.
            group: only rows of this group match.
            threshold: the lowest cosine similarity returned.
            k: the most entries returned.

        Returns:
            ``(entry id, similarity)``, most similar first.
        """
        code = self._group_codes.get(group)
        n = len(self._ids)
        if code is None or n == 0:
            return []
        sims = self._matrix[:n] @ vector
        sims[self._codes[:n] != code] = -np.inf
        k = min(k, n)
        top = np.argpartition(-sims, k - 1)[:k]
        top = top[np.argsort(-sims[top])]
        return [(self._ids[i], float(sims[i])) for i in top if sims[i] >= threshold]


def encode_matrix(vectors: np.ndarray) -> bytes:
    """Return ``np.save(..., allow_pickle=False)`` bytes of a vector matrix."""
    buf = io.BytesIO()
    np.save(buf, vectors, allow_pickle=False)
    return buf.getvalue()


def decode_matrix(blob: bytes, rows: int, dim: int) -> np.ndarray | None:
    """Read a matrix written by :func:`encode_matrix`, or ``None`` if it is not one.

    Args:
        blob: the stored bytes.
        rows: the rows the matrix must have.
        dim: the columns it must have.

    Returns:
        A finite float32 ``[rows, dim]`` array; ``None`` for anything else
        (bytes that need pickle included).
    """
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
