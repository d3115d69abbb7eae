"""Load a transformers-saved bitsandbytes int8 checkpoint into the native model.

transformers saves a model loaded with ``BitsAndBytesConfig(load_in_8bit=True)`` as,
per quantized linear layer, ``<name>.weight`` (int8 ``[out, in]``, row-major),
``<name>.SCB`` (float32 ``[out]``, the absmax of each row: scale = SCB / 127) and
``<name>.weight_format`` (uint8 scalar, 0 = row-major), with ``quantization_config``
(``quant_method: "bitsandbytes"``, ``load_in_8bit: true``) in ``config.json``. That
is the per-row symmetric int8 scheme of :mod:`llmprod.quant.scheme`, so the int8 rows
and scales are installed as they are, concatenated where the native model fuses
projections (q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``): no weight is
dequantized and nothing is quantized again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprod.errors import InvalidConfigError, ModelLoadError, UnsupportedModelError
from llmprod.quant.convert import _set_submodule
from llmprod.quant.errors import Int8UnavailableError, QuantizedCheckpointError
from llmprod.quant.runtime import _runtime_module, resolve_method
from llmprod.quant.scheme import dequantize_per_channel

logger = logging.getLogger("llmprod")

__all__ = [
    "SOURCE",
    "BnbCheckpointError",
    "is_bnb_int8_checkpoint",
    "load_bnb_int8_model",
]

#: ``engine.metrics().engine["quantization_source"]`` for these checkpoints.
SOURCE = "bitsandbytes-checkpoint"

# bitsandbytes' weight_format codes (transformers' LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING);
# only row-major int8 can be read without bitsandbytes' tiled-layout transforms.
_ROW_FORMAT = 0
_FORMAT_NAMES = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}


class BnbCheckpointError(QuantizedCheckpointError, ModelLoadError):
    """A bitsandbytes checkpoint whose tensors are missing, mismatched or unreadable.

    A :class:`~llmprod.quant.errors.QuantizedCheckpointError` (so a ``ValueError``) and
    a :class:`~llmprod.errors.ModelLoadError`.

    Attributes:
        field: the offending tensor or config field, e.g.
            ``"model.layers.0.self_attn.q_proj.SCB"``.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def _qconfig(hf_config: Any) -> Mapping[str, Any] | None:
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, Mapping):
        to_dict = getattr(qc, "to_dict", None)
        qc = to_dict() if callable(to_dict) else vars(qc)
    return qc


def is_bnb_int8_checkpoint(hf_config: Any) -> bool:
    """Whether the config describes a bitsandbytes int8 checkpoint this can load.

    Returns False for a plain (unquantized) config.

    Raises:
        UnsupportedModelError: a quantized checkpoint of another kind: bitsandbytes
            4-bit (``quantization_config.load_in_4bit``), or another
            ``quantization_config.quant_method`` (GPTQ, AWQ, ...). ``field`` names
            the config field.
    """
    qc = _qconfig(hf_config)
    if qc is None:
        return False
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise UnsupportedModelError(
            f"quantization_config.quant_method={method!r} is not supported: llmprod "
            "loads full-precision checkpoints and bitsandbytes int8 ones "
            "(quant_method='bitsandbytes', load_in_8bit=true)",
            "quantization_config.quant_method",
        )
    if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
        raise UnsupportedModelError(
            "quantization_config.load_in_4bit=true: bitsandbytes 4-bit checkpoints "
            "are not supported; load the full-precision model (optionally with "
            "quantization='int8') or a load_in_8bit checkpoint",
            "quantization_config.load_in_4bit",
        )
    if not (qc.get("load_in_8bit") or qc.get("_load_in_8bit")):
        raise UnsupportedModelError(
            "quantization_config (bitsandbytes) has neither load_in_8bit nor "
            "load_in_4bit set: not a checkpoint llmprod can read",
            "quantization_config.load_in_8bit",
        )
    if qc.get("llm_int8_has_fp16_weight"):
        raise UnsupportedModelError(
            "quantization_config.llm_int8_has_fp16_weight=true: the checkpoint holds "
            "16-bit training weights, not int8; not supported",
            "quantization_config.llm_int8_has_fp16_weight",
        )
    return True


class _PendingInt8(nn.Module):
    """Stands in for a linear layer whose int8 weights are installed after loading.

    Holds only the bias (filled by ``load_weights``) and ``shard_sizes``, so that
    the full-precision weight is never allocated.
    """

    def __init__(self, linear: Any) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.bias = linear.bias
        sizes = getattr(linear, "shard_sizes", None)
        if sizes is not None:
            self.shard_sizes = list(sizes)


def _native_name(model: nn.Module, hf_module: str) -> tuple[str, int | None]:
    """``(native module name, shard)`` of a checkpoint linear module name."""
    fused: Mapping[str, tuple[str, int]] = getattr(model, "_FUSED", {})
    parent, _, leaf = hf_module.rpartition(".")
    if leaf in fused:
        name, shard = fused[leaf]
        return (f"{parent}.{name}" if parent else name), shard
    return hf_module, None


def _tensor_index(files: list[Path]) -> tuple[dict[str, Path], set[str]]:
    """Tensor name -> file, and the names of the int8 tensors (headers only)."""
    from safetensors import safe_open

    index: dict[str, Path] = {}
    int8_names: set[str] = set()
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                    index[key] = f
                    if fh.get_slice(key).get_dtype() == "I8":
                        int8_names.add(key)
        except Exception as exc:  # safetensors raises its own error types
            raise BnbCheckpointError(
                f"{f}: not a readable safetensors file ({exc})", str(f)
            ) from exc
    return index, int8_names


def _read(index: Mapping[str, Path], keys: list[str]) -> Iterator[tuple[str, Any]]:
    """Tensors ``keys``, in order, opening each file once per run of keys."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for k in keys:
        by_file.setdefault(index[k], []).append(k)
    for f, ks in by_file.items():
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for k in ks:
                yield k, fh.get_tensor(k)


def _plan(
    model: nn.Module, index: Mapping[str, Path], int8_names: set[str]
) -> dict[str, dict[int | None, str]]:
    """Native linear modules to hold int8 -> {shard: checkpoint module name}.

    A checkpoint linear is int8 when its weight is int8 and it has an ``SCB``; a
    fused native module is int8 when every one of its shards is.

    Raises:
        BnbCheckpointError: an int8 weight without its ``SCB``, or the reverse.
    """
    int8_weights = {k[: -len(".weight")] for k in int8_names if k.endswith(".weight")}
    with_scb = {k[: -len(".SCB")] for k in index if k.endswith(".SCB")}
    no_scb = sorted(int8_weights - with_scb)
    if no_scb:
        raise BnbCheckpointError(
            f"{no_scb[0]}.weight is int8 but the checkpoint has no {no_scb[0]}.SCB "
            f"(its per-row absmax); {len(no_scb)} such layer(s): the bitsandbytes "
            "checkpoint is incomplete",
            f"{no_scb[0]}.SCB",
        )
    no_int8 = sorted(with_scb - int8_weights)
    if no_int8:
        raise BnbCheckpointError(
            f"{no_int8[0]}.SCB is present but {no_int8[0]}.weight is missing or "
            "not int8",
            f"{no_int8[0]}.weight",
        )

    groups: dict[str, dict[int | None, str]] = {}
    for hf_name in sorted(with_scb):
        native, shard = _native_name(model, hf_name)
        groups.setdefault(native, {})[shard] = hf_name
    plan: dict[str, dict[int | None, str]] = {}
    for native, shards in groups.items():
        try:
            linear = model.get_submodule(native)
        except AttributeError as exc:
            raise BnbCheckpointError(
                f"{next(iter(shards.values()))}.weight has no place in the model",
                f"{next(iter(shards.values()))}.weight",
            ) from exc
        if not isinstance(linear, nn.Linear):
            raise BnbCheckpointError(
                f"{native} is a {type(linear).__name__}, not a linear layer",
                native,
            )
        sizes = getattr(linear, "shard_sizes", None)
        expected: set[int | None] = set(range(len(sizes))) if sizes else {None}
        if set(shards) == expected:
            plan[native] = shards
        else:
            # A fused projection with some shards left in full precision (e.g. by
            # llm_int8_skip_modules): load the whole of it in full precision.
            logger.warning(
                "%s: only some of its fused shards are int8 in the checkpoint; "
                "loading it dequantized to full precision",
                native,
            )
    return plan


def _check_pair(
    name: str, q: torch.Tensor, scb: torch.Tensor, rows: int, cols: int
) -> None:
    """Validate one checkpoint linear's int8 weight and SCB."""
    if q.dtype != torch.int8 or tuple(q.shape) != (rows, cols):
        raise BnbCheckpointError(
            f"{name}.weight: {q.dtype} {tuple(q.shape)} does not fit the model's "
            f"int8 {(rows, cols)}",
            f"{name}.weight",
        )
    if scb.dim() != 1 or scb.shape[0] != rows:
        raise BnbCheckpointError(
            f"{name}.SCB: shape {tuple(scb.shape)} does not match its weight "
            f"{tuple(q.shape)} (expected ({rows},), one absmax per output row)",
            f"{name}.SCB",
        )
    if not scb.is_floating_point():
        raise BnbCheckpointError(
            f"{name}.SCB: dtype {scb.dtype} is not a float", f"{name}.SCB"
        )
    if not bool(torch.isfinite(scb).all()) or bool((scb < 0).any()):
        raise BnbCheckpointError(
            f"{name}.SCB holds negative, inf or NaN values: corrupt checkpoint",
            f"{name}.SCB",
        )


def _check_format(name: str, fmt: torch.Tensor) -> None:
    code = int(fmt.reshape(-1)[0]) if fmt.numel() else -1
    if fmt.numel() != 1 or code != _ROW_FORMAT:
        raise BnbCheckpointError(
            f"{name}.weight_format={_FORMAT_NAMES.get(code, code)!r}: only "
            "row-major int8 weights ('row', 0) can be loaded; save the checkpoint "
            "with bitsandbytes >= 0.45 (which stores row-major)",
            f"{name}.weight_format",
        )


def load_bnb_int8_model(
    hf_config: Any,
    path: Path,
    dtype: torch.dtype,
    device: torch.device,
    method: str | None = None,
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> tuple[nn.Module, str]:
    """Build the native model for a bitsandbytes int8 folder and fill it.

    Non-quantized tensors (embeddings, norms, full-precision layers) load as in
    :func:`~llmprod.models.loader.build_model`, in ``dtype``; each int8 layer is
    installed from its int8 rows and ``SCB / 127`` scales without dequantizing.

    Args:
        hf_config: the folder's config (checked by :func:`is_bnb_int8_checkpoint`).
        path: the folder.
        dtype: dtype of the full-precision tensors.
        device: where the model lives.
        method: ``None``, ``"int8"`` or ``"auto"`` (the faster path here, as
            :func:`~llmprod.quant.runtime.resolve_method` picks for ``"int8"``),
            ``"int8-wo"`` or ``"int8-bnb"``.
        compute_dtype: activation dtype of the weight-only path.

    Returns:
        ``(model, method that ran)``.

    Raises:
        UnsupportedModelError: architecture or quantization kind not supported.
        InvalidConfigError: the method cannot run here (``field="quantization"``).
        BnbCheckpointError: missing, mismatched or corrupt quantized tensors
            (``field`` names the tensor).
        ModelLoadError: other tensors missing or of the wrong shape.
    """
    from llmprod.models.loader import (
        NATIVE_MODELS,
        check_supported,
        materialize_native,
        meta_construction,
    )

    is_bnb_int8_checkpoint(hf_config)
    check_supported(hf_config)
    try:
        resolved = resolve_method(method or "auto", device)
    except Int8UnavailableError as exc:
        raise InvalidConfigError(
            f"{path} is a bitsandbytes int8 checkpoint, but no int8 path can run "
            f"here: {exc}",
            "quantization",
        ) from exc
    qc = _qconfig(hf_config) or {}
    threshold = float(qc.get("llm_int8_threshold") or 6.0)

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no .safetensors files in {str(path)!r}")
    index, int8_names = _tensor_index(files)

    cls = NATIVE_MODELS[hf_config.model_type]
    with meta_construction():
        model = cls(hf_config)
    plan = _plan(model, index, int8_names)
    if not plan:
        raise BnbCheckpointError(
            f"{path}: config.json says load_in_8bit but no linear layer has int8 "
            "weights with an SCB",
            "quantization_config.load_in_8bit",
        )
    # The int8 layers never get a full-precision weight: placeholders hold the bias.
    for native in plan:
        _set_submodule(model, native, _PendingInt8(model.get_submodule(native)))
    model = materialize_native(model, hf_config, dtype, device)

    int8_modules = {hf for shards in plan.values() for hf in shards.values()}
    skip = {
        f"{m}.{s}" for m in int8_modules for s in ("weight", "SCB", "weight_format")
    }
    scb_partial = {
        k[: -len(".SCB")]
        for k in index
        if k.endswith(".SCB") and k[: -len(".SCB")] not in int8_modules
    }

    def rest() -> Iterator[tuple[str, torch.Tensor]]:
        pending: dict[str, torch.Tensor] = {}
        for key, t in _read(index, [k for k in index if k not in skip]):
            if key.endswith(".weight_format"):
                _check_format(key[: -len(".weight_format")], t)
                continue
            base = key.rsplit(".", 1)[0]
            if base in scb_partial and (
                key.endswith(".weight") or key.endswith(".SCB")
            ):
                # Fused group with some full-precision shards: dequantize this one.
                pending[key] = t
                w, s = pending.get(f"{base}.weight"), pending.get(f"{base}.SCB")
                if w is not None and s is not None:
                    _check_pair(base, w, s, w.shape[0], w.shape[1])
                    yield f"{base}.weight", dequantize_per_channel(w, s / 127.0, dtype)
                    del pending[f"{base}.weight"], pending[f"{base}.SCB"]
                continue
            yield key, t

    try:
        model.load_weights(rest())  # type: ignore[operator]
    except BnbCheckpointError:
        raise
    except ValueError as exc:
        raise ModelLoadError(
            f"weights in {str(path)!r} do not fit the model: {exc}"
        ) from exc

    for native, shards in plan.items():
        placeholder: Any = model.get_submodule(native)
        rows, cols = placeholder.out_features, placeholder.in_features
        sizes: list[int] = getattr(placeholder, "shard_sizes", None) or [rows]
        order = sorted(shards, key=lambda s: -1 if s is None else s)
        q = torch.empty((rows, cols), dtype=torch.int8, device=device)
        scb = torch.empty(rows, dtype=torch.float32, device=device)
        keys = [f"{shards[s]}.{t}" for s in order for t in ("weight", "SCB")]
        keys += [f"{shards[s]}.weight_format" for s in order]
        got = dict(_read(index, [k for k in keys if k in index]))
        start = 0
        for shard in order:
            hf = shards[shard]
            n = sizes[shard or 0]
            if f"{hf}.weight_format" in got:
                _check_format(hf, got[f"{hf}.weight_format"])
            w, s = got[f"{hf}.weight"], got[f"{hf}.SCB"]
            _check_pair(hf, w, s, n, cols)
            q[start : start + n].copy_(w)
            scb[start : start + n].copy_(s)
            start += n
        del got
        bias = placeholder.bias
        new = _runtime_module(
            resolved,
            q,
            scb / 127.0,
            None if bias is None else bias.detach(),
            threshold=threshold,
            compute_dtype=compute_dtype,
            is_training=False,
        )
        if resolved == "int8-bnb":
            # bitsandbytes keeps the row absmax itself: give it the checkpoint's
            # exact SCB rather than 127 * (SCB / 127).
            weight: Any = new.weight
            weight.SCB = scb
        _set_submodule(model, native, new)
    model.eval()
    model.requires_grad_(False)
    logger.info(
        "loaded the bitsandbytes int8 checkpoint %s: %d int8 linear layers, method %s",
        path,
        len(plan),
        resolved,
    )
    return model, resolved
