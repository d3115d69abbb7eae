"""``"int4"``: groupwise 4-bit weights and the linear layer that runs them.

For a weight ``W`` of shape ``[out_features, in_features]`` split into groups of
``group_size`` consecutive input weights per output row::

    W[n, k] ~= scales[n, g] * q[n, k] + mins[n, g]      q in 0..15, g = k // group_size

This is GGUF's Q4_1 block (32 weights, a scale and a minimum), and Q4_0 is the
case ``mins = -8 * scales``, so both load with their codes untouched (see
:mod:`llmprod.quant.gguf`). Float checkpoints are quantized to it by
:func:`quantize_int4`: round to nearest, per group, with a small search over
how much of each group's range to cover.

On CPU, :class:`WeightOnlyInt4Linear` runs torch's
``aten._weight_int4pack_mm_for_cpu`` with bfloat16 activations; the kernel reads
the 4-bit codes (half a byte per weight, a quarter of int8's traffic would be a
byte) and computes ``(q - 8) * scale + zero`` with ``zero = mins + 8 * scales``.
Where that op is missing or fails its self-test, the layer dequantizes to
float32 per call (correct, slower; said once in the log).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("llmprod")

__all__ = [
    "GROUP_SIZES",
    "Int4Quantizer",
    "Int4Weight",
    "WeightOnlyInt4Linear",
    "dequantize_int4",
    "is_int4pack_available",
    "quantize_int4",
    "quantize_model_int4",
]

GROUP_SIZES = (32, 64, 128)
"""Group sizes :func:`quantize_int4` takes (GGUF's Q4 blocks are 32)."""

_KERNEL_N_MULTIPLE = 16
"""``_convert_weight_to_int4pack_for_cpu`` packs output rows in blocks of 16."""

_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)
"""Fractions of each group's range tried by :func:`quantize_int4` (about the
group's centre); the one with the least squared error wins per group."""


@dataclass(frozen=True, slots=True)
class Int4Weight:
    """A weight in the int4 scheme: ``q`` uint8 ``[N, K]`` (0..15), ``scales``
    and ``mins`` float32 ``[N, K // group_size]``."""

    q: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor

    @property
    def group_size(self) -> int:
        return int(self.q.shape[1] // self.scales.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(self.q, self.scales, self.mins, dtype)


def dequantize_int4(
    q: torch.Tensor,  # [N, K] codes 0..15
    scales: torch.Tensor,  # [N, K // G]
    mins: torch.Tensor,  # [N, K // G]
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # [N, K]
    """``scales * q + mins`` per group, in float32 (a multiply, then an add: the
    operations and rounding of GGUF's own Q4_0/Q4_1 dequantization), cast to
    ``dtype``."""
    n, k = q.shape
    groups = scales.shape[1]
    qf = q.to(torch.float32).view(n, groups, k // groups)
    w = qf * scales.to(torch.float32)[..., None]
    w = w + mins.to(torch.float32)[..., None]
    return w.view(n, k).to(dtype)


def quantize_int4(weight: torch.Tensor, group_size: int = 32) -> Int4Weight:
    """Quantize a float weight to the int4 scheme.

    Per group: the range ``[lo, hi]`` is shrunk about its centre by each of
    :data:`_CLIP_RATIOS`, codes are rounded to nearest, and the ratio with the
    least squared error is kept (clipping a rare outlier often halves the step
    for every other weight).

    Args:
        weight: a finite 2-D floating tensor ``[N, K]``.
        group_size: one of :data:`GROUP_SIZES`; must divide ``K``.

    Raises:
        ValueError: not 2-D floating, inf/NaN, or a group size that does not fit.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"expected a 2-D floating weight, got shape {tuple(weight.shape)} "
            f"dtype {weight.dtype}"
        )
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size} must be one of {GROUP_SIZES}")
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={k}")
    w = weight.detach().to(torch.float32).reshape(n, k // group_size, group_size)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight holds inf or NaN; it cannot be quantized")
    lo, hi = w.amin(-1), w.amax(-1)
    centre, half = (hi + lo) / 2, (hi - lo) / 2
    best_err = best_q = best_d = best_m = None
    for ratio in _CLIP_RATIOS:
        m = centre - half * ratio
        d = (half * 2 * ratio / 15).clamp_(min=torch.finfo(torch.float32).tiny)
        q = torch.round((w - m[..., None]) / d[..., None]).clamp_(0, 15)
        err = ((q * d[..., None] + m[..., None] - w) ** 2).sum(-1)
        if best_err is None:
            best_err, best_q, best_d, best_m = err, q, d, m
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_q = torch.where(better[..., None], q, best_q)  # type: ignore[arg-type]
        best_d = torch.where(better, d, best_d)  # type: ignore[arg-type]
        best_m = torch.where(better, m, best_m)  # type: ignore[arg-type]
    assert best_q is not None and best_d is not None and best_m is not None
    return Int4Weight(best_q.to(torch.uint8).view(n, k), best_d, best_m)


@functools.cache
def is_int4pack_available(device_type: str = "cpu") -> bool:
    """Whether ``aten._weight_int4pack_mm_for_cpu`` runs here and agrees with the
    float32 reference on a small problem."""
    if device_type != "cpu" or not hasattr(
        torch.ops.aten, "_weight_int4pack_mm_for_cpu"
    ):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        w = quantize_int4(torch.randn(64, 128, generator=gen), 32)
        x = torch.randn(3, 128, generator=gen)
        layer = WeightOnlyInt4Linear.from_int4(w, use_kernel=True)
        out = layer(x)
        ref = x @ w.dequantize().t()
        return bool(torch.allclose(out, ref, rtol=3e-2, atol=3e-1))
    except Exception:  # any failure means "not usable here"
        return False


def _int4_mm(
    x: torch.Tensor, packed: Any, group_size: int, scale_zeros: Any
) -> torch.Tensor:
    """The kernel: bfloat16 ``x [m, k]`` times the packed weight, bfloat16 out."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(
        x, packed, group_size, scale_zeros
    )


def _pack_for_kernel(q: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)


@functools.cache
def _kernel_layout(n: int, k: int) -> torch.Tensor:
    """Where each code of an ``[n, k]`` weight lands in the kernel's packed
    bytes: index ``i`` of the flattened nibbles (byte ``i // 2``, low nibble when
    ``i`` is even) holds the code of flat position ``layout[i]``. Read by packing
    the positions themselves, four bits at a time."""
    positions = torch.arange(n * k, dtype=torch.int64)
    layout = torch.zeros(n * k, dtype=torch.int64)
    shift = 0
    while (n * k - 1) >> shift:
        digit = ((positions >> shift) & 15).view(n, k)
        packed = _pack_for_kernel(digit).view(-1).to(torch.int64)
        nibbles = torch.stack([packed & 15, packed >> 4], -1).view(-1)
        layout |= nibbles << shift
        shift += 4
    return layout


def _unpack_from_kernel(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    flat = packed.view(-1).to(torch.int64)
    nibbles = torch.stack([flat & 15, flat >> 4], -1).view(-1)
    q = torch.empty(n * k, dtype=torch.uint8)
    q[_kernel_layout(n, k)] = nibbles.to(torch.uint8)
    return q.view(n, k)


class WeightOnlyInt4Linear(nn.Module):
    """A linear layer holding 4-bit groupwise weights.

    The state dict holds ``qweight`` (uint8 ``[out, in // 2]``, two codes a
    byte, the even input index in the low nibble), ``scales`` and ``mins``
    (float32 ``[out, in // group_size]``) and an optional ``bias``. With the CPU
    kernel the codes live only in its packed layout (no second copy); the state
    dict is rebuilt from it when asked for. ``prepare(release_exact=True)`` (what
    the Engine's loaders call) also drops the float32 scales and minimums, so
    that the layer holds one copy of its weight, the kernel's (the codes and the
    bfloat16 scales and zero points it reads): a quarter less memory, and no state
    dict (:meth:`int4_weight` then gives the weight the kernel computes with).

    Args:
        in_features, out_features: the shape.
        group_size: input weights per scale.
        bias: whether there is a bias.
        use_kernel: run ``aten._weight_int4pack_mm_for_cpu`` (None: where it
            works); False dequantizes to float32 per call.
    """

    scales: torch.Tensor
    mins: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int = 32,
        bias: bool = False,
        *,
        use_kernel: bool | None = None,
    ) -> None:
        super().__init__()
        if in_features % group_size or in_features % 2:
            raise ValueError(
                f"group_size={group_size} does not divide in_features={in_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.use_kernel = use_kernel
        groups = in_features // group_size
        self.register_buffer(
            "scales", torch.ones(out_features, groups, dtype=torch.float32)
        )
        self.register_buffer(
            "mins", torch.zeros(out_features, groups, dtype=torch.float32)
        )
        self.bias: torch.Tensor | None
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._q: torch.Tensor | None = torch.zeros(
            out_features, in_features, dtype=torch.uint8
        )
        """The codes ``[out, in]``, until the kernel's layout replaces them."""
        self._packed: torch.Tensor | None = None
        self._scale_zeros: torch.Tensor | None = None
        self.exact_released = False
        """Whether :meth:`prepare` dropped the float32 scales and minimums."""

    @classmethod
    def from_int4(
        cls,
        w: Int4Weight,
        bias: torch.Tensor | None = None,
        *,
        use_kernel: bool | None = None,
    ) -> WeightOnlyInt4Linear:
        """The layer around an :class:`Int4Weight` (and a bias)."""
        n, k = w.q.shape
        mod = cls(k, n, w.group_size, bias is not None, use_kernel=use_kernel)
        mod._q = w.q.to(torch.uint8).contiguous()
        mod.scales = w.scales.to(torch.float32).contiguous()
        mod.mins = w.mins.to(torch.float32).contiguous()
        if bias is not None:
            mod.bias = bias.detach().to(torch.float32).clone()
        return mod

    # -- state ---------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """The codes, uint8 ``[out, in]`` (rebuilt from the kernel layout)."""
        if self._q is not None:
            return self._q
        assert self._packed is not None
        return _unpack_from_kernel(self._packed, self.out_features, self.in_features)

    def int4_weight(self) -> Int4Weight:
        """The codes, scales and minimums; after ``prepare(release_exact=True)``
        the kernel's: its bfloat16 scales, and minimums ``zero - 8 * scale``."""
        if not self.exact_released:
            return Int4Weight(self.codes(), self.scales, self.mins)
        assert self._scale_zeros is not None
        sz = self._scale_zeros.to(torch.float32).transpose(0, 1)  # [out, groups, 2]
        scales = sz[..., 0].contiguous()
        return Int4Weight(self.codes(), scales, sz[..., 1] - 8 * scales)

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        if self.exact_released:
            raise RuntimeError(
                f"{prefix}: this int4 layer released its float32 scales and "
                f"minimums (prepare(release_exact=True)) and has no state dict; "
                f"save it before preparing it"
            )
        super()._save_to_state_dict(destination, prefix, keep_vars)
        q = self.codes()
        destination[prefix + "qweight"] = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        if self.exact_released:  # loading gives the layer exact scales again
            groups = self.in_features // self.group_size
            self.scales = torch.ones(self.out_features, groups)
            self.mins = torch.zeros(self.out_features, groups)
            self.exact_released = False
        packed = state_dict.get(prefix + "qweight")
        if packed is None:
            missing_keys.append(prefix + "qweight")
        else:
            want = (self.out_features, self.in_features // 2)
            if tuple(packed.shape) != want or packed.dtype != torch.uint8:
                error_msgs.append(
                    f"{prefix}qweight: expected uint8 {want}, got "
                    f"{packed.dtype} {tuple(packed.shape)}"
                )
            else:
                q = torch.stack([packed & 15, packed >> 4], -1)
                self._q = q.view(self.out_features, self.in_features).contiguous()
                self._packed = self._scale_zeros = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys,
            unexpected_keys, error_msgs,
        )  # fmt: skip
        if prefix + "qweight" in unexpected_keys:  # ours, not a registered buffer
            unexpected_keys.remove(prefix + "qweight")
        self._packed = self._scale_zeros = None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )

    # -- compute -------------------------------------------------------------------
    @property
    def uses_kernel(self) -> bool:
        if self.use_kernel is None:
            self.use_kernel = (
                self.scales.device.type == "cpu"
                and self.out_features % _KERNEL_N_MULTIPLE == 0
                and is_int4pack_available()
            )
            if not self.use_kernel:
                _log_fallback(self.out_features)
        return self.use_kernel

    def prepare(self, release_exact: bool = False) -> None:
        """Move the codes into the kernel's layout (once; frees the plain copy).

        Args:
            release_exact: also drop the float32 scales and minimums (the kernel
                reads its bfloat16 copy); the layer then has no state dict.
                Ignored where the kernel does not run.
        """
        if not self.uses_kernel:
            return
        if self._packed is None:
            assert self._q is not None
            self._packed = _pack_for_kernel(self._q)
            zeros = self.mins + 8 * self.scales
            sz = torch.stack([self.scales, zeros], -1).transpose(0, 1).contiguous()
            self._scale_zeros = sz.to(torch.bfloat16)
            self._q = None
        if release_exact and not self.exact_released:
            self.scales = self.mins = None  # type: ignore[assignment]
            self.exact_released = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        packed = self._packed
        if packed is not None and self.bias is None and x.dim() == 2:
            # The step's common case, in as few torch calls as it takes.
            if x.dtype == torch.bfloat16:
                return _int4_mm(
                    x.contiguous(), packed, self.group_size, self._scale_zeros
                )
            out = _int4_mm(
                x.to(torch.bfloat16).contiguous(),
                packed,
                self.group_size,
                self._scale_zeros,
            )
            return out.to(x.dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.uses_kernel:
            if self._packed is None:
                self.prepare()
            out = _int4_mm(
                x2.to(torch.bfloat16).contiguous(),
                self._packed,
                self.group_size,
                self._scale_zeros,
            )
        else:
            w = dequantize_int4(self.codes(), self.scales, self.mins, torch.float32)
            out = x2.to(torch.float32) @ w.t()
        if self.bias is not None:  # added in float32, the output then float32
            out = out.float() + self.bias.float()
            return out.reshape(*lead, self.out_features)
        return out.to(x.dtype).reshape(*lead, self.out_features)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The input dtype the product runs in (bfloat16 for the kernel): an
        input already in it is not converted."""
        return torch.bfloat16 if self.uses_kernel else torch.float32


class Int4Quantizer:
    """Quantizes a model's linear layers (but those ``skip`` names) to int4,
    each holding only the kernel's copy of its weight
    (``prepare(release_exact=True)``).

    Call it as the loader's ``on_loaded(model, name)`` hook to quantize each
    layer as soon as its float32 weight is loaded, then :meth:`finish` for the
    rest (all of them where the hook is not called).

    Raises (from the first call, or :meth:`finish`): ValueError naming a layer
    whose input width ``group_size`` does not divide, before changing any.
    """

    def __init__(self, group_size: int = 32, skip: tuple[str, ...] = ()) -> None:
        self.group_size = group_size
        self.skip = skip
        self.layers = 0
        """Layers quantized."""
        self._targets: set[str] | None = None

    def _check(self, model: nn.Module) -> set[str]:
        from llmprod.quant.convert import _select_linears

        if self._targets is None:
            targets = list(_select_linears(model, self.skip))
            for name, linear in targets:
                if linear.in_features % self.group_size:
                    raise ValueError(
                        f"group_size={self.group_size} does not divide in_features="
                        f"{linear.in_features} of {name}"
                    )
            self._targets = {name for name, _ in targets}
        return self._targets

    def __call__(self, model: nn.Module, name: str) -> None:
        if name in self._check(model):
            self._swap(model, name, model.get_submodule(name))  # type: ignore[arg-type]

    def finish(self, model: nn.Module) -> int:
        """Quantize the layers the hook has not; returns how many in all."""
        targets = self._check(model)
        for name, module in list(model.named_modules()):
            if name in targets and isinstance(module, nn.Linear):
                self._swap(model, name, module)
        return self.layers

    def _swap(self, model: nn.Module, name: str, linear: nn.Linear) -> None:
        from llmprod.quant.convert import _set_submodule

        w = quantize_int4(linear.weight, self.group_size)
        bias = None if linear.bias is None else linear.bias.detach()
        layer = WeightOnlyInt4Linear.from_int4(w, bias)
        layer.prepare(release_exact=True)
        _set_submodule(model, name, layer)
        self.layers += 1


def quantize_model_int4(
    model: nn.Module, group_size: int = 32, skip: tuple[str, ...] = ()
) -> int:
    """Swap the model's linear layers (but those ``skip`` names) for int4
    layers, one at a time, each holding only the kernel's copy of its weight
    (``prepare(release_exact=True)``); returns how many. Raises ValueError
    naming a layer whose input width ``group_size`` does not divide, before
    changing any."""
    return Int4Quantizer(group_size, skip).finish(model)


@functools.cache
def _log_fallback(out_features: int) -> None:
    if out_features % _KERNEL_N_MULTIPLE:
        why = f"it needs out_features divisible by {_KERNEL_N_MULTIPLE}"
    else:
        why = f"it is not usable here (torch {torch.__version__})"
    logger.warning(
        "int4: a layer with out_features=%d cannot run "
        "aten._weight_int4pack_mm_for_cpu (%s); it dequantizes to float32 per "
        "call, at about float32 speed",
        out_features,
        why,
    )
