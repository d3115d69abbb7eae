"""The int4 CPU kernel by activation dtype, against a float32 GEMM, on
SmolLM2-135M's largest linear shape (gate/up: 1536 x 576), 2 threads.

    python -m benchmarks.quant.int4_kernel

Why ``WeightOnlyInt4Linear`` feeds ``aten._weight_int4pack_mm_for_cpu``
bfloat16 activations: the other dtypes take a much slower path.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

N, K, G = 1536, 576, 32


def _us(fn: Callable[[], object], n: int = 50) -> float:
    for _ in range(5):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=gen)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    w = torch.randn(N, K, generator=gen)
    op = torch.ops.aten._weight_int4pack_mm_for_cpu
    print(f"{N}x{K}, group {G}, 2 threads; microseconds per call")
    print("| rows | float32 GEMM | int4, bfloat16 | int4, float16 | int4, float32 |")
    print("|---:|---:|---:|---:|---:|")
    for m in (1, 8, 64):
        x = torch.randn(m, K, generator=gen)
        row = [_us(functools.partial(torch.mm, x, w.t()))]
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            xd, sz = x.to(dt), torch.randn(K // G, N, 2, generator=gen).to(dt)
            call = functools.partial(op, xd, packed, G, sz)
            row.append(_us(call, 50 if dt == torch.bfloat16 else 10))
        print(f"| {m} | " + " | ".join(f"{v:.0f}" for v in row) + " |")


if __name__ == "__main__":
    main()
