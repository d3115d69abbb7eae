"""``"int8-wo"``: the weight-only int8 linear layer and the fused kernel it calls.

:class:`WeightOnlyInt8Linear` holds int8 weights and float32 per-row scales. Up to
``large_m_threshold`` token rows it calls the fused ``aten._weight_int8pack_mm``
(int8 weights are read as int8; nothing is dequantized up front), with activations
in ``compute_dtype`` (bfloat16 by default). From that many rows on (prefill, big
decode batches) the cost of turning the int8 weight into a GEMM operand once is
shared by all the rows, and a plain GEMM on a dequantized copy, made in bounded row
chunks, measured faster; see docs/quantization.md for the numbers behind both
defaults.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from llmprod.quant.scheme import _check_quantized_pair, int8_linear_ref

__all__ = ["WeightOnlyInt8Linear", "is_int8pack_available"]

# aten._weight_int8pack_mm with 16-bit activations reads `in_features` in blocks of
# 16 and uses aligned vector loads: other widths crashed or returned garbage, and so
# did activations or weights not on a 32-byte boundary (torch 2.13, AVX-512 host).
# Inputs are therefore realigned, and other widths take the dequantizing path.
_FUSED_K_MULTIPLE = 16
_ALIGN_BYTES = 64

# Rows (tokens) from which the dequantize-then-GEMM path beats the fused kernel,
# measured on the SmolLM2-135M linear shapes (docs/quantization.md): about 32 where
# the CPU has native bf16 GEMM (AVX512-BF16/AMX), about 48 where the GEMM runs fp32.
_LARGE_M_NATIVE_BF16 = 32
_LARGE_M_FP32_GEMM = 48
# Upper bound on the transient dequantized copy in the large-M path.
_DEQUANT_CHUNK_BYTES = 32 * 1024 * 1024


@functools.cache
def is_int8pack_available(device_type: str = "cpu") -> bool:
    """Whether ``aten._weight_int8pack_mm`` exists and runs on ``device_type``.

    Runs the op once on a tiny aligned problem and checks the answer.
    """
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return False
    try:
        device = torch.device(device_type)
        gen = torch.Generator().manual_seed(0)
        q = torch.randint(-127, 128, (8, 32), dtype=torch.int8, generator=gen)
        scales = torch.rand(8, generator=gen) + 0.5
        x = torch.randn(2, 32, generator=gen)
        out = torch.ops.aten._weight_int8pack_mm(
            x.to(device, torch.bfloat16),
            q.to(device),
            scales.to(device, torch.bfloat16),
        )
        ref = int8_linear_ref(x.bfloat16().float(), q, scales.bfloat16().float())
        return bool(torch.allclose(out.float().cpu(), ref, rtol=2e-2, atol=2e-1))
    except Exception:  # any failure means "not usable here"
        return False


@functools.cache
def _has_native_bf16_gemm() -> bool:
    # Only CPUs with AVX512-BF16 or AMX run oneDNN's bf16 GEMM faster than fp32;
    # without them it measured about 4x slower. Reading ATen's dispatch level too
    # means ATEN_CPU_CAPABILITY=avx2 (used to emulate an AVX2 host) turns it off.
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None and fn():
            return True
    return False


def _gemm_dtype(compute_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """dtype of the large-M GEMM: the compute dtype where it runs fast, else fp32."""
    if device.type != "cpu" or compute_dtype == torch.float32:
        return compute_dtype
    if compute_dtype == torch.bfloat16 and _has_native_bf16_gemm():
        return torch.bfloat16
    return torch.float32


def _default_large_m_threshold() -> int:
    return _LARGE_M_NATIVE_BF16 if _has_native_bf16_gemm() else _LARGE_M_FP32_GEMM


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and starting on an ``_ALIGN_BYTES`` boundary."""
    t = t.contiguous()
    if t.data_ptr() % _ALIGN_BYTES:
        t = t.clone()  # the caching allocator hands out 64-byte aligned blocks
    return t


class WeightOnlyInt8Linear(nn.Module):
    """A linear layer holding int8 weights and float32 per-row scales.

    Buffers ``weight`` (int8 ``[out, in]``) and ``scales`` (float32 ``[out]``) are the
    state dict; ``bias`` stays in its original dtype. The output has the input's
    dtype; the matmul runs with activations in ``compute_dtype``.

    Args:
        in_features: input width.
        out_features: output width.
        bias: whether the layer has a bias.
        compute_dtype: activation dtype of the matmul: ``torch.bfloat16`` (default,
            fastest measured), ``torch.float16`` or ``torch.float32``.
        large_m_threshold: from this many token rows on, use the
            dequantize-then-GEMM path; ``None`` picks the measured default for this
            CPU.
        device: where to allocate.
        dtype: dtype of the bias.
    """

    weight: torch.Tensor
    scales: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        compute_dtype: torch.dtype = torch.bfloat16,
        large_m_threshold: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if compute_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(
                f"compute_dtype={compute_dtype} must be bf16, fp16 or fp32"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.large_m_threshold = (
            _default_large_m_threshold()
            if large_m_threshold is None
            else large_m_threshold
        )
        self.register_buffer(
            "weight",
            torch.zeros((out_features, in_features), dtype=torch.int8, device=device),
        )
        self.register_buffer(
            "scales", torch.ones(out_features, dtype=torch.float32, device=device)
        )
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(
                torch.zeros(out_features, dtype=dtype or torch.float32, device=device),
                requires_grad=False,
            )
        else:
            self.register_parameter("bias", None)
        # Scales in compute_dtype, rebuilt when `scales` changes (load, device move).
        self._scales_c: torch.Tensor | None = None
        self._scales_key: tuple[int, int, int] | None = None

    @classmethod
    def from_quantized(
        cls,
        q: torch.Tensor,  # int8 [out_features, in_features]
        scales: torch.Tensor,  # [out_features]
        bias: torch.Tensor | None = None,  # [out_features]
        **kwargs: Any,
    ) -> WeightOnlyInt8Linear:
        """Build the layer around already quantized tensors (no copy if aligned).

        Args:
            q: int8 weight.
            scales: per-row scales (stored as float32).
            bias: optional bias, kept in its dtype.
            **kwargs: ``compute_dtype`` and ``large_m_threshold``.
        """
        _check_quantized_pair(q, scales, "q")
        out_features, in_features = q.shape
        mod = cls(in_features, out_features, bias=False, device="meta", **kwargs)
        mod.weight = _aligned(q.detach())
        mod.scales = scales.detach().to(torch.float32)
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return mod

    @property
    def uses_fused_kernel(self) -> bool:
        """Whether small-M calls go through ``aten._weight_int8pack_mm``."""
        return (
            self.compute_dtype == torch.float32
            or self.in_features % _FUSED_K_MULTIPLE == 0
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}, "
            f"large_m_threshold={self.large_m_threshold}"
        )

    def _compute_scales(self) -> torch.Tensor:
        s = self.scales
        key = (s.data_ptr(), s._version, hash(s.device))
        if self._scales_c is None or self._scales_key != key:
            self._scales_c = s.to(self.compute_dtype)
            self._scales_key = key
        return self._scales_c

    fused_ops: Any = None
    """The fused CPU operations (``llmprod.layers.cpu.FusedOps``), set by the
    engine where they run: a one-row float32 product then goes through their
    int8 kernel (float32 activations and sums; 1.2x the bf16 kernel's speed
    reading the weight from memory, docs/benchmarks.md "Fused CPU operations")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        """Apply the layer; the result has ``x``'s dtype."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        ops = self.fused_ops
        if ops is not None and x2.shape[0] == 1 and x2.dtype == torch.float32:
            out = ops.int8_linear(x2.contiguous(), self.weight, self.scales)
        elif x2.shape[0] < self.large_m_threshold and self.uses_fused_kernel:
            if self.weight.data_ptr() % _ALIGN_BYTES:
                self.weight = _aligned(self.weight)
            out = torch.ops.aten._weight_int8pack_mm(
                _aligned(x2.to(self.compute_dtype)), self.weight, self._compute_scales()
            )
        else:
            out = self._dequant_matmul(x2)
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*lead, self.out_features)

    def _dequant_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """GEMM on a dequantized copy made in chunks of at most 32 MiB of rows.

        Each weight row is converted once per call, a cost shared by all the token
        rows; the per-row scales are applied to the output.
        """
        gd = _gemm_dtype(self.compute_dtype, x2.device)
        xg = x2.to(gd)
        n, k = self.weight.shape
        rows = max(1, _DEQUANT_CHUNK_BYTES // max(1, k * torch.finfo(gd).bits // 8))
        if rows >= n:
            out = torch.mm(xg, self.weight.to(gd).t())
        else:
            out = torch.empty(xg.shape[0], n, dtype=gd, device=xg.device)
            for start in range(0, n, rows):
                w = self.weight[start : start + rows].to(gd)
                out[:, start : start + rows] = torch.mm(xg, w.t())
        return out.mul_(self.scales.to(gd))
