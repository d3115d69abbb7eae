"""Decode speed at long context on Gemma 3 270M (5 of 6 layers with a 512-token
window): 16 requests with ~1,800-token prompts, decode tok/s measured as the
difference between generating 33 tokens and 1 token per request (so the long
prefill cancels out).

    python -m benchmarks.e2e.long_context_decode
"""

from __future__ import annotations

import time

import torch

from llmprod import Engine, SamplingParams

PARAGRAPH = (
    "The history of computing is a story of layers. Early machines were programmed "
    "by rewiring panels; stored programs replaced the wires with memory, and "
    "assemblers replaced raw numbers with names. Compilers then let people write "
    "for the problem rather than the machine. Each layer hid the one below it and "
    "made the next one possible. "
)


def main() -> None:
    torch.set_num_threads(2)
    eng = Engine.from_pretrained(
        "gemma3-270m", kv_cache_memory="512MiB", enable_prefix_caching=False
    )
    ids = eng.tokenizer.encode(PARAGRAPH * 28 + "Summary:")
    prompts = [ids[: len(ids) - k] for k in range(16)]
    wall = {}
    for n in (1, 33):
        t = time.perf_counter()
        eng.generate(
            prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        )
        wall[n] = time.perf_counter() - t
    rate = 16 * 32 / (wall[33] - wall[1])
    print(f"{len(ids)}-token prompts, 16 requests: decode {rate:.1f} tok/s")
    eng.close()


if __name__ == "__main__":
    main()
