"""Speculative decoding (n-gram prompt lookup, or a draft model) against plain
decoding, in one run.

Two kinds of request, greedy, EOS ignored:

- **copy**: chat requests that ask to repeat, summarise or edit a passage given
  in the prompt (the output reuses the input: what prompt lookup is for);
- **open**: the shared benchmark workload's chat requests (``benchmarks.workload``:
  questions and instructions about a passage; outputs mostly new text).

For each kind and each batch size (requests submitted together), the same
requests run with ``speculative=None`` and with ``speculative={...}`` in one
process each, taking turns; generated tokens per second of wall time, the
median of ``--repeats``, and the acceptance counters. Outputs are compared token
for token (greedy: they must be equal).

    python -m benchmarks.speculative --batch-sizes 1,2,4,8 --repeats 3
    python -m benchmarks.speculative --quantization gguf --batch-sizes 1
    python -m benchmarks.speculative --method draft --draft-quantization gguf \
        --batch-sizes 1 --k 6

With ``--method draft`` the draft is SmolLM2-135M itself with
``--draft-quantization`` weights (its GGUF file's own 4-bit ones, or int8),
drafting for the target in ``--quantization`` (float32 by default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from benchmarks.e2e.harness import run_each_in_own_process

PASSAGES = [
    "The lighthouse keeper climbed the stairs every evening at six. He lit the "
    "lamp, wound the clock and wrote one line in the log: the weather, the ships "
    "he saw, and whether the fog bell had rung.",
    "def moving_average(values, window):\n    out = []\n    total = 0.0\n    for i, "
    "v in enumerate(values):\n        total += v\n        if i >= window:\n"
    "            total -= values[i - window]\n        out.append(total / min(i + 1, "
    "window))\n    return out\n",
    "Our office will be closed on Monday for the public holiday. Orders placed "
    "over the weekend will ship on Tuesday, and the support line will reopen at "
    "nine in the morning on Tuesday.",
    "The committee met on Thursday and agreed three things: the library will "
    "open an hour later on Sundays, the reading room gets new chairs, and the "
    "old card catalogue goes to the town museum.",
]
INSTRUCTIONS = [
    "Repeat this text exactly:",
    "Rewrite this text with every sentence on its own line:",
    "Copy this text, then add one sentence at the end:",
    "Fix any typos in this text and return it in full:",
]


def copy_prompts(tok: Any, n: int) -> list[list[int]]:
    from benchmarks.workload import chat_token_ids

    out = []
    for i in range(n):
        msg = f"{INSTRUCTIONS[i % len(INSTRUCTIONS)]}\n\n{PASSAGES[i % len(PASSAGES)]}"
        out.append(chat_token_ids(tok, [{"role": "user", "content": msg}]))
    return out


def open_prompts(tok: Any, n: int) -> list[list[int]]:
    from benchmarks.workload import WorkloadSpec, build_workload

    wl = build_workload(WorkloadSpec(num_requests=n, seed=1), tok)
    return [list(r.prompt_token_ids) for r in wl.requests]


def measure(case: str, args: argparse.Namespace) -> dict[str, Any]:
    """One case in this process: ``kind:batch:on|off``."""
    import torch

    from llmprod import Engine, SamplingParams

    kind, batch, mode = case.split(":")
    torch.set_num_threads(args.threads)
    kw: dict[str, Any] = {"kv_cache_memory": "512MiB"}
    if args.quantization:
        kw["quantization"] = args.quantization
    if mode == "on":
        kw["speculative"] = {
            "num_speculative_tokens": args.k,
            "max_num_seqs": max(int(batch), 1),
        }
        if args.method == "draft":
            kw["speculative"].update(
                method="draft",
                draft_model="smollm2-135m",
                draft_quantization=args.draft_quantization,
            )
    eng = Engine.from_pretrained("smollm2-135m", **kw)
    prompts = (copy_prompts if kind == "copy" else open_prompts)(
        eng.tokenizer, int(batch)
    )
    p = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    eng.generate(prompts, SamplingParams(max_tokens=8, temperature=0))  # warm-up
    eng.metrics()  # (the counters below are differences)
    before = eng.metrics().scheduler["speculative"]
    t = time.perf_counter()
    outs = eng.generate(prompts, p)
    wall = time.perf_counter() - t
    after = eng.metrics().scheduler["speculative"]
    eng.close()
    drafted = after["drafted_tokens"] - before["drafted_tokens"]
    accepted = after["accepted_tokens"] - before["accepted_tokens"]
    return {
        "tok_s": sum(len(o.token_ids) for o in outs) / wall,
        "drafted": drafted,
        "accepted": accepted,
        "tokens": [o.token_ids for o in outs],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", default="1,2,4,8")
    ap.add_argument("--kinds", default="copy,open")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--method", default="ngram", choices=["ngram", "draft"])
    ap.add_argument("--draft-quantization", default="gguf")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.case:
        print(json.dumps(measure(args.case, args)))
        return
    cases = [
        f"{kind}:{b}:{mode}"
        for kind in args.kinds.split(",")
        for b in args.batch_sizes.split(",")
        for mode in ("off", "on")
    ]
    passthrough = [
        "--new-tokens",
        str(args.new_tokens),
        "--k",
        str(args.k),
        "--threads",
        str(args.threads),
    ]
    if args.quantization:
        passthrough += ["--quantization", args.quantization]
    passthrough += ["--method", args.method, "--draft-quantization",
                    args.draft_quantization]  # fmt: skip
    runs = run_each_in_own_process(
        "benchmarks.speculative", "--case", cases, args.repeats, passthrough
    )
    q = args.quantization or "fp32"
    how = (
        "prompt lookup"
        if args.method == "ngram"
        else (f"draft: smollm2-135m {args.draft_quantization}")
    )
    print(
        f"{q}, {how}, {args.new_tokens} new tokens per request (greedy, EOS ignored), "
        f"k={args.k}, {args.threads} threads, median of {args.repeats}, "
        "one process per run"
    )
    print(
        "| requests | batch | plain tok/s | speculative tok/s | speed-up "
        "| accepted / drafted | same tokens |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for kind in args.kinds.split(","):
        for b in args.batch_sizes.split(","):
            off, on = runs[f"{kind}:{b}:off"], runs[f"{kind}:{b}:on"]
            a = statistics.median(r["tok_s"] for r in off)
            s = statistics.median(r["tok_s"] for r in on)
            drafted = sum(r["drafted"] for r in on)
            rate = sum(r["accepted"] for r in on) / drafted if drafted else 0.0
            same = all(r["tokens"] == off[0]["tokens"] for r in on)
            print(
                f"| {kind} | {b} | {a:.1f} | {s:.1f} | {s / a:.2f}x "
                f"| {rate:.0%} | {'yes' if same else 'NO'} |"
            )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
