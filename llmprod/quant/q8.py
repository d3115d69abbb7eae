"""GGUF's Q8_0 blocks held as they are: a token embedding and lm_head in 8.5 bits.

Q8_0 splits each row into blocks of 32 weights, each an int8 code and one
float16 scale per block: ``w = d * q``. The product of a float16 scale (exact in
float32) and an int8 code fits float32's 24-bit significand, so dequantizing a
block gives the float32 value the file expands to bit for bit, whatever the
order of operations. SmolLM2's GGUF stores its token embedding (tied to
lm_head) this way: 28 MB of codes and 1.8 MB of scales instead of 113 MB of
float32.

- :class:`Q8Embedding` looks up rows and dequantizes them: the float32
  embedding exactly.
- :class:`Q8Head` computes ``hidden @ W.T`` by dequantizing a slice of rows at a
  time into a small float32 buffer and multiplying it (the float32 product of the
  same weights, 1.1x-1.6x the time of the float32 product, measured in
  docs/quantization.md). Greedy steps rarely need it: greedy screening
  (:mod:`llmprod.layers.screened_head`) scores an int8 copy and rescores its
  few candidates from the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["Q8_BLOCK", "Q8Embedding", "Q8Head", "Q8Weight", "read_q8_0"]

Q8_BLOCK = 32
"""Weights per Q8_0 block."""

_HEAD_ROWS = 1024
"""Rows of W dequantized at a time by :class:`Q8Head` (2.4 MB of float32 at a
576-wide row, about a core's L2 cache; 512 and 2048 measured slower on a
2-core Xeon, 128 and 256 much slower)."""


@dataclass(frozen=True, slots=True)
class Q8Weight:
    """A ``[rows, cols]`` weight in Q8_0 blocks: ``codes`` int8 ``[rows, cols]``,
    ``scales`` float16 ``[rows, cols // 32]``."""

    codes: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows ``lo:hi`` in float32, exactly."""
        return _dequantize(self.codes[lo:hi], self.scales[lo:hi])

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """The rows ``index`` names, in float32, exactly."""
        return _dequantize(
            self.codes.index_select(0, index), self.scales.index_select(0, index)
        )

    def dequantize(self) -> torch.Tensor:
        return self.rows(0, self.shape[0])


def _dequantize(
    codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    n, k = codes.shape
    if out is None:
        out = torch.empty(n, k, dtype=torch.float32)
    # Convert, then scale in place: faster than a mixed-dtype multiply.
    view = out.view(n, k // Q8_BLOCK, Q8_BLOCK)
    view.copy_(codes.view(n, k // Q8_BLOCK, Q8_BLOCK))
    view.mul_(scales.to(torch.float32)[..., None])
    return out


def read_q8_0(raw: np.ndarray) -> Q8Weight:
    """A Q8_0 tensor's raw rows (uint8 ``[rows, 34 * blocks]``) as a Q8Weight."""
    rows = raw.shape[0]
    blocks = np.asarray(raw, dtype=np.uint8).reshape(rows, -1, 2 + Q8_BLOCK)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    q = blocks[..., 2:].copy().view(np.int8).reshape(rows, -1)
    return Q8Weight(
        torch.from_numpy(np.ascontiguousarray(q)),
        torch.from_numpy(np.ascontiguousarray(d)),
    )


class Q8Embedding(nn.Module):
    """A token embedding held in Q8_0 blocks; looks up rows and dequantizes them.

    Args:
        weight: the blocks.
        dtype: the dtype of the looked-up rows (the model's).
    """

    def __init__(self, weight: Q8Weight, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.q8 = weight
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        out = self.q8.gather(flat).to(self.dtype)
        return out.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, Q8_0"


class Q8Head(nn.Module):
    """lm_head (no bias) held in Q8_0 blocks: ``hidden @ W.T`` in float32, the
    rows dequantized :data:`_HEAD_ROWS` at a time. A tied model's head shares its
    :class:`Q8Embedding`'s blocks."""

    def __init__(self, weight: Q8Weight) -> None:
        super().__init__()
        self.q8 = weight
        self.out_features, self.in_features = weight.shape

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        lead = hidden.shape[:-1]
        x = hidden.reshape(-1, self.in_features).to(torch.float32)
        vocab = self.out_features
        out = torch.empty(x.shape[0], vocab, dtype=torch.float32)
        buf = torch.empty(_HEAD_ROWS, self.in_features, dtype=torch.float32)
        codes, scales = self.q8.codes, self.q8.scales
        for lo in range(0, vocab, _HEAD_ROWS):
            hi = min(lo + _HEAD_ROWS, vocab)
            w = _dequantize(codes[lo:hi], scales[lo:hi], buf[: hi - lo])
            torch.mm(x, w.t(), out=out[:, lo:hi])
        return out.view(*lead, vocab)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q8_0"
