"""Build the native model for a transformers folder and load its weights."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprod.errors import InvalidConfigError, ModelLoadError, UnsupportedModelError
from llmprod.models.llama import LlamaForCausalLM, _rotary_module

logger = logging.getLogger("llmprod")

# model_type -> native implementation.
NATIVE_MODELS: dict[str, type[nn.Module]] = {
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


def check_supported(config: Any) -> None:
    """Raise :class:`UnsupportedModelError` naming the architecture if not native."""
    if config.model_type not in NATIVE_MODELS:
        archs = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise UnsupportedModelError(
            f"architecture {archs} (model_type={config.model_type!r}) is not supported; "
            f"supported model types: {', '.join(sorted(NATIVE_MODELS))}",
            "model",
        )


def sliding_window(config: Any) -> int | None:
    """The attention window of a config, or None for full attention."""
    if config.model_type == "qwen2" and not getattr(
        config, "use_sliding_window", False
    ):
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def build_model(
    config: Any, path: Path, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """Instantiate the native model without random init and load the checkpoint."""
    check_supported(config)
    cls = NATIVE_MODELS[config.model_type]
    with torch.device("meta"):
        model = cls(config)
    model = model.to_empty(device=device).to(dtype)
    if getattr(model, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight  # type: ignore[union-attr]
    # RoPE tables stay float32, computed as transformers computes them.
    model.model.rotary_emb = _rotary_module(config).to(device)  # type: ignore[union-attr]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no .safetensors files in {str(path)!r}")
    try:
        model.load_weights(_iter_safetensors(files))  # type: ignore[operator]
    except ValueError as exc:
        raise ModelLoadError(
            f"weights in {str(path)!r} do not fit the model: {exc}"
        ) from exc
    model.eval()
    model.requires_grad_(False)
    return model


def _iter_safetensors(files: list[Path]):  # type: ignore[no-untyped-def]
    from safetensors import safe_open

    for f in files:
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
    """The model's context length, limited to its attention window, or the
    caller's smaller value."""
    native = int(getattr(hf_config, "max_position_embeddings", 0) or 2048)
    window = sliding_window(hf_config)
    if window is not None and window < native:
        logger.warning(
            "attention window %d < context %d: limiting max_model_len to the "
            "window (no sliding-window attention on the native path)",
            window,
            native,
        )
        native = window
    if requested is None:
        return native
    if requested > native:
        raise InvalidConfigError(
            f"max_model_len={requested} exceeds the model's context length {native}",
            "max_model_len",
        )
    return requested


def eos_token_ids(hf_config: Any, tokenizer: Any) -> tuple[int, ...]:
    """End-of-sequence ids from the config and the tokenizer."""
    ids: set[int] = set()
    for src in (getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return tuple(sorted(ids))
