"""Engine metrics: counters, latency percentiles over a bounded window, memory.

Percentiles are exact over the most recent ``window`` finished requests (numpy's
default linear interpolation), not estimated from buckets.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 95, 99)
"""The percentiles of every latency metric."""


def percentiles(samples: list[float] | deque[float]) -> dict[str, float | None]:
    """p50/p90/p95/p99 of the samples (None when there are none)."""
    if not samples:
        return {f"p{p}": None for p in PERCENTILES}
    vals = np.percentile(np.asarray(samples, dtype=np.float64), PERCENTILES)
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, vals)}


def process_rss_bytes() -> int:
    """Resident set size of this process (the peak where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``ru_maxrss``, read as KiB)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass(slots=True)
class MetricsSnapshot:
    """Everything ``engine.metrics()`` reports, as plain Python values."""

    requests: dict[str, int] = field(default_factory=dict)
    """submitted, completed, aborted, errored, in_flight."""
    tokens: dict[str, int] = field(default_factory=dict)
    """prompt, completion, cached_prompt."""
    latency_s: dict[str, dict[str, float | None]] = field(default_factory=dict)
    """queued, ttft, tpot, e2e -> p50/p90/p95/p99 over the window."""
    throughput: dict[str, float] = field(default_factory=dict)
    """generated and total tokens per second since the engine started; uptime_s."""
    kv_cache: dict[str, float] = field(default_factory=dict)
    """num_blocks, block_size, usage, peak_usage, slot_waste_at_peak (allocated but
    unused slots of running requests when usage peaked), prefix_hit_rate,
    cached_blocks, evictions."""
    scheduler: dict[str, float] = field(default_factory=dict)
    """steps, preemptions, padding_waste (padded / processed decode-attention keys)."""
    memory: dict[str, int] = field(default_factory=dict)
    """now and peak bytes (CUDA allocator on GPU, process RSS on CPU)."""
    engine: dict[str, Any] = field(default_factory=dict)
    """model, device, dtype, attention backend, quantization."""
    cost: dict[str, float] = field(default_factory=dict)
    """total cost of finished requests (from the engine's price table)."""
    tenants: dict[str, dict[str, Any]] = field(default_factory=dict)
    """per tenant: submitted, completed, aborted, errored, prompt_tokens,
    completion_tokens, cost; and ``throttle`` (its
    :meth:`~llmprod.ops.limits.Throttle.snapshot` row) when limits are set."""
    cache: dict[str, Any] = field(default_factory=dict)
    """response-cache hits per tier, misses and backend errors."""

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as nested dicts of plain values (ready for ``json.dumps``)."""
        return asdict(self)


class MetricsRecorder:
    """Thread-safe accumulation of per-request and per-step numbers."""

    def __init__(self, window: int = 10_000) -> None:
        self._lock = threading.Lock()
        self.start_time = time.monotonic()
        self.counts = {"submitted": 0, "completed": 0, "aborted": 0, "errored": 0}
        self.tokens = {"prompt": 0, "completion": 0, "cached_prompt": 0}
        self.cost = 0.0
        self.cache_hits: dict[str, int] = {}
        self.tenants: dict[str, dict[str, float]] = {}
        self.samples: dict[str, deque[float]] = {
            k: deque(maxlen=window) for k in ("queued", "ttft", "tpot", "e2e")
        }
        self.steps = 0
        self.padded = 0
        self.processed = 0
        self.peak_kv_usage = 0.0
        self.slot_waste_at_peak = 0.0

    def _tenant(self, tenant: str) -> dict[str, float]:
        t = self.tenants.get(tenant)
        if t is None:
            t = self.tenants[tenant] = {
                "submitted": 0, "completed": 0, "aborted": 0, "errored": 0,
                "prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0,
            }  # fmt: skip
        return t

    def on_submit(self, tenant: str = "default") -> None:
        with self._lock:
            self.counts["submitted"] += 1
            self._tenant(tenant)["submitted"] += 1

    def on_finish(
        self,
        outcome: str,
        prompt: int,
        completion: int,
        cached: int,
        timings: dict[str, float | None],
        tenant: str = "default",
        cost: float = 0.0,
        cache_tier: str | None = None,
    ) -> None:
        """Record a finished request; ``outcome`` is completed, aborted or errored;
        ``cache_tier`` names the response-cache tier that answered, if one did."""
        with self._lock:
            if cache_tier is not None:
                self.cache_hits[cache_tier] = self.cache_hits.get(cache_tier, 0) + 1
            self.counts[outcome] += 1
            self.tokens["prompt"] += prompt
            self.tokens["completion"] += completion
            self.tokens["cached_prompt"] += cached
            self.cost += cost
            t = self._tenant(tenant)
            t[outcome] += 1
            t["prompt_tokens"] += prompt
            t["completion_tokens"] += completion
            t["cost"] += cost
            if outcome == "completed":
                for k, v in timings.items():
                    if v is not None:
                        self.samples[k].append(v)

    def on_step(
        self, padded: int, processed: int, kv_usage: float, slot_waste: float
    ) -> None:
        """Record a step: decode-attention padding, KV usage and unused slots."""
        with self._lock:
            self.steps += 1
            self.padded += padded
            self.processed += processed
            if kv_usage >= self.peak_kv_usage:
                self.peak_kv_usage = kv_usage
                self.slot_waste_at_peak = slot_waste

    def snapshot(self, **sections: dict[str, Any]) -> MetricsSnapshot:
        """Everything recorded so far, plus the sections the engine adds
        (``kv_cache``, ``scheduler``, ``memory``, ``engine``, ``cache``)."""
        elapsed = max(time.monotonic() - self.start_time, 1e-9)
        with self._lock:
            counts = dict(self.counts)
            tokens = dict(self.tokens)
            tenants = {k: dict(v) for k, v in self.tenants.items()}
            samples = {k: list(v) for k, v in self.samples.items()}
            scheduler = {
                "steps": self.steps,
                "padding_waste": self.padded / self.processed
                if self.processed
                else 0.0,
            }
            kv = {
                "peak_usage": self.peak_kv_usage,
                "slot_waste_at_peak": self.slot_waste_at_peak,
            }
            cost = self.cost
            hits = dict(self.cache_hits)
            answered = counts["completed"]
        done = counts["completed"] + counts["aborted"] + counts["errored"]
        snap = MetricsSnapshot(
            requests={**counts, "in_flight": counts["submitted"] - done},
            tokens=tokens,
            latency_s={k: percentiles(v) for k, v in samples.items()},
            throughput={
                "generated_tokens_per_s": tokens["completion"] / elapsed,
                "total_tokens_per_s": (tokens["completion"] + tokens["prompt"])
                / elapsed,
                "uptime_s": elapsed,
            },
            kv_cache=kv,
            scheduler=scheduler,
            cost={"total": cost},
            tenants=tenants,
            cache={
                "hits": hits,
                "hit_rate": sum(hits.values()) / answered if answered else 0.0,
            },
        )
        for name, values in sections.items():
            getattr(snap, name).update(values)
        return snap
