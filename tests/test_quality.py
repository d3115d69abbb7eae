"""llmprod.eval.quality: BLEU against sacrebleu itself, MiniLM similarity, and the
engine-vs-engine report on the real model."""

from __future__ import annotations

import json
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

sacrebleu = pytest.importorskip("sacrebleu")

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
REFS2 = [
    "a cat sat upon the mat",
    "a fast brown fox leaps over a lazy dog",
    "france has paris as its capital",
]


def test_corpus_bleu_equals_sacrebleu() -> None:
    assert bleu(HYPS, REFS) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    # Several references per hypothesis become sacrebleu's reference streams.
    multi = [[a, b] for a, b in zip(REFS, REFS2)]
    expected = sacrebleu.corpus_bleu(HYPS, [REFS, REFS2]).score
    assert bleu(HYPS, multi) == pytest.approx(expected)
    assert bleu(HYPS, multi) >= bleu(HYPS, REFS)


def test_sentence_bleu_equals_sacrebleu() -> None:
    for h, r, r2 in zip(HYPS, REFS, REFS2):
        assert sentence_bleu(h, r) == pytest.approx(
            sacrebleu.sentence_bleu(h, [r]).score
        )
        assert sentence_bleu(h, [r, r2]) == pytest.approx(
            sacrebleu.sentence_bleu(h, [r, r2]).score
        )


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
            return engine.chat(messages, short)  # type: ignore[arg-type]

    report = compare(
        Clipped(), engine, ["Name a fruit."], long_, chat=True, labels=("clip", "full")
    )
    row = report.rows[0]
    assert row.prompt == "Name a fruit."
    assert row.completion_tokens_a == 2 and row.completion_tokens_b == 10
    assert report.exact_match_tokens == 0.0 and not row.text_match
    assert "| # | prompt | clip | full |" in report.to_markdown()
