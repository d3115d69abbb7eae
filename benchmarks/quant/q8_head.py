"""What holding lm_head in Q8_0 blocks costs the steps that need every logit
(sampling, logprobs, steps with more rows than greedy screening takes).

    python -m benchmarks.quant.q8_head            # the product, by rows
    python -m benchmarks.quant.q8_head --engine   # batch-1 sampling, gguf engine

The product: SmolLM2-135M's lm_head (49152 x 576), float32 ``x @ W.T``
against :class:`~llmprod.quant.q8.Q8Head` on the same values, 2 threads. The
engine: one request sampled at temperature 0.8, 128 tokens (prefill included),
median of three; run it at two commits to compare.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch


def _ms(fn: Callable[[], object], n: int = 20) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def product() -> None:
    from llmprod import Engine

    torch.set_num_threads(2)
    with Engine.from_pretrained("smollm2-135m", quantization="gguf") as eng:
        head = eng.model.lm_head
        weight = head.q8.dequantize()
        print("| rows | float32 product (ms) | Q8_0 blocks (ms) | ratio |")
        print("|---:|---:|---:|---:|")
        for rows in (1, 16, 64):
            x = torch.randn(rows, weight.shape[1])
            a = _ms(lambda: x @ weight.t())  # noqa: B023
            b = _ms(lambda: head(x))  # noqa: B023
            print(f"| {rows} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")


def engine() -> None:
    from llmprod import Engine, SamplingParams

    with Engine.from_pretrained("smollm2-135m", quantization="gguf") as eng:
        prompt = eng.render_chat(
            [{"role": "user", "content": "Write a long story about a dragon."}]
        )
        params = SamplingParams(
            max_tokens=128, temperature=0.8, seed=3, ignore_eos=True
        )
        eng.generate([prompt], params)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            eng.generate([prompt], params)
            times.append(time.perf_counter() - t)
        print(f"gguf, batch-1 sampling: {128 / sorted(times)[1]:.1f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", action="store_true")
    args = parser.parse_args()
    engine() if args.engine else product()


if __name__ == "__main__":
    main()
