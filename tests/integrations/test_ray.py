"""llmprod on a local Ray: batch inference on Ray Data, serving on Ray Serve.

Real model, real Ray (``ray.init(num_cpus=2)``, shared by the module), real
redis-server, the unmodified ``openai`` client and ``curl``. Engines are small
(one thread, max_tokens <= 8 where output is compared, 64 MiB of KV cache) and
every Ray worker asks for half a CPU, so two replicas, a router and the driver
fit two cores.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
pytest.importorskip("ray.serve")

from ray import serve  # noqa: E402

from llmprod import Engine, SamplingParams  # noqa: E402
from llmprod.integrations.ray import build_app, build_router_app, run_batch  # noqa: E402
from tests.cache.conftest import RedisServer, S3Server, free_port  # noqa: E402
from tests.prompts import TEXT_PROMPTS  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
GREEDY = SamplingParams(max_tokens=8, temperature=0)
# Small engines: one thread, a small KV pool, a short context (so that a
# "prompt over the context" is cheap to make).
ENGINE = {"num_threads": 1, "kv_cache_memory": "64MiB", "max_model_len": 512}
HALF_CPU = {"ray_actor_options": {"num_cpus": 0.5}}
TOO_LONG = "hello " * 600  # > max_model_len=512 tokens
EASY = "What is the capital of France?"
HARD = (
    "Write a Python function that returns the longest palindromic substring, "
    "explain why it is correct and analyse its time complexity step by step."
)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[dict[str, float]]:
    """A local Ray of 2 CPUs for the module; yields its startup times."""
    code = (
        "import time; t = time.perf_counter(); import ray, ray.data, ray.serve; "
        "print(time.perf_counter() - t)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    startup = {
        "import_s": float(out.stdout.strip().splitlines()[-1]),
        "init_s": time.perf_counter() - t0,
    }
    yield startup
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def http_port(ray_cluster: dict[str, float]) -> int:
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


@pytest.fixture(scope="module")
def llm_app(http_port: int, redis_url: str) -> Iterator[str]:
    """One model, two replicas sharing a redis answer cache; tenant "limited"
    may send one request per replica, then waits ~100 s."""
    app = build_app(
        {
            "model": MODEL,
            "name": "smol",
            "engine": {
                **ENGINE,
                "cache": redis_url,
                "limits": {
                    "limited": {"requests_per_second": 0.01, "max_request_burst": 1}
                },
            },
            "deployment": {"num_replicas": 2, **HALF_CPU},
        }
    )
    serve.run(app, name="llm", route_prefix="/", blocking=False)
    _wait_running("llm")
    yield f"http://127.0.0.1:{http_port}"
    serve.delete("llm")


@pytest.fixture(scope="module")
def router_app(http_port: int) -> Iterator[str]:
    """small and large: the same model under two names with different prices,
    behind a router deployment (ComplexityPolicy by default)."""
    serve.delete("llm")  # its replicas' CPU shares go to the three below
    app = build_router_app(
        {
            "models": {
                "small": {
                    "model": MODEL,
                    "engine": {**ENGINE, "prices": {"prompt_per_1k": 0.1}},
                    "deployment": HALF_CPU,
                },
                "large": {
                    "model": MODEL,
                    "engine": {
                        **ENGINE,
                        "prices": {"prompt_per_1k": 1.0, "completion_per_1k": 2.0},
                    },
                    "deployment": HALF_CPU,
                },
            },
            "deployment": {"ray_actor_options": {"num_cpus": 0}},
        }
    )
    serve.run(app, name="routed", route_prefix="/routed", blocking=False)
    _wait_running("routed")
    yield f"http://127.0.0.1:{http_port}/routed"
    serve.delete("routed")


@pytest.fixture(scope="module")
def cascade_app(http_port: int) -> Iterator[str]:
    """small then large under a CascadePolicy that keeps no answer of small
    (its mean log-probability is always below 0), so every request escalates."""
    serve.delete("routed")
    small = {"model": MODEL, "engine": ENGINE, "deployment": HALF_CPU}
    app = build_router_app(
        {
            "models": {"small": small, "large": small},
            "policy": {"type": "cascade", "min_confidence": 0.0},
            "prices": {"small": 0.5, "large": 2.0},  # per 1K tokens
            "deployment": {"ray_actor_options": {"num_cpus": 0}},
        }
    )
    serve.run(app, name="cascade", route_prefix="/cascade", blocking=False)
    _wait_running("cascade")
    yield f"http://127.0.0.1:{http_port}/cascade"
    serve.delete("cascade")


def _wait_running(app: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and str(status.status).endswith("RUNNING"):
            return
        if status is not None and "FAIL" in str(status.status):
            pytest.fail(f"app {app} failed: {status.message}")
        time.sleep(0.5)
    pytest.fail(f"app {app} did not start within {timeout_s}s")


def client(base: str) -> openai.OpenAI:
    # No retries: a 429 or 503 must reach the test as it was sent.
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


# ---------------------------------------------------------------- startup
def test_ray_startup_cost_is_reported(
    ray_cluster: dict[str, float], capsys: pytest.CaptureFixture[str]
) -> None:
    with capsys.disabled():
        print(
            f"\nray import (ray, ray.data, ray.serve): {ray_cluster['import_s']:.2f}s, "
            f"ray.init(num_cpus=2): {ray_cluster['init_s']:.2f}s"
        )
    assert 0 < ray_cluster["import_s"] < 60 and 0 < ray_cluster["init_s"] < 120


# ---------------------------------------------------------------- no cluster
def test_config_dict_makes_limits_prices_and_guards() -> None:
    from llmprod.integrations.ray.config import engine_kwargs, threads_for
    from llmprod.ops.guards import BlockListGuard, PIIGuard
    from llmprod.ops.limits import TenantLimits
    from llmprod.ops.pricing import PriceTable

    kw = engine_kwargs(
        {
            "limits": {"acme": {"requests_per_second": 2}},
            "default_limits": {"max_concurrent": 4},
            "prices": {"prompt_per_1k": 0.5},
            "guards": ["pii", {"type": "block_list", "words": ["x"]}],
            "max_num_seqs": 8,
        }
    )
    assert kw["limits"] == {"acme": TenantLimits(requests_per_second=2)}
    assert kw["default_limits"] == TenantLimits(max_concurrent=4)
    assert kw["prices"] == PriceTable(prompt_per_1k=0.5)
    assert [type(g) for g in kw["guards"]] == [PIIGuard, BlockListGuard]
    assert kw["max_num_seqs"] == 8
    assert [threads_for(x) for x in (0.25, 1, 2.5, None)] == [1, 1, 2, 1]


def test_errors_map_to_statuses_and_survive_a_handle() -> None:
    from llmprod.errors import EngineClosedError, InvalidRequestError, RateLimited
    from llmprod.integrations.ray.openai_api import (
        decode_error,
        encode_error,
        error_response,
        parse_request,
    )

    with pytest.raises(InvalidRequestError) as e:
        parse_request("completion", {"model": "m", "prompt": "x", "top_p": 2})
    assert e.value.field == "top_p"
    status, body, headers = error_response(e.value)
    assert status == 400 and body["error"]["param"] == "top_p" and headers == {}

    limited = RateLimited("slow down", 2.2, "acme", "requests_per_second")
    back = decode_error(encode_error(limited))
    assert isinstance(back, RateLimited) and back.retry_after == 2.2
    status, body, headers = error_response(back)
    assert status == 429 and headers == {"Retry-After": "3"}
    assert body["error"]["param"] == "requests_per_second"
    # A spent budget: no wait helps, so no Retry-After.
    assert error_response(RateLimited("spent", float("inf")))[2] == {}
    assert error_response(EngineClosedError("closed"))[0] == 503
    assert error_response(RuntimeError("boom"))[0] == 500
    field = decode_error(encode_error(InvalidRequestError("bad", "stop")))
    assert isinstance(field, InvalidRequestError) and field.field == "stop"


# ---------------------------------------------------------------- Ray Data
def test_data_two_actors_match_one_engine_and_a_bad_row_is_an_error_cell(
    ray_cluster: dict[str, float], engine: Engine
) -> None:
    prompts = [f"Note {i}. {TEXT_PROMPTS[i % 12]}" for i in range(64)]
    rows = [{"id": i, "prompt": p} for i, p in enumerate(prompts)]
    rows.insert(20, {"id": 100, "prompt": ""})  # empty prompt
    rows.insert(41, {"id": 101, "prompt": TOO_LONG})  # over the context
    ds = ray.data.from_items(rows)
    out = run_batch(
        ds, MODEL, GREEDY, num_actors=2, num_cpus=0.5, batch_size=8, engine=ENGINE
    ).take_all()
    by_id = {r["id"]: r for r in out}
    assert sorted(by_id) == [*range(64), 100, 101]  # every row came back

    # The bad rows: an error naming the field, no outputs.
    for bad in (100, 101):
        row = by_id[bad]
        assert row["error"] is not None and "prompt" in row["error"]
        assert row["text"] is None and row["completion_tokens"] is None
    assert "InvalidRequestError" in by_id[100]["error"]
    assert "512" in by_id[101]["error"]  # names the limit

    # Every other row: the local engine's greedy answer, token counts, no error.
    local = engine.generate(prompts, GREEDY)
    for i, comp in enumerate(local):
        row = by_id[i]
        assert row["error"] is None
        assert row["text"] == comp.text, f"row {i}"
        assert row["completion_tokens"] == len(comp.token_ids)
        assert row["prompt_tokens"] == comp.usage.prompt_tokens
        assert row["finish_reason"] == comp.finish_reason
        assert row["cost"] == 0.0 and row["cache_hit"] is None


def test_data_takes_chat_messages(
    ray_cluster: dict[str, float], engine: Engine
) -> None:
    conv = [{"role": "user", "content": "Name a colour."}]
    ds = ray.data.from_items([{"messages": conv}, {"messages": []}])
    out = run_batch(
        ds,
        MODEL,
        GREEDY,
        messages_column="messages",
        num_actors=1,
        num_cpus=0.5,
        engine=ENGINE,
    ).take_all()
    assert out[0]["text"] == engine.chat(conv, GREEDY).text and out[0]["error"] is None
    assert out[1]["text"] is None and "messages is empty" in out[1]["error"]


def test_data_actors_share_an_s3_cold_tier(
    ray_cluster: dict[str, float], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Each run's actors are new processes with an empty memory tier: the second
    run's answers come from the S3 tier (a real S3 endpoint, moto's server)
    that the first run's actors wrote."""
    s3 = S3Server(tmp_path_factory.mktemp("moto"))
    s3.start()
    try:
        s3.create_bucket("llmprod")
        o = s3.options
        url = (
            f"s3://llmprod/answers?endpoint_url={o['endpoint_url']}"
            f"&key={o['key']}&secret={o['secret']}"
        )
        engine_opts = {**ENGINE, "cache": ["memory://", url]}
        rows = [{"prompt": p} for p in TEXT_PROMPTS[:4]]

        def run() -> list[dict[str, Any]]:
            return run_batch(
                ray.data.from_items(rows), MODEL, GREEDY, num_actors=1,
                num_cpus=0.5, engine=engine_opts,
            ).take_all()  # fmt: skip

        first, second = run(), run()
    finally:
        s3.stop()
    assert all(r["cache_hit"] is None and r["error"] is None for r in first)
    assert [r["cache_hit"] for r in second] == ["s3"] * 4
    assert sorted(r["text"] for r in second) == sorted(r["text"] for r in first)


# ---------------------------------------------------------------- Ray Serve
def test_openai_client_completions_and_chat(llm_app: str, engine: Engine) -> None:
    c = client(llm_app)
    assert [m.id for m in c.models.list().data] == ["smol"]

    raw = c.completions.with_raw_response.create(
        model="smol", prompt="The capital of France is", max_tokens=8, temperature=0
    )
    resp = raw.parse()
    want = engine.generate("The capital of France is", GREEDY)[0]
    assert resp.choices[0].text == want.text
    assert resp.usage.completion_tokens == len(want.token_ids)
    assert resp.model == "smol"
    ext = resp.model_extra["llmprod"]
    assert ext["model"] == "smol" and ext["replica"].startswith("llm#LLMServer#")
    assert raw.headers["x-llmprod-replica"] == ext["replica"]
    assert raw.headers["x-llmprod-model"] == "smol"

    conv = [{"role": "user", "content": "What is the boiling point of water?"}]
    chat = c.chat.completions.create(
        model="smol", messages=conv, max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.content == engine.chat(conv, GREEDY).text
    assert chat.choices[0].message.role == "assistant"
    assert chat.model_extra["llmprod"]["replica"].startswith("llm#LLMServer#")


def test_openai_client_streams(llm_app: str, engine: Engine) -> None:
    c = client(llm_app)
    prompt = "Once upon a time, in a small village by the sea,"
    chunks = list(
        c.completions.create(
            model="smol", prompt=prompt, max_tokens=8, temperature=0, stream=True
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks) == (
        engine.generate(prompt, GREEDY)[0].text
    )
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].model_extra["llmprod"]["model"] == "smol"

    conv = [{"role": "user", "content": "Write a short poem about the moon."}]
    stream = c.chat.completions.create(
        model="smol",
        messages=conv,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts = list(stream)
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert text == engine.chat(conv, GREEDY).text
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == 8


def test_openai_client_gets_a_400_naming_the_field(llm_app: str) -> None:
    c = client(llm_app)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="smol", prompt="Hi", max_tokens=4, temperature=-1)
    assert e.value.status_code == 400 and e.value.param == "temperature"
    assert e.value.code == "invalid_value" and "temperature" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="smol", prompt="", max_tokens=4)
    assert e.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="smol", messages=[], max_tokens=4)
    assert e.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="smol", prompt="Hi", max_tokens=4, n=2)
    assert e.value.param == "n"
    # logprobs=0 asks for the chosen tokens' log-probabilities (not served yet):
    # refused, not taken for logprobs=False.
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="smol", prompt="Hi", max_tokens=4, logprobs=0)
    assert e.value.param == "logprobs"
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-4", prompt="Hi", max_tokens=4)
    assert e.value.param == "model" and e.value.code == "model_not_found"


def test_openai_client_gets_a_429_with_retry_after(llm_app: str) -> None:
    c = client(llm_app)
    # Limits are per replica: with two replicas, three requests put two on one.
    errors = []
    for _ in range(3):
        try:
            c.completions.create(
                model="smol", prompt="Hi", max_tokens=2, temperature=0, user="limited"
            )
        except openai.RateLimitError as e:
            errors.append(e)
    assert errors, "three requests over a one-per-replica limit all passed"
    err = errors[0]
    assert err.status_code == 429 and err.code == "rate_limit_exceeded"
    assert int(err.response.headers["retry-after"]) >= 1
    assert err.response.headers["x-llmprod-replica"].startswith("llm#LLMServer#")
    # Other tenants are not limited.
    ok = c.completions.create(model="smol", prompt="Hi", max_tokens=2, temperature=0)
    assert ok.choices[0].text


def test_curl_sees_sse_framing(llm_app: str, engine: Engine) -> None:
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": "Name a prime number."}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
    }
    out = subprocess.run(
        [
            "curl", "-sS", "-N", "-i", "--max-time", "60",
            "-H", "Content-Type: application/json",
            "-d", json.dumps(body),
            f"{llm_app}/v1/chat/completions",
        ],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    # Text mode turned the header lines' CRLF into LF.
    head, _, stream = out.stdout.partition("\n\n")
    assert re.search(r"(?im)^content-type: text/event-stream", head)
    assert re.search(r"(?im)^x-llmprod-replica: llm#LLMServer#", head)
    assert stream.endswith("\n\n")
    events = stream.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert {ch["object"] for ch in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
    assert text == engine.chat(body["messages"], GREEDY).text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["llmprod"]["replica"].startswith("llm#LLMServer#")


def test_replicas_share_the_redis_answer_cache(llm_app: str) -> None:
    c = client(llm_app)
    prompt = f"A fresh prompt {time.time_ns()}: the moon is"

    def ask() -> tuple[str, dict[str, Any]]:
        r = c.completions.create(
            model="smol", prompt=prompt, max_tokens=8, temperature=0
        )
        return r.choices[0].text, r.model_extra["llmprod"]

    text, first = ask()
    assert first["cache_hit"] is None  # computed by the first replica
    for _ in range(40):  # until the other replica answers
        again_text, again = ask()
        if again["replica"] != first["replica"]:
            break
    else:
        pytest.fail("40 requests never reached the second replica")
    assert again["cache_hit"] == "redis" and again_text == text


def test_metrics_endpoint_exports_the_engine_snapshot(llm_app: str) -> None:
    with urllib.request.urlopen(f"{llm_app}/metrics", timeout=30) as r:
        text = r.read().decode()
        replica = r.headers["x-llmprod-replica"]
        assert r.headers["content-type"].startswith("text/plain")
    assert "llmprod_requests_completed_total" in text
    assert f'llmprod_serve_info{{model="smol",replica="{replica}"}} 1.0' in text


def test_a_replica_killed_mid_stream_fails_the_stream_and_the_app_keeps_serving(
    llm_app: str,
) -> None:
    c = client(llm_app)
    stream = c.completions.create(
        model="smol",
        prompt="Count slowly:",
        max_tokens=400,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    replica = stream.response.headers["x-llmprod-replica"]
    pieces = iter(stream)
    next(pieces)  # the stream is running
    actor = ray.get_actor(f"SERVE_REPLICA::{replica}", namespace="serve")
    ray.kill(actor, no_restart=True)
    # The Serve proxy drops the connection: the client raises, it does not
    # take a cut-off stream for a finished one.
    with pytest.raises(openai.APIConnectionError):
        for _ in pieces:
            pass
    # The other replica answers the next request.
    ok = c.completions.create(model="smol", prompt="Hi", max_tokens=2, temperature=0)
    assert ok.model_extra["llmprod"]["replica"] != replica


# ---------------------------------------------------------------- routing
def test_router_sends_easy_to_small_and_hard_to_large(
    router_app: str, engine: Engine
) -> None:
    c = client(router_app)
    assert [m.id for m in c.models.list().data] == ["router"]
    raw = c.completions.with_raw_response.create(
        model="router", prompt=EASY, max_tokens=8, temperature=0
    )
    easy = raw.parse()
    ext = easy.model_extra["llmprod"]
    assert easy.model == "small" and raw.headers["x-llmprod-model"] == "small"
    assert ext["route"]["engine"] == "small" and ext["route"]["tried"] == ["small"]
    assert ext["replica"].startswith("routed#small#")
    # small charges 0.1 per 1K prompt tokens, nothing for completions
    assert ext["cost"] == pytest.approx(easy.usage.prompt_tokens * 0.1 / 1000)
    assert easy.choices[0].text == engine.generate(EASY, GREEDY)[0].text

    hard = c.completions.create(
        model="router", prompt=HARD, max_tokens=8, temperature=0
    )
    ext = hard.model_extra["llmprod"]
    assert hard.model == "large" and ext["route"]["engine"] == "large"
    assert ext["route"]["score"] >= 0.5
    u = hard.usage
    assert ext["cost"] == pytest.approx(
        (u.prompt_tokens * 1.0 + u.completion_tokens * 2.0) / 1000
    )

    # Streaming goes through the router too; the headers name the deployment.
    stream = c.chat.completions.create(
        model="router",
        messages=[{"role": "user", "content": HARD}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    assert stream.response.headers["x-llmprod-model"] == "large"
    parts = list(stream)
    assert parts[-1].model_extra["llmprod"]["route"]["engine"] == "large"

    with urllib.request.urlopen(f"{router_app}/metrics", timeout=30) as r:
        text = r.read().decode()
    assert 'llmprod_router_routes_requests_total{route="small"} 1.0' in text
    assert 'llmprod_router_routes_requests_total{route="large"} 2.0' in text
    cost = re.search(r'llmprod_router_routes_cost_total\{route="large"\} (\S+)', text)
    assert cost is not None and float(cost.group(1)) > 0
    assert "llmprod_router_cost_saved " in text


def test_cascade_router_escalates_across_deployments(
    cascade_app: str, engine: Engine
) -> None:
    c = client(cascade_app)
    conv = [{"role": "user", "content": "Name a colour."}]
    chat = c.chat.completions.create(
        model="router", messages=conv, max_tokens=8, temperature=0
    )
    route = chat.model_extra["llmprod"]["route"]
    assert route["tried"] == ["small", "large"] and route["engine"] == "large"
    assert route["confidence"][0] < 0.0 and route["confidence"][1] is None
    assert chat.model == "large"
    assert chat.choices[0].message.content == engine.chat(conv, GREEDY).text

    with urllib.request.urlopen(f"{cascade_app}/metrics", timeout=30) as r:
        text = r.read().decode()
    assert "llmprod_router_escalations_total 1.0" in text
    assert 'llmprod_router_routes_escalated_total{route="small"} 1.0' in text
    assert 'llmprod_router_routes_requests_total{route="large"} 1.0' in text
