"""The two int8 runtime paths: which one runs here, and building its layers.

``"int8-wo"``
    :class:`~llmprod.quant.weight_only.WeightOnlyInt8Linear`: the fused
    ``aten._weight_int8pack_mm`` for few token rows, a GEMM on a dequantized copy
    for many.
``"int8-bnb"``
    bitsandbytes ``Linear8bitLt`` (LLM.int8 with an outlier threshold), imported
    lazily. The choice on CUDA.

``"auto"`` (alias ``"int8"``) takes ``"int8-bnb"`` on CUDA and ``"int8-wo"`` on CPU,
where it measured fastest (docs/quantization.md).
"""

from __future__ import annotations

import torch
from torch import nn

from llmprod.quant.bnb_linear import (
    _bnb_tensors,
    _import_bnb,
    _is_bnb_linear,
    _make_bnb_linear,
)
from llmprod.quant.errors import Int8UnavailableError
from llmprod.quant.weight_only import WeightOnlyInt8Linear, is_int8pack_available

__all__ = ["METHODS", "resolve_method"]

METHODS: tuple[str, ...] = ("int8-wo", "int8-bnb")
"""The runtime paths, as :func:`resolve_method` returns them."""


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
    """The runtime layer of ``method`` holding ``q``, ``scales`` and ``bias``."""
    if method == "int8-wo":
        mod: nn.Module = WeightOnlyInt8Linear.from_quantized(
            q, scales, bias, compute_dtype=compute_dtype
        )
        mod.train(is_training)
        return mod
    return _make_bnb_linear(q, scales, bias, threshold, is_training)


def _quantized_tensors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(q, scales)`` if ``module`` is one of the int8 runtime modules, else None."""
    if isinstance(module, WeightOnlyInt8Linear):
        return module.weight, module.scales
    if type(module).__name__ == "Linear8bitLt" and _is_bnb_linear(module):
        return _bnb_tensors(module)
    return None
