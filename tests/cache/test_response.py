"""The exact response cache: keys, the completion format, the write path, and
real backends (Redis paused with SIGSTOP, diskcache, tiers, a second process)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from llmprod.answers import (
    ResponseCache,
    completion_from_bytes,
    completion_to_bytes,
    response_key,
)
from llmprod.answers.keys import FORMAT_VERSION, sampling_key_fields
from llmprod.cache import FailSafeCache, MemoryCache, TieredCache, open_cache
from llmprod.models.fingerprint import model_fingerprint
from llmprod.outputs import Completion, Timings, TokenLogprob, Usage
from llmprod.sampling_params import SamplingParams
from llmprod.structured import StructuredOutputs

from .conftest import RedisServer

REPO = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(temperature=0, max_tokens=16)
PROMPT = [1, 22, 333, 4444]

# Changing this value changes every key: bump FORMAT_VERSION when it must change.
GOLDEN_KEY = "resp:v1:b9d2759bcd114ea5209e8f1d1f25a34fbf7c682cea01b5383614f3525800a4d4"


def completion(**overrides: Any) -> Completion:
    base = Completion(
        request_id="req-1",
        text="Paris. « Ça va » ✓",
        token_ids=[5, 6, 7],
        finish_reason="stop",
        prompt_token_ids=list(PROMPT),
        stop_reason=2,
        usage=Usage(prompt_tokens=4, completion_tokens=3, cached_prompt_tokens=1, cost=0.25),
        timings=Timings(queued_s=0.01, ttft_s=0.02, e2e_s=0.05, tpot_s=0.015),
        logprobs=[
            TokenLogprob(5, -0.1, {5: -0.1, 9: -2.5}),
            TokenLogprob(6, -0.25, {6: -0.25, 1: -float("inf")}),
            TokenLogprob(7, -1e-9, {}, scored={7: -1e-9, 3: -4.5}),
        ],
        prompt_logprobs=[None, TokenLogprob(22, -3.0, {22: -3.0}), None, TokenLogprob(4444, -7.5)],
        flags={"pii": False, "scores": {"grounding": 0.9}, "tags": ["a", "b"]},
    )  # fmt: skip
    return dataclasses.replace(base, **overrides)


def run_python(code: str, timeout: float = 120.0) -> str:
    """Run ``code`` in a fresh interpreter and return its stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=dict(os.environ, PYTHONHASHSEED="random"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


def write_model_dir(
    path: Path, *, shape: tuple[int, ...] = (4, 8), fill: bytes = b"\x01"
) -> Path:
    """A small transformers-like folder with a valid safetensors file."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(
        json.dumps({"model_type": "llama", "hidden_size": 8})
    )
    (path / "tokenizer.json").write_text(
        json.dumps({"model": {"vocab": {"a": 0, "b": 1}}})
    )
    n = math.prod(shape) * 4
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": list(shape), "data_offsets": [0, n]}}
    ).encode()
    (path / "model.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header + fill * n
    )
    return path


@pytest.fixture
def memory_cache() -> Iterator[ResponseCache]:
    cache = ResponseCache("memory://", "fp-test")
    yield cache
    cache.close()


# ---------------------------------------------------------------------- keys
def test_key_is_stable_across_processes_and_pinned(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "m")
    key = response_key("fp", PROMPT, GREEDY, [{"role": "user", "content": "é"}])
    fp = model_fingerprint(model, "float32", None)
    other = run_python(
        "import json; from llmprod.answers import response_key; from llmprod.models.fingerprint import model_fingerprint;"
        "from llmprod.sampling_params import SamplingParams as S;"
        f"k = response_key('fp', {PROMPT!r}, S(temperature=0.0, max_tokens=16, extra={{'x': 1}}),"
        " [{'content': 'é', 'role': 'user'}]);"
        f"print(json.dumps([k, model_fingerprint({str(model)!r}, 'float32', None)]))"
    )
    assert json.loads(other) == [key, fp]
    assert response_key("fp", PROMPT, GREEDY) == GOLDEN_KEY, (
        "the key format changed: bump FORMAT_VERSION and update GOLDEN_KEY"
    )


FIELD_VARIANTS: dict[str, Any] = {
    "max_tokens": 17,
    "min_tokens": 1,
    "temperature": 0.5,
    "top_p": 0.9,
    "top_k": 5,
    "seed": 1,
    "stop": ("\n",),
    "stop_token_ids": (2,),
    "ignore_eos": True,
    "logprobs": 1,
    "logprob_token_ids": (3,),  # (with logprobs=1, which it needs)
    "prompt_logprobs": 0,
    "prompt_logprobs_start": 3,
    "repetition_penalty": 1.1,
    "include_stop_str_in_output": True,
    "skip_special_tokens": False,
    "structured": StructuredOutputs(json_object=True),
}


def test_key_changes_with_every_output_changing_field() -> None:
    # structured, prompt_logprobs_start and logprob_token_ids are keyed only when
    # set (the keys of requests without them stay as they were).
    keyed = set(sampling_key_fields(GREEDY)) | {
        "structured",
        "prompt_logprobs_start",
        "logprob_token_ids",
    }
    assert keyed == {f.name for f in dataclasses.fields(SamplingParams)} - {"extra"}
    assert set(FIELD_VARIANTS) == keyed, (
        "add a variant for each new SamplingParams field"
    )
    base = response_key("fp", PROMPT, GREEDY)
    keys = {base}
    for name, value in FIELD_VARIANTS.items():
        fields = {name: value}
        if name == "logprob_token_ids":
            fields["logprobs"] = 1
        key = response_key("fp", PROMPT, dataclasses.replace(GREEDY, **fields))
        assert key not in keys, name
        keys.add(key)
    for other in (
        response_key("fp2", PROMPT, GREEDY),
        response_key("fp", [*PROMPT, 5], GREEDY),
        response_key("fp", PROMPT[::-1], GREEDY),
        response_key("fp", PROMPT, GREEDY, [{"role": "user", "content": "hi"}]),
        response_key("fp", PROMPT, GREEDY, [{"role": "user", "content": "hi!"}]),
    ):
        assert other not in keys
        keys.add(other)


def test_key_ignores_extra_and_number_spelling() -> None:
    base = response_key("fp", PROMPT, GREEDY)
    assert (
        response_key("fp", PROMPT, dataclasses.replace(GREEDY, extra={"user": "x"}))
        == base
    )
    same = SamplingParams(temperature=0.0, max_tokens=16, top_p=1, repetition_penalty=1)
    assert response_key("fp", PROMPT, same) == base
    assert response_key("fp", tuple(PROMPT), GREEDY) == base
    with pytest.raises(TypeError):
        response_key("fp", ["1"], GREEDY)  # type: ignore[list-item]


# ---------------------------------------------------------------------- format
def test_completion_round_trips_with_logprobs() -> None:
    c = completion()
    back = completion_from_bytes(completion_to_bytes(c))
    assert back == c
    assert back.logprobs is not None and all(
        isinstance(k, int) for k in back.logprobs[0].top
    )
    assert back.logprobs[1].top[1] == -float("inf")
    assert back.prompt_logprobs is not None and back.prompt_logprobs[0] is None
    minimal = Completion("r", "", [], "length")
    assert completion_from_bytes(completion_to_bytes(minimal)) == minimal
    assert (
        completion_from_bytes(
            completion_to_bytes(completion(stop_reason="\n\n"))
        ).stop_reason
        == "\n\n"
    )


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x80\x04\x95garbage",
        b"[]",
        b'{"format": "llmprod.completion"}',
        b'{"format": "other", "version": 1, "completion": {}}',
    ],
)
def test_garbage_is_a_value_error(blob: bytes) -> None:
    with pytest.raises(ValueError):
        completion_from_bytes(blob)


def test_wrong_version_and_wrong_types_are_value_errors() -> None:
    doc = json.loads(completion_to_bytes(completion()))
    doc["version"] = FORMAT_VERSION + 1
    with pytest.raises(ValueError, match="version"):
        completion_from_bytes(json.dumps(doc).encode())
    for path, bad in [
        (("token_ids",), ["1"]),
        (("token_ids",), [True]),
        (("text",), 3),
        (("usage", "cost"), "free"),
        (("timings", "e2e_s"), [1]),
        (("logprobs",), [[1, -0.5]]),
        (("logprobs",), [[1, -0.5, [["x", -1.0]]]]),
        (("stop_reason",), 1.5),
        (("flags",), []),
    ]:
        doc = json.loads(completion_to_bytes(completion()))
        target = doc["completion"]
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = bad
        with pytest.raises(ValueError):
            completion_from_bytes(json.dumps(doc).encode())


# ---------------------------------------------------------------------- policy
def test_store_then_lookup_gives_a_fresh_marked_copy(
    memory_cache: ResponseCache,
) -> None:
    c = completion()
    assert memory_cache.lookup(PROMPT, GREEDY) is None
    assert memory_cache.store(PROMPT, GREEDY, c)
    c.text = "mutated after store"  # the stored copy was taken at store()
    c.token_ids.append(99)
    assert memory_cache.flush(5)
    hit = memory_cache.lookup(PROMPT, GREEDY)
    assert hit is not None
    got, tier = hit
    assert tier == "memory" and got.cache_hit == "memory"
    assert got.text == "Paris. « Ça va » ✓" and got.token_ids == [5, 6, 7]
    assert got.usage.cost == 0.0 and got.usage.completion_tokens == 3
    assert got.timings == Timings()
    assert got.logprobs == completion().logprobs
    assert (
        memory_cache.lookup(PROMPT, dataclasses.replace(GREEDY, max_tokens=17)) is None
    )
    stats = memory_cache.stats()
    assert stats["hits"] == {"memory": 1} and stats["misses"] == 2
    assert stats["writes"] == 1 and stats["errors"] == 0
    assert stats["backend"]["memory"]["sets"] == 1


def test_a_scope_is_looked_up_only_under_itself(memory_cache: ResponseCache) -> None:
    assert memory_cache.store(PROMPT, GREEDY, completion(), scope="tenant:a")
    memory_cache.flush(5)
    hit = memory_cache.lookup(PROMPT, GREEDY, scope="tenant:a")
    assert hit is not None and hit[0].text == completion().text
    assert memory_cache.lookup(PROMPT, GREEDY, scope="tenant:b") is None
    assert memory_cache.lookup(PROMPT, GREEDY) is None  # nor shared
    assert memory_cache.key(PROMPT, GREEDY, scope="tenant:a") == response_key(
        "fp-test", PROMPT, GREEDY, scope="tenant:a"
    )
    assert memory_cache.key(PROMPT, GREEDY) == response_key("fp-test", PROMPT, GREEDY)


def test_only_deterministic_requests_are_cached(memory_cache: ResponseCache) -> None:
    sampled = SamplingParams(temperature=0.8, max_tokens=16)
    seeded = dataclasses.replace(sampled, seed=7)
    assert not memory_cache.is_cacheable(sampled)
    assert memory_cache.is_cacheable(seeded) and memory_cache.is_cacheable(GREEDY)
    assert not memory_cache.store(PROMPT, sampled, completion())
    assert memory_cache.store(PROMPT, seeded, completion())
    memory_cache.flush(5)
    assert memory_cache.lookup(PROMPT, sampled) is None
    assert memory_cache.lookup(PROMPT, seeded) is not None
    assert memory_cache.stats()["backend"]["memory"]["hits"] == 1  # sampled never read
    with ResponseCache("memory://", "fp", cache_sampled=True) as anything:
        assert anything.store(PROMPT, sampled, completion())
        anything.flush(5)
        assert anything.lookup(PROMPT, sampled) is not None


def test_only_normally_finished_answers_are_stored(memory_cache: ResponseCache) -> None:
    for reason in ("abort", None, "error"):
        assert not memory_cache.store(PROMPT, GREEDY, completion(finish_reason=reason))
    assert not memory_cache.store(PROMPT, GREEDY, completion(cache_hit="redis"))
    assert memory_cache.store(PROMPT, GREEDY, completion(finish_reason="length"))
    memory_cache.flush(5)
    assert memory_cache.stats()["skipped"] == 4
    hit = memory_cache.lookup(PROMPT, GREEDY)
    assert hit is not None and hit[0].finish_reason == "length"


def test_ttl_expires_answers() -> None:
    with ResponseCache("memory://", "fp", ttl=0.2) as cache:
        cache.store(PROMPT, GREEDY, completion())
        cache.flush(5)
        assert cache.lookup(PROMPT, GREEDY) is not None
        time.sleep(0.3)
        assert cache.lookup(PROMPT, GREEDY) is None


def test_corrupt_stored_bytes_are_a_counted_miss(memory_cache: ResponseCache) -> None:
    key = memory_cache.key(PROMPT, GREEDY)
    raw = memory_cache.backend
    assert isinstance(raw, FailSafeCache)
    bad_values = [
        b"not json at all",
        completion_to_bytes(completion())[:-5],  # truncated
        completion_to_bytes(completion(prompt_token_ids=[9, 9])),  # another prompt
    ]
    for i, bad in enumerate(bad_values, 1):
        raw.set(key, bad)
        assert memory_cache.lookup(PROMPT, GREEDY) is None
        assert raw.get(key) is None, "a bad entry is deleted"
        assert memory_cache.stats()["errors"] == i
    memory_cache.store(PROMPT, GREEDY, completion())
    memory_cache.flush(5)
    assert memory_cache.lookup(PROMPT, GREEDY) is not None


def test_unserialisable_flags_are_counted_not_raised(
    memory_cache: ResponseCache,
) -> None:
    assert memory_cache.store(PROMPT, GREEDY, completion(flags={"obj": object()}))
    assert memory_cache.flush(5)
    assert memory_cache.stats()["errors"] == 1 and memory_cache.stats()["writes"] == 0
    assert memory_cache.lookup(PROMPT, GREEDY) is None


def test_close_flushes_then_refuses(tmp_path: Path) -> None:
    url = f"diskcache://{tmp_path / 'dc'}"
    cache = ResponseCache(url, "fp")
    for i in range(20):
        cache.store([i], GREEDY, completion(prompt_token_ids=[i]))
    cache.close()
    assert cache.stats()["writes"] == 20
    assert not cache.store([1], GREEDY, completion(prompt_token_ids=[1]))
    assert cache.lookup([1], GREEDY) is None
    cache.close()  # again: nothing
    with ResponseCache(url, "fp") as again:
        assert all(again.lookup([i], GREEDY) is not None for i in range(20))


def test_concurrent_lookups_and_stores_from_threads(
    memory_cache: ResponseCache,
) -> None:
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(50):
                ids = [t, i]
                memory_cache.store(ids, GREEDY, completion(prompt_token_ids=ids))
                memory_cache.lookup(ids, GREEDY)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    memory_cache.flush(10)
    assert all(memory_cache.lookup([t, i], GREEDY) for t in range(4) for i in range(50))
    assert memory_cache.stats()["writes"] == 200


def test_backend_argument_forms(tmp_path: Path) -> None:
    bare = MemoryCache()
    c1 = ResponseCache(bare, "fp")
    assert isinstance(c1.backend, FailSafeCache) and c1.backend.backend is bare
    wrapped = FailSafeCache(MemoryCache(), label="hot")
    tiered = TieredCache([MemoryCache()])
    assert ResponseCache(wrapped, "fp").backend is wrapped
    assert ResponseCache(tiered, "fp").backend is tiered
    with pytest.raises(TypeError):
        ResponseCache(object(), "fp")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ResponseCache("memory://", "")
    with pytest.raises(ValueError):
        ResponseCache("memory://", "fp", max_pending_writes=0)
    c2 = ResponseCache(wrapped, "fp")
    c2.store(PROMPT, GREEDY, completion())
    c2.flush(5)
    assert c2.lookup(PROMPT, GREEDY) is not None
    assert c2.lookup(PROMPT, GREEDY)[1] == "hot"  # type: ignore[index]


# ---------------------------------------------------------------- real servers
@pytest.mark.redis
def test_store_never_blocks_on_a_hung_redis(
    redis_factory: Callable[[], RedisServer],
) -> None:
    server = redis_factory()
    cache = ResponseCache(server.url, "fp", max_pending_writes=4)
    cache.store([0], GREEDY, completion(prompt_token_ids=[0]))
    assert cache.flush(5) and cache.stats()["writes"] == 1
    server.freeze()  # connections stay open, nothing answers: each call would hang
    try:
        slowest = 0.0
        t0 = time.perf_counter()
        for i in range(1, 41):
            t = time.perf_counter()
            cache.store([i], GREEDY, completion(prompt_token_ids=[i]))
            slowest = max(slowest, time.perf_counter() - t)
        total = time.perf_counter() - t0
        # One Redis call on the frozen server takes the 0.5 s socket timeout.
        assert slowest < 0.1 and total < 0.4, (slowest, total)
        assert cache.flush(10)
        stats = cache.stats()
        assert stats["writes"] == 1
        assert stats["dropped_writes"] >= 1  # 40 writes, a queue of 4
        assert stats["failed_writes"] + stats["dropped_writes"] == 40
        assert stats["errors"] >= 1 and stats["backend"]["redis"]["set_errors"] >= 1
    finally:
        server.thaw()
    time.sleep(1.1)  # the fail-safe cooldown
    assert cache.lookup([0], GREEDY) is not None
    cache.close()


@pytest.mark.redis
def test_tier_label_from_memory_disk_redis(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    ns = f"t{uuid.uuid4().hex}:"

    def tiers() -> TieredCache:
        return TieredCache(
            [
                open_cache("memory://"),
                open_cache(f"diskcache://{tmp_path / 'dc'}"),
                open_cache(redis_server.url, namespace=ns),
            ]
        )

    with ResponseCache(tiers(), "fp") as first:
        first.store(PROMPT, GREEDY, completion())
        first.flush(5)
        assert first.lookup(PROMPT, GREEDY)[1] == "memory"  # type: ignore[index]
    with ResponseCache(tiers(), "fp") as second:  # cold memory: the disk answers
        assert second.lookup(PROMPT, GREEDY)[1] == "diskcache"  # type: ignore[index]
        assert second.lookup(PROMPT, GREEDY)[1] == "memory"  # promoted
    shutil.rmtree(tmp_path / "dc")
    with ResponseCache(tiers(), "fp") as third:  # cold memory, empty disk
        hit = third.lookup(PROMPT, GREEDY)
        assert hit is not None and hit[1] == "redis" and hit[0].cache_hit == "redis"
        assert third.stats()["hits"] == {"redis": 1}
        assert set(third.stats()["backend"]) == {"memory", "diskcache", "redis"}


@pytest.mark.redis
def test_another_process_reads_what_this_one_wrote(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    ns = f"t{uuid.uuid4().hex}:"
    disk = f"diskcache://{tmp_path / 'dc'}"
    c = completion()
    for url, options in ((redis_server.url, {"namespace": ns}), (disk, {})):
        with ResponseCache(url, "fp", backend_options=options) as cache:
            assert cache.store(PROMPT, GREEDY, c)
    out = run_python(
        "import json; from llmprod.answers import ResponseCache, completion_to_bytes;"
        "from llmprod.sampling_params import SamplingParams as S;"
        "res = [];\n"
        f"for url, opts in [({redis_server.url!r}, {{'namespace': {ns!r}}}), ({disk!r}, {{}})]:\n"
        "    with ResponseCache(url, 'fp', backend_options=opts) as cache:\n"
        f"        got, tier = cache.lookup({PROMPT!r}, S(temperature=0, max_tokens=16))\n"
        "        res.append([tier, completion_to_bytes(got).decode()])\n"
        "print(json.dumps(res))"
    )
    (tier_r, blob_r), (tier_d, blob_d) = json.loads(out)
    assert (tier_r, tier_d) == ("redis", "diskcache")
    for blob, tier in ((blob_r, "redis"), (blob_d, "diskcache")):
        got = completion_from_bytes(blob.encode())
        assert got == dataclasses.replace(
            c,
            cache_hit=tier,
            usage=dataclasses.replace(c.usage, cost=0.0),
            timings=Timings(),
        )


# ---------------------------------------------------------------- fingerprint
def test_fingerprint_is_the_same_for_copies_and_changes_with_what_matters(
    tmp_path: Path,
) -> None:
    model = write_model_dir(tmp_path / "a")
    fp = model_fingerprint(model, "float32", None)
    copy = tmp_path / "elsewhere" / "b"
    shutil.copytree(model, copy, copy_function=shutil.copyfile)  # new mtimes
    os.utime(copy / "model.safetensors", (1, 1))
    assert model_fingerprint(copy, "float32", None) == fp
    assert model_fingerprint(str(model), "float32", None) == fp
    assert len({
        fp,
        model_fingerprint(model, "bfloat16", None),
        model_fingerprint(model, "float32", "int8"),
        model_fingerprint(model, "float32", None, extra="rev2"),
    }) == 4  # fmt: skip

    def changed(edit: Callable[[Path], None]) -> str:
        d = tmp_path / uuid.uuid4().hex
        shutil.copytree(model, d)
        edit(d)
        return model_fingerprint(d, "float32", None)

    variants = {
        "config": changed(lambda d: (d / "config.json").write_text('{"model_type": "x"}')),
        "tokenizer": changed(lambda d: (d / "tokenizer.json").write_text("{}")),
        "template": changed(lambda d: (d / "chat_template.jinja").write_text("{{ x }}")),
        "weights": changed(lambda d: write_model_dir(d, fill=b"\x02")),
        "shape": changed(lambda d: write_model_dir(d, shape=(8, 4))),
        "extra file": changed(lambda d: shutil.copyfile(d / "model.safetensors", d / "more.safetensors")),
    }  # fmt: skip
    assert fp not in variants.values()
    assert len(set(variants.values())) == len(variants)
    reformatted = changed(
        lambda d: (d / "config.json").write_text(
            '{\n  "hidden_size": 8,\n  "model_type": "llama"\n}'
        )
    )
    assert reformatted == fp  # config.json is compared as JSON


def test_fingerprint_reads_little_of_a_large_file(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.mkdir()
    (path / "config.json").write_text("{}")
    n = 512 * 2**20
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [n // 4], "data_offsets": [0, n]}}
    ).encode()
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + n)  # sparse: 512 MiB without writing them
    t0 = time.perf_counter()
    fp = model_fingerprint(path, "float32", None)
    assert time.perf_counter() - t0 < 0.5
    with open(path / "model.safetensors", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01")
    assert model_fingerprint(path, "float32", None) != fp


def test_fingerprint_of_a_single_file_and_bad_inputs(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 100)
    assert len(model_fingerprint(gguf, "float32", None)) == 64
    with pytest.raises(FileNotFoundError):
        model_fingerprint(tmp_path / "missing", "float32", None)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(ValueError, match="header"):
        model_fingerprint(bad, "float32", None)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError):
        model_fingerprint(empty, "float32", None)


# ---------------------------------------------------------------- old paths
def test_old_module_paths_keep_their_names() -> None:
    old_response = [
        "COMPLETION_FORMAT",
        "FORMAT_VERSION",
        "STORED_FINISH_REASONS",
        "ResponseCache",
        "as_failsafe",
        "canonical_json",
        "completion_from_bytes",
        "completion_to_bytes",
        "model_fingerprint",
        "response_key",
        "sampling_key_fields",
    ]
    out = run_python(
        "import json, warnings; warnings.simplefilter('error');"
        "import llmprod;"
        "from llmprod.answers import exact, semantic;"
        f"print(json.dumps([[hasattr(exact, n) for n in {old_response!r}],"
        " sorted(semantic.__all__)]))"
    )
    has_names, semantic_all = json.loads(out)
    assert has_names == [True] * len(old_response)
    assert semantic_all == ["DEFAULT_THRESHOLD", "SemanticCache", "TextEmbedder"]
    sys.modules.pop("llmprod.cache.response", None)
    with pytest.warns(DeprecationWarning, match="llmprod.answers.exact"):
        old = importlib.import_module("llmprod.cache.response")
    assert old.response_key is response_key and old.FORMAT_VERSION == FORMAT_VERSION
    assert old.model_fingerprint is model_fingerprint
