"""The mixed workload with exact repeats and paraphrases, with and without the
response caches, in one run: latency percentiles, throughput, tokens and cost saved.

Requests arrive as a Poisson stream (a cache helps only a request that arrives
after the answer it reuses) and are sent as chats, so the semantic cache sees the
user's question.

    python -m benchmarks.e2e.cache_bench --requests 64 --rate 1.5 --out benchmarks/results/cache-bench.json

``--tenants N`` measures what the cache scope costs instead: each request is sent
by one of N tenants (drawn at random, so a repeat mostly comes from another
tenant than its original), and the same stream runs with both caches under
``cache_scope="tenant"`` and ``"shared"``; the hit rates of both are printed.
Requests then run one at a time in arrival order, each answer stored before the
next request, so the hit rates do not depend on the machine's speed.

    python -m benchmarks.e2e.cache_bench --tenants 4 --requests 32 --output-tokens 4 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from typing import Any

import numpy as np
import torch

from benchmarks.workload import WorkloadSpec, build_workload, load_tokenizer
from llmprod import Engine, SamplingParams
from llmprod.ops.pricing import PriceTable

PRICES = PriceTable(prompt_per_1k=0.05, completion_per_1k=0.15)


def run(
    wl: Any,
    options: dict[str, Any],
    tenants: list[str] | None = None,
    in_order: bool = False,
) -> dict[str, Any]:
    """Serve the workload on one engine; ``tenants[i]`` sends request ``i``.
    ``in_order``: one request at a time, each answer stored before the next
    request, so every hit the caches can give is taken whatever the machine's
    speed (the arrival times are ignored)."""
    eng = Engine.from_pretrained("smollm2-135m", prices=PRICES, **options)
    eng.generate("warm up", SamplingParams(max_tokens=4, temperature=0))

    def flush() -> None:
        if eng.answers is not None:
            for c in (eng.answers.exact, eng.answers.semantic):
                if c is not None:
                    c.flush(10.0)

    async def main() -> tuple[float, list[Any]]:
        t0 = time.perf_counter()

        async def one(r: Any) -> Any:
            delay = t0 + r.arrival_s - time.perf_counter()
            if delay > 0 and not in_order:
                await asyncio.sleep(delay)
            p = SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True)
            tenant = tenants[r.index] if tenants else "default"
            return (await eng.agenerate([r.messages], p, tenant=tenant))[0]

        if not in_order:
            comps = await asyncio.gather(*(one(r) for r in wl.requests))
            return time.perf_counter() - t0, list(comps)
        ordered = []
        for r in wl.requests:  # arrivals are increasing
            ordered.append(await one(r))
            flush()
        return time.perf_counter() - t0, ordered

    try:
        wall, comps = asyncio.run(main())
        flush()  # let queued writes land before reading stats
        hits: dict[str, int] = {}
        hits_by_kind: dict[str, int] = {}
        for r, c in zip(wl.requests, comps):
            if c.cache_hit:
                hits[c.cache_hit] = hits.get(c.cache_hit, 0) + 1
                hits_by_kind[r.kind] = hits_by_kind.get(r.kind, 0) + 1
        e2e = [c.timings.e2e_s for c in comps]
        computed = [c for c in comps if not c.cache_hit]
        return {
            "options": {k: str(v) for k, v in options.items()},
            "wall_s": wall,
            "requests_per_s": len(comps) / wall,
            "e2e_p50": float(np.percentile(e2e, 50)),
            "e2e_p95": float(np.percentile(e2e, 95)),
            "e2e_p99": float(np.percentile(e2e, 99)),
            "hits": hits,
            "hits_by_kind": hits_by_kind,
            "hit_rate": sum(hits.values()) / len(comps),
            "model_prompt_tokens": sum(c.usage.prompt_tokens for c in computed),
            "model_completion_tokens": sum(c.usage.completion_tokens for c in computed),
            "cost": sum(c.usage.cost for c in comps),
        }
    finally:
        eng.close()


def scopes(wl: Any, num_tenants: int, seed: int) -> dict[str, Any]:
    """The same stream, sent by ``num_tenants`` tenants, under both cache scopes."""
    rng = random.Random(f"{seed}:tenants")
    tenants = [f"t{rng.randrange(num_tenants)}" for _ in wl.requests]
    same = sum(
        1
        for r in wl.requests
        if r.source is not None and tenants[r.index] == tenants[r.source]
    )
    copies = sum(1 for r in wl.requests if r.source is not None)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scope in ("tenant", "shared"):
            opts = {"cache": "memory://", "semantic_cache": f"diskcache://{tmp}/{scope}",
                    "cache_scope": scope}  # fmt: skip
            results[scope] = run(wl, opts, tenants, in_order=True)
    n = len(wl.requests)
    print(f"{n} chat requests from {num_tenants} tenants (drawn at random), one at a "
          f"time; {copies} repeats or paraphrases, {same} of them from the same "
          "tenant as their original")  # fmt: skip
    print("| cache_scope | hits (by tier) | hit rate | hits on repeats / "
          "paraphrases | model tokens (prompt + completion) | wall (s) |")  # fmt: skip
    print("|---|---|---:|---|---:|---:|")
    for scope, r in results.items():
        k = r["hits_by_kind"]
        toks = r["model_prompt_tokens"] + r["model_completion_tokens"]
        print(f"| {scope} | {r['hits'] or '-'} | {100 * r['hit_rate']:.0f}% | "
              f"{k.get('repeat', 0)} / {k.get('paraphrase', 0)} | {toks} | "
              f"{r['wall_s']:.0f} |")  # fmt: skip
    return {"tenants": tenants, "results": results}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=1.5, help="arrivals per second")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tenants", type=int, default=0,
                    help="compare cache_scope 'tenant' and 'shared' with N tenants")  # fmt: skip
    ap.add_argument("--output-tokens", type=int, nargs=2, default=(16, 128),
                    metavar=("LO", "HI"), help="bounds of max_tokens per request")  # fmt: skip
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = WorkloadSpec(num_requests=args.requests, arrival="poisson", rate=args.rate,
                        output_tokens=tuple(args.output_tokens),
                        repeat_fraction=0.3, paraphrase_fraction=0.2)  # fmt: skip
    wl = build_workload(spec, load_tokenizer())
    if args.tenants > 0:
        out = scopes(wl, args.tenants, spec.seed)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump({"spec": spec.to_dict(), **out}, fh, indent=2)
        return
    with tempfile.TemporaryDirectory() as tmp:
        configs = {
            "no caches": {},
            "exact": {"cache": "memory://"},
            "exact + semantic": {
                "cache": "memory://",
                "semantic_cache": f"diskcache://{tmp}/sem",
            },
        }
        results = {name: run(wl, opts) for name, opts in configs.items()}
    base = results["no caches"]
    print(f"{args.requests} chat requests, Poisson {args.rate}/s, 30% exact repeats, "
          "20% paraphrases")  # fmt: skip
    print("| configuration | hits | req/s | e2e p50 / p95 / p99 (s) | model tokens "
          "(prompt + completion) | cost | cost saved |")  # fmt: skip
    print("|---|---|---:|---|---:|---:|---:|")
    for name, r in results.items():
        toks = r["model_prompt_tokens"] + r["model_completion_tokens"]
        saved = 1 - r["cost"] / base["cost"] if base["cost"] else 0.0
        print(f"| {name} | {r['hits'] or '-'} | {r['requests_per_s']:.2f} | "
              f"{r['e2e_p50']:.2f} / {r['e2e_p95']:.2f} / {r['e2e_p99']:.2f} | {toks} | "
              f"{r['cost']:.4f} | {100 * saved:.0f}% |")  # fmt: skip
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"spec": spec.to_dict(), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
