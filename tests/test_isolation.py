"""One request never harms another (RELIABILITY I1-I4, I7, F7, B1-B7), on the
real model.

Faults a real run cannot cause on demand (a crashing guard, price table, sampler
or detokenizer) are injected, and each test says so. The injected guard and price
table are the engine's own extension points (``guards=``, ``prices=``), scripted
per test through :data:`SCRIPT`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from llmprod import Engine, SamplingParams
from llmprod.errors import (
    GuardBlockedError,
    InvalidRequestError,
    LLMProdError,
    RateLimited,
    RequestFailedError,
)
from llmprod.ops.guards import BlockListGuard, GuardResult
from llmprod.ops.limits import TenantLimits
from llmprod.ops.pricing import PriceTable
from llmprod.outputs import Completion, Delta
from llmprod.sampling_params import MIN_TOP_P
from llmprod.sched.request import Request
from tests.helpers import (
    EndingsSpy,
    SamplerWithFault,
    assert_pool_whole,
    drain,
    wait_idle,
)

MODEL = "smollm2-135m"
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
CALL_TIMEOUT = 120.0
"""No call may take longer than this (a blocked caller fails the test)."""


# ---------------------------------------------------------------------- helpers
def within(timeout: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` run in a thread: its result, or its exception
    raised here. Fails the test if it has not returned within ``timeout``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AssertionError(f"{fn.__name__} still blocked after {timeout}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def assert_one_end(deltas: list[Delta], error: BaseException | None) -> None:
    """A stream ends exactly once: one final delta (the last one), or an error
    and no final delta."""
    finals = [d for d in deltas if d.finish_reason is not None]
    if error is None:
        assert len(finals) == 1 and deltas[-1] is finals[0], deltas
    else:
        assert finals == [], (finals, error)


def requests_delta(eng: Engine, before: dict[str, int]) -> dict[str, int]:
    now = eng.metrics().requests
    return {
        k: now[k] - before[k] for k in ("submitted", "completed", "aborted", "errored")
    }


def in_flight(eng: Engine, tenant: str) -> int:
    assert eng.throttle is not None
    row = eng.throttle.snapshot().get(tenant)
    return 0 if row is None else row["in_flight"]


def poisoned(kind: str) -> Callable[[Request], bool]:
    return lambda r: r.params.extra.get("poison") == kind


class FaultySampler(SamplerWithFault):
    """The sampler, raising "injected sampler fault" after it samples for a
    step whose requests ``fails``; counts the faults."""

    def __init__(self, inner: Any, fails: Callable[[list[Request]], bool]) -> None:
        self.faults = 0

        def check(requests: list[Request]) -> None:
            if fails(requests):
                self.faults += 1
                raise RuntimeError("injected sampler fault")

        super().__init__(inner, check)


class ExplodingDetokenizer:
    """A request's detokenizer with a fault injected on its ``after + 1``-th
    token (a tokenizer cannot be made to fail for one request for real)."""

    def __init__(self, inner: Any, after: int) -> None:
        self._inner = inner
        self._left = after

    def add(self, token: int) -> Any:
        if self._left == 0:
            raise RuntimeError("injected detokenizer fault")
        self._left -= 1
        return self._inner.add(token)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# ---------------------------------------------------------- the rigged engine
class Script:
    """What the scripted guard and price table do (reset around every test)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.output_faults: dict[str, str] = {}
        """Exact output text -> "raise" (the guard crashes) or "block"."""
        self.prompt_faults: dict[str, str] = {}
        """Prompt text -> "raise" or a replacement text (a redaction)."""
        self.output_guards: list[Any] = []
        """Real guards run on outputs after the scripted checks."""
        self.price_faults: dict[int, str] = {}
        """Prompt length -> "raise", "nan" (once the request ran) or
        "nan-estimate" (the admission estimate only)."""


SCRIPT = Script()


class ScriptedGuard:
    """A user guard (the Guard protocol) whose faults are injected per test."""

    name = "scripted"

    @property
    def stream_holdback(self) -> int | None:
        """The real guards' holdback; None (hold all) while faults are scripted
        on exact output texts, which only the whole text can match."""
        if SCRIPT.output_faults:
            return None
        return max((g.stream_holdback for g in SCRIPT.output_guards), default=0)

    def check(self, text: str, where: str) -> GuardResult:
        if where == "prompt":
            fault = SCRIPT.prompt_faults.get(text)
            if fault == "raise":
                raise RuntimeError("injected prompt guard fault")
            return GuardResult(text if fault is None else fault)
        fault = SCRIPT.output_faults.get(text)
        if fault == "raise":
            raise RuntimeError("injected guard fault")
        if fault == "block":
            return GuardResult(text, {"counts": {"scripted": 1}}, blocked=True)
        for guard in SCRIPT.output_guards:
            res = guard.check(text, where)
            if res.blocked:
                return res
            text = res.text
        return GuardResult(text)


class ScriptedPrices(PriceTable):
    """A user price table whose faults are injected per test."""

    def cost(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        cached_prompt_tokens: int = 0,
        compute_s: float = 0.0,
    ) -> float:
        fault = SCRIPT.price_faults.get(prompt_tokens)
        if fault == "raise":
            raise RuntimeError("injected price table fault")
        if fault == "nan" and compute_s > 0:  # priced after it ran
            return math.nan
        if fault == "nan-estimate" and compute_s == 0:  # the admission estimate
            return math.nan
        return super().cost(
            prompt_tokens, completion_tokens, cached_prompt_tokens, compute_s
        )


PRICES = ScriptedPrices(prompt_per_1k=0.5, completion_per_1k=1.5)
BASE_PRICES = PriceTable(prompt_per_1k=0.5, completion_per_1k=1.5)


@pytest.fixture(scope="module")
def rigged_engine() -> Iterator[Engine]:
    """One engine with the scripted guard, price table and tenant limits, shared
    by this module's tests (each uses its own tenants)."""
    limits = {
        "slots": TenantLimits(max_concurrent=2),
        "wait": TenantLimits(max_concurrent=2),
        "p": TenantLimits(max_concurrent=3),
        "nan": TenantLimits(max_concurrent=1),
        "once": TenantLimits(max_concurrent=16),
    }
    eng = Engine.from_pretrained(
        MODEL,
        dtype="float32",
        seed=0,
        kv_cache_memory="64MiB",
        guards=[ScriptedGuard()],
        prices=PRICES,
        limits=limits,
    )
    yield eng
    eng.close()


@pytest.fixture
def rigged(rigged_engine: Engine) -> Iterator[Engine]:
    SCRIPT.clear()
    yield rigged_engine
    SCRIPT.clear()
    assert_pool_whole(rigged_engine)


# ------------------------------------------------- I1: validated means it runs
@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30, True, 1.0, "7"])
def test_a_seed_a_generator_cannot_take_is_rejected_at_construction(seed: Any) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(seed=seed)
    assert info.value.field == "seed" and isinstance(info.value, ValueError)


def test_seeds_at_both_ends_of_the_range_run(engine: Engine) -> None:
    for seed in (-(2**63), 2**64 - 1):
        p = SamplingParams(max_tokens=3, temperature=1.0, seed=seed, ignore_eos=True)
        first = engine.generate("Seeds at the edge", p)[0].token_ids
        assert engine.generate("Seeds at the edge", p)[0].token_ids == first
        assert len(first) == 3


def test_a_stop_id_outside_the_vocabulary_is_rejected_at_submit(engine: Engine) -> None:
    vocab = engine.vocab_size
    assert vocab == 49152
    bad = SamplingParams(max_tokens=4, min_tokens=1, stop_token_ids=(vocab,))
    by = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = engine.generate("A request already in flight", by)[0].token_ids
    stream = engine.stream("A request already in flight", by)
    first = next(stream)
    for submit in (
        lambda: engine.generate("Hello", bad),
        lambda: engine.stream("Hello", bad),
        lambda: engine.generate(["Hello", "Hi"], [SHORT, bad]),
    ):
        with pytest.raises(
            InvalidRequestError, match=rf"{vocab}.*0\.\.{vocab - 1}"
        ) as info:
            submit()
        assert info.value.field == "stop_token_ids"
    outs = engine.generate(["Hello", "Hi"], [SHORT, bad], return_exceptions=True)
    assert isinstance(outs[0], Completion) and isinstance(outs[1], InvalidRequestError)
    rest = list(stream)
    assert first.token_ids + [t for d in rest for t in d.token_ids] == expected
    assert rest[-1].finish_reason == "length"
    # the vocabulary's last id is a stop id like any other
    last = SamplingParams(max_tokens=2, min_tokens=1, stop_token_ids=(vocab - 1,))
    assert engine.generate("Hello", last)[0].finish_reason in ("stop", "length")


# -------------------------------------- I2: a fault fails only its own request
def test_an_output_guard_that_crashes_fails_only_its_request(rigged: Engine) -> None:
    # The guard raises (injected) for one answer and blocks another.
    prompts = ["The capital of France is", "Water boils at", "Once upon a time",
               "The largest planet is"]  # fmt: skip
    solo = [rigged.generate(p, GREEDY)[0] for p in prompts]
    assert len({s.text for s in solo}) == len(solo)
    SCRIPT.output_faults = {solo[1].text: "raise", solo[3].text: "block"}
    before = rigged.metrics().requests
    outs = within(
        CALL_TIMEOUT, rigged.generate, prompts, GREEDY, return_exceptions=True
    )
    assert isinstance(outs[1], RequestFailedError)
    assert "injected guard fault" in str(outs[1])
    assert outs[1].request_id is not None
    assert isinstance(outs[3], GuardBlockedError) and outs[3].guard == "scripted"
    assert [outs[0].token_ids, outs[2].token_ids] == [
        solo[0].token_ids,
        solo[2].token_ids,
    ]
    assert [outs[0].text, outs[2].text] == [solo[0].text, solo[2].text]
    assert requests_delta(rigged, before) == {
        "submitted": 4, "completed": 2, "aborted": 0, "errored": 2}  # fmt: skip
    # Without return_exceptions the first failure is raised once all finished.
    with pytest.raises(RequestFailedError, match="injected guard fault"):
        within(CALL_TIMEOUT, rigged.generate, prompts, GREEDY)
    # Streamed: its tokens arrive, then the error; no final delta.
    deltas, error = within(CALL_TIMEOUT, drain, rigged.stream(prompts[1], GREEDY))
    assert isinstance(error, RequestFailedError)
    assert_one_end(deltas, error)
    deltas, error = within(CALL_TIMEOUT, drain, rigged.stream(prompts[0], GREEDY))
    assert error is None and "".join(d.text for d in deltas) == solo[0].text
    assert_one_end(deltas, error)


def test_a_price_table_that_crashes_fails_only_its_request(rigged: Engine) -> None:
    # The price table raises (injected) for prompts of one length: at the
    # admission estimate (which only budgets use) and when the request ends.
    poison = [rigged.tokenizer.encode(" quartz")[0]] * 17
    good = ["Rivers flow to", "The moon is"]
    assert all(len(rigged.tokenizer.encode(p)) != 17 for p in good)
    solo = [rigged.generate(p, GREEDY)[0] for p in good]
    SCRIPT.price_faults = {17: "raise"}
    outs = within(CALL_TIMEOUT, rigged.generate, [good[0], poison, good[1]], GREEDY,
                  tenant="p", return_exceptions=True)  # fmt: skip
    assert isinstance(outs[1], RequestFailedError)
    assert "injected price table fault" in str(outs[1])
    for out, ref in zip([outs[0], outs[2]], solo):
        assert out.token_ids == ref.token_ids
        u = out.usage
        assert u.cost == pytest.approx(
            BASE_PRICES.cost(u.prompt_tokens, u.completion_tokens)
        )
    assert in_flight(rigged, "p") == 0
    with pytest.raises(RequestFailedError, match="injected price table fault"):
        within(CALL_TIMEOUT, rigged.generate, poison, GREEDY, tenant="p")
    deltas, error = within(
        CALL_TIMEOUT, drain, rigged.stream(poison, GREEDY, tenant="p")
    )
    assert isinstance(error, RequestFailedError)
    assert_one_end(deltas, error)
    # Every slot came back: three at once still run.
    outs = within(CALL_TIMEOUT, rigged.generate, ["a", "b", "c"], SHORT, tenant="p")
    assert [o.finish_reason for o in outs] == ["length"] * 3
    assert in_flight(rigged, "p") == 0


def test_a_price_table_returning_nan_keeps_no_slot(rigged: Engine) -> None:
    poison = [rigged.tokenizer.encode(" quartz")[0]] * 19
    SCRIPT.price_faults = {19: "nan"}
    out = within(CALL_TIMEOUT, rigged.generate, poison, SHORT, tenant="nan",
                 return_exceptions=True)[0]  # fmt: skip
    assert isinstance(out, RequestFailedError) or math.isfinite(out.usage.cost)
    assert in_flight(rigged, "nan") == 0
    assert within(CALL_TIMEOUT, rigged.generate, "again", SHORT, tenant="nan")


def test_a_price_estimate_of_nan_fails_nothing(rigged: Engine) -> None:
    poison = [rigged.tokenizer.encode(" quartz")[0]] * 21
    SCRIPT.price_faults = {21: "nan-estimate"}
    outs = within(CALL_TIMEOUT, rigged.generate, ["fine", poison], SHORT, tenant="p",
                  return_exceptions=True)  # fmt: skip
    assert [type(o) for o in outs] == [Completion, Completion]


def test_a_sampler_fault_fails_only_its_request(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sampler raises (injected) whenever it samples for the poisoned request;
    # the step is rerun request by request, so only that one fails. The seeded
    # bystander draws exactly what it draws alone (its generator is rewound).
    seeded = SamplingParams(max_tokens=6, temperature=0.9, seed=7, ignore_eos=True)
    bad = SamplingParams(max_tokens=6, temperature=0.9, seed=1, ignore_eos=True,
                         extra={"poison": "sampler"})  # fmt: skip
    prompts = ["The moon is", "A poisoned request", "Seeded words", "Rivers flow to"]
    params = [GREEDY, bad, seeded, GREEDY]
    solo = [engine.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params)
            if sp is not bad]  # fmt: skip
    is_bad = poisoned("sampler")
    faulty = FaultySampler(engine.runner.sampler, lambda rs: any(map(is_bad, rs)))
    monkeypatch.setattr(engine.runner, "sampler", faulty)
    before = engine.metrics().requests
    outs = within(
        CALL_TIMEOUT, engine.generate, prompts, params, return_exceptions=True
    )
    assert faulty.faults >= 1
    assert isinstance(outs[1], RequestFailedError)
    assert "injected sampler fault" in str(outs[1])
    assert [o.token_ids for o in (outs[0], outs[2], outs[3])] == solo
    assert requests_delta(engine, before) == {
        "submitted": 4, "completed": 3, "aborted": 0, "errored": 1}  # fmt: skip
    deltas, error = within(CALL_TIMEOUT, drain, engine.stream("Alone", bad))
    assert isinstance(error, RequestFailedError) and deltas == []


def test_a_transient_sampler_fault_loses_nothing(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sampler raises (injected) once, after drawing, on the first step of
    # more than one row: every request still gets its solo tokens, the seeded
    # ones included (their generators are rewound before the rerun).
    prompts = ["The moon is", "Seeded words", "More seeded words", "Rivers flow to"]
    params = [GREEDY,
              SamplingParams(max_tokens=6, temperature=0.8, seed=11, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=1.2, seed=12, ignore_eos=True),
              GREEDY]  # fmt: skip
    solo = [engine.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params)]
    fired = threading.Event()

    def once(requests: list[Request]) -> bool:
        if len(requests) > 1 and not fired.is_set():
            fired.set()
            return True
        return False

    faulty = FaultySampler(engine.runner.sampler, once)
    monkeypatch.setattr(engine.runner, "sampler", faulty)
    outs = within(CALL_TIMEOUT, engine.generate, prompts, params)
    assert faulty.faults == 1
    assert [o.token_ids for o in outs] == solo


def test_a_detokenizer_fault_fails_only_its_request(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One request's detokenizer raises (injected) on its third token.
    make_handle = engine.output.make_handle

    def rigged_handle(req: Request, sink: Any, streaming: bool) -> Any:
        h = make_handle(req, sink, streaming)
        if req.params.extra.get("poison") == "detok":
            h.detok = ExplodingDetokenizer(h.detok, after=2)  # type: ignore[assignment]
        return h

    monkeypatch.setattr(engine.output, "make_handle", rigged_handle)
    bad = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                         extra={"poison": "detok"})  # fmt: skip
    prompts = ["The moon is", "Broken words", "Rivers flow to"]
    solo = [engine.generate(p, GREEDY)[0].token_ids for p in (prompts[0], prompts[2])]
    outs = within(CALL_TIMEOUT, engine.generate, prompts, [GREEDY, bad, GREEDY],
                  return_exceptions=True)  # fmt: skip
    assert isinstance(outs[1], RequestFailedError)
    assert "injected detokenizer fault" in str(outs[1])
    assert [outs[0].token_ids, outs[2].token_ids] == solo
    deltas, error = within(CALL_TIMEOUT, drain, engine.stream(prompts[1], bad))
    assert isinstance(error, RequestFailedError) and len(deltas) == 2
    assert_one_end(deltas, error)


def test_a_prompt_guard_that_crashes_fails_only_its_prompt(rigged: Engine) -> None:
    SCRIPT.prompt_faults = {"Crash the prompt guard": "raise"}
    outs = within(CALL_TIMEOUT, rigged.generate, ["Fine", "Crash the prompt guard"],
                  SHORT, return_exceptions=True)  # fmt: skip
    assert isinstance(outs[0], Completion)
    assert isinstance(outs[1], LLMProdError)
    with pytest.raises(LLMProdError):
        rigged.generate("Crash the prompt guard", SHORT)


def test_a_prompt_redacted_to_nothing_is_rejected(
    rigged: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    SCRIPT.prompt_faults = {"Erase me entirely": ""}
    ids: list[str] = []
    make_handle = rigged.output.make_handle

    def spy(req: Request, sink: Any, streaming: bool) -> Any:
        ids.append(req.request_id)
        return make_handle(req, sink, streaming)

    monkeypatch.setattr(rigged.output, "make_handle", spy)
    try:
        with pytest.raises(InvalidRequestError) as info:
            within(5.0, rigged.generate, "Erase me entirely", SHORT, tenant="slots")
        assert info.value.field == "prompt"
    finally:
        for rid in ids:  # free the engine from a request that would never end
            rigged.abort(rid)
        wait_idle(rigged)


# ----------------------------------------------- I3: every request ends once
def test_every_request_ends_exactly_once_in_a_batch_with_faults(
    rigged: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Faults injected at once: a guard that crashes, a guard that blocks, a price
    # table that crashes, a sampler that crashes; plus bad input, an abandoned
    # stream and an abort by id. The spies only count deliveries.
    good = ["The capital of France is", "Water boils at", "Once upon a time"]
    solo = {p: rigged.generate(p, GREEDY)[0] for p in good}
    guard_crash, guard_block = "My favourite colour is", "The quick brown fox"
    t_crash = rigged.generate(guard_crash, GREEDY)[0].text
    t_block = rigged.generate(guard_block, GREEDY)[0].text
    assert len({t_crash, t_block, *(s.text for s in solo.values())}) == 5
    SCRIPT.output_faults = {t_crash: "raise", t_block: "block"}
    price_poison = [rigged.tokenizer.encode(" quartz")[0]] * 23
    SCRIPT.price_faults = {23: "raise"}
    sampler_bad = SamplingParams(max_tokens=6, temperature=0.7, seed=3, ignore_eos=True,
                                 extra={"poison": "sampler"})  # fmt: skip
    is_bad = poisoned("sampler")
    monkeypatch.setattr(rigged.runner, "sampler", FaultySampler(
        rigged.runner.sampler, lambda rs: any(map(is_bad, rs))))  # fmt: skip
    spy = EndingsSpy(rigged, monkeypatch)
    made, finals = spy.made, spy.finals
    before = rigged.metrics().requests
    seen: dict[str, Any] = {}

    def batch() -> None:
        mixed: Any = [good[0], guard_crash, price_poison, guard_block, None, "Sampled",
                      good[1]]  # fmt: skip
        seen["batch"] = rigged.generate(
            mixed,
            [GREEDY, GREEDY, GREEDY, GREEDY, GREEDY, sampler_bad, GREEDY],
            tenant="once", return_exceptions=True)  # fmt: skip

    def streamed(name: str, prompt: Any, params: SamplingParams) -> None:
        seen[name] = drain(rigged.stream(prompt, params, tenant="once"))

    def abandoned() -> None:
        for _ in rigged.stream("Abandoned after one delta", LONG, tenant="once"):
            break

    def aborted() -> None:
        stream = rigged.stream("Aborted by id", LONG, tenant="once")
        first = next(stream)
        rigged.abort(first.request_id)
        seen["aborted"] = drain(stream)

    jobs = [
        threading.Thread(target=batch),
        threading.Thread(target=streamed, args=("good", good[2], GREEDY)),
        threading.Thread(target=streamed, args=("crash", guard_crash, GREEDY)),
        threading.Thread(target=streamed, args=("sampler", "Sampled", sampler_bad)),
        threading.Thread(target=abandoned),
        threading.Thread(target=aborted),
    ]
    for t in jobs:
        t.start()
    for t in jobs:
        t.join(CALL_TIMEOUT)
        assert not t.is_alive(), "a caller is still blocked"
    wait_idle(rigged)

    outs = seen["batch"]
    assert outs[0].token_ids == solo[good[0]].token_ids
    assert outs[6].token_ids == solo[good[1]].token_ids
    assert isinstance(outs[1], RequestFailedError)
    assert isinstance(outs[2], RequestFailedError)
    assert isinstance(outs[3], GuardBlockedError)
    assert isinstance(outs[4], InvalidRequestError) and outs[4].field == "prompt"
    assert isinstance(outs[5], RequestFailedError)
    deltas, error = seen["good"]
    assert error is None and "".join(d.text for d in deltas) == solo[good[2]].text
    for name in ("good", "crash", "sampler", "aborted"):
        assert_one_end(*seen[name])
    assert isinstance(seen["crash"][1], RequestFailedError)
    assert isinstance(seen["sampler"][1], RequestFailedError)
    assert (
        seen["aborted"][1] is None and seen["aborted"][0][-1].finish_reason == "abort"
    )
    # Every submitted request got exactly one last item, and nothing else did.
    assert len(made) == 11 and len(set(made)) == 11
    assert sorted(finals) == sorted(made)
    assert all(len(items) == 1 for items in finals.values()), finals
    assert requests_delta(rigged, before) == {
        "submitted": 11, "completed": 3, "aborted": 2, "errored": 6}  # fmt: skip
    assert in_flight(rigged, "once") == 0


# ----------------------------------------------- I4: admission never leaks
def test_a_bad_prompt_holds_no_tenant_slot(rigged: Engine) -> None:
    ok_and_none: Any = ["ok", None]
    with pytest.raises(InvalidRequestError, match=r"prompts\[1\]") as info:
        rigged.generate(ok_and_none, SHORT, tenant="slots")
    assert info.value.field == "prompt"
    assert in_flight(rigged, "slots") == 0
    _two_at_once_then_refused(rigged, "slots")
    outs = rigged.generate(ok_and_none, SHORT, tenant="slots",
                           return_exceptions=True)  # fmt: skip
    assert isinstance(outs[0], Completion) and outs[0].finish_reason == "length"
    assert isinstance(outs[1], InvalidRequestError) and outs[1].field == "prompt"
    assert in_flight(rigged, "slots") == 0
    _two_at_once_then_refused(rigged, "slots")


def _two_at_once_then_refused(eng: Engine, tenant: str) -> None:
    """Two streams of the tenant run at once; a third is refused (the limit is
    real, and no slot was held before)."""
    first: Any = eng.stream("one", LONG, tenant=tenant)
    second: Any = eng.stream("two", LONG, tenant=tenant)
    assert next(first).token_ids and next(second).token_ids
    with pytest.raises(RateLimited):
        eng.generate("three", SHORT, tenant=tenant)
    first.close()
    second.close()
    wait_idle(eng)
    assert in_flight(eng, tenant) == 0


def test_a_refused_batch_gives_its_slots_back(rigged: Engine) -> None:
    with pytest.raises(RateLimited) as info:
        rigged.generate(["a", "b", "c"], SHORT, tenant="slots")
    assert info.value.limit == "max_concurrent"
    assert in_flight(rigged, "slots") == 0
    outs = rigged.generate(
        ["a", "b", "c"], SHORT, tenant="slots", return_exceptions=True
    )
    assert [type(o) for o in outs] == [Completion, Completion, RateLimited]
    assert in_flight(rigged, "slots") == 0


def test_a_batch_over_max_concurrent_does_not_wait_on_itself(
    rigged: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A spy on the throttle's wait (no fault): waiting for a slot while the
    # engine holds no request can only be waiting on slots the batch holds.
    throttle: Any = rigged.throttle
    real_wait = throttle._wait

    def watched(seconds: float) -> None:
        if rigged.core.is_idle():
            raise AssertionError("the batch waits for a slot with the engine idle")
        real_wait(seconds)

    monkeypatch.setattr(throttle, "_wait", watched)
    try:
        outs = within(CALL_TIMEOUT, rigged.generate, ["a", "b", "c"], SHORT,
                      tenant="wait", wait_timeout=60.0)  # fmt: skip
    except InvalidRequestError:  # refused at once: a fair answer too
        return
    assert [o.finish_reason for o in outs] == ["length"] * 3
    assert in_flight(rigged, "wait") == 0


# -------------------------------------- B1-B7: strict, typed input errors
@pytest.mark.parametrize(
    ("prompts", "needle"),
    [
        ([[1, 2.0]], r"prompt token 1 is 2\.0"),
        ([[1, True]], r"prompt token 1 is True"),
        ([[1, np.int64(2)]], r"prompt token 1 .*int64"),
        ([[1, None]], r"prompt token 1 is None"),
        ([[1, "2"]], r"prompt token 1 is '2'"),
        ([1, 2.0], "mixes token ids"),
        ([1, None], "mixes token ids"),
        ([np.int64(1)], r"got int64"),
        (["a", 1], "mixes token ids"),
        ([b"abc"], r"got bytes"),
        (b"abc", r"got bytes"),
        ("\ud800", "lone surrogate"),
        ("fine \udfff fine", "lone surrogate"),
        (None, r"got NoneType"),
    ],
    ids=lambda v: repr(v)[:24],
)
def test_a_bad_prompt_is_a_typed_error_naming_the_field(
    engine: Engine, prompts: Any, needle: str
) -> None:
    before = engine.metrics().requests["submitted"]
    with pytest.raises(InvalidRequestError, match=needle) as info:
        engine.generate(prompts, SHORT)
    assert info.value.field == "prompt" and isinstance(info.value, ValueError)
    assert engine.metrics().requests["submitted"] == before


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ([3, 2.0], r"prompts\[1\]: prompt token 1 is 2\.0"),
        (b"x", r"prompts\[1\]: .*got bytes"),
        ("\ud800", r"prompts\[1\]: .*lone surrogate"),
        (None, r"prompts\[1\]: .*got NoneType"),
        ([np.int64(3)], r"prompts\[1\]: prompt token 0 .*int64"),
    ],
    ids=lambda v: repr(v)[:24],
)
def test_a_bad_prompt_in_a_batch_is_named_by_index(
    engine: Engine, bad: Any, needle: str
) -> None:
    with pytest.raises(InvalidRequestError, match=needle) as info:
        engine.generate(["fine", bad, "also fine"], SHORT)
    assert info.value.field == "prompt"


def test_bad_params_and_tenants_are_typed_errors_naming_the_field(
    engine: Engine,
) -> None:
    bad_kwargs: list[tuple[dict[str, Any], str]] = [
        ({"stop": 5}, "stop"),
        ({"stop": ["ok", 5]}, "stop"),
        ({"stop": "\ud800"}, "stop"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"temperature": True}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"max_tokens": 3.0}, "max_tokens"),
        ({"stop_token_ids": [1.0]}, "stop_token_ids"),
        ({"stop_token_ids": [True]}, "stop_token_ids"),
    ]
    for kwargs, field in bad_kwargs:
        with pytest.raises(InvalidRequestError) as info:
            SamplingParams(**kwargs)
        assert info.value.field == field, kwargs
    before = engine.metrics().requests["submitted"]
    calls: list[Any] = [engine.generate, engine.stream]
    bad_params: Any = {"max_tokens": 3}
    for call in calls:
        for tenant in (["x"], "", None, 5):
            with pytest.raises(InvalidRequestError) as info:
                call("hi", SHORT, tenant=tenant)
            assert info.value.field == "tenant", tenant
        with pytest.raises(InvalidRequestError) as info:
            call("hi", bad_params)
        assert info.value.field == "params"
    with pytest.raises(InvalidRequestError) as info:
        engine.generate(["a", "b"], [SHORT, {"max_tokens": 3}])  # type: ignore[list-item]
    assert info.value.field == "params" and "params[1]" in str(info.value)
    assert engine.metrics().requests["submitted"] == before


def test_return_exceptions_puts_each_input_error_in_its_place(engine: Engine) -> None:
    good = ["The sky is", "Rivers flow to"]
    solo = [engine.generate(p, GREEDY)[0].token_ids for p in good]
    before = engine.metrics().requests
    mixed: Any = [good[0], [1, 2.0], "\ud800", b"x", None, [np.int64(5)], good[1]]
    outs = engine.generate(
        mixed,
        GREEDY, return_exceptions=True)  # fmt: skip
    assert [o.token_ids for o in (outs[0], outs[6])] == solo
    for err in outs[1:6]:
        assert isinstance(err, InvalidRequestError) and err.field == "prompt", err
    assert requests_delta(engine, before) == {
        "submitted": 2, "completed": 2, "aborted": 0, "errored": 0}  # fmt: skip


# ------------------------------------------ no garbage from extreme values
def test_temperatures_below_the_floor_sample_greedily(engine: Engine) -> None:
    greedy = engine.generate("The sky is", GREEDY)[0].token_ids
    for t in (1e-46, 5e-324, 1e-6):
        p = SamplingParams(max_tokens=6, temperature=t, ignore_eos=True, seed=3)
        assert p.is_greedy
        assert engine.generate("The sky is", p)[0].token_ids == greedy
    mixed = engine.generate(["The sky is"] * 2, [
        SamplingParams(max_tokens=6, temperature=1e-46, ignore_eos=True),
        SamplingParams(max_tokens=6, temperature=0.9, ignore_eos=True, seed=2)])  # fmt: skip
    assert mixed[0].token_ids == greedy


def test_top_p_and_repetition_penalty_have_bounds(engine: Engine) -> None:
    bounds: list[tuple[dict[str, Any], str]] = [
        ({"top_p": 1e-300}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"repetition_penalty": 1e-300}, "repetition_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": 1e300}, "repetition_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
    ]
    for kwargs, field in bounds:
        with pytest.raises(InvalidRequestError) as info:
            SamplingParams(**kwargs)
        assert info.value.field == field
    greedy = engine.generate("The sky is", GREEDY)[0].token_ids
    smallest = SamplingParams(max_tokens=6, temperature=1.0, top_p=MIN_TOP_P,
                              ignore_eos=True, seed=9)  # fmt: skip
    assert engine.generate("The sky is", smallest)[0].token_ids == greedy
    for pen in (0.01, 100.0):  # the bounds run and give real tokens
        for temp in (0.0, 0.8):
            p = SamplingParams(max_tokens=6, temperature=temp, repetition_penalty=pen,
                               ignore_eos=True, seed=4, logprobs=1)  # fmt: skip
            out = engine.generate("The sky is the sky is", p)[0]
            assert len(out.token_ids) == 6
            assert all(0 <= t < engine.vocab_size for t in out.token_ids)
            assert all(math.isfinite(lp.logprob) for lp in out.logprobs or [])


def test_a_tiny_sampling_temperature_gives_the_greedy_tokens(engine: Engine) -> None:
    ref = engine.generate("Once upon a time", SamplingParams(
        max_tokens=16, temperature=0, ignore_eos=True, logprobs=2))[0]  # fmt: skip
    for seed in range(3):
        p = SamplingParams(max_tokens=16, temperature=1e-4, seed=seed,
                           ignore_eos=True, logprobs=2)  # fmt: skip
        assert not p.is_greedy
        out = engine.generate("Once upon a time", p)[0]
        assert all(0 <= t < engine.vocab_size for t in out.token_ids)
        assert all(math.isfinite(lp.logprob) for lp in out.logprobs or [])
        for i, (a, b) in enumerate(zip(out.token_ids, ref.token_ids)):
            if a != b:  # only a near tie may go either way at T = 1e-4
                top = sorted((ref.logprobs or [])[i].top.values(), reverse=True)
                assert top[0] - top[1] < 2e-3, (i, top)
                break


def test_a_huge_temperature_gives_no_nan_tokens(engine: Engine) -> None:
    try:
        p = SamplingParams(max_tokens=6, min_tokens=4, temperature=1e39, seed=5)
    except InvalidRequestError as exc:
        assert exc.field == "temperature"
        return
    out = engine.generate("The sky is", p)[0]
    assert len(set(out.token_ids[:4])) > 1, out.token_ids  # 4 uniform draws


# ------------------------------------------- I7: output guards on cache hits
def test_output_guards_run_on_cache_hits(make_engine: Any, tmp_path: Any) -> None:
    url = f"diskcache://{tmp_path}/answers"
    plain = make_engine(dtype="float32", seed=0, kv_cache_memory="64MiB", cache=url)
    blocked_prompt, redacted_prompt = "The capital of France is", "Once upon a time"
    a = plain.generate(blocked_prompt, GREEDY)[0]
    b = plain.generate(redacted_prompt, GREEDY)[0]
    word_a = _a_word_only_in(a.text, b.text)
    word_b = _a_word_only_in(b.text, a.text)
    plain.close()  # flushes the stored answers
    guarded = make_engine(dtype="float32", seed=0, kv_cache_memory="64MiB", cache=url,
                          guards=[BlockListGuard([word_a], where=("output",), name="no_a"),
                                  BlockListGuard([word_b], action="redact",
                                                 where=("output",), name="redact_b")])  # fmt: skip
    steps = guarded.metrics().scheduler["steps"]
    with pytest.raises(GuardBlockedError) as info:
        guarded.generate(blocked_prompt, GREEDY)
    assert info.value.guard == "no_a"
    deltas, error = drain(guarded.stream(blocked_prompt, GREEDY))
    assert isinstance(error, GuardBlockedError) and deltas == []
    hit = guarded.generate(redacted_prompt, GREEDY)[0]
    assert hit.cache_hit and hit.token_ids == b.token_ids
    assert word_b not in hit.text and "[BLOCKED]" in hit.text
    assert hit.flags["guards"]["output"]["redact_b"]["counts"]["block_list"] >= 1
    deltas, error = drain(guarded.stream(redacted_prompt, GREEDY))
    assert error is None and "".join(d.text for d in deltas) == hit.text
    assert_one_end(deltas, error)
    assert guarded.metrics().scheduler["steps"] == steps  # all from the cache
    m = guarded.metrics().requests
    assert (m["submitted"], m["completed"], m["errored"]) == (4, 2, 2)


def _a_word_only_in(text: str, other: str) -> str:
    words = [w.strip(".,:;!?\"'") for w in text.split()]
    found = [
        w
        for w in words
        if len(w) >= 3 and w.isalpha() and w.lower() not in other.lower()
    ]
    assert found, (text, other)
    return found[0]


def test_a_fresh_stream_never_delivers_text_a_guard_blocks(rigged: Engine) -> None:
    SCRIPT.output_guards = [BlockListGuard(["Paris"], where=("output",))]
    deltas, error = drain(rigged.stream("The capital of France is", GREEDY))
    assert isinstance(error, GuardBlockedError)
    assert "paris" not in "".join(d.text for d in deltas).lower()


def test_a_guarded_stream_sends_redacted_text_as_it_goes(rigged: Engine) -> None:
    SCRIPT.output_guards = [BlockListGuard(["Paris"], "redact", where=("output",))]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    deltas, error = drain(rigged.stream("The capital of France is", params))
    assert error is None
    final = deltas[-1].completion
    assert final is not None and "[BLOCKED]" in final.text
    assert "".join(d.text for d in deltas) == final.text
    assert all("paris" not in d.text.lower() for d in deltas)
    # Text flows before the end, held back only by the longest word plus one.
    early = [d for d in deltas[:-1] if d.text]
    assert len(early) >= 3
    assert len(deltas[-1].text) <= len("Paris") + 1 + max(
        len(rigged.tokenizer.decode([t])) for t in final.token_ids
    )


def test_a_guard_without_a_holdback_holds_the_stream_to_the_end(
    rigged: Engine,
) -> None:
    SCRIPT.output_faults = {"never matches": "block"}  # the scripted guard: no holdback
    deltas, error = drain(rigged.stream("The capital of France is", GREEDY))
    assert error is None
    assert [d.text for d in deltas[:-1]] == [""] * (len(deltas) - 1)
    assert deltas[-1].text == deltas[-1].completion.text != ""


def test_batches_sharing_a_tenant_slot_limit_do_not_wait_on_each_other(
    rigged: Engine,
) -> None:
    # Two batches of 2 on max_concurrent=2: each may take one slot and then
    # wait for a second; what each holds must run meanwhile.
    results: list[Any] = []

    def call() -> None:
        results.append(
            rigged.generate(["a", "b"], SHORT, tenant="wait", wait_timeout=60.0)
        )

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CALL_TIMEOUT)
    assert not any(t.is_alive() for t in threads)
    assert [[o.finish_reason for o in outs] for outs in results] == [["length"] * 2] * 2
    assert in_flight(rigged, "wait") == 0
