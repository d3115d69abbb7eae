"""Quantizing a model: which linears, the two explicit steps, and the one-call form.

Two explicit steps, as in gpt-fast's ``quantize.py``:

1. :func:`create_quantized_state_dict` builds a state dict in which every selected
   linear's ``weight`` is int8 and a ``scales`` entry sits beside it.
2. :func:`convert_for_runtime` swaps the selected ``nn.Linear`` modules for runtime
   int8 modules, which the state dict then fills (``model.load_state_dict(sd,
   assign=True)``), or which it fills itself when given the state dict.

:func:`quantize_model` does both, one layer at a time (peak memory: the model plus
one layer's int8 copy), and is what the Engine calls. :func:`linear_weight_bytes`
measures what it saved.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from llmprod.config import DEFAULT_QUANTIZATION_SKIP
from llmprod.quant.bnb_linear import _is_bnb_linear
from llmprod.quant.footprint import _nbytes, _storage_key
from llmprod.quant.runtime import _quantized_tensors, _runtime_module, resolve_method
from llmprod.quant.scheme import quantize_per_channel
from llmprod.quant.weight_only import WeightOnlyInt8Linear

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SKIP",
    "convert_for_runtime",
    "create_quantized_state_dict",
    "linear_weight_bytes",
    "quantize_model",
]

DEFAULT_SKIP = DEFAULT_QUANTIZATION_SKIP
"""Modules kept in full precision by default (``config.DEFAULT_QUANTIZATION_SKIP``)."""


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
            if t.device.type != "meta":
                seen[_storage_key(t)] = _nbytes(t)
    return sum(seen.values())
