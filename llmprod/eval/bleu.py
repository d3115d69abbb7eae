"""BLEU by sacrebleu: corpus and sentence scores of outputs against references.

sacrebleu comes with the optional extra ``llmprod[quality]``; it is imported when
a score is asked for, not with this module. :mod:`llmprod.eval.quality` re-exports both
scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

QUALITY_PIP = "pip install 'llmprod[quality]'"
"""The pip line that installs sacrebleu (named by the ImportError)."""


def _sacrebleu() -> Any:
    try:
        import sacrebleu
    except ImportError as exc:
        raise ImportError(
            f"BLEU needs the sacrebleu package; install it with: {QUALITY_PIP}"
        ) from exc
    return sacrebleu


def _reference_streams(
    references: Sequence[str] | Sequence[Sequence[str]], n: int
) -> list[list[str]]:
    """Turn one reference per hypothesis, or a list of them each, into the
    reference streams sacrebleu takes (stream k holds every hypothesis's k-th)."""
    if len(references) != n:
        raise ValueError(
            f"references has {len(references)} entries for {n} hypotheses; "
            "pass one reference (or one list of references) per hypothesis"
        )
    if all(isinstance(r, str) for r in references):
        return [[str(r) for r in references]]
    per_hyp: list[list[str]] = []
    for i, r in enumerate(references):
        refs = [r] if isinstance(r, str) else list(r)
        if not refs or not all(isinstance(x, str) for x in refs):
            raise ValueError(
                f"references[{i}] must be a str or a non-empty list of str"
            )
        per_hyp.append(refs)
    k = len(per_hyp[0])
    if any(len(refs) != k for refs in per_hyp):
        raise ValueError(
            "every hypothesis needs the same number of references; got "
            f"{sorted({len(refs) for refs in per_hyp})}"
        )
    return [[refs[j] for refs in per_hyp] for j in range(k)]


def bleu(
    hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]
) -> float:
    """Corpus BLEU (0-100) of ``hypotheses`` against ``references``, by sacrebleu.

    sacrebleu's defaults apply: 13a tokenisation, case-sensitive, exponential
    smoothing, n-grams up to 4. Corpus BLEU pools n-gram counts over all pairs
    before taking the geometric mean, so it is not the mean of sentence BLEUs.

    Args:
        hypotheses: the texts to score.
        references: one reference per hypothesis, or for each hypothesis a list
            of references (the same number for all).

    Returns:
        The BLEU score, from 0 (nothing shared) to 100 (identical).

    Raises:
        ImportError: sacrebleu is not installed (the message gives the pip line).
        ValueError: empty input, or the counts do not line up.
    """
    hyps = list(hypotheses)
    if not hyps:
        raise ValueError("bleu needs at least one hypothesis")
    streams = _reference_streams(references, len(hyps))
    return float(_sacrebleu().corpus_bleu(hyps, streams).score)


def sentence_bleu(hypothesis: str, references: str | Sequence[str]) -> float:
    """BLEU (0-100) of one text against one or more references, by sacrebleu.

    Uses sacrebleu's sentence-level settings (effective n-gram order, so a short
    text that matches exactly still scores 100).

    Args:
        hypothesis: the text to score.
        references: one reference or a list of them.

    Returns:
        The BLEU score, from 0 to 100.

    Raises:
        ImportError: sacrebleu is not installed (the message gives the pip line).
    """
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("sentence_bleu needs at least one reference")
    return float(_sacrebleu().sentence_bleu(hypothesis, refs).score)
