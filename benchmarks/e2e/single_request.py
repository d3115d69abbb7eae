"""Single-request decode speed: llmprod (fp32 on each linear backend, the generic
path, int8) against transformers ``generate`` at batch 1, same prompt, same
number of new tokens.

    python -m benchmarks.e2e.single_request --new-tokens 128 --repeats 3

Every measurement runs in a fresh process of its own (the systems, repeated,
take turns), so that no system shares its process, and its OpenMP thread teams,
with another: each runs as it would alone in an application.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from benchmarks.e2e.harness import run_each_in_own_process

PROMPT = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle."
)
BASELINE = "transformers generate (fp32)"
# name -> Engine.from_pretrained keyword arguments (None: transformers).
SYSTEMS: dict[str, dict[str, Any] | None] = {
    BASELINE: None,
    "llmprod fp32": {},
    "llmprod fp32, linear_backend='torch'": {"linear_backend": "torch"},
    "llmprod fp32, linear_backend='onednn'": {"linear_backend": "onednn"},
    "llmprod fp32, generic path": {"model_impl": "generic"},
    "llmprod fp32, greedy_screening='off'": {"greedy_screening": "off"},
    "llmprod int8": {"quantization": "int8"},
    "llmprod int8, greedy_screening='off'": {
        "quantization": "int8",
        "greedy_screening": "off",
    },
    "llmprod int8, lm_head int8 too (`quantization_skip=['embed_tokens']`)": {
        "quantization": "int8",
        "quantization_skip": ["embed_tokens"],
    },
    "llmprod gguf (the file's Q4_1 codes, `quantization='gguf'`)": {
        "quantization": "gguf"
    },
    "llmprod int4 (quantized at load, group 32, `quantization='int4'`)": {
        "quantization": "int4"
    },
}


def measure(name: str, new_tokens: int, threads: int) -> float:
    """Load one system, warm it up, and time one request (tok/s)."""
    import torch

    from llmprod import Engine, SamplingParams

    torch.set_num_threads(threads)
    kwargs = SYSTEMS[name]
    eng = Engine.from_pretrained(
        "smollm2-135m", kv_cache_memory="256MiB", enable_prefix_caching=False,
        **(kwargs or {}),
    )  # fmt: skip
    ids = eng.render_chat([{"role": "user", "content": PROMPT}])
    if kwargs is None:  # transformers, loaded and run on this (the main) thread
        from transformers import AutoModelForCausalLM

        path = eng.model_path
        eng.close()
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        x = torch.tensor([ids])

        def run(n: int) -> None:
            with torch.inference_mode():
                hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                            min_new_tokens=n, do_sample=False)  # fmt: skip
    else:

        def run(n: int) -> None:
            p = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
            eng.generate([ids], p)

    run(8)  # warm-up
    t = time.perf_counter()
    run(new_tokens)
    return new_tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--only", help="comma-separated substrings: run the systems whose name has "
        "one (the transformers baseline always runs)",
    )  # fmt: skip
    ap.add_argument("--system", help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.system:
        print(json.dumps(measure(args.system, args.new_tokens, args.threads)))
        return
    systems = SYSTEMS
    if args.only:
        keys = args.only.split(",")
        systems = {n: kw for n, kw in SYSTEMS.items()
                   if n == BASELINE or any(k in n for k in keys)}  # fmt: skip
    runs: dict[str, list[float]] = run_each_in_own_process(
        "benchmarks.e2e.single_request", "--system", systems, args.repeats,
        ["--new-tokens", str(args.new_tokens), "--threads", str(args.threads)],
    )  # fmt: skip
    base = statistics.median(runs[BASELINE])
    print(f"one request, {args.new_tokens} new tokens (prefill included), "
          f"{args.threads} threads, median of {args.repeats}, one process per run")  # fmt: skip
    print("| system | tok/s | vs transformers |\n|---|---:|---:|")
    for name, vals in runs.items():
        med = statistics.median(vals)
        print(f"| {name} | {med:.1f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
