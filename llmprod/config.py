"""Engine configuration: frozen dataclasses, validated at construction."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, TypeGuard

from llmprod.errors import InvalidConfigError
from llmprod.sampling_params import SEED_RANGE

if TYPE_CHECKING:
    from llmprod.cache.protocol import CacheBackend
    from llmprod.ops.guards import Guard
    from llmprod.ops.limits import TenantLimits, Throttle
    from llmprod.ops.pricing import PriceTable
    from llmprod.sched.speculative import SpeculativeConfig

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

CACHE_SCOPES = ("tenant", "shared")
"""Values of :attr:`EngineConfig.cache_scope`."""


# ---------------------------------------------------------------------- checks
def _fail(
    name: str, value: object, allowed: str, field: str | None = None
) -> InvalidConfigError:
    """The error of a bad option: its name, its value and what is allowed
    (``field``: the option, when ``name`` is one entry of it)."""
    return InvalidConfigError(f"{name}={value!r} is invalid: {allowed}", field or name)


def _is_int(x: object) -> TypeGuard[int]:
    """An int, not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def _is_finite(x: object) -> TypeGuard[int | float]:
    """An int or float, not a bool, not NaN or infinite."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_choice(name: str, value: object, choices: tuple[str | None, ...]) -> None:
    if not (value is None or isinstance(value, str)) or value not in choices:
        raise _fail(name, value, f"must be one of {choices}")


def _check_int(name: str, value: object, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not (_is_int(value) and value >= low):
        none = "None or " if optional else ""
        raise _fail(name, value, f"must be {none}an int >= {low}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise _fail(name, value, "must be True or False")


def _check_cache(name: str, value: object) -> None:
    """None, a URL ``scheme://...`` or an object with the cache backend methods
    (duck-typed: no backend is imported here)."""
    if value is None:
        return
    if isinstance(value, str):
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*://.*", value, re.DOTALL):
            raise _fail(name, value, "a cache URL must look like 'scheme://...'")
        return
    methods = ("get", "set", "delete", "close")
    missing = [m for m in methods if not callable(getattr(value, m, None))]
    if missing:
        raise _fail(
            name,
            value,
            "must be None, a cache URL or a backend with get/set/delete/close "
            f"(missing: {', '.join(missing)})",
        )


def _check_engine_ops(c: EngineConfig) -> None:
    """Check prices, limits and guards. Their modules import without torch or
    numpy, and only when the option is set."""
    if c.prices is not None:
        from llmprod.ops.pricing import PriceTable

        if not isinstance(c.prices, PriceTable):
            raise _fail("prices", c.prices, "must be None or a PriceTable")
    if c.limits is not None or c.default_limits is not None:
        from llmprod.ops.limits import TenantLimits, Throttle

        d = c.default_limits
        if d is not None and not isinstance(d, TenantLimits):
            raise _fail("default_limits", d, "must be None or TenantLimits")
        lim = c.limits
        if not (lim is None or isinstance(lim, (Mapping, Throttle))):
            raise _fail(
                "limits", lim, "must be None, {tenant: TenantLimits} or a Throttle"
            )
        for tenant, tl in lim.items() if isinstance(lim, Mapping) else ():
            if not isinstance(tenant, str) or not tenant:
                raise _fail("limits", lim, f"tenant {tenant!r} is not a non-empty str")
            if not isinstance(tl, TenantLimits):
                raise _fail(f"limits[{tenant!r}]", tl, "must be TenantLimits", "limits")
    if c.guards is not None and not isinstance(c.guards, (list, tuple)):
        raise _fail("guards", c.guards, "must be None or a list of guards")
    for i, g in enumerate(c.guards or ()):
        if not isinstance(getattr(g, "name", None), str) or not callable(
            getattr(g, "check", None)
        ):
            raise _fail(
                f"guards[{i}]",
                g,
                "a guard needs a str 'name' and a 'check(text, where)' method "
                "(llmprod.ops.guards.Guard)",
                "guards",
            )


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
        bs = self.block_size
        if bs is not None and not (_is_int(bs) and bs >= 1 and not bs & (bs - 1)):
            raise _fail("block_size", bs, "must be None or a power of two >= 1")
        _check_int("num_kv_blocks", self.num_kv_blocks, 2, optional=True)
        if self.kv_cache_memory is not None:
            parse_bytes(self.kv_cache_memory)
        _check_bool("enable_prefix_caching", self.enable_prefix_caching)


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
        _check_int("max_num_seqs", self.max_num_seqs, 1)
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        if self.max_num_seqs > self.max_num_batched_tokens:
            raise _fail(
                "max_num_seqs",
                self.max_num_seqs,
                f"must be <= max_num_batched_tokens={self.max_num_batched_tokens}",
            )
        w = self.max_wait_s
        if w is not None and not (_is_finite(w) and w >= 0):
            raise _fail(
                "max_wait_s", w, "must be None (no bound) or a finite number >= 0"
            )
        tw = self.tenant_weights
        if tw is None:
            return
        if not isinstance(tw, Mapping):
            raise _fail("tenant_weights", tw, "must be None or {tenant: weight}")
        for tenant, weight in tw.items():
            if not isinstance(tenant, str) or not tenant:
                raise _fail(
                    "tenant_weights", tw, f"tenant {tenant!r} is not a non-empty str"
                )
            if not (_is_finite(weight) and weight > 0):
                raise _fail(
                    f"tenant_weights[{tenant!r}]",
                    weight,
                    "must be a finite number > 0",
                    "tenant_weights",
                )
        object.__setattr__(self, "tenant_weights", dict(tw))


_DTYPES = ("auto", "float32", "float16", "bfloat16")
_BACKENDS = ("auto", "torch", "triton")
_QUANT = (None, "int8", "int8-wo", "int8-bnb", "int4", "gguf")
_MODEL_IMPLS = ("auto", "native", "generic")
_LINEAR_BACKENDS = ("auto", "onednn", "torch")
_SCREENING = ("auto", "on", "off")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything that shapes an Engine. Build it with keyword arguments of
    :meth:`llmprod.Engine.from_pretrained` (flat; routed to the sub-configs)."""

    dtype: str = "auto"
    """Weights and activations: "auto" (float32 on CPU, bfloat16 on CUDA),
    "float32", "float16" or "bfloat16". On a CPU with bf16 instructions
    (AVX-512 BF16, AMX) "bfloat16" runs its linear layers through oneDNN with
    float32 accumulation; it is faster, but a request's tokens may then change
    at ties with the rows beside it, so "auto" keeps float32 on the CPU
    (docs/concepts.md)."""
    device: str = "auto"
    """"auto" (CUDA when present), "cpu" or "cuda[:N]"."""
    max_model_len: int | None = None
    """Longest prompt + output; default: the model's context length."""
    attention_backend: str = "auto"
    """"auto" (Triton on CUDA, torch on CPU), "torch" or "triton"."""
    linear_backend: str = "auto"
    """Who computes the float32 and bfloat16 linear layers on CPU: "auto" (oneDNN
    on x86-64 where PyTorch has it, for bfloat16 only where the CPU has bf16
    instructions; else torch), "onednn" or "torch" (PyTorch's default path).
    Other dtypes and CUDA always use "torch"."""
    greedy_screening: str = "auto"
    """Greedy and plain temperature-sampling steps of a few rows on CPU pick their
    tokens without the full float32 lm_head product: an int8 copy scores every
    token, a proven error bound keeps the few that can be the argmax (or win the
    sampler's race, over the same noise), and those are scored in float32, so
    the token is the full product's. "auto" (where lm_head is a float32 linear
    layer or GGUF Q8_0 blocks and the int8 kernel runs), "on" (raise where it
    cannot) or "off". Costs an int8 copy of lm_head (a quarter of its float32
    bytes)."""
    fused_ops: str = "auto"
    """The decode step's small operations (residual add and RMSNorm, rotary
    embedding, the SiLU gate, decode attention over the paged cache) as one C
    call each, compiled once per machine with the system C compiler
    (llmprod.layers.cpu). "auto" (on for the native model in float32 on the CPU
    with the torch attention backend, where a compiler is found; else torch
    operations, the reason logged once), "on" (raise where they cannot run) or
    "off"."""
    model_impl: str = "auto"
    """"auto" (the native implementation where there is one, else transformers'
    modeling code with paged attention), "native" or "generic"."""
    quantization: str | None = None
    """None, "int8" (best measured path), "int8-wo", "int8-bnb", "int4"
    (groupwise 4-bit, quantized at load) or "gguf" (a GGUF model's own Q4_0/Q4_1
    weights, run as they are; docs/quantization.md)."""
    quantization_skip: tuple[str, ...] = DEFAULT_QUANTIZATION_SKIP
    """Modules quantization leaves in full precision (a name, a dotted suffix or
    a parent, e.g. "mlp.down_proj"); ``()`` quantizes lm_head too."""
    quantization_group_size: int = 32
    """Input weights per scale with ``quantization="int4"``: 32, 64 or 128 (it
    must divide every quantized layer's input width)."""
    cache: str | CacheBackend | None = None
    """Exact response cache: a URL ("memory://", "redis://127.0.0.1:6379/0",
    "diskcache:///dir", "s3://bucket/prefix"), a backend or a TieredCache."""
    semantic_cache: str | CacheBackend | None = None
    """Semantic response cache (MiniLM similarity): a URL, backend or TieredCache."""
    semantic_threshold: float | None = None
    """Cosine similarity of a semantic hit (None: :data:`DEFAULT_SEMANTIC_THRESHOLD`)."""
    cache_ttl: float | None = None
    """Lifetime of cached answers in seconds (None: until evicted)."""
    cache_scope: str = "tenant"
    """Who shares cached work: "tenant" (default) partitions the answer caches
    (exact, semantic) and the KV prefix cache by tenant, so a request reuses only
    its own tenant's answers and prompt KV; "shared" (opt-in) lets every tenant
    reuse every other tenant's entries."""
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
    allow_special_tokens_in_content: bool = False
    """Whether special-token text (e.g. ``"<|im_end|>"``) inside chat message
    content may become control tokens. False (default): it is tokenized as plain
    text, so a message cannot close its turn or open another role's."""
    speculative: SpeculativeConfig | Mapping[str, Any] | None = None
    """Speculative decoding: None (off), or ``{"method": "ngram",
    "num_speculative_tokens": 4, ...}`` / a
    :class:`llmprod.sched.speculative.SpeculativeConfig`
    (docs/speculative-decoding.md)."""
    tensor_parallel_size: int = 1
    """Processes the model is split over (tensor parallelism, docs/scaling.md):
    this one and N-1 workers it starts; the native path, float weights."""
    max_loras: int = 4
    """LoRA adapters held at once (``Engine.load_adapter``); loading one more
    evicts the least recently used adapter with no request in flight
    (docs/lora.md)."""
    max_lora_rank: int = 64
    """The largest LoRA rank ``load_adapter`` accepts."""
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    """The paged KV cache."""
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Continuous batching limits."""

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, _DTYPES)
        if not isinstance(self.device, str) or not re.fullmatch(
            r"auto|cpu|cuda(:[0-9]+)?", self.device
        ):
            raise _fail("device", self.device, "must be 'auto', 'cpu' or 'cuda[:N]'")
        _check_int("max_model_len", self.max_model_len, 2, optional=True)
        _check_choice("attention_backend", self.attention_backend, _BACKENDS)
        _check_choice("linear_backend", self.linear_backend, _LINEAR_BACKENDS)
        _check_choice("greedy_screening", self.greedy_screening, _SCREENING)
        _check_choice("fused_ops", self.fused_ops, _SCREENING)
        _check_choice("model_impl", self.model_impl, _MODEL_IMPLS)
        _check_choice("quantization", self.quantization, _QUANT)
        skip = self.quantization_skip
        try:  # any iterable of names but a bare string; read once (a generator)
            names = None if isinstance(skip, (str, bytes)) else tuple(skip)
        except TypeError:
            names = None
        if names is None or not all(isinstance(x, str) for x in names):
            raise _fail("quantization_skip", skip, "must be a list of module names")
        object.__setattr__(self, "quantization_skip", names)
        gs = self.quantization_group_size
        if not (_is_int(gs) and gs in (32, 64, 128)):
            raise _fail("quantization_group_size", gs, "must be 32, 64 or 128")
        _check_cache("cache", self.cache)
        _check_cache("semantic_cache", self.semantic_cache)
        t = self.semantic_threshold
        if t is not None and not (_is_finite(t) and 0 < t <= 1):
            raise _fail("semantic_threshold", t, "must be None or a number in (0, 1]")
        ttl = self.cache_ttl
        if ttl is not None and not (_is_finite(ttl) and ttl > 0):
            raise _fail(
                "cache_ttl", ttl, "must be None or a finite number > 0 (seconds)"
            )
        _check_choice("cache_scope", self.cache_scope, CACHE_SCOPES)
        lo, hi = SEED_RANGE
        if not (_is_int(self.seed) and lo <= self.seed < hi):
            raise _fail("seed", self.seed, "must be an int in [-2**63, 2**64)")
        _check_int("num_threads", self.num_threads, 1, optional=True)
        _check_int("tensor_parallel_size", self.tensor_parallel_size, 1)
        _check_int("max_loras", self.max_loras, 1)
        _check_int("max_lora_rank", self.max_lora_rank, 1)
        _check_bool(
            "allow_special_tokens_in_content", self.allow_special_tokens_in_content
        )
        from llmprod.sched.speculative import SpeculativeConfig

        object.__setattr__(
            self, "speculative", SpeculativeConfig.parse(self.speculative)
        )
        if not isinstance(self.cache_config, CacheConfig):
            raise _fail("cache_config", self.cache_config, "must be a CacheConfig")
        if not isinstance(self.scheduler_config, SchedulerConfig):
            raise _fail(
                "scheduler_config", self.scheduler_config, "must be a SchedulerConfig"
            )
        _check_engine_ops(self)

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
        for name, kind, kw in (
            ("cache_config", CacheConfig, cache_kw),
            ("scheduler_config", SchedulerConfig, sched_kw),
        ):
            base = top.get(name, kind())
            if not isinstance(base, kind):
                raise _fail(name, base, f"must be a {kind.__name__}")
            top[name] = replace(base, **kw)
        return cls(**top)
