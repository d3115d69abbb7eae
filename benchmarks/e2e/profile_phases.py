"""Where the Engine's time goes: wall time of each phase of the step loop on a
mixed workload (wraps the engine's own methods with timers; no sampling profiler).

    python -m benchmarks.e2e.profile_phases --requests 48
    python -m benchmarks.e2e.profile_phases --requests 48 --attention-detail
    python -m benchmarks.e2e.profile_phases --requests 48 --dtype bfloat16

``--attention-detail`` also splits the torch backend's attention into its block
gathers and its SDPA calls (decode and prefill).
"""

from __future__ import annotations

import argparse
import collections
import random
import time
from collections.abc import Callable
from typing import Any

from llmprod import Engine, SamplingParams

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "river",
    "mountain",
    "city",
    "history",
    "science",
    "music",
    "water",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--block-size", type=int, default=None, help="KV block size")
    ap.add_argument("--attention-detail", action="store_true")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default=None)
    args = ap.parse_args()
    rng = random.Random(0)
    opts: dict[str, Any] = {"dtype": args.dtype, "quantization": args.quantization}
    if args.block_size is not None:
        opts["block_size"] = args.block_size
    eng = Engine.from_pretrained("smollm2-135m", **opts)
    spent: collections.Counter[str] = collections.Counter()

    def timed(obj: Any, name: str, label: str | Callable[..., str]) -> None:
        """Wrap ``obj.name`` with a timer; ``label`` may pick the phase from the
        call's arguments."""
        fn = getattr(obj, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phase = label(*a, **k) if callable(label) else label
                spent[phase] += time.perf_counter() - t

        setattr(obj, name, wrapper)

    timed(eng.core, "step", "step (all)")
    timed(eng.runner.model, "forward", "model forward")
    timed(eng.backend, "forward", "  attention (in forward)")
    timed(eng.runner.model, "compute_logits", "lm_head")
    timed(eng.runner, "sampler", "sampler")
    timed(eng.runner, "prepare", "batch metadata")
    timed(eng.scheduler, "schedule", "scheduler")
    timed(eng.core, "_process", "detokenize + stops")
    if args.attention_detail:
        import llmprod.layers.attention.torch_backend as tb

        timed(eng.backend, "_gather", "    block gathers (in attention)")
        timed(
            tb,
            "_sdpa",
            lambda q, *a, **k: (
                f"    SDPA, {'decode' if q.shape[2] == 1 else 'prefill'} (in attention)"
            ),
        )
    reqs = []
    for _ in range(args.requests):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 350)))
        reqs.append(
            (eng.render_chat([{"role": "user", "content": text}]), rng.randint(16, 128))
        )
    eng.generate(reqs[0][0], SamplingParams(max_tokens=4, temperature=0))
    spent.clear()
    t = time.perf_counter()
    eng.generate([r[0] for r in reqs],
                 [SamplingParams(max_tokens=r[1], temperature=0, ignore_eos=True) for r in reqs])  # fmt: skip
    wall = time.perf_counter() - t
    tokens = sum(len(r[0]) + r[1] for r in reqs)
    print(f"{args.requests} requests, {tokens} tokens in {wall:.1f}s = {tokens / wall:.0f} tok/s, "
          f"{eng.metrics().scheduler['steps']} steps")  # fmt: skip
    kv = eng.metrics().kv_cache
    print(f"KV cache: peak usage {100 * kv['peak_usage']:.1f}% of {kv['num_blocks']} blocks; "
          f"allocated but unused slots at that peak {100 * kv['slot_waste_at_peak']:.2f}%")  # fmt: skip
    print("| phase | seconds | share of wall time |\n|---|---:|---:|")
    for label, s in spent.most_common():
        print(f"| {label} | {s:.2f} | {100 * s / wall:.1f}% |")
    eng.close()


if __name__ == "__main__":
    main()
