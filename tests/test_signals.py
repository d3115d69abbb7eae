"""Confidence signals from log-probabilities, and grounding against a context."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np
import pytest

from llmprod.ops.signals import (
    LOW_CONFIDENCE_MEAN_LOGPROB,
    UNGROUNDED_BELOW,
    grounding,
    logprob_signals,
    split_sentences,
    top_entropy,
)
from llmprod.outputs import TokenLogprob
from llmprod.sampling_params import SamplingParams


def tok(
    logprob: float, top: dict[int, float] | None = None, token_id: int = 0
) -> TokenLogprob:
    return TokenLogprob(token_id, logprob, top or {})


# ---------------------------------------------------------------------- logprobs
def test_mean_min_and_perplexity() -> None:
    s = logprob_signals([tok(-0.1), tok(-0.5), tok(-2.4)])
    assert s["num_tokens"] == 3
    assert s["mean_logprob"] == pytest.approx(-1.0)
    assert s["min_logprob"] == pytest.approx(-2.4)
    assert s["perplexity"] == pytest.approx(math.e)
    assert s["max_entropy"] is None and not s["entropy_is_lower_bound"]


def test_low_confidence_threshold() -> None:
    assert LOW_CONFIDENCE_MEAN_LOGPROB == -1.0
    assert not logprob_signals([tok(-0.9), tok(-1.0)])["low_confidence"]  # mean -0.95
    assert logprob_signals([tok(-1.0), tok(-1.2)])["low_confidence"]  # mean -1.1
    assert logprob_signals([tok(-0.3)], low_confidence_below=-0.2)["low_confidence"]


def test_given_entropies() -> None:
    s = logprob_signals([tok(-0.1), tok(-0.2)], entropies=[0.3, 1.7])
    assert s["max_entropy"] == 1.7 and not s["entropy_is_lower_bound"]
    with pytest.raises(ValueError, match="entropies"):
        logprob_signals([tok(-0.1)], entropies=[0.1, 0.2])


def test_entropy_lower_bound_from_top_alternatives() -> None:
    # two equally likely tokens hold all the mass: exactly ln 2
    half = math.log(0.5)
    even = tok(half, {0: half, 1: half})
    assert top_entropy(even) == pytest.approx(math.log(2))
    # top shows 0.6 and 0.3; the missing 0.1 counts as one outcome
    partial = tok(math.log(0.6), {0: math.log(0.6), 1: math.log(0.3)})
    expected = -(0.6 * math.log(0.6) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1))
    assert top_entropy(partial) == pytest.approx(expected)
    assert top_entropy(tok(-0.1)) is None
    s = logprob_signals([even, partial])
    assert s["max_entropy"] == pytest.approx(expected) and s["entropy_is_lower_bound"]


def test_no_tokens() -> None:
    s = logprob_signals([None])  # e.g. prompt_logprobs' first entry
    assert s["num_tokens"] == 0 and s["mean_logprob"] is None
    assert s["low_confidence"] is False


# ---------------------------------------------------------------------- grounding
class BagOfWords:
    """A deterministic stand-in embedder: word counts over a fixed vocabulary."""

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = {w: i for i, w in enumerate(vocab)}
        self.calls: list[list[str]] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        out = np.zeros((len(texts), len(self.vocab)), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().replace(".", " ").split():
                if w in self.vocab:
                    out[i, self.vocab[w]] += 1
        return out


def test_split_sentences() -> None:
    text = 'He said "stop." Then left!  Why?\n\n- item one\n...'
    assert split_sentences(text) == [
        'He said "stop."',
        "Then left!",
        "Why?",
        "- item one",
    ]
    assert split_sentences("  \n ") == []


def test_grounding_scores_each_sentence_by_its_best_context_match() -> None:
    emb = BagOfWords(["cats", "purr", "dogs", "bark", "fish", "swim"])
    out = grounding(
        "Cats purr. Fish swim. Dogs bark.",
        "Dogs bark. Cats purr.",
        emb,
    )
    assert out["num_sentences"] == 3
    assert out["scores"] == pytest.approx([1.0, 0.0, 1.0])
    assert out["mean_score"] == pytest.approx(2 / 3) and out["min_score"] == 0.0
    assert out["ungrounded_sentences"] == 1 and out["threshold"] == UNGROUNDED_BELOW
    assert emb.calls == [
        ["Cats purr.", "Fish swim.", "Dogs bark.", "Dogs bark.", "Cats purr."]
    ]


def test_grounding_threshold_and_empty_inputs() -> None:
    emb = BagOfWords(["a", "b"])
    assert (
        grounding("a b.", "a.", emb, ungrounded_below=0.8)["ungrounded_sentences"] == 1
    )
    assert (
        grounding("a b.", "a.", emb, ungrounded_below=0.7)["ungrounded_sentences"] == 0
    )
    empty = grounding("", "a.", emb)
    assert empty["num_sentences"] == 0 and empty["mean_score"] is None
    with pytest.raises(ValueError, match="context"):
        grounding("a.", " ", emb)


# -- the real MiniLM: the hand-made set behind UNGROUNDED_BELOW
CONTEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was "
    "designed by the company of Gustave Eiffel and completed in 1889. The tower is "
    "330 metres tall. It was the tallest man-made structure in the world for 41 "
    "years. The Great Barrier Reef lies off the coast of Queensland, Australia. It "
    "is the largest coral reef system on Earth. Photosynthesis converts light energy "
    "into chemical energy stored in glucose. It takes place in the chloroplasts of "
    "plant cells."
)
SUPPORTED = [
    "The Eiffel Tower was finished in 1889.",
    "The tower in Paris is about 330 metres high.",
    "Gustave Eiffel's company designed the tower.",
    "The largest coral reef system is off Queensland.",
    "Plants turn light into chemical energy in their chloroplasts.",
    "For four decades it was the tallest structure built by people.",
    "The Great Barrier Reef is in Australia.",
]
UNSUPPORTED = [  # on-topic inventions and off-topic statements
    "The Eiffel Tower was painted gold in 1950 by the mayor.",
    "The reef is home to a famous submarine museum run by the navy.",
    "Chloroplasts were discovered on Mars in 2010.",
    "Bananas are a good source of potassium.",
    "The stock market crashed in 1929.",
    "Mount Everest is the highest mountain above sea level.",
    "My favourite programming language is Python.",
    "The train to Berlin leaves at noon.",
]


@pytest.fixture(scope="module")
def minilm() -> Iterator[object]:
    from llmprod.answers.embeddings import Embedder, locate_model_dir
    from llmprod.errors import ModelLoadError

    try:
        locate_model_dir()
    except ModelLoadError as exc:
        if os.environ.get("LLMPROD_REQUIRE_SERVICES") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    yield Embedder()


def test_minilm_separates_supported_from_unsupported(minilm: object) -> None:
    good = grounding(" ".join(SUPPORTED), CONTEXT, minilm)  # type: ignore[arg-type]
    bad = grounding(" ".join(UNSUPPORTED), CONTEXT, minilm)  # type: ignore[arg-type]
    assert good["num_sentences"] == len(SUPPORTED)
    assert good["ungrounded_sentences"] == 0
    assert bad["ungrounded_sentences"] == len(UNSUPPORTED)
    # the margin around the threshold (scores measured when it was chosen:
    # supported 0.74..0.88, unsupported 0.08..0.58)
    assert good["min_score"] > UNGROUNDED_BELOW + 0.1
    assert max(bad["scores"]) < UNGROUNDED_BELOW


# -- the real engine: signals from a real completion's logprobs
def test_signals_on_a_real_completion(engine: object) -> None:
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=5)
    (comp,) = engine.generate(["The capital of France is"], params)  # type: ignore[attr-defined]
    s = logprob_signals(comp.logprobs)
    assert s["num_tokens"] == len(comp.token_ids) > 0
    assert s["mean_logprob"] <= 0 and s["min_logprob"] <= s["mean_logprob"]
    assert s["perplexity"] == pytest.approx(math.exp(-s["mean_logprob"]))
    assert s["entropy_is_lower_bound"] and s["max_entropy"] >= 0
    for t in comp.logprobs:  # greedy: each token is the most likely one
        assert t.logprob == pytest.approx(max(t.top.values()), abs=1e-5)
