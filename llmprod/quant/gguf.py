"""Running a GGUF file's 4-bit weights as they are: Q4_0 and Q4_1, codes untouched.

``quantization="gguf"`` on a model that came from a GGUF file: every linear layer
whose GGUF tensor is Q4_0 or Q4_1 becomes a
:class:`~llmprod.quant.int4.WeightOnlyInt4Linear` holding the file's own codes,
scales and minimums (Q4_0's minimum is ``-8 * scale``). A Q8_0 token embedding
(SmolLM2's) stays in its blocks too, as a :class:`~llmprod.quant.q8.Q8Embedding`,
and so does lm_head where it is Q8_0 or tied to that embedding
(:class:`~llmprod.quant.q8.Q8Head`): both give the float32 values exactly. Other
float tensors (F32, F16, BF16, and Q8_0 linear layers, whose 32-weight blocks the
int8 kernel's per-row scales cannot hold) stay as the float32 the file expands
to. Any other type is refused, naming the tensor and its type, before the model
is built.

Every swapped layer is checked against the float32 model transformers built from
the same file: the blocks must reproduce each weight bit for bit, which also
settles the row order of the projections GGUF stores permuted (Llama's q and k).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llmprod.quant.int4 import Int4Weight, WeightOnlyInt4Linear
from llmprod.quant.q8 import Q8Embedding, Q8Head, read_q8_0

__all__ = [
    "NATIVE_TYPES",
    "GGUFSwapper",
    "GGUFTypeError",
    "check_gguf_types",
    "gguf_file_of",
    "read_gguf",
    "read_q4",
]

NATIVE_TYPES = ("Q4_0", "Q4_1")
"""GGUF tensor types run natively by the int4 kernel."""

FLOAT_TYPES = ("F32", "F16", "BF16", "Q8_0")
"""Types left as the float32 they expand to."""


class GGUFTypeError(ValueError):
    """A GGUF tensor's type cannot run with ``quantization="gguf"``."""


def gguf_file_of(path: Path) -> Path | None:
    """The GGUF file a converted model folder came from, where it is still on
    disk (a registered model's package, or the file a user named)."""
    from llmprod.models import registry

    marker = path / registry.CONVERTED_MARKER
    if not marker.exists():
        return None
    info = json.loads(marker.read_text())
    source = str(info.get("source", ""))
    candidate = Path(source)
    if candidate.suffix == ".gguf" and candidate.is_file():
        return candidate
    for spec in registry.MODELS.values():
        if source == f"{spec.package}=={spec.version}" and not spec.assembled:
            try:
                found = registry._find_gguf(spec)
            except Exception:
                return None
            return found
    return None


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    """One tensor of a GGUF file: its name, type and raw rows (a memory map)."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    """In GGUF's order: the row length first."""
    data: np.ndarray
    """uint8 ``[rows, bytes per row]`` for block types; typed for float ones."""


@dataclass(frozen=True, slots=True)
class GGUFFile:
    architecture: str
    tensors: dict[str, GGUFTensor]


_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def read_gguf(gguf_path: Path) -> GGUFFile:
    """The architecture and the tensors of a GGUF file (v2/v3), reading the
    header only: the metadata values are skipped, not decoded (gguf-py's reader
    decodes every vocabulary string, seconds for a 49k vocabulary)."""
    import gguf

    mm = np.memmap(gguf_path, dtype=np.uint8, mode="r")
    buf = memoryview(mm)  # type: ignore[arg-type]
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string() -> str:
        nonlocal pos
        n = take("Q")
        out = bytes(buf[pos : pos + n]).decode("utf-8", "replace")
        pos += n
        return out

    def skip_value(vtype: int) -> None:
        nonlocal pos
        if vtype == _STRING:
            n = take("Q")
            pos += n
        elif vtype == _ARRAY:
            etype, count = take("I"), take("Q")
            if etype in _SCALAR_BYTES:
                pos += _SCALAR_BYTES[etype] * count
            else:
                for _ in range(count):
                    skip_value(etype)
        else:
            pos += _SCALAR_BYTES[vtype]

    if bytes(buf[:4]) != b"GGUF":
        raise GGUFTypeError(f"{str(gguf_path)!r} is not a GGUF file")
    pos = 4
    version = take("I")
    if version not in (2, 3):
        raise GGUFTypeError(f"GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = take("Q"), take("Q")
    arch, alignment = "", 32
    for _ in range(n_kv):
        key, vtype = string(), take("I")
        if key == "general.architecture" and vtype == _STRING:
            arch = string()
        elif key == "general.alignment" and vtype == 4:
            alignment = take("I")
        else:
            skip_value(vtype)
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = tuple(take("Q") for _ in range(take("I")))
        infos.append((name, dims, take("I"), take("Q")))
    start = -(-pos // alignment) * alignment
    tensors = {}
    for name, dims, type_id, offset in infos:
        qtype = gguf.GGMLQuantizationType(type_id)
        block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
        rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
        row_bytes = dims[0] // block * type_bytes
        raw = mm[start + offset : start + offset + rows * row_bytes]
        tensors[name] = GGUFTensor(name, qtype.name, dims, raw.reshape(rows, row_bytes))
    return GGUFFile(arch, tensors)


def check_gguf_types(gguf_path: Path) -> dict[str, int]:
    """Refuse a file holding a tensor type this path cannot run; return how
    many tensors of each type it holds. Reads the header only."""
    counts: dict[str, int] = {}
    for t in read_gguf(gguf_path).tensors.values():
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
        if t.type_name not in NATIVE_TYPES + FLOAT_TYPES:
            raise GGUFTypeError(
                f"GGUF tensor {t.name!r} has type {t.type_name}; quantization='gguf' "
                f"runs {', '.join(NATIVE_TYPES)} natively and {', '.join(FLOAT_TYPES)} "
                f"as float32. Use quantization='int4' to requantize this model instead"
            )
    return counts


def read_q4(tensor: GGUFTensor) -> Int4Weight:
    """A Q4_0 or Q4_1 tensor as an :class:`Int4Weight`, rows in the file's order."""
    kind = tensor.type_name
    raw = np.asarray(tensor.data, dtype=np.uint8)
    rows = raw.shape[0]
    if kind == "Q4_1":
        blocks = raw.reshape(rows, -1, 20)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., 4:20]
    elif kind == "Q4_0":
        blocks = raw.reshape(rows, -1, 18)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = -8 * d
        qs = blocks[..., 2:18]
    else:
        raise GGUFTypeError(f"{tensor.name!r} is {kind}, not one of {NATIVE_TYPES}")
    # Within a block: weight j is the low nibble of byte j, weight j + 16 the high.
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(rows, -1)
    return Int4Weight(
        torch.from_numpy(np.ascontiguousarray(q)),
        torch.from_numpy(np.ascontiguousarray(d)),
        torch.from_numpy(np.ascontiguousarray(m)),
    )


def _name_map(arch_name: str, num_layers: int) -> Any:
    import gguf

    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch_name not in by_name:
        raise GGUFTypeError(f"GGUF architecture {arch_name!r} is unknown to gguf-py")
    return gguf.get_tensor_name_map(by_name[arch_name], num_layers)


def _parts(model: nn.Module, name: str, module: nn.Module) -> list[str]:
    """The checkpoint names of a (possibly fused) linear layer, in row order."""
    fused: dict[str, tuple[str, int]] = getattr(model, "_FUSED", {})
    parent, _, short = name.rpartition(".")
    shards = sorted((idx, hf) for hf, (ours, idx) in fused.items() if ours == short)
    if shards and getattr(module, "shard_sizes", None):
        return [f"{parent}.{hf}" for _, hf in shards]
    return [name]


def _row_orders(w: Int4Weight, heads: list[int]) -> Iterator[Int4Weight]:
    """The file's row order, then the reverse of llama.cpp's q/k permutation for
    each head count that divides the rows."""
    yield w
    n = w.q.shape[0]
    for h in heads:
        if h <= 0 or n % (2 * h):
            continue
        yield Int4Weight(
            _unpermute(w.q, h), _unpermute(w.scales, h), _unpermute(w.mins, h)
        )


def _unpermute(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of each head's rotary halves."""
    dim = t.shape[0] // heads // 2
    return t.reshape(heads, dim, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


class GGUFSwapper:
    """Swaps a model's modules for the GGUF file's blocks: Q4 linear layers for
    int4 layers, a Q8_0 embedding (and lm_head) for Q8_0 modules.

    Call it as the loader's ``on_loaded(model, name)`` hook to swap each module
    as soon as its float32 weight is loaded (the float32 model is then never
    resident whole), then :meth:`finish` to swap whatever is left (all of it on
    the generic path, which does not call the hook).

    Raises (from the call or :meth:`finish`):
        GGUFTypeError: a module's blocks do not reproduce its float32 weight.
    """

    def __init__(self, gguf_path: Path, hf_config: Any, skip: tuple[str, ...]) -> None:
        self.file = read_gguf(gguf_path)
        num_layers = int(getattr(hf_config, "num_hidden_layers", 0))
        self.tmap = _name_map(self.file.architecture, num_layers)
        self.heads = [
            int(getattr(hf_config, "num_attention_heads", 0) or 0),
            int(getattr(hf_config, "num_key_value_heads", 0) or 0),
        ]
        self.skip = skip
        self.int4_layers = 0
        """Linear layers swapped for int4 ones."""
        self.q8_modules: list[str] = []
        """Modules held in Q8_0 blocks (``model.embed_tokens``, ``lm_head``)."""
        self._targets: set[str] | None = None

    def _tensor(self, hf_name: str) -> GGUFTensor | None:
        gname = self.tmap.get_name(hf_name + ".weight", try_suffixes=(".weight",))
        return self.file.tensors.get(gname or "")

    def __call__(self, model: nn.Module, name: str) -> None:
        from llmprod.quant.convert import _select_linears

        if self._targets is None:
            self._targets = {n for n, _ in _select_linears(model, self.skip)}
        if name in self._targets:
            self._swap_int4(model, name, model.get_submodule(name))  # type: ignore[arg-type]
        elif name == "model.embed_tokens":
            self._swap_q8(model, ("embedding",))
        elif name == "lm_head":
            self._swap_q8(model, ("head",))

    def finish(self, model: nn.Module) -> int:
        """Swap every module the hook has not (all of them without it); returns
        how many linear layers are int4 in all."""
        from llmprod.quant.convert import _select_linears

        for name, linear in list(_select_linears(model, self.skip)):
            self._swap_int4(model, name, linear)
        self._swap_q8(model)
        return self.int4_layers

    def _swap_int4(self, model: nn.Module, name: str, linear: nn.Linear) -> None:
        from llmprod.quant.convert import _set_submodule

        parts: list[Int4Weight] = []
        for hf in _parts(model, name, linear):
            t = self._tensor(hf)
            if t is None or t.type_name not in NATIVE_TYPES:
                return
            parts.append(read_q4(t))
        w = _match(name, parts, linear.weight.detach(), self.heads)
        bias = None if linear.bias is None else linear.bias.detach()
        layer = WeightOnlyInt4Linear.from_int4(w, bias)
        layer.prepare(release_exact=True)  # the file keeps the exact scales
        _set_submodule(model, name, layer)
        self.int4_layers += 1

    def _swap_q8(self, m: Any, which: tuple[str, ...] = ("embedding", "head")) -> None:
        """A Q8_0 embedding, with lm_head when tied to it; a Q8_0 lm_head of its
        own. Only the native model's plain ``nn.Embedding`` and bias-free
        ``nn.Linear`` (the generic path keeps transformers' modules)."""
        if getattr(m, "impl", None) != "native":
            return
        emb, head = m.model.embed_tokens, m.lm_head
        plain_head = type(head) is nn.Linear and head.bias is None
        tied = plain_head and type(emb) is nn.Embedding and head.weight is emb.weight
        if "embedding" in which and type(emb) is nn.Embedding:
            w = self._q8_of("model.embed_tokens", emb.weight)
            if w is not None:
                m.model.embed_tokens = Q8Embedding(w, emb.weight.dtype)
                self.q8_modules.append("model.embed_tokens")
                if tied:
                    m.lm_head = Q8Head(w)
                    self.q8_modules.append("lm_head")
        if "head" in which and plain_head and not tied:
            w = self._q8_of("lm_head", head.weight)
            if w is not None:
                m.lm_head = Q8Head(w)
                self.q8_modules.append("lm_head")

    def _q8_of(self, name: str, weight: torch.Tensor) -> Any:
        t = self._tensor(name)
        if t is None or t.type_name != "Q8_0":
            return None
        w = read_q8_0(t.data)
        rows = w.shape[0]
        want = weight.detach()
        if w.shape != tuple(want.shape) or not all(
            torch.equal(w.rows(lo, lo + 4096), want[lo : lo + 4096].float())
            for lo in range(0, rows, 4096)
        ):
            raise GGUFTypeError(
                f"{name}: the GGUF Q8_0 blocks do not reproduce the model's float32 "
                f"weight"
            )
        return w


def _match(
    name: str, parts: list[Int4Weight], weight: torch.Tensor, heads: list[int]
) -> Int4Weight:
    """The parts, each in the row order that reproduces its rows of ``weight``
    bit for bit, stacked."""
    chosen, row = [], 0
    want = weight.to(torch.float32)
    for part in parts:
        n = part.q.shape[0]
        rows = want[row : row + n]
        for cand in _row_orders(part, heads):
            if cand.q.shape == rows.shape and torch.equal(cand.dequantize(), rows):
                chosen.append(cand)
                break
        else:
            raise GGUFTypeError(
                f"{name}: the GGUF codes do not reproduce the model's float32 "
                f"weight (rows {row}-{row + n})"
            )
        row += n
    return Int4Weight(
        torch.cat([c.q for c in chosen]),
        torch.cat([c.scales for c in chosen]),
        torch.cat([c.mins for c in chosen]),
    )
