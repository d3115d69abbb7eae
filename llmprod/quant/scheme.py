"""The int8 scheme: per-output-channel symmetric quantization and its reference.

For a weight ``W`` of shape ``[out_features, in_features]``::

    scale[n] = max_k |W[n, k]| / 127            float32, one per output row
    q[n, k]  = clamp(round(W[n, k] / scale[n]), -127, 127)      int8
    W[n, k] ~= q[n, k] * scale[n]               error <= scale[n] / 2

:func:`int8_linear_ref` is the slow, obviously correct matmul the runtime modules
are measured against.
"""

from __future__ import annotations

import torch

__all__ = ["dequantize_per_channel", "int8_linear_ref", "quantize_per_channel"]


def quantize_per_channel(
    weight: torch.Tensor,  # [out_features, in_features]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight matrix to int8 with one symmetric scale per output row.

    Args:
        weight: a finite 2-D floating tensor.

    Returns:
        ``(q, scales)``: int8 ``[out, in]`` and float32 ``[out]``, on the weight's
        device, with ``|weight - q * scales[:, None]| <= scales / 2`` per row (up to
        float32 rounding). An all-zero row gets the smallest normal scale and zeros.

    Raises:
        ValueError: the tensor is not 2-D floating point or holds inf/NaN.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"expected a 2-D floating weight, got shape {tuple(weight.shape)} "
            f"dtype {weight.dtype}"
        )
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight holds inf or NaN; it cannot be quantized")
    absmax = w.abs().amax(dim=1)
    scales = (absmax / 127.0).clamp_(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_per_channel(
    q: torch.Tensor,  # int8 [out_features, in_features]
    scales: torch.Tensor,  # [out_features]
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # [out_features, in_features]
    """Return ``q * scales[:, None]`` computed in float32, cast to ``dtype``."""
    return (q.to(torch.float32) * scales.to(torch.float32)[:, None]).to(dtype)


def int8_linear_ref(
    x: torch.Tensor,  # [..., in_features]
    q: torch.Tensor,  # int8 [out_features, in_features]
    scales: torch.Tensor,  # [out_features]
    bias: torch.Tensor | None = None,  # [out_features]
) -> torch.Tensor:  # [..., out_features]
    """Slow, obviously correct int8 linear: dequantize to float32 and multiply.

    Computed in float32 and returned in ``x``'s dtype. Tests and benchmarks compare
    the runtime modules with it.
    """
    w = dequantize_per_channel(q, scales)
    out = x.to(torch.float32) @ w.t()
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)


def _check_quantized_pair(q: torch.Tensor, scales: torch.Tensor, name: str) -> None:
    """Raise ValueError unless ``q`` is int8 2-D and ``scales`` has one per row."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(
            f"{name}: expected an int8 2-D weight, got {q.dtype} {tuple(q.shape)}"
        )
    if scales.dim() != 1 or scales.shape[0] != q.shape[0]:
        raise ValueError(
            f"{name}: scales of shape {tuple(scales.shape)} do not match a weight of "
            f"shape {tuple(q.shape)}"
        )
