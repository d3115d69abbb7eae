"""The one tolerance table for kernel-vs-reference comparisons, keyed by dtype.

The references compute in float32 and round the output to the input dtype once.
The kernels differ from them in summation order (tiled online softmax), in using
``exp2`` on pre-scaled scores, and, for 16-bit inputs, in rounding the softmax
probabilities to the input dtype before the ``P @ V`` product, as FlashAttention
does. docs/kernels.md gives the reasoning behind each row.

``store_kv`` is a copy and is compared exactly (``torch.equal``), not through
this table.
"""

from __future__ import annotations

from typing import Any

import torch

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    # Reordered fp32 sums and exp2 vs exp: measured max error ~1e-6 on O(1)
    # outputs; 1e-5 leaves a 10x margin without hiding an indexing bug (those
    # show up as O(0.1) errors).
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    # Triton tutorials' fused-attention check. The output's own fp16 rounding is
    # 2**-11 relative, the fp16 probabilities add about as much again; measured
    # max error 2e-3 in the interpreter.
    torch.float16: {"atol": 1e-2, "rtol": 0.0},
    # bf16 keeps 8 mantissa bits: rounding alone is 2**-9 relative. vLLM's
    # attention tests use the same pair.
    torch.bfloat16: {"atol": 1.5e-2, "rtol": 1e-2},
}


def tolerance(dtype: torch.dtype) -> dict[str, Any]:
    """``atol``/``rtol`` keywords for ``torch.testing.assert_close`` at ``dtype``."""
    return dict(TOLERANCES[dtype])
