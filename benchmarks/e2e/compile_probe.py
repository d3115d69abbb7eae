"""Does ``torch.compile`` pay on the CPU? Compiles parts of the native model's
layers (inductor, dynamic shapes) and times one request at batch 1 and 32 random
prompts at once, against the same engine left eager. One mode per process:

    python -m benchmarks.e2e.compile_probe eager
    python -m benchmarks.e2e.compile_probe mlp     # gate_up -> silu * up -> down
    python -m benchmarks.e2e.compile_probe norm    # the RMSNorms
"""

from __future__ import annotations

import random
import sys
import time

import torch

from llmprod import Engine, SamplingParams


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "eager"
    torch.set_num_threads(2)
    eng = Engine.from_pretrained(
        "smollm2-135m", kv_cache_memory="512MiB", enable_prefix_caching=False
    )
    t0 = time.perf_counter()
    for layer in eng.model.model.layers:  # type: ignore[union-attr]
        if mode == "mlp":
            layer.mlp.forward = torch.compile(layer.mlp.forward, dynamic=True)
        if mode == "norm":
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.forward = torch.compile(norm.forward, dynamic=True)
    ids = eng.render_chat([{"role": "user", "content": "Write a short story."}])
    warm = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    eng.generate([ids], warm)
    eng.generate([ids] * 8, warm)
    print(f"{mode}: compile + warm-up {time.perf_counter() - t0:.1f} s")
    sp = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        eng.generate([ids], sp)
        rates.append(64 / (time.perf_counter() - t))
    print(f"{mode}: batch 1 {sorted(rates)[1]:.1f} tok/s (median of 3)")
    rng = random.Random(0)
    prompts = [
        [rng.randrange(100, 40000) for _ in range(rng.randrange(20, 400))]
        for _ in range(32)
    ]
    t = time.perf_counter()
    eng.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    total = sum(len(p) for p in prompts) + 32 * 32
    print(f"{mode}: 32 prompts {total / (time.perf_counter() - t):.1f} total tok/s")
    eng.close()


if __name__ == "__main__":
    main()
