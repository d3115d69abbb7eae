"""How a request is judged: the policy interface, and the cascade policy.

A :class:`RoutingPolicy` sees a :class:`RouteQuery` (the request's text and length)
before anything runs and answers with a :class:`RoutePlan`: the engines to try in
turn. A cascading policy also judges each answer but the last
(:meth:`RoutingPolicy.assess`); :class:`CascadePolicy` does so on the answer's
token log-probabilities (:func:`mean_logprob`, :func:`min_logprob`). The
complexity policy, which decides from the text alone, is in
:mod:`llmprod.router.complexity`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llmprod.errors import InvalidConfigError
from llmprod.outputs import Completion

__all__ = [
    "SIGNALS",
    "CascadePolicy",
    "RoutePlan",
    "RouteQuery",
    "RoutingPolicy",
    "mean_logprob",
    "min_logprob",
]


@dataclass(frozen=True, slots=True)
class RouteQuery:
    """What a policy sees of one request, before anything runs."""

    text: str
    """The prompt text; for a conversation, its user turns joined by newlines."""
    num_tokens: int
    """Tokens of ``text`` in the cheapest engine's tokenizer."""


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """A policy's decision for one request."""

    routes: tuple[str, ...]
    """Engines to try in turn: each answer but the last may be refused by
    :meth:`RoutingPolicy.assess`; the last one is always kept."""
    score: float | None = None
    """The complexity score behind the decision, when there is one."""


class RoutingPolicy(ABC):
    """Decides which engines answer a request.

    Subclasses implement :meth:`plan`; a cascading policy also overrides
    :meth:`assess` (and sets ``needs_logprobs`` when it reads log-probabilities).
    """

    needs_logprobs: bool = False
    """Ask the engines that may be refused for the sampled tokens' log-probabilities."""

    @abstractmethod
    def plan(self, query: RouteQuery, order: Sequence[str]) -> RoutePlan:
        """Choose the engines to try for one request.

        Args:
            query: the request's text and length.
            order: engine names, cheapest first.

        Returns:
            The plan: one engine, or several to try in turn.
        """

    def plan_batch(
        self, queries: Sequence[RouteQuery], order: Sequence[str]
    ) -> list[RoutePlan]:
        """Plan many requests at once (override to share work between them).

        Args:
            queries: one per request.
            order: engine names, cheapest first.

        Returns:
            One plan per query, in order.
        """
        return [self.plan(q, order) for q in queries]

    def assess(self, completion: Completion) -> tuple[bool, float | None]:
        """Judge an answer from an engine that is not the last of the plan.

        Args:
            completion: that engine's answer.

        Returns:
            ``(keep, confidence)``: keep the answer or go to the next engine, and
            the confidence value the decision was made on (None if none).
        """
        return True, None

    def describe(self) -> str:
        """A one-line description for reports (``repr`` by default)."""
        return repr(self)


# ------------------------------------------------------------------- cascade policy
def mean_logprob(completion: Completion) -> float:
    """Mean log-probability of the generated tokens (``-inf`` when there are none).

    Args:
        completion: an answer generated with ``logprobs`` set.

    Returns:
        The mean over the answer's tokens.
    """
    lps = completion.logprobs or []
    return sum(t.logprob for t in lps) / len(lps) if lps else -math.inf


def min_logprob(completion: Completion) -> float:
    """Lowest log-probability among the generated tokens (``-inf`` when none).

    Args:
        completion: an answer generated with ``logprobs`` set.

    Returns:
        The minimum over the answer's tokens.
    """
    lps = completion.logprobs or []
    return min(t.logprob for t in lps) if lps else -math.inf


SIGNALS: dict[str, Callable[[Completion], float]] = {
    "mean_logprob": mean_logprob,
    "min_logprob": min_logprob,
}
"""Confidence signals :class:`CascadePolicy` accepts by name."""


class CascadePolicy(RoutingPolicy):
    """Answer with the cheapest engine; escalate when its confidence is low.

    Every engine but the last runs with ``logprobs=0`` (switched on for it when
    the caller did not ask; the log-probabilities are then removed from the
    answer the caller gets). An answer whose confidence is below
    ``min_confidence`` is dropped and the request goes to the next engine in the
    order; the last engine's answer is always kept.

    Args:
        min_confidence: the lowest confidence kept, in the signal's units (for
            ``"mean_logprob"`` a log-probability: 0 is certain, -1 means each
            token had about e^-1 = 37% probability on average).
        signal: ``"mean_logprob"``, ``"min_logprob"``, or a function of the
            Completion returning a number (higher = more confident).
        start: the engine to start from (default the cheapest).

    Raises:
        InvalidConfigError: an unknown signal name or a NaN threshold.
    """

    needs_logprobs = True

    def __init__(
        self,
        min_confidence: float,
        signal: str | Callable[[Completion], float] = "mean_logprob",
        *,
        start: str | None = None,
    ) -> None:
        if isinstance(min_confidence, bool) or math.isnan(float(min_confidence)):
            raise InvalidConfigError(
                f"min_confidence={min_confidence!r} must be a number", "min_confidence"
            )
        self.min_confidence = float(min_confidence)
        if isinstance(signal, str):
            if signal not in SIGNALS:
                raise InvalidConfigError(
                    f"unknown signal {signal!r}; choose from {sorted(SIGNALS)} or "
                    "pass a function",
                    "signal",
                )
            self.signal_name = signal
            self.signal: Callable[[Completion], float] = SIGNALS[signal]
        else:
            self.signal_name = getattr(signal, "__name__", "custom")
            self.signal = signal
        self.start = start

    def __repr__(self) -> str:
        return (
            f"CascadePolicy(min_confidence={self.min_confidence}, "
            f"signal={self.signal_name!r})"
        )

    def plan(self, query: RouteQuery, order: Sequence[str]) -> RoutePlan:
        """Try every engine from ``start`` (or the cheapest) to the most expensive.

        Args:
            query: the request (unused: the answer decides).
            order: engine names, cheapest first.

        Returns:
            The cascade of engines.
        """
        i = 0 if self.start is None else list(order).index(self.start)
        return RoutePlan(tuple(order[i:]))

    def assess(self, completion: Completion) -> tuple[bool, float | None]:
        """Keep the answer when its confidence is at least ``min_confidence``.

        Args:
            completion: the answer of an engine that is not the last.

        Returns:
            ``(confidence >= min_confidence, confidence)``.
        """
        conf = float(self.signal(completion))
        return conf >= self.min_confidence, conf
