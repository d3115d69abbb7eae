"""Micro benchmark: the linear layers of SmolLM2-135M in fp32 vs int8.

The stack is 30 layers of four linears with SmolLM2-135M shapes (hidden 576,
intermediate 1536, 9 query heads and 3 KV heads of 64):

    qkv_proj      576 -> 960      o_proj   576 -> 576
    gate_up_proj  576 -> 3072     down_proj 1536 -> 576

Each variant runs the whole stack once per sample on random weights (std 0.02) and
random N(0, 1) activations (fp32 in and out, as the engine's fp32 model feeds them;
casts are inside the timing). Variants are interleaved sample by sample so that
load from other processes hits all of them alike. Two tables: median and minimum
time per pass, each with the speedup over fp32 from the same statistic (higher is
faster); on a shared machine the minimum is the least disturbed sample.

Variants:
    fp32            nn.Linear, fp32 weights
    bf16 (no int8)  nn.Linear with bf16 weights and bf16 inputs: context only, it
                    shows what the bf16 GEMM alone buys
    wo fp32 fused   WeightOnlyInt8Linear, fp32 activations, aten._weight_int8pack_mm
                    at every token count
    wo bf16 fused   the same with bf16 activations
    wo bf16 GEMM    WeightOnlyInt8Linear's large-M path at every token count:
                    dequantize to the GEMM dtype (bf16 where the CPU has native
                    bf16, else fp32), then one GEMM
    wo default      WeightOnlyInt8Linear as quantize_model builds it: bf16, fused
                    kernel below large_m_threshold rows, dequantize-then-GEMM above
    bnb t=6 / t=0   bitsandbytes Linear8bitLt (CPU backend), outlier threshold 6 / 0,
                    when bitsandbytes imports

Usage:
    python benchmarks/quant/bench_int8_linear.py [--tokens 1,32,512] [--samples 15]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from llmprod.quant import bnb_linear, weight_only
from llmprod.quant.scheme import quantize_per_channel
from llmprod.quant.weight_only import WeightOnlyInt8Linear

HIDDEN, INTERMEDIATE, HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, NUM_LAYERS = (
    576,
    1536,
    64,
    9,
    3,
    30,
)
SHAPES = {  # name: (in_features, out_features)
    "qkv_proj": (HIDDEN, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM),
    "o_proj": (NUM_HEADS * HEAD_DIM, HIDDEN),
    "gate_up_proj": (HIDDEN, 2 * INTERMEDIATE),
    "down_proj": (INTERMEDIATE, HIDDEN),
}

Stack = list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]


def build_weights(num_layers: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        {
            name: torch.randn(n_out, n_in, generator=gen) * 0.02
            for name, (n_in, n_out) in SHAPES.items()
        }
        for _ in range(num_layers)
    ]


def linear(weight: torch.Tensor, dtype: torch.dtype) -> nn.Module:
    mod = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=dtype)
    with torch.no_grad():
        mod.weight.copy_(weight)
    return mod.eval()


def build_variants(
    weights: list[dict[str, torch.Tensor]], with_bnb: bool
) -> dict[str, tuple[Stack, torch.dtype]]:
    """name -> (the layer stack, dtype of the inputs fed to it)."""
    quantized = [
        {k: quantize_per_channel(w) for k, w in layer.items()} for layer in weights
    ]
    never = 1 << 62  # a large_m_threshold that keeps the fused kernel at every M

    def stack(make: Callable[[str, int], nn.Module]) -> Stack:
        return [(name, make(name, i)) for i in range(len(weights)) for name in SHAPES]

    variants: dict[str, tuple[Stack, torch.dtype]] = {
        "fp32": (
            stack(lambda n, i: linear(weights[i][n], torch.float32)),
            torch.float32,
        ),
        "bf16 (no int8)": (
            stack(lambda n, i: linear(weights[i][n], torch.bfloat16)),
            torch.bfloat16,
        ),
        "wo fp32 fused": (
            stack(
                lambda n, i: WeightOnlyInt8Linear.from_quantized(
                    *quantized[i][n],
                    compute_dtype=torch.float32,
                    large_m_threshold=never,
                )
            ),
            torch.float32,
        ),
        "wo bf16 fused": (
            stack(
                lambda n, i: WeightOnlyInt8Linear.from_quantized(
                    *quantized[i][n],
                    compute_dtype=torch.bfloat16,
                    large_m_threshold=never,
                )
            ),
            torch.float32,
        ),
        "wo bf16 GEMM": (
            stack(
                lambda n, i: WeightOnlyInt8Linear.from_quantized(
                    *quantized[i][n], compute_dtype=torch.bfloat16, large_m_threshold=0
                )
            ),
            torch.float32,
        ),
        "wo default": (
            stack(lambda n, i: WeightOnlyInt8Linear.from_quantized(*quantized[i][n])),
            torch.float32,
        ),
    }
    if with_bnb:
        for threshold in (6.0, 0.0):
            variants[f"bnb t={threshold:g}"] = (
                stack(
                    lambda n, i, t=threshold: bnb_linear._make_bnb_linear(
                        *quantized[i][n], None, t, is_training=False
                    )
                ),
                torch.float32,
            )
    return variants


def run_stack(stack: Stack, x: torch.Tensor, x_ff: torch.Tensor) -> None:
    for name, layer in stack:
        layer(x_ff if name == "down_proj" else x)


def measure(
    variants: dict[str, tuple[Stack, torch.dtype]],
    num_tokens: int,
    samples: int,
    budget_s: float,
) -> dict[str, list[float]]:
    """Interleaved samples (seconds per stack pass) for every variant."""
    gen = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, HIDDEN, generator=gen)
    x_ff = torch.randn(num_tokens, INTERMEDIATE, generator=gen)
    inputs = {dt: (x.to(dt), x_ff.to(dt)) for dt in {dt for _, dt in variants.values()}}
    times: dict[str, list[float]] = {name: [] for name in variants}
    spent = dict.fromkeys(variants, 0.0)
    with torch.inference_mode():
        for stack, dt in variants.values():  # warm-up
            run_stack(stack, *inputs[dt])
        while True:
            # Slow variants stop after 3 samples once they used up their budget.
            todo = [
                n
                for n in variants
                if len(times[n]) < samples
                and (len(times[n]) < 3 or spent[n] < budget_s)
            ]
            if not todo:
                return times
            for name in todo:
                stack, dt = variants[name]
                start = time.perf_counter()
                run_stack(stack, *inputs[dt])
                elapsed = time.perf_counter() - start
                times[name].append(elapsed)
                spent[name] += elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1,32,512", help="token counts (rows)")
    parser.add_argument("--samples", type=int, default=15, help="samples per cell")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per cell")
    parser.add_argument("--layers", type=int, default=NUM_LAYERS)
    parser.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes")
    parser.add_argument(
        "--only", default="", help="comma-separated variant names to run (fp32 always)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads, 0: default"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    bnb_version = "not used"
    if not args.no_bnb:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import bitsandbytes

            bnb_version = bitsandbytes.__version__
        except ImportError as exc:
            bnb_version = f"unavailable ({exc})"
    with_bnb = bnb_version[0].isdigit()

    print(
        f"torch {torch.__version__}, ATen CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, native bf16 GEMM "
        f"{weight_only._has_native_bf16_gemm()}, threads {torch.get_num_threads()}, "
        f"{platform.machine()}, bitsandbytes {bnb_version}"
    )
    print(
        f"{args.layers} layers x 4 linears, SmolLM2-135M shapes; wo default "
        f"large_m_threshold={weight_only._default_large_m_threshold()}; up to "
        f"{args.samples} interleaved samples per cell (n); load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    variants = build_variants(build_weights(args.layers), with_bnb)
    if args.only:
        keep = {"fp32", *args.only.split(",")}
        variants = {n: v for n, v in variants.items() if n in keep}
    names = list(variants)
    header = "| tokens | " + " | ".join(names) + " |"
    rule = "|" + "---|" * (len(names) + 1)
    tables: dict[str, list[str]] = {"median": [header, rule], "min": [header, rule]}
    for num_tokens in [int(t) for t in args.tokens.split(",")]:
        times = measure(variants, num_tokens, args.samples, args.budget)
        for stat, fn in (("median", statistics.median), ("min", min)):
            base = fn(times["fp32"])
            cells = [
                f"{fn(times[n]) * 1e3:.2f} ms ({base / fn(times[n]):.2f}x, "
                f"n={len(times[n])})"
                for n in names
            ]
            tables[stat].append(f"| {num_tokens} | " + " | ".join(cells) + " |")
        print(tables["median"][-1], flush=True)
    for stat, rows in tables.items():
        print(f"\n{stat} time per pass of the stack (speedup over fp32):\n")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
