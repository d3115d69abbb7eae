"""Quality of generated text: BLEU, semantic similarity, and engine-vs-engine reports.

- :func:`bleu` and :func:`sentence_bleu` score outputs against references with
  sacrebleu (the optional extra ``llmprod[quality]``; imported only when called).
  They live in :mod:`llmprod.eval.bleu` and are re-exported here.
- :func:`semantic_similarity` is the cosine of all-MiniLM-L6-v2 sentence vectors
  (:class:`~llmprod.answers.embeddings.Embedder`), pair by pair: 1.0 for the same meaning,
  around 0 for unrelated texts.
- :func:`compare` runs two engines (or anything with the Engine's ``generate`` and
  ``chat``, such as a :class:`~llmprod.router.router.Router`) on the same prompts and
  reports how far apart their answers are: exact matches of token ids and of text,
  semantic similarity, BLEU of the first against the second, tokens and wall time.

>>> from llmprod.eval.quality import compare  # doctest: +SKIP
>>> report = compare(int8_engine, fp32_engine, ["Name a colour."])  # doctest: +SKIP
>>> print(report.to_markdown())  # doctest: +SKIP
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from llmprod.eval.bleu import QUALITY_PIP, bleu, sentence_bleu
from llmprod.outputs import Completion
from llmprod.sampling_params import SamplingParams

if TYPE_CHECKING:
    from llmprod.answers.embeddings import Embedder

__all__ = [
    "QUALITY_PIP",
    "ComparisonReport",
    "ComparisonRow",
    "bleu",
    "compare",
    "default_embedder",
    "semantic_similarity",
    "sentence_bleu",
]

_default_embedder: Embedder | None = None
_default_embedder_lock = threading.Lock()


# --------------------------------------------------------------------- similarity
def default_embedder() -> Embedder:
    """The Embedder that quality functions use when none is given.

    Built on first use (it loads all-MiniLM-L6-v2, about a second) and shared by
    every caller in the process.

    Returns:
        The shared :class:`~llmprod.answers.embeddings.Embedder`.
    """
    global _default_embedder
    with _default_embedder_lock:
        if _default_embedder is None:
            from llmprod.answers.embeddings import Embedder

            _default_embedder = Embedder()
        return _default_embedder


def semantic_similarity(
    a: Sequence[str], b: Sequence[str], embedder: Embedder | None = None
) -> list[float]:
    """Cosine similarity of MiniLM sentence vectors, pair by pair.

    Args:
        a: first texts.
        b: second texts, as many as ``a``; ``a[i]`` is compared with ``b[i]``.
        embedder: the Embedder to use (default: :func:`default_embedder`). One
            with a cache skips texts it has seen.

    Returns:
        One similarity per pair, in [-1, 1]; 1.0 for identical texts.

    Raises:
        ValueError: ``a`` and ``b`` differ in length.
    """
    if isinstance(a, str) or isinstance(b, str):
        raise TypeError("semantic_similarity takes two lists of str, not a str")
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"a has {len(a)} texts and b has {len(b)}; they must pair up")
    if not a:
        return []
    emb = embedder if embedder is not None else default_embedder()
    vectors = emb.embed(a + b)
    va, vb = vectors[: len(a)], vectors[len(a) :]
    cos = np.clip(np.einsum("ij,ij->i", va, vb), -1.0, 1.0)
    return [float(x) for x in cos]


# ------------------------------------------------------------------------ compare
class _Generates(Protocol):
    """What compare() needs of an engine: Engine and Router both fit."""

    def generate(self, *args: Any, **kwargs: Any) -> Any: ...

    def chat(self, *args: Any, **kwargs: Any) -> Any: ...


@dataclass(slots=True)
class ComparisonRow:
    """One prompt's answers from both engines and how close they are."""

    prompt: str
    text_a: str
    text_b: str
    tokens_match: bool
    """The generated token ids are identical."""
    text_match: bool
    """The generated texts are identical."""
    similarity: float
    """Cosine of the MiniLM vectors of the two answers."""
    bleu: float | None
    """Sentence BLEU of ``text_a`` against ``text_b`` (None without sacrebleu)."""
    completion_tokens_a: int
    completion_tokens_b: int


@dataclass(slots=True)
class ComparisonReport:
    """How the answers of engine A differ from those of engine B (the reference)."""

    label_a: str
    label_b: str
    num_prompts: int
    exact_match_tokens: float
    """Fraction of prompts whose generated token ids are identical."""
    exact_match_text: float
    """Fraction of prompts whose generated texts are identical."""
    mean_similarity: float
    min_similarity: float
    bleu: float | None
    """Corpus BLEU of A's answers with B's as references (None without sacrebleu)."""
    prompt_tokens_a: int
    prompt_tokens_b: int
    completion_tokens_a: int
    completion_tokens_b: int
    wall_s_a: float
    """Wall time of A's whole batch (the engines run one after the other)."""
    wall_s_b: float
    params: dict[str, Any] = field(default_factory=dict)
    rows: list[ComparisonRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return the report as plain JSON-able values (rows included).

        Returns:
            A dict of the fields above; ``rows`` is a list of dicts.
        """
        return asdict(self)

    def to_markdown(self, *, rows: bool = True, max_chars: int = 60) -> str:
        """Render a summary table, and optionally the per-prompt rows.

        Args:
            rows: include one line per prompt.
            max_chars: cut prompts and answers to this many characters.

        Returns:
            Markdown text.
        """
        a, b = self.label_a, self.label_b
        bleu_s = "n/a" if self.bleu is None else f"{self.bleu:.1f}"
        lines = [
            f"| metric | {a} | {b} |",
            "|---|---|---|",
            f"| prompts | {self.num_prompts} | {self.num_prompts} |",
            f"| prompt tokens | {self.prompt_tokens_a} | {self.prompt_tokens_b} |",
            f"| completion tokens | {self.completion_tokens_a} "
            f"| {self.completion_tokens_b} |",
            f"| wall time (s) | {self.wall_s_a:.2f} | {self.wall_s_b:.2f} |",
            "",
            f"| agreement of {a} with {b} | value |",
            "|---|---|",
            f"| exact match (token ids) | {self.exact_match_tokens:.3f} |",
            f"| exact match (text) | {self.exact_match_text:.3f} |",
            f"| semantic similarity, mean | {self.mean_similarity:.3f} |",
            f"| semantic similarity, min | {self.min_similarity:.3f} |",
            f"| BLEU ({a} vs {b}) | {bleu_s} |",
        ]
        if rows and self.rows:
            lines += [
                "",
                f"| # | prompt | {a} | {b} | same tokens | similarity |",
                "|---|---|---|---|---|---|",
            ]
            for i, r in enumerate(self.rows):
                lines.append(
                    f"| {i} | {_cell(r.prompt, max_chars)} | {_cell(r.text_a, max_chars)} "
                    f"| {_cell(r.text_b, max_chars)} | {'yes' if r.tokens_match else 'no'} "
                    f"| {r.similarity:.3f} |"
                )
        return "\n".join(lines) + "\n"


def _cell(text: str, max_chars: int) -> str:
    one_line = " ".join(text.split()).replace("|", "\\|")
    return one_line if len(one_line) <= max_chars else one_line[: max_chars - 1] + "…"


def _prompt_label(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
        return str(prompt[-1].get("content", ""))
    return f"<{len(prompt)} token ids>"


def _run(
    engine: _Generates, prompts: list[Any], params: SamplingParams, chat: bool
) -> tuple[list[Completion], float]:
    t0 = time.perf_counter()
    if chat:
        convs = [
            [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
            for p in prompts
        ]
        outs = engine.chat(convs, params)
    else:
        outs = engine.generate(prompts, params)
    return list(outs), time.perf_counter() - t0


def compare(
    engine_a: _Generates,
    engine_b: _Generates,
    prompts: Sequence[Any],
    params: SamplingParams | None = None,
    *,
    embedder: Embedder | None = None,
    chat: bool = False,
    labels: tuple[str, str] = ("a", "b"),
) -> ComparisonReport:
    """Run two engines on the same prompts and report how their answers differ.

    Engine B is the reference: BLEU is A's answers scored against B's. The engines
    run one after the other (A, then B), so each wall time is that engine's alone.
    Token-id matches only mean something when both engines share a tokenizer.

    Args:
        engine_a: an :class:`~llmprod.engine.engine.Engine`, a
            :class:`~llmprod.router.router.Router`, or anything with the same
            ``generate``/``chat``.
        engine_b: the reference engine.
        prompts: strings or token-id lists; with ``chat=True``, strings (each
            sent as one user message) or conversations (lists of message dicts).
        params: sampling parameters for both; default greedy with
            ``max_tokens=64``, so differences come from the engines, not sampling.
        embedder: Embedder for the similarity (default: the shared one).
        chat: send prompts through each engine's chat template.
        labels: names of A and B in the report.

    Returns:
        A :class:`ComparisonReport` with per-prompt rows.

    Raises:
        ValueError: no prompts.
    """
    plist = list(prompts)
    if not plist:
        raise ValueError("compare needs at least one prompt")
    sp = params if params is not None else SamplingParams(max_tokens=64, temperature=0)
    outs_a, wall_a = _run(engine_a, plist, sp, chat)
    outs_b, wall_b = _run(engine_b, plist, sp, chat)
    texts_a = [o.text for o in outs_a]
    texts_b = [o.text for o in outs_b]
    sims = semantic_similarity(texts_a, texts_b, embedder)
    try:
        corpus: float | None = bleu(texts_a, texts_b)
        row_bleu: list[float | None] = [
            sentence_bleu(x, y) for x, y in zip(texts_a, texts_b)
        ]
    except ImportError:
        corpus, row_bleu = None, [None] * len(plist)
    rows = [
        ComparisonRow(
            prompt=_prompt_label(p),
            text_a=oa.text,
            text_b=ob.text,
            tokens_match=list(oa.token_ids) == list(ob.token_ids),
            text_match=oa.text == ob.text,
            similarity=s,
            bleu=rb,
            completion_tokens_a=oa.usage.completion_tokens,
            completion_tokens_b=ob.usage.completion_tokens,
        )
        for p, oa, ob, s, rb in zip(plist, outs_a, outs_b, sims, row_bleu)
    ]
    n = len(rows)
    return ComparisonReport(
        label_a=labels[0],
        label_b=labels[1],
        num_prompts=n,
        exact_match_tokens=sum(r.tokens_match for r in rows) / n,
        exact_match_text=sum(r.text_match for r in rows) / n,
        mean_similarity=float(np.mean(sims)),
        min_similarity=float(np.min(sims)),
        bleu=corpus,
        prompt_tokens_a=sum(o.usage.prompt_tokens for o in outs_a),
        prompt_tokens_b=sum(o.usage.prompt_tokens for o in outs_b),
        completion_tokens_a=sum(o.usage.completion_tokens for o in outs_a),
        completion_tokens_b=sum(o.usage.completion_tokens for o in outs_b),
        wall_s_a=wall_a,
        wall_s_b=wall_b,
        params=sp.to_dict(),
        rows=rows,
    )
