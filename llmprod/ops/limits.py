"""Per-tenant limits: :class:`Throttle` admits a request or refuses it.

A :class:`Throttle` admits a request for a tenant or refuses it with
:class:`~llmprod.errors.RateLimited` and the time after which the same request
would pass. Four limits, each optional, per tenant:

- ``requests_per_second``: a token bucket of requests, refilled continuously at
  that rate, holding at most ``max_request_burst`` (default: one second's worth,
  at least 1).
- ``tokens_per_minute``: a token bucket of LLM tokens, refilled at
  ``tokens_per_minute / 60`` per second, holding at most one minute's worth. A
  request takes its estimate (prompt tokens + ``max_tokens``) at admission; the
  unused part is given back when its :class:`Ticket` is released.
- ``max_concurrent``: requests admitted and not yet released.
- ``budget``: spend, charged at release. Over the throttle's lifetime, or per
  fixed window of ``budget_period_s`` seconds when that is set.

Refusals are all-or-nothing: a refused request takes nothing from any bucket.

``retry_after`` is exact for the two rate limits and for a budget window (the
buckets refill deterministically). For ``max_concurrent`` (and for a budget held
by requests still in flight) it is an estimate: the mean hold time of the tenant's
recent tickets less the age of its oldest ticket in flight, at least
:data:`MIN_RETRY_AFTER_S`; before any ticket was released, the age of the oldest
ticket in flight. A budget spent with no window gives ``retry_after = inf``.

Each tenant's buckets and counters are a :class:`~llmprod.ops.buckets.TenantState`.
The scheduler's fair waiting queue across tenants lives in
:mod:`llmprod.sched.fair_queue` (``FairQueue`` is still importable from here).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmprod.errors import InvalidRequestError, RateLimited
from llmprod.ops.buckets import (
    LIMIT_NAMES,
    MIN_RETRY_AFTER_S,
    TenantState,
    TenantUsage,
)
from llmprod.ops.checks import is_int, is_number

if TYPE_CHECKING:
    from llmprod.sched.fair_queue import FairQueue

__all__ = [
    "LIMIT_NAMES",
    "MIN_RETRY_AFTER_S",
    "UNLIMITED",
    "FairQueue",
    "TenantLimits",
    "TenantUsage",
    "Throttle",
    "Ticket",
]


# ---------------------------------------------------------------------- limits
@dataclass(frozen=True, slots=True)
class TenantLimits:
    """Limits of one tenant. ``None`` means no limit of that kind."""

    requests_per_second: float | None = None
    """Sustained request rate (> 0)."""
    tokens_per_minute: int | None = None
    """Prompt + ``max_tokens`` per minute (>= 1); unused tokens are given back."""
    max_concurrent: int | None = None
    """Requests in flight at once (>= 1)."""
    budget: float | None = None
    """Most spend (>= 0), in the currency of the engine's price table."""
    max_request_burst: int | None = None
    """Requests allowed at once after a quiet spell; default
    ``max(1, ceil(requests_per_second))``. Needs ``requests_per_second``."""
    budget_period_s: float | None = None
    """When set, the budget applies per fixed window of this many seconds (counted
    from the tenant's first request); otherwise over the throttle's lifetime."""

    def __post_init__(self) -> None:
        rps = self.requests_per_second
        if rps is not None and not (is_number(rps) and 0 < rps < math.inf):
            raise ValueError(f"requests_per_second={rps!r} must be a finite number > 0")
        tpm = self.tokens_per_minute
        if tpm is not None and not (is_int(tpm) and tpm >= 1):
            raise ValueError(f"tokens_per_minute={tpm!r} must be an int >= 1")
        mc = self.max_concurrent
        if mc is not None and not (is_int(mc) and mc >= 1):
            raise ValueError(f"max_concurrent={mc!r} must be an int >= 1")
        b = self.budget
        if b is not None and not (is_number(b) and 0 <= b < math.inf):
            raise ValueError(f"budget={b!r} must be a finite number >= 0")
        burst = self.max_request_burst
        if burst is not None:
            if not (is_int(burst) and burst >= 1):
                raise ValueError(f"max_request_burst={burst!r} must be an int >= 1")
            if rps is None:
                raise ValueError(
                    f"max_request_burst={burst} needs requests_per_second (it is None)"
                )
        p = self.budget_period_s
        if p is not None:
            if not (is_number(p) and 0 < p < math.inf):
                raise ValueError(f"budget_period_s={p!r} must be a finite number > 0")
            if b is None:
                raise ValueError(f"budget_period_s={p} needs a budget (it is None)")

    @property
    def request_burst(self) -> float:
        """Capacity of the request bucket (``inf`` without a request rate)."""
        if self.requests_per_second is None:
            return math.inf
        if self.max_request_burst is not None:
            return float(self.max_request_burst)
        return float(max(1, math.ceil(self.requests_per_second)))


UNLIMITED = TenantLimits()
"""No limit of any kind."""


# ---------------------------------------------------------------------- tickets
class Ticket:
    """An admitted request. Release it exactly when the request ends (any way).

    Attributes:
        tenant: who was admitted.
        tokens: the tokens taken from the tenant's per-minute bucket.
        estimated_cost: the spend held against the budget until release.
        admitted_at: the throttle clock's time of admission.
    """

    __slots__ = (
        "_released",
        "_serial",
        "_throttle",
        "admitted_at",
        "estimated_cost",
        "tenant",
        "tokens",
    )

    def __init__(
        self,
        throttle: Throttle,
        tenant: str,
        tokens: int,
        estimated_cost: float,
        admitted_at: float,
        serial: int,
    ) -> None:
        self._throttle = throttle
        self._serial = serial
        self._released = False
        self.tenant = tenant
        self.tokens = tokens
        self.estimated_cost = estimated_cost
        self.admitted_at = admitted_at

    @property
    def is_released(self) -> bool:
        """True once :meth:`release` has run."""
        return self._released

    def release(self, tokens_used: int, cost: float = 0.0) -> None:
        """Give back the concurrency slot and the unused tokens; charge the spend.

        A second call does nothing.

        Args:
            tokens_used: tokens the request really took (prompt + generated; 0
                for a response-cache hit). More than :attr:`tokens` is charged
                too: the bucket goes below zero and refills from there.
            cost: what the request cost (charged to the budget).

        Raises:
            ValueError: a negative ``tokens_used`` or ``cost``.
        """
        if not (is_int(tokens_used) and tokens_used >= 0):
            raise ValueError(f"tokens_used={tokens_used!r} must be an int >= 0")
        if not (is_number(cost) and 0 <= cost < math.inf):
            raise ValueError(f"cost={cost!r} must be a finite number >= 0")
        self._throttle._release(self, tokens_used, float(cost))

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"Ticket(tenant={self.tenant!r}, tokens={self.tokens}, {state})"


# ---------------------------------------------------------------------- throttle
class Throttle:
    """Per-tenant rate, concurrency and spend limits. Thread-safe.

    Each tenant has its own buckets and counters: a tenant without an entry in
    ``limits`` gets ``default`` (its own copy of the limits, not a shared pool),
    or no limit at all when ``default`` is ``None``.

    >>> limits = {"a": TenantLimits(requests_per_second=2)}
    >>> throttle = Throttle(limits, clock=lambda: 0.0)
    >>> first, second = throttle.admit("a", 10), throttle.admit("a", 10)
    >>> try:
    ...     throttle.admit("a", 10)
    ... except RateLimited as exc:
    ...     print(exc.limit, exc.retry_after)
    requests_per_second 0.5

    Args:
        limits: tenant -> limits.
        default: limits of every other tenant (``None``: unlimited).
        clock: monotonic seconds; inject a fake one for deterministic tests.
        sleep: for tests with a fake clock: called with the seconds to wait (and
            no lock held) instead of waiting on a condition variable. A waiting
            caller then wakes only when that time has passed.
    """

    def __init__(
        self,
        limits: Mapping[str, TenantLimits] | None = None,
        default: TenantLimits | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
        max_tenant_states: int = 10_000,
    ) -> None:
        if not isinstance(max_tenant_states, int) or max_tenant_states < 1:
            raise ValueError(f"{max_tenant_states=} must be an int >= 1")
        self.max_tenant_states = max_tenant_states
        """Past this many tenants, those whose state is as good as new are
        forgotten (a caller sending random tenant names cannot grow it)."""
        self._limits: dict[str, TenantLimits] = dict(limits or {})
        for tenant, lim in self._limits.items():
            if not isinstance(lim, TenantLimits):
                raise ValueError(
                    f"limits[{tenant!r}] must be TenantLimits, got {type(lim).__name__}"
                )
        if default is not None and not isinstance(default, TenantLimits):
            raise ValueError(
                f"default must be TenantLimits, got {type(default).__name__}"
            )
        self._default = default or UNLIMITED
        self._clock = clock
        self._sleep = sleep
        self._cond = threading.Condition(threading.Lock())
        self._tenants: dict[str, TenantState] = {}
        self._serials = itertools.count()

    # -- configuration -----------------------------------------------------------
    def limits_for(self, tenant: str) -> TenantLimits:
        """The limits in force for ``tenant``."""
        with self._cond:
            return self._limits.get(tenant, self._default)

    def set_limits(self, tenant: str, limits: TenantLimits | None) -> None:
        """Change a tenant's limits (``None``: back to the default). Usage so far is
        kept; buckets keep their level, capped at the new capacity."""
        with self._cond:
            if limits is None:
                self._limits.pop(tenant, None)
            else:
                self._limits[tenant] = limits
            st = self._tenants.get(tenant)
            if st is not None:
                st.set_limits(self._limits.get(tenant, self._default), self._clock())
            self._cond.notify_all()

    # -- admission ---------------------------------------------------------------
    def admit(
        self,
        tenant: str,
        tokens: int,
        wait_timeout: float | None = None,
        *,
        estimated_cost: float = 0.0,
        count_refusal: bool = True,
    ) -> Ticket:
        """Admit one request of ``tenant`` or refuse it.

        Args:
            tenant: who asks.
            tokens: the request's token estimate: prompt tokens + ``max_tokens``.
            wait_timeout: ``None`` refuses at once; otherwise wait (sleeping, other
                threads go on) up to this many seconds for the limits to allow
                the request, then refuse. A refusal that waiting cannot cure
                (``retry_after`` longer than the time left) comes at once.
            estimated_cost: spend held against the budget while the request is in
                flight (e.g. the price of prompt + ``max_tokens``), so that
                concurrent requests cannot overrun the budget by more than their
                estimates understate.
            count_refusal: count a refusal in ``snapshot()["rejected"]``; False
                for a try the caller follows with a waiting one.

        Returns:
            A :class:`Ticket`; release it when the request ends.

        Raises:
            RateLimited: over a limit (``limit`` names it; ``retry_after`` is
                the wait after which the same request would pass, see the module
                docstring).
            InvalidRequestError: ``tokens`` exceeds the tenant's whole per-minute
                allowance, so no wait would ever admit it.
            ValueError: a negative ``tokens``, ``wait_timeout`` or
                ``estimated_cost``.
        """
        if not (is_int(tokens) and tokens >= 0):
            raise ValueError(f"tokens={tokens!r} must be an int >= 0")
        if wait_timeout is not None and not (
            is_number(wait_timeout) and wait_timeout >= 0
        ):
            raise ValueError(f"wait_timeout={wait_timeout!r} must be a number >= 0")
        if not (is_number(estimated_cost) and 0 <= estimated_cost < math.inf):
            raise ValueError(f"estimated_cost={estimated_cost!r} must be a number >= 0")
        with self._cond:
            now = self._clock()
            deadline = None if wait_timeout is None else now + wait_timeout
            st = self._state(tenant, now)
            tpm = st.limits.tokens_per_minute
            if tpm is not None and tokens > tpm:
                raise InvalidRequestError(
                    f"the request needs {tokens} tokens (prompt + max_tokens) but "
                    f"tenant {tenant!r} has tokens_per_minute={tpm}",
                    "max_tokens",
                )
            while True:
                st.refill(now)
                refusal = st.refusal(tokens, estimated_cost, now)
                if refusal is None:
                    serial = next(self._serials)
                    st.take(serial, tokens, estimated_cost, now)
                    return Ticket(self, tenant, tokens, estimated_cost, now, serial)
                limit, retry_after, timed = refusal
                left = None if deadline is None else deadline - now
                if left is None or left <= 0 or (timed and retry_after > left):
                    if count_refusal:
                        st.rejected[limit] += 1
                    raise RateLimited(
                        f"tenant {tenant!r} is over its {limit} limit "
                        f"({_describe(st.limits, limit)}); retry after "
                        f"{retry_after:.3f}s",
                        retry_after,
                        tenant,
                        limit,
                    )
                # Timed limits: sleep until they allow it. Event-driven ones
                # (a slot or budget held in flight): wait for a release.
                self._wait(min(retry_after, left) if timed else left)
                now = self._clock()
                st = self._state(tenant, now)

    def _wait(self, seconds: float) -> None:
        seconds = min(max(seconds, 0.0), threading.TIMEOUT_MAX)
        if self._sleep is None:
            self._cond.wait(seconds)
            return
        self._cond.release()
        try:
            self._sleep(seconds)
        finally:
            self._cond.acquire()

    def _release(self, ticket: Ticket, tokens_used: int, cost: float) -> None:
        with self._cond:
            if ticket._released:
                return
            ticket._released = True
            now = self._clock()
            self._state(ticket.tenant, now).give_back(ticket, tokens_used, cost, now)
            self._cond.notify_all()

    def _state(self, tenant: str, now: float) -> TenantState:
        st = self._tenants.get(tenant)
        if st is None:
            if len(self._tenants) >= self.max_tenant_states:
                self._forget_fresh(now)
            lim = self._limits.get(tenant, self._default)
            st = self._tenants[tenant] = TenantState.new(lim, now)
        return st

    def _forget_fresh(self, now: float) -> None:
        """Drop the states a new one would equal (nothing in flight, buckets
        full, no budget spent), down to 90% of the cap: forgetting them changes
        no decision. Explicitly configured tenants are kept."""
        keep = self.max_tenant_states * 9 // 10
        for tenant in list(self._tenants):
            if len(self._tenants) <= keep:
                return
            st = self._tenants[tenant]
            if tenant not in self._limits and st.is_fresh(now):
                del self._tenants[tenant]

    # -- reporting ---------------------------------------------------------------
    def snapshot(self) -> dict[str, TenantUsage]:
        """Usage per tenant seen so far, as plain values.

        Returns:
            tenant -> ``admitted`` (requests let in), ``in_flight``,
            ``tokens_used`` (as released), ``spend`` (lifetime), ``budget_left``
            (``None`` without a budget; per window when windowed) and
            ``rejected`` (limit name -> refusals).
        """
        with self._cond:
            now = self._clock()
            return {tenant: st.usage(now) for tenant, st in self._tenants.items()}


def _describe(lim: TenantLimits, limit: str) -> str:
    if limit == "budget" and lim.budget_period_s is not None:
        return f"budget={lim.budget} per {lim.budget_period_s}s"
    return f"{limit}={getattr(lim, limit)}"


def __getattr__(name: str) -> type[FairQueue]:
    """``FairQueue`` moved to :mod:`llmprod.sched.fair_queue`; still served here
    (imported on first use) for ``from llmprod.throttle import FairQueue``."""
    if name == "FairQueue":
        from llmprod.sched.fair_queue import FairQueue

        return FairQueue
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
