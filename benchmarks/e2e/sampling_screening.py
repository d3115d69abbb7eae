"""Batch-1 sampling with greedy screening on and off, by weight format.

    python -m benchmarks.e2e.sampling_screening
    python -m benchmarks.e2e.sampling_screening --formats gguf --repeats 5

One chat request sampled at temperature 0.8 (seed 3), 128 tokens, EOS ignored,
prefill included; median of the repeats. Each (format, screening) pair runs in
its own engine, the pairs alternate, and the two columns of a format must give
the same text (checked): screening changes the speed, not the tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

FORMATS = {
    "fp32": {},
    "int8": {"quantization": "int8"},
    "gguf": {"quantization": "gguf"},
}


def run(opts: dict[str, str], screening: str, repeats: int) -> tuple[float, list[int]]:
    from llmprod import Engine, SamplingParams

    with Engine.from_pretrained("smollm2-135m", greedy_screening=screening,
                                **opts) as eng:  # fmt: skip
        prompt = eng.render_chat(
            [{"role": "user", "content": "Write a long story about a dragon."}]
        )
        params = SamplingParams(
            max_tokens=128, temperature=0.8, seed=3, ignore_eos=True
        )
        tokens = eng.generate([prompt], params)[0].token_ids
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            eng.generate([prompt], params)
            times.append(time.perf_counter() - t)
    return 128 / statistics.median(times), tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("| format | screening off, tok/s | screening on, tok/s | on / off |")
    print("|---|---:|---:|---:|")
    for name in args.formats.split(","):
        off, toks_off = run(FORMATS[name], "off", args.repeats)
        on, toks_on = run(FORMATS[name], "auto", args.repeats)
        if toks_on != toks_off:
            raise SystemExit(f"{name}: screening changed the sampled tokens")
        print(f"| {name} | {off:.1f} | {on:.1f} | {on / off:.2f}x |")


if __name__ == "__main__":
    main()
