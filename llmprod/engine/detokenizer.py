"""Incremental detokenization with stop strings (no torch)."""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, one delta at a time.

    Each step decodes a short window of recent tokens and emits what it adds, so a
    character split across tokens (UTF-8 bytes in byte-level BPE) is emitted only
    once complete. Stop strings are searched across token boundaries; while a
    stop string could still be forming, the last ``max_stop_len - 1`` characters
    are held back, so a stop string is never streamed, not even in part.
    """

    def __init__(
        self,
        tokenizer: Any,
        stop: tuple[str, ...] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.skip_special = skip_special_tokens
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.num_emitted = 0
        self.stop_reason: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=self.skip_special))

    def add(self, token_id: int) -> str | None:
        """Add one token. Returns the stop string if this token completed one."""
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            piece = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.token_ids)
            before = len(self.text)
            self.text += piece
            if self.stop:
                return self._check_stop(before)
        return None

    def _check_stop(self, new_from: int) -> str | None:
        start = max(0, new_from - self.hold)
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
        self.stop_reason = s
        return s

    def take_delta(self, final: bool) -> str:
        """Text not yet emitted; while not final, hold back a possible stop prefix."""
        end = (
            len(self.text)
            if final or self.stop_reason
            else max(self.num_emitted, len(self.text) - self.hold)
        )
        piece = self.text[self.num_emitted : end]
        self.num_emitted = end
        return piece
