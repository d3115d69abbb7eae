"""Send each request to the cheapest engine that should answer it well.

A :class:`Router` holds several engines, ordered from cheapest to most expensive,
and exposes the Engine's ``generate``, ``chat``, ``stream``, ``agenerate`` and
``astream``. A policy decides where each request goes:

- :class:`ComplexityPolicy` scores the prompt from cheap text features (length in
  tokens, reasoning words, code and math markers, explicit constraints, and
  optionally the MiniLM similarity to a few hard exemplars) and sends high scores
  to the expensive engine, before anything runs.
- :class:`CascadePolicy` answers with the cheapest engine first, with token
  log-probabilities switched on, and escalates to the next engine when the
  answer's confidence (mean token log-probability by default) is below a
  threshold. The escalated answer is returned; both calls are paid for.

``router.stats()`` counts requests, calls, tokens and cost per engine, escalations,
and the cost saved against sending everything to the most expensive engine.

>>> router = Router({"small": small, "large": large},  # doctest: +SKIP
...                 CascadePolicy(min_confidence=-0.8))
>>> router.generate("Why is the sky blue?")[0].flags["route"]  # doctest: +SKIP
{'engine': 'large', 'tried': ['small', 'large'], 'confidence': [...], ...}
"""

from __future__ import annotations

import bisect
import math
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import (
    AsyncIterator,
    Callable,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from llmprod.engine import inputs
from llmprod.engine.inputs import Message, Prompt
from llmprod.errors import InvalidConfigError, InvalidRequestError
from llmprod.outputs import Completion, Delta
from llmprod.sampling_params import SamplingParams

if TYPE_CHECKING:
    import numpy as np

    from llmprod.answers.embeddings import Embedder
    from llmprod.engine.engine import Engine

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

Price = Any
"""A price for one engine: an object with ``cost(prompt_tokens=, completion_tokens=)``
(such as ``llmprod.ops.pricing.PriceTable``), a float (per 1K tokens, prompt and
completion alike), or a pair ``(per 1K prompt tokens, per 1K completion tokens)``."""


# =========================================================================== policies
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


# ---------------------------------------------------------------- complexity policy
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


def _patterns(words: Sequence[str]) -> list[re.Pattern[str]]:
    return [re.compile(rf"(?<![\w-])(?:{w})(?![\w-])", re.IGNORECASE) for w in words]


_REASONING = _patterns(
    [
        r"why",
        r"how (?:does|do|did|would|could|can|should|is|are|might)",
        r"explain\w*",
        r"prove|proof",
        r"deriv\w*",
        r"justif\w*",
        r"compar\w*",
        r"contrast",
        r"analy[sz]\w*",
        r"evaluat\w*",
        r"trade-?offs?",
        r"step[- ]by[- ]step",
        r"show (?:each|every|all|your) (?:steps?|working|work)",
        r"strengths and weaknesses",
        r"reason\w*",
        r"implications?",
        r"critique|critici[sz]e",
        r"argue|argument",
        r"pros and cons",
        r"what would happen",
        r"strateg\w*",
        r"optimi[sz]\w*",
        r"design\w*",
        r"recommend\w*",
        r"assess\w*",
        r"infer\w*",
        r"hypothes\w*",
    ]
)
_CODE = _patterns(
    [
        r"code",
        r"function",
        r"class",
        r"python",
        r"javascript|typescript",
        r"java",
        r"c\+\+|rust|golang",
        r"sql",
        r"quer(?:y|ies)",
        r"regex|regular expression",
        r"algorithm\w*",
        r"implement\w*",
        r"debug\w*",
        r"compil\w*",
        r"recursi\w*",
        r"api",
        r"bash|shell script",
        r"complexity",
        r"data structure",
        r"unit tests?",
    ]
)
_CODE_SYMBOLS = re.compile(r"```|\bdef |\breturn\b|=>|[{};]|\w\(\)|\w+\.\w+\(")
_MATH = _patterns(
    [
        r"equations?",
        r"solve",
        r"integral|integrate",
        r"derivative|differentiate",
        r"probabilit\w*",
        r"prime",
        r"theorem",
        r"matri(?:x|ces)",
        r"sqrt|square root",
        r"calculat\w*",
        r"compute",
        r"how many",
        r"percent\w*|%",
        r"fractions?",
        r"sum of",
        r"average|median",
        r"geometr\w*|triangle|circle|angle|area|perimeter|volume",
        r"algebra\w*|polynomial",
        r"induction",
        r"rate",
    ]
)
_MATH_SYMBOLS = re.compile(r"\d\s*[-+*/^=×÷]\s*\d|[=^∑∫√≤≥]|\b\d+(?:\.\d+)?\s*%")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,:]\d+)?")
_CONSTRAINTS = _patterns(
    [
        r"must",
        r"should",
        r"at least",
        r"at most",
        r"exactly",
        r"without",
        r"only",
        r"no more than",
        r"fewer than",
        r"do not|don't|never",
        r"each|every",
        r"include",
        r"format\w*",
        r"bullet\w*",
        r"json|table|csv",
        r"in \d+ (?:words|sentences|lines|steps|paragraphs)",
        r"both",
        r"while",
        r"unless",
        r"given that|assume|assuming",
    ]
)
_LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.MULTILINE)


def _hits(patterns: Sequence[re.Pattern[str]], text: str) -> int:
    return sum(1 for p in patterns if p.search(text))


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
            if name == "length":
                v = (num_tokens - 16) / 112
            elif name == "reasoning":
                v = _hits(_REASONING, text) / 2
            elif name == "code":
                v = (_hits(_CODE, text) + bool(_CODE_SYMBOLS.search(text))) / 2
            elif name == "math":
                v = (
                    _hits(_MATH, text)
                    + bool(_MATH_SYMBOLS.search(text))
                    + (len(_NUMBER.findall(text)) >= 3)
                ) / 2
            elif name == "constraints":
                v = (_hits(_CONSTRAINTS, text) + len(_LIST_ITEM.findall(text))) / 3
            else:  # similarity
                s = (
                    similarity
                    if similarity is not None
                    else self._similarities([text])[0]
                )
                v = (s - 0.2) / 0.4
            out[name] = min(1.0, max(0.0, v))
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


# ============================================================================ router
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
class _Attempt:
    route: str
    completion: Completion
    confidence: float | None
    cost: float


@dataclass(slots=True)
class _Call:
    """One batch the routing core asks a driver to run on one engine."""

    route: str
    indices: list[int]
    params: list[SamplingParams]


@dataclass(slots=True)
class _Totals:
    requests: int = 0
    escalations: int = 0
    cost: float = 0.0
    baseline_cost: float = 0.0
    baseline_known: bool = True
    routes: dict[str, _RouteStats] = field(default_factory=dict)


def _price_cost(
    price: Price,
    prompt_tokens: int,
    completion_tokens: int,
    cached_prompt_tokens: int = 0,
) -> float:
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


def _conversation_text(messages: Sequence[Message]) -> str:
    users = [str(m.get("content", "")) for m in messages if m.get("role") == "user"]
    if not users:
        users = [str(m.get("content", "")) for m in messages]
    return "\n".join(users)


def _engine_prompt(engine: Engine, prompt: Prompt | Sequence[Message]) -> Prompt:
    """A prompt as ``engine.generate`` takes it (conversations rendered)."""
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
        return engine.render_chat(prompt)  # type: ignore[arg-type]
    return prompt  # type: ignore[return-value]


class Router:
    """Engines of different cost behind the Engine's API, one chosen per request.

    Thread-safe: the counters behind :meth:`stats` are updated under a lock, and
    each engine already accepts calls from many threads.

    Args:
        engines: name -> Engine. The engines stay the caller's; :meth:`close`
            closes them all when asked.
        policy: a :class:`RoutingPolicy` (:class:`ComplexityPolicy`,
            :class:`CascadePolicy`, or your own).
        order: the names from cheapest to most expensive (default: the order of
            ``engines``). The last one is the baseline for "cost saved".
        prices: optional name -> price, used for a call whose Completion carries
            no cost (the engine has no price table) and for the baseline. A price
            is an object with ``cost(prompt_tokens=, completion_tokens=)`` such as
            ``llmprod.ops.pricing.PriceTable``, a float per 1K tokens, or a pair
            ``(per 1K prompt tokens, per 1K completion tokens)``.

    Raises:
        InvalidConfigError: no engines, an ``order`` that is not a permutation of
            the names, or prices for unknown names.
    """

    def __init__(
        self,
        engines: Mapping[str, Engine],
        policy: RoutingPolicy,
        *,
        order: Sequence[str] | None = None,
        prices: Mapping[str, Price] | None = None,
    ) -> None:
        if not engines:
            raise InvalidConfigError("a Router needs at least one engine", "engines")
        self.engines: dict[str, Engine] = dict(engines)
        names = list(self.engines)
        self.order: list[str] = list(order) if order is not None else names
        if sorted(self.order) != sorted(names) or len(set(self.order)) != len(names):
            raise InvalidConfigError(
                f"order={self.order!r} must name each engine once: {sorted(names)}",
                "order",
            )
        self.prices: dict[str, Price] = dict(prices or {})
        unknown = set(self.prices) - set(names)
        if unknown:
            raise InvalidConfigError(
                f"prices for unknown engines {sorted(unknown)}; engines are {names}",
                "prices",
            )
        if not isinstance(policy, RoutingPolicy):
            raise InvalidConfigError(
                f"policy must be a RoutingPolicy, got {type(policy).__name__}", "policy"
            )
        self.policy = policy
        self._lock = threading.Lock()
        self._totals = self._new_totals()

    # ----------------------------------------------------------------- accounting
    @property
    def most_expensive(self) -> str:
        """Name of the last engine in the order (the "always" baseline)."""
        return self.order[-1]

    def _new_totals(self) -> _Totals:
        return _Totals(routes={name: _RouteStats() for name in self.order})

    def _price_of(self, route: str) -> Price | None:
        if route in self.prices:
            return self.prices[route]
        config = getattr(self.engines[route], "config", None)
        return getattr(config, "prices", None)

    def _call_cost(self, route: str, comp: Completion) -> float:
        if comp.cache_hit is not None:
            return 0.0
        if comp.usage.cost:
            return float(comp.usage.cost)
        price = self.prices.get(route)
        if price is None:
            return 0.0
        u = comp.usage
        return _price_cost(
            price, u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens
        )

    def _record(self, attempts: list[_Attempt]) -> None:
        final = attempts[-1]
        top = self.most_expensive
        baseline: float | None
        if final.route == top and len(attempts) == 1:
            baseline = final.cost
        else:
            price = self._price_of(top)
            baseline = (
                None
                if price is None
                else _price_cost(
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

    def stats(self) -> dict[str, Any]:
        """Counters since the Router was built (or :meth:`reset_stats`).

        Returns:
            A dict of plain values:

            - ``requests``: requests answered; ``escalations``: answers dropped
              for a more expensive engine's.
            - ``routes``: per engine ``requests`` (answers returned), ``calls``
              (runs, escalated ones included), ``escalated``, ``prompt_tokens``,
              ``completion_tokens``, ``cost``, ``share`` (of requests answered).
            - ``cost``: everything paid, escalated calls included.
            - ``baseline_cost``: the estimated cost of sending every request to
              the most expensive engine alone: its actual cost where it answered
              first time, else its price for the same prompt tokens and the
              returned answer's completion tokens. None when that engine has no
              known price.
            - ``cost_saved`` = ``baseline_cost - cost`` (negative when
              escalations cost more than they saved) and ``cost_saved_fraction``
              (of the baseline); None when the baseline is unknown or zero.
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
                "policy": self.policy.describe(),
                "order": list(self.order),
                "requests": t.requests,
                "escalations": t.escalations,
                "routes": routes,
                "cost": t.cost,
                "baseline_engine": self.most_expensive,
                "baseline_cost": baseline,
                "cost_saved": saved,
                "cost_saved_fraction": saved / baseline
                if saved is not None and baseline
                else None,
            }

    def reset_stats(self) -> None:
        """Set every counter of :meth:`stats` back to zero."""
        with self._lock:
            self._totals = self._new_totals()

    # ------------------------------------------------------------- routing core
    def _tokenizer(self) -> Any:
        return self.engines[self.order[0]].tokenizer

    def _query_of_prompt(self, prompt: Prompt) -> RouteQuery:
        tok = self._tokenizer()
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty", "prompt")
            return RouteQuery(prompt, len(tok.encode(prompt, add_special_tokens=False)))
        ids = list(prompt)
        return RouteQuery(tok.decode(ids, skip_special_tokens=True), len(ids))

    def _query_of_messages(self, messages: Sequence[Message]) -> RouteQuery:
        inputs.check_messages(messages)
        text = _conversation_text(messages)
        return RouteQuery(
            text, len(self._tokenizer().encode(text, add_special_tokens=False))
        )

    def route(self, prompt: Prompt | Sequence[Message]) -> RoutePlan:
        """The plan the policy makes for one prompt or conversation, without running it.

        Args:
            prompt: a string, token ids, or a conversation.

        Returns:
            The policy's :class:`RoutePlan`.
        """
        return self._plans([self._query_of_any(prompt)])[0]

    def _query_of_any(self, prompt: Prompt | Sequence[Message]) -> RouteQuery:
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            return self._query_of_messages(prompt)  # type: ignore[arg-type]
        return self._query_of_prompt(prompt)  # type: ignore[arg-type]

    def _plans(self, queries: Sequence[RouteQuery]) -> list[RoutePlan]:
        plans = self.policy.plan_batch(queries, self.order)
        for p in plans:
            if not p.routes or any(r not in self.engines for r in p.routes):
                raise InvalidConfigError(
                    f"policy {self.policy.describe()} planned {p.routes!r}; engines "
                    f"are {self.order}",
                    "policy",
                )
        return plans

    def _attempt_params(self, params: SamplingParams, final: bool) -> SamplingParams:
        if not final and self.policy.needs_logprobs and params.logprobs is None:
            return replace(params, logprobs=0)
        return params

    def _finish(
        self,
        attempts: list[_Attempt],
        plan: RoutePlan,
        params: SamplingParams,
    ) -> Completion:
        """Record a finished request and annotate the answer returned."""
        comp = attempts[-1].completion
        if params.logprobs is None:
            comp.logprobs = None
        comp.flags["route"] = {
            "engine": attempts[-1].route,
            "tried": [a.route for a in attempts],
            "confidence": [a.confidence for a in attempts],
            "score": plan.score,
        }
        self._record(attempts)
        return comp

    def _core(
        self, plans: list[RoutePlan], plist: list[SamplingParams]
    ) -> Generator[_Call, list[Any], list[Any]]:
        """Drive a batch through its plans: yields one engine batch at a time and
        receives its results (Completions or exceptions)."""
        n = len(plans)
        results: list[Any] = [None] * n
        step = dict.fromkeys(range(n), 0)
        attempts: list[list[_Attempt]] = [[] for _ in range(n)]
        while step:
            for route in self.order:
                idxs = [i for i, s in step.items() if plans[i].routes[s] == route]
                if not idxs:
                    continue
                finals = [step[i] == len(plans[i].routes) - 1 for i in idxs]
                params = [
                    self._attempt_params(plist[i], f) for i, f in zip(idxs, finals)
                ]
                outs = yield _Call(route, idxs, params)
                for i, final, out in zip(idxs, finals, outs):
                    if isinstance(out, BaseException):
                        results[i] = out
                        del step[i]
                        continue
                    keep, conf = (True, None) if final else self.policy.assess(out)
                    attempts[i].append(
                        _Attempt(route, out, conf, self._call_cost(route, out))
                    )
                    if keep or out.finish_reason == "abort":
                        results[i] = self._finish(attempts[i], plans[i], plist[i])
                        del step[i]
                    else:
                        step[i] += 1
        return results

    def _run_sync(
        self,
        core: Generator[_Call, list[Any], list[Any]],
        prompt_for: Callable[[Engine, int], Prompt],
        **kwargs: Any,
    ) -> list[Any]:
        try:
            call = next(core)
            while True:
                engine = self.engines[call.route]
                prompts = [prompt_for(engine, i) for i in call.indices]
                outs = engine.generate(prompts, call.params, **kwargs)
                call = core.send(outs)
        except StopIteration as stop:
            return list(stop.value)

    async def _run_async(
        self,
        core: Generator[_Call, list[Any], list[Any]],
        prompt_for: Callable[[Engine, int], Prompt],
        **kwargs: Any,
    ) -> list[Any]:
        try:
            call = next(core)
            while True:
                engine = self.engines[call.route]
                prompts = [prompt_for(engine, i) for i in call.indices]
                outs = await engine.agenerate(prompts, call.params, **kwargs)
                call = core.send(outs)
        except StopIteration as stop:
            return list(stop.value)

    # ---------------------------------------------------------------- public API
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        progress: bool = False,
        tenant: str = "default",
        return_exceptions: bool = False,
    ) -> list[Completion]:
        """Like :meth:`Engine.generate`, each prompt answered by the engine the
        policy picks; prompts bound for the same engine run as one batch.

        Each returned Completion has ``flags["route"]``: ``engine`` (who
        answered), ``tried`` (every engine that ran it), ``confidence`` (the
        cascade signal per try, None where not judged) and ``score`` (the
        complexity score, if any).

        Args:
            prompts: a string, token ids, or a list of either. Token ids must
                suit every engine's tokenizer.
            params: one SamplingParams for all, or one per prompt.
            progress: show a progress bar per engine batch.
            tenant: who is asking (passed to the engines).
            return_exceptions: as in :meth:`Engine.generate`.

        Returns:
            One Completion per prompt, in input order.
        """
        batch = inputs.as_prompt_list(prompts)
        plist = inputs.params_list(params, len(batch))
        plans = self._plans([self._query_of_prompt(p) for p in batch])
        return self._run_sync(
            self._core(plans, plist),
            lambda _engine, i: batch[i],
            progress=progress,
            tenant=tenant,
            return_exceptions=return_exceptions,
        )

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        **kwargs: Any,
    ) -> Completion | list[Completion]:
        """Like :meth:`Engine.chat`: one conversation gives a Completion, a list of
        them a list. Each engine renders the messages with its own chat template;
        the policy reads the user turns.

        Args:
            messages: a conversation or a list of conversations.
            params: one SamplingParams for all, or one per conversation.
            **kwargs: ``progress``, ``tenant``, ``return_exceptions``.

        Returns:
            A Completion, or a list of them.
        """
        single = inputs.is_conversation(messages)
        convs: list[Sequence[Message]] = (
            [messages] if single else list(messages)  # type: ignore[list-item, arg-type]
        )
        if not convs:
            raise InvalidRequestError("messages is empty", "messages")
        plist = inputs.params_list(params, len(convs))
        plans = self._plans([self._query_of_messages(c) for c in convs])
        outs = self._run_sync(
            self._core(plans, plist),
            lambda engine, i: engine.render_chat(convs[i]),
            **kwargs,
        )
        return outs[0] if single else outs

    async def agenerate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        tenant: str = "default",
        return_exceptions: bool = False,
    ) -> list[Completion]:
        """Async :meth:`generate` (each engine batch is awaited in turn).

        Args:
            prompts: a string, token ids, or a list of either.
            params: one SamplingParams for all, or one per prompt.
            tenant: who is asking.
            return_exceptions: as in :meth:`Engine.agenerate`.

        Returns:
            One Completion per prompt, in input order.
        """
        batch = inputs.as_prompt_list(prompts)
        plist = inputs.params_list(params, len(batch))
        plans = self._plans([self._query_of_prompt(p) for p in batch])
        return await self._run_async(
            self._core(plans, plist),
            lambda _engine, i: batch[i],
            tenant=tenant,
            return_exceptions=return_exceptions,
        )

    def stream(
        self,
        prompt: Prompt | Sequence[Message],
        params: SamplingParams | None = None,
        *,
        tenant: str = "default",
    ) -> Iterator[Delta]:
        """Like :meth:`Engine.stream`, from the engine the policy picks.

        With a one-engine plan (complexity routing) the engine's stream passes
        through as it is produced. In a cascade, an answer that may still be
        refused cannot be shown early: each try but the last runs to the end
        first; a kept answer then arrives as one final Delta, and an escalated
        request streams live from the engine that answers. The final Delta's
        completion carries ``flags["route"]``; a stream left early is not counted.

        Args:
            prompt: a string, token ids, or a conversation.
            params: sampling parameters.
            tenant: who is asking.

        Returns:
            An iterator of Deltas; exactly one, the last, has ``finish_reason``.
        """
        sp = params or SamplingParams()
        plan = self._plans([self._query_of_any(prompt)])[0]
        if len(plan.routes) == 1:
            inner = self.engines[plan.routes[0]].stream(prompt, sp, tenant=tenant)
            return self._pass_stream(inner, [], plan, sp)
        return self._cascade_stream(prompt, plan, sp, tenant)

    def _pass_stream(
        self,
        inner: Iterator[Delta],
        attempts: list[_Attempt],
        plan: RoutePlan,
        params: SamplingParams,
    ) -> Iterator[Delta]:
        route = plan.routes[-1]
        try:
            for d in inner:
                if d.finish_reason is not None and d.completion is not None:
                    comp = d.completion
                    attempts.append(
                        _Attempt(route, comp, None, self._call_cost(route, comp))
                    )
                    self._finish(attempts, plan, params)
                yield d
        finally:
            close = getattr(inner, "close", None)
            if close is not None:
                close()

    def _one_shot(
        self,
        route: str,
        prompt: Prompt | Sequence[Message],
        params: SamplingParams,
        tenant: str,
    ) -> Completion:
        engine = self.engines[route]
        return engine.generate([_engine_prompt(engine, prompt)], params, tenant=tenant)[
            0
        ]

    def _cascade_stream(
        self,
        prompt: Prompt | Sequence[Message],
        plan: RoutePlan,
        params: SamplingParams,
        tenant: str,
    ) -> Iterator[Delta]:
        attempts: list[_Attempt] = []
        for route in plan.routes[:-1]:
            out = self._one_shot(
                route, prompt, self._attempt_params(params, False), tenant
            )
            keep, conf = self.policy.assess(out)
            attempts.append(_Attempt(route, out, conf, self._call_cost(route, out)))
            if keep or out.finish_reason == "abort":
                comp = self._finish(attempts, plan, params)
                yield Delta(
                    comp.request_id,
                    comp.text,
                    list(comp.token_ids),
                    comp.finish_reason,
                    comp,
                )
                return
        last = plan.routes[-1]
        inner = self.engines[last].stream(prompt, params, tenant=tenant)
        yield from self._pass_stream(inner, attempts, plan, params)

    async def astream(
        self,
        prompt: Prompt | Sequence[Message],
        params: SamplingParams | None = None,
        *,
        tenant: str = "default",
    ) -> AsyncIterator[Delta]:
        """Async :meth:`stream`, with the same cascade behaviour.

        Args:
            prompt: a string, token ids, or a conversation.
            params: sampling parameters.
            tenant: who is asking.

        Yields:
            Deltas; exactly one, the last, has ``finish_reason``.
        """
        sp = params or SamplingParams()
        plan = self._plans([self._query_of_any(prompt)])[0]
        attempts: list[_Attempt] = []
        for route in plan.routes[:-1]:
            engine = self.engines[route]
            outs = await engine.agenerate(
                [_engine_prompt(engine, prompt)],
                self._attempt_params(sp, False),
                tenant=tenant,
            )
            out = outs[0]
            keep, conf = self.policy.assess(out)
            attempts.append(_Attempt(route, out, conf, self._call_cost(route, out)))
            if keep or out.finish_reason == "abort":
                comp = self._finish(attempts, plan, sp)
                yield Delta(
                    comp.request_id,
                    comp.text,
                    list(comp.token_ids),
                    comp.finish_reason,
                    comp,
                )
                return
        last = plan.routes[-1]
        inner = self.engines[last].astream(prompt, sp, tenant=tenant)
        try:
            async for d in inner:
                if d.finish_reason is not None and d.completion is not None:
                    comp = d.completion
                    attempts.append(
                        _Attempt(last, comp, None, self._call_cost(last, comp))
                    )
                    self._finish(attempts, plan, sp)
                yield d
        finally:
            aclose = getattr(inner, "aclose", None)
            if aclose is not None:
                await aclose()

    def close(self) -> None:
        """Close every engine of the Router (each close is idempotent)."""
        for engine in self.engines.values():
            engine.close()

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
