"""One tenant's buckets, budget window and counters.

:class:`TenantState` is the per-tenant half of a
:class:`~llmprod.ops.limits.Throttle`, plain bookkeeping on the throttle's clock.
It refills the buckets, decides whether a request passes (and if not, which limit
refuses it and ``retry_after``), takes what an admitted request holds and gives
back what a released one did not use. It holds no lock: the throttle calls it
under its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, TypedDict

if TYPE_CHECKING:
    from llmprod.ops.limits import TenantLimits, Ticket

LIMIT_NAMES = ("requests_per_second", "tokens_per_minute", "max_concurrent", "budget")
"""The limit names a :class:`~llmprod.errors.RateLimited` carries in ``limit``."""

MIN_RETRY_AFTER_S = 0.01
"""Floor of an estimated ``retry_after`` (``max_concurrent``, in-flight budget)."""

_HOLD_EWMA_ALPHA = 0.2
"""Weight of the newest hold time in the running mean behind the estimates."""

_EPS = 1e-9
"""Slack on bucket levels, so float rounding after an exact wait cannot refuse."""


class Refusal(NamedTuple):
    """Why a request does not pass now."""

    limit: str
    """One of :data:`LIMIT_NAMES`."""
    retry_after: float
    """Seconds after which the same request would pass (see
    :mod:`llmprod.ops.limits`)."""
    timed: bool
    """The wait is known (a bucket refills, a window ends); otherwise it lasts
    until a request in flight is released."""


class TenantUsage(TypedDict):
    """One tenant's row of :meth:`~llmprod.ops.limits.Throttle.snapshot`."""

    admitted: int
    """Requests let in."""
    in_flight: int
    """Admitted and not yet released."""
    tokens_used: int
    """Tokens as released."""
    spend: float
    """Lifetime spend."""
    budget_left: float | None
    """``None`` without a budget; per window when windowed."""
    rejected: dict[str, int]
    """Limit name -> refusals."""


@dataclass(slots=True, eq=False)
class TenantState:
    """A tenant's buckets and counters under its current :class:`TenantLimits`."""

    limits: TenantLimits
    created_at: float
    last_refill: float
    request_level: float
    token_level: float
    in_flight: dict[int, float] = field(default_factory=dict)
    """Ticket serial -> admission time, in admission order (a dropped ticket
    still holds its slot: release it)."""
    reserved_cost: float = 0.0
    spend: float = 0.0
    period_index: int = 0
    period_spend: float = 0.0
    hold_mean_s: float | None = None
    num_admitted: int = 0
    num_tokens_used: int = 0
    rejected: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(LIMIT_NAMES, 0)
    )

    @classmethod
    def new(cls, limits: TenantLimits, now: float) -> TenantState:
        """A tenant first seen at ``now``: full buckets, nothing spent."""
        return cls(
            limits=limits,
            created_at=now,
            last_refill=now,
            request_level=limits.request_burst,
            token_level=math.inf
            if limits.tokens_per_minute is None
            else float(limits.tokens_per_minute),
        )

    def set_limits(self, new: TenantLimits, now: float) -> None:
        """Switch to ``new`` limits: usage is kept, buckets keep their level
        (capped at the new capacity; full when the new limits have no rate)."""
        self.refill(now)
        self.limits = new
        self.request_level = min(self.request_level, new.request_burst)
        if new.tokens_per_minute is not None:
            self.token_level = min(self.token_level, float(new.tokens_per_minute))
        else:
            self.token_level = math.inf
        if new.requests_per_second is None:
            self.request_level = math.inf

    def refill(self, now: float) -> None:
        """Bring the buckets and the budget window up to ``now``."""
        dt = max(now - self.last_refill, 0.0)
        self.last_refill = max(now, self.last_refill)
        lim = self.limits
        if lim.requests_per_second is not None:
            self.request_level = min(
                lim.request_burst, self.request_level + dt * lim.requests_per_second
            )
        if lim.tokens_per_minute is not None:
            self.token_level = min(
                float(lim.tokens_per_minute),
                self.token_level + dt * lim.tokens_per_minute / 60.0,
            )
        if lim.budget_period_s is not None:
            index = int((now - self.created_at) // lim.budget_period_s)
            if index != self.period_index:
                self.period_index = index
                self.period_spend = 0.0

    def is_fresh(self, now: float) -> bool:
        """True when this state admits exactly what a new one would: nothing in
        flight or reserved, buckets full, no budget spent."""
        self.refill(now)
        lim = self.limits
        return (
            not self.in_flight
            and self.reserved_cost == 0.0
            and (lim.budget is None or self.budget_spent() == 0.0)
            and self.request_level >= lim.request_burst
            and (
                lim.tokens_per_minute is None
                or self.token_level >= lim.tokens_per_minute
            )
        )

    def budget_spent(self) -> float:
        """Spend counted against the budget: this window's, or the lifetime's."""
        return (
            self.period_spend if self.limits.budget_period_s is not None else self.spend
        )

    def in_flight_retry(self, now: float) -> float:
        """Estimated seconds until one of the tenant's tickets is released."""
        if not self.in_flight:
            return MIN_RETRY_AFTER_S
        oldest_age = now - next(iter(self.in_flight.values()))
        if self.hold_mean_s is None:
            return max(oldest_age, MIN_RETRY_AFTER_S)
        return max(self.hold_mean_s - oldest_age, MIN_RETRY_AFTER_S)

    def refusal(self, tokens: int, estimated_cost: float, now: float) -> Refusal | None:
        """``None`` if the request passes (call :meth:`refill` first); else the
        refusing limit that takes longest to clear."""
        lim = self.limits
        refusals: list[Refusal] = []
        if lim.max_concurrent is not None and len(self.in_flight) >= lim.max_concurrent:
            refusals.append(Refusal("max_concurrent", self.in_flight_retry(now), False))
        if lim.budget is not None:
            spent = self.budget_spent()
            if spent >= lim.budget or spent + estimated_cost > lim.budget:
                if lim.budget_period_s is None or estimated_cost > lim.budget:
                    refusals.append(Refusal("budget", math.inf, True))
                else:
                    end = (
                        self.created_at + (self.period_index + 1) * lim.budget_period_s
                    )
                    refusals.append(Refusal("budget", max(end - now, 0.0), True))
            elif spent + self.reserved_cost + estimated_cost > lim.budget:
                refusals.append(Refusal("budget", self.in_flight_retry(now), False))
        if lim.requests_per_second is not None and self.request_level < 1.0 - _EPS:
            wait = (1.0 - self.request_level) / lim.requests_per_second
            refusals.append(Refusal("requests_per_second", wait, True))
        if lim.tokens_per_minute is not None and self.token_level < tokens - _EPS:
            wait = (tokens - self.token_level) * 60.0 / lim.tokens_per_minute
            refusals.append(Refusal("tokens_per_minute", wait, True))
        if not refusals:
            return None
        return max(refusals, key=lambda r: r.retry_after)

    def take(self, serial: int, tokens: int, estimated_cost: float, now: float) -> None:
        """Admit ticket ``serial``: one request, ``tokens`` and the held cost."""
        if self.limits.requests_per_second is not None:
            self.request_level -= 1.0
        if self.limits.tokens_per_minute is not None:
            self.token_level -= tokens
        self.reserved_cost += estimated_cost
        self.num_admitted += 1
        self.in_flight[serial] = now

    def give_back(
        self, ticket: Ticket, tokens_used: int, cost: float, now: float
    ) -> None:
        """Release ``ticket``: free its slot, return the tokens it took and did
        not use, drop the cost it held, charge ``cost``, and count its hold time
        in the running mean."""
        self.refill(now)
        self.in_flight.pop(ticket._serial, None)
        hold = max(now - ticket.admitted_at, 0.0)
        self.hold_mean_s = (
            hold
            if self.hold_mean_s is None
            else (1 - _HOLD_EWMA_ALPHA) * self.hold_mean_s + _HOLD_EWMA_ALPHA * hold
        )
        if self.limits.tokens_per_minute is not None:
            self.token_level = min(
                float(self.limits.tokens_per_minute),
                self.token_level + ticket.tokens - tokens_used,
            )
        self.reserved_cost = max(self.reserved_cost - ticket.estimated_cost, 0.0)
        self.spend += cost
        self.period_spend += cost
        self.num_tokens_used += tokens_used

    def usage(self, now: float) -> TenantUsage:
        """The tenant's row of the throttle's snapshot, as of ``now``."""
        self.refill(now)
        budget = self.limits.budget
        return {
            "admitted": self.num_admitted,
            "in_flight": len(self.in_flight),
            "tokens_used": self.num_tokens_used,
            "spend": self.spend,
            "budget_left": None
            if budget is None
            else max(budget - self.budget_spent(), 0.0),
            "rejected": dict(self.rejected),
        }
