"""The response caches inside the Engine, on the real model and real servers:
hits skip the model, stream, cost nothing; a dead Redis never fails a call."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llmprod import SamplingParams
from llmprod.cache import TieredCache, open_cache

GREEDY = SamplingParams(max_tokens=12, temperature=0)
ROOT = Path(__file__).resolve().parents[2]


def test_exact_hit_skips_the_model_streams_and_costs_nothing(make_engine: Any) -> None:
    from llmprod.ops.pricing import PriceTable

    eng = make_engine(
        kv_cache_memory="64MiB",
        cache="memory://",
        prices=PriceTable(prompt_per_1k=0.5, completion_per_1k=1.5),
    )
    first = eng.generate("What colour is the sky?", GREEDY)[0]
    assert first.cache_hit is None and first.usage.cost > 0
    eng.answers.exact.flush(5.0)
    steps = eng.metrics().scheduler["steps"]
    again = eng.generate("What colour is the sky?", GREEDY)[0]
    assert again.cache_hit == "memory" and again.token_ids == first.token_ids
    assert again.text == first.text and again.usage.cost == 0.0
    assert again.flags["cache"]["saved_completion_tokens"] == len(first.token_ids)
    assert eng.metrics().scheduler["steps"] == steps  # the model did not run
    deltas = list(eng.stream("What colour is the sky?", GREEDY))
    assert len(deltas) == 1 and deltas[0].finish_reason == first.finish_reason
    assert deltas[0].text == first.text and deltas[0].completion.cache_hit == "memory"
    # unseeded sampling is not cached
    sampled = SamplingParams(max_tokens=4, temperature=1.0)
    eng.generate("What colour is the sky?", sampled)
    assert eng.generate("What colour is the sky?", sampled)[0].cache_hit is None
    m = eng.metrics()
    assert m.cache["hits"]["memory"] == 2 and m.cache["response"]["hits_total"] == 2


def test_chat_hits_through_the_semantic_cache(make_engine: Any, tmp_path: Path) -> None:
    eng = make_engine(
        kv_cache_memory="64MiB", semantic_cache=f"diskcache://{tmp_path / 'sem'}"
    )
    a = eng.chat(
        [{"role": "user", "content": "What is the capital city of France?"}], GREEDY
    )
    eng.answers.semantic.flush(10.0)
    b = eng.chat([{"role": "user", "content": "What's the capital of France?"}], GREEDY)
    assert b.cache_hit == "semantic" and b.text == a.text
    other = eng.chat([{"role": "user", "content": "How do volcanoes form?"}], GREEDY)
    assert other.cache_hit is None


def test_dead_redis_costs_milliseconds_and_hits_resume_after_restart(
    make_engine: Any, redis_factory: Any
) -> None:
    server = redis_factory()
    eng = make_engine(kv_cache_memory="64MiB", cache=server.url)
    first = eng.generate("Name three rivers.", GREEDY)[0]
    eng.answers.exact.flush(5.0)
    assert eng.generate("Name three rivers.", GREEDY)[0].cache_hit == "redis"
    server.kill()  # SIGKILL mid-run
    t0 = time.monotonic()
    out = eng.generate("Name three rivers.", GREEDY)[0]  # a miss: the model answers
    assert out.cache_hit is None and out.token_ids == first.token_ids
    lookup_s = time.monotonic() - t0 - (out.timings.e2e_s or 0.0)
    assert lookup_s < 1.0  # no multi-second retry stall
    assert eng.metrics().cache["response"]["errors"] > 0
    server.start()  # same port
    deadline = time.monotonic() + 20
    hit = None
    while time.monotonic() < deadline and hit != "redis":
        eng.generate("Name three rivers.", GREEDY)
        eng.answers.exact.flush(5.0)
        hit = eng.generate("Name three rivers.", GREEDY)[0].cache_hit
        time.sleep(0.5)
    assert hit == "redis"  # without rebuilding the engine


def test_redis_down_at_start_engine_serves(make_engine: Any, caplog: Any) -> None:
    from tests.cache.conftest import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    eng = make_engine(kv_cache_memory="64MiB", cache=url)
    assert "down" in caplog.text
    out = eng.generate("Hello", GREEDY)[0]
    assert out.finish_reason in ("stop", "length")


def test_two_engine_processes_share_one_redis(
    make_engine: Any, redis_server: Any
) -> None:
    code = f"""
import json
from llmprod import Engine, SamplingParams
with Engine.from_pretrained("smollm2-135m", kv_cache_memory="64MiB",
                            cache={redis_server.url!r}) as eng:
    out = eng.generate("Shared across processes?", SamplingParams(max_tokens=12, temperature=0))[0]
    eng.answers.exact.flush(10.0)
    print(json.dumps(out.token_ids))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    tokens = json.loads(res.stdout.strip().splitlines()[-1])
    eng = make_engine(kv_cache_memory="64MiB", cache=redis_server.url)
    out = eng.generate("Shared across processes?", GREEDY)[0]
    assert out.cache_hit == "redis" and out.token_ids == tokens


def test_tiered_cache_names_the_tier(make_engine: Any, tmp_path: Path) -> None:
    disk_url = f"diskcache://{tmp_path / 'disk'}"
    writer = make_engine(kv_cache_memory="64MiB", cache=disk_url)
    writer.generate("Tiers of caching", GREEDY)
    writer.answers.exact.flush(5.0)
    writer.close()
    tiers = TieredCache([open_cache("memory://"), open_cache(disk_url)])
    reader = make_engine(kv_cache_memory="64MiB", cache=tiers)
    assert reader.generate("Tiers of caching", GREEDY)[0].cache_hit == "diskcache"
    assert (
        reader.generate("Tiers of caching", GREEDY)[0].cache_hit == "memory"
    )  # promoted
