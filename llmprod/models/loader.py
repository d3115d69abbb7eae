"""Build the native model for a transformers folder and load its weights."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprod.errors import ModelLoadError, UnsupportedModelError
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
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"could not read the config of {str(path)!r}: {exc}") from exc


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
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def build_model(config: Any, path: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
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
        raise ModelLoadError(f"weights in {str(path)!r} do not fit the model: {exc}") from exc
    model.eval()
    model.requires_grad_(False)
    return model


def _iter_safetensors(files: list[Path]):  # type: ignore[no-untyped-def]
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, fh.get_tensor(name)
