"""Attention over the paged KV cache: the seam between the model and the kernels.

- :mod:`~llmprod.layers.attention.backend`: the ``AttentionBackend`` protocol and
  ``get_attention_backend``.
- :mod:`~llmprod.layers.attention.metadata`: ``AttentionMetadata``, the batch
  description every backend reads.
- :mod:`~llmprod.layers.attention.torch_backend`: torch ops (the CPU path).
- :mod:`~llmprod.layers.attention.triton_backend`: the Triton kernels (the GPU
  path).
- :mod:`~llmprod.layers.attention.reference`: pure-torch references of the kernels.
"""

from __future__ import annotations

from llmprod.layers.attention.backend import AttentionBackend, get_attention_backend
from llmprod.layers.attention.metadata import AttentionMetadata
from llmprod.layers.attention.reference import paged_attention_ref, store_kv_ref
from llmprod.layers.attention.torch_backend import TorchAttentionBackend
from llmprod.layers.attention.triton_backend import TritonAttentionBackend

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "TorchAttentionBackend",
    "TritonAttentionBackend",
    "get_attention_backend",
    "paged_attention_ref",
    "store_kv_ref",
]
