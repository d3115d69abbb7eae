"""The attention backend protocol and the choice of a backend for a device."""

from __future__ import annotations

import importlib.util
import os
from typing import Protocol, runtime_checkable

import torch

from llmprod.errors import InvalidConfigError
from llmprod.layers.attention.metadata import AttentionMetadata
from llmprod.layers.attention.torch_backend import TorchAttentionBackend
from llmprod.layers.attention.triton_backend import TritonAttentionBackend


@runtime_checkable
class AttentionBackend(Protocol):
    """Writes a layer's new K/V into its cache and attends over the cache."""

    name: str
    default_block_size: int
    """KV block size the engine uses when the config leaves it unset."""

    def prepare(self, meta: AttentionMetadata) -> None:
        """Build per-step state once, before the first layer runs."""

    def release(self) -> None:
        """Drop whatever the backend holds of the KV caches (the engine closes)."""

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Store key/value at ``meta.slot_mapping``, return attention output.

        ``sliding_window`` and ``softcap`` follow ``paged_attention_ref``."""
        ...


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """Pick a backend: "auto" = Triton on CUDA, torch elsewhere.

    Raises:
        InvalidConfigError: Triton asked for with no GPU and no TRITON_INTERPRET=1,
            or Triton not installed.
    """
    if name == "auto":
        name = "triton" if device.type == "cuda" and _has_triton() else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        if not _has_triton():
            raise InvalidConfigError(
                "attention_backend='triton' needs Triton: pip install 'llmprod[triton]'",
                "attention_backend",
            )
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise InvalidConfigError(
                "attention_backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 "
                f"for the slow CPU interpreter); this engine runs on {device.type!r}. "
                "Use attention_backend='torch' or 'auto'.",
                "attention_backend",
            )
        return TritonAttentionBackend()
    raise InvalidConfigError(
        f"attention_backend={name!r} must be 'auto', 'torch' or 'triton'",
        "attention_backend",
    )


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None
