"""The engine's LoRA adapters: loading, slots, eviction and each step's mapping.

Adapters are read on the caller's thread; the stacked slot tensors the model
reads (``llmprod.lora.layers``) change only under :attr:`LoRAManager.lock`,
which a step holds for its forward pass, so a load or unload lands between
two steps. A request pins its adapter from submission to its end; only
adapters with no pin are evicted or unloaded.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprod.errors import (
    InvalidConfigError,
    InvalidRequestError,
    UnsupportedModelError,
)
from llmprod.lora.adapter import AdapterWeights, ModuleShape, read_adapter
from llmprod.lora.layers import LoRABatch, LoRALinear


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """What :meth:`llmprod.Engine.adapters` reports of one loaded adapter."""

    name: str
    path: str
    content_hash: str
    rank: int
    target_modules: tuple[str, ...]
    nbytes: int
    """Bytes of its A and B matrices."""
    in_flight: int
    """Requests using it now."""


@dataclass(slots=True)
class _Adapter:
    name: str
    weights: AdapterWeights
    """Its matrices move into the slot tensors at its first stacking
    (:meth:`LoRAManager._restack`) and are dropped from here: held once."""
    nbytes: int
    modules: frozenset[tuple[int, str]]
    pins: int = 0
    last_used: float = 0.0


def model_shapes(model: nn.Module) -> dict[str, ModuleShape]:
    """The fused projections of the native Llama decoder layer and their shapes."""
    cfg: Any = model.config
    attn = model.model.layers[0].self_attn  # type: ignore[union-attr,index]
    inter = int(cfg.intermediate_size)
    hidden = int(cfg.hidden_size)
    return {
        "self_attn.qkv_proj": ModuleShape(hidden, tuple(attn.qkv_sizes)),
        "self_attn.o_proj": ModuleShape(attn.num_heads * attn.head_dim, (hidden,)),
        "mlp.gate_up_proj": ModuleShape(hidden, (inter, inter)),
        "mlp.down_proj": ModuleShape(inter, (hidden,)),
    }


class LoRAManager:
    """Adapters of one engine's model (the native path only).

    Args:
        model: the engine's native model; its projections are wrapped on
            construction (a no-op until an adapter is loaded).
        max_loras: adapters held at once.
        max_lora_rank: the largest rank accepted.
        dtype, device: of the model's activations.

    Raises:
        UnsupportedModelError: the model is not llmprod's native
            implementation.
    """

    def __init__(
        self,
        model: nn.Module,
        max_loras: int,
        max_lora_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        impl = getattr(model, "impl", None)
        if impl != "native":
            raise UnsupportedModelError(
                f"LoRA adapters run on the native model path; this engine runs "
                f"{type(model).__name__} (model_impl={impl!r}). Load a Llama-family "
                "model with model_impl='native'",
                "model_impl",
            )
        if getattr(model, "tensor_parallel", None) is not None:
            raise UnsupportedModelError(
                "LoRA adapters are not supported with tensor_parallel_size > 1",
                "tensor_parallel_size",
            )
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.dtype = dtype
        self.device = device
        self.lock = threading.Lock()
        self.batch = LoRABatch()
        self.shapes = model_shapes(model)
        self.num_layers = len(model.model.layers)  # type: ignore[union-attr,arg-type]
        self._adapters: OrderedDict[str, _Adapter] = OrderedDict()
        """Slot order: an adapter's index here is its slot."""
        self._slots: dict[str, int] = {}
        self._modules: dict[tuple[int, str], LoRALinear] = {}
        for i, layer in enumerate(model.model.layers):  # type: ignore[union-attr,arg-type]
            for fused in self.shapes:
                parent_name, attr = fused.rsplit(".", 1)
                parent = layer.get_submodule(parent_name)
                wrapped = LoRALinear(getattr(parent, attr), self.batch)
                setattr(parent, attr, wrapped)
                self._modules[(i, fused)] = wrapped

    # ------------------------------------------------------------ loading
    def load(self, name: str, path: str | Path) -> AdapterInfo:
        """Read and add (or replace) an adapter; see :meth:`llmprod.Engine.load_adapter`."""
        _check_name(name)
        weights = read_adapter(
            path, self.shapes, self.num_layers, self.max_lora_rank, self.dtype
        )
        with self.lock:
            old = self._adapters.get(name)
            if old is not None and old.pins:
                raise InvalidRequestError(
                    f"adapter {name!r} has {old.pins} requests in flight; load the "
                    "new version under another name or wait for them",
                    "adapter",
                )
            if old is None and len(self._adapters) >= self.max_loras:
                self._evict_one()
            kept = [a for a in self._adapters.values() if a.name != name]
            new = _Adapter(
                name,
                weights,
                weights.nbytes,
                frozenset(weights.weights),
                last_used=time.monotonic(),
            )
            self._restack([*kept, new])
            return self._info(new)

    def unload(self, name: str) -> None:
        """Drop an adapter and the memory of its slot.

        Raises:
            InvalidRequestError: it is not loaded, or requests still use it.
        """
        with self.lock:
            a = self._get(name)
            if a.pins:
                raise InvalidRequestError(
                    f"adapter {name!r} has {a.pins} requests in flight", "adapter"
                )
            self._restack([x for x in self._adapters.values() if x.name != name])

    def infos(self) -> dict[str, AdapterInfo]:
        with self.lock:
            return {n: self._info(a) for n, a in self._adapters.items()}

    @property
    def nbytes(self) -> int:
        """Bytes of the stacked slot tensors (what the adapters cost in memory)."""
        total = 0
        for m in self._modules.values():
            for t in [m.a, *m.b] if m.a is not None else []:
                total += t.numel() * t.element_size()
            if m._a_cols is not None:  # the dense path's copy of A, once made
                total += m._a_cols.numel() * m._a_cols.element_size()
        return total

    # ------------------------------------------------------------ requests
    def content_hash(self, name: str) -> str:
        """The adapter's content hash (raises InvalidRequestError if unknown)."""
        with self.lock:
            return self._get(name).weights.content_hash

    def pin(self, name: str, content_hash: str) -> None:
        """Hold the adapter for a request until :meth:`unpin`.

        Raises:
            InvalidRequestError: it was unloaded, evicted or replaced since the
                request was built.
        """
        with self.lock:
            a = self._get(name)
            if a.weights.content_hash != content_hash:
                raise InvalidRequestError(
                    f"adapter {name!r} was replaced while the request was admitted; "
                    "send it again",
                    "adapter",
                )
            a.pins += 1
            a.last_used = time.monotonic()

    def unpin(self, name: str) -> None:
        with self.lock:
            a = self._adapters.get(name)
            if a is not None and a.pins > 0:
                a.pins -= 1
                a.last_used = time.monotonic()

    @contextmanager
    def step(self, adapters: Sequence[tuple[str | None, int]]) -> Iterator[None]:
        """Hold the slots steady for one forward pass whose entries are
        ``(adapter name or None, tokens)`` in the flat batch's order."""
        with self.lock:
            slots: list[int] = []
            for name, n in adapters:
                slots.extend([self._slots[name] if name is not None else -1] * n)
            self.batch.set(slots, self.device)
            try:
                yield
            finally:
                self.batch.clear()

    # ------------------------------------------------------------ internals
    def _get(self, name: str) -> _Adapter:
        a = self._adapters.get(name)
        if a is None:
            loaded = ", ".join(map(repr, self._adapters)) or "none"
            raise InvalidRequestError(
                f"adapter {name!r} is not loaded (loaded: {loaded}); load it with "
                "engine.load_adapter(name, path)",
                "adapter",
            )
        return a

    def _info(self, a: _Adapter) -> AdapterInfo:
        w = a.weights
        return AdapterInfo(
            a.name, str(w.path), w.content_hash, w.rank, w.targets, a.nbytes, a.pins
        )

    def _evict_one(self) -> None:
        idle = [a for a in self._adapters.values() if not a.pins]
        if not idle:
            raise InvalidConfigError(
                f"max_loras={self.max_loras} adapters are loaded and all have "
                "requests in flight; raise max_loras or unload one",
                "max_loras",
            )
        victim = min(idle, key=lambda a: a.last_used)
        self._restack([a for a in self._adapters.values() if a is not victim])

    def _restack(self, adapters: list[_Adapter]) -> None:
        """Rebuild every module's stacked slots for these adapters, in order
        (under the lock): adapters already stacked are copied from their old
        slots, a new one from the matrices it was read with (then dropped)."""
        rank = max((a.weights.rank for a in adapters), default=0)
        old_slots = self._slots
        for (layer, fused), module in self._modules.items():
            module._a_cols = module._a_cols_of = None  # remade from the new A
            shape = self.shapes[fused]
            present = [(k, a) for k, a in enumerate(adapters)
                       if (layer, fused) in a.modules]  # fmt: skip
            if not present:
                module.a, module.b, module.rank = None, [], 0
                continue
            n, shards, r_old = len(adapters), len(shape.shard_sizes), module.rank
            dev, dt = self.device, self.dtype
            a_stack = torch.zeros(
                n, shape.in_features, shards * rank, dtype=dt, device=dev
            )
            b_stack = [
                torch.zeros(n, rank, out, dtype=dt, device=dev)
                for out in shape.shard_sizes
            ]
            for k, adapter in present:
                fresh = adapter.weights.weights.get((layer, fused))
                if fresh is None:  # stacked before: copy its old slot
                    assert module.a is not None
                    j, m = old_slots[adapter.name], min(r_old, rank)
                    for sh in range(shards):  # its rank fits in both widths
                        a_stack[k, :, sh * rank : sh * rank + m] = module.a[
                            j, :, sh * r_old : sh * r_old + m
                        ]
                        b_stack[sh][k, :m] = module.b[sh][j, :m]
                    continue
                for sh, (a, b) in fresh.items():
                    r = a.shape[0]
                    a_stack[k, :, sh * rank : sh * rank + r] = a.T
                    b_stack[sh][k, :r, :] = b.T
            module.a, module.b, module.rank = a_stack, b_stack, rank
        for adapter in adapters:
            adapter.weights.weights.clear()  # held in the slots from now on
        self._adapters = OrderedDict((a.name, a) for a in adapters)
        self._slots = {a.name: k for k, a in enumerate(adapters)}


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name or len(name) > 128:
        raise InvalidRequestError(
            f"adapter name must be a non-empty string of at most 128 characters, "
            f"got {name!r}",
            "adapter",
        )
