"""The systems an end-to-end run compares, each timed on the same workload.

| system | what runs |
|---|---|
| ``llmprod`` | ``Engine.from_pretrained`` with its defaults (plus ``--llmprod-opt``) |
| ``llmprod_generic`` | the same with ``model_impl="generic"``: transformers' modeling code over llmprod's paged attention (asked for by name; not in the default set) |
| ``hf_generate`` | transformers ``model.generate``, one request at a time |
| ``static_arrival`` | ``model.generate`` on left-padded batches of 16, arrival order |
| ``static_sorted`` | the same batches after sorting the requests by prompt length |
| ``hf_generate_batch`` | transformers continuous batching at its defaults |
| ``hf_generate_batch_tuned`` | the same with ``max_requests_per_batch=16, max_batch_tokens=512`` |

All run greedy in fp32 with EOS ignored, so every system generates exactly
``max_tokens`` tokens per request. Requests are submitted at their arrival offsets
(all at 0 for a burst). Per request: prompt and generated tokens, TTFT and
end-to-end latency, both measured from the request's arrival.

- TTFT of ``hf_generate``: its first streamed token. Of a static batch: the batch's
  first token (a streamer sees the whole batch's tokens at once). Of the continuous
  batching baselines: the first per-token timestamp transformers records.
- A static batch runs until its longest request is done; its other rows keep
  decoding. Only the requested tokens count as generated; the rest is reported as
  padding (``extra.padding_waste``: computed positions that were not wanted).
- Continuous batching: requests go to ``model.continuous_batching_context_manager``
  (what ``model.generate_batch`` uses inside) through ``add_request``, because
  ``generate_batch`` takes one ``max_new_tokens`` for all prompts. The manager is
  built and warmed up before the clock starts, sized with the same workload hints
  that ``generate_batch`` would give it.

Each system runs in its own process (``python -m benchmarks.e2e.baselines``, driven
by ``benchmarks.e2e.run``) so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.workload import DEFAULT_MODEL, BenchRequest, Workload

STATIC_BATCH_SIZE = 16
CB_TUNED = {"max_requests_per_batch": 16, "max_batch_tokens": 512}


@dataclass(slots=True)
class RequestRecord:
    index: int
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float | None
    """From arrival to the first generated token; None where not measurable."""
    e2e_s: float
    """From arrival to the request's last token."""


@dataclass(slots=True)
class SystemRun:
    system: str
    wall_s: float
    """From the first submission to the last request done."""
    records: list[RequestRecord]
    warmup_s: float = 0.0
    load_s: float = 0.0
    peak_rss_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------- helpers
def _wait_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _peak_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def load_hf_model(model_path: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    # EOS ignored: without a default EOS, generate runs to max_new_tokens.
    model.generation_config.eos_token_id = None
    return model


def _pad_id(model: Any) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "eos_token_id", None)
    if isinstance(pad, list):
        pad = pad[0]
    return int(pad) if pad is not None else 0


class _FirstTokenTimer:
    """A transformers streamer that notes when the first generated token arrives
    (``generate`` first puts the prompt, then one tensor per decoding step)."""

    def __init__(self) -> None:
        self.calls = 0
        self.first_token_time: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2 and self.first_token_time is None:
            self.first_token_time = time.perf_counter()

    def end(self) -> None:
        pass


def _gen_config(model: Any, max_new_tokens: int) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=_pad_id(model),
    )


# ------------------------------------------------------------- hf_generate
def hf_generate_sequential(
    model: Any, reqs: list[BenchRequest]
) -> tuple[float, list[RequestRecord]]:
    import torch

    records = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for r in sorted(reqs, key=lambda r: (r.arrival_s, r.index)):
            arrive = t0 + r.arrival_s
            _wait_until(arrive)
            ids = torch.tensor([r.prompt_token_ids])
            timer = _FirstTokenTimer()
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                generation_config=_gen_config(model, r.max_tokens),
                streamer=timer,
            )
            end = time.perf_counter()
            first = timer.first_token_time
            records.append(
                RequestRecord(
                    r.index,
                    len(r.prompt_token_ids),
                    int(out.shape[1] - ids.shape[1]),
                    None if first is None else first - arrive,
                    end - arrive,
                )
            )
    return time.perf_counter() - t0, records


def run_hf_generate(
    wl: Workload, warm: Workload, model_path: str, options: dict[str, Any]
) -> SystemRun:
    t = time.perf_counter()
    model = load_hf_model(model_path)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    hf_generate_sequential(model, warm.requests)
    warmup_s = time.perf_counter() - t
    wall, records = hf_generate_sequential(model, wl.requests)
    return SystemRun("hf_generate", wall, records, warmup_s, load_s)


# ------------------------------------------------------------ static batches
def _static(
    model: Any, reqs: list[BenchRequest], batch_size: int, sort_by_length: bool
) -> tuple[float, list[RequestRecord], dict[str, Any]]:
    import torch

    order = sorted(reqs, key=lambda r: (r.arrival_s, r.index))
    if sort_by_length:
        order = sorted(order, key=lambda r: len(r.prompt_token_ids))
    pad = _pad_id(model)
    records = []
    computed = useful = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            _wait_until(t0 + max(r.arrival_s for r in batch))
            width = max(len(r.prompt_token_ids) for r in batch)
            steps = max(r.max_tokens for r in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, r in enumerate(batch):  # left padding
                n = len(r.prompt_token_ids)
                ids[row, width - n :] = torch.tensor(r.prompt_token_ids)
                mask[row, width - n :] = 1
            timer = _FirstTokenTimer()
            out = model.generate(
                ids,
                attention_mask=mask,
                generation_config=_gen_config(model, steps),
                streamer=timer,
            )
            end = time.perf_counter()
            produced = int(out.shape[1] - width)
            computed += len(batch) * (width + produced)
            for r in batch:
                arrive = t0 + r.arrival_s
                useful += len(r.prompt_token_ids) + r.max_tokens
                first = timer.first_token_time
                records.append(
                    RequestRecord(
                        r.index,
                        len(r.prompt_token_ids),
                        min(r.max_tokens, produced),
                        None if first is None else first - arrive,
                        end - arrive,
                    )
                )
    wall = time.perf_counter() - t0
    extra = {
        "batch_size": batch_size,
        "sorted_by_prompt_length": sort_by_length,
        "computed_positions": computed,
        "useful_positions": useful,
        "padding_waste": 1.0 - useful / computed if computed else 0.0,
    }
    return wall, records, extra


def _run_static(
    name: str,
    sort_by_length: bool,
    wl: Workload,
    warm: Workload,
    model_path: str,
    options: dict[str, Any],
) -> SystemRun:
    size = int(options.get("batch_size", STATIC_BATCH_SIZE))
    t = time.perf_counter()
    model = load_hf_model(model_path)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    _static(model, warm.requests, size, sort_by_length)
    warmup_s = time.perf_counter() - t
    wall, records, extra = _static(model, wl.requests, size, sort_by_length)
    return SystemRun(name, wall, records, warmup_s, load_s, extra=extra)


def run_static_arrival(
    wl: Workload, warm: Workload, model_path: str, options: dict[str, Any]
) -> SystemRun:
    return _run_static("static_arrival", False, wl, warm, model_path, options)


def run_static_sorted(
    wl: Workload, warm: Workload, model_path: str, options: dict[str, Any]
) -> SystemRun:
    return _run_static("static_sorted", True, wl, warm, model_path, options)


# ------------------------------------------------------- continuous batching
def _cb_session(
    model: Any, reqs: list[BenchRequest], cb_options: dict[str, Any], hints: Any
) -> tuple[float, list[RequestRecord], dict[str, Any]]:
    """One ``continuous_batching_context_manager`` session; the clock starts once
    the manager is running. The manager persists on the model between sessions
    (built once, at the size the hints ask for)."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    gen_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=hints.max_generated_length,
        eos_token_id=None,
        pad_token_id=_pad_id(model),
    )
    cb_config = ContinuousBatchingConfig(**cb_options)
    order = sorted(reqs, key=lambda r: (r.arrival_s, r.index))
    by_id = {f"bench-{r.index}": r for r in order}
    records: dict[str, RequestRecord] = {}
    errors: list[str] = []
    with model.continuous_batching_context_manager(
        generation_config=gen_config,
        continuous_batching_config=cb_config,
        block=True,
        timeout=30,
        persistent_manager=True,
        workload_hints=hints,
    ) as manager:
        t0 = time.perf_counter()
        nxt = 0
        while len(records) + len(errors) < len(order):
            now = time.perf_counter()
            while nxt < len(order) and t0 + order[nxt].arrival_s <= now:
                r = order[nxt]
                manager.add_request(
                    list(r.prompt_token_ids),
                    request_id=f"bench-{r.index}",
                    max_new_tokens=r.max_tokens,
                    record_timestamps=True,
                    eos_token_id=-1,  # no EOS: run to max_new_tokens
                )
                nxt += 1
            wait = 1.0
            if nxt < len(order):
                wait = max(0.0, min(wait, t0 + order[nxt].arrival_s - now))
            res = manager.get_result(timeout=wait) if wait > 0 else None
            if res is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' generation thread stopped")
                continue
            if not res.is_finished():
                continue
            received = time.perf_counter()
            r = by_id[res.request_id]
            if res.error is not None:
                errors.append(f"{res.request_id}: {res.error}")
                continue
            arrive = t0 + r.arrival_s
            stamps = res.timestamps or []
            finished = res.lifespan[1] if res.lifespan[1] > 0 else received
            records[res.request_id] = RequestRecord(
                r.index,
                len(r.prompt_token_ids),
                len(res.generated_tokens),
                stamps[0] - arrive if stamps else None,
                finished - arrive,
            )
        wall = time.perf_counter() - t0
        cfg = manager.continuous_batching_config
        resolved = {
            k: getattr(cfg, k, None)
            for k in (
                "num_blocks",
                "max_batch_tokens",
                "max_requests_per_batch",
                "page_size",
                "max_memory_percent",
            )
        }
        resolved["attn_implementation"] = getattr(
            model.config, "_attn_implementation", None
        )
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[:3]}")
    return wall, [records[f"bench-{r.index}"] for r in order], resolved


def _run_cb(
    name: str,
    defaults: dict[str, Any],
    wl: Workload,
    warm: Workload,
    model_path: str,
    options: dict[str, Any],
) -> SystemRun:
    from transformers.generation.continuous_batching.utils import WorkloadHints

    cb_options = {**defaults, **options}
    t = time.perf_counter()
    model = load_hf_model(model_path)
    load_s = time.perf_counter() - t
    # The hints generate_batch derives from its inputs, from the measured workload.
    hints = WorkloadHints(
        max_prompt_length=max(len(r.prompt_token_ids) for r in wl.requests),
        max_generated_length=max(r.max_tokens for r in wl.requests),
        num_requests=len(wl.requests),
    )
    t = time.perf_counter()
    _cb_session(model, warm.requests, cb_options, hints)
    warmup_s = time.perf_counter() - t
    try:
        wall, records, resolved = _cb_session(model, wl.requests, cb_options, hints)
    finally:
        destroy = getattr(model, "destroy_cached_continuous_batching_manager", None)
        if destroy is not None:
            destroy()
    extra = {"options": cb_options, "resolved_config": resolved}
    return SystemRun(name, wall, records, warmup_s, load_s, extra=extra)


def run_hf_generate_batch(
    wl: Workload, warm: Workload, model_path: str, options: dict[str, Any]
) -> SystemRun:
    return _run_cb("hf_generate_batch", {}, wl, warm, model_path, options)


def run_hf_generate_batch_tuned(
    wl: Workload, warm: Workload, model_path: str, options: dict[str, Any]
) -> SystemRun:
    return _run_cb("hf_generate_batch_tuned", CB_TUNED, wl, warm, model_path, options)


# ------------------------------------------------------------------- llmprod
def _llmprod_params(reqs: list[BenchRequest]) -> list[Any]:
    from llmprod import SamplingParams

    return [
        SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True)
        for r in reqs
    ]


def _llmprod_records(reqs: list[BenchRequest], comps: list[Any]) -> list[RequestRecord]:
    out = []
    for r, c in zip(reqs, comps):
        # The engine times each request from its submission, which is its arrival.
        out.append(
            RequestRecord(
                r.index,
                c.usage.prompt_tokens,
                c.usage.completion_tokens,
                c.timings.ttft_s,
                c.timings.e2e_s,
            )
        )
    return out


def _llmprod_arrivals(engine: Any, reqs: list[BenchRequest]) -> tuple[float, list[Any]]:
    """Submit each request at its arrival offset from this thread's event loop."""
    params = _llmprod_params(reqs)

    async def main() -> tuple[float, list[Any]]:
        t0 = time.perf_counter()

        async def one(r: BenchRequest, p: Any) -> Any:
            delay = t0 + r.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            return (await engine.agenerate([r.prompt_token_ids], p))[0]

        comps = await asyncio.gather(*(one(r, p) for r, p in zip(reqs, params)))
        return time.perf_counter() - t0, list(comps)

    return asyncio.run(main())


def run_llmprod(
    wl: Workload, warm: Workload, model_path: str, options: dict[str, Any]
) -> SystemRun:
    import torch

    from llmprod import Engine

    opts = dict(options)
    model = opts.pop("model", DEFAULT_MODEL)
    threads = torch.get_num_threads()
    opts.setdefault("num_threads", threads)
    t = time.perf_counter()
    engine = Engine.from_pretrained(model, **opts)
    load_s = time.perf_counter() - t
    try:
        t = time.perf_counter()
        engine.generate(
            [r.prompt_token_ids for r in warm.requests], _llmprod_params(warm.requests)
        )
        warmup_s = time.perf_counter() - t
        # Count the measured run only: a fresh recorder when the engine has one.
        metrics_scope = "warm-up and measured run"
        recorder = getattr(engine, "recorder", None)
        if recorder is not None and hasattr(recorder, "reset"):
            recorder.reset()
            metrics_scope = "measured run"
        reqs = sorted(wl.requests, key=lambda r: (r.arrival_s, r.index))
        if all(r.arrival_s == 0 for r in reqs):
            t0 = time.perf_counter()
            comps = engine.generate(
                [r.prompt_token_ids for r in reqs], _llmprod_params(reqs)
            )
            wall = time.perf_counter() - t0
        else:
            wall, comps = _llmprod_arrivals(engine, reqs)
        records = _llmprod_records(reqs, comps)
        snap = engine.metrics().to_dict()
        params = {id(p): p for p in engine.model.parameters()}.values()
        weight_bytes = sum(p.numel() * p.element_size() for p in params)
        extra = {
            "options": options,
            "metrics": snap,
            "metrics_scope": metrics_scope,
            "weight_bytes": weight_bytes,
            "kv_budget_bytes": snap["kv_cache"]["budget_bytes"],
            "num_blocks": engine.num_blocks,
            "block_size": engine.block_size,
            "num_threads": torch.get_num_threads(),
        }
    finally:
        engine.close()
    return SystemRun("llmprod", wall, records, warmup_s, load_s, extra=extra)


def run_llmprod_generic(
    wl: Workload, warm: Workload, model_path: str, options: dict[str, Any]
) -> SystemRun:
    """llmprod on the generic path: the native-vs-generic cost on one workload."""
    run = run_llmprod(wl, warm, model_path, {**options, "model_impl": "generic"})
    run.system = "llmprod_generic"
    return run


SYSTEMS: dict[str, Callable[[Workload, Workload, str, dict[str, Any]], SystemRun]] = {
    "llmprod": run_llmprod,
    "llmprod_generic": run_llmprod_generic,
    "hf_generate": run_hf_generate,
    "static_arrival": run_static_arrival,
    "static_sorted": run_static_sorted,
    "hf_generate_batch": run_hf_generate_batch,
    "hf_generate_batch_tuned": run_hf_generate_batch_tuned,
}


# ------------------------------------------------------------ machine facts
def measure_machine(model_path: str, threads: int) -> dict[str, Any]:
    """fp32 GEMM GFLOP/s and read bandwidth on ``threads`` threads, and the
    model's parameter count (tied weights counted once)."""
    import platform

    import torch
    import transformers

    torch.set_num_threads(threads)
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)

    def gflops(fn: Any) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(10):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        times.sort()
        return float(2 * n**3 / times[len(times) // 2] / 1e9)

    # torch.mm is PyTorch's default fp32 GEMM (MKL in the x86 wheels); oneDNN is
    # what llmprod's linear layers run on where it is available.
    gemm_gflops = gflops(lambda: torch.mm(a, b))
    from llmprod.layers.linear import onednn_available, onednn_linear

    onednn_gflops = None
    if onednn_available():
        bt = b.t().contiguous()
        onednn_gflops = gflops(lambda: onednn_linear(a, bt))

    buf = torch.ones(64 * 1024 * 1024)  # 256 MiB, well past the caches
    for _ in range(2):
        buf.sum()
    times = []
    for _ in range(8):
        t = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t)
    times.sort()
    read_gbps = buf.numel() * buf.element_size() / times[len(times) // 2] / 1e9
    del buf

    model = load_hf_model(model_path)
    unique = {p.data_ptr(): p for p in model.parameters()}.values()
    params = sum(p.numel() for p in unique)
    model_bytes = sum(p.numel() * p.element_size() for p in unique)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flops_per_token = 2 * params
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gemm_shape": [n, n, n],
        "gemm_gflops": gemm_gflops,
        "read_gbps": read_gbps,
        "model_params": params,
        "model_bytes": model_bytes,
        "flops_per_token": flops_per_token,
        "compute_ceiling_tok_s": gemm_gflops * 1e9 / flops_per_token,
        "gemm_gflops_onednn": onednn_gflops,
        "compute_ceiling_onednn_tok_s": onednn_gflops * 1e9 / flops_per_token
        if onednn_gflops
        else None,
        "bandwidth_bound_decode_steps_s": read_gbps * 1e9 / model_bytes,
    }


# ---------------------------------------------------------------- child entry
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run one system on a saved workload.")
    ap.add_argument("--system", required=True, choices=[*SYSTEMS, "machine"])
    ap.add_argument("--workload", help="workload JSON (benchmarks.workload)")
    ap.add_argument("--warmup", help="warm-up workload JSON")
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--options", default="{}", help="JSON options for the system")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.system == "machine":
        result: dict[str, Any] = measure_machine(args.model_path, args.threads)
    else:
        wl = Workload.from_json(args.workload)
        warm = Workload.from_json(args.warmup)
        run = SYSTEMS[args.system](wl, warm, args.model_path, json.loads(args.options))
        gc.collect()
        run.peak_rss_bytes = _peak_rss_bytes()
        result = run.to_dict()
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
