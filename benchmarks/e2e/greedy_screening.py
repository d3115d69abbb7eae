"""Greedy screening against the full float32 lm_head product, on SmolLM2-135M's
lm_head and real lm_head inputs (chat decoding), at 1 to 32 token rows.

    python -m benchmarks.e2e.greedy_screening --threads 2

Times, per call: the full product with its argmax (oneDNN, as the engine runs it
with ``greedy_screening="off"``), the screen's int8 product alone, and the whole
screened argmax (int8 product, bounds, candidates, float32 rescoring); and counts
the candidates the bound keeps per row. Every screened token is checked against
the full product's.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.e2e.harness import time_per_call

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash map works, with a short Python example.",
    "List five ideas for a weekend trip near the mountains.",
    "What is the difference between a list and a tuple in Python?",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args()
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
    from llmprod._threads import run_on_compute_thread

    # Timed on the engine's compute thread, where the engine runs it (a second
    # thread running parallel ops would start a second OpenMP team).
    run_on_compute_thread(measure, args, lm_head, hidden, len(PROMPTS))
    eng.close()


def measure(
    args: argparse.Namespace, lm_head: torch.nn.Module, hidden: torch.Tensor, n: int
) -> None:
    from llmprod.models.screened_head import ScreenedGreedyHead

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
