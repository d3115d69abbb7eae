"""What the model runner needs from a model: the paged causal-LM protocol.

Both model paths satisfy it: the native :class:`~llmprod.models.llama.
LlamaForCausalLM` and the transformers wrapper :class:`~llmprod.models.generic.
GenericForCausalLM` (mypy checks both below; ``isinstance`` holds at run time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from llmprod.layers.attention.backend import AttentionBackend
    from llmprod.layers.attention.metadata import AttentionMetadata


@runtime_checkable
class PagedCausalLM(Protocol):
    """A decoder-only LM over a flat batch of tokens and a paged KV cache.

    ``forward`` returns the final hidden states of every token; the runner picks
    the rows it samples and calls ``compute_logits`` on those only.
    """

    num_layers: int
    """Attention layers, one KV cache each."""
    num_kv_heads: int
    """KV heads per layer (the cache's fourth dimension)."""
    head_dim: int
    """Size of one head (the cache's last dimension)."""

    @property
    def impl(self) -> str:
        """Which path: "native" (llmprod's model code) or "generic" (transformers')."""
        ...

    @property
    def plain_logits(self) -> bool:
        """Whether ``compute_logits`` is ``lm_head(hidden)``, nothing after it."""
        ...

    @property
    def lm_head(self) -> nn.Module:
        """The output projection (hidden -> vocabulary)."""
        ...

    def forward(
        self,
        input_ids: torch.Tensor,  # int64 [num_tokens]
        positions: torch.Tensor,  # int64 [num_tokens]
        kv_caches: list[torch.Tensor],  # per layer
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        """Store each layer's K/V in ``kv_caches`` and return the hidden states."""
        ...

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        """``forward`` through ``nn.Module.__call__`` (hooks included)."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits ``[n, vocab]`` of ``hidden`` ``[n, hidden_size]``."""
        ...


if TYPE_CHECKING:
    from llmprod.models.generic import GenericForCausalLM
    from llmprod.models.llama import LlamaForCausalLM

    def _both_paths_conform(
        native: LlamaForCausalLM, generic: GenericForCausalLM
    ) -> tuple[PagedCausalLM, PagedCausalLM]:
        """Type-checked only: both models satisfy the protocol."""
        return native, generic
