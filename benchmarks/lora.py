"""Many LoRA adapters on one base model against the base alone and against one
engine per adapter, in one run.

The shared workload's first 64 chat requests (``benchmarks.workload``), greedy,
EOS ignored, submitted together. Cases, each in its own process, taking turns:

- ``base``: no adapter;
- ``adapters:N``: the 64 requests spread round-robin over N adapters (N = 1, 4,
  16) on one engine;
- ``engines:N``: N engines in one process, each holding one adapter and serving
  its share of the requests, one engine after the other (the same cores, so
  the times add up).

Adapters are PEFT LoRA adapters of the real SmolLM2 with random weights
(``--rank``, all seven projections), built once into ``--adapter-dir``.
Reported: wall time of the 64 requests (median of ``--repeats``), its ratio to
the base, and the process's resident memory after loading (RSS) against one
engine without adapters.

    python -m benchmarks.lora --repeats 3 --rank 8
    python -m benchmarks.lora --repeats 3 --rank 16 --cases base,adapters:16
    python -m benchmarks.lora --profile adapters:16     # where its time goes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.e2e.harness import profile_compute_thread, run_each_in_own_process

MODEL = "smollm2-135m"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_adapters(folder: Path, count: int, rank: int) -> list[Path]:
    """``count`` PEFT adapters of rank ``rank`` (kept between runs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmprod.models.registry import resolve_model

    paths = [folder / f"r{rank}-{i}" for i in range(count)]
    missing = [p for p in paths if not (p / "adapter_model.safetensors").exists()]
    if not missing:
        return paths
    base_path = resolve_model(MODEL)
    for p in missing:
        torch.manual_seed(int(p.name.rsplit("-", 1)[1]))
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                         init_lora_weights=False)  # fmt: skip
        get_peft_model(base, cfg).save_pretrained(p)
    return paths


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def measure(case: str, args: argparse.Namespace) -> dict[str, Any]:
    """One case in this process."""
    import torch

    from benchmarks.workload import WorkloadSpec, build_workload
    from llmprod import Engine, SamplingParams

    torch.set_num_threads(args.threads)
    kind, _, n = case.partition(":")
    count = int(n or 0)
    kw: dict[str, Any] = {"kv_cache_memory": "512MiB", "max_loras": max(count, 1)}
    paths = build_adapters(Path(args.adapter_dir), count, args.rank) if count else []
    rss0 = rss_bytes()
    engines = []
    if kind == "engines":
        for i, p in enumerate(paths):
            e = Engine.from_pretrained(MODEL, **kw)
            e.load_adapter(f"a{i}", p)
            engines.append(e)
    else:
        e = Engine.from_pretrained(MODEL, **kw)
        for i, p in enumerate(paths):
            e.load_adapter(f"a{i}", p)
        engines.append(e)
    rss = rss_bytes() - rss0
    wl = build_workload(WorkloadSpec(num_requests=args.requests, seed=1),
                        engines[0].tokenizer)  # fmt: skip
    prompts = [list(r.prompt_token_ids) for r in wl.requests]
    names = [f"a{i % count}" if count else None for i in range(len(prompts))]
    sp = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    warm = SamplingParams(max_tokens=4, temperature=0)
    for i, e in enumerate(engines):
        e.generate(prompts[:2], warm, adapter=names[i] if count else None)
    tokens: list[list[int]] = [[] for _ in prompts]

    def run() -> None:
        nonlocal tokens
        if kind == "engines":
            for i, e in enumerate(engines):
                mine = [j for j in range(len(prompts)) if j % count == i]
                outs = e.generate([prompts[j] for j in mine], sp, adapter=f"a{i}")
                for j, o in zip(mine, outs):
                    tokens[j] = o.token_ids
        else:
            outs = engines[0].generate(prompts, sp, adapter=names)
            tokens = [o.token_ids for o in outs]

    t = time.perf_counter()
    if args.profile:
        print(profile_compute_thread(run, 30))
    else:
        run()
    wall = time.perf_counter() - t
    for e in engines:
        e.close()
    return {"wall_s": wall, "rss_bytes": rss, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--cases", default="base,adapters:1,adapters:4,adapters:16,engines:16"
    )
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adapter-dir", default="/tmp/llmprod-bench-adapters")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # child process
    ap.add_argument(
        "--profile",
        metavar="CASE",
        help="run CASE once in this process under torch's profiler and print "
        "the ops with the most self CPU time (no comparison)",
    )
    args = ap.parse_args()
    if args.profile:
        args.case = args.profile
        if ":" in args.case:
            build_adapters(
                Path(args.adapter_dir), int(args.case.split(":")[1]), args.rank
            )
        result = measure(args.case, args)
        print(f"{args.case}: {result['wall_s']:.2f} s under the profiler")
        return
    if args.case:
        print(json.dumps(measure(args.case, args)))
        return
    cases = args.cases.split(",")
    biggest = max((int(c.partition(":")[2] or 0) for c in cases), default=0)
    if biggest:  # build once, outside the timed children
        build_adapters(Path(args.adapter_dir), biggest, args.rank)
    passthrough = [
        "--requests", str(args.requests), "--new-tokens", str(args.new_tokens),
        "--rank", str(args.rank), "--threads", str(args.threads),
        "--adapter-dir", args.adapter_dir,
    ]  # fmt: skip
    runs = run_each_in_own_process(
        "benchmarks.lora", "--case", cases, args.repeats, passthrough
    )
    print(
        f"{args.requests} requests x {args.new_tokens} new tokens (greedy, EOS "
        f"ignored), LoRA rank {args.rank} on all 7 projections, {args.threads} "
        f"threads, median of {args.repeats}, one process per run"
    )
    print("| case | wall s | vs base | tok/s | RSS after loading | same tokens |")
    print("|---|---:|---:|---:|---:|---|")
    base = statistics.median(r["wall_s"] for r in runs["base"]) if "base" in runs else 0
    for case in cases:
        rs = runs[case]
        wall = statistics.median(r["wall_s"] for r in rs)
        rss = statistics.median(r["rss_bytes"] for r in rs) / 2**20
        same = all(r["tokens"] == rs[0]["tokens"] for r in rs)
        ratio = f"{wall / base:.2f}x" if base else "-"
        tok_s = args.requests * args.new_tokens / wall
        print(f"| {case} | {wall:.2f} | {ratio} | {tok_s:.0f} | {rss:.0f} MiB "
              f"| {'yes' if same else 'NO'} |")  # fmt: skip
    if "adapters:16" in runs and "engines:16" in runs:
        a, e = runs["adapters:16"][0]["tokens"], runs["engines:16"][0]["tokens"]
        print(f"adapters:16 and engines:16 give the same tokens: {a == e}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
