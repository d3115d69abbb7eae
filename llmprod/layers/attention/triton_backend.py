"""Attention over the paged KV cache with the Triton kernels (the GPU path)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from llmprod.layers.attention.metadata import AttentionMetadata


class TritonAttentionBackend:
    """The Triton kernels of ``llmprod.kernels`` (CUDA, or TRITON_INTERPRET=1)."""

    name = "triton"
    default_block_size = 16

    def __init__(self) -> None:
        kernels = importlib.import_module("llmprod.kernels")

        self._store_kv: Callable[..., None] = kernels.store_kv
        self._paged_attention: Callable[..., torch.Tensor] = kernels.paged_attention

    def prepare(self, meta: AttentionMetadata) -> None:
        """Nothing to build: the kernels read the metadata as it is."""
        return None

    def release(self) -> None:
        """Nothing held of the KV caches."""
        return None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """Store key/value with ``store_kv``, attend with ``paged_attention``."""
        self._store_kv(key, value, kv_cache, meta.slot_mapping)
        return self._paged_attention(
            query,
            kv_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.cu_seqlens_q,
            scale,
            sliding_window=sliding_window,
            softcap=softcap,
        )
