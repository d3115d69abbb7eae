"""Token masks from llguidance: compile a constraint once, match tokens per request.

:class:`GrammarBackend` belongs to one engine (one tokenizer). ``matcher(so)``
runs in the caller's thread at admission: the constraint becomes an llguidance
grammar (cached, least recently used first out), checked, and a fresh
``LLMatcher`` for the request. On the step thread, :func:`apply_masks` sets the
logits of tokens the grammar forbids to ``-inf`` for the rows that have a
matcher (the others are not touched); the output processor feeds every sampled
token back with ``consume``. With speculative decoding, :func:`mask_guessed_run`
masks each guessed position with the matcher walked through the guesses before it.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections import OrderedDict
from typing import Any

import torch

from llmprod.errors import InvalidRequestError
from llmprod.structured.params import StructuredOutputs

EXTRA = "llmprod[structured]"

_MAX_GRAMMARS = 256
"""Compiled grammars kept per engine."""


def _import_llguidance() -> Any:
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError as exc:
        raise InvalidRequestError(
            f"structured outputs need llguidance: pip install '{EXTRA}'",
            field="structured",
        ) from exc
    return llguidance


class GrammarBackend:
    """llguidance for one tokenizer.

    Args:
        tokenizer: the engine's Hugging Face tokenizer.
        vocab_size: the model's vocabulary (rows of its logits; may exceed the
            tokenizer's).
        eos_token_ids: where a finished grammar may end.
    """

    def __init__(
        self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]
    ) -> None:
        self.vocab_size = vocab_size
        self._hf = tokenizer
        self._eos = list(eos_token_ids) or None
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        self._grammars: OrderedDict[str, str] = OrderedDict()

    @property
    def ll_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                llg = _import_llguidance()
                self._tokenizer = llg.hf.from_tokenizer(
                    self._hf, n_vocab=self.vocab_size, eos_token=self._eos
                )
            return self._tokenizer

    def grammar(self, so: StructuredOutputs) -> str:
        """The llguidance grammar of a constraint, checked (cached)."""
        key = json.dumps(so.to_dict(), sort_keys=True)
        with self._lock:
            if key in self._grammars:
                self._grammars.move_to_end(key)
                return self._grammars[key]
        llg = _import_llguidance()
        grammar = _to_grammar(llg, so)
        ok, messages = _validate(llg, grammar, self.ll_tokenizer)
        if not ok:
            raise InvalidRequestError(
                f"structured {so.kind}: {messages}", field="structured"
            )
        with self._lock:
            self._grammars[key] = grammar
            while len(self._grammars) > _MAX_GRAMMARS:
                self._grammars.popitem(last=False)
        return grammar

    def matcher(self, so: StructuredOutputs) -> Any:
        """A fresh matcher for one request."""
        llg = _import_llguidance()
        m = llg.LLMatcher(self.ll_tokenizer, self.grammar(so))
        if m.is_error():
            raise InvalidRequestError(
                f"structured {so.kind}: {m.get_error()}", field="structured"
            )
        return m


JSON_LAYOUT = {
    "whitespace_flexible": False,
    "key_separator": ": ",
    "item_separator": ", ",
}
"""How JSON is laid out: ``json.dumps``'s default separators and no other
whitespace. With free whitespace a small model can emit newlines forever
between two tokens of an unfinished document (measured on SmolLM2: a record
that never closed within 128 tokens)."""


def _to_grammar(llg: Any, so: StructuredOutputs) -> str:
    kind = so.kind
    m = llg.LLMatcher
    if kind == "json":
        return str(m.grammar_from_json_schema(so.json, defaults=JSON_LAYOUT))
    if kind == "json_object":
        return str(m.grammar_from_json_schema({"type": "object"}, defaults=JSON_LAYOUT))
    if kind == "regex":
        return str(m.grammar_from_regex(so.regex))
    if kind == "choice":
        alternatives = "|".join(re.escape(c) for c in so.choice or ())
        return str(m.grammar_from_regex(f"(?:{alternatives})"))
    return str(m.grammar_from_lark(so.grammar))


def _validate(llg: Any, grammar: str, tokenizer: Any) -> tuple[bool, str]:
    """(whether the grammar is usable, llguidance's messages)."""
    try:
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(
            grammar, tokenizer
        )
    except Exception as exc:  # llguidance raises on some malformed input
        return False, str(exc)
    return not is_error, "; ".join(messages)


@functools.cache
def _bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


@functools.cache
def _executor() -> Any:
    """llguidance's thread pool for filling several rows' masks at once."""
    import llguidance

    return llguidance.LLExecutor()


def apply_masks(logits: torch.Tensor, matchers: list[Any]) -> torch.Tensor:
    """Mask the rows whose matcher is not None (in place; returns ``logits``).

    A matcher that has stopped (or errored) allows nothing but its EOS, which
    llguidance's mask already says.
    """
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    import llguidance.torch as llt

    vocab = logits.shape[-1]
    mask = torch.full((len(rows), _bitmask_width(vocab)), -1, dtype=torch.int32)
    if len(rows) == 1:
        llt.fill_next_token_bitmask(matchers[rows[0]], mask, 0)
    else:  # llguidance's own threads, one row each (torch's are idle meanwhile)
        llt.fill_next_token_bitmask_par(
            _executor(), [(matchers[i], j) for j, i in enumerate(rows)], mask
        )
    sub = logits[rows].float().cpu()
    llt.apply_token_bitmask_inplace(sub, mask)
    logits[rows] = sub.to(logits.device, logits.dtype)
    return logits


def mask_guessed_run(
    logits: torch.Tensor, draft: list[int], matcher: Any
) -> tuple[torch.Tensor, int]:
    """Masked logits for the positions of a speculated run, and how many of the
    guesses the grammar allows.

    Row ``j`` of ``logits`` predicts the token after ``draft[:j]``: its mask is
    the matcher's after consuming those guesses. The matcher walks the allowed
    guesses (``m`` of them, stopping before the first one the grammar forbids,
    which then cannot be kept) and is rolled back, so the output processor still
    consumes the tokens the step keeps.

    Returns:
        ``(masked, m)``: ``m + 1`` masked rows (float32, on ``logits``' device)
        and ``m``.
    """
    import llguidance.torch as llt

    m = int(matcher.validate_tokens(draft)) if draft else 0
    mask = torch.full((m + 1, _bitmask_width(logits.shape[-1])), -1, dtype=torch.int32)
    consumed = 0
    try:
        for j in range(m + 1):
            llt.fill_next_token_bitmask(matcher, mask, j)
            if j < m:
                if not matcher.consume_token(draft[j]):
                    m = j  # (validate_tokens said yes; be safe)
                    break
                consumed += 1
    finally:
        if consumed:
            matcher.rollback(consumed)
    rows = logits[: m + 1].float().cpu().clone()
    llt.apply_token_bitmask_inplace(rows, mask[: m + 1])
    return rows.to(logits.device), m
