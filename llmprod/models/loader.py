"""Build the native model for a transformers folder and load its weights."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprod.errors import InvalidConfigError, ModelLoadError, UnsupportedModelError
from llmprod.models.llama import LlamaForCausalLM, _rotary_module

logger = logging.getLogger("llmprod")

# model_type -> native implementation.
NATIVE_MODELS: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
}


def load_config(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(
            f"could not read the config of {str(path)!r}: {exc}"
        ) from exc


def native_unsupported(config: Any) -> str | None:
    """Why the native path cannot run ``config``, or None if it can."""
    if config.model_type not in NATIVE_MODELS:
        return (
            f"model_type={config.model_type!r} has no native implementation "
            f"(native: {', '.join(sorted(NATIVE_MODELS))})"
        )
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        return f"hidden_act={act!r} (the native Llama path runs silu)"
    odd = unsupported_layer_types(config)
    if odd:
        return f"layer types {odd}"
    return None


def unsupported_layer_types(config: Any) -> list[str]:
    """The config's layer types other than full and sliding-window attention, the
    only ones either path runs."""
    layer_types = getattr(config, "layer_types", None) or []
    return sorted(
        {t for t in layer_types if t not in ("full_attention", "sliding_attention")}
    )


def check_supported(config: Any) -> None:
    """Raise :class:`UnsupportedModelError` naming the architecture if not native."""
    reason = native_unsupported(config)
    if reason is not None:
        archs = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise UnsupportedModelError(
            f"architecture {archs} cannot run on the native path: {reason}; "
            "use model_impl='generic' (or 'auto') for transformers' modeling code",
            "model",
        )


def choose_impl(config: Any, requested: str) -> str:
    """ "auto" = native where it can run the config (it measures faster), else
    generic."""
    if requested == "auto":
        return "native" if native_unsupported(config) is None else "generic"
    return requested


def build_model(
    config: Any,
    path: Path,
    dtype: torch.dtype,
    device: torch.device,
    impl: str = "auto",
    on_loaded: Callable[[nn.Module, str], None] | None = None,
) -> nn.Module:
    """The model for ``config``: native, or transformers' own code with paged
    attention (``impl="generic"``). The returned module's ``impl`` says which.

    ``on_loaded(model, module_name)``: on the native path, called as soon as a
    module's weights are loaded (see ``LlamaForCausalLM.load_weights``); a
    quantizing loader swaps the module then, so that the float32 model is never
    resident whole. The generic path does not call it.

    Raises:
        UnsupportedModelError: ``impl="native"`` for an architecture without a
            native implementation, or a model the generic path cannot run.
        ModelLoadError: the weights do not fit.
    """
    impl = choose_impl(config, impl)
    if impl == "generic":
        from llmprod.models.generic import build_generic

        model = build_generic(config, path, dtype, device)
        logger.info("model %s runs on the generic path", config.model_type)
        return model
    return _build_native(config, path, dtype, device, on_loaded)


# The initializers nn.Linear, nn.Embedding and friends call from reset_parameters.
_INIT_FUNCTIONS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "zeros_",
    "ones_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
)


@contextlib.contextmanager
def meta_construction() -> Iterator[None]:
    """Build modules on the meta device without running their initializers.

    Every parameter is overwritten by the checkpoint, so initial values are never
    needed; and a random initializer on a meta tensor runs through torch's
    Python reference ops, whose first use imports TorchDynamo (and Triton where it
    is installed): about 150 MB of resident memory for nothing.
    """
    init = torch.nn.init
    saved = {name: getattr(init, name) for name in _INIT_FUNCTIONS}

    def keep(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor

    try:
        for name in _INIT_FUNCTIONS:
            setattr(init, name, keep)
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


def _build_native(
    config: Any,
    path: Path,
    dtype: torch.dtype,
    device: torch.device,
    on_loaded: Callable[[nn.Module, str], None] | None = None,
) -> LlamaForCausalLM:
    """Instantiate the native model without random init and load the checkpoint."""
    check_supported(config)
    with meta_construction():
        model = NATIVE_MODELS[config.model_type](config)
    model = materialize_native(model, config, dtype, device)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no .safetensors files in {str(path)!r}")
    hook_errors: list[BaseException] = []

    def hook(name: str) -> None:
        assert on_loaded is not None
        try:
            on_loaded(model, name)
        except BaseException as exc:  # the hook's own error, raised as it is
            hook_errors.append(exc)
            raise

    try:
        # Parameters were allocated by to_empty and are untouched, so not yet
        # resident: each becomes so as it is read.
        model.load_weights(
            _iter_safetensors(files), None if on_loaded is None else hook
        )
    except ValueError as exc:
        if hook_errors and exc is hook_errors[0]:
            raise
        raise ModelLoadError(
            f"weights in {str(path)!r} do not fit the model: {exc}"
        ) from exc
    model.eval()
    model.requires_grad_(False)
    logger.info("model %s runs on the native path", config.model_type)
    return model


def materialize_native(
    model: LlamaForCausalLM, config: Any, dtype: torch.dtype, device: torch.device
) -> LlamaForCausalLM:
    """Allocate a native model built on the meta device (uninitialised, in
    ``dtype``), re-tie its embeddings and give it float32 RoPE tables computed as
    transformers computes them. The weights are loaded afterwards."""
    model = model.to_empty(device=device).to(dtype)
    if getattr(model, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = _rotary_module(config).to(device)
    return model


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
    "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of the files, read into its own buffer.

    Read, not memory-mapped: the pages of a mapped file count in the process's
    resident memory while mapped, so loading a float32 checkpoint through a map
    peaked at the model plus the whole file (benchmarks/quant/footprint.py). A
    file holding a dtype not listed here goes through safetensors' own reader.
    """
    import json
    import struct

    for f in files:
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
            header.pop("__metadata__", None)
            if any(v["dtype"] not in _SAFETENSORS_DTYPES for v in header.values()):
                yield from _iter_safetensors_mapped(f)
                continue
            base = 8 + size
            for name, info in sorted(
                header.items(), key=lambda kv: kv[1]["data_offsets"][0]
            ):
                start, end = info["data_offsets"]
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                if end == start:
                    yield name, torch.empty(info["shape"], dtype=dtype)
                    continue
                buf = bytearray(end - start)
                fh.seek(base + start)
                if fh.readinto(buf) != len(buf):
                    raise ModelLoadError(f"{str(f)!r} ends inside tensor {name!r}")
                yield name, torch.frombuffer(buf, dtype=dtype).view(info["shape"])


def _iter_safetensors_mapped(f: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(f), framework="pt", device="cpu") as fh:
        for name in fh.keys():  # noqa: SIM118 - safe_open is not a dict
            yield name, fh.get_tensor(name)


def pick_device(name: str) -> torch.device:
    """ "auto" = CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidConfigError(
            f"device={name!r} asked for but CUDA is not available", "device"
        )
    return dev


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """ "auto" = float32 on CPU (the correctness anchor), bfloat16 on CUDA."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
    }[name]


def max_model_len(hf_config: Any, requested: int | None) -> int:
    """The model's context length, or the caller's smaller value."""
    native = int(getattr(hf_config, "max_position_embeddings", 0) or 2048)
    if requested is None:
        return native
    if requested > native:
        raise InvalidConfigError(
            f"max_model_len={requested} exceeds the model's context length {native}",
            "max_model_len",
        )
    return requested


def eos_token_ids(
    hf_config: Any, tokenizer: Any, path: Path | None = None
) -> tuple[int, ...]:
    """End-of-sequence ids from the config, the tokenizer and, when the folder has
    one, ``generation_config.json`` (where chat models list their end-of-turn
    tokens)."""
    import json

    sources = [getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id]
    gen = path / "generation_config.json" if path is not None else None
    if gen is not None and gen.exists():
        try:
            sources.append(json.loads(gen.read_text()).get("eos_token_id"))
        except (OSError, ValueError):
            logger.warning("could not read %s; using the config's EOS only", gen)
    ids: set[int] = set()
    for src in sources:
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return tuple(sorted(ids))
