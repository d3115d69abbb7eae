"""Chaos: a seeded mix of good, bad, aborted and faulty requests from many
threads and three limited tenants, while faults are injected at random into the
model forward, the sampler, an output guard and the price table (RELIABILITY
I2, I3, N1, N2, F7, F8, B7).

No real input makes these parts fail on demand, so the faults are injected: a
request marked in ``SamplingParams.extra`` makes the forward pass or the sampler
raise once it has produced a chosen number of tokens (every time, so only it
fails); with a small seeded probability a step of several requests raises once
(transient: the engine reruns it request by request and nobody fails); the
guard raises or blocks on the exact answers of two prompts; the price table
raises for prompts of two lengths.

At the end: every request ended exactly once with the right kind of end; every
innocent request (greedy, or sampled with a seed) got exactly its solo tokens;
the KV pool is whole; every tenant's throttle holds nothing; the metrics agree
with what the callers saw. ``--chaos-long`` runs ten times as many requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from llmprod import Engine, SamplingParams
from llmprod.errors import (
    GuardBlockedError,
    InvalidRequestError,
    RateLimited,
    RequestFailedError,
)
from llmprod.ops.guards import BlockListGuard, GuardResult
from llmprod.ops.limits import TenantLimits
from llmprod.ops.pricing import PriceTable
from llmprod.outputs import Completion
from llmprod.sched.request import Request
from tests.helpers import (
    EndingsSpy,
    SamplerWithFault,
    assert_pool_whole,
    drain,
    wait_idle,
)

SEED = 20240611
SHORT_RUN, LONG_RUN = 150, 1500
TRANSIENT_RATE = 0.05
"""Chance that a forward pass or a sampler call over several requests raises once."""
CALL_TIMEOUT = 300.0
WORKERS = 8

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
GREEDY_EOS = SamplingParams(max_tokens=5, temperature=0)
LONG = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)


def seeded(seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=4, temperature=0.9, seed=seed, ignore_eos=True)


INNOCENT: list[tuple[str, SamplingParams]] = [
    ("The moon is", GREEDY),
    ("Rivers flow to", GREEDY),
    ("The sky is", GREEDY_EOS),
    ("Once upon a time", GREEDY_EOS),
    ("A small dog", GREEDY),
    ("The moon is", seeded(1)),
    ("Seeded words", seeded(2)),
]
"""(prompt, params) of the innocent requests, whose solo outputs are known."""
GUARD_RAISES, GUARD_BLOCKS = "The quick brown fox", "The largest planet is"
PRICE_RAISES = (29, 31)
"""Prompt lengths the price table raises for."""
TENANTS = {
    "a": TenantLimits(max_concurrent=3),  # callers wait for a slot
    "b": TenantLimits(tokens_per_minute=1_000_000),  # batches
    "c": TenantLimits(requests_per_second=5.0, max_request_burst=3),  # refuses
}
BAD_PROMPTS: list[Any] = [[1, 2.0], "\ud800", b"x", None, [np.int64(1)], [1, True]]


# ---------------------------------------------------------------- the faults
class ChaosGuard:
    """An output guard that raises on one answer and blocks another."""

    name = "chaos"

    def __init__(self) -> None:
        self.raise_on: str | None = None
        self.block_on: str | None = None

    def check(self, text: str, where: str) -> GuardResult:
        if where == "output" and text == self.raise_on:
            raise RuntimeError("injected guard fault")
        if where == "output" and text == self.block_on:
            return GuardResult(text, {"counts": {"chaos": 1}}, blocked=True)
        return GuardResult(text)


class ChaosPrices(PriceTable):
    """A price table that raises for prompts of the lengths in PRICE_RAISES."""

    def cost(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        cached_prompt_tokens: int = 0,
        compute_s: float = 0.0,
    ) -> float:
        if prompt_tokens in PRICE_RAISES:
            raise RuntimeError("injected price table fault")
        return super().cost(
            prompt_tokens, completion_tokens, cached_prompt_tokens, compute_s
        )


class Faults:
    """Faults injected into the engine's model forward and sampler."""

    def __init__(self, eng: Engine, seed: int, rate: float) -> None:
        self.rng = random.Random(seed)  # drawn on the engine's thread only
        self.rate = rate
        self.fired: Counter[str] = Counter()
        self._batch: list[Request] = []
        runner = eng.runner
        execute, forward = runner.execute, runner.model.forward
        sample = runner.sampler

        def execute_spy(out: Any) -> Any:  # remembers whose step the forward runs
            self._batch = [e.request for e in out.scheduled]
            return execute(out)

        def faulty_forward(*args: Any, **kwargs: Any) -> Any:
            self.maybe_raise("forward", self._batch)
            return forward(*args, **kwargs)

        runner.execute = execute_spy  # type: ignore[method-assign]
        runner.model.forward = faulty_forward  # type: ignore[method-assign]
        # It draws first: rewinding the generators matters.
        runner.sampler = SamplerWithFault(  # type: ignore[assignment]
            sample, lambda requests: self.maybe_raise("sampler", requests)
        )

    def maybe_raise(self, where: str, requests: list[Request]) -> None:
        for r in requests:
            mark = r.params.extra.get("chaos")
            if mark == where and r.num_output_tokens >= r.params.extra["at"]:
                self.fired[f"{where}:poison"] += 1
                raise RuntimeError(f"injected {where} fault")
        if len(requests) > 1 and self.rng.random() < self.rate:
            self.fired[f"{where}:transient"] += 1
            raise RuntimeError(f"injected transient {where} fault")


# ---------------------------------------------------------------- the plan
@dataclass
class Item:
    """One request a caller makes, what it expects, and what it got."""

    kind: str
    """innocent, bad, blocked_prompt, forward, sampler, guard_raise,
    guard_block, price, abandon, abort_id, cancel."""
    tenant: str
    prompt: Any = None
    params: SamplingParams | None = None
    key: int | None = None
    """Index into INNOCENT for innocent requests."""
    streamed: bool = False
    expect_field: str = "prompt"
    """For bad input: the field its error must name."""
    got: Any = None
    """A Completion, an exception, (deltas, exception or None) for a stream,
    or "abandoned"."""


@dataclass
class Action:
    """One call: a generate of one or more items, or a stream."""

    how: str  # generate, batch, stream, abandon, abort_id, cancel
    items: list[Item] = field(default_factory=list)


def fault_item(
    rng: random.Random, kind: str, tenant: str, price_ids: list[list[int]]
) -> Item:
    if kind == "forward":
        p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                           extra={"chaos": "forward", "at": rng.randrange(3)})  # fmt: skip
        return Item(kind, tenant, rng.choice(INNOCENT)[0], p)
    if kind == "sampler":
        p = SamplingParams(max_tokens=4, temperature=0.8, seed=rng.randrange(100),
                           ignore_eos=True,
                           extra={"chaos": "sampler", "at": rng.randrange(3)})  # fmt: skip
        return Item(kind, tenant, rng.choice(INNOCENT)[0], p)
    if kind == "guard_raise":
        return Item(kind, tenant, GUARD_RAISES, GREEDY)
    if kind == "guard_block":
        return Item(kind, tenant, GUARD_BLOCKS, GREEDY)
    assert kind == "price"
    return Item(kind, tenant, rng.choice(price_ids), GREEDY)


FAULTS = ("forward", "sampler", "guard_raise", "guard_block", "price")


def make_plan(rng: random.Random, n: int, price_ids: list[list[int]]) -> list[Action]:
    plan: list[Action] = []
    count = 0
    while count < n:
        r = rng.random()
        tenant = rng.choices(["a", "b", "c"], [0.45, 0.3, 0.25])[0]
        if r < 0.12:  # a batch of tenant b, bad and faulty ones mixed in
            items = []
            for _ in range(rng.randint(2, 4)):
                s = rng.random()
                if s < 0.6:
                    k = rng.randrange(len(INNOCENT))
                    items.append(Item("innocent", "b", *INNOCENT[k], key=k))
                elif s < 0.75:
                    items.append(Item("bad", "b", rng.choice(BAD_PROMPTS), GREEDY))
                else:
                    items.append(fault_item(rng, rng.choice(FAULTS), "b", price_ids))
            plan.append(Action("batch", items))
        elif r < 0.45:
            k = rng.randrange(len(INNOCENT))
            item = Item("innocent", tenant, *INNOCENT[k], key=k)
            item.streamed = rng.random() < 0.4
            plan.append(Action("stream" if item.streamed else "generate", [item]))
        elif r < 0.55:
            plan.append(Action("bad", [Item("bad", tenant)]))
        elif r < 0.58:
            item = Item("blocked_prompt", tenant, "this is forbidden", GREEDY)
            plan.append(Action("generate", [item]))
        elif r < 0.66:
            plan.append(
                Action("abandon", [Item("abandon", tenant, "Left behind", LONG)])
            )
        elif r < 0.72:
            plan.append(
                Action("abort_id", [Item("abort_id", tenant, "Cut short", LONG)])
            )
        elif r < 0.76:
            plan.append(Action("cancel", [Item("cancel", tenant, "Cancelled", LONG)]))
        else:
            item = fault_item(rng, rng.choice(FAULTS), tenant, price_ids)
            item.streamed = rng.random() < 0.4
            plan.append(Action("stream" if item.streamed else "generate", [item]))
        count += len(plan[-1].items)
    return plan


# ---------------------------------------------------------------- the calls
def bad_call(
    eng: Engine, rng: random.Random, tenant: str
) -> tuple[Callable[[], Any], str]:
    """A call with one bad input, and the field its error must name."""
    stop_beyond_vocab = SamplingParams(
        max_tokens=3, min_tokens=1, stop_token_ids=(eng.vocab_size,)
    )
    bad_params: Any = {"max_tokens": 3}
    bad_tenant: Any = ["x"]
    options: list[tuple[Callable[[], Any], str]] = [
        (lambda: eng.generate(rng.choice(BAD_PROMPTS), GREEDY, tenant=tenant), "prompt"),
        (lambda: eng.stream("\ud800", GREEDY, tenant=tenant), "prompt"),
        (lambda: eng.generate("hi", GREEDY, tenant=bad_tenant), "tenant"),
        (lambda: eng.generate("hi", GREEDY, tenant=""), "tenant"),
        (lambda: eng.generate("hi", bad_params, tenant=tenant), "params"),
        (lambda: eng.generate("hi", stop_beyond_vocab, tenant=tenant), "stop_token_ids"),
    ]  # fmt: skip
    return rng.choice(options)


def run_action(eng: Engine, action: Action, rng: random.Random) -> None:
    items = action.items
    first = items[0]
    wait_s = CALL_TIMEOUT if first.tenant == "a" else None
    try:
        if action.how == "bad":
            call, expected_field = bad_call(eng, rng, first.tenant)
            first.expect_field = expected_field
            call()
            first.got = AssertionError("a bad input was accepted")
        elif action.how == "batch":
            outs = eng.generate([i.prompt for i in items], [i.params or GREEDY for i in items],
                                tenant="b", return_exceptions=True)  # type: ignore[misc]  # fmt: skip
            for i, o in zip(items, outs):
                i.got = o
        elif action.how == "generate":
            first.got = eng.generate(first.prompt, first.params, tenant=first.tenant,
                                     wait_timeout=wait_s)[0]  # fmt: skip
        elif action.how == "stream":
            first.got = drain(eng.stream(first.prompt, first.params,
                                         tenant=first.tenant, wait_timeout=wait_s))  # fmt: skip
        elif action.how == "abandon":
            stream: Any = eng.stream(first.prompt, first.params, tenant=first.tenant,
                                     wait_timeout=wait_s)  # fmt: skip
            for _ in range(rng.randint(1, 3)):
                next(stream)
            stream.close()
            first.got = "abandoned"
        elif action.how == "abort_id":
            stream = eng.stream(first.prompt, first.params, tenant=first.tenant,
                                wait_timeout=wait_s)  # fmt: skip
            head = next(stream)
            eng.abort(head.request_id)
            deltas, error = drain(stream)
            first.got = ([head, *deltas], error)
        else:
            assert action.how == "cancel"
            asyncio.run(cancel_astream(eng, first, wait_s))
            first.got = "abandoned"
    except Exception as exc:
        if action.how == "batch":  # a batch with return_exceptions never raises
            for i in items:
                i.got = exc
        else:
            first.got = exc


async def cancel_astream(eng: Engine, item: Item, wait_s: float | None) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in eng.astream(item.prompt, item.params, tenant=item.tenant,
                                   wait_timeout=wait_s):  # fmt: skip
            started.set()

    task = asyncio.create_task(consume())
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():  # refused before it started
        task.result()
        raise AssertionError("the stream ended by itself")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# ---------------------------------------------------------------- the checks
EXPECTED_ERROR = {
    "forward": RequestFailedError,
    "sampler": RequestFailedError,
    "guard_raise": RequestFailedError,
    "price": RequestFailedError,
    "guard_block": GuardBlockedError,
}


def check_item(item: Item, solo: list[Completion]) -> str:
    """Check one request's end; return how it ended as the engine counts it
    ("completed", "aborted", "errored") or "refused" (never submitted)."""
    got, kind = item.got, item.kind
    where = f"{kind} {item.prompt!r} tenant={item.tenant}: got {got!r}"
    if isinstance(got, RateLimited):
        assert item.tenant == "c" and kind not in ("bad", "blocked_prompt"), where
        return "refused"
    if kind == "bad":
        assert isinstance(got, InvalidRequestError), where
        assert got.field == item.expect_field, where
        return "refused"
    if kind == "blocked_prompt":
        assert isinstance(got, GuardBlockedError) and got.field == "prompt", where
        return "refused"
    if kind in ("abandon", "cancel"):
        assert got == "abandoned", where
        return "aborted"
    if kind == "abort_id":
        deltas, error = got
        assert error is None and deltas[-1].finish_reason == "abort", where
        assert [d.finish_reason for d in deltas].count("abort") == 1, where
        return "aborted"
    if kind in EXPECTED_ERROR:
        error = got[1] if item.streamed else got
        assert isinstance(error, EXPECTED_ERROR[kind]), where
        if item.streamed:
            assert all(d.finish_reason is None for d in got[0]), where
        if kind == "guard_block":
            assert isinstance(error, GuardBlockedError), where
            assert error.field == "output", where
        return "errored"
    assert kind == "innocent" and item.key is not None, where
    ref = solo[item.key]
    if item.streamed:
        deltas, error = got
        assert error is None, where
        assert [d.finish_reason is not None for d in deltas].count(True) == 1, where
        assert deltas[-1].finish_reason == ref.finish_reason, where
        assert [t for d in deltas for t in d.token_ids] == ref.token_ids, where
        assert "".join(d.text for d in deltas) == ref.text, where
    else:
        assert isinstance(got, Completion), where
        assert got.token_ids == ref.token_ids and got.text == ref.text, where
        assert got.finish_reason == ref.finish_reason, where
    return "completed"


# ---------------------------------------------------------------- the test
@pytest.fixture
def chaos_size(request: pytest.FixtureRequest) -> int:
    return LONG_RUN if request.config.getoption("--chaos-long") else SHORT_RUN


def test_chaos(
    make_engine: Any, chaos_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = ChaosGuard()
    eng: Engine = make_engine(
        dtype="float32",
        seed=0,
        kv_cache_memory="64MiB",
        limits=TENANTS,
        guards=[guard, BlockListGuard(["forbidden"], where=("prompt",))],
        prices=ChaosPrices(prompt_per_1k=0.5, completion_per_1k=1.5),
    )
    # Solo outputs first, before any fault.
    solo = [eng.generate(p, sp)[0] for p, sp in INNOCENT]
    guard.raise_on = eng.generate(GUARD_RAISES, GREEDY)[0].text
    guard.block_on = eng.generate(GUARD_BLOCKS, GREEDY)[0].text
    texts = {s.text for s in solo}
    assert guard.raise_on not in texts and guard.block_on not in texts
    filler = eng.tokenizer.encode(" quartz")[0]
    price_ids = [[filler] * n for n in PRICE_RAISES]
    assert all(len(eng.tokenizer.encode(p)) not in PRICE_RAISES for p, _ in INNOCENT)

    rng = random.Random(SEED)
    plan = make_plan(rng, chaos_size, price_ids)
    faults = Faults(eng, SEED + 1, TRANSIENT_RATE)
    spy = EndingsSpy(eng, monkeypatch)
    made, finals = spy.made, spy.finals
    before = eng.metrics()
    seeds = [rng.randrange(2**32) for _ in plan]
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="chaos") as pool:
        futures = [pool.submit(run_action, eng, a, random.Random(s))
                   for a, s in zip(plan, seeds)]  # fmt: skip
        done, pending = wait(futures, timeout=CALL_TIMEOUT * 2)
        if pending:
            eng.close()  # unblocks the callers
            pytest.fail(f"{len(pending)} calls still blocked")
        for f in done:
            f.result()
    wait_idle(eng)

    # Every request ended once, the right way; innocents got their solo output.
    ends: Counter[str] = Counter()
    by_tenant: dict[str, Counter[str]] = {t: Counter() for t in TENANTS}
    items = [i for a in plan for i in a.items]
    for item in items:
        end = check_item(item, solo)
        ends[end] += 1
        if item.tenant in by_tenant:
            by_tenant[item.tenant][end] += 1
    assert len(made) == len(set(made))
    assert sorted(finals) == sorted(made)
    assert {len(items) for items in finals.values()} == {1}
    submitted = ends["completed"] + ends["aborted"] + ends["errored"]
    assert len(made) == submitted
    assert ends["errored"] > 0 and ends["aborted"] > 0 and ends["refused"] > 0
    assert faults.fired["forward:transient"] + faults.fired["sampler:transient"] > 0

    # The metrics agree with the callers, overall and per tenant.
    m = eng.metrics()
    got = {k: m.requests[k] - before.requests[k]
           for k in ("submitted", "completed", "aborted", "errored")}  # fmt: skip
    assert got == {"submitted": submitted, "completed": ends["completed"],
                   "aborted": ends["aborted"], "errored": ends["errored"]}  # fmt: skip
    assert m.requests["in_flight"] == 0
    throttle = eng.throttle.snapshot()  # type: ignore[union-attr]
    for t, seen in by_tenant.items():
        row = m.tenants[t]
        n = seen["completed"] + seen["aborted"] + seen["errored"]
        assert (row["submitted"], row["completed"], row["aborted"], row["errored"]) == (
            n, seen["completed"], seen["aborted"], seen["errored"]), t  # fmt: skip
        assert throttle[t]["in_flight"] == 0, (t, throttle[t])
        assert throttle[t]["admitted"] == n, (t, throttle[t])
        assert sum(throttle[t]["rejected"].values()) == seen["refused"] - sum(
            1 for i in items if i.tenant == t and i.kind in ("bad", "blocked_prompt")
        ), (t, throttle[t])
    assert_pool_whole(eng)
