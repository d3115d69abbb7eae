"""int8 vs fp32 through the Engine on SmolLM2-135M: decode tokens/s at batch 1
and 32, prefill tokens/s, load time and memory, in one run (interleaved).

    python -m benchmarks.quant.bench_engine_int8 --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from llmprod import Engine, SamplingParams
from llmprod.quant import int8

VARIANTS = {"fp32": {}, "int8": {"quantization": "int8"}}


def model_bytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        # A packed oneDNN weight (t.is_mkldnn) has no data pointer; it is its own.
        key = id(t) if t.is_mkldnn else t.data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def measure(eng: Engine) -> dict[str, float]:
    tok = eng.tokenizer
    decode = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    # batch 1: decode speed after the first token
    out = eng.generate("Tell me about the history of bridges.", decode)[0]
    b1 = 1.0 / out.timings.tpot_s if out.timings.tpot_s else float("nan")
    # batch 32: generated tokens per second over the whole run
    prompts = [f"Write about topic {i}: rivers, cities and trade." for i in range(32)]
    t = time.perf_counter()
    outs = eng.generate(prompts, decode)
    b32 = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)
    # prefill: 8 prompts of ~500 tokens, one output token each
    long = [
        tok.encode(("Bridges carry roads over rivers. " * 80)[:2400] + str(i))
        for i in range(8)
    ]
    t = time.perf_counter()
    eng.generate(long, SamplingParams(max_tokens=1, temperature=0))
    prefill = sum(len(p) for p in long) / (time.perf_counter() - t)
    return {"decode_b1_tok_s": b1, "decode_b32_tok_s": b32, "prefill_tok_s": prefill}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: dict[str, dict[str, list[float]]] = {k: {} for k in VARIANTS}
    info: dict[str, dict[str, Any]] = {}
    for _ in range(args.repeats):
        for name, opts in VARIANTS.items():
            t = time.perf_counter()
            eng = Engine.from_pretrained("smollm2-135m", kv_cache_memory="512MiB",
                                         enable_prefix_caching=False, **opts)  # fmt: skip
            load = time.perf_counter() - t
            eng.generate("warm up", SamplingParams(max_tokens=4, temperature=0))
            res = {"load_s": load, **measure(eng)}
            for k, v in res.items():
                rows[name].setdefault(k, []).append(v)
            info[name] = {
                "method": eng.quantization or "none",
                "linear_bytes": int8.linear_weight_bytes(
                    eng.model, skip=int8.DEFAULT_SKIP
                ),
                "model_bytes": model_bytes(eng.model),
            }
            eng.close()
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in rows.items()}
    print(f"| metric | fp32 | int8 ({info['int8']['method']}) | int8 / fp32 |")
    print("|---|---|---|---|")
    for k in med["fp32"]:
        a, b = med["fp32"][k], med["int8"][k]
        print(f"| {k} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")
    for k in ("linear_bytes", "model_bytes"):
        a, b = info["fp32"][k], info["int8"][k]
        print(f"| {k} | {a / 2**20:.1f} MiB | {b / 2**20:.1f} MiB | {b / a:.2f}x |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"median": med, "runs": rows, "info": info}, fh, indent=2)


if __name__ == "__main__":
    main()
