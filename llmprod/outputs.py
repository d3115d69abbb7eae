"""What the Engine returns: completions and stream deltas."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class Usage:
    """Token counts and cost of one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (not recomputed)."""
    cost: float = 0.0
    """Cost from the engine's price table; 0 on response-cache hits."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Timings:
    """Latency of one request, in seconds (None until known)."""

    queued_s: float | None = None
    """From submission to the first scheduled step."""
    ttft_s: float | None = None
    """From submission to the first generated token."""
    e2e_s: float | None = None
    """From submission to the end."""
    tpot_s: float | None = None
    """Mean time per output token after the first."""


@dataclass(slots=True)
class TokenLogprob:
    """Log-probability of one token and the top alternatives at its position."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)
    """Top alternatives: token id -> log-probability (raw model distribution)."""
    entropy: float | None = None
    """Entropy (nats) of the model's distribution at this position."""
    scored: dict[int, float] = field(default_factory=dict)
    """The tokens of ``SamplingParams.logprob_token_ids``: token id ->
    log-probability at this position (raw model distribution)."""


@dataclass(slots=True)
class Completion:
    """The result of one prompt."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    """"stop" (EOS, stop token or stop string), "length" or "abort"."""
    prompt_token_ids: list[int] = field(default_factory=list)
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended generation, if any."""
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    cache_hit: str | None = None
    """None, or the response-cache tier that answered (e.g. "memory", "redis")."""
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """One entry per prompt token; the first is None (nothing before it)."""
    flags: dict[str, Any] = field(default_factory=dict)
    """Safety and quality signals."""
    parsed: Any = None
    """The decoded JSON of a request with ``structured=StructuredOutputs(json=...)``
    (or ``json_object=True``) that finished; None otherwise."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Engine counters of this request: ``speculative`` (guesses drafted and
    accepted, acceptance rate, tokens per verification step) when it speculated."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (token-id keys of ``top`` become strings in JSON)."""
        return asdict(self)


@dataclass(slots=True)
class Delta:
    """One piece of a stream: the new text and tokens since the previous delta.

    Exactly one delta per request, the last, has ``finish_reason`` set; it also
    carries the final ``completion``.
    """

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    completion: Completion | None = None
