"""store_kv on a GPU: achieved bandwidth vs torch ``index_copy_`` on the same slots.

A step writes ``num_tokens`` keys and values; each byte is read once and written
once, so the bytes moved are ``2 * 2 * num_tokens * num_kv_heads * head_dim *
elem`` plus the int64 slots. Times are medians with the 20th and 80th
percentiles from ``triton.testing.do_bench``.

Example::

    python benchmarks/kernels/bench_store_kv.py --tokens 1 256 8192 --dtypes bf16

Needs a CUDA GPU; elsewhere it says so and exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
from bench_paged_attention import (
    DEVICE,
    DTYPES,
    QUANTILES,
    cuda_unavailable_reason,
    device_header,
    peak_gbps,
)

TOKENS = [1, 16, 256, 4096, 16384]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    parser.add_argument(
        "--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES)
    )
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=32768)
    parser.add_argument(
        "--peak-gbps", type=float, default=None, help="DRAM peak override"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if max(args.tokens) > args.num_blocks * args.block_size:
        parser.error("more tokens than cache slots: raise --num-blocks")
    return args


def bench(num_tokens: int, dtype: torch.dtype, args: argparse.Namespace) -> dict:
    import triton.testing
    from llmprod.kernels import store_kv

    shape = (num_tokens, args.num_kv_heads, args.head_dim)
    key = torch.randn(shape, device=DEVICE, dtype=dtype)
    value = torch.randn(shape, device=DEVICE, dtype=dtype)
    kv_cache = torch.empty(
        2, args.num_blocks, args.block_size, *shape[1:], device=DEVICE, dtype=dtype
    )
    num_slots = args.num_blocks * args.block_size
    slots = torch.randperm(num_slots, device=DEVICE)[:num_tokens]
    flat = kv_cache.view(2, num_slots, *shape[1:])

    def torch_copy() -> None:
        flat[0].index_copy_(0, slots, key)
        flat[1].index_copy_(0, slots, value)

    elem = torch.finfo(dtype).bits // 8
    moved = 4 * key.numel() * elem + 8 * num_tokens
    times = {
        "triton": triton.testing.do_bench(
            lambda: store_kv(key, value, kv_cache, slots), quantiles=QUANTILES
        ),
        "torch": triton.testing.do_bench(torch_copy, quantiles=QUANTILES),
    }
    return {name: (t, moved / (t[0] * 1e-3) / 1e9) for name, t in times.items()}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reason = cuda_unavailable_reason()
    if reason is not None:
        print(f"bench_store_kv: {reason}", file=sys.stderr)
        return 1
    torch.manual_seed(args.seed)
    peak = peak_gbps(args.peak_gbps)
    print(device_header())
    print(
        f"# kv_heads {args.num_kv_heads}, head_dim {args.head_dim}, block_size "
        f"{args.block_size}, {args.num_blocks} blocks; peak {peak:.0f} GB/s"
    )
    print(
        f"{'dtype':6}{'tokens':>8}  {'provider':8}{'ms p50':>9}{'p20':>9}{'p80':>9}"
        f"{'GB/s':>9}{'%bw':>6}"
    )
    for dtype_name in args.dtypes:
        for num_tokens in args.tokens:
            for name, (t, gbps) in bench(num_tokens, DTYPES[dtype_name], args).items():
                print(
                    f"{dtype_name:6}{num_tokens:>8}  {name:8}{t[0]:9.4f}{t[1]:9.4f}"
                    f"{t[2]:9.4f}{gbps:9.1f}{100 * gbps / peak:6.1f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
