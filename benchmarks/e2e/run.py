"""End-to-end benchmark: llmprod and the transformers baselines on one workload.

Each system runs in its own subprocess (so peak RSS is its own), after a warm-up on
other prompts, with ``torch.set_num_threads(--threads)``. Three modes:

- compare (default): every system in ``--systems`` on the same workload;
  generated / prompt / total tok/s, TTFT and end-to-end p50/p95/p99, peak RSS,
  llmprod's padding waste and KV numbers, and llmprod / each baseline.
- ``--scale``: throughput and p99 latency at 16, 64 and 256 requests and at
  ``--requests`` with prompts 4x longer, with the time ratios between sizes.
- ``--poisson``: llmprod's latency under Poisson arrivals at 25/50/75% of its
  capacity, measured first as requests/s on the same workload sent at once.

Machine facts come with every result: CPU, cores, versions, fp32 GEMM GFLOP/s and
read bandwidth on ``--threads`` threads, the model's parameters, and the compute
ceiling in tok/s (GEMM FLOP/s / (2 x params)).

Examples::

    python -m benchmarks.e2e.run --requests 64 --threads 2 --out results.json
    python -m benchmarks.e2e.run --requests 8 --max-output 16 --systems llmprod,hf_generate
    python -m benchmarks.e2e.run --scale --out scale.json
    python -m benchmarks.e2e.run --poisson --requests 64 --out poisson.json
    python -m benchmarks.report results.json      # writes docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.e2e.baselines import CB_TUNED, STATIC_BATCH_SIZE, SYSTEMS
from benchmarks.workload import (
    DEFAULT_MODEL,
    Workload,
    WorkloadSpec,
    build_workload,
    load_tokenizer,
    warmup_spec,
)

REPO = Path(__file__).resolve().parents[2]
BASELINES = [s for s in SYSTEMS if s != "llmprod"]
OPT_IN = ("llmprod_generic",)  # run only when named in --systems
PERCENTILES = (50, 95, 99)


def _log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _parse_kv(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _git() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "engine_sources_modified": bool(git("status", "--porcelain", "--", "llmprod")),
    }


# ----------------------------------------------------------------- children
def _child(
    system: str,
    args: argparse.Namespace,
    model_path: str,
    tmp: Path,
    wl: Workload | None = None,
    warm: Workload | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one system (or the machine probe) in a fresh interpreter."""
    tag = f"{system}-{time.monotonic_ns()}"
    out = tmp / f"{tag}.out.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.e2e.baselines",
        "--system",
        system,
        "--model-path",
        model_path,
        "--threads",
        str(args.threads),
        "--options",
        json.dumps(options or {}),
        "--out",
        str(out),
    ]
    if wl is not None and warm is not None:
        wl.to_json(tmp / f"{tag}.wl.json")
        warm.to_json(tmp / f"{tag}.warm.json")
        cmd += ["--workload", str(tmp / f"{tag}.wl.json")]
        cmd += ["--warmup", str(tmp / f"{tag}.warm.json")]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), env.get("PYTHONPATH", "")) if p
    )
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    t = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=args.timeout,
        )
    except subprocess.TimeoutExpired:
        return {"system": system, "error": f"timed out after {args.timeout}s"}
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-15:]
        return {
            "system": system,
            "error": f"exit {proc.returncode}: " + "\n".join(tail),
        }
    result = json.loads(out.read_text())
    result["process_s"] = time.perf_counter() - t
    return result


def _options_for(system: str, args: argparse.Namespace) -> dict[str, Any]:
    if system in ("llmprod", "llmprod_generic"):
        return {"model": args.model, **_parse_kv(args.llmprod_opt)}
    if system in ("static_arrival", "static_sorted"):
        return {"batch_size": args.static_batch_size}
    if system == "hf_generate_batch_tuned" and args.hf_cb_tuned:
        # Replaces the tuned setting (otherwise CB_TUNED) instead of adding to it.
        return {
            **dict.fromkeys(CB_TUNED),
            **_parse_kv(args.hf_cb_tuned),
        }
    if system == "hf_generate_batch" and args.hf_cb_opt:
        return _parse_kv(args.hf_cb_opt)
    return {}


# ----------------------------------------------------------------- summaries
def _pcts(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    got = np.percentile(np.asarray(values, dtype=np.float64), PERCENTILES)
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, got)}


def summarize(raw: dict[str, Any], machine: dict[str, Any] | None) -> dict[str, Any]:
    """Throughput, latency percentiles and memory of one system's raw run."""
    if "error" in raw:
        return {"system": raw["system"], "error": raw["error"]}
    recs = raw["records"]
    wall = raw["wall_s"]
    gen = sum(r["generated_tokens"] for r in recs)
    prompt = sum(r["prompt_tokens"] for r in recs)
    ttfts = [r["ttft_s"] for r in recs if r["ttft_s"] is not None]
    out: dict[str, Any] = {
        "system": raw["system"],
        "requests": len(recs),
        "wall_s": wall,
        "prompt_tokens": prompt,
        "generated_tokens": gen,
        "generated_tok_s": gen / wall,
        "prompt_tok_s": prompt / wall,
        "total_tok_s": (gen + prompt) / wall,
        "requests_per_s": len(recs) / wall,
        # TTFT only where every request has one.
        "ttft_s": _pcts(ttfts) if len(ttfts) == len(recs) else None,
        "e2e_s": _pcts([r["e2e_s"] for r in recs]),
        "peak_rss_bytes": raw.get("peak_rss_bytes"),
        "load_s": raw.get("load_s"),
        "warmup_s": raw.get("warmup_s"),
    }
    if machine and machine.get("compute_ceiling_tok_s"):
        out["fraction_of_compute_ceiling"] = (
            out["total_tok_s"] / machine["compute_ceiling_tok_s"]
        )
    if machine and machine.get("compute_ceiling_onednn_tok_s"):
        out["fraction_of_onednn_ceiling"] = (
            out["total_tok_s"] / machine["compute_ceiling_onednn_tok_s"]
        )
    extra = raw.get("extra") or {}
    if "padding_waste" in extra:
        out["padding_waste"] = extra["padding_waste"]
    if raw["system"] == "llmprod" and "metrics" in extra:
        m = extra["metrics"]
        kv, sched = m.get("kv_cache", {}), m.get("scheduler", {})
        out["padding_waste"] = sched.get("padding_waste")
        out["llmprod"] = {
            "metrics_scope": extra.get("metrics_scope"),
            "steps": sched.get("steps"),
            "preemptions": sched.get("preemptions"),
            "kv_num_blocks": kv.get("num_blocks"),
            "kv_block_size": kv.get("block_size"),
            "kv_peak_usage": kv.get("peak_usage"),
            "kv_prefix_hit_rate": kv.get("prefix_hit_rate"),
            "cached_prompt_tokens": m.get("tokens", {}).get("cached_prompt"),
            "weight_bytes": extra.get("weight_bytes"),
            "kv_budget_bytes": extra.get("kv_budget_bytes"),
            # On the CPU the KV memory becomes resident as blocks are first used.
            "kv_touched_bytes": kv.get("touched_bytes"),
            "num_threads": extra.get("num_threads"),
            "options": extra.get("options"),
        }
        rss = raw.get("peak_rss_bytes")
        if rss and extra.get("weight_bytes") and extra.get("kv_budget_bytes"):
            out["llmprod"]["rss_over_weights_and_kv_bytes"] = (
                rss - extra["weight_bytes"] - extra["kv_budget_bytes"]
            )
            if kv.get("touched_bytes") is not None:
                out["llmprod"]["rss_over_weights_and_touched_kv_bytes"] = (
                    rss - extra["weight_bytes"] - kv["touched_bytes"]
                )
        steps = sched.get("steps")
        if steps and extra.get("weight_bytes"):
            # Each step reads every weight once: the weight traffic it sustained.
            out["llmprod"]["weight_read_gbps"] = (
                extra["weight_bytes"] * steps / wall / 1e9
            )
    elif extra:
        out["options"] = extra.get("options")
        if "resolved_config" in extra:
            out["resolved_config"] = extra["resolved_config"]
    return out


def ratios(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """llmprod / each baseline for throughput; baseline / llmprod for latency
    (both > 1 when llmprod is better)."""
    ours = next(
        (r for r in runs if r["system"] == "llmprod" and "error" not in r), None
    )
    if ours is None:
        return {}
    out = {}
    for r in runs:
        if r["system"] == "llmprod" or "error" in r:
            continue
        d = {
            "total_tok_s": ours["total_tok_s"] / r["total_tok_s"],
            "generated_tok_s": ours["generated_tok_s"] / r["generated_tok_s"],
            "e2e_p50_speedup": r["e2e_s"]["p50"] / ours["e2e_s"]["p50"],
            "e2e_p99_speedup": r["e2e_s"]["p99"] / ours["e2e_s"]["p99"],
        }
        if r.get("ttft_s") and ours.get("ttft_s"):
            d["ttft_p50_speedup"] = r["ttft_s"]["p50"] / ours["ttft_s"]["p50"]
        out[r["system"]] = d
    return out


# ----------------------------------------------------------------- printing
def _fmt(v: Any, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def print_table(runs: list[dict[str, Any]], label_key: str = "system") -> None:
    head = (
        f"{'run':<40}{'gen tok/s':>10}{'total tok/s':>12}{'TTFT p50':>10}"
        f"{'e2e p50':>9}{'e2e p99':>9}{'peak RSS':>10}"
    )
    print(head)
    for r in runs:
        name = str(r.get(label_key) or r["system"])
        if "error" in r:
            print(f"{name:<40}error: {r['error'].splitlines()[0][:60]}")
            continue
        ttft = r["ttft_s"]["p50"] if r.get("ttft_s") else None
        rss = r["peak_rss_bytes"] / 2**30 if r.get("peak_rss_bytes") else None
        print(
            f"{name:<40}{_fmt(r['generated_tok_s']):>10}{_fmt(r['total_tok_s']):>12}"
            f"{_fmt(ttft, '.2f'):>10}{_fmt(r['e2e_s']['p50'], '.2f'):>9}"
            f"{_fmt(r['e2e_s']['p99'], '.2f'):>9}{_fmt(rss, '.2f'):>9}G"
        )


# --------------------------------------------------------------------- modes
def _spec(args: argparse.Namespace, **over: Any) -> WorkloadSpec:
    base = {
        "num_requests": args.requests,
        "seed": args.seed,
        "prompt_tokens": (args.min_prompt, args.max_prompt),
        "output_tokens": (args.min_output, args.max_output),
        "repeat_fraction": args.repeat_fraction,
        "paraphrase_fraction": args.paraphrase_fraction,
    }
    base.update(over)
    return WorkloadSpec(**base)


def _run_on(
    system: str,
    spec: WorkloadSpec,
    args: argparse.Namespace,
    ctx: dict[str, Any],
    label: str | None = None,
) -> dict[str, Any]:
    wl = build_workload(spec, ctx["tokenizer"])
    warm = build_workload(warmup_spec(spec, args.warmup), ctx["tokenizer"])
    _log(
        f"{label or system}: {len(wl.requests)} requests, {wl.prompt_tokens} prompt "
        f"+ {wl.output_tokens} output tokens"
    )
    raw = _child(
        system,
        args,
        ctx["model_path"],
        ctx["tmp"],
        wl,
        warm,
        _options_for(system, args),
    )
    s = summarize(raw, ctx.get("machine"))
    s["workload"] = wl.summary()
    if label:
        s["label"] = label
    if "error" in s:
        _log(f"{label or system}: FAILED {s['error'].splitlines()[0][:200]}")
    else:
        _log(
            f"{label or system}: {s['wall_s']:.1f}s, {s['total_tok_s']:.1f} total tok/s"
        )
    return s


def mode_compare(args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    spec = _spec(args)
    runs = [_run_on(s, spec, args, ctx) for s in args.systems]
    print_table(runs)
    r = ratios(runs)
    for name, d in r.items():
        print(
            f"llmprod / {name}: total tok/s x{d['total_tok_s']:.2f}, "
            f"generated x{d['generated_tok_s']:.2f}, e2e p99 x{d['e2e_p99_speedup']:.2f}"
        )
    return {"workload": spec.to_dict(), "runs": runs, "ratios": r}


def mode_scale(args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    sizes = [int(x) for x in args.scale_requests.split(",")]
    runs, growth = [], {}
    for system in args.systems:
        by_label: dict[str, dict[str, Any]] = {}
        for n in sizes:
            label = f"{system} n={n}"
            by_label[label] = _run_on(
                system, _spec(args, num_requests=n), args, ctx, label
            )
        label4 = f"{system} n={args.requests} prompts x4"
        by_label[label4] = _run_on(
            system, _spec(args, prompt_scale=4.0), args, ctx, label4
        )
        runs += list(by_label.values())
        ok = {k: v for k, v in by_label.items() if "error" not in v}
        g: dict[str, float] = {}
        for a, b in itertools.pairwise(sizes):
            ka, kb = f"{system} n={a}", f"{system} n={b}"
            if ka in ok and kb in ok:
                g[f"time n={b} / n={a} (x{b / a:g} requests)"] = (
                    ok[kb]["wall_s"] / ok[ka]["wall_s"]
                )
        base = f"{system} n={args.requests}"
        if base in ok and label4 in ok:
            g[f"time prompts x4 / x1 at n={args.requests}"] = (
                ok[label4]["wall_s"] / ok[base]["wall_s"]
            )
        growth[system] = g
    print_table(runs, "label")
    for system, g in growth.items():
        for k, v in g.items():
            print(f"{system}: {k} = {v:.2f}")
    return {"runs": runs, "growth": growth, "sizes": sizes}


def mode_poisson(args: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    loads = [float(x) for x in args.loads.split(",")]
    capacity_run = None
    capacity = args.capacity
    if capacity is None:
        capacity_run = _run_on("llmprod", _spec(args), args, ctx, "llmprod capacity")
        if "error" in capacity_run:
            return {"runs": [capacity_run], "capacity_rps": None}
        capacity = capacity_run["requests_per_s"]
    _log(f"capacity {capacity:.3f} requests/s")
    runs = []
    for load in loads:
        rate = load * capacity
        label = f"llmprod poisson {load:.0%} ({rate:.3f} req/s)"
        s = _run_on(
            "llmprod", _spec(args, arrival="poisson", rate=rate), args, ctx, label
        )
        s["load"] = load
        s["offered_rps"] = rate
        runs.append(s)
    shown = ([capacity_run] if capacity_run else []) + runs
    print_table(shown, "label")
    return {
        "capacity_rps": capacity,
        "capacity_measured": capacity_run is not None,
        "capacity_run": capacity_run,
        "runs": runs,
    }


# ---------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.e2e.run",
        description="End-to-end benchmark of llmprod against transformers baselines.",
    )
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument(
        "--systems",
        default=None,
        help=f"comma-separated, from {','.join(SYSTEMS)} (default: all in compare "
        "mode, llmprod with --scale/--poisson)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write the results JSON here")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-prompt", type=int, default=20, help="user message tokens")
    ap.add_argument("--max-prompt", type=int, default=400)
    ap.add_argument("--min-output", type=int, default=16)
    ap.add_argument("--max-output", type=int, default=128)
    ap.add_argument("--repeat-fraction", type=float, default=0.0)
    ap.add_argument("--paraphrase-fraction", type=float, default=0.0)
    ap.add_argument("--warmup", type=int, default=4, help="warm-up requests")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per system")
    ap.add_argument("--no-machine", action="store_true", help="skip the GEMM probe")
    ap.add_argument(
        "--llmprod-opt",
        action="append",
        metavar="KEY=VALUE",
        help="Engine.from_pretrained option for llmprod (repeatable), e.g. "
        "max_num_seqs=32",
    )
    ap.add_argument("--static-batch-size", type=int, default=STATIC_BATCH_SIZE)
    ap.add_argument(
        "--hf-cb-tuned",
        action="append",
        metavar="KEY=VALUE",
        help="ContinuousBatchingConfig of hf_generate_batch_tuned (default "
        + ", ".join(f"{k}={v}" for k, v in CB_TUNED.items())
        + ")",
    )
    ap.add_argument(
        "--hf-cb-opt",
        action="append",
        metavar="KEY=VALUE",
        help="ContinuousBatchingConfig of hf_generate_batch (default: none)",
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--scale", action="store_true", help="scale curves")
    mode.add_argument("--poisson", action="store_true", help="Poisson arrivals")
    ap.add_argument("--scale-requests", default="16,64,256")
    ap.add_argument("--loads", default="0.25,0.5,0.75", help="fractions of capacity")
    ap.add_argument(
        "--capacity",
        type=float,
        default=None,
        help="requests/s to take as capacity instead of measuring it",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    mode = "scale" if args.scale else "poisson" if args.poisson else "compare"
    if args.systems is None:
        args.systems = (
            [s for s in SYSTEMS if s not in OPT_IN]
            if mode == "compare"
            else ["llmprod"]
        )
    else:
        args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    if mode == "poisson" and args.systems != ["llmprod"]:
        raise SystemExit("--poisson runs llmprod only")

    from llmprod.models.registry import resolve_model

    model_path = str(resolve_model(args.model))
    results: dict[str, Any] = {
        "schema": 1,
        "mode": mode,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.e2e.run " + shlex.join(argv),
        "git": _git(),
        "model": args.model,
        "threads": args.threads,
        "warmup_requests": args.warmup,
    }
    with tempfile.TemporaryDirectory(prefix="llmprod-e2e-") as tmp:
        ctx: dict[str, Any] = {
            "tokenizer": load_tokenizer(args.model),
            "model_path": model_path,
            "tmp": Path(tmp),
            "machine": None,
        }
        if not args.no_machine:
            _log("machine probe (GEMM, bandwidth, parameters)")
            machine = _child("machine", args, model_path, Path(tmp))
            if "error" in machine:
                _log(f"machine probe failed: {machine['error']}")
            else:
                ctx["machine"] = machine
                print(
                    f"machine: {machine['cpu']}, {machine['usable_cpus']} CPUs, "
                    f"torch {machine['torch']}, transformers {machine['transformers']}; "
                    f"fp32 GEMM {machine['gemm_gflops']:.0f} GFLOP/s on "
                    f"{args.threads} threads, read {machine['read_gbps']:.1f} GB/s; "
                    f"{machine['model_params'] / 1e6:.1f}M params -> compute ceiling "
                    f"{machine['compute_ceiling_tok_s']:.0f} tok/s"
                    + (
                        f" (oneDNN GEMM {machine['gemm_gflops_onednn']:.0f} GFLOP/s"
                        f" -> {machine['compute_ceiling_onednn_tok_s']:.0f} tok/s)"
                        if machine.get("gemm_gflops_onednn")
                        else ""
                    )
                )
        results["machine"] = ctx["machine"]
        if mode == "compare":
            results.update(mode_compare(args, ctx))
        elif mode == "scale":
            results.update(mode_scale(args, ctx))
        else:
            results.update(mode_poisson(args, ctx))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
