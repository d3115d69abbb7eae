"""Sampling parameters, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from llmprod.errors import InvalidRequestError

MAX_LOGPROBS = 20


def _fail(name: str, value: Any, allowed: str) -> InvalidRequestError:
    return InvalidRequestError(f"{name}={value!r} is invalid: {allowed}", field=name)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick the next tokens of one request.

    Invalid values raise :class:`ValueError` (an
    :class:`~llmprod.errors.InvalidRequestError` with ``.field``) at construction.

    >>> SamplingParams(max_tokens=8, temperature=0).is_greedy
    True
    """

    max_tokens: int = 64
    """Most tokens to generate (>= 1)."""
    min_tokens: int = 0
    """EOS and stop tokens are suppressed until this many tokens are generated."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose mass is >= top_p."""
    top_k: int | None = None
    """Keep the top_k most likely tokens; None, 0 or -1 keep all."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens alone or in any batch."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; excluded from the text unless asked."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (besides EOS)."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token."""
    logprobs: int | None = None
    """Return the sampled token's log-probability and this many top alternatives."""
    prompt_logprobs: int | None = None
    """Return each prompt token's log-probability given the ones before it."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or output (CTRL-style)."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the decoded text."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Free-form caller data carried along; never changes the output."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if isinstance(self.stop, str):
            set_(self, "stop", (self.stop,))
        elif self.stop is None:
            set_(self, "stop", ())
        else:
            set_(self, "stop", tuple(self.stop))
        if self.stop_token_ids is None:
            set_(self, "stop_token_ids", ())
        else:
            set_(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.top_k in (0, -1):
            set_(self, "top_k", None)
        self._validate()

    def _validate(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise _fail("max_tokens", self.max_tokens, "must be an integer >= 1")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise _fail("min_tokens", self.min_tokens, "must be an integer >= 0")
        if self.min_tokens > self.max_tokens:
            raise _fail(
                "min_tokens",
                self.min_tokens,
                f"must be <= max_tokens={self.max_tokens}",
            )
        t = self.temperature
        if not isinstance(t, (int, float)) or math.isnan(t) or math.isinf(t) or t < 0:
            raise _fail("temperature", t, "must be a finite number >= 0")
        p = self.top_p
        if not isinstance(p, (int, float)) or math.isnan(p) or not 0 < p <= 1:
            raise _fail("top_p", p, "must be in (0, 1]")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise _fail("top_k", self.top_k, "must be an integer >= 1, or -1/0/None")
        if self.seed is not None and not _is_int(self.seed):
            raise _fail("seed", self.seed, "must be an integer or None")
        for s in self.stop:
            if not isinstance(s, str) or s == "":
                raise _fail("stop", s, "each stop string must be a non-empty str")
        for t_id in self.stop_token_ids:
            if not _is_int(t_id) or t_id < 0:
                raise _fail(
                    "stop_token_ids", t_id, "each stop token id must be an int >= 0"
                )
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise _fail(name, v, f"must be an integer in [0, {MAX_LOGPROBS}]")
        r = self.repetition_penalty
        if not isinstance(r, (int, float)) or math.isnan(r) or math.isinf(r) or r <= 0:
            raise _fail("repetition_penalty", r, "must be a finite number > 0")

    @property
    def is_greedy(self) -> bool:
        """True when the output is argmax at every step."""
        return self.temperature == 0

    @property
    def is_deterministic(self) -> bool:
        """True when the same request always gives the same output (greedy or seeded)."""
        return self.is_greedy or self.seed is not None

    def to_dict(self) -> dict[str, Any]:
        """The fields that change the output, as plain JSON-able values."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
