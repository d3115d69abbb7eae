"""int8 weight quantization for ``nn.Linear`` layers, with save and load.

Scheme: per-output-channel symmetric int8. For a weight ``W`` of shape
``[out_features, in_features]``::

    scale[n] = max_k |W[n, k]| / 127            float32, one per output row
    q[n, k]  = clamp(round(W[n, k] / scale[n]), -127, 127)      int8
    W[n, k] ~= q[n, k] * scale[n]               error <= scale[n] / 2

Two explicit steps, as in gpt-fast's ``quantize.py``:

1. :func:`create_quantized_state_dict` builds a state dict in which every selected
   linear's ``weight`` is int8 and a ``scales`` entry sits beside it.
2. :func:`convert_for_runtime` swaps the selected ``nn.Linear`` modules for runtime
   int8 modules, which the state dict then fills (``model.load_state_dict(sd,
   assign=True)``), or which it fills itself when given the state dict.

:func:`quantize_model` does both, one layer at a time (peak memory: the model plus
one layer's int8 copy), and is what the Engine calls.

Runtime paths (``method``):

``"int8-wo"``
    :class:`WeightOnlyInt8Linear`. Up to ``large_m_threshold`` token rows it calls the
    fused ``aten._weight_int8pack_mm`` (int8 weights are read as int8; nothing is
    dequantized up front), with activations in ``compute_dtype`` (bfloat16 by
    default). From that many rows on (prefill, big decode batches) the cost of
    turning the int8 weight into a GEMM operand once is shared by all the rows, and
    a plain GEMM on a dequantized copy, made in bounded row chunks, measured
    faster; see docs/quantization.md for the numbers behind both defaults.
``"int8-bnb"``
    bitsandbytes ``Linear8bitLt`` (LLM.int8 with an outlier threshold), imported
    lazily. The choice on CUDA.

``"auto"`` (alias ``"int8"``) takes ``"int8-bnb"`` on CUDA and ``"int8-wo"`` on CPU,
where it measured fastest (docs/quantization.md).

Files: :func:`save_quantized` writes one safetensors file (int8 weights, float32
scales, the other tensors as they are) with a metadata header; :func:`load_quantized`
checks it against the model and installs it without quantizing again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprod.config import DEFAULT_QUANTIZATION_SKIP

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Int8UnavailableError",
    "QuantizedCheckpointError",
    "WeightOnlyInt8Linear",
    "convert_for_runtime",
    "create_quantized_state_dict",
    "dequantize_per_channel",
    "int8_linear_ref",
    "is_int8pack_available",
    "linear_weight_bytes",
    "load_quantized",
    "quantize_model",
    "quantize_per_channel",
    "read_quantized_metadata",
    "resolve_method",
    "save_quantized",
]

DEFAULT_SKIP = DEFAULT_QUANTIZATION_SKIP
METHODS: tuple[str, ...] = ("int8-wo", "int8-bnb")
FORMAT_NAME = "llmprod-int8"
FORMAT_VERSION = 1
SCHEME = "per-channel-symmetric-int8"

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


class Int8UnavailableError(RuntimeError):
    """No int8 path can run here (no usable fused op, no bitsandbytes)."""


class QuantizedCheckpointError(ValueError):
    """A quantized file is corrupt, of an unknown format, or made for another model."""


# --------------------------------------------------------------------------------------
# Quantization math and the reference matmul
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Platform checks
# --------------------------------------------------------------------------------------


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


def _import_bnb() -> Any:
    """Import bitsandbytes (it takes seconds, so only when asked for)."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise Int8UnavailableError(
            "method 'int8-bnb' needs bitsandbytes: pip install 'bitsandbytes>=0.45' "
            "(or install llmprod[int8])"
        ) from exc
    return bitsandbytes


def resolve_method(method: str, device: torch.device | str = "cpu") -> str:
    """Map a requested method to the one that will run on ``device``.

    Args:
        method: ``"auto"`` (or ``"int8"``), ``"int8-wo"`` or ``"int8-bnb"``.
        device: where the weights live.

    Returns:
        ``"int8-wo"`` or ``"int8-bnb"``. ``"auto"`` takes bitsandbytes on CUDA and the
        fused weight-only path on CPU (measured fastest, docs/quantization.md),
        falling back to the other where the first cannot run.

    Raises:
        ValueError: unknown method.
        Int8UnavailableError: the method (or, for ``"auto"``, every method) cannot run
            on this platform.
    """
    device = torch.device(device)
    if method not in ("auto", "int8", *METHODS):
        raise ValueError(
            f"unknown int8 method {method!r}; expected one of "
            f"'auto', 'int8', 'int8-wo', 'int8-bnb'"
        )
    if method == "int8-wo":
        if not is_int8pack_available(device.type):
            raise Int8UnavailableError(
                f"method 'int8-wo' needs torch.ops.aten._weight_int8pack_mm on "
                f"{device.type}, which this torch ({torch.__version__}) lacks or "
                f"cannot run"
            )
        return method
    if method == "int8-bnb":
        _import_bnb()
        return method
    order = (
        ("int8-bnb", "int8-wo") if device.type == "cuda" else ("int8-wo", "int8-bnb")
    )
    reasons = []
    for candidate in order:
        try:
            return resolve_method(candidate, device)
        except Int8UnavailableError as exc:
            reasons.append(str(exc))
    raise Int8UnavailableError(
        f"int8 quantization cannot run on {device.type} here: " + "; ".join(reasons)
    )


# --------------------------------------------------------------------------------------
# Runtime module
# --------------------------------------------------------------------------------------


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        """Apply the layer; the result has ``x``'s dtype."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] < self.large_m_threshold and self.uses_fused_kernel:
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


# --------------------------------------------------------------------------------------
# bitsandbytes runtime module
# --------------------------------------------------------------------------------------


def _make_bnb_linear(
    q: torch.Tensor,  # int8 [out_features, in_features]
    scales: torch.Tensor,  # float32 [out_features]
    bias: torch.Tensor | None,
    threshold: float,
    is_training: bool,
) -> nn.Module:
    """A ``Linear8bitLt`` holding ``q`` (bitsandbytes' row-major CB) and its scales.

    bitsandbytes stores the row absmax (SCB = 127 * scale); the exact float32 scales
    are kept beside it so that a save after load gives the same bytes.
    """
    bnb = _import_bnb()
    _check_quantized_pair(q, scales, "q")
    out_features, in_features = q.shape
    mod = bnb.nn.Linear8bitLt(
        in_features,
        out_features,
        bias=False,
        has_fp16_weights=False,
        threshold=threshold,
        device="meta",
    )
    q = q.detach().contiguous()
    scb = scales.detach().to(torch.float32) * 127.0
    mod.weight = bnb.nn.Int8Params(
        q, requires_grad=False, has_fp16_weights=False, CB=q, SCB=scb
    )
    if bias is not None:
        mod.bias = nn.Parameter(bias.detach(), requires_grad=False)
    else:
        mod.register_parameter("bias", None)
    mod.llmprod_scales = scales.detach().to(torch.float32)
    # bitsandbytes casts float32 activations to float16 itself, logging a warning on
    # every call; cast here instead and give the output back in the input's dtype.
    mod.register_forward_pre_hook(_bnb_cast_input)
    mod.register_forward_hook(_bnb_cast_output)
    # In training mode bitsandbytes' CPU path dequantizes the whole matrix per call.
    mod.train(is_training)
    return mod


def _bnb_cast_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0]
    module.llmprod_out_dtype = x.dtype
    if x.dtype == torch.float32:
        return (x.to(torch.float16), *args[1:])
    return None


def _bnb_cast_output(
    module: nn.Module, args: tuple[Any, ...], output: torch.Tensor
) -> torch.Tensor:
    dtype = getattr(module, "llmprod_out_dtype", output.dtype)
    return output if output.dtype == dtype else output.to(dtype)


def _is_bnb_linear(module: nn.Module) -> bool:
    # Any bitsandbytes linear (int8 or 4-bit) is already quantized: never re-select.
    return isinstance(module, nn.Linear) and type(module).__module__.startswith(
        "bitsandbytes"
    )


def _bnb_tensors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scales)`` of a ``Linear8bitLt`` in this module's canonical form."""
    weight: Any = module.weight
    state: Any = getattr(module, "state", None)
    cb = getattr(weight, "CB", None)
    if cb is None and state is not None:
        cb = state.CB
    if cb is None:
        cb = weight.data
    scb = getattr(weight, "SCB", None)
    if scb is None and state is not None:
        scb = state.SCB
    if cb.dtype != torch.int8 or scb is None:
        raise ValueError("this Linear8bitLt holds no int8 weights (not quantized yet)")
    scales = getattr(module, "llmprod_scales", None)
    if scales is None or scales.shape != scb.shape:
        scales = scb.to(torch.float32) / 127.0
    return cb, scales


def _quantized_tensors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(q, scales)`` if ``module`` is one of the int8 runtime modules, else None."""
    if isinstance(module, WeightOnlyInt8Linear):
        return module.weight, module.scales
    if type(module).__name__ == "Linear8bitLt" and _is_bnb_linear(module):
        return _bnb_tensors(module)
    return None


# --------------------------------------------------------------------------------------
# Selection, the two steps, and quantize_model
# --------------------------------------------------------------------------------------


def _is_skipped(name: str, skip: tuple[str, ...]) -> bool:
    """A module is skipped if an entry names it, a dotted suffix of it, or a parent.

    ``"lm_head"`` skips ``lm_head``; ``"mlp.down_proj"`` skips every layer's
    ``down_proj``; ``"model.layers.0"`` skips all of layer 0.
    """
    return any(
        name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip
    )


def _select_linears(
    model: nn.Module, skip: tuple[str, ...]
) -> Iterator[tuple[str, nn.Linear]]:
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.Linear)
            and not _is_bnb_linear(module)
            and not _is_skipped(name, skip)
        ):
            yield name, module


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_quantized_pair(q: torch.Tensor, scales: torch.Tensor, name: str) -> None:
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(
            f"{name}: expected an int8 2-D weight, got {q.dtype} {tuple(q.shape)}"
        )
    if scales.dim() != 1 or scales.shape[0] != q.shape[0]:
        raise ValueError(
            f"{name}: scales of shape {tuple(scales.shape)} do not match a weight of "
            f"shape {tuple(q.shape)}"
        )


def create_quantized_state_dict(
    model: nn.Module, skip: tuple[str, ...] = DEFAULT_SKIP
) -> dict[str, torch.Tensor]:
    """Step 1: the model's state dict with its selected linear weights in int8.

    Every ``nn.Linear`` (subclasses included) whose name is not in ``skip`` has its
    ``<name>.weight`` replaced by int8 and gets a float32 ``<name>.scales``; all other
    entries are the model's own tensors (not copies). The model is not changed.

    Args:
        model: a model with materialized (non-meta) weights.
        skip: module names to leave in full precision (see :func:`quantize_model`).

    Returns:
        The quantized state dict, ready for :func:`convert_for_runtime` and
        ``load_state_dict(..., assign=True)``, or for :func:`save_quantized`.
    """
    state = model.state_dict(keep_vars=False)
    for name, module in _select_linears(model, skip):
        q, scales = quantize_per_channel(module.weight)
        state[f"{name}.weight"] = q
        state[f"{name}.scales"] = scales
    return state


def _runtime_module(
    method: str,
    q: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    threshold: float,
    compute_dtype: torch.dtype,
    is_training: bool,
) -> nn.Module:
    if method == "int8-wo":
        mod: nn.Module = WeightOnlyInt8Linear.from_quantized(
            q, scales, bias, compute_dtype=compute_dtype
        )
        mod.train(is_training)
        return mod
    return _make_bnb_linear(q, scales, bias, threshold, is_training)


def convert_for_runtime(
    model: nn.Module,
    method: str = "int8-wo",
    *,
    skip: tuple[str, ...] = DEFAULT_SKIP,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    threshold: float = 6.0,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> nn.Module:
    """Step 2: swap linear layers for int8 runtime modules, in place.

    Without ``state_dict`` (gpt-fast style, ``"int8-wo"`` only) the selected layers
    become :class:`WeightOnlyInt8Linear` with placeholder buffers, to be filled by
    ``model.load_state_dict(quantized_state_dict, assign=True)``. With ``state_dict``
    the layers named by its ``<name>.scales`` entries are built from it directly, for
    either method; its other entries are not loaded.

    Args:
        model: the model to change.
        method: ``"int8-wo"``, ``"int8-bnb"`` or ``"auto"`` (resolved for the
            device of the first selected layer).
        skip: module names to leave alone (used without ``state_dict``).
        state_dict: output of :func:`create_quantized_state_dict`, or None.
        threshold: bitsandbytes outlier threshold (``"int8-bnb"`` only).
        compute_dtype: activation dtype of :class:`WeightOnlyInt8Linear`.

    Returns:
        The same model.

    Raises:
        ValueError: unknown method, or a state dict that does not fit the model.
        Int8UnavailableError: the method cannot run here.
    """
    targets: list[tuple[str, Any]]  # nn.Linear or an int8 runtime module
    if state_dict is None:
        targets = list(_select_linears(model, skip))
    else:
        names = _quantized_names(state_dict)
        targets = [(name, _get_linear(model, name)) for name in names]
    if not targets:
        return model
    method = resolve_method(method, _module_device(targets[0][1]))
    if state_dict is None and method != "int8-wo":
        raise ValueError(
            "convert_for_runtime(method='int8-bnb') needs state_dict=...: bitsandbytes "
            "modules cannot be filled by load_state_dict afterwards"
        )
    for name, linear in targets:
        if state_dict is None:
            new: nn.Module = WeightOnlyInt8Linear(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                compute_dtype=compute_dtype,
                device=linear.weight.device,
                dtype=linear.weight.dtype,
            )
            new.train(linear.training)
        else:
            q, scales = state_dict[f"{name}.weight"], state_dict[f"{name}.scales"]
            _check_fits(name, linear, q)
            bias = state_dict.get(f"{name}.bias")
            new = _runtime_module(
                method,
                q,
                scales,
                bias,
                threshold=threshold,
                compute_dtype=compute_dtype,
                is_training=linear.training,
            )
        _set_submodule(model, name, new)
    return model


def _quantized_names(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted(
        key[: -len(".scales")]
        for key in state_dict
        if key.endswith(".scales")
        and state_dict.get(key[: -len(".scales")] + ".weight") is not None
        and state_dict[key[: -len(".scales")] + ".weight"].dtype == torch.int8
    )


def _get_linear(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError as exc:
        raise ValueError(f"the model has no module {name!r}") from exc
    if not isinstance(module, nn.Linear) and _quantized_tensors(module) is None:
        raise ValueError(f"{name!r} is a {type(module).__name__}, not a linear layer")
    return module


def _check_fits(name: str, linear: Any, q: torch.Tensor) -> None:
    expected = (int(linear.out_features), int(linear.in_features))
    if tuple(q.shape) != expected:
        raise ValueError(
            f"{name}.weight: shape {tuple(q.shape)} does not match the model's "
            f"{expected}"
        )


def _module_device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def quantize_model(
    model: nn.Module,
    method: str = "auto",
    skip: tuple[str, ...] = DEFAULT_SKIP,
    threshold: float = 6.0,
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> str:
    """Quantize the model's linear layers to int8 in place, one layer at a time.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 16))
    >>> quantize_model(model, "int8-wo", skip=())
    'int8-wo'
    >>> model(torch.randn(2, 32)).shape
    torch.Size([2, 16])

    Args:
        model: a model with materialized weights (eval mode recommended: a
            bitsandbytes layer in training mode dequantizes per call on CPU).
        method: ``"auto"``/``"int8"`` (bitsandbytes on CUDA, the weight-only path on
            CPU), ``"int8-wo"`` or ``"int8-bnb"``.
        skip: module names kept in full precision; an entry matches a module's full
            name, a dotted suffix of it, or a parent (``"lm_head"``,
            ``"mlp.down_proj"``, ``"model.layers.0"``).
        threshold: bitsandbytes outlier threshold; activation columns with a value
            above it run in 16-bit (``0`` turns the decomposition off).
        compute_dtype: activation dtype of the weight-only path.

    Returns:
        The method that ran: ``"int8-wo"`` or ``"int8-bnb"``.

    Raises:
        ValueError: unknown method, nothing to quantize, or weights on the meta
            device or holding inf/NaN.
        Int8UnavailableError: int8 cannot run on this platform.
    """
    targets = list(_select_linears(model, skip))
    if not targets:
        raise ValueError(f"no nn.Linear to quantize in the model (skip={skip})")
    device = targets[0][1].weight.device
    if device.type == "meta":
        raise ValueError("the model's weights are on the meta device; load them first")
    resolved = resolve_method(method, device)
    before = linear_weight_bytes(model, skip)
    for name, linear in targets:
        q, scales = quantize_per_channel(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach()
        new = _runtime_module(
            resolved,
            q,
            scales,
            bias,
            threshold=threshold,
            compute_dtype=compute_dtype,
            is_training=linear.training,
        )
        _set_submodule(model, name, new)
    logger.info(
        "int8 quantization: method=%s, %d linear layers, linear weights %d -> %d bytes",
        resolved,
        len(targets),
        before,
        linear_weight_bytes(model, skip),
    )
    return resolved


# --------------------------------------------------------------------------------------
# Memory accounting
# --------------------------------------------------------------------------------------


def _held_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters(recurse=False)
    yield from module.buffers(recurse=False)
    for holder in (
        module,
        getattr(module, "state", None),
        getattr(module, "weight", None),
    ):
        for attr in ("_scales_c", "llmprod_scales", "CB", "SCB"):
            t = getattr(holder, attr, None)
            if isinstance(t, torch.Tensor):
                yield t


def linear_weight_bytes(model: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Bytes held by the model's linear layers: weights, scales, biases, caches.

    Counts ``nn.Linear`` (and bitsandbytes ``Linear8bitLt``) and
    :class:`WeightOnlyInt8Linear` modules whose name is not matched by ``skip``; a
    storage shared by several tensors (tied weights, bitsandbytes' CB) counts once.

    Args:
        model: the model.
        skip: module names to leave out; pass the ``skip`` given to
            :func:`quantize_model` to compare the quantized layers before and after.

    Returns:
        The byte count.
    """
    seen: dict[int, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, WeightOnlyInt8Linear)):
            continue
        if _is_skipped(name, skip):
            continue
        for t in _held_tensors(module):
            if t.device.type == "meta":
                continue
            if t.is_mkldnn:  # a packed oneDNN weight: opaque, never shared
                seen[id(t)] = t.numel() * t.element_size()
                continue
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# --------------------------------------------------------------------------------------
# Save and load
# --------------------------------------------------------------------------------------


def _canonical_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """The model's state dict with each int8 layer as ``weight`` + ``scales``."""
    state = model.state_dict()
    methods = set()
    for name, module in model.named_modules():
        pair = _quantized_tensors(module)
        if pair is None:
            continue
        methods.add(
            "int8-wo" if isinstance(module, WeightOnlyInt8Linear) else "int8-bnb"
        )
        for extra in ("SCB", "weight_format"):
            state.pop(f"{name}.{extra}", None)
        state[f"{name}.weight"], state[f"{name}.scales"] = pair
    if not methods:
        raise ValueError("the model has no int8 layers; quantize it first")
    return state, "+".join(sorted(methods))


def _layout(
    shapes: Mapping[str, tuple[int, ...]], quantized: list[str]
) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the full-precision model the tensors stand for."""
    extras = {f"{n}.{e}" for n in quantized for e in ("scales", "SCB", "weight_format")}
    return {k: tuple(v) for k, v in shapes.items() if k not in extras}


def _fingerprint(layout: Mapping[str, tuple[int, ...]], quantized: list[str]) -> str:
    blob = json.dumps(
        {"layout": sorted([k, list(v)] for k, v in layout.items()), "int8": quantized},
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _crc(t: torch.Tensor) -> int:
    flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return zlib.crc32(flat.numpy().data)


def _dedupe(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU tensors, each storage once; aliases map dropped -> kept key."""
    kept: dict[tuple[Any, ...], str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for key in sorted(state):
        t = state[key].detach()
        ident = (
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
        )
        if ident in kept:
            aliases[key] = kept[ident]
            continue
        kept[ident] = key
        # Fresh copies: safetensors refuses tensors that share storage.
        tensors[key] = t.to("cpu", copy=True).contiguous()
    return tensors, aliases


def save_quantized(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    source: str = "",
) -> None:
    """Write a quantized model to one safetensors file, atomically.

    The file holds every tensor of the state dict once (tied tensors are stored once
    and listed as aliases), int8 layers as ``<name>.weight`` (int8) and
    ``<name>.scales`` (float32), and string metadata: ``format``,
    ``format_version``, ``scheme``, ``method``, ``quantized_modules``, ``aliases``,
    ``source``, ``source_fingerprint`` (sha256 of the full-precision model's tensor
    names and shapes and of the quantized layer list) and ``crc32`` (per tensor).

    Args:
        model_or_state_dict: a model quantized by :func:`quantize_model` or
            :func:`convert_for_runtime`, or the output of
            :func:`create_quantized_state_dict`.
        path: destination file.
        source: free text naming the weights (e.g. ``"org/model@revision"``);
            :func:`load_quantized` can require it to match.

    Raises:
        ValueError: nothing in the input is int8.
    """
    if isinstance(model_or_state_dict, nn.Module):
        state, method = _canonical_state_dict(model_or_state_dict)
    else:
        state, method = dict(model_or_state_dict), "unspecified"
    quantized = _quantized_names(state)
    if not quantized:
        raise ValueError("no int8 layers to save (expected <name>.scales entries)")
    for name in quantized:
        _check_quantized_pair(state[f"{name}.weight"], state[f"{name}.scales"], name)
        state[f"{name}.scales"] = state[f"{name}.scales"].to(torch.float32)
    layout = _layout({k: tuple(v.shape) for k, v in state.items()}, quantized)
    tensors, aliases = _dedupe(state)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "scheme": SCHEME,
        "method": method,
        "quantized_modules": json.dumps(quantized),
        "aliases": json.dumps(aliases, sort_keys=True),
        "source": source,
        "source_fingerprint": _fingerprint(layout, quantized),
        "crc32": json.dumps({k: _crc(v) for k, v in tensors.items()}, sort_keys=True),
    }
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_quantized_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata header of a file written by :func:`save_quantized`.

    Reads the header only. Raises :class:`QuantizedCheckpointError` if the file is
    unreadable, not a llmprod int8 file, or of an unsupported format version.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise QuantizedCheckpointError(
            f"{path}: not a readable safetensors file ({exc})"
        ) from exc
    _check_metadata(meta, path)
    return dict(meta)


def _check_metadata(meta: Mapping[str, str], path: str | os.PathLike[str]) -> None:
    if meta.get("format") != FORMAT_NAME:
        raise QuantizedCheckpointError(
            f"{path}: not a {FORMAT_NAME} file (format={meta.get('format')!r})"
        )
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise QuantizedCheckpointError(
            f"{path}: format_version {meta.get('format_version')!r} is not supported "
            f"(this llmprod reads {FORMAT_VERSION}); quantize the model again"
        )
    if meta.get("scheme") != SCHEME:
        raise QuantizedCheckpointError(f"{path}: unknown scheme {meta.get('scheme')!r}")
    for field in ("quantized_modules", "aliases", "crc32", "source_fingerprint"):
        if field not in meta:
            raise QuantizedCheckpointError(f"{path}: metadata lacks {field!r}")


def _diff_layouts(
    model_layout: Mapping[str, tuple[int, ...]],
    file_layout: Mapping[str, tuple[int, ...]],
) -> str:
    missing = sorted(set(model_layout) - set(file_layout))
    extra = sorted(set(file_layout) - set(model_layout))
    shapes = sorted(
        f"{k}: file {file_layout[k]} vs model {model_layout[k]}"
        for k in set(model_layout) & set(file_layout)
        if model_layout[k] != file_layout[k]
    )
    parts = []
    if shapes:
        parts.append("shape mismatch " + "; ".join(shapes[:5]))
    if missing:
        parts.append("missing from the file " + ", ".join(missing[:5]))
    if extra:
        parts.append("not in the model " + ", ".join(extra[:5]))
    return "; ".join(parts)


def load_quantized(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    method: str = "auto",
    threshold: float = 6.0,
    compute_dtype: torch.dtype = torch.bfloat16,
    source: str | None = None,
    verify: bool = True,
) -> str:
    """Install a file written by :func:`save_quantized` into ``model``, in place.

    The model is the full-precision architecture (its weights may be random or on
    the meta device); its int8 layers are rebuilt from the file without quantizing,
    and every other tensor is loaded from the file. Nothing is changed if a check
    fails.

    Args:
        model: the model to fill.
        path: the file.
        method: runtime path, as in :func:`quantize_model`; the stored format does
            not depend on it.
        threshold: bitsandbytes outlier threshold.
        compute_dtype: activation dtype of the weight-only path.
        source: if given, must equal the ``source`` the file was saved with.
        verify: check each tensor's CRC-32 (about 7 GB/s here).

    Returns:
        The method that ran.

    Raises:
        QuantizedCheckpointError: (a ``ValueError``) unreadable or corrupt file,
            unknown format, other source, or tensors that do not fit the model.
        Int8UnavailableError: the method cannot run here.
    """
    from safetensors import safe_open

    meta = read_quantized_metadata(path)
    try:
        quantized = list(json.loads(meta["quantized_modules"]))
        aliases = dict(json.loads(meta["aliases"]))
        crcs = dict(json.loads(meta["crc32"]))
    except (ValueError, TypeError) as exc:
        raise QuantizedCheckpointError(f"{path}: malformed metadata ({exc})") from exc
    if source is not None and meta.get("source") != source:
        raise QuantizedCheckpointError(
            f"{path}: made from {meta.get('source')!r}, expected {source!r}"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if set(keys) != set(crcs):
                raise QuantizedCheckpointError(
                    f"{path}: tensor list does not match crc32"
                )
            # Clone: tensors read from the file are views that may sit off the
            # alignment the fused kernel needs.
            tensors = {k: f.get_tensor(k).clone() for k in keys}
    except QuantizedCheckpointError:
        raise
    except Exception as exc:
        raise QuantizedCheckpointError(f"{path}: cannot read tensors ({exc})") from exc
    if verify:
        bad = [k for k, t in tensors.items() if _crc(t) != crcs[k]]
        if bad:
            raise QuantizedCheckpointError(
                f"{path}: corrupt, CRC-32 mismatch in {', '.join(sorted(bad)[:5])}"
            )
    state = dict(tensors)
    for alias, target in aliases.items():
        if target not in tensors:
            raise QuantizedCheckpointError(
                f"{path}: alias {alias!r} -> missing {target!r}"
            )
        state[alias] = tensors[target]

    file_layout = _layout({k: tuple(v.shape) for k, v in state.items()}, quantized)
    if _fingerprint(file_layout, quantized) != meta["source_fingerprint"]:
        raise QuantizedCheckpointError(f"{path}: tensors do not match the header")
    model_state = model.state_dict()
    model_quantized = [
        n for n, m in model.named_modules() if _quantized_tensors(m) is not None
    ]
    model_layout = _layout(
        {k: tuple(v.shape) for k, v in model_state.items()}, model_quantized
    )
    diff = _diff_layouts(model_layout, file_layout)
    if diff:
        raise QuantizedCheckpointError(f"{path}: does not fit this model: {diff}")
    for name in quantized:
        module = _get_linear(model, name)
        q, scales = state[f"{name}.weight"], state[f"{name}.scales"]
        try:
            _check_quantized_pair(q, scales, name)
        except ValueError as exc:
            raise QuantizedCheckpointError(f"{path}: {exc}") from exc
        if scales.dtype != torch.float32 or not bool((scales > 0).all()):
            raise QuantizedCheckpointError(
                f"{path}: {name}.scales must be positive float32"
            )
        _check_fits(name, module, q)

    device = next((t.device for t in model_state.values()), torch.device("cpu"))
    if device.type == "meta":
        device = torch.device("cpu")
    resolved = resolve_method(method, device)
    for name in quantized:
        old = model.get_submodule(name)
        bias = state.get(f"{name}.bias")
        new = _runtime_module(
            resolved,
            state[f"{name}.weight"].to(device),
            state[f"{name}.scales"].to(device),
            None if bias is None else bias.to(device),
            threshold=threshold,
            compute_dtype=compute_dtype,
            is_training=old.training,
        )
        _set_submodule(model, name, new)
    done = {f"{n}.{e}" for n in quantized for e in ("weight", "scales", "bias")}
    rest = {k: v for k, v in state.items() if k not in done}
    has_meta = any(t.device.type == "meta" for t in model.state_dict().values())
    result = model.load_state_dict(rest, strict=False, assign=has_meta)
    left = [k for k in result.missing_keys if k not in done]
    if left or result.unexpected_keys:
        raise QuantizedCheckpointError(
            f"{path}: partial load, missing {left[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}"
        )
    logger.info("loaded int8 model from %s (method=%s)", path, resolved)
    return resolved
