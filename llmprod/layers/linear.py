"""Linear layers on CPU through oneDNN instead of the default BLAS.

PyTorch's x86 CPU wheels run a float32 ``nn.Linear`` through MKL. On the
benchmark machine (AMD EPYC, AVX-512) MKL's matrix-vector product (one token row:
batch-1 decode) runs on one thread whatever ``torch.set_num_threads`` says, and
its GEMM reaches less than half of what oneDNN, which PyTorch ships beside it,
reaches (223 against 497 GFLOP/s). Through oneDNN the SmolLM2-135M layers run
1.6x (one row) to 2.2x (256 rows) faster on 2 threads (docs/benchmarks.md,
"Linear layers through oneDNN"). On an Intel Xeon it is the other way round at
one row (MKL 1.4x-1.6x faster than packed oneDNN) and even with many rows, so
float32 keeps MKL on Intel CPUs unless steps of a few rows (speculative
verification) are the rule (:func:`resolve_linear_backend`).

:func:`use_onednn_linears` switches a model's float32 ``nn.Linear`` modules to
:class:`OneDNNLinear`, in place: same parameters (tied weights stay tied), same
state dict, only ``forward`` differs. :func:`pack_onednn_linears` then lays the
weights of untied layers out in oneDNN's blocked format, once (the engine does so
for every float32 linear layer but lm_head), which ran them 1.1x-1.3x faster
again on 2 threads; lm_head, whose weight the embedding shares and greedy
screening reads, keeps the plain layout.

bfloat16 models take the same path where the CPU has bf16 instructions (AVX-512
BF16 or AMX): bf16 weights and activations, float32 accumulation, one rounding
of the output to bf16 (:func:`bf16_hardware`); elsewhere oneDNN would emulate
them, and torch's path is kept.

The results are float32 matrix products summed in another order than MKL's, so
they differ from ``nn.Linear``'s in the last bits (a 2048-wide product: at most
3e-4 on outputs of magnitude about 100); ``linear_backend="torch"`` keeps the
default path.
"""

from __future__ import annotations

import collections
import functools
import logging
import platform
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("llmprod")

__all__ = [
    "LINEAR_BACKENDS",
    "OneDNNLinear",
    "cpu_vendor",
    "onednn_available",
    "onednn_linear",
    "pack_onednn_linears",
    "packing_available",
    "padded_rows",
    "resolve_linear_backend",
    "use_onednn_linears",
]

LINEAR_BACKENDS = ("auto", "onednn", "torch")
# Rows oneDNN is told to expect when it re-lays a weight out (its "batch size
# hint"); one layout serves every row count. With a hint of 1 it keeps the plain
# layout's matrix-vector kernel, no faster than no packing at one row.
PACK_ROWS_HINT = 32


# Dtypes the oneDNN path runs, with the tolerance of its check against F.linear
# (bfloat16: one rounding of a bf16 output of magnitude < 64 is below 0.25).
_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.25}


def bf16_hardware() -> bool:
    """Whether this CPU computes bfloat16 products natively (AVX-512 BF16 or AMX);
    elsewhere oneDNN emulates them, slower than float32."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def _check(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, got: torch.Tensor
) -> bool:
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    tol = _CHECK_TOLERANCE[x.dtype]
    return bool(torch.allclose(got.float(), ref, rtol=tol, atol=tol))


@functools.cache
def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether ``torch.ops.mkldnn._linear_pointwise`` exists here and computes a
    linear layer in ``dtype`` (float32 or bfloat16) correctly (checked once
    against ``F.linear``)."""
    if dtype not in _CHECK_TOLERANCE or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(3, 40, generator=g).to(dtype)
        w = torch.randn(24, 40, generator=g).to(dtype)
        b = torch.randn(24, generator=g).to(dtype)
        with torch.inference_mode():
            got = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return _check(x, w, b, got)
    except (RuntimeError, NotImplementedError) as exc:  # a build without the op
        logger.debug("oneDNN %s linear unavailable: %s", dtype, exc)
        return False


@functools.cache
def packing_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN can re-lay a linear weight in ``dtype`` out for its own
    kernels here (``torch.ops.mkldnn._reorder_linear_weight``), checked once
    against ``F.linear``."""
    if not onednn_available(dtype) or not hasattr(
        torch.ops.mkldnn, "_reorder_linear_weight"
    ):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(5, 48, generator=g).to(dtype)
        w = torch.randn(40, 48, generator=g).to(dtype)
        with torch.inference_mode():
            packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT)
            got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return _check(x, w, None, got)
    except (RuntimeError, NotImplementedError) as exc:
        logger.debug("oneDNN %s weight packing unavailable: %s", dtype, exc)
        return False


def _packed(weight: torch.Tensor) -> nn.Parameter:
    w = weight.detach().contiguous()
    return nn.Parameter(
        torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT), requires_grad=False
    )


def resolve_linear_backend(
    name: str, device: torch.device, dtype: torch.dtype, speculative: bool = False
) -> str:
    """The linear backend ``name`` means for a model on ``device`` in ``dtype``.

    ``"auto"`` takes oneDNN on an x86-64 CPU where it works: for float32 on CPUs
    other than Intel's, and for bfloat16 where the CPU has bf16 instructions
    (AVX-512 BF16 or AMX); and ``"torch"`` otherwise (CUDA, other dtypes, other
    CPUs, where it is not measured). On Intel CPUs float32 keeps PyTorch's MKL
    path unless the engine ``speculative``-ly decodes: there MKL's one-row
    product ran the model's layers 1.4x-1.6x faster than packed oneDNN and large
    batches ran alike, but 4 rows (a speculative step verifying 3-4 guesses) took
    MKL 1.8x its one-row time and packed oneDNN no more than one row; on an AMD
    EPYC oneDNN was 1.6x-2.2x faster at every row count (docs/benchmarks.md,
    "Linear layers through oneDNN").

    Raises:
        ValueError: ``"onednn"`` was asked for where it cannot run.
    """
    if name not in LINEAR_BACKENDS:
        raise ValueError(f"linear_backend={name!r} must be one of {LINEAR_BACKENDS}")
    fits = device.type == "cpu" and dtype in _CHECK_TOLERANCE
    if name == "torch":
        return "torch"
    if name == "onednn":
        if not fits:
            raise ValueError(
                "linear_backend='onednn' runs float32 or bfloat16 on CPU, not "
                f"{dtype} on {device}"
            )
        if not onednn_available(dtype):
            raise ValueError(
                "linear_backend='onednn' needs a PyTorch built with oneDNN "
                f"(torch.backends.mkldnn.is_available()) that runs {dtype}"
            )
        return "onednn"
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if dtype == torch.bfloat16 and not bf16_hardware():
        return "torch"
    if dtype == torch.float32 and cpu_vendor() == "GenuineIntel" and not speculative:
        return "torch"  # MKL's own CPUs: its kernels beat oneDNN's at one row
    return "onednn" if fits and x86 and onednn_available(dtype) else "torch"


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor string (``"GenuineIntel"``, ``"AuthenticAMD"``...), from
    /proc/cpuinfo; ``""`` where that cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def padded_rows(m: int) -> int:
    """The row count a ``m``-row product runs at: ``m`` itself up to 16, then
    rounded up to a multiple of 8 (to 128), 32 (to 512) and 128 beyond.

    oneDNN builds, and keeps in its primitive cache, one kernel per problem shape,
    each with memory of its own. An engine's steps come in every row count from 1
    to ``max_num_batched_tokens``; unpadded, those kernels held 0.38 GiB more at
    peak on the 256-request workload than PyTorch's path. Buckets bound the count
    at about 50 shapes per weight matrix (up to 2048 rows). Padding adds at most
    7, 31 or 127 rows, a small share of a product of that size (and below 128
    rows the product is bound by reading the weights, not by the rows).
    """
    if m <= 16:
        return m
    step = 8 if m <= 128 else 32 if m <= 512 else 128
    return -(-m // step) * step


def onednn_linear(
    x: torch.Tensor,  # [..., in_features] float32, CPU
    weight: torch.Tensor,  # [out_features, in_features]
    bias: torch.Tensor | None = None,  # [out_features]
) -> torch.Tensor:  # [..., out_features]
    """``F.linear(x, weight, bias)`` computed by oneDNN (inference only)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    rows = padded_rows(m)
    if rows != m:  # zero rows up to the bucket; their outputs are dropped
        padded = x2.new_zeros(rows, x2.shape[1])
        padded[:m] = x2
        x2 = padded
    elif not x2.is_contiguous():
        x2 = x2.contiguous()
    out = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")
    if rows != m:
        out = out[:m]
    return out.view(*lead, weight.shape[0])


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose forward runs on oneDNN (float32, CPU, inference).

    Made by :func:`use_onednn_linears` from an existing ``nn.Linear``; it holds
    nothing more than the layer it replaces. After :func:`pack_onednn_linears`
    its ``weight`` is an opaque oneDNN tensor (``weight.is_mkldnn``; same shape
    and dtype, ``weight.to_dense()`` gives the values); ``state_dict`` still
    returns, and ``load_state_dict`` still takes, the plain weight.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
            return F.linear(x, w, self.bias)  # oneDNN's op has no backward
        return onednn_linear(x, w, self.bias)

    @property
    def is_packed(self) -> bool:
        return bool(self.weight.is_mkldnn)

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        w = destination.get(prefix + "weight")
        if w is not None and w.is_mkldnn:
            destination[prefix + "weight"] = w.detach().to_dense()

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        if not self.is_packed:
            super()._load_from_state_dict(state_dict, prefix, *args)
            return
        # Load into a plain stand-in (shape checks and errors as nn.Linear's),
        # then lay it out again.
        self.weight = nn.Parameter(self.weight.detach().to_dense(), requires_grad=False)
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.weight = _packed(self.weight)


def pack_onednn_linears(model: nn.Module, exclude: tuple[nn.Module, ...] = ()) -> int:
    """Lay the weights of ``model``'s :class:`OneDNNLinear` layers out in
    oneDNN's blocked format, once, instead of on every call.

    oneDNN's product reads a plain weight through a kernel for that layout; with
    the weight laid out for its blocked kernels the SmolLM2-135M layers ran 1.22x
    faster at 1 row, 1.31x at 4, 1.18-1.24x at 16-64 and 1.08x at 256 on 2
    threads (docs/benchmarks.md, "Linear layers through oneDNN"). The packed
    weight replaces the plain one (no second copy). Layers in ``exclude`` and layers whose weight is shared with another
    parameter (a tied lm_head, which the embedding reads as a plain tensor) keep
    the plain layout.

    Returns:
        How many layers were packed.
    """
    owners = collections.Counter(
        p.untyped_storage().data_ptr()
        for _, p in model.named_parameters(remove_duplicate=False)
        if not p.is_mkldnn
    )
    skip = {id(m) for m in exclude}
    n = 0
    for mod in model.modules():
        if type(mod) is not OneDNNLinear or id(mod) in skip or mod.is_packed:
            continue
        if owners[mod.weight.untyped_storage().data_ptr()] > 1:
            continue  # shared
        if not packing_available(mod.weight.dtype):
            continue
        mod.weight = _packed(mod.weight)
        n += 1
    return n


def use_onednn_linears(model: nn.Module) -> int:
    """Switch every float32 or bfloat16 CPU ``nn.Linear`` in ``model`` to
    :class:`OneDNNLinear`.

    In place and reversible (set ``__class__`` back to ``nn.Linear``); parameters,
    buffers, hooks and attributes stay as they are. Layers of other types (int8,
    bitsandbytes) and of other dtypes or devices are left alone.

    Returns:
        How many layers were switched.
    """
    n = 0
    for mod in model.modules():
        if (
            type(mod) is nn.Linear
            and mod.weight.device.type == "cpu"
            and mod.weight.dtype in _CHECK_TOLERANCE
        ):
            mod.__class__ = OneDNNLinear
            n += 1
    return n
