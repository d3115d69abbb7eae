"""Speculative decoding (n-gram prompt lookup, or a draft model) against plain
decoding, in one run.

Kinds of request, greedy, each ending at its EOS (or ``--new-tokens``):

- input-grounded ones, whose answers reuse the prompt's words (what prompt
  lookup is for): **copy** (repeat or edit a passage given in the prompt),
  **summary** (summarise a given passage), **context** (answer a question from
  a given text), **code** (extend code that repeats its own identifiers);
- **open**: the shared benchmark workload's chat requests (``benchmarks.workload``:
  questions and instructions about a passage; outputs mostly new text).

For each kind and batch size, ``--requests`` requests (at least the batch size)
run in groups of the batch size, each group submitted together and the next
after it finishes (batch 1: one request at a time, as a latency-bound caller
sends them). The same requests run with ``speculative=None`` and with
``speculative={...}`` in one process each, taking turns; generated tokens per
second of wall time (prefill included), the median of ``--repeats``, and the
acceptance counters. Outputs are compared token for token (greedy: they must be
equal). ``--ignore-eos`` makes every request generate ``--new-tokens``.

    python -m benchmarks.speculative --batch-sizes 1,16 --repeats 3
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
COPY_INSTRUCTIONS = [
    "Repeat this text exactly:",
    "Rewrite this text with every sentence on its own line:",
    "Copy this text, then add one sentence at the end:",
    "Fix any typos in this text and return it in full:",
]
CONTEXT_QUESTIONS = [
    "When does the lighthouse keeper climb the stairs, and what does he write?",
    "What does the function return?",
    "When will orders placed over the weekend ship?",
    "What did the committee agree?",
]
CODE = [
    "Complete this Python class by adding a method `remove(self, key)` in the "
    "same style:\n\nclass Registry:\n    def __init__(self):\n        "
    "self.items = {}\n\n    def add(self, key, value):\n        if key in "
    "self.items:\n            raise KeyError(key)\n        self.items[key] = "
    "value\n\n    def get(self, key):\n        if key not in self.items:\n"
    "            raise KeyError(key)\n        return self.items[key]\n",
    "Add a docstring and type hints to this function and return the whole "
    "function:\n\n" + PASSAGES[1],
    "Write a second function `moving_sum(values, window)` next to this one, "
    "reusing its variable names:\n\n" + PASSAGES[1],
    "Complete this test file with a test for `parse_line` in the same style as "
    "the one for `parse_header`:\n\nfrom mylib import parse_header, "
    "parse_line\n\n\ndef test_parse_header():\n    result = parse_header("
    "'a,b,c')\n    assert result == ['a', 'b', 'c']\n\n\ndef "
    "test_parse_header_empty():\n    result = parse_header('')\n    assert "
    "result == []\n",
]


def grounded_messages(kind: str) -> list[str]:
    """The user messages of an input-grounded kind."""
    if kind == "copy":
        return [f"{COPY_INSTRUCTIONS[i]}\n\n{PASSAGES[i]}" for i in range(4)]
    if kind == "summary":
        return [f"Summarise this text in two sentences:\n\n{p}" for p in PASSAGES]
    if kind == "context":
        return [
            "Read the text and answer the question using its words.\n\n"
            f"Text: {p}\n\nQuestion: {q}"
            for p, q in zip(PASSAGES, CONTEXT_QUESTIONS)
        ]
    if kind == "code":
        return list(CODE)
    raise ValueError(f"unknown kind {kind!r}")


def grounded_prompts(tok: Any, kind: str, n: int) -> list[list[int]]:
    from benchmarks.workload import chat_token_ids

    msgs = grounded_messages(kind)
    return [
        chat_token_ids(tok, [{"role": "user", "content": msgs[i % len(msgs)]}])
        for i in range(n)
    ]


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
        kw["speculative"] = {"num_speculative_tokens": args.k}
        if args.max_num_seqs:
            kw["speculative"]["max_num_seqs"] = args.max_num_seqs
        if args.method == "draft":
            kw["speculative"].update(
                method="draft",
                draft_model="smollm2-135m",
                draft_quantization=args.draft_quantization,
            )
    eng = Engine.from_pretrained("smollm2-135m", **kw)
    b = int(batch)
    n = max(b, args.requests)
    if kind == "open":
        prompts = open_prompts(eng.tokenizer, n)
    else:
        prompts = grounded_prompts(eng.tokenizer, kind, n)
    p = SamplingParams(
        max_tokens=args.new_tokens, temperature=0, ignore_eos=args.ignore_eos
    )
    eng.generate(prompts[:b], SamplingParams(max_tokens=8, temperature=0))  # warm-up
    before = eng.metrics().scheduler["speculative"]
    outs = []
    t = time.perf_counter()
    for i in range(0, n, b):
        outs += eng.generate(prompts[i : i + b], p)
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
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--kinds", default="copy,summary,context,code,open")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=160)
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument(
        "--max-num-seqs",
        type=int,
        default=0,
        help="speculate in steps of up to this many requests (0: the engine's "
        "default policy)",
    )
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
        "--requests",
        str(args.requests),
        "--new-tokens",
        str(args.new_tokens),
        "--k",
        str(args.k),
        "--threads",
        str(args.threads),
    ]
    if args.quantization:
        passthrough += ["--quantization", args.quantization]
    if args.ignore_eos:
        passthrough.append("--ignore-eos")
    if args.max_num_seqs:
        passthrough += ["--max-num-seqs", str(args.max_num_seqs)]
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
        f"{q}, {how}, up to {args.new_tokens} new tokens per request (greedy, "
        f"EOS {'ignored' if args.ignore_eos else 'ends a request'}), "
        f"{args.requests} requests per batch size (at least the batch), "
        f"k={args.k}, max_num_seqs={args.max_num_seqs or 'default'}, "
        f"{args.threads} threads, median of {args.repeats}, "
        "one process per run"
    )
    print(
        "| requests | batch | tokens | plain tok/s | speculative tok/s | speed-up "
        "| accepted / drafted | same tokens |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for kind in args.kinds.split(","):
        for b in args.batch_sizes.split(","):
            off, on = runs[f"{kind}:{b}:off"], runs[f"{kind}:{b}:on"]
            a = statistics.median(r["tok_s"] for r in off)
            s = statistics.median(r["tok_s"] for r in on)
            drafted = sum(r["drafted"] for r in on)
            rate = sum(r["accepted"] for r in on) / drafted if drafted else 0.0
            same = all(r["tokens"] == off[0]["tokens"] for r in on)
            ntok = sum(len(t) for t in off[0]["tokens"])
            print(
                f"| {kind} | {b} | {ntok} | {a:.1f} | {s:.1f} | {s / a:.2f}x "
                f"| {rate:.0%} | {'yes' if same else 'NO'} |"
            )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
