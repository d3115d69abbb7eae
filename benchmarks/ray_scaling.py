"""Scaling out on Ray on this machine: Ray Data actors, and Ray Serve overhead.

Two measurements, one run, greedy, EOS ignored (every request makes exactly
``--max-tokens`` tokens):

- **Ray Data throughput**: the same prompts through ``run_batch`` with 1 and 2
  actors of 1 torch thread and 1 CPU each, against one local Engine with 2
  threads (``engine.generate`` of the whole list); by default each actor gets
  its share of the prompts as one batch (``--batch-size`` to change it: small
  batches leave each engine's continuous batching narrow and cost throughput on
  CPU). Generated tokens per second of wall time. A Ray Data job starts its actors (a process and a model load each)
  inside the timed run; the startup is measured alone (the same job on one row
  per actor) and reported beside it, with the throughput once it is taken off.
- **Ray Serve overhead**: one request at a time (``--requests`` of them,
  ``max_tokens`` 16 by default) to an in-process Engine with 2 threads, then
  over HTTP to ``build_app`` with one replica of 2 CPUs and 2 threads; p50 and
  p99 of the end-to-end latency, and their difference.

The local engine is closed before Ray starts, so the two never share the
cores. The answer cache is off everywhere.

    python -m benchmarks.ray_scaling
    python -m benchmarks.ray_scaling --prompts 64 --max-tokens 32 --requests 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
import urllib.request
from typing import Any

MODEL = "smollm2-135m"
TOPICS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three primary colors:",
    "Q: What is 12 times 12?\nA:",
    "The quick brown fox",
    "Translate to French: Good morning, how are you?",
    "Photosynthesis is the process by which",
]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between ranks."""
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_engine(prompts: list[str], max_tokens: int, requests: int) -> dict[str, Any]:
    from llmprod import Engine, SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    one = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    with Engine.from_pretrained(MODEL, num_threads=2) as engine:
        engine.generate(prompts[:4], sp)  # warm-up
        t = time.perf_counter()
        outs = engine.generate(prompts, sp)
        wall = time.perf_counter() - t
        tokens = sum(len(o.token_ids) for o in outs)
        lat = []
        for i in range(requests):
            t = time.perf_counter()
            engine.generate(prompts[i % len(prompts)], one)
            lat.append(time.perf_counter() - t)
    return {"tokens": tokens, "wall_s": wall, "latency_s": lat}


def data_run(
    prompts: list[str], max_tokens: int, actors: int, batch_size: int | None
) -> tuple[int, float]:
    import ray.data

    from llmprod import SamplingParams
    from llmprod.integrations.ray import run_batch

    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ds = ray.data.from_items([{"prompt": p} for p in prompts])
    t = time.perf_counter()
    rows = run_batch(
        ds,
        MODEL,
        sp,
        num_actors=actors,
        num_cpus=1,
        num_threads=1,
        # Default: one batch per actor, as wide as the local engine's share.
        batch_size=batch_size or -(-len(prompts) // actors),
    ).take_all()
    wall = time.perf_counter() - t
    assert all(r["error"] is None for r in rows)
    return sum(int(r["completion_tokens"]) for r in rows), wall


def serve_latency(prompts: list[str], requests: int) -> list[float]:
    from ray import serve

    from llmprod.integrations.ray import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(
        {
            "model": MODEL,
            "engine": {"num_threads": 2},
            "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 2}},
        }
    )
    serve.run(app, name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/completions"

    def ask(prompt: str) -> None:
        body = {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": 16,
            "temperature": 0,
            "ignore_eos": True,
        }
        req = urllib.request.Request(
            url, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()

    for p in prompts[:3]:
        ask(p)  # warm-up
    lat = []
    for i in range(requests):
        t = time.perf_counter()
        ask(prompts[i % len(prompts)])
        lat.append(time.perf_counter() - t)
    serve.delete("bench")
    serve.shutdown()
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="Ray Data rows per call (default: the prompts split evenly over actors)",
    )
    args = ap.parse_args()
    prompts = [f"Note {i}. {TOPICS[i % len(TOPICS)]}" for i in range(args.prompts)]

    local = local_engine(prompts, args.max_tokens, args.requests)

    t = time.perf_counter()
    import ray

    import_s = time.perf_counter() - t
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - t
    data = {}
    for actors in (1, 2):
        _, startup = data_run(prompts[:actors], 1, actors, 1)
        tokens, wall = data_run(prompts, args.max_tokens, actors, args.batch_size)
        data[actors] = (tokens, wall, startup)
    served = serve_latency(prompts, args.requests)
    ray.shutdown()

    import torch

    print(
        f"# ray_scaling: {MODEL}, {args.prompts} prompts x {args.max_tokens} tokens "
        f"(greedy, EOS ignored); ray {ray.__version__}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} cores"
    )
    print(
        f"ray import {import_s:.2f} s (after torch and llmprod), "
        f"ray.init(num_cpus=2) {init_s:.2f} s\n"
    )
    base = local["tokens"] / local["wall_s"]
    print(
        "| batch run | wall s | tokens/s | vs local | startup s | tokens/s w/o startup |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| local Engine, 2 threads | {local['wall_s']:.2f} | {base:.1f} | 1.00 | - | - |"
    )
    for actors, (tokens, wall, startup) in data.items():
        tps = tokens / wall
        steady = tokens / max(wall - startup, 1e-9)
        print(
            f"| Ray Data, {actors} actor(s) x 1 thread | {wall:.2f} | {tps:.1f} | "
            f"{tps / base:.2f} | {startup:.2f} | {steady:.1f} |"
        )
    print()
    print("| one request, max_tokens 16 | p50 ms | p99 ms |")
    print("|---|---|---|")
    lp50, lp99 = percentile(local["latency_s"], 50), percentile(local["latency_s"], 99)
    sp50, sp99 = percentile(served, 50), percentile(served, 99)
    print(f"| in-process Engine, 2 threads | {lp50 * 1e3:.1f} | {lp99 * 1e3:.1f} |")
    print(
        f"| Ray Serve HTTP, 1 replica x 2 threads | {sp50 * 1e3:.1f} | {sp99 * 1e3:.1f} |"
    )
    print(f"| overhead | {(sp50 - lp50) * 1e3:+.1f} | {(sp99 - lp99) * 1e3:+.1f} |")
    ratio = statistics.median(served) / statistics.median(local["latency_s"])
    print(
        f"\n{args.requests} requests each; Serve median / in-process median: {ratio:.2f}"
    )


if __name__ == "__main__":
    main()
