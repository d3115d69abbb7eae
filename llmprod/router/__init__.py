"""Routing between engines of different sizes (see ``docs/routing.md``).

- :mod:`~llmprod.router.policies`: the policy interface and the cascade policy.
- :mod:`~llmprod.router.complexity`: the complexity policy;
  :mod:`~llmprod.router.features` holds the text features it scores.
- :mod:`~llmprod.router.router`: the :class:`Router` that applies a policy.
- :mod:`~llmprod.router.escalation`: the keep-or-escalate core every Router
  method runs; :mod:`~llmprod.router.accounting`: costs and ``Router.stats()``.
"""

from llmprod.router.accounting import Price
from llmprod.router.complexity import (
    DEFAULT_FEATURE_WEIGHTS,
    HARD_EXEMPLARS,
    SIMILARITY_WEIGHT,
    ComplexityPolicy,
)
from llmprod.router.policies import (
    SIGNALS,
    CascadePolicy,
    RoutePlan,
    RouteQuery,
    RoutingPolicy,
    mean_logprob,
    min_logprob,
)
from llmprod.router.router import Router

__all__ = [
    "DEFAULT_FEATURE_WEIGHTS",
    "HARD_EXEMPLARS",
    "SIGNALS",
    "SIMILARITY_WEIGHT",
    "CascadePolicy",
    "ComplexityPolicy",
    "Price",
    "RoutePlan",
    "RouteQuery",
    "Router",
    "RoutingPolicy",
    "mean_logprob",
    "min_logprob",
]
