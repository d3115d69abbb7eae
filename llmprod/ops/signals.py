"""Hallucination and confidence signals for one completion.

Two kinds, both cheap and both heuristics (they flag, they do not prove):

- :func:`logprob_signals`: how sure the model was of the tokens it produced, from
  their log-probabilities (``SamplingParams(logprobs=k)``). Low mean
  log-probability (high perplexity) goes with guessing.
- :func:`grounding`: when the caller gives a context (retrieved documents, the
  source of a summary), how close each output sentence is to its nearest context
  sentence, by the cosine similarity of sentence embeddings. A sentence far from
  every context sentence is "ungrounded".

Both return plain dicts meant for ``Completion.flags`` (e.g. under
``"confidence"`` and ``"grounding"``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from llmprod.outputs import TokenLogprob

LOW_CONFIDENCE_MEAN_LOGPROB = -1.0
"""Default of ``low_confidence_below``: a completion whose mean token log-probability
is below this (perplexity above e = 2.72) is flagged ``low_confidence``. A starting
point, not a calibrated value: calibrate it on your model and prompts."""

UNGROUNDED_BELOW = 0.6
"""Default of ``ungrounded_below``: an output sentence whose best cosine similarity
to a context sentence (all-MiniLM-L6-v2) is below this counts as ungrounded. It
separates the small hand-made set in tests/test_signals.py (supported sentences
scored 0.74 to 0.88, unsupported ones 0.08 to 0.58); calibrate on your data."""


class SupportsEmbed(Protocol):
    """Anything with ``embed(texts) -> array [len(texts), dim]``, such as
    :class:`llmprod.answers.embeddings.Embedder`."""

    def embed(self, texts: list[str]) -> np.ndarray: ...


# ---------------------------------------------------------------------- logprobs
def top_entropy(logprob: TokenLogprob) -> float | None:
    """Entropy (nats) of one position's distribution as far as ``top`` shows it.

    The alternatives in ``top`` (with the sampled token) are kept as they are,
    and the probability mass they leave is taken as one more outcome. Merging
    outcomes never raises entropy, so this is a lower bound of the true entropy.

    Args:
        logprob: a token with its top alternatives.

    Returns:
        The lower bound, or ``None`` when ``top`` is empty.

    >>> t = TokenLogprob(0, math.log(0.5), {0: math.log(0.5), 1: math.log(0.5)})
    >>> round(top_entropy(t), 4) == round(math.log(2), 4)
    True
    """
    if not logprob.top:
        return None
    lps = dict(logprob.top)
    lps.setdefault(logprob.token_id, logprob.logprob)
    probs = [math.exp(v) for v in lps.values() if v > -math.inf]
    rest = max(1.0 - sum(probs), 0.0)
    return -sum(p * math.log(p) for p in [*probs, rest] if p > 0)


def logprob_signals(
    logprobs: Sequence[TokenLogprob | None],
    entropies: Sequence[float] | None = None,
    *,
    low_confidence_below: float = LOW_CONFIDENCE_MEAN_LOGPROB,
) -> dict[str, Any]:
    """Confidence of a completion from its tokens' log-probabilities.

    Args:
        logprobs: one entry per generated token (``Completion.logprobs``);
            ``None`` entries are skipped.
        entropies: per-token entropies of the full distribution (nats), when the
            caller has them. Without them, entropies come from the ``top``
            alternatives where every token has some (:func:`top_entropy`, a lower
            bound), and ``entropy_is_lower_bound`` says so.
        low_confidence_below: the mean log-probability under which
            ``low_confidence`` is True.

    Returns:
        ``num_tokens``; ``mean_logprob``, ``min_logprob``, ``perplexity``
        (``exp(-mean_logprob)``); ``max_entropy`` and ``entropy_is_lower_bound``;
        ``low_confidence`` (``mean_logprob < low_confidence_below``). With no
        tokens the numbers are ``None`` and ``low_confidence`` is False.
    """
    tokens = [t for t in logprobs if t is not None]
    values = [t.logprob for t in tokens]
    max_entropy: float | None = None
    lower_bound = False
    if entropies is not None:
        if len(entropies) != len(tokens):
            raise ValueError(
                f"entropies has {len(entropies)} values for {len(tokens)} tokens"
            )
        max_entropy = max(entropies, default=None)
    elif tokens and all(t.top for t in tokens):
        bounds = [top_entropy(t) for t in tokens]
        max_entropy = max(b for b in bounds if b is not None)
        lower_bound = True
    if not values:
        return {
            "num_tokens": 0,
            "mean_logprob": None,
            "min_logprob": None,
            "perplexity": None,
            "max_entropy": max_entropy,
            "entropy_is_lower_bound": lower_bound,
            "low_confidence": False,
        }
    mean = math.fsum(values) / len(values)
    return {
        "num_tokens": len(values),
        "mean_logprob": mean,
        "min_logprob": min(values),
        "perplexity": math.exp(-mean) if mean > -700 else math.inf,
        "max_entropy": max_entropy,
        "entropy_is_lower_bound": lower_bound,
        "low_confidence": mean < low_confidence_below,
    }


# ---------------------------------------------------------------------- grounding
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    """Split text after ``.``, ``!`` or ``?`` followed by spaces, and at line
    breaks. Pieces without a letter or digit (list bullets, lone punctuation) are
    dropped.

    >>> split_sentences("Paris is in France. It is big!\\n- Lyon too?")
    ['Paris is in France.', 'It is big!', '- Lyon too?']
    """
    pieces = (p.strip() for p in _SENTENCE_END.split(text))
    return [p for p in pieces if any(c.isalnum() for c in p)]


def grounding(
    output: str,
    context: str,
    embedder: SupportsEmbed,
    *,
    ungrounded_below: float = UNGROUNDED_BELOW,
) -> dict[str, Any]:
    """How well each output sentence is supported by the context.

    Each output sentence is scored by its highest cosine similarity to any
    context sentence (embeddings are L2-normalised here, whatever the embedder
    returns).

    Args:
        output: the completion's text.
        context: the text the answer should rest on.
        embedder: an object with ``embed(list[str]) -> np.ndarray [n, dim]``,
            such as :class:`llmprod.answers.embeddings.Embedder`.
        ungrounded_below: the score under which a sentence is ungrounded.

    Returns:
        ``num_sentences``; ``scores`` (one per output sentence, in order);
        ``mean_score`` and ``min_score`` (``None`` without sentences);
        ``ungrounded_sentences`` (how many score below ``ungrounded_below``);
        ``threshold``.

    Raises:
        ValueError: the context holds no sentence.
    """
    context_sents = split_sentences(context)
    if not context_sents:
        raise ValueError("context holds no sentence to ground the output on")
    output_sents = split_sentences(output)
    if not output_sents:
        return {
            "num_sentences": 0,
            "scores": [],
            "mean_score": None,
            "min_score": None,
            "ungrounded_sentences": 0,
            "threshold": ungrounded_below,
        }
    vectors = np.asarray(embedder.embed(output_sents + context_sents), dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] != len(output_sents) + len(context_sents):
        raise ValueError(
            f"embedder returned shape {vectors.shape} for "
            f"{len(output_sents) + len(context_sents)} texts"
        )
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.where(norms > 0, norms, 1.0)
    out_v, ctx_v = vectors[: len(output_sents)], vectors[len(output_sents) :]
    scores = (out_v @ ctx_v.T).max(axis=1)
    return {
        "num_sentences": len(output_sents),
        "scores": [float(s) for s in scores],
        "mean_score": float(scores.mean()),
        "min_score": float(scores.min()),
        "ungrounded_sentences": int((scores < ungrounded_below).sum()),
        "threshold": ungrounded_below,
    }
