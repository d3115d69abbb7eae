"""The text features :class:`~llmprod.router.complexity.ComplexityPolicy` scores.

Each feature reads the prompt text (and its length in tokens) and gives a value in
[0, 1]; the cue lists below are what the word-counting features look for. A cue
counts once however often it appears, and only as a whole word.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["TEXT_FEATURES", "similarity_value", "text_feature"]

TEXT_FEATURES = ("length", "reasoning", "code", "math", "constraints")
"""The features computed from the text alone (``similarity`` needs an embedder)."""


def _patterns(words: Sequence[str]) -> list[re.Pattern[str]]:
    return [re.compile(rf"(?<![\w-])(?:{w})(?![\w-])", re.IGNORECASE) for w in words]


REASONING = _patterns(
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
"""Reasoning cues (why, how does, explain, prove, compare, trade-off, ...)."""

CODE = _patterns(
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
"""Code words (function, Python, SQL, implement, algorithm, ...)."""

CODE_SYMBOLS = re.compile(r"```|\bdef |\breturn\b|=>|[{};]|\w\(\)|\w+\.\w+\(")
"""Code written out: backticks, ``def``, ``return``, braces, calls."""

MATH = _patterns(
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
"""Math words (solve, equation, probability, how many, ...)."""

MATH_SYMBOLS = re.compile(r"\d\s*[-+*/^=×÷]\s*\d|[=^∑∫√≤≥]|\b\d+(?:\.\d+)?\s*%")
"""An arithmetic expression, a math symbol or a percentage."""

NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,:]\d+)?")
"""One number (three or more count as a math cue)."""

CONSTRAINTS = _patterns(
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
"""Constraint cues (must, at least, exactly, without, format, in N words, ...)."""

LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.MULTILINE)
"""A bulleted or numbered list item (each one counts as a constraint)."""


def _hits(patterns: Sequence[re.Pattern[str]], text: str) -> int:
    return sum(1 for p in patterns if p.search(text))


def _clip(v: float) -> float:
    return min(1.0, max(0.0, v))


def text_feature(name: str, text: str, num_tokens: int) -> float:
    """The value in [0, 1] of one text feature for one prompt.

    - ``length``: ``(tokens - 16) / 112``: 0 up to 16 tokens, 1 from 128.
    - ``reasoning``: distinct reasoning cues, 2 or more give 1.
    - ``code``: distinct code words, plus one if code symbols appear; 2 give 1.
    - ``math``: distinct math words, plus one for an arithmetic expression or
      math symbol, plus one for three or more numbers; 2 give 1.
    - ``constraints``: distinct constraint cues plus list items; 3 give 1.

    Args:
        name: one of :data:`TEXT_FEATURES`.
        text: the prompt text.
        num_tokens: its length in tokens.

    Returns:
        The feature's value, clipped to [0, 1].

    Raises:
        KeyError: ``name`` is not a text feature.
    """
    if name == "length":
        v = (num_tokens - 16) / 112
    elif name == "reasoning":
        v = _hits(REASONING, text) / 2
    elif name == "code":
        v = (_hits(CODE, text) + bool(CODE_SYMBOLS.search(text))) / 2
    elif name == "math":
        v = (
            _hits(MATH, text)
            + bool(MATH_SYMBOLS.search(text))
            + (len(NUMBER.findall(text)) >= 3)
        ) / 2
    elif name == "constraints":
        v = (_hits(CONSTRAINTS, text) + len(LIST_ITEM.findall(text))) / 3
    else:
        raise KeyError(name)
    return _clip(v)


def similarity_value(cosine: float) -> float:
    """The ``similarity`` feature: the highest cosine to the hard exemplars,
    mapped from [0.2, 0.6] onto [0, 1] (clipped)."""
    return _clip((cosine - 0.2) / 0.4)
