"""Paged attention on a GPU: decode bandwidth and prefill throughput vs torch SDPA.

Decode (one query token per sequence) is memory-bound, so it is reported as
achieved bandwidth: the bytes a step must move (every cached key and value of
every sequence, plus query and output) over the measured time, and as a share of
the GPU's DRAM peak. Prefill (whole prompts, causal) is compute-bound and is
reported in TFLOP/s over the causal FLOPs ``2 * 2 * heads * head_dim * L(L+1)/2``
per sequence.

The baseline is ``torch.nn.functional.scaled_dot_product_attention`` on the same
shapes with a dense, contiguous KV (no block table, ``enable_gqa=True``): the
cost of paging shows as the gap to it. Times are medians with the 20th and 80th
percentiles from ``triton.testing.do_bench``.

Examples::

    python benchmarks/kernels/bench_paged_attention.py                 # full grid
    python benchmarks/kernels/bench_paged_attention.py --mode decode \\
        --batches 1 32 --contexts 4096 32768 --dtypes bf16
    python benchmarks/kernels/bench_paged_attention.py --sweep-configs --mode prefill

Needs a CUDA GPU; elsewhere it says so and exits with status 1.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

DEVICE = "cuda"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
CONTEXTS = [512, 1024, 2048, 4096, 8192, 16384, 32768]
BATCHES = [1, 4, 16, 64, 256]
QUANTILES = [0.5, 0.2, 0.8]
# Dense fp16/bf16 tensor-core peaks (TFLOP/s, no sparsity) from vendor sheets, by
# device-name fragment; --peak-tflops overrides. Triton's own estimate assumes an
# Ampere-style core and halves Hopper's figure.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}


@dataclass
class Row:
    """One measured (shape, provider) point."""

    mode: str
    dtype: str
    batch: int
    context: int
    provider: str
    ms_p50: float
    ms_p20: float
    ms_p80: float
    gbps: float
    pct_peak_bw: float
    tflops: float
    pct_peak_flops: float


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--mode", choices=["decode", "prefill", "all"], default="all")
    parser.add_argument(
        "--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES)
    )
    parser.add_argument("--contexts", nargs="+", type=int, default=CONTEXTS)
    parser.add_argument("--batches", nargs="+", type=int, default=BATCHES)
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument(
        "--providers",
        nargs="+",
        choices=["triton", "triton-nosplit", "sdpa", "ref"],
        default=["triton", "triton-nosplit", "sdpa"],
        help="triton: shape-chosen split-KV; triton-nosplit: one pass; "
        "ref: the per-sequence torch reference (slow, small shapes only)",
    )
    parser.add_argument(
        "--sweep-configs",
        action="store_true",
        help="also time every tile config in llmprod.kernels.paged_attention.CONFIGS",
    )
    parser.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=1 << 17,
        help="skip prefill shapes with more query tokens than this",
    )
    parser.add_argument(
        "--max-gb",
        type=float,
        default=None,
        help="skip shapes whose tensors need more GPU memory (default: 70%% of total)",
    )
    parser.add_argument(
        "--peak-gbps", type=float, default=None, help="DRAM peak override"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="fp16 peak override"
    )
    parser.add_argument(
        "--csv", default=None, help="also write the rows to this CSV file"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_heads % args.num_kv_heads:
        parser.error(f"{args.num_heads=} must be a multiple of {args.num_kv_heads=}")
    if min(args.contexts + args.batches) < 1:
        parser.error("contexts and batches must be >= 1")
    return args


def cuda_unavailable_reason() -> str | None:
    """Why this machine cannot run the benchmark, or None if it can."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set: interpreter timings mean nothing; unset it"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU, and torch sees none; nothing to measure here"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "needs Triton: pip install llmprod[triton]"
    return None


def device_header() -> str:
    """GPU, driver and library versions, printed above every result table."""
    import triton

    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    return (
        f"# {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} "
        f"SMs, driver {driver or 'unknown'}, CUDA {torch.version.cuda}, torch "
        f"{torch.__version__}, triton {triton.__version__}, python {platform.python_version()}"
    )


def peak_gbps(override: float | None) -> float:
    if override:
        return override
    import triton.testing

    return triton.testing.get_dram_gbps()


def peak_tflops(override: float | None) -> float:
    if override:
        return override
    name = torch.cuda.get_device_name()
    for fragment, tflops in PEAK_TFLOPS.items():
        if fragment in name:
            return tflops
    import triton.testing
    from triton.runtime import driver

    clock_khz = driver.active.utils.get_device_properties(0)["sm_clock_rate"]
    return triton.testing.get_max_tensorcore_tflops(torch.float16, clock_khz)


def paged_inputs(
    batch: int, context: int, q_len: int, args: argparse.Namespace, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """Paged inputs with every sequence at ``context`` tokens, blocks shuffled."""
    blocks_per_seq = math.ceil(context / args.block_size)
    num_blocks = batch * blocks_per_seq
    block_tables = torch.randperm(num_blocks, device=DEVICE, dtype=torch.int32)
    block_tables = block_tables.view(batch, blocks_per_seq)
    kv_cache = torch.randn(
        2,
        num_blocks,
        args.block_size,
        args.num_kv_heads,
        args.head_dim,
        device=DEVICE,
        dtype=dtype,
    )
    query = torch.randn(
        batch * q_len, args.num_heads, args.head_dim, device=DEVICE, dtype=dtype
    )
    seq_lens = torch.full((batch,), context, device=DEVICE, dtype=torch.int32)
    cu_seqlens_q = torch.arange(
        0, batch * q_len + 1, q_len, device=DEVICE, dtype=torch.int32
    )
    return query, kv_cache, block_tables, seq_lens, cu_seqlens_q


def dense_inputs(
    batch: int, context: int, q_len: int, args: argparse.Namespace, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """SDPA's layout: ``[batch, heads, len, head_dim]``, keys contiguous."""

    def make(heads: int, length: int) -> torch.Tensor:
        return torch.randn(
            batch, heads, length, args.head_dim, device=DEVICE, dtype=dtype
        )

    return (
        make(args.num_heads, q_len),
        make(args.num_kv_heads, context),
        make(args.num_kv_heads, context),
    )


def providers_for(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(label, paged_attention keyword arguments) per Triton variant to time."""
    from llmprod.kernels.triton_paged_attention import CONFIGS

    out = []
    if "triton" in args.providers:
        out.append(("triton", {}))
    if "triton-nosplit" in args.providers:
        out.append(("triton-nosplit", {"num_kv_splits": 1}))
    if args.sweep_configs:
        for c in CONFIGS:
            label = f"triton[m{c.block_m}-n{c.block_n}-w{c.num_warps}-s{c.num_stages}]"
            out.append((label, {"config": c, "num_kv_splits": 1}))
    return out


def measure(fn: Callable[[], object]) -> tuple[float, float, float]:
    import triton.testing

    p50, p20, p80 = triton.testing.do_bench(fn, quantiles=QUANTILES)
    return p50, p20, p80


def bench_shape(
    mode: str,
    dtype_name: str,
    batch: int,
    context: int,
    args: argparse.Namespace,
    peaks: tuple[float, float],
) -> list[Row]:
    from llmprod.kernels import paged_attention
    from llmprod.kernels.triton_paged_attention import keep

    from llmprod.layers.attention.reference import paged_attention_ref

    dtype = DTYPES[dtype_name]
    q_len = 1 if mode == "decode" else context
    elem = torch.finfo(dtype).bits // 8
    kv_bytes = 2 * batch * context * args.num_kv_heads * args.head_dim * elem
    io_bytes = 2 * batch * q_len * args.num_heads * args.head_dim * elem
    table_bytes = batch * math.ceil(context / args.block_size) * 4
    moved = kv_bytes + io_bytes + table_bytes
    flops = 4 * batch * args.num_heads * args.head_dim * (context * (context + 1) // 2)
    if mode == "decode":
        flops = 4 * batch * args.num_heads * args.head_dim * context
    scale = args.head_dim**-0.5
    group_pad = 1 << (args.num_heads // args.num_kv_heads - 1).bit_length()

    rows = []

    def add(provider: str, times: tuple[float, float, float]) -> None:
        seconds = times[0] * 1e-3
        gbps, tflops = moved / seconds / 1e9, flops / seconds / 1e12
        pct_bw, pct_flops = 100 * gbps / peaks[0], 100 * tflops / peaks[1]
        rows.append(
            Row(
                mode,
                dtype_name,
                batch,
                context,
                provider,
                *times,
                gbps,
                pct_bw,
                tflops,
                pct_flops,
            )
        )

    # Paged and dense inputs never coexist: each lives inside its own function.
    def time_paged() -> None:
        paged = paged_inputs(batch, context, q_len, args, dtype)
        for label, kwargs in providers_for(args):
            config = kwargs.get("config")
            if config is not None and not keep(config, group_pad):
                continue
            add(label, measure(lambda kw=kwargs: paged_attention(*paged, scale, **kw)))
        if "ref" in args.providers:
            add("ref", measure(lambda: paged_attention_ref(*paged, scale)))

    def time_sdpa() -> None:
        q, k, v = dense_inputs(batch, context, q_len, args, dtype)
        is_causal = mode == "prefill"
        add(
            "sdpa",
            measure(
                lambda: F.scaled_dot_product_attention(
                    q, k, v, is_causal=is_causal, scale=scale, enable_gqa=True
                )
            ),
        )

    time_paged()
    if "sdpa" in args.providers:
        time_sdpa()
    return rows


def print_header() -> None:
    print(
        f"{'mode':8}{'dtype':6}{'batch':>6}{'context':>8}  {'provider':34}"
        f"{'ms p50':>9}{'p20':>9}{'p80':>9}{'GB/s':>9}{'%bw':>6}{'TFLOP/s':>9}{'%fl':>6}"
    )


def print_rows(rows: list[Row]) -> None:
    for r in rows:
        print(
            f"{r.mode:8}{r.dtype:6}{r.batch:>6}{r.context:>8}  {r.provider:34}"
            f"{r.ms_p50:9.4f}{r.ms_p20:9.4f}{r.ms_p80:9.4f}{r.gbps:9.1f}"
            f"{r.pct_peak_bw:6.1f}{r.tflops:9.2f}{r.pct_peak_flops:6.1f}",
            flush=True,
        )


def fits(
    mode: str, batch: int, context: int, args: argparse.Namespace, max_bytes: float
) -> bool:
    q_len = 1 if mode == "decode" else context
    if mode == "prefill" and batch * context > args.max_prefill_tokens:
        return False
    elem = 2
    kv = 2 * batch * math.ceil(context / args.block_size) * args.block_size
    kv *= args.num_kv_heads * args.head_dim * elem
    q = 2 * batch * q_len * args.num_heads * args.head_dim * elem
    # Paged and dense copies live one after the other, never together.
    return kv + q <= max_bytes


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reason = cuda_unavailable_reason()
    if reason is not None:
        print(f"bench_paged_attention: {reason}", file=sys.stderr)
        return 1
    torch.manual_seed(args.seed)
    total_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    max_bytes = (args.max_gb or 0.7 * total_gb) * 1e9
    peaks = (peak_gbps(args.peak_gbps), peak_tflops(args.peak_tflops))
    print(device_header())
    print(
        f"# heads {args.num_heads}/{args.num_kv_heads} (q/kv), head_dim {args.head_dim}, "
        f"block_size {args.block_size}; peaks: {peaks[0]:.0f} GB/s, {peaks[1]:.0f} TFLOP/s"
    )
    print_header()
    modes = ["decode", "prefill"] if args.mode == "all" else [args.mode]
    rows: list[Row] = []
    for mode in modes:
        for dtype_name in args.dtypes:
            for batch in args.batches:
                for context in args.contexts:
                    if not fits(mode, batch, context, args, max_bytes):
                        continue
                    shape_rows = bench_shape(
                        mode, dtype_name, batch, context, args, peaks
                    )
                    print_rows(shape_rows)
                    rows += shape_rows
                    torch.cuda.empty_cache()
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])) if rows else [])
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
