"""Resident memory of an Engine on the CPU, step by step, in this process.

Prints the RSS after importing torch, after ``Engine.from_pretrained`` (model,
tokenizer, KV cache) and after one short request, against the weights and the KV
budget; how much of the KV budget is resident (blocks ever used); and whether the
heavy optional modules (TorchDynamo, Triton, sympy) were imported on the way.

    python -m benchmarks.e2e.startup_memory
    python -m benchmarks.e2e.startup_memory --kv-cache-memory 4GiB
"""

from __future__ import annotations

import argparse
import sys


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--kv-cache-memory", default="1GiB")
    args = ap.parse_args()
    gib = 2**30
    rows: list[tuple[str, int, int | None]] = [("python", _rss(), None)]
    import torch

    torch.set_num_threads(2)
    rows.append(("import torch", _rss(), None))
    from llmprod import Engine, SamplingParams

    eng = Engine.from_pretrained(args.model, kv_cache_memory=args.kv_cache_memory)
    params = {id(p): p for p in eng.model.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in params)
    kv_bytes = eng.num_blocks * eng.runner.bytes_per_block(
        eng.model, eng.block_size, eng.dtype
    )

    def kv_resident() -> int:
        # Blocks ever used where the engine reports them; before it did, the
        # whole zero-filled cache was resident from the start.
        touched = eng.metrics().kv_cache.get("touched_bytes")
        return kv_bytes if touched is None else int(touched)

    rows.append(("Engine.from_pretrained", _rss(), kv_resident()))
    eng.generate("Name three rivers.", SamplingParams(max_tokens=32, temperature=0))
    rows.append(("after one request", _rss(), kv_resident()))
    print(f"model {args.model}: weights {weights / gib:.3f} GiB, KV budget "
          f"{kv_bytes / gib:.3f} GiB ({eng.num_blocks} blocks x {eng.block_size})")  # fmt: skip
    print("\n| point | RSS | KV resident | RSS - weights - KV resident |")
    print("|---|---:|---:|---:|")
    for label, rss, kv in rows:
        if kv is None:
            print(f"| {label} | {rss / gib:.3f} GiB | | |")
        else:
            print(f"| {label} | {rss / gib:.3f} GiB | {kv / 2**20:.1f} MiB | "
                  f"{(rss - weights - kv) / gib:.3f} GiB |")  # fmt: skip
    heavy = [m for m in ("torch._dynamo", "triton", "sympy", "accelerate")
             if m in sys.modules]  # fmt: skip
    print("heavy modules imported: " + (", ".join(heavy) or "none"))
    eng.close()


if __name__ == "__main__":
    main()
