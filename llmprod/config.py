"""Engine configuration: frozen dataclasses, validated at construction."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from llmprod.errors import InvalidConfigError

if TYPE_CHECKING:
    from llmprod.cache.protocol import CacheBackend
    from llmprod.ops.guards import Guard
    from llmprod.ops.limits import TenantLimits, Throttle
    from llmprod.ops.pricing import PriceTable

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "tb": 1000**4,
}


def parse_bytes(value: int | str, field_name: str = "kv_cache_memory") -> int:
    """Parse ``"1GiB"``, ``"512MB"`` or an int into a byte count.

    >>> parse_bytes("1GiB")
    1073741824
    """
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise InvalidConfigError(
                f"{field_name}={value!r} is not a size; use bytes or e.g. '512MiB', "
                "'1GiB'",
                field=field_name,
            )
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise InvalidConfigError(f"{field_name}={value!r} must be > 0", field_name)
    return n


DEFAULT_QUANTIZATION_SKIP: tuple[str, ...] = ("lm_head", "embed_tokens")
"""Modules int8 leaves in full precision unless told otherwise."""

DEFAULT_SEMANTIC_THRESHOLD = 0.90
"""Cosine similarity (MiniLM) at which a semantic cache lookup is a hit; measured
on paraphrase pairs in docs/caching.md."""


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int | None = None
    """Tokens per KV block; None: the attention backend's choice (8 on the torch
    backend, where it halves the slots left empty at no measured cost, 16 with
    the Triton kernels)."""
    kv_cache_memory: int | str | None = "1GiB"
    """Byte budget for the KV cache (all layers, keys and values)."""
    num_kv_blocks: int | None = None
    """Exact number of KV blocks; overrides ``kv_cache_memory`` when set."""
    enable_prefix_caching: bool = True
    """Reuse the KV of full blocks shared with earlier prompts."""

    def __post_init__(self) -> None:
        if self.block_size is not None and (
            self.block_size < 1 or self.block_size & (self.block_size - 1)
        ):
            raise InvalidConfigError(
                f"{self.block_size=} must be a power of two >= 1", "block_size"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise InvalidConfigError(
                f"{self.num_kv_blocks=} must be >= 2", "num_kv_blocks"
            )
        if self.kv_cache_memory is not None:
            parse_bytes(self.kv_cache_memory)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int = 64
    """Most sequences in one step."""
    max_num_batched_tokens: int = 1024
    """Token budget of one step (decodes count one each; prefills are chunked)."""
    max_wait_s: float | None = 10.0
    """Age bound of tenant fairness: a request waiting longer is admitted first."""
    tenant_weights: dict[str, float] | None = None
    """Relative shares of admission across tenants (default: equal)."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise InvalidConfigError(
                f"{self.max_num_seqs=} must be >= 1", "max_num_seqs"
            )
        if self.max_num_batched_tokens < 1:
            raise InvalidConfigError(
                f"{self.max_num_batched_tokens=} must be >= 1", "max_num_batched_tokens"
            )
        if self.max_num_seqs > self.max_num_batched_tokens:
            raise InvalidConfigError(
                f"{self.max_num_seqs=} must be <= {self.max_num_batched_tokens=}",
                "max_num_seqs",
            )


_DTYPES = ("auto", "float32", "float16", "bfloat16")
_BACKENDS = ("auto", "torch", "triton")
_QUANT = (None, "int8", "int8-wo", "int8-bnb")
_MODEL_IMPLS = ("auto", "native", "generic")
_LINEAR_BACKENDS = ("auto", "onednn", "torch")
_SCREENING = ("auto", "on", "off")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything that shapes an Engine. Build it with keyword arguments of
    :meth:`llmprod.Engine.from_pretrained` (flat; routed to the sub-configs)."""

    dtype: str = "auto"
    """Weights and activations: "auto" (float32 on CPU, bfloat16 on CUDA),
    "float32", "float16" or "bfloat16"."""
    device: str = "auto"
    """"auto" (CUDA when present), "cpu" or "cuda[:N]"."""
    max_model_len: int | None = None
    """Longest prompt + output; default: the model's context length."""
    attention_backend: str = "auto"
    """"auto" (Triton on CUDA, torch on CPU), "torch" or "triton"."""
    linear_backend: str = "auto"
    """Who computes the float32 linear layers on CPU: "auto" (oneDNN on x86-64
    where PyTorch has it, else torch), "onednn" or "torch" (PyTorch's default
    BLAS). Other dtypes and CUDA always use "torch"."""
    greedy_screening: str = "auto"
    """Greedy steps of a few rows on CPU pick their tokens without the full float32
    lm_head product: an int8 copy scores every token, a proven error bound keeps
    the few that can be the argmax, and those are scored in float32, so the token
    is the full product's. "auto" (where lm_head is a float32 linear layer and the
    int8 kernel runs), "on" (raise where it cannot) or "off". Costs an int8 copy
    of lm_head (a quarter of its float32 bytes)."""
    model_impl: str = "auto"
    """"auto" (the native implementation where there is one, else transformers'
    modeling code with paged attention), "native" or "generic"."""
    quantization: str | None = None
    """None, "int8" (best measured path), "int8-wo" or "int8-bnb"."""
    quantization_skip: tuple[str, ...] = DEFAULT_QUANTIZATION_SKIP
    """Modules int8 leaves in full precision (a name, a dotted suffix or a parent,
    e.g. "mlp.down_proj"); ``()`` quantizes lm_head too."""
    cache: str | CacheBackend | None = None
    """Exact response cache: a URL ("memory://", "redis://127.0.0.1:6379/0",
    "diskcache:///dir", "s3://bucket/prefix"), a backend or a TieredCache."""
    semantic_cache: str | CacheBackend | None = None
    """Semantic response cache (MiniLM similarity): a URL, backend or TieredCache."""
    semantic_threshold: float | None = None
    """Cosine similarity of a semantic hit (None: :data:`DEFAULT_SEMANTIC_THRESHOLD`)."""
    cache_ttl: float | None = None
    """Lifetime of cached answers in seconds (None: until evicted)."""
    seed: int = 0
    """Seed of the engine's generator for requests without their own seed."""
    num_threads: int | None = None
    """torch intra-op threads on CPU; None keeps torch's choice."""
    prices: PriceTable | None = None
    """A :class:`llmprod.ops.pricing.PriceTable`; None costs nothing."""
    limits: Mapping[str, TenantLimits] | Throttle | None = None
    """Per-tenant limits: ``{tenant: TenantLimits}`` or a ready
    :class:`llmprod.ops.limits.Throttle`; None: no limits."""
    default_limits: TenantLimits | None = None
    """:class:`llmprod.ops.limits.TenantLimits` for tenants not in ``limits``."""
    guards: Sequence[Guard] | None = None
    """Safety guards run on every prompt and output (``llmprod.ops.guards``)."""
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    """The paged KV cache."""
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Continuous batching limits."""

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise InvalidConfigError(f"{self.dtype=} must be one of {_DTYPES}", "dtype")
        if self.attention_backend not in _BACKENDS:
            raise InvalidConfigError(
                f"{self.attention_backend=} must be one of {_BACKENDS}",
                "attention_backend",
            )
        if self.linear_backend not in _LINEAR_BACKENDS:
            raise InvalidConfigError(
                f"{self.linear_backend=} must be one of {_LINEAR_BACKENDS}",
                "linear_backend",
            )
        if self.greedy_screening not in _SCREENING:
            raise InvalidConfigError(
                f"{self.greedy_screening=} must be one of {_SCREENING}",
                "greedy_screening",
            )
        if isinstance(self.quantization_skip, str) or not all(
            isinstance(x, str) for x in self.quantization_skip
        ):
            raise InvalidConfigError(
                f"{self.quantization_skip=} must be a list of module names",
                "quantization_skip",
            )
        object.__setattr__(self, "quantization_skip", tuple(self.quantization_skip))
        if self.model_impl not in _MODEL_IMPLS:
            raise InvalidConfigError(
                f"{self.model_impl=} must be one of {_MODEL_IMPLS}", "model_impl"
            )
        if self.quantization not in _QUANT:
            raise InvalidConfigError(
                f"{self.quantization=} must be one of {_QUANT}", "quantization"
            )
        if self.max_model_len is not None and self.max_model_len < 2:
            raise InvalidConfigError(
                f"{self.max_model_len=} must be >= 2", "max_model_len"
            )
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise InvalidConfigError(
                f"{self.device=} must be 'auto', 'cpu' or 'cuda[:N]'", "device"
            )

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Route flat keyword arguments to this config and its sub-configs.

        Unknown names raise :class:`~llmprod.errors.InvalidConfigError`.
        """
        own = {f.name for f in fields(cls)}
        cache_names = {f.name for f in fields(CacheConfig)}
        sched_names = {f.name for f in fields(SchedulerConfig)}
        top: dict[str, Any] = {}
        cache_kw: dict[str, Any] = {}
        sched_kw: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key in cache_names:
                cache_kw[key] = value
            elif key in sched_names:
                sched_kw[key] = value
            elif key in own:
                top[key] = value
            else:
                known = sorted(
                    (own | cache_names | sched_names)
                    - {"cache_config", "scheduler_config"}
                )
                raise InvalidConfigError(
                    f"unknown engine option {key!r}; accepted: {', '.join(known)}", key
                )
        top["cache_config"] = replace(
            top.get("cache_config", CacheConfig()), **cache_kw
        )
        top["scheduler_config"] = replace(
            top.get("scheduler_config", SchedulerConfig()), **sched_kw
        )
        return cls(**top)
