"""Greedy screening against the full float32 lm_head product, on SmolLM2-135M's
lm_head and real lm_head inputs (chat decoding), at 1 to 32 token rows.

    python -m benchmarks.e2e.greedy_screening --threads 2
    python -m benchmarks.e2e.greedy_screening --engines smollm2-135m gemma3-270m

The first times, per call: the full product with its argmax (oneDNN, as the engine runs it
with ``greedy_screening="off"``), the screen's int8 product alone, and the whole
screened argmax (int8 product, bounds, candidates, float32 rescoring); and counts
the candidates the bound keeps per row. Every screened token is checked against
the full product's.

``--engines`` instead runs one greedy request (64 new tokens, prefill included)
on each model with ``greedy_screening`` "off" and "auto", every run in a fresh
process of its own (the cases take turns), and reports decode speed, load time
and peak RSS, and whether the tokens were the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from benchmarks.e2e.harness import run_each_in_own_process, time_per_call

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash map works, with a short Python example.",
    "List five ideas for a weekend trip near the mountains.",
    "What is the difference between a list and a tuple in Python?",
]


ENGINE_TEXT = "Once upon a time, a lighthouse keeper found a message in a bottle. It"


def engine_case(case: str, threads: int) -> dict[str, Any]:
    """One greedy request on ``MODEL:MODE``, in this (fresh) process."""
    from llmprod import Engine, SamplingParams
    from llmprod.ops.metrics import peak_rss_bytes

    torch.set_num_threads(threads)
    model, mode = case.split(":")
    t = time.perf_counter()
    eng = Engine.from_pretrained(
        model, kv_cache_memory="256MiB", enable_prefix_caching=False,
        greedy_screening=mode,
    )  # fmt: skip
    load = time.perf_counter() - t
    ids = eng.tokenizer.encode(ENGINE_TEXT)
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    eng.generate([ids], SamplingParams(max_tokens=8, temperature=0))  # warm-up
    t = time.perf_counter()
    tokens = eng.generate([ids], params)[0].token_ids
    wall = time.perf_counter() - t
    return {"tok_s": 64 / wall, "load_s": load, "peak_rss": peak_rss_bytes(),
            "tokens": tokens}  # fmt: skip


def compare_engines(models: list[str], repeats: int, threads: int) -> None:
    cases = [f"{m}:{mode}" for m in models for mode in ("off", "auto")]
    runs = run_each_in_own_process(
        "benchmarks.e2e.greedy_screening", "--case", cases, repeats,
        ["--threads", str(threads)],
    )  # fmt: skip
    print(f"one greedy request, 64 new tokens, {threads} threads, median of "
          f"{repeats}, one process per run")  # fmt: skip
    print("| model | greedy_screening | tok/s | speed-up | load (s) | peak RSS (GiB) "
          "| same tokens |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---|")
    for m in models:
        base = statistics.median(r["tok_s"] for r in runs[f"{m}:off"])
        ref = runs[f"{m}:off"][0]["tokens"]
        for mode in ("off", "auto"):
            rs = runs[f"{m}:{mode}"]
            tok_s = statistics.median(r["tok_s"] for r in rs)
            load = statistics.median(r["load_s"] for r in rs)
            rss = statistics.median(r["peak_rss"] for r in rs) / 2**30
            same = all(r["tokens"] == ref for r in rs)
            print(f"| {m} | {mode} | {tok_s:.1f} | {tok_s / base:.2f}x | "
                  f"{load:.2f} | {rss:.2f} | {same} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--engines", nargs="+", help="models to compare end to end")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--case", help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.case:
        print(json.dumps(engine_case(args.case, args.threads)))
        return
    if args.engines:
        compare_engines(args.engines, args.repeats, args.threads)
        return
    torch.set_num_threads(args.threads)
    from llmprod import Engine, SamplingParams

    eng = Engine.from_pretrained(
        "smollm2-135m", greedy_screening="off", enable_prefix_caching=False
    )
    lm_head = eng.model.lm_head  # OneDNNLinear on x86-64 (linear_backend="auto")
    captured: list[torch.Tensor] = []
    hook = lm_head.register_forward_hook(
        lambda _m, inp, _o: captured.append(inp[0].detach().clone())
    )
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    for text in PROMPTS:
        eng.generate([eng.render_chat([{"role": "user", "content": text}])], params)
    hook.remove()
    hidden = torch.cat([h for h in captured if h.shape[0] == 1])  # decode rows
    from llmprod.exec.threads import run_on_compute_thread

    # Timed on the engine's compute thread, where the engine runs it (a second
    # thread running parallel ops would start a second OpenMP team).
    run_on_compute_thread(measure, args, lm_head, hidden, len(PROMPTS))
    eng.close()


def measure(
    args: argparse.Namespace, lm_head: torch.nn.Module, hidden: torch.Tensor, n: int
) -> None:
    from llmprod.layers.screened_head import ScreenedGreedyHead

    head = ScreenedGreedyHead(lm_head.weight.detach(), max_rows=1 << 30)
    with torch.inference_mode():
        for i in range(hidden.shape[0]):
            row = hidden[i : i + 1]
            assert head.argmax(row) == lm_head(row).argmax(1).tolist(), i
        per_row = head.candidates / head.rows
        counts = []
        for i in range(hidden.shape[0]):
            scores, bound = head.screen(hidden[i : i + 1])  # type: ignore[misc]
            counts.append(int(((scores + bound) >= (scores - bound).amax()).sum()))
        print(f"{hidden.shape[0]} decode rows of {n} chat requests, "
              f"{args.threads} threads; candidates per row: mean {per_row:.1f}, "
              f"median {statistics.median(counts):.0f}, max {max(counts)}")  # fmt: skip
        xb_scales = (head._q, head._scales)
        print("| rows | full float32 product + argmax (ms) | int8 product alone (ms) "
              "| screened argmax (ms) | full / screened |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|")
        for m in (1, 2, 4, 8, 16, 32):
            x = hidden[:m].contiguous()
            xb = x.to(torch.bfloat16)
            full = time_per_call(lambda x=x: lm_head(x).argmax(1).tolist(), args.calls)
            int8 = time_per_call(
                lambda xb=xb: torch.ops.aten._weight_int8pack_mm(xb, *xb_scales),
                args.calls,
            )
            screened = time_per_call(lambda x=x: head.argmax(x), args.calls)
            print(f"| {m} | {full * 1e3:.2f} | {int8 * 1e3:.2f} | "
                  f"{screened * 1e3:.2f} | {full / screened:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
