"""Which torch ops an engine's steps spend their time in: torch's profiler on
the compute thread while the engine serves N identical requests (after a
warm-up run of the same), the ops with the most self CPU time, and the wall time
per generated token of an unprofiled run beside it.

    python -m benchmarks.e2e.profile_ops                          # batch 1, float32
    python -m benchmarks.e2e.profile_ops --opt quantization=gguf
    python -m benchmarks.e2e.profile_ops --requests 16 --opt linear_backend=onednn

``--opt NAME=VALUE`` (repeatable) passes an ``Engine.from_pretrained`` option;
the value is read as JSON when it parses, else as a string.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from benchmarks.e2e.harness import profile_compute_thread
from llmprod import Engine, SamplingParams

PROMPT = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle."
)


def parse_opts(pairs: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            opts[name] = json.loads(value)
        except json.JSONDecodeError:
            opts[name] = value
    return opts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=25, help="ops listed")
    ap.add_argument("--opt", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    opts = parse_opts(args.opt)
    eng = Engine.from_pretrained("smollm2-135m", **opts)
    ids = eng.render_chat([{"role": "user", "content": PROMPT}])
    sp = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    prompts = [ids] * args.requests
    eng.generate(prompts, sp)  # warm-up
    t = time.perf_counter()
    eng.generate(prompts, sp)
    wall = time.perf_counter() - t
    table = profile_compute_thread(lambda: eng.generate(prompts, sp), args.rows)
    print(f"options {opts}, {args.requests} request(s) x {args.new_tokens} tokens, "
          f"{args.threads} threads, linear backend {eng.linear_backend}")  # fmt: skip
    print(f"unprofiled: {1e3 * wall / args.new_tokens:.2f} ms per step "
          f"(prefill included), {args.requests * args.new_tokens / wall:.1f} tok/s")  # fmt: skip
    print(f"profiled run, ops of the compute thread ({args.new_tokens} steps):")
    print(table)
    eng.close()


if __name__ == "__main__":
    main()
