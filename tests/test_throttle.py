"""Throttle: per-tenant rate, concurrency and budget limits.

The tests run on a fake clock: time moves only when a test says so, or when
a waiting caller "sleeps" (the fake sleep advances the clock), so every
``retry_after`` is checked exactly.
"""

from __future__ import annotations

import math
import threading
import time

import pytest

from llmprod import errors
from llmprod.errors import InvalidRequestError, RateLimited
from llmprod.ops import limits
from llmprod.ops.limits import MIN_RETRY_AFTER_S, TenantLimits, Throttle
from llmprod.sched.fair_queue import FairQueue


class FakeClock:
    """Monotonic seconds that move only when told to (or when slept on)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def make_throttle(
    clock: FakeClock, default: TenantLimits | None = None, **limits: TenantLimits
) -> Throttle:
    return Throttle(limits, default, clock=clock, sleep=clock.sleep)


def refused(
    throttle: Throttle, tenant: str, tokens: int = 1, **kw: object
) -> RateLimited:
    with pytest.raises(RateLimited) as info:
        throttle.admit(tenant, tokens, **kw)  # type: ignore[arg-type]
    return info.value


# ---------------------------------------------------------------------- limits
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"requests_per_second": 0}, "requests_per_second"),
        ({"requests_per_second": -1.0}, "requests_per_second"),
        ({"requests_per_second": math.inf}, "requests_per_second"),
        ({"tokens_per_minute": 0}, "tokens_per_minute"),
        ({"tokens_per_minute": 1.5}, "tokens_per_minute"),
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"budget": -0.01}, "budget"),
        ({"budget": math.nan}, "budget"),
        ({"max_request_burst": 2}, "max_request_burst"),  # needs a rate
        ({"budget_period_s": 60.0}, "budget_period_s"),  # needs a budget
    ],
)
def test_bad_limits_raise_naming_the_field(
    kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        TenantLimits(**kwargs)  # type: ignore[arg-type]


def test_rate_limited_alias_is_the_error_class() -> None:
    assert errors.RateLimitedError is RateLimited  # the deprecated name


def test_old_module_path_keeps_its_names() -> None:
    import llmprod.throttle as old  # type: ignore[import-not-found]

    assert old is limits  # through llmprod._compat
    names = ["LIMIT_NAMES", "MIN_RETRY_AFTER_S", "UNLIMITED", "TenantLimits"]
    for name in [*names, "Ticket", "Throttle", "FairQueue"]:
        assert hasattr(old, name), name
    assert old.FairQueue is FairQueue  # served lazily from llmprod.sched
    with pytest.raises(AttributeError):
        old.NoSuchName  # noqa: B018


# ---------------------------------------------------------------------- rates
def test_requests_per_second_refuses_the_right_request_then_recovers() -> None:
    clock = FakeClock()
    th = make_throttle(clock, a=TenantLimits(requests_per_second=2))
    th.admit("a", 1)
    th.admit("a", 1)  # the bucket holds one second's worth: 2
    err = refused(th, "a")  # the 3rd at t=0
    assert (err.limit, err.tenant, err.retry_after) == ("requests_per_second", "a", 0.5)
    assert "requests_per_second=2" in str(err)
    clock.now = 0.49
    assert refused(th, "a").retry_after == pytest.approx(0.01)
    clock.now = 0.5  # exactly retry_after later
    th.admit("a", 1)
    assert refused(th, "a").retry_after == pytest.approx(0.5)
    assert th.snapshot()["a"]["rejected"]["requests_per_second"] == 3
    assert th.snapshot()["a"]["admitted"] == 3


def test_burst_size_is_configurable() -> None:
    clock = FakeClock()
    th = make_throttle(
        clock, a=TenantLimits(requests_per_second=0.5, max_request_burst=3)
    )
    for _ in range(3):
        th.admit("a", 1)
    assert refused(th, "a").retry_after == pytest.approx(2.0)  # one request per 2 s


def test_tokens_per_minute_window() -> None:
    clock = FakeClock()
    th = make_throttle(clock, a=TenantLimits(tokens_per_minute=600))  # 10 tokens/s
    for _ in range(6):
        th.admit("a", 100)  # 6 x 100 = the whole minute's 600
    err = refused(th, "a", 100)  # the 7th
    assert (err.limit, err.retry_after) == ("tokens_per_minute", pytest.approx(10.0))
    clock.now = 9.9
    assert refused(th, "a", 100).retry_after == pytest.approx(0.1)
    th.admit("a", 50)  # 99 tokens are back: a smaller request fits now
    clock.now = 15.0  # 49 + 51 = 100 tokens back
    th.admit("a", 100)


def test_unused_tokens_are_given_back_on_release() -> None:
    clock = FakeClock()
    th = make_throttle(clock, a=TenantLimits(tokens_per_minute=200))
    ticket = th.admit("a", 150)  # 50 left
    assert refused(th, "a", 100).retry_after == pytest.approx(50 * 60 / 200)
    ticket.release(tokens_used=40)  # 110 unused come back: 160
    th.admit("a", 100)
    ticket.release(tokens_used=40)  # idempotent: nothing more comes back
    assert refused(th, "a", 100).limit == "tokens_per_minute"
    assert th.snapshot()["a"]["tokens_used"] == 40


def test_more_tokens_than_a_minute_allows_is_a_bad_request() -> None:
    th = make_throttle(FakeClock(), a=TenantLimits(tokens_per_minute=100))
    with pytest.raises(InvalidRequestError, match="tokens_per_minute=100") as info:
        th.admit("a", 101)
    assert isinstance(info.value, ValueError)


def test_refusals_take_nothing_from_any_bucket() -> None:
    clock = FakeClock()
    limits = TenantLimits(requests_per_second=1, tokens_per_minute=60)
    th = make_throttle(clock, a=limits)
    th.admit("a", 30)
    # refused on both limits; retry_after is the longer wait (30 tokens at 1/s)
    err = refused(th, "a", 60)
    assert (err.limit, err.retry_after) == ("tokens_per_minute", pytest.approx(30.0))
    clock.now = 1.0  # the request bucket is full again and was not charged
    th.admit("a", 1)


# ---------------------------------------------------------------------- concurrency
def test_max_concurrent_and_release() -> None:
    clock = FakeClock()
    th = make_throttle(clock, a=TenantLimits(max_concurrent=2))
    first = th.admit("a", 1)
    th.admit("a", 1)
    clock.now = 3.0
    err = refused(th, "a")
    # no ticket released yet: the estimate is the oldest ticket's age
    assert (err.limit, err.retry_after) == ("max_concurrent", 3.0)
    assert th.snapshot()["a"]["in_flight"] == 2
    first.release(tokens_used=1)
    first.release(tokens_used=1)  # a second release returns no second slot
    th.admit("a", 1)
    assert refused(th, "a").limit == "max_concurrent"


def test_concurrency_retry_after_uses_recent_hold_times() -> None:
    clock = FakeClock()
    th = make_throttle(clock, a=TenantLimits(max_concurrent=2))
    t = th.admit("a", 1)
    clock.now = 2.0
    t.release(tokens_used=1)  # held 2 s
    th.admit("a", 1)
    th.admit("a", 1)
    clock.now = 2.5
    # mean hold 2 s, the oldest in flight has run 0.5 s: about 1.5 s to go
    assert refused(th, "a").retry_after == pytest.approx(1.5)
    clock.now = 10.0  # past the mean: the floor
    assert refused(th, "a").retry_after == MIN_RETRY_AFTER_S


# ---------------------------------------------------------------------- budget
def test_budget_spent_refuses_with_infinite_retry_after() -> None:
    clock = FakeClock()
    th = make_throttle(clock, a=TenantLimits(budget=1.0))
    th.admit("a", 10).release(10, cost=0.6)
    th.admit("a", 10).release(10, cost=0.5)  # 1.1: over, charged in full
    err = refused(th, "a", 10)
    assert (err.limit, err.retry_after) == ("budget", math.inf)
    snap = th.snapshot()["a"]
    assert snap["spend"] == pytest.approx(1.1) and snap["budget_left"] == 0.0
    # waiting cannot help: refused at once, without sleeping
    assert refused(th, "a", 10, wait_timeout=100.0).limit == "budget"
    assert clock.sleeps == []


def test_budget_per_window_comes_back_with_the_next_window() -> None:
    clock = FakeClock()
    th = make_throttle(clock, a=TenantLimits(budget=1.0, budget_period_s=60.0))
    th.admit("a", 1).release(1, cost=1.0)
    clock.now = 45.0
    assert refused(th, "a").retry_after == pytest.approx(15.0)
    clock.now = 60.0
    th.admit("a", 1).release(1, cost=0.25)
    assert th.snapshot()["a"]["budget_left"] == pytest.approx(0.75)
    assert th.snapshot()["a"]["spend"] == pytest.approx(1.25)  # lifetime


def test_estimated_cost_holds_budget_while_in_flight() -> None:
    clock = FakeClock()
    th = make_throttle(clock, a=TenantLimits(budget=1.0))
    first = th.admit("a", 1, estimated_cost=0.4)
    th.admit("a", 1, estimated_cost=0.4)
    assert refused(th, "a", estimated_cost=0.4).limit == "budget"  # 1.2 > 1.0
    first.release(1, cost=0.1)  # 0.1 spent + 0.4 held + 0.4 asked = 0.9
    th.admit("a", 1, estimated_cost=0.4)


# ---------------------------------------------------------------------- tenants
def test_two_tenants_are_independent() -> None:
    clock = FakeClock()
    # "b" has no entry: it gets its own copy of the default, not a shared pool
    th = make_throttle(
        clock,
        TenantLimits(requests_per_second=1),
        a=TenantLimits(requests_per_second=1),
    )
    th.admit("a", 1)
    assert refused(th, "a").tenant == "a"
    th.admit("b", 1)
    th.admit("c", 1)
    assert refused(th, "b").tenant == "b"
    snap = th.snapshot()
    assert {t: s["admitted"] for t, s in snap.items()} == {"a": 1, "b": 1, "c": 1}
    assert snap["a"]["rejected"] == {
        "requests_per_second": 1, "tokens_per_minute": 0, "max_concurrent": 0, "budget": 0,
    }  # fmt: skip


def test_no_default_means_unlimited() -> None:
    th = make_throttle(FakeClock())
    for _ in range(1000):
        th.admit("anyone", 10**6)
    assert th.snapshot()["anyone"]["admitted"] == 1000
    assert th.snapshot()["anyone"]["budget_left"] is None


def test_set_limits_applies_to_the_next_request() -> None:
    clock = FakeClock()
    th = make_throttle(clock)
    th.admit("a", 1)
    th.set_limits("a", TenantLimits(max_concurrent=1))
    assert refused(th, "a").limit == "max_concurrent"  # the first is still in flight
    th.set_limits("a", None)
    th.admit("a", 1)
    assert th.limits_for("a") == TenantLimits()


# ---------------------------------------------------------------------- waiting
def test_waiting_sleeps_exactly_until_the_rate_allows() -> None:
    clock = FakeClock()
    th = make_throttle(clock, a=TenantLimits(requests_per_second=1))
    th.admit("a", 1)
    th.admit("a", 1, wait_timeout=2.0)
    assert clock.sleeps == [pytest.approx(1.0)] and clock.now == pytest.approx(1.0)


def test_waiting_refuses_at_once_when_the_wait_would_be_too_long() -> None:
    clock = FakeClock()
    th = make_throttle(clock, a=TenantLimits(requests_per_second=1))
    th.admit("a", 1)
    err = refused(th, "a", wait_timeout=0.5)
    assert err.retry_after == pytest.approx(1.0) and clock.sleeps == []


def test_waiting_for_a_slot_wakes_on_release() -> None:
    th = Throttle({"a": TenantLimits(max_concurrent=1)})  # real clock and condition
    held = th.admit("a", 1)
    got: list[float] = []

    def waiter() -> None:
        t0 = time.monotonic()
        th.admit("a", 1, wait_timeout=10.0).release(1)
        got.append(time.monotonic() - t0)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.05)
    assert not got  # still waiting for the slot
    held.release(1)
    thread.join(5.0)
    assert got and got[0] < 2.0  # woken by the release, not by the timeout


def test_waiting_for_a_slot_gives_up_at_the_timeout() -> None:
    th = Throttle({"a": TenantLimits(max_concurrent=1)})
    th.admit("a", 1)
    t0 = time.monotonic()
    with pytest.raises(RateLimited) as info:
        th.admit("a", 1, wait_timeout=0.1)
    assert 0.09 <= time.monotonic() - t0 < 2.0
    assert info.value.limit == "max_concurrent"


def test_thread_safe_counts() -> None:
    clock = FakeClock()  # frozen: exactly the burst gets in
    th = make_throttle(clock, a=TenantLimits(requests_per_second=100))
    admitted: list[int] = []
    rejected: list[int] = []

    def worker() -> None:
        for _ in range(50):
            try:
                th.admit("a", 1)
                admitted.append(1)
            except RateLimited:
                rejected.append(1)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(admitted), len(rejected)) == (100, 300)
    snap = th.snapshot()["a"]
    assert snap["admitted"] == 100 and snap["rejected"]["requests_per_second"] == 300


def test_bad_admit_and_release_arguments() -> None:
    th = make_throttle(FakeClock())
    with pytest.raises(ValueError, match="tokens"):
        th.admit("a", -1)
    with pytest.raises(ValueError, match="wait_timeout"):
        th.admit("a", 1, wait_timeout=-1.0)
    ticket = th.admit("a", 1)
    with pytest.raises(ValueError, match="cost"):
        ticket.release(1, cost=-1.0)
    assert not ticket.is_released  # a bad call releases nothing
    ticket.release(1)
    assert ticket.is_released


def test_docstring_examples_run() -> None:
    import doctest

    result = doctest.testmod(limits)
    assert result.attempted > 0 and result.failed == 0


def test_tenant_states_stay_bounded_and_forgetting_changes_no_decision() -> None:
    now = [0.0]
    th = Throttle(
        {"vip": TenantLimits(requests_per_second=1.0)},
        TenantLimits(requests_per_second=1.0, max_request_burst=1),
        clock=lambda: now[0],
        max_tenant_states=10,
    )
    th.admit("busy", 1).release(1)  # its bucket is empty for the next second
    for i in range(50):  # random names, each refilled by the time it is seen again
        th.admit(f"t{i}", 1).release(1)
        now[0] += 2.0 if i % 10 == 9 else 0.0
    assert len(th.snapshot()) <= 10
    # A tenant whose state is not as good as new is never forgotten.
    now[0] += 0.1
    held = th.admit("held", 1)
    for i in range(50, 70):
        th.admit(f"t{i}", 1).release(1)
    assert "held" in th.snapshot() and th.snapshot()["held"]["in_flight"] == 1
    with pytest.raises(RateLimited):
        th.admit("held", 1)  # its empty bucket was kept, not reset
    held.release(1)
