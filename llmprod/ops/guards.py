"""Safety guards on prompts and outputs: a small protocol and two built-ins.

A guard looks at a text (a prompt before it runs, or an output when it is done)
and returns a :class:`GuardResult`: the text, possibly redacted, what it found
(``flags``), and whether the text must be blocked. :func:`apply_guards` runs a
chain of guards, each on the previous one's text, and raises
:class:`~llmprod.errors.GuardBlockedError` on the first block.

Findings hold kinds and counts only, never the matched text, so flags and error
messages are safe to log.

Built-ins:

- :class:`PIIGuard`: email addresses; phone numbers (international ``+CC ...``,
  North American ``(555) 123-4567`` / ``555-123-4567``, and national numbers that
  start with a trunk ``0`` such as ``020 7946 0958``; a bare run of digits is not
  taken for a phone number, so years and short numbers are never flagged);
  payment card numbers (13 to 19 digits, optionally grouped by spaces or dashes,
  that pass the Luhn check); IBANs (in capitals, optionally grouped by spaces,
  that pass the ISO 13616 mod-97 check).
- :class:`BlockListGuard`: words or phrases, matched as whole words.

Each takes an ``action``: ``"flag"`` (report only), ``"redact"`` (replace each
match with ``[EMAIL]``, ``[PHONE]``, ``[CARD]``, ``[IBAN]`` or ``[BLOCKED]``) or
``"block"``.

>>> guard = PIIGuard(action="redact")
>>> result = guard.check("Mail jane.doe@example.com or call +44 20 7946 0958.", "prompt")
>>> result.text
'Mail [EMAIL] or call [PHONE].'
>>> result.flags
{'action': 'redact', 'counts': {'email': 1, 'phone': 1}}
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from llmprod.errors import GuardBlockedError

WHERE = ("prompt", "output")
"""Where a guard may run."""

ACTIONS = ("flag", "redact", "block")
"""What a built-in guard does with a finding."""

PII_KINDS = ("email", "phone", "card", "iban")
"""The kinds :class:`PIIGuard` knows, in the order their matches are claimed
(a span claimed by one kind is not matched again by a later one)."""

REDACTIONS = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "card": "[CARD]",
    "iban": "[IBAN]",
    "block_list": "[BLOCKED]",
}
"""Replacement text of each kind under ``action="redact"``."""


@dataclass(frozen=True, slots=True)
class GuardResult:
    """What a guard (or a chain of guards) made of a text."""

    text: str
    """The text to go on with: the input, or its redacted form."""
    flags: dict[str, Any] = field(default_factory=dict)
    """Findings (kinds and counts, never matched text); empty when nothing was
    found. From :func:`apply_guards`: guard name -> that guard's flags."""
    blocked: bool = False
    """True when the text must not be used."""


@runtime_checkable
class Guard(Protocol):
    """A check on prompts and outputs."""

    name: str
    """Unique name; keys the guard's flags in ``Completion.flags["guards"]``.

    Optional attributes the engine reads: ``where`` (a collection of
    ``"prompt"``/``"output"``; both when absent) and ``stream_holdback`` (an int:
    the longest text one finding can span, plus one; a stream sends text only
    that many characters behind what the guard has seen, so it never sends a
    finding before the guard sees it whole; when absent, a stream holds all its
    text until the guard has checked the final answer)."""

    def check(self, text: str, where: str) -> GuardResult:
        """Inspect one text.

        Args:
            text: the prompt or the output.
            where: ``"prompt"`` or ``"output"``.

        Returns:
            The (possibly redacted) text, the findings, and whether to block.
            Findings must not contain the matched text.
        """
        ...


def apply_guards(guards: Iterable[Guard], text: str, where: str) -> GuardResult:
    """Run guards in order, each on the text the previous one returned.

    Args:
        guards: the chain (may be empty).
        text: the prompt or output.
        where: ``"prompt"`` or ``"output"``.

    Returns:
        The final text and the flags of every guard that found something,
        keyed by guard name (a repeated name gets ``#2``, ``#3``...). ``blocked``
        is always False: a block raises.

    Raises:
        GuardBlockedError: a guard blocked the text. ``guard`` names it,
            ``findings`` holds its flags, ``field`` is ``where``; the message
            gives kinds and counts only.
        ValueError: ``where`` is not ``"prompt"`` or ``"output"``.
    """
    _check_where(where)
    flags: dict[str, Any] = {}
    for guard in guards:
        result = guard.check(text, where)
        if result.flags:
            key, n = guard.name, 1
            while key in flags:
                n += 1
                key = f"{guard.name}#{n}"
            flags[key] = result.flags
        if result.blocked:
            counts = result.flags.get("counts")
            found = (
                ", ".join(f"{kind} x{num}" for kind, num in counts.items())
                if isinstance(counts, dict) and counts
                else "a finding"
            )
            err = GuardBlockedError(
                f"the {where} was blocked by guard {guard.name!r}: {found}",
                guard=guard.name,
                findings=dict(result.flags),
            )
            err.field = where
            raise err
        text = result.text
    return GuardResult(text, flags, False)


# ---------------------------------------------------------------------- built-ins
class _PatternGuard:
    """Shared action handling: find spans, then flag, redact or block."""

    name: str

    def __init__(self, name: str, action: str, where: Collection[str]) -> None:
        if action not in ACTIONS:
            raise ValueError(f"action={action!r} must be one of {ACTIONS}")
        for w in where:
            _check_where(w)
        if not isinstance(name, str) or not name:
            raise ValueError(f"name={name!r} must be a non-empty string")
        self.name = name
        self.action = action
        self.where = tuple(where)

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """Matches in ``text`` as ``(start, end, kind)``, sorted, not overlapping."""
        raise NotImplementedError

    def check(self, text: str, where: str) -> GuardResult:
        """See :meth:`Guard.check`. A guard not set to run at ``where`` passes the
        text through untouched."""
        _check_where(where)
        if where not in self.where:
            return GuardResult(text)
        spans = self.find(text)
        if not spans:
            return GuardResult(text)
        counts: dict[str, int] = {}
        for _, _, kind in spans:
            counts[kind] = counts.get(kind, 0) + 1
        flags = {"action": self.action, "counts": counts}
        if self.action == "redact":
            parts, pos = [], 0
            for start, end, kind in spans:
                parts += [text[pos:start], REDACTIONS[kind]]
                pos = end
            parts.append(text[pos:])
            return GuardResult("".join(parts), flags)
        return GuardResult(text, flags, blocked=self.action == "block")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, action={self.action!r})"


_EMAIL = re.compile(
    r"(?<![\w.%+\-])"
    r"[A-Za-z0-9](?:[A-Za-z0-9._%+\-]*[A-Za-z0-9_%+\-])?"  # local part
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)+"  # domain labels
    r"[A-Za-z]{2,63}(?![\w\-])"  # top-level domain
)
_PHONE = re.compile(
    r"(?<![\w+\-.(])(?:"
    # international: +CC then 2-6 groups, one optional separator before each
    r"\+\d{1,3}(?:[ .\-]?(?:\(\d{1,4}\)|\d{1,5})){2,6}"
    # North American: (555) 123-4567, 555-123-4567, 555.123.4567, 555 123 4567
    r"|(?:\(\d{3}\) ?|\d{3}[ .\-])\d{3}[ .\-]\d{4}"
    # national with a trunk 0: 020 7946 0958, 06 12 34 56 78, 0612345678
    r"|0\d{1,4}(?:[ .\-]?\d{2,4}){2,5}"
    r")(?![\w\-]|\.\d)"
)
_PHONE_DIGITS = {"+": (8, 15), "(": (10, 10), "0": (9, 12)}
"""Digit count allowed for each phone form (by first character); E.164 allows
at most 15 digits with the country code."""

_CARD = re.compile(r"(?<![\d\-])(?<!\d )(?:\d[ \-]?){12,18}\d(?![ \-]?\d)")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
_IBAN_LEN = (15, 34)
"""Shortest and longest IBAN (Norway 15, Saint Lucia 32, the standard's cap 34)."""


def luhn_is_valid(digits: str) -> bool:
    """The Luhn (mod 10) check used by payment card numbers.

    >>> luhn_is_valid("4111111111111111"), luhn_is_valid("4111111111111112")
    (True, False)
    """
    if not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_is_valid(iban: str) -> bool:
    """The ISO 13616 check: move the first four characters to the end, read
    letters as numbers (A = 10 ... Z = 35), and the number mod 97 must be 1.

    Spaces are ignored.

    >>> iban_is_valid("GB82 WEST 1234 5698 7654 32"), iban_is_valid("GB82 WEST 1234 5698 7654 33")
    (True, False)
    """
    s = iban.replace(" ", "").upper()
    if (
        not (_IBAN_LEN[0] <= len(s) <= _IBAN_LEN[1])
        or not s.isalnum()
        or not s.isascii()
    ):
        return False
    if not (s[:2].isalpha() and s[2:4].isdigit()):
        return False
    rem = 0
    for ch in s[4:] + s[:4]:
        rem = (rem * (100 if ch.isalpha() else 10) + int(ch, 36)) % 97
    return rem == 1


class PIIGuard(_PatternGuard):
    """Finds personal data: emails, phone numbers, card numbers, IBANs.

    Args:
        kinds: which of :data:`PII_KINDS` to look for.
        action: ``"flag"``, ``"redact"`` or ``"block"``.
        where: run on prompts, outputs or both.
        name: the guard's name in flags and errors.
    """

    def __init__(
        self,
        kinds: Sequence[str] = PII_KINDS,
        action: str = "flag",
        *,
        where: Collection[str] = WHERE,
        name: str = "pii",
    ) -> None:
        super().__init__(name, action, where)
        unknown = [k for k in kinds if k not in PII_KINDS]
        if unknown or not kinds:
            raise ValueError(
                f"kinds={tuple(kinds)!r} must be a non-empty subset of {PII_KINDS}"
            )
        self.kinds = tuple(k for k in PII_KINDS if k in kinds)
        self.stream_holdback = max(_LONGEST[k] for k in self.kinds) + 1
        """See :class:`Guard`: the longest match of its kinds, plus one."""

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """Validated matches, claimed in :data:`PII_KINDS` order."""
        spans: list[tuple[int, int, str]] = []
        for kind in self.kinds:
            for start, end in _FINDERS[kind](text):
                if all(end <= s or start >= e for s, e, _ in spans):
                    spans.append((start, end, kind))
        return sorted(spans)


def _find_emails(text: str) -> Iterable[tuple[int, int]]:
    for m in _EMAIL.finditer(text):
        yield m.span()


def _find_phones(text: str) -> Iterable[tuple[int, int]]:
    for m in _PHONE.finditer(text):
        s = m.group()
        lo, hi = _PHONE_DIGITS.get(s[0], (10, 10))  # a digit first: 555-123-4567
        if lo <= sum(c.isdigit() for c in s) <= hi:
            yield m.span()


def _find_cards(text: str) -> Iterable[tuple[int, int]]:
    for m in _CARD.finditer(text):
        digits = re.sub(r"[ \-]", "", m.group())
        if len(set(digits)) > 1 and luhn_is_valid(digits):
            yield m.span()


def _find_ibans(text: str) -> Iterable[tuple[int, int]]:
    for m in _IBAN.finditer(text):
        s = m.group()
        # The pattern may run into a following capitalised word: try the whole
        # match, then shorter ones ending at a space.
        ends = [len(s)] + [i for i in range(len(s) - 1, 0, -1) if s[i] == " "]
        for end in ends:
            if iban_is_valid(s[:end]):
                yield m.start(), m.start() + end
                break


_LONGEST = {"email": 254, "phone": 40, "card": 37, "iban": 64}
"""The longest text each kind matches (an email address is at most 254
characters; the others follow from their patterns)."""

_FINDERS = {
    "email": _find_emails,
    "phone": _find_phones,
    "card": _find_cards,
    "iban": _find_ibans,
}


class BlockListGuard(_PatternGuard):
    """Finds listed words or phrases, as whole words.

    A word matches where it is not preceded or followed by a letter, digit or
    underscore (so ``"ass"`` does not match in ``"class"``). Findings count
    matches under the kind ``"block_list"``; which words matched is not reported.

    Args:
        words: the words or phrases (non-empty strings).
        action: ``"flag"``, ``"redact"`` (with ``[BLOCKED]``) or ``"block"``.
        case_sensitive: match case exactly.
        where: run on prompts, outputs or both.
        name: the guard's name in flags and errors.
    """

    def __init__(
        self,
        words: Iterable[str],
        action: str = "block",
        case_sensitive: bool = False,
        *,
        where: Collection[str] = WHERE,
        name: str = "block_list",
    ) -> None:
        super().__init__(name, action, where)
        self.words = tuple(words)
        if not self.words:
            raise ValueError("words must hold at least one word")
        for w in self.words:
            if not isinstance(w, str) or not w.strip():
                raise ValueError(f"words must be non-empty strings, got {w!r}")
        self.case_sensitive = case_sensitive
        self.stream_holdback = max(len(w) for w in self.words) + 1
        """See :class:`Guard`: the longest word, plus one for the character
        that tells a whole word from the start of a longer one."""
        # Longest first, so a phrase wins over a word it starts with.
        alternatives = "|".join(
            re.escape(w) for w in sorted(set(self.words), key=len, reverse=True)
        )
        self._pattern = re.compile(
            rf"(?<!\w)(?:{alternatives})(?!\w)", 0 if case_sensitive else re.IGNORECASE
        )

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """Whole-word matches, left to right."""
        return [
            (m.start(), m.end(), "block_list") for m in self._pattern.finditer(text)
        ]


def _check_where(where: str) -> None:
    if where not in WHERE:
        raise ValueError(f"where={where!r} must be one of {WHERE}")
