"""Native Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) over the paged cache.

The model takes a flat batch of tokens (no padding) and calls the attention
backend for every layer. Projections are fused: q/k/v in one linear, gate/up in
another. Rotary embeddings use transformers' RoPE parameter functions and compute
cos/sin as its rotary module does, so every RoPE variant the config names matches
transformers exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from llmprod.layers.attention.metadata import AttentionMetadata

if TYPE_CHECKING:
    from llmprod.layers.attention.backend import AttentionBackend
    from llmprod.layers.cpu import FusedOps

_HAS_RMS_NORM = hasattr(F, "rms_norm")  # torch >= 2.4


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and _HAS_RMS_NORM:
            # The same operations as below, in one call (bit-equal in float32).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _input_dtype(linear: nn.Module) -> torch.dtype:
    """The dtype a linear layer computes in: bfloat16 for the int4 kernel, whose
    input would otherwise be converted on entry; float32 for the rest."""
    return getattr(linear, "compute_dtype", torch.float32)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _load_shard(
    param: torch.Tensor, loaded: torch.Tensor, sizes: list[int], shard: int
) -> None:
    """Copy checkpoint shard ``shard`` into its rows of a fused parameter."""
    rows = param.data.narrow(0, sum(sizes[:shard]), sizes[shard])
    if rows.shape != loaded.shape:
        raise ValueError(
            f"shard {shard}: expected {tuple(rows.shape)}, got {tuple(loaded.shape)}"
        )
    rows.copy_(loaded)


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = (
            getattr(config, "num_key_value_heads", None) or self.num_heads
        )
        self.head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        )
        self.scale = self.head_dim**-0.5
        self.sliding_window = layer_window(config, layer_idx)
        qkv_bias, o_bias = _attention_biases(config)
        sizes = [self.num_heads * self.head_dim] + [
            self.num_kv_heads * self.head_dim
        ] * 2
        self.qkv_proj = nn.Linear(config.hidden_size, sum(sizes), bias=qkv_bias)
        self.o_proj = nn.Linear(
            self.num_heads * self.head_dim, config.hidden_size, bias=o_bias
        )
        self.qkv_sizes = sizes
        # Read by load_weights: rows of each checkpoint shard in the fused weight.
        self.qkv_proj.shard_sizes = sizes  # type: ignore[assignment]

    def forward(
        self,
        hidden: torch.Tensor,  # [num_tokens, hidden_size]
        cos: torch.Tensor,  # [num_tokens, 1, head_dim]
        sin: torch.Tensor,  # [num_tokens, 1, head_dim]
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        # Queries and keys sit side by side in the fused output: rotate them in
        # one pass (elementwise, so the same values as rotating each).
        qk_width = self.qkv_sizes[0] + self.qkv_sizes[1]
        qk = qkv[:, :qk_width].view(n, self.num_heads + self.num_kv_heads, -1)
        qk = qk * cos + _rotate_half(qk) * sin
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, qk_width:].view(n, self.num_kv_heads, self.head_dim)
        out = backend.forward(q, k, v, kv_cache, meta, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))

    def forward_fused(
        self,
        x: torch.Tensor,  # the normed hidden states, in qkv_proj's input dtype
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        backend: Any,  # TorchAttentionBackend (its forward takes ``fused``)
        ops: FusedOps,
    ) -> torch.Tensor:
        """:meth:`forward` with the rotary embedding in one fused call (in place
        on the projection's output) and the decode rows' attention in another."""
        n = x.shape[0]
        qkv = self.qkv_proj(x).float()
        heads = self.num_heads + self.num_kv_heads
        qk = qkv[:, : self.qkv_sizes[0] + self.qkv_sizes[1]].view(n, heads, -1)
        ops.rope(qk, cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, heads * self.head_dim :].view(n, self.num_kv_heads, self.head_dim)
        out = backend.forward(
            q, k, v, kv_cache, meta, self.scale, self.sliding_window, fused=ops
        )
        return self.o_proj(out.view(n, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        inter = config.intermediate_size
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * inter, bias=bias)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=bias)
        self.gate_up_proj.shard_sizes = [inter, inter]  # type: ignore[assignment]
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(
                f"hidden_act={act!r} is not supported by the native Llama path"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    def forward_fused(self, x: torch.Tensor, ops: FusedOps) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        return self.down_proj(ops.silu_mul(gate_up, _input_dtype(self.down_proj)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        h = hidden + self.self_attn(
            self.input_layernorm(hidden), cos, sin, kv_cache, meta, backend
        )
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_fused(
        self,
        hidden: torch.Tensor,  # float32 residual stream, updated in place
        delta: torch.Tensor | None,  # the previous layer's output, not yet added
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        backend: Any,
        ops: FusedOps,
    ) -> torch.Tensor:
        """:meth:`forward` with each residual add fused into the RMSNorm after
        it: returns this layer's MLP output, still to be added to ``hidden``."""
        attn, mlp = self.self_attn, self.mlp
        norm = self.input_layernorm
        x = ops.add_rms_norm(
            hidden, delta, norm.weight, norm.eps, _input_dtype(attn.qkv_proj)
        )
        out = attn.forward_fused(x, cos, sin, kv_cache, meta, backend, ops)
        norm = self.post_attention_layernorm
        x = ops.add_rms_norm(
            hidden, out, norm.weight, norm.eps, _input_dtype(mlp.gate_up_proj)
        )
        return mlp.forward_fused(x, ops)


class LlamaModel(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = _rotary_module(config)


class LlamaForCausalLM(nn.Module):
    """Flat-batch Llama: ``forward`` returns hidden states, ``compute_logits`` the
    logits of the rows that are sampled."""

    impl = "native"
    plain_logits = True
    """``compute_logits`` is ``lm_head(hidden)``, nothing after it."""

    # HF checkpoint name -> (our parameter name, shard) for the fused projections.
    _FUSED = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        attn: LlamaAttention = self.model.layers[0].self_attn  # type: ignore[assignment]
        self.num_kv_heads = attn.num_kv_heads
        self.head_dim = attn.head_dim
        self.num_layers = config.num_hidden_layers
        self.fused_ops: FusedOps | None = None
        """Fused CPU operations for the step (:func:`llmprod.layers.cpu.
        fused_ops`), set by the engine for a float32 model on the CPU with the
        torch attention backend; None runs torch operations."""

    def forward(
        self,
        input_ids: torch.Tensor,  # int64 [num_tokens]
        positions: torch.Tensor,  # int64 [num_tokens]
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        hidden = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(hidden.unsqueeze(0), positions.unsqueeze(0))
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [num_tokens, 1, head_dim]
        backend.prepare(meta)
        ops = self.fused_ops
        if (
            ops is not None
            and backend.name == "torch"
            and hidden.dtype == torch.float32
            and hidden.is_cpu
        ):
            return self._forward_fused(hidden, cos, sin, kv_caches, meta, backend, ops)
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            hidden = layer(hidden, cos, sin, kv_cache, meta, backend)
        return self.model.norm(hidden)

    def _forward_fused(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        backend: Any,  # TorchAttentionBackend (its forward takes ``fused``)
        ops: FusedOps,
    ) -> torch.Tensor:
        hidden = hidden.contiguous()
        cos, sin = cos.contiguous(), sin.contiguous()
        delta: torch.Tensor | None = None
        layer: LlamaDecoderLayer
        for layer, kv_cache in zip(self.model.layers, kv_caches):  # type: ignore[assignment]
            delta = layer.forward_fused(
                hidden, delta, cos, sin, kv_cache, meta, backend, ops
            )
        norm: RMSNorm = self.model.norm
        return ops.add_rms_norm(hidden, delta, norm.weight, norm.eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, vocab] fp32
        return self.lm_head(hidden).float()

    def load_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        on_loaded: Callable[[str], None] | None = None,
    ) -> None:
        """Copy checkpoint tensors (transformers names) into the fused parameters.

        Args:
            weights: (name, tensor) pairs, in any order.
            on_loaded: called with a module's name (``"model.layers.0.mlp.
                down_proj"``, ``"model.embed_tokens"``) as soon as every parameter
                it holds is loaded, whole (all shards of a fused projection), so
                that a quantizing loader can swap it then and free its float32
                weight before the next ones are read. A tied lm_head is never
                reported: it is the embedding's weight.

        Raises:
            ValueError: a parameter is missing from the checkpoint or has the wrong
                shape.
        """
        params = dict(self.named_parameters(remove_duplicate=False))
        names = list(params)
        loaded: set[str] = set()
        # module name -> the loaded-set keys its parameters need.
        pending: dict[str, set[str]] = {}
        if on_loaded is not None:
            for pname in params:
                if self.tie_word_embeddings and pname == "lm_head.weight":
                    continue
                mod_name = pname.rpartition(".")[0]
                shards = getattr(self.get_submodule(mod_name), "shard_sizes", None)
                keys = (
                    {f"{pname}#{i}" for i in range(len(shards))} if shards else {pname}
                )
                pending.setdefault(mod_name, set()).update(keys)
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if self.tie_word_embeddings and name == "lm_head.weight":
                continue
            parts = name.split(".")
            shard = None
            if len(parts) >= 2 and parts[-2] in self._FUSED:
                fused, shard = self._FUSED[parts[-2]]
                name = ".".join([*parts[:-2], fused, parts[-1]])
            if name not in params:
                raise ValueError(
                    f"checkpoint tensor {name!r} has no place in the model"
                )
            param = params[name]
            if shard is not None:
                module = self.get_submodule(name.rsplit(".", 1)[0])
                sizes: list[int] = module.shard_sizes  # type: ignore[assignment]
                _load_shard(param, tensor, sizes, shard)
                key = f"{name}#{shard}"
            else:
                if param.shape != tensor.shape:
                    raise ValueError(
                        f"{name}: checkpoint shape {tuple(tensor.shape)} != "
                        f"model shape {tuple(param.shape)}"
                    )
                param.data.copy_(tensor)
                key = name
            loaded.add(key)
            del tensor, param
            mod_name = name.rpartition(".")[0]
            need = pending.get(mod_name)
            if need is not None and need <= loaded:
                del pending[mod_name]
                # Hold no reference to what the hook may swap out and free.
                for pname in [p for p in params if p.rpartition(".")[0] == mod_name]:
                    params[pname] = None  # type: ignore[assignment]
                assert on_loaded is not None
                on_loaded(mod_name)
        missing = [
            n
            for n in names
            if n not in loaded
            and not any(k.startswith(n + "#") for k in loaded)
            and not (self.tie_word_embeddings and n == "lm_head.weight")
        ]
        if missing:
            raise ValueError(
                f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}"
            )


def layer_window(config: Any, layer_idx: int) -> int | None:
    """The attention window of one layer (transformers' rule), None = full."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return int(window) if layer_types[layer_idx] == "sliding_attention" else None
    if config.model_type == "qwen2" and not getattr(
        config, "use_sliding_window", False
    ):
        return None
    return int(window)


def _attention_biases(config: Any) -> tuple[bool, bool]:
    if config.model_type == "qwen2":
        return True, False
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias


# RoPE types whose inverse frequencies change with the sequence length at run
# time: these keep transformers' own module (and its dynamic update).
_DYNAMIC_ROPE = frozenset({"dynamic", "longrope"})


def _rope_parameters(config: Any) -> tuple[str, float]:
    """(rope_type, rope_theta) from a transformers 5 or 4.x config."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return str(params.get("rope_type", "default")), float(params["rope_theta"])
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    return str(rope_type), float(config.rope_theta)


class RotaryEmbedding(nn.Module):
    """cos/sin tables computed as transformers' LlamaRotaryEmbedding computes them.

    Written here rather than imported because importing transformers' modeling
    code pulls in its generation utilities and with them TorchDynamo (and Triton
    where installed), over 100 MB of resident memory an engine never uses.
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        rope_type, theta = _rope_parameters(config)
        # On the CPU even inside a meta-device context (the model is built on
        # meta): factories on meta run through torch's Python reference ops,
        # whose first use imports TorchDynamo.
        with torch.device("cpu"):
            if rope_type == "default":
                dim = getattr(config, "head_dim", None) or (
                    config.hidden_size // config.num_attention_heads
                )
                exponent = torch.arange(0, dim, 2, dtype=torch.float) / dim
                inv_freq = 1.0 / (theta**exponent)
                scaling = 1.0
            else:
                from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

                inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
        self.attention_scaling = float(scaling)
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def _rotary_module(config: Any) -> nn.Module:
    """The rotary embedding for this config (the same cos/sin as transformers)."""
    if _rope_parameters(config)[0] in _DYNAMIC_ROPE:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        return LlamaRotaryEmbedding(config=config)
    return RotaryEmbedding(config)
