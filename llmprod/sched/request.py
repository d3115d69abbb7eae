"""A request's state inside the engine (CPU bookkeeping, no torch)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from llmprod.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    """One prompt being served.

    ``token_ids`` holds the prompt followed by the generated tokens;
    ``num_computed_tokens`` of them have their KV in the cache.

    One writer per phase: admission fills the fields given at construction and
    ``generator``/``ticket``/``flags``; the scheduler the scheduling state
    (``status``, ``num_computed_tokens``, ``num_cached_tokens``,
    ``first_scheduled_time``, ``num_preemptions``, ``finish_reason`` when it ends
    a request); the KV manager the block state (``block_ids``, ``block_hashes``,
    ``num_registered_blocks``); the engine's output phase the outputs
    (``token_ids`` past the prompt, ``logprobs``, ``prompt_logprobs``,
    ``stop_reason``, times, ``compute_s``). The runner and sampler only read.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    tenant: str = "default"
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    """Prefix hashes of the full blocks of known tokens (``llmprod.kv.hash_block``)."""
    cache_keys: tuple[str, ...] = ()
    """Extra keys of every prefix hash: what else decides the KV (a cache scope,
    an adapter's content hash). Requests with other keys share no KV blocks."""
    num_registered_blocks: int = 0
    """Leading blocks already registered in the prefix map."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache at first scheduling."""
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    compute_s: float = 0.0
    """This request's share of the model time of the steps it ran in."""
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    prompt_logprobs_done: bool = False
    prompt_logprobs: list[Any] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    seen_token_ids: set[int] | None = None
    """Tokens in prompt and output, kept only for the repetition penalty."""
    generator: Any = None
    """The request's own torch.Generator when it has a seed (set at admission;
    the sampler only draws from it)."""
    text: str | None = None
    """The prompt text (or a chat's last user message), for the semantic cache."""
    context: str | None = None
    """A chat's other messages, which a semantic hit must match exactly."""
    ticket: Any = None
    """The throttle's admission, released when the request ends."""
    flags: dict[str, Any] = field(default_factory=dict)
    """Signals gathered before the model runs (prompt guards)."""
    matcher: Any = None
    """A structured request's llguidance matcher (set at admission; the sampler
    reads its mask, the output phase feeds it each token)."""
    spec: Any = None
    """Its speculative decoding record (``llmprod.sched.speculative.SpecState``),
    kept by the scheduler when the engine speculates."""

    adapter: str | None = None
    """The LoRA adapter it runs with (its name), or None for the base model."""
    adapter_hash: str | None = None
    """That adapter's content hash: part of the prefix and answer cache keys."""
    adapter_pinned: bool = False
    """Set once the adapter is held for it (released when it ends)."""

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.params.repetition_penalty != 1.0:
            self.seen_token_ids = set(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def is_prefilling(self) -> bool:
        """True while some known tokens still lack KV (prompt or after preemption)."""
        return self.num_computed_tokens < len(self.token_ids) - 1

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if self.seen_token_ids is not None:
            self.seen_token_ids.add(token_id)
