"""Tensor parallelism on this machine: decode step time and memory per rank,
TP=1 against TP=N, in one run.

Each case in its own process: greedy requests of the shared workload, EOS
ignored, submitted together; the decode time per step is (T(n) - T(1)) / (n - 1)
over ``--new-tokens`` n (prefill taken out); weight bytes and the KV budget per
rank come from ``metrics().engine["tensor_parallel"]``.

    python -m benchmarks.tensor_parallel --sizes 1,3 --batches 1,16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from benchmarks.e2e.harness import run_each_in_own_process


def measure(case: str, args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.workload import WorkloadSpec, build_workload
    from llmprod import Engine, SamplingParams

    size, batch, threads = (int(x) for x in case.split(":"))
    eng = Engine.from_pretrained("smollm2-135m", tensor_parallel_size=size,
                                 num_threads=threads, kv_cache_memory="256MiB")  # fmt: skip
    wl = build_workload(WorkloadSpec(num_requests=batch, seed=1), eng.tokenizer)
    prompts = [list(r.prompt_token_ids) for r in wl.requests]
    eng.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0))

    def timed(n: int) -> float:
        p = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        t = time.perf_counter()
        eng.generate(prompts, p)
        return time.perf_counter() - t

    n = args.new_tokens
    step_s = (timed(n) - timed(1)) / (n - 1)
    tp = eng.metrics().engine["tensor_parallel"]
    eng.close()
    return {"step_ms": step_s * 1e3, **tp}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,3")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--case", help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.case:
        print(json.dumps(measure(args.case, args)))
        return
    # One thread per rank; TP=1 also with every core (2 threads here).
    cases = []
    for b in args.batches.split(","):
        for s in args.sizes.split(","):
            cases.append(f"{s}:{b}:1")
            if s == "1":
                cases.append(f"1:{b}:2")
    runs = run_each_in_own_process(
        "benchmarks.tensor_parallel", "--case", cases, args.repeats,
        ["--new-tokens", str(args.new_tokens)],
    )  # fmt: skip
    print(f"decode ms per step (median of {args.repeats}), {args.new_tokens} new "
          "tokens, one process per run")  # fmt: skip
    print(
        "| batch | ranks x threads | ms/step | weights/rank MiB | KV budget/rank MiB |"
    )
    print("|---:|---|---:|---:|---:|")
    for case in cases:
        s, b, t = case.split(":")
        rs = runs[case]
        ms = statistics.median(r["step_ms"] for r in rs)
        w = rs[0]["weight_bytes_per_rank"] / 2**20
        kv = rs[0]["kv_budget_bytes_per_rank"] / 2**20
        print(f"| {b} | {s} x {t} | {ms:.1f} | {w:.0f} | {kv:.0f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
