"""What a loaded model's weights hold, by format."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmprod.quant.int4 import WeightOnlyInt4Linear
from llmprod.quant.q8 import Q8Embedding, Q8Head
from llmprod.quant.weight_only import WeightOnlyInt8Linear

__all__ = ["weight_bytes_by_format"]


def _storage_key(t: torch.Tensor) -> int:
    if t.is_mkldnn:  # a packed oneDNN weight: opaque, never shared
        return id(t)
    return t.untyped_storage().data_ptr()


def _nbytes(t: torch.Tensor) -> int:
    if t.is_mkldnn:
        return t.numel() * t.element_size()
    return t.untyped_storage().nbytes()


def _format(t: torch.Tensor) -> str:
    return "int8" if t.dtype == torch.int8 else str(t.dtype).removeprefix("torch.")


def weight_bytes_by_format(model: nn.Module, *extra: Any) -> dict[str, int]:
    """Resident bytes of the model's weights, keyed by format: ``"int4"`` (codes,
    scales and minimums of int4 layers), ``"int8"`` (int8 layers, with their
    scales), ``"q8_0"`` (a GGUF Q8_0 embedding or lm_head, codes and scales),
    and the dtype name of every other parameter and buffer (``"float32"``...). A storage shared by several tensors (tied embeddings)
    counts once. ``extra``: other holders of weight copies (the greedy head's
    int8 lm_head), whose tensor attributes count too.

    >>> weight_bytes_by_format(torch.nn.Linear(4, 2))
    {'float32': 40}
    """
    seen: set[int] = set()
    out: dict[str, int] = {}

    def add(fmt: str, t: torch.Tensor | None) -> None:
        if t is None or t.device.type == "meta":
            return
        key = _storage_key(t)
        if key in seen:
            return
        seen.add(key)
        out[fmt] = out.get(fmt, 0) + _nbytes(t)

    for module in model.modules():
        if isinstance(module, WeightOnlyInt4Linear):
            for t in (module._packed, module._q, module.scales, module.mins,
                      module._scale_zeros):  # fmt: skip
                add("int4", t)
            add("float32", module.bias)
            continue
        if isinstance(module, (Q8Embedding, Q8Head)):
            add("q8_0", module.q8.codes)
            add("q8_0", module.q8.scales)
            continue
        if isinstance(module, WeightOnlyInt8Linear):
            add("int8", module.weight)
            add("int8", module.scales)
            add("int8", module._scales_c)
            if module.bias is not None:
                add(str(module.bias.dtype).removeprefix("torch."), module.bias)
            continue
        for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            add(_format(t), t)
    for holder in extra:
        if holder is None:
            continue
        for value in vars(holder).values() if hasattr(holder, "__dict__") else ():
            if isinstance(value, torch.Tensor):
                add(_format(value), value)
    return dict(sorted(out.items()))
