"""Route by a complexity score computed from the prompt alone.

:class:`ComplexityPolicy` combines the text features of
:mod:`llmprod.router.features` (and, when switched on, the MiniLM similarity to a
few hard exemplars) into one score, and picks an engine by thresholds on it.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from llmprod.errors import InvalidConfigError
from llmprod.router.features import similarity_value, text_feature
from llmprod.router.policies import RoutePlan, RouteQuery, RoutingPolicy

if TYPE_CHECKING:
    import numpy as np

    from llmprod.answers.embeddings import Embedder

__all__ = [
    "DEFAULT_FEATURE_WEIGHTS",
    "HARD_EXEMPLARS",
    "SIMILARITY_WEIGHT",
    "ComplexityPolicy",
]

DEFAULT_FEATURE_WEIGHTS: dict[str, float] = {
    "length": 0.4,
    "reasoning": 0.6,
    "code": 0.6,
    "math": 0.5,
    "constraints": 0.5,
}
"""Weights of the features used when none are chosen (each in [0, 1])."""

SIMILARITY_WEIGHT = 0.6
"""Default weight of the ``"similarity"`` feature when it is switched on."""

HARD_EXEMPLARS: tuple[str, ...] = (
    "Prove that the statement holds for every positive integer n by induction.",
    "Implement a thread-safe cache with expiry in Python and explain its complexity.",
    "Analyse the trade-offs between two system designs and recommend one, with reasons.",
    "Solve this multi-step word problem and show each step of the calculation.",
    "Debug this function: find why it returns the wrong result for some inputs.",
    "Write an essay that compares two historical periods and argues which mattered more.",
    "Derive the formula and explain why each step of the derivation is valid.",
    "Plan a schedule that satisfies all of these constraints at the same time.",
)
"""Default exemplars of hard requests for the ``"similarity"`` feature."""


class ComplexityPolicy(RoutingPolicy):
    """Route by a complexity score computed from the prompt alone.

    Each feature gives a value in [0, 1]:

    - ``length``: ``(tokens - 16) / 112``, clipped: 0 up to 16 tokens, 1 from 128.
    - ``reasoning``: distinct reasoning cues (why, how does, explain, prove,
      compare, analyse, trade-off, step by step, design, ...), 2 or more give 1.
    - ``code``: distinct code words (function, Python, SQL, implement, algorithm,
      ...) plus one if code symbols appear (braces, ``def``, backticks), 2 give 1.
    - ``math``: distinct math words (solve, equation, probability, how many, ...),
      plus one if an arithmetic expression or math symbol appears, plus one if
      three or more numbers appear; 2 give 1.
    - ``constraints``: distinct constraint cues (must, at least, exactly, without,
      only, format, in N words, ...) plus list items, 3 or more give 1.
    - ``similarity`` (opt-in): the highest cosine between the prompt's MiniLM
      vector and the hard exemplars, mapped from [0.2, 0.6] onto [0, 1].

    The score combines the features as a noisy OR, so one strong cue can carry
    a prompt over the threshold on its own:
    ``score = 1 - prod(1 - weight_f * value_f)``, in [0, 1).

    A single ``threshold`` sends scores at or above it to the most expensive
    engine and the rest to the cheapest. A list of ascending thresholds, one fewer
    than there are engines, picks ``order[number of thresholds <= score]``.

    Args:
        threshold: one threshold, or one per boundary between engines.
        features: names of the features to use, or a mapping name -> weight.
            Default: the five text features with :data:`DEFAULT_FEATURE_WEIGHTS`,
            plus ``similarity`` when an ``embedder`` or ``hard_exemplars`` is given.
        embedder: the Embedder for ``similarity`` (default: the shared one from
            :func:`llmprod.eval.quality.default_embedder`).
        hard_exemplars: the texts ``similarity`` compares with (default
            :data:`HARD_EXEMPLARS`).

    Raises:
        InvalidConfigError: an unknown feature, a weight outside [0, 1], or
            thresholds out of order.
    """

    FEATURES = ("length", "reasoning", "code", "math", "constraints", "similarity")

    def __init__(
        self,
        threshold: float | Sequence[float] = 0.5,
        features: Sequence[str] | Mapping[str, float] | None = None,
        *,
        embedder: Embedder | None = None,
        hard_exemplars: Sequence[str] | None = None,
    ) -> None:
        if isinstance(threshold, (int, float)):
            self.thresholds: tuple[float, ...] = (float(threshold),)
        else:
            self.thresholds = tuple(float(t) for t in threshold)
        if not self.thresholds or list(self.thresholds) != sorted(self.thresholds):
            raise InvalidConfigError(
                f"threshold={threshold!r}: give one number or an ascending list",
                "threshold",
            )
        if features is None:
            weights = dict(DEFAULT_FEATURE_WEIGHTS)
            if embedder is not None or hard_exemplars is not None:
                weights["similarity"] = SIMILARITY_WEIGHT
        elif isinstance(features, Mapping):
            weights = {str(k): float(v) for k, v in features.items()}
        else:
            weights = {}
            for name in features:
                weights[name] = (
                    SIMILARITY_WEIGHT
                    if name == "similarity"
                    else DEFAULT_FEATURE_WEIGHTS.get(name, 0.5)
                )
        for name, w in weights.items():
            if name not in self.FEATURES:
                raise InvalidConfigError(
                    f"unknown feature {name!r}; choose from {self.FEATURES}", "features"
                )
            if not 0.0 <= w <= 1.0:
                raise InvalidConfigError(
                    f"feature {name!r} has weight {w}; weights must be in [0, 1]",
                    "features",
                )
        self.weights = weights
        self.embedder = embedder
        self.hard_exemplars = tuple(hard_exemplars or HARD_EXEMPLARS)
        self._exemplar_vectors: np.ndarray | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        t = self.thresholds[0] if len(self.thresholds) == 1 else list(self.thresholds)
        return f"ComplexityPolicy(threshold={t}, features={sorted(self.weights)})"

    # ----------------------------------------------------------------- features
    def _embedder(self) -> Embedder:
        if self.embedder is None:
            from llmprod.eval.quality import default_embedder

            self.embedder = default_embedder()
        return self.embedder

    def _similarities(self, texts: Sequence[str]) -> list[float]:
        emb = self._embedder()
        with self._lock:
            if self._exemplar_vectors is None:
                self._exemplar_vectors = emb.embed(list(self.hard_exemplars))
            ex = self._exemplar_vectors
        vectors = emb.embed(list(texts))
        return [float(x) for x in (vectors @ ex.T).max(axis=1)]

    def features(
        self,
        text: str,
        num_tokens: int | None = None,
        *,
        similarity: float | None = None,
    ) -> dict[str, float]:
        """Each enabled feature's value in [0, 1] for one prompt.

        Args:
            text: the prompt text.
            num_tokens: its length in tokens (default: 4/3 tokens per word).
            similarity: a precomputed highest cosine to the hard exemplars (else
                computed here when the feature is on).

        Returns:
            Feature name -> value, for the features this policy uses.
        """
        if num_tokens is None:
            num_tokens = math.ceil(len(text.split()) * 4 / 3)
        out: dict[str, float] = {}
        for name in self.weights:
            if name == "similarity":
                s = (
                    similarity
                    if similarity is not None
                    else self._similarities([text])[0]
                )
                out[name] = similarity_value(s)
            else:
                out[name] = text_feature(name, text, num_tokens)
        return out

    def combine(self, values: Mapping[str, float]) -> float:
        """The noisy-OR score of feature values: ``1 - prod(1 - w * v)``.

        Args:
            values: feature name -> value in [0, 1].

        Returns:
            The score in [0, 1].
        """
        keep = 1.0
        for name, v in values.items():
            keep *= 1.0 - self.weights.get(name, 0.0) * v
        return 1.0 - keep

    def score(self, text: str, num_tokens: int | None = None) -> float:
        """The complexity score of one prompt, in [0, 1].

        Args:
            text: the prompt text.
            num_tokens: its length in tokens (default: 4/3 tokens per word).

        Returns:
            ``1 - prod(1 - weight * value)`` over the enabled features.
        """
        return self.combine(self.features(text, num_tokens))

    # ------------------------------------------------------------------ routing
    def _route_for(self, score: float, order: Sequence[str]) -> str:
        if len(self.thresholds) == 1:
            return order[-1] if score >= self.thresholds[0] else order[0]
        if len(self.thresholds) != len(order) - 1:
            raise InvalidConfigError(
                f"{len(self.thresholds)} thresholds for {len(order)} engines; give "
                "one, or one fewer than the engines",
                "threshold",
            )
        return order[bisect.bisect_right(self.thresholds, score)]

    def plan(self, query: RouteQuery, order: Sequence[str]) -> RoutePlan:
        """Send the request to one engine by its score (see the class doc).

        Args:
            query: the request's text and length.
            order: engine names, cheapest first.

        Returns:
            A one-engine plan carrying the score.
        """
        return self.plan_batch([query], order)[0]

    def plan_batch(
        self, queries: Sequence[RouteQuery], order: Sequence[str]
    ) -> list[RoutePlan]:
        """Score many prompts, embedding them in one batch when ``similarity`` is on.

        Args:
            queries: one per request.
            order: engine names, cheapest first.

        Returns:
            One single-engine plan per query.
        """
        sims: list[float | None] = [None] * len(queries)
        if "similarity" in self.weights and queries:
            sims = list(self._similarities([q.text for q in queries]))
        plans = []
        for q, s in zip(queries, sims):
            score = self.combine(self.features(q.text, q.num_tokens, similarity=s))
            plans.append(RoutePlan((self._route_for(score, order),), score))
        return plans
