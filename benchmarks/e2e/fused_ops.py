"""The fused CPU operations on and off (``fused_ops="auto"`` / ``"off"``), side by
side in one process: batch-1 decode and the 64-request workload, for each weight
format, and whether the greedy tokens changed.

    python -m benchmarks.e2e.fused_ops                       # fp32, int8, gguf
    python -m benchmarks.e2e.fused_ops --formats fp32 --repeats 5

Batch-1 decode: one chat prompt alone, (N - 1) / (T(N) - T(1)) with N = 128 (the
prefill drops out), best of ``--repeats``. The 64 requests: benchmarks/workload.py
(seed 0, EOS ignored, all submitted at once), best of ``--repeats``. The two
engines alternate, so drift of the machine touches both alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.workload import WorkloadSpec, build_workload
from llmprod import Engine, SamplingParams

PROMPT = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle."
)
FORMATS = {"fp32": None, "int8": "int8", "gguf": "gguf"}


def _timed(eng: Engine, prompts: list[Any], params: Any) -> tuple[float, list[Any]]:
    t = time.perf_counter()
    outs = eng.generate(prompts, params)
    return time.perf_counter() - t, outs


def measure(fmt: str, repeats: int, n: int = 128) -> dict[str, Any]:
    engines = {
        mode: Engine.from_pretrained("smollm2-135m", quantization=FORMATS[fmt], fused_ops=mode)
        for mode in ("auto", "off")
    }  # fmt: skip
    on = engines["auto"]
    assert on.fused_cpu_ops, "the fused operations did not build here"
    ids = on.render_chat([{"role": "user", "content": PROMPT}])
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    many = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    wl = build_workload(WorkloadSpec(num_requests=64), on.tokenizer)
    prompts = [r.prompt_token_ids for r in wl.requests]
    params = [
        SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True)
        for r in wl.requests
    ]
    total = wl.prompt_tokens + wl.output_tokens
    decode: dict[str, list[float]] = {m: [] for m in engines}
    batched: dict[str, list[float]] = {m: [] for m in engines}
    tokens: dict[str, list[list[int]]] = {}
    for eng in engines.values():  # warm-up
        eng.generate([ids], many)
    for _ in range(repeats):
        for mode, eng in engines.items():
            t1, _ = _timed(eng, [ids], one)
            tn, _ = _timed(eng, [ids], many)
            decode[mode].append((n - 1) / (tn - t1))
            wall, outs = _timed(eng, prompts, params)
            batched[mode].append(total / wall)
            tokens.setdefault(mode, [o.token_ids for o in outs])
    for eng in engines.values():
        eng.close()
    same = sum(a == b for a, b in zip(tokens["auto"], tokens["off"]))
    return {
        "format": fmt,
        "batch1_decode_tok_s": {m: max(v) for m, v in decode.items()},
        "total_tok_s": {m: max(v) for m, v in batched.items()},
        "runs": {"batch1": decode, "total": batched},
        "identical_requests": same,
        "requests": len(prompts),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="fp32,int8,gguf")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    results = [measure(f, args.repeats) for f in args.formats.split(",")]
    print(f"commit {commit}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, best of {args.repeats}")  # fmt: skip
    print("| format | batch-1 decode tok/s on / off | ratio | 64 requests total "
          "tok/s on / off | ratio | same greedy tokens |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        d, t = r["batch1_decode_tok_s"], r["total_tok_s"]
        print(f"| {r['format']} | {d['auto']:.1f} / {d['off']:.1f} | "
              f"{d['auto'] / d['off']:.2f}x | {t['auto']:.0f} / {t['off']:.0f} | "
              f"{t['auto'] / t['off']:.2f}x | {r['identical_requests']} of "
              f"{r['requests']} requests |")  # fmt: skip
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {"commit": commit, "threads": args.threads, "results": results},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
