"""The semantic response cache: the real all-MiniLM-L6-v2 for what it matches, a
small stand-in embedder for the index mechanics (chunks, eviction, sharing,
corruption), and a fresh process that reloads a persisted index."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from llmprod.answers import SemanticCache
from llmprod.answers.embeddings import Embedder, locate_model_dir
from llmprod.answers.semantic import DEFAULT_THRESHOLD, TextEmbedder
from llmprod.cache import FailSafeCache, MemoryCache
from llmprod.cache.disk import DiskCache
from llmprod.errors import ModelLoadError
from llmprod.outputs import Completion
from llmprod.sampling_params import SamplingParams

from .conftest import skip_or_fail
from .test_response import run_python

GREEDY = SamplingParams(temperature=0, max_tokens=32)
FP = "fp-semantic-test"


def answer(text: str, **overrides: object) -> Completion:
    c = Completion("req", text, [1, 2, 3], "stop", [7, 8], usage=dataclasses.replace(
        Completion("r", "", [], None).usage, prompt_tokens=2, completion_tokens=3, cost=0.5))  # fmt: skip
    return dataclasses.replace(c, **overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def minilm() -> Iterator[Embedder]:
    """The real model, loaded once for the module."""
    try:
        locate_model_dir()
    except ModelLoadError as exc:
        skip_or_fail(str(exc))
    yield Embedder()


class StubEmbedder:
    """Unit vectors from a hash of the text: equal texts match, others do not."""

    model_id = "stub"
    dim = 8

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def embed(self, texts: Sequence[str] | str) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        with self.lock:
            self.calls += 1
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
            v = np.random.default_rng(seed).standard_normal(self.dim)
            out[i] = v / np.linalg.norm(v)
        return out


@pytest.fixture
def stub() -> StubEmbedder:
    return StubEmbedder()


# ---------------------------------------------------------------- real MiniLM
def test_paraphrases_hit_and_unrelated_miss(minilm: Embedder) -> None:
    assert isinstance(minilm, TextEmbedder)
    with SemanticCache("memory://", minilm, FP) as cache:
        assert cache.threshold == DEFAULT_THRESHOLD
        cache.add("What is the capital of France?", GREEDY, answer("Paris."))
        cache.add("Who wrote the novel Pride and Prejudice?", GREEDY, answer("Austen."))
        cache.add("How do I reset my password?", GREEDY, answer("Click 'forgot'."))
        assert cache.flush(30)
        for query, expected in [
            ("What's the capital city of France?", "Paris."),
            ("Which city is the capital of France?", "Paris."),
            ("Who is the author of Pride and Prejudice?", "Austen."),
            ("How can I reset my password?", "Click 'forgot'."),
        ]:
            hit = cache.lookup(query, GREEDY)
            assert hit is not None, query
            got, sim = hit
            assert got.text == expected and sim >= DEFAULT_THRESHOLD
            assert got.cache_hit == "semantic" and got.usage.cost == 0.0
            assert got.flags["semantic_similarity"] == pytest.approx(sim, abs=1e-5)
        for query in [
            "How do I bake sourdough bread?",
            "What is the capital of Germany?",  # same template, another answer
        ]:
            assert cache.lookup(query, GREEDY) is None, query
        stats = cache.stats()
        assert stats["hits"] == {"memory": 4} and stats["misses"] == 2
        assert stats["adds"] == 3 and stats["entries"] == 3


def test_other_sampling_params_or_context_miss(minilm: Embedder) -> None:
    text = "What is the capital of France?"
    with SemanticCache("memory://", minilm, FP) as cache:
        cache.add(text, GREEDY, answer("Paris."))
        cache.add(
            text, GREEDY, answer("Paris, in French."), context="Answer in French."
        )
        cache.flush(30)
        assert cache.lookup(text, GREEDY) is not None
        for other in [
            dataclasses.replace(GREEDY, max_tokens=8),
            dataclasses.replace(GREEDY, stop=("\n",)),
            dataclasses.replace(GREEDY, seed=3),
            dataclasses.replace(GREEDY, logprobs=2),
        ]:
            assert cache.lookup(text, other) is None, other
        hit = cache.lookup(text, dataclasses.replace(GREEDY, extra={"tenant": "b"}))
        assert hit is not None and hit[0].text == "Paris."  # extra is not matched
        hit = cache.lookup(text, GREEDY, context="Answer in French.")
        assert hit is not None and hit[0].text == "Paris, in French."
        assert cache.lookup(text, GREEDY, context="Answer in German.") is None
    with SemanticCache("memory://", minilm, "another-model") as other_model:
        assert other_model.lookup(text, GREEDY) is None


def test_a_scope_only_searches_its_own_entries(minilm: Embedder) -> None:
    text, para = "What is the capital of France?", "What's the capital of France?"
    with SemanticCache("memory://", minilm, FP) as cache:
        cache.add(text, GREEDY, answer("Paris, for a."), scope="tenant:a")
        cache.flush(30)
        hit = cache.lookup(para, GREEDY, scope="tenant:a")
        assert hit is not None and hit[0].text == "Paris, for a."
        assert cache.lookup(para, GREEDY, scope="tenant:b") is None
        assert cache.lookup(text, GREEDY, scope="tenant:b") is None  # even verbatim
        assert cache.lookup(text, GREEDY) is None  # the shared group is another
        cache.add(text, GREEDY, answer("Paris, for b."), scope="tenant:b")
        cache.flush(30)
        hit = cache.lookup(para, GREEDY, scope="tenant:b")
        assert hit is not None and hit[0].text == "Paris, for b."
        assert cache.entry_key(text, GREEDY, scope="tenant:a") != cache.entry_key(
            text, GREEDY, scope="tenant:b"
        )


def test_uncacheable_requests_are_neither_added_nor_looked_up(minilm: Embedder) -> None:
    sampled = SamplingParams(temperature=0.7, max_tokens=32)
    with SemanticCache("memory://", minilm, FP) as cache:
        assert not cache.add("Hello there", sampled, answer("Hi"))
        assert not cache.add("Hello there", GREEDY, answer("Hi", finish_reason="abort"))
        assert not cache.add("Hello there", GREEDY, answer("Hi", cache_hit="redis"))
        assert cache.lookup("Hello there", sampled) is None
        cache.flush(30)
        assert len(cache) == 0 and cache.stats()["skipped"] == 3


def test_index_persists_for_a_fresh_process(minilm: Embedder, tmp_path: Path) -> None:
    url = f"diskcache://{tmp_path / 'dc'}"
    with SemanticCache(url, minilm, FP) as cache:
        cache.add("What is the capital of France?", GREEDY, answer("Paris."))
        cache.add("How do I reset my password?", GREEDY, answer("Click 'forgot'."))
    store = DiskCache(tmp_path / "dc")
    manifest = json.loads(store.get(cache.prefix + "manifest") or b"")
    (chunk_ref,) = manifest["chunks"]
    chunk = json.loads(store.get(cache.prefix + "chunk:" + chunk_ref["id"]) or b"")
    vectors = store.get(cache.prefix + chunk["vectors"]) or b""
    assert vectors.startswith(b"\x93NUMPY") and len(chunk["entries"]) == 2
    store.close()
    out = run_python(
        "import json; from llmprod.answers import SemanticCache;"
        "from llmprod.answers.embeddings import Embedder;"
        "from llmprod.sampling_params import SamplingParams as S;"
        f"c = SemanticCache({url!r}, Embedder(), {FP!r});"
        "p = S(temperature=0, max_tokens=32);"
        "hit = c.lookup('Which city is the capital of France?', p);"
        "miss = c.lookup('How do I bake sourdough bread?', p);"
        "print(json.dumps([len(c), hit[0].text, hit[1], miss]))"
    )
    n, text, sim, miss = json.loads(out)
    assert (n, text, miss) == (2, "Paris.", None) and sim >= DEFAULT_THRESHOLD


# ---------------------------------------------------------------- mechanics
def shared(stub: StubEmbedder, backend: FailSafeCache, **kw: object) -> SemanticCache:
    return SemanticCache(
        backend, stub, FP, close_backend=False, refresh_interval_s=None, **kw
    )  # type: ignore[arg-type]


def test_exact_text_hits_and_repeat_adds_replace(stub: StubEmbedder) -> None:
    with SemanticCache("memory://", stub, FP) as cache:
        cache.add("q", GREEDY, answer("first"))
        cache.add("q", GREEDY, answer("second"))
        cache.flush(5)
        assert len(cache) == 1
        hit = cache.lookup("q", GREEDY)
        assert hit is not None and hit[0].text == "second"
        assert hit[1] == pytest.approx(1.0, abs=1e-5)
        assert cache.lookup("other", GREEDY) is None
        calls = stub.calls
        cache.lookup("q", GREEDY)
        assert stub.calls == calls  # the vector of a recent text is reused


def test_two_instances_share_one_store(stub: StubEmbedder) -> None:
    backend = FailSafeCache(MemoryCache())
    a, b = shared(stub, backend), shared(stub, backend)
    a.add("from a", GREEDY, answer("A"))
    a.flush(5)
    assert b.lookup("from a", GREEDY) is None  # b has not refreshed yet
    assert b.refresh() == 1
    assert b.lookup("from a", GREEDY) is not None
    b.add("from b", GREEDY, answer("B"))
    b.flush(5)
    a.add("from a again", GREEDY, answer("A2"))  # grows a's chunk
    a.flush(5)
    assert a.refresh() == 1 and b.refresh() == 1
    for cache in (a, b):
        assert len(cache) == 3
        assert cache.lookup("from b", GREEDY)[0].text == "B"  # type: ignore[index]
    manifest = json.loads(backend.get(a.prefix + "manifest") or b"")
    assert len(manifest["chunks"]) == 2  # one per writer, merged
    c = shared(stub, backend)  # a restart sees everything
    assert len(c) == 3
    for cache in (a, b, c):
        cache.close()


def test_background_refresh_picks_up_other_writers(stub: StubEmbedder) -> None:
    backend = FailSafeCache(MemoryCache())
    a = shared(stub, backend)
    b = SemanticCache(backend, stub, FP, close_backend=False, refresh_interval_s=0.01)
    a.add("late", GREEDY, answer("L"))
    a.flush(5)
    time.sleep(0.02)
    assert b.lookup("late", GREEDY) is None  # schedules a refresh
    b.flush(5)
    assert b.lookup("late", GREEDY) is not None
    a.close()
    b.close()


def test_oldest_chunks_are_evicted_over_max_entries(stub: StubEmbedder) -> None:
    backend = FailSafeCache(MemoryCache())
    cache = shared(stub, backend, max_entries=4, chunk_size=2)
    for i in range(7):
        cache.add(f"q{i}", GREEDY, answer(f"a{i}"))
        cache.flush(5)
    assert len(cache) <= 4 and cache.stats()["evicted"] >= 3
    assert cache.lookup("q0", GREEDY) is None and cache.lookup("q6", GREEDY) is not None
    assert backend.get(cache.entry_key("q0", GREEDY)) is None  # answers deleted
    assert backend.get(cache.entry_key("q6", GREEDY)) is not None
    again = shared(stub, backend, max_entries=4, chunk_size=2)
    assert len(again) == len(cache)
    assert {again.lookup(f"q{i}", GREEDY) is not None for i in range(4, 7)} == {True}
    cache.close()
    again.close()


def test_a_vanished_answer_is_a_miss_and_forgotten(stub: StubEmbedder) -> None:
    backend = FailSafeCache(MemoryCache())
    cache = shared(stub, backend)
    cache.add("q", GREEDY, answer("a"))
    cache.flush(5)
    entry_key = cache.entry_key("q", GREEDY)
    assert backend.get(entry_key) is not None
    backend.set(entry_key, b"\x80\x04garbage")
    assert cache.lookup("q", GREEDY) is None
    assert len(cache) == 0 and cache.stats()["errors"] == 1
    assert backend.get(entry_key) is None
    cache.add("q", GREEDY, answer("a"))
    cache.flush(5)
    backend.delete(entry_key)  # expired or evicted by another process
    assert cache.lookup("q", GREEDY) is None and len(cache) == 0
    cache.close()


@pytest.mark.parametrize("damage", ["pickle", "shape", "garbage", "chunk", "manifest"])
def test_damaged_index_is_ignored_not_loaded(stub: StubEmbedder, damage: str) -> None:
    backend = FailSafeCache(MemoryCache())
    cache = shared(stub, backend)
    cache.add("q", GREEDY, answer("a"))
    cache.close()
    manifest = json.loads(backend.get(cache.prefix + "manifest") or b"")
    chunk_key = cache.prefix + "chunk:" + manifest["chunks"][0]["id"]
    chunk = json.loads(backend.get(chunk_key) or b"")
    vec_key = cache.prefix + chunk["vectors"]
    if damage == "pickle":
        backend.set(vec_key, pickle.dumps(np.zeros((1, 8), dtype=object)))
    elif damage == "shape":
        buf = io.BytesIO()
        np.save(buf, np.zeros((3, 8), dtype=np.float32), allow_pickle=False)
        backend.set(vec_key, buf.getvalue())
    elif damage == "garbage":
        backend.set(vec_key, b"\x93NUMPY\x01\x00garbage")
    elif damage == "chunk":
        backend.set(chunk_key, b'{"format": "llmprod.semantic-chunk", "version": 1}')
    else:
        backend.set(cache.prefix + "manifest", b"[1, 2")
    reloaded = shared(stub, backend)
    assert len(reloaded) == 0 and reloaded.stats()["errors"] >= 1
    assert reloaded.lookup("q", GREEDY) is None
    reloaded.close()


def test_threads_add_and_look_up_at_once(stub: StubEmbedder) -> None:
    errors: list[BaseException] = []
    with SemanticCache("memory://", stub, FP, chunk_size=16, max_entries=1000) as cache:

        def work(t: int) -> None:
            try:
                for i in range(40):
                    cache.add(f"t{t}-{i}", GREEDY, answer(f"{t}-{i}"))
                    cache.lookup(f"t{t}-{i // 2}", GREEDY)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert cache.flush(30) and not errors
        assert len(cache) == 160 - cache.stats()["dropped_writes"]
        assert cache.stats()["dropped_writes"] == 0
        hit = cache.lookup("t3-39", GREEDY)
        assert hit is not None and hit[0].text == "3-39"


def test_bad_arguments(stub: StubEmbedder) -> None:
    for kw in (
        {"threshold": 0},
        {"threshold": 1.5},
        {"max_entries": 0},
        {"namespace": "a:b"},
    ):
        with pytest.raises(ValueError):
            SemanticCache("memory://", stub, FP, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SemanticCache("memory://", stub, "")
    with SemanticCache("memory://", stub, FP) as cache, pytest.raises(TypeError):
        cache.lookup(b"bytes", GREEDY)  # type: ignore[arg-type]
