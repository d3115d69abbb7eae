"""``"int8-bnb"``: int8 layers as bitsandbytes ``Linear8bitLt`` (LLM.int8).

bitsandbytes is imported lazily (it takes seconds), only when this path is asked
for. The layers hold the same per-row int8 weights as the weight-only path, with
an outlier threshold above which activation columns run in 16-bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmprod.quant.errors import Int8UnavailableError
from llmprod.quant.scheme import _check_quantized_pair


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
