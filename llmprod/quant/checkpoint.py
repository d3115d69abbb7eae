"""Saving and loading a quantized model: one safetensors file with a checked header.

:func:`save_quantized` writes one safetensors file (int8 weights, float32 scales,
the other tensors as they are) with a metadata header; :func:`load_quantized`
checks it against the model and installs it without quantizing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprod.quant.convert import (
    _check_fits,
    _get_linear,
    _quantized_names,
    _set_submodule,
)
from llmprod.quant.errors import QuantizedCheckpointError
from llmprod.quant.runtime import _quantized_tensors, _runtime_module, resolve_method
from llmprod.quant.scheme import _check_quantized_pair
from llmprod.quant.weight_only import WeightOnlyInt8Linear

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "load_quantized",
    "read_quantized_metadata",
    "save_quantized",
]

FORMAT_NAME = "llmprod-int8"
"""``format`` in the header of every file :func:`save_quantized` writes."""
FORMAT_VERSION = 1
"""``format_version`` written, and the only one read."""
SCHEME = "per-channel-symmetric-int8"
"""``scheme`` written, and the only one read (:mod:`llmprod.quant.scheme`)."""


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
