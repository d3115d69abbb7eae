"""llmprod.router on the real model: complexity routing, the cascade's escalation
rule, the stats and their sums, streaming, chat, async and threads, and the
Router's methods taking the Engine's parameters."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import math
import threading
from collections.abc import Callable

import pytest

from llmprod import Engine, SamplingParams
from llmprod.errors import InvalidConfigError
from llmprod.ops.pricing import PriceTable
from llmprod.router import (
    CascadePolicy,
    ComplexityPolicy,
    RoutePlan,
    RouteQuery,
    Router,
    RoutingPolicy,
    mean_logprob,
)

GREEDY = SamplingParams(max_tokens=8, temperature=0)
EASY = "What is the capital of France?"
HARD = (
    "Write a Python function that returns the longest palindromic substring, "
    "explain why it is correct and analyse its time complexity step by step."
)
PRICES = {"small": 0.5, "large": 2.0}  # per 1K tokens


def two_names(engine: Engine, policy: RoutingPolicy, **kw: object) -> Router:
    """The session engine under two names: routing is visible in the flags and
    stats, and every test stays as fast as one engine."""
    return Router({"small": engine, "large": engine}, policy, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------- complexity policy
def test_complexity_score_is_the_documented_noisy_or() -> None:
    policy = ComplexityPolicy(0.5)
    easy = policy.features(EASY, 8)
    hard = policy.features(HARD, 30)
    assert set(easy) == {"length", "reasoning", "code", "math", "constraints"}
    assert all(0.0 <= v <= 1.0 for v in [*easy.values(), *hard.values()])
    assert all(v == 0.0 for v in easy.values())
    assert hard["code"] == 1.0 and hard["reasoning"] == 1.0
    expected = 1.0 - math.prod(1 - policy.weights[k] * v for k, v in hard.items())
    assert policy.score(HARD, 30) == pytest.approx(expected)
    assert policy.score(EASY, 8) == 0.0 < 0.5 <= policy.score(HARD, 30) < 1.0
    # Length alone: 0 up to 16 tokens, 1 from 128.
    assert policy.features("word", 16)["length"] == 0.0
    assert policy.features("word", 72)["length"] == pytest.approx(0.5)
    assert policy.features("word", 500)["length"] == 1.0


def test_complexity_thresholds_pick_among_three_engines() -> None:
    policy = ComplexityPolicy([0.2, 0.6], features={"code": 1.0})
    order = ["s", "m", "l"]
    assert policy.plan(RouteQuery("hello", 1), order).routes == ("s",)
    assert policy.plan(RouteQuery("a function", 2), order).routes == ("m",)
    assert policy.plan(RouteQuery("implement a function", 3), order).routes == ("l",)
    with pytest.raises(InvalidConfigError, match="ascending"):
        ComplexityPolicy([0.6, 0.2])
    with pytest.raises(InvalidConfigError, match="unknown feature"):
        ComplexityPolicy(0.5, features=["colour"])
    with pytest.raises(InvalidConfigError, match="weights must be in"):
        ComplexityPolicy(0.5, features={"code": 2.0})


def test_similarity_feature_uses_the_hard_exemplars() -> None:
    policy = ComplexityPolicy(0.5, features=["similarity"])
    near = policy.features("Prove by induction that the formula holds for every n.")
    far = policy.features("What colour are bananas?")
    assert near["similarity"] > far["similarity"]
    plans = policy.plan_batch(
        [RouteQuery("Prove by induction that 2^n > n for every n.", 14)],
        ["small", "large"],
    )
    assert plans[0].score is not None and 0.0 <= plans[0].score <= 1.0


def test_complexity_routes_easy_to_small_and_hard_to_large(engine: Engine) -> None:
    router = two_names(engine, ComplexityPolicy(0.5), prices=PRICES)
    assert router.route(EASY).routes == ("small",)
    assert router.route(HARD).routes == ("large",)
    outs = router.generate([EASY, HARD, EASY], GREEDY)
    assert [o.flags["route"]["engine"] for o in outs] == ["small", "large", "small"]
    assert outs[1].flags["route"]["score"] >= 0.5 > outs[0].flags["route"]["score"]
    # Routing changes who answers, not what a greedy request gets.
    assert outs[0].token_ids == engine.generate(EASY, GREEDY)[0].token_ids
    s = router.stats()
    assert s["requests"] == 3 and s["escalations"] == 0
    assert (
        s["routes"]["small"]["requests"] == 2 and s["routes"]["large"]["requests"] == 1
    )
    assert s["routes"]["small"]["share"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------- cascade policy
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):"]


def test_cascade_escalates_exactly_below_the_threshold(engine: Engine) -> None:
    probe = engine.generate(
        PROMPTS, SamplingParams(max_tokens=8, temperature=0, logprobs=0)
    )
    conf = [mean_logprob(o) for o in probe]
    # Cut in the middle of the widest gap between neighbouring confidences, so
    # that some answers are kept, some escalate, and none sits near the line.
    ranked = sorted(conf)
    gap, i = max((b - a, i) for i, (a, b) in enumerate(itertools.pairwise(ranked)))
    assert gap > 0.01, conf
    threshold = (ranked[i] + ranked[i + 1]) / 2
    router = two_names(engine, CascadePolicy(threshold), prices=PRICES)
    outs = router.generate(PROMPTS, GREEDY)
    for c, o in zip(conf, outs):
        route = o.flags["route"]
        escalated = c < threshold
        assert route["tried"] == (["small", "large"] if escalated else ["small"])
        assert route["engine"] == ("large" if escalated else "small")
        assert route["confidence"][0] == pytest.approx(c, abs=1e-3)
        assert o.logprobs is None  # forced on internally, not handed back
    n_esc = sum(c < threshold for c in conf)
    assert 0 < n_esc < len(PROMPTS)
    assert router.stats()["escalations"] == n_esc


def test_cascade_always_and_never_escalating(engine: Engine) -> None:
    always = two_names(engine, CascadePolicy(min_confidence=1.0))  # logprobs <= 0
    outs = always.generate(PROMPTS[:2], GREEDY)
    assert all(o.flags["route"]["tried"] == ["small", "large"] for o in outs)
    never = two_names(engine, CascadePolicy(min_confidence=-1e9))
    outs = never.generate(
        PROMPTS[:2], SamplingParams(max_tokens=8, temperature=0, logprobs=2)
    )
    assert all(o.flags["route"]["tried"] == ["small"] for o in outs)
    assert all(o.logprobs and len(o.logprobs) == len(o.token_ids) for o in outs)
    assert always.stats()["escalations"] == 2 and never.stats()["escalations"] == 0
    with pytest.raises(InvalidConfigError, match="unknown signal"):
        CascadePolicy(-1.0, signal="vibes")


def test_escalated_answer_comes_from_the_next_engine_and_both_are_paid(
    engine: Engine, make_engine: Callable[..., Engine]
) -> None:
    # The large engine prices its own requests (Completion.usage.cost); the
    # session engine has no price table, so the Router's price is used for it.
    table = PriceTable(prompt_per_1k=2.0, completion_per_1k=4.0)
    large = make_engine(dtype="float32", kv_cache_memory="64MiB", seed=0, prices=table)
    router = Router(
        {"small": engine, "large": large}, CascadePolicy(1.0), prices={"small": 0.5}
    )
    before_small = engine.metrics().requests["submitted"]
    before_large = large.metrics().requests["submitted"]
    outs = router.generate(PROMPTS[:2], GREEDY)
    assert engine.metrics().requests["submitted"] - before_small == 2
    assert large.metrics().requests["submitted"] - before_large == 2
    for o in outs:
        assert o.flags["route"]["engine"] == "large"
        assert o.usage.cost == pytest.approx(
            table.cost(o.usage.prompt_tokens, o.usage.completion_tokens)
        )
        assert o.token_ids == large.generate(o.prompt_token_ids, GREEDY)[0].token_ids
    s = router.stats()
    small, large_route = s["routes"]["small"], s["routes"]["large"]
    assert small["cost"] == pytest.approx(
        (small["prompt_tokens"] + small["completion_tokens"]) * 0.5 / 1000
    )
    assert large_route["cost"] == pytest.approx(sum(o.usage.cost for o in outs))
    assert s["cost"] == pytest.approx(small["cost"] + large_route["cost"])
    # Always escalating costs more than always-large: the saving is negative.
    assert s["baseline_cost"] == pytest.approx(large_route["cost"])
    assert s["cost_saved"] == pytest.approx(-small["cost"])


# ------------------------------------------------------------------------- stats
def test_stats_add_up(engine: Engine) -> None:
    policy = CascadePolicy(-0.3)
    router = two_names(
        engine,
        policy,
        prices={
            "small": (0.1, 0.3),
            "large": PriceTable(prompt_per_1k=1.0, completion_per_1k=3.0),
        },
    )
    prompts = [*PROMPTS, EASY]
    outs = router.generate(prompts, GREEDY)
    s = router.stats()
    routes = s["routes"]
    assert s["requests"] == len(prompts)
    assert sum(r["requests"] for r in routes.values()) == len(prompts)
    assert sum(r["calls"] for r in routes.values()) == len(prompts) + s["escalations"]
    assert routes["small"]["escalated"] == s["escalations"]
    assert routes["small"]["calls"] == len(prompts)
    assert s["cost"] == pytest.approx(sum(r["cost"] for r in routes.values()))
    expected_cost = sum(
        (r["prompt_tokens"] * p_in + r["completion_tokens"] * p_out) / 1000
        for r, (p_in, p_out) in zip(
            (routes["small"], routes["large"]), ((0.1, 0.3), (1.0, 3.0))
        )
    )
    assert s["cost"] == pytest.approx(expected_cost)
    baseline = sum(
        (o.usage.prompt_tokens * 1.0 + o.usage.completion_tokens * 3.0) / 1000
        for o in outs
    )
    assert s["baseline_cost"] == pytest.approx(baseline)
    assert s["cost_saved"] == pytest.approx(baseline - s["cost"])
    assert s["cost_saved_fraction"] == pytest.approx(s["cost_saved"] / baseline)
    router.reset_stats()
    assert router.stats()["requests"] == 0 and router.stats()["cost"] == 0.0


def test_no_prices_means_unknown_baseline(engine: Engine) -> None:
    router = two_names(engine, ComplexityPolicy(0.5))
    router.generate([EASY, HARD], GREEDY)
    s = router.stats()
    assert s["cost"] == 0.0
    assert s["baseline_cost"] is None and s["cost_saved"] is None


def test_threads_share_counters(engine: Engine) -> None:
    router = two_names(engine, ComplexityPolicy(0.5), prices=PRICES)
    errors: list[BaseException] = []

    def work(prompt: str) -> None:
        try:
            router.generate([prompt, EASY], SamplingParams(max_tokens=4, temperature=0))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,)) for p in (EASY, HARD) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    s = router.stats()
    assert s["requests"] == 12
    assert (
        s["routes"]["large"]["requests"] == 3 and s["routes"]["small"]["requests"] == 9
    )


# -------------------------------------------------------- stream, chat, async
def test_stream_through_complexity_router_matches_generate(engine: Engine) -> None:
    router = two_names(engine, ComplexityPolicy(0.5), prices=PRICES)
    full = router.generate(HARD, GREEDY)[0]
    deltas = list(router.stream(HARD, GREEDY))
    assert "".join(d.text for d in deltas) == full.text
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    final = deltas[-1]
    assert final.finish_reason is not None and final.completion is not None
    assert final.completion.flags["route"]["engine"] == "large"
    assert router.stats()["requests"] == 2
    # Leaving a stream early aborts it (the pool check after the test) and
    # does not count it.
    stream = router.stream(
        "Once upon a time", SamplingParams(max_tokens=16, temperature=0)
    )
    first = next(iter(stream))
    assert first.finish_reason is None
    stream.close()  # type: ignore[attr-defined]
    assert router.stats()["requests"] == 2


def test_stream_through_cascade(engine: Engine) -> None:
    kept = two_names(engine, CascadePolicy(-1e9))
    deltas = list(kept.stream(EASY, GREEDY))
    assert len(deltas) == 1  # judged before it is shown, then sent whole
    assert deltas[0].completion is not None
    assert deltas[0].token_ids == engine.generate(EASY, GREEDY)[0].token_ids
    escalated = two_names(engine, CascadePolicy(1.0))
    messages = [{"role": "user", "content": EASY}]
    deltas = list(escalated.stream(messages, GREEDY))
    final = deltas[-1].completion
    assert final is not None and final.flags["route"]["tried"] == ["small", "large"]
    assert "".join(d.text for d in deltas) == final.text
    assert final.token_ids == engine.chat(messages, GREEDY).token_ids  # type: ignore[union-attr]
    assert escalated.stats()["escalations"] == 1


def test_chat_and_agenerate_and_astream(engine: Engine) -> None:
    router = two_names(engine, ComplexityPolicy(0.5))
    one = router.chat([{"role": "user", "content": HARD}], GREEDY)
    assert not isinstance(one, list) and one.flags["route"]["engine"] == "large"
    many = router.chat(
        [[{"role": "user", "content": EASY}], [{"role": "user", "content": HARD}]],
        GREEDY,
    )
    assert isinstance(many, list)
    assert [c.flags["route"]["engine"] for c in many] == ["small", "large"]
    assert many[1].token_ids == one.token_ids

    cascade = two_names(engine, CascadePolicy(1.0))

    async def run() -> tuple[list[str], str]:
        outs = await cascade.agenerate([EASY, HARD], GREEDY)
        text = ""
        async for d in cascade.astream(EASY, GREEDY):
            text += d.text
        return [o.flags["route"]["engine"] for o in outs], text

    routes, text = asyncio.run(run())
    assert routes == ["large", "large"]
    assert text == engine.generate(EASY, GREEDY)[0].text
    assert cascade.stats()["requests"] == 3 and cascade.stats()["escalations"] == 3


# ----------------------------------------------------------------- validation
def test_router_rejects_bad_configs(engine: Engine) -> None:
    with pytest.raises(InvalidConfigError, match="at least one engine"):
        Router({}, ComplexityPolicy(0.5))
    with pytest.raises(InvalidConfigError, match="order"):
        two_names(engine, ComplexityPolicy(0.5), order=["small", "medium"])
    with pytest.raises(InvalidConfigError, match="unknown engines"):
        two_names(engine, ComplexityPolicy(0.5), prices={"huge": 1.0})
    with pytest.raises(InvalidConfigError, match="RoutingPolicy"):
        Router({"a": engine}, "cheapest")  # type: ignore[arg-type]

    class Nowhere(RoutingPolicy):
        def plan(self, query: RouteQuery, order: object) -> RoutePlan:
            return RoutePlan(("mars",))

    with pytest.raises(InvalidConfigError, match="planned"):
        two_names(engine, Nowhere()).generate(EASY, GREEDY)
    with pytest.raises(ValueError, match="empty"):
        two_names(engine, ComplexityPolicy(0.5)).generate("", GREEDY)


# ----------------------------------------------------------- the Engine's API
@pytest.mark.parametrize("name", ["generate", "chat", "stream", "agenerate", "astream"])
def test_router_methods_take_the_engines_parameters(name: str) -> None:
    def shape(fn: Callable[..., object]) -> list[tuple[str, object, object]]:
        params = list(inspect.signature(fn).parameters.values())
        return [(p.name, p.kind, p.default) for p in params]

    assert shape(getattr(Router, name)) == shape(getattr(Engine, name))
    assert inspect.iscoroutinefunction(getattr(Router, name)) == (
        inspect.iscoroutinefunction(getattr(Engine, name))
    )
    assert inspect.isasyncgenfunction(getattr(Router, name)) == (
        inspect.isasyncgenfunction(getattr(Engine, name))
    )


def test_engine_arguments_pass_through(engine: Engine) -> None:
    router = two_names(engine, CascadePolicy(1.0))
    context = "Paris is the capital and largest city of France."
    out = router.generate(EASY, GREEDY, wait_timeout=5.0, grounding_context=context)[0]
    assert out.flags["route"]["tried"] == ["small", "large"]
    assert (
        out.flags["grounding"]
        == engine.generate(EASY, GREEDY, grounding_context=context)[0].flags[
            "grounding"
        ]
    )
    reply = router.chat(
        [{"role": "user", "content": EASY}], GREEDY, grounding_context=context
    )
    assert not isinstance(reply, list) and "grounding" in reply.flags
    deltas = list(router.stream(EASY, GREEDY, wait_timeout=5.0))
    assert deltas[-1].completion is not None

    async def run() -> str:
        outs = await router.agenerate([EASY], GREEDY, wait_timeout=5.0)
        text = ""
        async for d in router.astream(EASY, GREEDY, wait_timeout=5.0):
            text += d.text
        assert text == outs[0].text
        return text

    assert asyncio.run(run()) == out.text
    with pytest.raises(TypeError):
        router.chat([{"role": "user", "content": EASY}], GREEDY, colour="blue")
