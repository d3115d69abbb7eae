"""Sampling parameters, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from llmprod.errors import InvalidRequestError
from llmprod.structured.params import StructuredOutputs

MAX_LOGPROBS = 20
MAX_LOGPROB_TOKEN_IDS = 1024

MIN_TEMPERATURE = 1e-5
"""Temperatures below this sample greedily (dividing logits by less overflows)."""

MAX_TEMPERATURE = 1e4
"""Largest temperature (a larger one overflows float32 and yields NaN)."""

SEED_RANGE = (-(2**63), 2**64)
"""Seeds a generator takes: ``SEED_RANGE[0] <= seed < SEED_RANGE[1]``."""

REPETITION_PENALTY_RANGE = (0.01, 100.0)
"""Bounds of ``repetition_penalty`` (beyond them logits overflow or vanish)."""

MIN_TOP_P = 1e-8
"""Smallest ``top_p``; smaller values would keep the top token alone anyway."""

_BOOL_FIELDS = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")


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
    """Softmax temperature; 0 (or anything below 1e-5) means greedy (argmax)."""
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
    logprob_token_ids: tuple[int, ...] = ()
    """With ``logprobs``: also the log-probabilities of these tokens at each
    generated position (``TokenLogprob.scored``), whatever their rank: scoring
    several one-token continuations of one context in one request, as
    ``llmprod.integrations.lm_eval`` does for multiple-choice answers."""
    prompt_logprobs: int | None = None
    """Return each prompt token's log-probability given the ones before it."""
    prompt_logprobs_start: int = 0
    """With ``prompt_logprobs``: only the prompt tokens from this index on get a
    log-probability (the entries before it are None). The prompt before it may
    then come from the prefix cache, as when scoring several continuations of
    one context (``llmprod.integrations.lm_eval``)."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or output (CTRL-style)."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the decoded text."""
    structured: StructuredOutputs | None = None
    """What the output must match: a JSON Schema, a regex, a choice or a
    grammar (docs/structured-output.md)."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Free-form caller data carried along; never changes the output."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if isinstance(self.stop, str):
            set_(self, "stop", (self.stop,))
        elif self.stop is None:
            set_(self, "stop", ())
        elif isinstance(self.stop, (list, tuple)):
            set_(self, "stop", tuple(self.stop))
        else:
            raise _fail("stop", self.stop, "must be a str or a list of str")
        if isinstance(self.logprob_token_ids, (list, tuple)):
            set_(self, "logprob_token_ids", tuple(self.logprob_token_ids))
        elif self.logprob_token_ids is None:
            set_(self, "logprob_token_ids", ())
        else:
            raise _fail(
                "logprob_token_ids", self.logprob_token_ids, "must be a list of int"
            )
        if self.stop_token_ids is None:
            set_(self, "stop_token_ids", ())
        elif isinstance(self.stop_token_ids, (list, tuple)):
            set_(self, "stop_token_ids", tuple(self.stop_token_ids))
        else:
            raise _fail("stop_token_ids", self.stop_token_ids, "must be a list of int")
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
        if not _is_number(t) or not 0 <= t <= MAX_TEMPERATURE:
            raise _fail(
                "temperature", t, f"must be a number in [0, {MAX_TEMPERATURE:g}]"
            )
        p = self.top_p
        if not _is_number(p) or not MIN_TOP_P <= p <= 1:
            raise _fail("top_p", p, f"must be a number in [{MIN_TOP_P}, 1]")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise _fail("top_k", self.top_k, "must be an integer >= 1, or -1/0/None")
        lo, hi = SEED_RANGE
        if self.seed is not None and (
            not _is_int(self.seed) or not lo <= self.seed < hi
        ):
            raise _fail(
                "seed", self.seed, "must be None or an integer in [-2**63, 2**64)"
            )
        for s in self.stop:
            if not isinstance(s, str) or s == "":
                raise _fail("stop", s, "each stop string must be a non-empty str")
            if not is_valid_text(s):
                raise _fail("stop", s, "each stop string must be valid Unicode text")
        for t_id in self.stop_token_ids:
            if not _is_int(t_id) or t_id < 0:
                raise _fail(
                    "stop_token_ids", t_id, "each stop token id must be an int >= 0"
                )
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise _fail(name, v, f"must be an integer in [0, {MAX_LOGPROBS}]")
        ids = self.logprob_token_ids
        if ids and self.logprobs is None:
            raise _fail("logprob_token_ids", ids, "is read only with logprobs set")
        if len(ids) > MAX_LOGPROB_TOKEN_IDS:
            raise _fail(
                "logprob_token_ids",
                f"<{len(ids)} ids>",
                f"must hold at most {MAX_LOGPROB_TOKEN_IDS} token ids",
            )
        for t_id in ids:
            if not _is_int(t_id) or t_id < 0:
                raise _fail("logprob_token_ids", t_id, "each id must be an int >= 0")
        st = self.prompt_logprobs_start
        if not _is_int(st) or st < 0:
            raise _fail("prompt_logprobs_start", st, "must be an int >= 0")
        r = self.repetition_penalty
        r_lo, r_hi = REPETITION_PENALTY_RANGE
        if not _is_number(r) or not r_lo <= r <= r_hi:
            raise _fail(
                "repetition_penalty", r, f"must be a number in [{r_lo}, {r_hi}]"
            )
        for name in _BOOL_FIELDS:
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise _fail(name, v, "must be True or False")
        if not isinstance(self.extra, dict):
            raise _fail("extra", self.extra, "must be a dict")
        if self.structured is not None and not isinstance(
            self.structured, StructuredOutputs
        ):
            raise _fail(
                "structured", self.structured, "must be None or StructuredOutputs(...)"
            )

    @property
    def is_greedy(self) -> bool:
        """True when the output is argmax at every step (temperature below 1e-5)."""
        return self.temperature < MIN_TEMPERATURE

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
            if isinstance(v, StructuredOutputs):
                v = v.to_dict()
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A real int or float (not a bool, not NaN)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def is_valid_text(s: str) -> bool:
    """False for strings holding lone surrogates (no tokenizer can encode them)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
