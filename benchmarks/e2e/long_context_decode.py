"""Decode at long context with sliding-window layers (Gemma 3 270M: 15 of 18
layers have a 512-token window), on the torch backend.

1. Attention alone: one decode step of 16 sequences at ~1,800 tokens with Gemma 3
   270M's attention shapes (4 query heads, 1 KV head, head_dim 256), windowed
   against full-context. Before the windowed gather, a windowed layer gathered the
   whole context and masked it, i.e. cost what the full-context row costs.
2. The engine: 16 requests with 1,780-1,795-token prompts and 80 new tokens on Gemma 3
   270M; the median wall time of the steps that are pure 16-sequence decodes
   (the runner's ``execute`` is wrapped with a timer).

    python -m benchmarks.e2e.long_context_decode
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from llmprod import Engine, SamplingParams
from llmprod.layers.attention import AttentionMetadata, TorchAttentionBackend
from llmprod.sched.scheduler import group_by_length

HEADS, KV_HEADS, HEAD_DIM, WINDOW, BLOCK = 4, 1, 256, 512, 16
PROMPT_TOKENS = 1795  # decode cost depends on lengths, not on which tokens


def engine_decode() -> None:
    eng = Engine.from_pretrained(
        "gemma3-270m", kv_cache_memory="1200MiB", enable_prefix_caching=False
    )
    ids = [1000 + (i * 7919) % 100_000 for i in range(PROMPT_TOKENS)]
    prompts = [ids[: len(ids) - k] for k in range(16)]
    execute = eng.runner.execute
    steps: list[float] = []

    def timed(out: Any) -> Any:
        t = time.perf_counter()
        result = execute(out)
        if len(out.scheduled) == 16 and all(
            s.num_new_tokens == 1 for s in out.scheduled
        ):
            steps.append(time.perf_counter() - t)
        return result

    eng.runner.execute = timed  # type: ignore[method-assign]
    eng.generate(prompts, SamplingParams(max_tokens=80, temperature=0, ignore_eos=True))
    eng.close()
    step = statistics.median(steps)
    print(
        f"engine, {len(ids)}-token prompts: median 16-sequence decode step "
        f"{step * 1e3:.1f} ms ({16 / step:.1f} tok/s) over {len(steps)} steps"
    )


def attention_only() -> None:
    lens = [1795 - k for k in range(16)]
    per_seq = [-(-n // BLOCK) for n in lens]
    num_blocks = sum(per_seq) + 1
    ids = torch.randperm(num_blocks - 1) + 1
    tables, start = [], 0
    for n in per_seq:
        tables.append(ids[start : start + n].tolist())
        start += n
    width = max(per_seq)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([t[(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for t, n in zip(tables, lens)]),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        cu_seqlens_q=torch.arange(len(lens) + 1, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        block_size=BLOCK,
        seq_lens_host=lens,
        cu_seqlens_q_host=list(range(len(lens) + 1)),
        num_decodes=len(lens),
        decode_groups=group_by_length(lens),
    )  # fmt: skip
    kv = torch.randn(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    q = torch.randn(len(lens), HEADS, HEAD_DIM)
    k = torch.randn(len(lens), KV_HEADS, HEAD_DIM)
    backend = TorchAttentionBackend()
    backend.prepare(meta)
    for window in (WINDOW, None):
        for _ in range(3):
            backend.forward(q, k, k, kv, meta, HEAD_DIM**-0.5, window)
        t = time.perf_counter()
        for _ in range(20):
            backend.forward(q, k, k, kv, meta, HEAD_DIM**-0.5, window)
        ms = (time.perf_counter() - t) / 20 * 1e3
        name = f"window {window}" if window else "full context"
        print(f"{name}: {ms:.2f} ms per layer per decode step (16 seqs, ~1.8k tokens)")


def main() -> None:
    torch.set_num_threads(2)
    attention_only()
    engine_decode()


if __name__ == "__main__":
    main()
