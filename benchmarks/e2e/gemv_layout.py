"""Weight layout at small batch: ``F.linear`` with the weight stored row-major (as
checkpoints and ``nn.Linear`` hold it) against the same values stored column-major,
for a forward's worth of distinct SmolLM2-135M-shaped matrices (so they stream
from memory as in a real step) and for the 49152 x 576 lm_head.

    python -m benchmarks.e2e.gemv_layout
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.e2e.harness import time_per_call

SHAPES = [(1344, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down
LAYERS = 30


def main() -> None:
    torch.set_num_threads(2)
    rows = [torch.randn(o, i) for _ in range(LAYERS) for o, i in SHAPES]
    cols = [w.t().contiguous().t() for w in rows]
    head = torch.randn(49152, 576)
    head_cols = head.t().contiguous().t()
    read = torch.randn(64 * 2**20)  # 256 MiB
    sec = time_per_call(lambda: read.sum(), 5)
    print(f"read bandwidth (sum of 256 MiB): {read.numel() * 4 / sec / 1e9:.1f} GB/s")
    print(
        "| rows (M) | layers row-major | column-major | lm_head row-major | column-major |"
    )
    print("|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for m in (1, 4, 16, 64, 256):
            xs = {i: torch.randn(m, i) for _, i in SHAPES}
            x = torch.randn(m, 576)
            n = 5 if m <= 64 else 2
            a = time_per_call(
                lambda xs=xs: [F.linear(xs[w.shape[1]], w) for w in rows], n
            )
            b = time_per_call(
                lambda xs=xs: [F.linear(xs[w.shape[1]], w) for w in cols], n
            )
            c = time_per_call(lambda x=x: F.linear(x, head), n)
            d = time_per_call(lambda x=x: F.linear(x, head_cols), n)
            print(
                f"| {m} | {a * 1e3:.2f} ms | {b * 1e3:.2f} ms ({a / b:.2f}x) "
                f"| {c * 1e3:.2f} ms | {d * 1e3:.2f} ms ({c / d:.2f}x) |"
            )


if __name__ == "__main__":
    main()
