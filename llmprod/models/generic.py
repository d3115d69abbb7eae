"""Any transformers decoder-only model, run by its own modeling code over the paged
KV cache.

transformers routes every attention call through its attention interface
(``ALL_ATTENTION_FUNCTIONS``). We register one more implementation,
``"llmprod_paged"``: it receives each layer's query, key and value after the
model's own projections, norms and rotary embeddings, stores the keys and values
in that layer's paged cache and attends with the engine's attention backend (the
torch backend or the Triton kernels). The flat batch runs as one "sequence" of
``num_tokens`` tokens with the real positions as ``position_ids``; the sequence
boundaries, block tables and slots travel in :class:`AttentionMetadata`, set for
the duration of a step in a thread-local, since transformers does not pass
arbitrary objects down to attention in every architecture.

What the model code hands to attention is honoured as given: ``scaling``
(attention scaling other than ``1/sqrt(head_dim)``, e.g. Gemma's
``query_pre_attn_scalar``), ``sliding_window`` (per layer, so Gemma 3's
interleaved local and global layers each get theirs) and ``softcap``. GQA and MQA
come from the key's head count. Tied embeddings, embedding scaling and final
logit soft-capping are the model's own code or applied in ``compute_logits``.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llmprod.errors import UnsupportedModelError
from llmprod.layers.attention.metadata import AttentionMetadata
from llmprod.models.loader import unsupported_layer_types

if TYPE_CHECKING:
    from llmprod.layers.attention.backend import AttentionBackend

logger = logging.getLogger("llmprod")

ATTN_IMPLEMENTATION = "llmprod_paged"

_step = threading.local()


class _Step:
    """What the attention function needs during one forward pass."""

    __slots__ = ("backend", "calls", "kv_caches", "meta")

    def __init__(
        self,
        backend: AttentionBackend,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> None:
        self.backend = backend
        self.kv_caches = kv_caches
        self.meta = meta
        self.calls = 0


def paged_attention_forward(
    module: nn.Module,
    query: torch.Tensor,  # [1, num_heads, num_tokens, head_dim]
    key: torch.Tensor,  # [1, num_kv_heads, num_tokens, head_dim]
    value: torch.Tensor,  # [1, num_kv_heads, num_tokens, head_dim]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface entry: store K/V, attend over the cache.

    Returns ``[1, num_tokens, num_heads, head_dim]`` as the interface expects.
    """
    step: _Step | None = getattr(_step, "current", None)
    if step is None:
        raise RuntimeError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} runs only inside an "
            "llmprod engine step"
        )
    layer = getattr(module, "layer_idx", None)
    if not isinstance(layer, int):
        layer = step.calls
    step.calls += 1
    kv_cache = step.kv_caches[layer]
    if key.shape[1] != kv_cache.shape[3] or key.shape[3] != kv_cache.shape[4]:
        raise UnsupportedModelError(
            f"layer {layer} has {key.shape[1]} KV heads of size {key.shape[3]}, but "
            f"the cache was sized for {kv_cache.shape[3]} x {kv_cache.shape[4]} "
            "(layers with different KV shapes are not supported)",
            "model",
        )
    if query.shape[0] != 1:
        raise RuntimeError("the paged attention path runs one flat batch")
    q = query[0].transpose(0, 1)  # [num_tokens, num_heads, head_dim]
    k = key[0].transpose(0, 1).contiguous()
    v = value[0].transpose(0, 1).contiguous()
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    window = int(sliding_window) if sliding_window else None
    cap = float(softcap) if softcap else None
    out = step.backend.forward(q, k, v, kv_cache, step.meta, scale, window, cap)
    return out.unsqueeze(0), None


def register_attention() -> None:
    """Make ``attn_implementation="llmprod_paged"`` known to transformers."""
    from transformers import AttentionInterface

    if ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)


class GenericForCausalLM(nn.Module):
    """A transformers ``*ForCausalLM`` behind the native models' interface.

    ``forward`` returns the final hidden states of the flat batch and
    ``compute_logits`` the logits of the rows that are sampled, so the runner,
    scheduler, sampler and caches treat both paths alike.
    """

    impl = "generic"

    def __init__(self, hf_model: Any) -> None:
        super().__init__()
        cfg: Any = hf_model.config
        self.hf_model = hf_model
        self.config = cfg
        if hf_model.get_output_embeddings() is None:
            raise UnsupportedModelError(
                f"{type(hf_model).__name__} has no output embeddings (not a causal LM)",
                "model",
            )
        self.num_layers = int(cfg.num_hidden_layers)
        heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        # Logit post-processing some causal LMs apply after lm_head.
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        self.logit_scale = getattr(cfg, "logit_scale", None)  # Cohere: multiply
        self.logits_scaling = getattr(cfg, "logits_scaling", None)  # Granite: divide

    # Looked up on the wrapped model each time (not registered twice), so a
    # module swapped in by quantization is the one that runs.
    @property
    def base(self) -> Any:
        return self.hf_model.base_model

    @property
    def lm_head(self) -> nn.Module:
        """The wrapped model's output embeddings."""
        return self.hf_model.get_output_embeddings()

    @property
    def plain_logits(self) -> bool:
        """Whether ``compute_logits`` is ``lm_head(hidden)``, nothing after it."""
        return (
            self.final_softcap is None
            and self.logit_scale is None
            and self.logits_scaling is None
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # int64 [num_tokens]
        positions: torch.Tensor,  # int64 [num_tokens]
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        backend.prepare(meta)
        step = _Step(backend, kv_caches, meta)
        previous = getattr(_step, "current", None)
        _step.current = step
        try:
            out = self.base(
                input_ids=input_ids.unsqueeze(0),
                position_ids=positions.unsqueeze(0),
                use_cache=False,
            )
        finally:
            _step.current = previous
        if step.calls != self.num_layers:
            raise UnsupportedModelError(
                f"{type(self.hf_model).__name__} called attention {step.calls} times "
                f"for {self.num_layers} layers: its attention does not go through "
                "transformers' attention interface, so the generic path cannot run it",
                "model",
            )
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, vocab]
        logits = self.lm_head(hidden)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logits_scaling is not None:
            logits = logits / self.logits_scaling
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()


def check_generic_supported(config: Any) -> None:
    """Reject configs the generic path would run wrongly, naming the reason."""
    name = ", ".join(getattr(config, "architectures", None) or [config.model_type])
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{name} is an encoder-decoder model; llmprod runs decoder-only models",
            "model",
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(
            f"{name} uses bidirectional attention; llmprod's cache is causal", "model"
        )
    odd = unsupported_layer_types(config)
    if odd:
        raise UnsupportedModelError(
            f"{name} has layers of type {odd}; the generic path runs full and "
            "sliding-window attention layers only",
            "model",
        )


def build_generic(
    config: Any, path: Any, dtype: torch.dtype, device: torch.device
) -> GenericForCausalLM:
    """Load the checkpoint with transformers, attention routed to the paged cache.

    Raises:
        UnsupportedModelError: transformers has no causal-LM class for the
            config, or the model does not fit the generic path.
    """
    from transformers import AutoModelForCausalLM

    check_generic_supported(config)
    register_attention()
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION
        )
    except ValueError as exc:
        archs = ", ".join(getattr(config, "architectures", None) or [])
        raise UnsupportedModelError(
            f"transformers cannot load {archs or config.model_type} as a causal LM "
            f"with a custom attention implementation: {exc}",
            "model",
        ) from exc
    hf_model = hf_model.to(device)  # type: ignore[arg-type]
    hf_model.eval().requires_grad_(False)
    model = GenericForCausalLM(hf_model)
    _smoke_test(model, device, dtype)
    return model


def _smoke_test(
    model: GenericForCausalLM, device: torch.device, dtype: torch.dtype
) -> None:
    """Run one token through a scratch cache: every layer must attend through us."""
    from llmprod.layers.attention import TorchAttentionBackend

    block = 16
    caches = [
        torch.zeros(
            2, 1, block, model.num_kv_heads, model.head_dim, dtype=dtype, device=device
        )
        for _ in range(model.num_layers)
    ]
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(1, dtype=torch.long, device=device),
        seq_lens=torch.ones(1, dtype=torch.int32, device=device),
        cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32, device=device),
        block_tables=torch.zeros(1, 1, dtype=torch.int32, device=device),
        block_size=block,
        seq_lens_host=[1],
        cu_seqlens_q_host=[0, 1],
        num_decodes=0,
        decode_groups=[],
    )
    ids = torch.zeros(1, dtype=torch.long, device=device)
    with torch.inference_mode():
        model(ids, ids.clone(), caches, meta, TorchAttentionBackend())
