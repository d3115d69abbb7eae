"""Single-request decode speed: llmprod (fp32 native and generic paths, int8)
against transformers ``generate`` at batch 1, same prompt, same number of new
tokens, in one run.

    python -m benchmarks.e2e.single_request --new-tokens 128 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmprod import Engine, SamplingParams

PROMPT = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle."
)


def hf_run(model, ids: list[int], n: int) -> float:  # type: ignore[no-untyped-def]
    x = torch.tensor([ids])
    t = time.perf_counter()
    with torch.inference_mode():
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                       min_new_tokens=n, do_sample=False)  # fmt: skip
    return n / (time.perf_counter() - t)


def engine_run(eng: Engine, ids: list[int], n: int) -> float:
    p = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    eng.generate([ids], p)
    return n / (time.perf_counter() - t)


def main() -> None:
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fp32 = Engine.from_pretrained("smollm2-135m", kv_cache_memory="256MiB",
                                  enable_prefix_caching=False)  # fmt: skip
    generic = Engine.from_pretrained("smollm2-135m", kv_cache_memory="256MiB",
                                     enable_prefix_caching=False,
                                     model_impl="generic")  # fmt: skip
    q8 = Engine.from_pretrained("smollm2-135m", kv_cache_memory="256MiB",
                                enable_prefix_caching=False, quantization="int8")  # fmt: skip
    q8_head = Engine.from_pretrained("smollm2-135m", kv_cache_memory="256MiB",
                                     enable_prefix_caching=False, quantization="int8",
                                     quantization_skip=["embed_tokens"])  # fmt: skip
    hf = AutoModelForCausalLM.from_pretrained(
        fp32.model_path, dtype=torch.float32
    ).eval()
    ids = fp32.render_chat([{"role": "user", "content": PROMPT}])
    n = args.new_tokens
    runs: dict[str, list[float]] = {"transformers generate (fp32)": [],
                                    "llmprod fp32": [], "llmprod fp32 generic": [],
                                    "llmprod int8": [],
                                    "llmprod int8, lm_head int8 too": []}  # fmt: skip
    hf_run(hf, ids, 8)
    engine_run(fp32, ids, 8)
    engine_run(generic, ids, 8)
    engine_run(q8, ids, 8)
    engine_run(q8_head, ids, 8)
    for _ in range(args.repeats):  # interleaved
        runs["transformers generate (fp32)"].append(hf_run(hf, ids, n))
        runs["llmprod fp32"].append(engine_run(fp32, ids, n))
        runs["llmprod fp32 generic"].append(engine_run(generic, ids, n))
        runs["llmprod int8"].append(engine_run(q8, ids, n))
        runs["llmprod int8, lm_head int8 too"].append(engine_run(q8_head, ids, n))
    base = statistics.median(runs["transformers generate (fp32)"])
    print(f"one request, {len(ids)} prompt tokens, {n} new tokens (prefill included), "
          f"{args.threads} threads, median of {args.repeats}")  # fmt: skip
    print("| system | tok/s | vs transformers |\n|---|---:|---:|")
    for name, vals in runs.items():
        med = statistics.median(vals)
        print(f"| {name} | {med:.1f} | {med / base:.2f}x |")
    fp32.close()
    generic.close()
    q8.close()
    q8_head.close()


if __name__ == "__main__":
    main()
