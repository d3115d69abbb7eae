"""Routing between engines of different sizes (see ``docs/routing.md``).

- :mod:`~llmprod.router.policies`: how a request is judged (complexity, cascade).
- :mod:`~llmprod.router.router`: the :class:`Router` that applies a policy.
"""

from llmprod.router.router import (
    DEFAULT_FEATURE_WEIGHTS,
    HARD_EXEMPLARS,
    CascadePolicy,
    ComplexityPolicy,
    RoutePlan,
    RouteQuery,
    Router,
    RoutingPolicy,
)

__all__ = [
    "DEFAULT_FEATURE_WEIGHTS",
    "HARD_EXEMPLARS",
    "CascadePolicy",
    "ComplexityPolicy",
    "RoutePlan",
    "RouteQuery",
    "Router",
    "RoutingPolicy",
]
