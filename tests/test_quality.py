"""llmprod.eval.quality: BLEU against scores computed by hand and sacrebleu's
published example, MiniLM similarity, and the engine-vs-engine report on the real
model."""

from __future__ import annotations

import json
import math
import sys

import pytest

from llmprod import Engine, SamplingParams
from llmprod.eval.quality import (
    QUALITY_PIP,
    ComparisonReport,
    bleu,
    compare,
    semantic_similarity,
    sentence_bleu,
)

pytest.importorskip("sacrebleu")

HYPS = [
    "the cat sat on the mat",
    "a quick brown fox jumps over the lazy dog",
    "paris is the capital of france",
]
REFS = [
    "the cat is sitting on the mat",
    "the quick brown fox jumped over the lazy dog",
    "the capital of france is paris",
]


def test_sentence_bleu_by_hand() -> None:
    # hyp "the cat sat on the mat" (6 tokens), ref "the cat sat on the red mat" (7):
    #   1-grams 6/6; 2-grams 4/5 ("the mat" is not in the ref);
    #   3-grams 3/4 ("on the mat" is not); 4-grams 2/3 ("sat on the mat" is not).
    #   No zero count, so smoothing plays no part.
    #   brevity penalty exp(1 - 7/6); BLEU = 100 * exp(-1/6) * (1 * 4/5 * 3/4 * 2/3)^(1/4)
    #   = 100 * 0.846482 * 0.4^(1/4) = 67.3182
    expected = 100 * math.exp(-1 / 6) * (4 / 5 * 3 / 4 * 2 / 3) ** 0.25
    assert expected == pytest.approx(67.3182, abs=1e-4)
    assert sentence_bleu("the cat sat on the mat", "the cat sat on the red mat") == (
        pytest.approx(expected, rel=1e-9)
    )
    # A second reference "a cat sat on the mat" supplies "the mat", "on the mat"
    # and "sat on the mat" (n-gram counts are clipped by the max over references),
    # so every precision is 1; its length 6 is the closest to the hypothesis's,
    # so no brevity penalty: 100, though neither reference equals the hypothesis.
    two_refs = ["the cat sat on the red mat", "a cat sat on the mat"]
    assert sentence_bleu("the cat sat on the mat", two_refs) == pytest.approx(100.0)
    # One of two references alone gives the lower score.
    assert sentence_bleu("the cat sat on the mat", two_refs[:1]) == pytest.approx(
        expected
    )


def test_corpus_bleu_pools_counts_by_hand() -> None:
    # Counts are summed over the pairs before the geometric mean:
    #   pair 1 as above (6/6, 4/5, 3/4, 2/3), pair 2 identical "a b c d" (4/4, 3/3,
    #   2/2, 1/1) -> 10/10, 7/8, 5/6, 3/4; lengths 10 against 11.
    #   BLEU = 100 * exp(1 - 11/10) * (7/8 * 5/6 * 3/4)^(1/4) = 77.8113,
    #   not the mean of the sentence scores (67.32 and 100).
    hyps = ["the cat sat on the mat", "a b c d"]
    refs = ["the cat sat on the red mat", "a b c d"]
    expected = 100 * math.exp(-0.1) * (7 / 8 * 5 / 6 * 3 / 4) ** 0.25
    assert expected == pytest.approx(77.8113, abs=1e-4)
    assert bleu(hyps, refs) == pytest.approx(expected, rel=1e-9)


def test_corpus_bleu_with_two_references_matches_sacrebleus_readme() -> None:
    # The example of sacrebleu's README (github.com/mjpost/sacrebleu), given there
    # as two reference streams; here as two references per hypothesis:
    #   BLEU = 48.53 82.4/50.0/45.5/37.5 (BP = 0.943 ratio = 0.944 hyp_len = 17
    #   ref_len = 18)
    # i.e. matches 14/17, 7/14, 5/11, 3/8 and BP = exp(1 - 18/17):
    #   100 * 0.942873 * (14/17 * 7/14 * 5/11 * 3/8)^(1/4) = 48.5308
    hyps = [
        "The dog bit the man.",
        "It wasn't surprising.",
        "The man had just bitten him.",
    ]
    refs = [
        ["The dog bit the man.", "The dog had bit the man."],
        ["It was not unexpected.", "No one was surprised."],
        ["The man bit him first.", "The man had bitten the dog."],
    ]
    by_hand = 100 * math.exp(1 - 18 / 17) * (14 / 17 * 7 / 14 * 5 / 11 * 3 / 8) ** 0.25
    assert bleu(hyps, refs) == pytest.approx(by_hand, rel=1e-9)
    assert round(bleu(hyps, refs), 2) == 48.53


def test_identical_texts_score_100_and_similarity_one() -> None:
    assert bleu(HYPS, HYPS) == pytest.approx(100.0)
    assert sentence_bleu("short one", "short one") == pytest.approx(100.0)
    sims = semantic_similarity(HYPS, HYPS)
    assert sims == pytest.approx([1.0] * 3, abs=1e-5)


def test_paraphrase_is_more_similar_than_unrelated() -> None:
    anchor = "The meeting was moved to Thursday afternoon."
    paraphrase = "They rescheduled the meeting for Thursday after lunch."
    unrelated = "Penguins are flightless birds of the southern hemisphere."
    para, unrel = semantic_similarity([anchor, anchor], [paraphrase, unrelated])
    assert para > unrel + 0.3
    assert -1.0 <= unrel <= para <= 1.0


def test_mismatched_or_empty_inputs_raise() -> None:
    with pytest.raises(ValueError, match="references has 2 entries for 3"):
        bleu(HYPS, REFS[:2])
    with pytest.raises(ValueError, match="at least one"):
        bleu([], [])
    with pytest.raises(ValueError, match="same number of references"):
        bleu(HYPS[:2], [["a", "b"], ["c"]])
    with pytest.raises(ValueError, match="pair up"):
        semantic_similarity(["a"], ["b", "c"])
    with pytest.raises(TypeError):
        semantic_similarity("a", "b")  # type: ignore[arg-type]
    assert semantic_similarity([], []) == []


def test_missing_sacrebleu_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    with pytest.raises(ImportError, match=r"llmprod\[quality\]") as info:
        bleu(HYPS, REFS)
    assert QUALITY_PIP in str(info.value)
    with pytest.raises(ImportError, match=r"llmprod\[quality\]"):
        sentence_bleu("a", "b")


def test_compare_engine_with_itself_is_an_exact_match(engine: Engine) -> None:
    prompts = ["The capital of France is", "Three primary colours are"]
    report = compare(
        engine, engine, prompts, SamplingParams(max_tokens=8, temperature=0)
    )
    assert isinstance(report, ComparisonReport)
    assert report.num_prompts == 2 and len(report.rows) == 2
    assert report.exact_match_tokens == 1.0 and report.exact_match_text == 1.0
    assert report.min_similarity == pytest.approx(1.0, abs=1e-5)
    assert report.bleu == pytest.approx(100.0)
    assert report.completion_tokens_a == report.completion_tokens_b > 0
    assert report.prompt_tokens_a == report.prompt_tokens_b > 0
    assert report.wall_s_a > 0 and report.wall_s_b > 0
    data = json.loads(json.dumps(report.to_dict()))
    assert data["rows"][0]["tokens_match"] is True
    assert data["params"]["max_tokens"] == 8
    md = report.to_markdown()
    assert "| exact match (token ids) | 1.000 |" in md
    assert "The capital of France is" in md


def test_compare_chat_sees_differences(engine: Engine) -> None:
    # Different lengths make different answers: the report must notice.
    short = SamplingParams(max_tokens=2, temperature=0)
    long_ = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)

    class Clipped:
        """The same engine, answering with fewer tokens."""

        def generate(
            self, prompts: object, params: object = None, **kw: object
        ) -> object:
            return engine.generate(prompts, short)  # type: ignore[arg-type]

        def chat(self, messages: object, params: object = None, **kw: object) -> object:
            return engine.chat(messages, short)  # type: ignore[call-overload]

    report = compare(
        Clipped(), engine, ["Name a fruit."], long_, chat=True, labels=("clip", "full")
    )
    row = report.rows[0]
    assert row.prompt == "Name a fruit."
    assert row.completion_tokens_a == 2 and row.completion_tokens_b == 10
    assert report.exact_match_tokens == 0.0 and not row.text_match
    assert "| # | prompt | clip | full |" in report.to_markdown()
