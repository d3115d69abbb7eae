"""What ``Engine.metrics()`` reports: the recorder's counters and percentiles,
plus the KV cache, scheduler, answer caches, memory and the engine's setup."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from llmprod.ops.metrics import MetricsSnapshot, peak_rss_bytes, process_rss_bytes

if TYPE_CHECKING:
    from llmprod.engine.engine import Engine


def snapshot(engine: Engine) -> MetricsSnapshot:
    """Build the snapshot of one engine (any thread)."""
    kv = engine.kv.stats()
    if engine.device.type == "cuda":
        mem = {
            "now_bytes": int(torch.cuda.memory_allocated(engine.device)),
            "peak_bytes": int(torch.cuda.max_memory_allocated(engine.device)),
        }
    else:
        mem = {"now_bytes": process_rss_bytes(), "peak_bytes": peak_rss_bytes()}
    snap = engine.recorder.snapshot(
        kv_cache={
            "num_blocks": kv.num_blocks,
            "block_size": kv.block_size,
            "usage": kv.usage,
            "cached_blocks": kv.num_cached_blocks,
            "prefix_hit_rate": kv.prefix_hit_rate,
            "evictions": kv.num_evictions,
            "budget_bytes": kv.num_blocks * engine.kv_block_bytes,
            "touched_bytes": kv.num_touched_blocks * engine.kv_block_bytes,
        },
        scheduler={"preemptions": engine.scheduler.stats().num_preemptions},
        cache=engine.answers.stats() if engine.answers is not None else {},
        memory=mem,
        engine={
            "model": engine.model_name,
            "device": str(engine.device),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "attention_backend": engine.backend.name,
            "linear_backend": engine.linear_backend,
            "packed_linears": engine.packed_linears,
            "fused_cpu_ops": engine.fused_cpu_ops,
            "greedy_screening": {
                "enabled": engine.greedy_head is not None,
                **(engine.greedy_head.stats() if engine.greedy_head else {}),
            },
            "model_impl": engine.model_impl,
            "quantization": engine.quantization,
            "quantization_source": engine.quantization_source,
            "weights_bytes": dict(engine.weight_bytes),
            "tensor_parallel": {
                "size": engine.tp.size if engine.tp is not None else 1,
                "weight_bytes_per_rank": sum(engine.weight_bytes.values()),
                "kv_budget_bytes_per_rank": kv.num_blocks * engine.kv_block_bytes,
            },
            "model_path": str(engine.model_path),
            "draft": _draft_report(engine),
        },
    )
    if engine.throttle is not None:
        for tenant, usage in engine.throttle.snapshot().items():
            snap.tenants.setdefault(tenant, {})["throttle"] = usage
    return snap


def _draft_report(engine: Engine) -> dict[str, Any] | None:
    """The draft model of draft speculation (None without one)."""
    draft = engine.draft
    if draft is None:
        return None
    spec = engine.config.speculative
    return {
        "model": getattr(spec, "draft_model", None),
        "quantization": getattr(spec, "draft_quantization", None),
        "weights_bytes": dict(engine.draft_weight_bytes),
        "kv_bytes": draft.kv_bytes,
        "lanes": len(draft.lanes),
        "forwards": draft.forwards,
        "lookups": draft.lookups,
    }
