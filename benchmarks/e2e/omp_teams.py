"""What a second OpenMP thread team costs the engine's steps (llmprod/_threads.py).

Batch-1 decode on SmolLM2-135M, each case in a fresh process:

- ``alone``: the engine as ``from_pretrained`` builds it (loading runs on a
  thread that exits, so the step thread's team is the only one);
- ``caller-team``: the same, after the calling thread has run one parallel torch
  op (as loading on the caller's thread did before, or as an application that
  runs torch on its own threads does): libgomp then has more workers than CPUs
  and stops spinning between parallel regions;
- ``second-engine``: a second engine in the process (as a router holds) that has
  served one request. Its steps run on the same compute thread as the first's,
  so it adds no team.

    python -m benchmarks.e2e.omp_teams --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

from benchmarks.e2e.harness import run_each_in_own_process

CASES = ("alone", "caller-team", "second-engine")


def measure(case: str, new_tokens: int, threads: int) -> dict[str, float]:
    import torch

    from llmprod import Engine, SamplingParams

    torch.set_num_threads(threads)
    eng = Engine.from_pretrained("smollm2-135m", kv_cache_memory="256MiB")
    ids = eng.render_chat([{"role": "user", "content": "Tell me a story."}])
    if case == "caller-team":
        torch.randn(1024, 1024).matmul(torch.randn(1024, 1024))  # a parallel op
    other = None
    if case == "second-engine":
        other = Engine.from_pretrained("smollm2-135m", kv_cache_memory="256MiB")
        other.generate([ids], SamplingParams(max_tokens=4, temperature=0))
    p = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    eng.generate([ids], SamplingParams(max_tokens=8, temperature=0))
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    eng.generate([ids], p)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    eng.close()
    if other is not None:
        other.close()
    return {
        "ms_per_token": wall / new_tokens * 1e3,
        "cpu_per_wall": cpu / wall,
        "sleeps_per_token": (r1.ru_nvcsw - r0.ru_nvcsw) / new_tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--case", help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.case:
        print(json.dumps(measure(args.case, args.new_tokens, args.threads)))
        return
    runs: dict[str, list[dict[str, float]]] = run_each_in_own_process(
        "benchmarks.e2e.omp_teams", "--case", CASES, args.repeats,
        ["--new-tokens", str(args.new_tokens), "--threads", str(args.threads)],
    )  # fmt: skip
    print(
        f"batch-1 decode, {args.new_tokens} tokens, {args.threads} threads, "
        f"median of {args.repeats}, one process per run"
    )
    print(
        "| case | ms per token | CPU time / wall time | voluntary context "
        "switches per token |\n|---|---:|---:|---:|"
    )
    for case, rs in runs.items():

        def med(key: str, rs: list[dict[str, float]] = rs) -> float:
            return statistics.median(r[key] for r in rs)

        print(
            f"| {case} | {med('ms_per_token'):.2f} | {med('cpu_per_wall'):.2f} | "
            f"{med('sleeps_per_token'):.0f} |"
        )


if __name__ == "__main__":
    main()
