"""What a Router's calls cost, and the counters behind ``Router.stats()``.

Each engine call is priced (the Completion's own cost, else the Router's price
for the engine), and each finished request is counted per engine together with
an estimate of what the most expensive engine alone would have charged for it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmprod.outputs import Completion

if TYPE_CHECKING:
    from llmprod.engine.engine import Engine
    from llmprod.router.escalation import Attempt

__all__ = ["Ledger", "Price", "price_cost"]

Price = Any
"""A price for one engine: an object with ``cost(prompt_tokens=, completion_tokens=)``
(such as ``llmprod.ops.pricing.PriceTable``), a float (per 1K tokens, prompt and
completion alike), or a pair ``(per 1K prompt tokens, per 1K completion tokens)``."""


def price_cost(
    price: Price,
    prompt_tokens: int,
    completion_tokens: int,
    cached_prompt_tokens: int = 0,
) -> float:
    """The cost of a call's tokens at one :data:`Price`.

    Args:
        price: a price object, a float per 1K tokens, or a pair per 1K
            (prompt, completion) tokens.
        prompt_tokens: prompt tokens of the call.
        completion_tokens: generated tokens of the call.
        cached_prompt_tokens: prompt tokens served from the prefix cache (given
            to a price object that takes them).

    Returns:
        The cost, in the price's currency.
    """
    if hasattr(price, "cost"):
        if cached_prompt_tokens:
            try:
                return float(
                    price.cost(
                        prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens,
                        cached_prompt_tokens=cached_prompt_tokens,
                    )
                )
            except TypeError:  # a price object that does not know cached tokens
                pass
        return float(
            price.cost(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        )
    if isinstance(price, (tuple, list)):
        p_in, p_out = price
        return (prompt_tokens * float(p_in) + completion_tokens * float(p_out)) / 1000
    return (prompt_tokens + completion_tokens) * float(price) / 1000


@dataclass(slots=True)
class _RouteStats:
    requests: int = 0
    """Requests this engine answered (its answer was returned)."""
    calls: int = 0
    """Times this engine ran a request (answers kept or escalated)."""
    escalated: int = 0
    """Answers of this engine that were dropped for the next engine's."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0


@dataclass(slots=True)
class _Totals:
    requests: int = 0
    escalations: int = 0
    cost: float = 0.0
    baseline_cost: float = 0.0
    baseline_known: bool = True
    routes: dict[str, _RouteStats] = field(default_factory=dict)


class Ledger:
    """Prices a Router's engine calls and counts its finished requests.

    Thread-safe: counters are updated under a lock.

    Args:
        order: engine names, cheapest first; the last is the baseline.
        prices: the Router's name -> :data:`Price` (read at each call, so
            changes to the mapping count from then on).
        engines: the Router's engines; an engine's own ``config.prices`` prices
            the baseline when ``prices`` has none for it.
    """

    def __init__(
        self,
        order: Sequence[str],
        prices: Mapping[str, Price],
        engines: Mapping[str, Engine],
    ) -> None:
        self.order = order
        self.prices = prices
        self.engines = engines
        self._lock = threading.Lock()
        self._totals = self._new_totals()

    def _new_totals(self) -> _Totals:
        return _Totals(routes={name: _RouteStats() for name in self.order})

    def _price_of(self, route: str) -> Price | None:
        if route in self.prices:
            return self.prices[route]
        config = getattr(self.engines[route], "config", None)
        return getattr(config, "prices", None)

    def call_cost(self, route: str, comp: Completion) -> float:
        """The cost of one engine call: 0 for a response-cache hit, else the
        Completion's ``usage.cost``, else the Router's price for its tokens (0
        without one)."""
        if comp.cache_hit is not None:
            return 0.0
        if comp.usage.cost:
            return float(comp.usage.cost)
        price = self.prices.get(route)
        if price is None:
            return 0.0
        u = comp.usage
        return price_cost(
            price, u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens
        )

    def record(self, attempts: Sequence[Attempt]) -> None:
        """Count one finished request: every engine that ran it, the one whose
        answer was returned (the last attempt), and its baseline cost."""
        final = attempts[-1]
        top = self.order[-1]
        baseline: float | None
        if final.route == top and len(attempts) == 1:
            baseline = final.cost
        else:
            price = self._price_of(top)
            baseline = (
                None
                if price is None
                else price_cost(
                    price,
                    final.completion.usage.prompt_tokens,
                    final.completion.usage.completion_tokens,
                )
            )
        with self._lock:
            t = self._totals
            t.requests += 1
            t.escalations += len(attempts) - 1
            for a in attempts:
                rs = t.routes[a.route]
                rs.calls += 1
                rs.prompt_tokens += a.completion.usage.prompt_tokens
                rs.completion_tokens += a.completion.usage.completion_tokens
                rs.cost += a.cost
                t.cost += a.cost
            for a in attempts[:-1]:
                t.routes[a.route].escalated += 1
            t.routes[final.route].requests += 1
            if baseline is None:
                t.baseline_known = False
            else:
                t.baseline_cost += baseline

    def snapshot(self, policy: str) -> dict[str, Any]:
        """The counters as plain values (the dict ``Router.stats()`` documents).

        Args:
            policy: the policy's description, reported as ``"policy"``.
        """
        with self._lock:
            t = self._totals
            routes = {
                name: {
                    "requests": rs.requests,
                    "calls": rs.calls,
                    "escalated": rs.escalated,
                    "prompt_tokens": rs.prompt_tokens,
                    "completion_tokens": rs.completion_tokens,
                    "cost": rs.cost,
                    "share": rs.requests / t.requests if t.requests else 0.0,
                }
                for name, rs in t.routes.items()
            }
            baseline = t.baseline_cost if t.baseline_known else None
            saved = None if baseline is None else baseline - t.cost
            return {
                "policy": policy,
                "order": list(self.order),
                "requests": t.requests,
                "escalations": t.escalations,
                "routes": routes,
                "cost": t.cost,
                "baseline_engine": self.order[-1],
                "baseline_cost": baseline,
                "cost_saved": saved,
                "cost_saved_fraction": saved / baseline
                if saved is not None and baseline
                else None,
            }

    def reset(self) -> None:
        """Set every counter back to zero."""
        with self._lock:
            self._totals = self._new_totals()
