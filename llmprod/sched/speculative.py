"""Speculative decoding: draft a few tokens cheaply, verify them in one forward.

On a CPU, one decode step of a small batch is bound by reading the weights; a
forward over k + 1 positions of one sequence reads them once too. So the engine
lets a proposer guess the next k tokens of a request, runs the last known token
and the k guesses through the model in one step (the paged attention rule
already covers several query tokens of one sequence), and keeps the longest
prefix of guesses the model agrees with, plus the model's own next token. Every
step still yields at least one token, and a step that accepts ``a`` guesses
yields ``a + 1``.

- **Proposer** (:class:`NgramProposer`, "prompt lookup"): the tokens that followed
  the latest earlier occurrence of the sequence's last n tokens (n from
  ``prompt_lookup_max`` down to ``prompt_lookup_min``), in the prompt and the
  output so far. No second model: it pays where outputs repeat their input
  (summaries, extraction, code edits, quoting).
- **Verification** (:func:`verify_greedy`, :func:`verify_sampled`): greedy
  requests keep guesses while they equal the argmax, so the tokens are exactly
  the ones decoding without speculation gives (in float32; in bfloat16 and with
  4-bit weights, whose products change in the last bits with the number of rows,
  a near-tie can go the other way, as it can with other rows in the batch). Sampled requests use rejection
  sampling against the (deterministic) guess: keep guess ``x`` with probability
  ``p(x)``, else draw from ``p`` with ``x`` removed; the tokens then follow the
  model's own distribution ``p`` (after temperature, top-k and top-p). A seeded
  request draws in another order with speculation on than off, so the same seed
  gives other (equally distributed) text; without speculation it is unchanged.
- **Policy** (:class:`SpeculativeConfig`): only small steps speculate (at most
  ``max_num_seqs`` running requests, one by default; a larger step is bound by
  computing, not by reading weights); a request whose guesses are mostly refused stops drafting
  for a while; requests that need more than the tokens (log-probabilities,
  repetition penalty, ``min_tokens`` still in effect) never draft. A request
  with a grammar drafts; each guessed position is verified under the grammar
  as it stands after the guesses before it, so a guess it forbids is refused.

This module holds the scheduling side (the config, the proposer, the policy);
``llmprod.exec.speculative`` the verification. The scheduler asks for drafts,
the runner verifies them, and the scheduler rolls the KV back: the slots of refused guesses are not counted as computed
(their values are overwritten when those positions run again), blocks past the
new end return to the pool, and prefix hashes only ever cover accepted tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmprod.errors import InvalidConfigError
from llmprod.sched.request import Request

__all__ = [
    "NgramProposer",
    "Proposer",
    "SpecState",
    "SpeculativeConfig",
    "eligible",
]

METHODS = ("ngram", "draft")
DRAFT_QUANT = (None, "int8", "int8-wo", "int4", "gguf")
DRAFT_DTYPES = (None, "auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """How the engine speculates (``Engine.from_pretrained(speculative=...)``).

    ``speculative={"method": "ngram", "num_speculative_tokens": 4}`` or an
    instance of this class.
    """

    method: str = "ngram"
    """"ngram" (prompt lookup; no second model) or "draft" (a draft model,
    ``draft_model``, guesses)."""
    num_speculative_tokens: int = 4
    """Guesses verified per step (k): a step runs k + 1 positions of the request."""
    prompt_lookup_max: int = 3
    """Longest suffix the n-gram proposer looks up."""
    prompt_lookup_min: int = 1
    """Shortest suffix it tries before giving up for this step."""
    max_num_seqs: int = 1
    """Speculate only in steps with at most this many running (and waiting)
    requests. Measured on a 2-core CPU (docs/benchmarks.md, "Speculative
    decoding"): one request gains 1.3x-2.2x; at 2 requests a copying workload
    still gains but an open one loses 12%, and at 4-8 both break even or lose."""
    min_acceptance: float = 0.1
    """A request whose guesses are accepted at a lower rate (over its last
    ``window`` guesses) stops drafting for ``backoff_steps`` steps."""
    window: int = 32
    backoff_steps: int = 16
    draft_model: str | None = None
    """With ``method="draft"``: the draft model, a registered name, a folder or
    a GGUF file, with the target's tokenizer (for example the target itself in
    int8 or 4 bits, or a smaller model of its family)."""
    draft_quantization: str | None = None
    """The draft's weights: None (as loaded), "int8", "int8-wo", "int4" or
    "gguf" (a GGUF file's own Q4 weights)."""
    draft_dtype: str | None = None
    """The draft's float dtype (None: the engine's)."""
    lookup_first: bool = True
    """With ``method="draft"``: guess by prompt lookup first. When the text's
    last ``prompt_lookup_max`` (down to 2, or ``prompt_lookup_min`` if larger)
    tokens occurred before, the tokens that followed them are the guesses and
    the draft model does not run for that step (text copied from the prompt
    costs no draft passes); otherwise the draft guesses."""

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, rule: str) -> InvalidConfigError:
            return InvalidConfigError(
                f"speculative.{name}={value!r} {rule}", f"speculative.{name}"
            )

        if self.method not in METHODS:
            raise bad("method", self.method, f"must be one of {METHODS}")
        if self.method == "draft":
            if not isinstance(self.draft_model, str) or not self.draft_model:
                raise bad(
                    "draft_model",
                    self.draft_model,
                    "must name the draft model (a registered name, a folder or a "
                    'GGUF file) with method="draft"',
                )
        elif self.draft_model is not None:
            raise bad(
                "draft_model", self.draft_model, 'is read only with method="draft"'
            )
        if self.draft_quantization not in DRAFT_QUANT:
            raise bad("draft_quantization", self.draft_quantization,
                      f"must be one of {DRAFT_QUANT}")  # fmt: skip
        if self.draft_dtype not in DRAFT_DTYPES:
            raise bad("draft_dtype", self.draft_dtype, f"must be one of {DRAFT_DTYPES}")
        for name, lo in (
            ("num_speculative_tokens", 1),
            ("prompt_lookup_max", 1),
            ("prompt_lookup_min", 1),
            ("max_num_seqs", 1),
            ("window", 1),
            ("backoff_steps", 0),
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise bad(name, v, f"must be an int >= {lo}")
        if self.num_speculative_tokens > 16:
            raise bad(
                "num_speculative_tokens", self.num_speculative_tokens, "must be <= 16"
            )
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise bad(
                "prompt_lookup_min",
                self.prompt_lookup_min,
                f"must be <= prompt_lookup_max={self.prompt_lookup_max}",
            )
        if not isinstance(self.lookup_first, bool):
            raise bad("lookup_first", self.lookup_first, "must be a bool")
        a = self.min_acceptance
        if not isinstance(a, (int, float)) or isinstance(a, bool) or not 0 <= a <= 1:
            raise bad("min_acceptance", a, "must be a number in [0, 1]")

    @classmethod
    def parse(cls, value: SpeculativeConfig | Mapping[str, Any] | None) -> Any:
        """An instance from a config, a mapping of its fields, or None."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, Mapping):
            names = set(cls.__dataclass_fields__)
            unknown = sorted(set(value) - names)
            if unknown:
                raise InvalidConfigError(
                    f"speculative has no option {unknown[0]!r}; accepted: "
                    f"{', '.join(sorted(names))}",
                    "speculative",
                )
            return cls(**value)
        raise InvalidConfigError(
            f"speculative={value!r} must be None, a dict or a SpeculativeConfig",
            "speculative",
        )


@dataclass(slots=True)
class SpecState:
    """One request's speculation record (the scheduler's)."""

    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    """Verification steps that carried guesses."""
    recent: list[tuple[int, int]] = field(default_factory=list)
    """(drafted, accepted) of the latest steps, for the acceptance window."""
    paused_until: int = 0
    """Step count of this request before which it does not draft."""
    seen_steps: int = 0

    def record(self, drafted: int, accepted: int, cfg: SpeculativeConfig) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.steps += 1
        self.recent.append((drafted, accepted))
        total = sum(d for d, _ in self.recent)
        while self.recent and total - self.recent[0][0] >= cfg.window:
            total -= self.recent.pop(0)[0]
        if total >= cfg.window:
            rate = sum(a for _, a in self.recent) / total
            if rate < cfg.min_acceptance:
                self.paused_until = self.seen_steps + cfg.backoff_steps
                self.recent.clear()


def eligible(request: Request) -> bool:
    """Whether a request's next tokens may be guessed and verified: it needs only
    the tokens (no log-probabilities) and nothing that depends on the tokens
    before each one beyond the model and its grammar (repetition penalty,
    ``min_tokens``). A grammar is applied at each guessed position (the runner
    masks it as the grammar stands after the guesses before it)."""
    p = request.params
    return (
        p.logprobs is None
        and p.repetition_penalty == 1.0
        and request.num_output_tokens >= p.min_tokens
    )


class Proposer(Protocol):
    """Who guesses a decoding request's next tokens."""

    def draft(self, req: Request, k: int) -> list[int]:
        """Up to ``k`` guessed tokens following ``req.token_ids``."""
        ...


class NgramProposer:
    """Prompt lookup: guess that the text goes on as it did after the latest
    earlier occurrence of its last n tokens."""

    def __init__(self, cfg: SpeculativeConfig) -> None:
        self.cfg = cfg

    def draft(self, req: Request, k: int) -> list[int]:
        return self.propose(req.token_ids, k)

    def propose(self, tokens: list[int], k: int, n_min: int | None = None) -> list[int]:
        """Up to ``k`` guessed tokens following ``tokens`` ([] when no suffix of
        ``n_min`` (default ``prompt_lookup_min``) .. ``prompt_lookup_max`` tokens
        occurred before)."""
        n_max = min(self.cfg.prompt_lookup_max, len(tokens) - 1)
        if n_min is None:
            n_min = self.cfg.prompt_lookup_min
        for n in range(n_max, n_min - 1, -1):
            suffix = tokens[-n:]
            first = suffix[0]
            # Latest earlier occurrence: scan backwards from the one before the end.
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start] == first and tokens[start : start + n] == suffix:
                    follow = tokens[start + n : start + n + k]
                    if follow:
                        return follow
                    break
        return []
