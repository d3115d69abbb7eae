"""PEFT LoRA adapters read from a local folder and checked against the model.

A PEFT LoRA folder holds ``adapter_config.json`` and
``adapter_model.safetensors``, whose tensors are named after the base model's
modules, e.g. ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``
(``[r, in]``) and ``...lora_B.weight`` (``[out, r]``). A projection's output
becomes ``W x + s * B (A x)`` with ``s = lora_alpha / r`` (``lora_alpha /
sqrt(r)`` with ``use_rslora``); ``rank_pattern`` and ``alpha_pattern`` override
``r`` and ``lora_alpha`` per module as PEFT matches them. The scale is folded
into ``B`` here, once.

The native model fuses q/k/v into ``qkv_proj`` and gate/up into
``gate_up_proj``; :data:`TARGETS` places each PEFT target in its fused module
and shard.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmprod.errors import InvalidConfigError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

TARGETS: dict[str, tuple[str, int]] = {
    "q_proj": ("self_attn.qkv_proj", 0),
    "k_proj": ("self_attn.qkv_proj", 1),
    "v_proj": ("self_attn.qkv_proj", 2),
    "o_proj": ("self_attn.o_proj", 0),
    "gate_proj": ("mlp.gate_up_proj", 0),
    "up_proj": ("mlp.gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", 0),
}
"""PEFT target module -> (the native decoder layer's fused module, shard)."""

_KEY = re.compile(
    r"^base_model\.model\.(?P<module>model\.layers\.(?P<layer>\d+)\."
    r"(?:self_attn|mlp)\.(?P<target>\w+))\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)


@dataclass(frozen=True, slots=True)
class ModuleShape:
    """One fused projection of a decoder layer: its input width and the output
    width of each shard."""

    in_features: int
    shard_sizes: tuple[int, ...]


@dataclass(slots=True)
class AdapterWeights:
    """An adapter read and checked: ``weights[(layer, module)][shard] = (A, B)``
    with ``A`` ``[r, in]`` and ``B`` ``[out, r]`` already scaled."""

    path: Path
    content_hash: str
    """sha256 of the config and weight files: what the caches key on."""
    rank: int
    """The largest rank of its modules."""
    targets: tuple[str, ...]
    """The PEFT module names it adapts (``q_proj``...)."""
    weights: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]]

    @property
    def nbytes(self) -> int:
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size()
            for shards in self.weights.values()
            for a, b in shards.values()
        )


def _bad(path: Path, message: str, field: str) -> InvalidConfigError:
    return InvalidConfigError(f"adapter {str(path)!r}: {message}", field)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override: the first pattern matching the module name
    as a whole or as a dotted suffix."""
    for key, value in patterns.items():
        if module == key or re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_config(path: Path) -> dict[str, Any]:
    """``adapter_config.json``, checked for what the engine does not run."""
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise _bad(path, f"no {CONFIG_FILE} in the folder", "path") from None
    except ValueError as exc:
        raise _bad(path, f"{CONFIG_FILE} is not JSON: {exc}", "path") from exc
    if not isinstance(cfg, dict):
        raise _bad(path, f"{CONFIG_FILE} must hold a JSON object", "path")
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise _bad(path, f"peft_type={kind!r}: only LORA adapters run", "peft_type")
    refused = {
        "use_dora": "DoRA adapters are not supported",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D base layers) is not supported",
        "modules_to_save": "modules_to_save (fully trained modules) is not supported",
    }
    for key, why in refused.items():
        if cfg.get(key):
            raise _bad(path, f"{key}={cfg[key]!r}: {why}", key)
    if cfg.get("bias", "none") != "none":
        raise _bad(path, f"bias={cfg['bias']!r}: only bias='none' runs", "bias")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            raise _bad(
                path,
                f"target_modules {unknown} are not projections of this model "
                f"(supported: {', '.join(TARGETS)})",
                "target_modules",
            )
    return cfg


def content_hash(path: Path) -> str:
    h = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        h.update(name.encode())
        with open(path / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_adapter(
    path: str | Path,
    shapes: dict[str, ModuleShape],
    num_layers: int,
    max_rank: int,
    dtype: torch.dtype,
) -> AdapterWeights:
    """Read a PEFT LoRA folder for a model with these module shapes.

    Args:
        path: the folder (no hub access: download it first).
        shapes: the fused modules of one decoder layer (keys of :data:`TARGETS`'
            values) and their shapes.
        num_layers: decoder layers of the model.
        max_rank: the engine's ``max_lora_rank``.
        dtype: the engine's activation dtype (the adapter is held in it).

    Raises:
        InvalidConfigError: a missing file, a module this model lacks or the
            engine does not adapt, a rank above ``max_rank``, a shape that does
            not fit the model; the message names the field.
    """
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_dir():
        raise _bad(path, "is not a folder", "path")
    cfg = read_config(path)
    if not (path / WEIGHTS_FILE).is_file():
        raise _bad(path, f"no {WEIGHTS_FILE} in the folder", "path")
    digest = content_hash(path)
    base_r = int(cfg.get("r", 8))
    base_alpha = float(cfg.get("lora_alpha", base_r))
    rank_pattern = dict(cfg.get("rank_pattern") or {})
    alpha_pattern = dict(cfg.get("alpha_pattern") or {})
    rslora = bool(cfg.get("use_rslora", False))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            m = _KEY.match(key)
            if m is None:
                raise _bad(
                    path,
                    f"tensor {key!r} is not a LoRA weight of a decoder projection "
                    f"(supported: {', '.join(TARGETS)})",
                    "target_modules",
                )
            if m["target"] not in TARGETS:
                raise _bad(
                    path,
                    f"module {m['module']!r}: {m['target']!r} is not a projection "
                    f"of this model (supported: {', '.join(TARGETS)})",
                    "target_modules",
                )
            pairs.setdefault(m["module"], {})[m["ab"]] = f.get_tensor(key)
    if not pairs:
        raise _bad(path, f"{WEIGHTS_FILE} holds no LoRA weights", "path")
    weights: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    top_rank = 0
    targets: set[str] = set()
    for module, ab in sorted(pairs.items()):
        layer = int(module.split(".")[2])
        target = module.rsplit(".", 1)[1]
        if set(ab) != {"A", "B"}:
            raise _bad(path, f"module {module!r} lacks lora_A or lora_B", "path")
        if layer >= num_layers:
            raise _bad(
                path,
                f"module {module!r}: the model has {num_layers} layers",
                "target_modules",
            )
        fused, shard = TARGETS[target]
        shape = shapes[fused]
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        expect_a = (r, shape.in_features)
        expect_b = (shape.shard_sizes[shard], r)
        if tuple(a.shape) != expect_a or tuple(b.shape) != expect_b:
            raise _bad(
                path,
                f"module {module!r}: lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)} do not fit the model (expected {expect_a} "
                f"and {expect_b}); is it an adapter of another model?",
                "path",
            )
        if r > max_rank:
            raise _bad(
                path,
                f"module {module!r} has rank r={r}, above max_lora_rank={max_rank}",
                "max_lora_rank",
            )
        cfg_r = int(_pattern_value(rank_pattern, module, base_r))
        alpha = float(_pattern_value(alpha_pattern, module, base_alpha))
        if cfg_r != r:
            raise _bad(
                path,
                f"module {module!r}: the config says r={cfg_r}, the weights {r}",
                "r",
            )
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        b_scaled = (b.to(torch.float32) * scale).to(dtype)
        weights.setdefault((layer, fused), {})[shard] = (a.to(dtype), b_scaled)
        top_rank = max(top_rank, r)
        targets.add(target)
    return AdapterWeights(
        path, digest, top_rank, tuple(t for t in TARGETS if t in targets), weights
    )
