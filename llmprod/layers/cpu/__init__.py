"""Fused CPU operations for the decode step (``decode_ops.c``), built at first use.

The step's small operations (residual add and RMSNorm, rotary embedding, the
SiLU gate, decode attention over the paged cache) each cost several torch calls
of a few microseconds; at batch 1 they took more time than the matrix products
(docs/benchmarks.md, "Fused CPU operations"). Here each is one C call.

The C file is compiled once per machine with the system compiler (``$CC`` or
``cc``) into ``cpu-ops/`` of the model cache (``$LLMPROD_CACHE_DIR``, default
``~/.cache/llmprod``) and loaded with ctypes. Where no compiler is found or it
fails, :func:`fused_ops` returns None, the log says why once, and the model
runs its torch operations instead (``EngineConfig.fused_ops``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from llmprod.models.registry import cache_dir

log = logging.getLogger("llmprod")

_SOURCE = Path(__file__).with_name("decode_ops.c")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared"]
_OPENMP = "-fopenmp"  # dropped where the compiler lacks it (one thread then)
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}

_lock = threading.Lock()
_loaded: FusedOps | None = None
_tried = False
_failure = ""


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("flags", "model name"))]
    return "\n".join(sorted(set(lines)))


def _build() -> Path:
    """Compile the C file (once per source, flags and CPU); return the library."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (cc, gcc or $CC)")
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(
        source + " ".join(_FLAGS).encode() + _cpu_signature().encode()
    ).hexdigest()[:16]
    target = cache_dir() / "cpu-ops" / f"decode_ops-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        error = ""
        for extra in ([_OPENMP], []):
            done = subprocess.run(
                [compiler, *_FLAGS, *extra, "-o", tmp, str(_SOURCE), "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if done.returncode == 0:
                os.replace(tmp, target)  # atomic: concurrent builders agree
                return target
            error = error or done.stderr.strip()[:500]
        raise RuntimeError(f"{compiler} failed: {error}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fused_ops() -> FusedOps | None:
    """The fused operations, built and loaded on first call; None where they
    cannot be (the reason logged once)."""
    global _loaded, _tried, _failure
    if _tried:
        return _loaded
    with _lock:
        if _tried:
            return _loaded
        try:
            _loaded = FusedOps(ctypes.CDLL(str(_build())))
        except Exception as exc:  # any failure means: run torch operations
            _failure = str(exc)
            log.warning(
                "fused CPU operations unavailable (%s); the step runs torch "
                "operations instead",
                exc,
            )
        _tried = True
    return _loaded


_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p
_int = ctypes.c_int
_f32 = ctypes.c_float

# The C functions' parameters, in order (decode_ops.c).
_SIGNATURES = {
    "llmprod_add_rms_norm": "p p i l p p i l l f i",
    "llmprod_silu_mul": "p i p i l l i",
    "llmprod_rope": "p l p p l l l i",
    "llmprod_paged_decode": "p l p p l l p p p p l p l l l l l f l p i",
    "llmprod_int8_linear": "p l l p p l p i i",
}
_CTYPES = {"p": _ptr, "i": _int, "l": _i64, "f": _f32}


class FusedOps:
    """Typed entry points to the compiled library: tensors in, shapes checked,
    new tensors out. Each call splits large batches over torch's thread count."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        for name, sig in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = [_CTYPES[c] for c in sig.split()]
            fn.restype = None
        self._add_rms_norm = lib.llmprod_add_rms_norm
        self._silu_mul = lib.llmprod_silu_mul
        self._rope = lib.llmprod_rope
        self._decode = lib.llmprod_paged_decode
        self._int8_linear = lib.llmprod_int8_linear

    def add_rms_norm(
        self,
        hidden: torch.Tensor,  # float32 [rows, dim], contiguous; updated in place
        delta: torch.Tensor | None,  # [rows, dim], rows contiguous
        weight: torch.Tensor,  # float32 [dim]
        eps: float,
        out_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """``hidden += delta``; returns ``rms_norm(hidden) * weight``."""
        rows, dim = hidden.shape
        out = torch.empty(rows, dim, dtype=out_dtype)
        if delta is None:
            dptr, dtype, stride = None, 0, 0
        else:
            assert delta.stride(1) == 1 and delta.shape == hidden.shape
            dptr, dtype, stride = (
                delta.data_ptr(),
                _DTYPES[delta.dtype],
                delta.stride(0),
            )
        self._add_rms_norm(
            hidden.data_ptr(), dptr, dtype, stride, weight.data_ptr(),
            out.data_ptr(), _DTYPES[out_dtype], rows, dim, eps,
            torch.get_num_threads(),
        )  # fmt: skip
        return out

    def silu_mul(
        self, gate_up: torch.Tensor, out_dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """``silu(gate) * up`` of the two halves of each contiguous row."""
        rows, width = gate_up.shape
        assert gate_up.is_contiguous()
        out = torch.empty(rows, width // 2, dtype=out_dtype)
        self._silu_mul(
            gate_up.data_ptr(), _DTYPES[gate_up.dtype], out.data_ptr(),
            _DTYPES[out_dtype], rows, width // 2, torch.get_num_threads(),
        )  # fmt: skip
        return out

    def rope(
        self,
        x: torch.Tensor,  # float32 [rows, heads, head_dim], head_dim contiguous
        cos: torch.Tensor,  # float32 [rows, 1, head_dim], contiguous
        sin: torch.Tensor,
    ) -> None:
        """Rotate ``x`` in place (rotate-half form)."""
        rows, heads, head_dim = x.shape
        assert x.stride(2) == 1 and x.stride(1) == head_dim
        self._rope(
            x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(),
            rows, heads, head_dim, torch.get_num_threads(),
        )  # fmt: skip

    def paged_decode(
        self,
        q: torch.Tensor,  # float32 [rows, heads, head_dim]
        k: torch.Tensor,  # float32 [rows, kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: torch.Tensor,  # float32 [2, blocks, block_size, kv_heads, head_dim]
        slots: torch.Tensor,  # int64 [rows]
        block_tables: torch.Tensor,  # int32 [rows, max_blocks]
        seq_lens: torch.Tensor,  # int32 [rows]
        scale: float,
        window: int | None,
    ) -> torch.Tensor:  # float32 [rows, heads, head_dim]
        """Store each row's key and value at its slot, then attend to its
        sequence's cached keys (the last ``window`` of them, if given)."""
        rows, heads, head_dim = q.shape
        kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
        assert k.stride(1) == head_dim and v.stride(1) == head_dim
        assert q.stride(1) == head_dim and block_tables.stride(1) == 1
        out = torch.empty(rows, heads, head_dim)
        self._decode(
            q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(), k.stride(0),
            v.stride(0), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(),
            slots.data_ptr(), block_tables.data_ptr(), block_tables.stride(0),
            seq_lens.data_ptr(), rows, heads, kv_heads, head_dim, block_size,
            scale, window or 0, out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out

    def int8_linear(
        self,
        x: torch.Tensor,  # float32 [rows, in], contiguous
        weight: torch.Tensor,  # int8 [out, in], contiguous
        scales: torch.Tensor,  # float32 [out]
        out_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:  # [rows, out]
        """``x @ (scales[:, None] * weight).T`` without dequantizing the weight
        (float32 sums): the product for a few rows, where reading the int8
        weight once is the cost."""
        rows, k = x.shape
        n = weight.shape[0]
        assert x.is_contiguous() and weight.is_contiguous() and weight.shape[1] == k
        assert x.dtype == scales.dtype == torch.float32 and weight.dtype == torch.int8
        out = torch.empty(rows, n, dtype=out_dtype)
        self._int8_linear(
            x.data_ptr(), rows, k, weight.data_ptr(), scales.data_ptr(), n,
            out.data_ptr(), _DTYPES[out_dtype], torch.get_num_threads(),
        )  # fmt: skip
        return out


def attach_fused_ops(
    model: object,
    mode: str,
    backend_name: str,
    device: torch.device,
    dtype: torch.dtype,
    head: object = None,
) -> bool:
    """Give ``model`` the fused operations where ``mode`` ("auto", "on", "off")
    and the setting allow: a native model (one with a ``fused_ops`` attribute)
    in float32 on the CPU with the torch attention backend. Its submodules with
    a ``fused_ops`` attribute (int8 linear layers) and the greedy ``head`` get
    them too. Returns whether it runs them.

    Raises:
        ValueError: ``mode="on"`` where they cannot run, saying why.
    """
    if mode == "off":
        return False
    why = None
    if not hasattr(model, "fused_ops"):
        why = f"{type(model).__name__} has no fused path (the native model has)"
    elif device.type != "cpu" or backend_name != "torch" or dtype != torch.float32:
        why = (
            "they run float32 models on the CPU with the torch attention backend, "
            f"not {str(dtype).removeprefix('torch.')} on {device.type} with "
            f"{backend_name!r}"
        )
    else:
        ops = fused_ops()
        if ops is not None:
            for module in model.modules():  # type: ignore[attr-defined]
                if hasattr(module, "fused_ops"):
                    module.fused_ops = ops
            if head is not None and hasattr(head, "fused_ops"):
                head.fused_ops = ops  # type: ignore[attr-defined]
            return True
        why = f"they could not be built here ({_failure})"
    if mode == "on":
        raise ValueError(f"fused_ops='on': {why}")
    return False
