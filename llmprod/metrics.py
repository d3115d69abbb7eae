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


def percentiles(samples: list[float] | deque[float]) -> dict[str, float | None]:
    """p50/p90/p95/p99 of the samples (None when there are none)."""
    if not samples:
        return {f"p{p}": None for p in PERCENTILES}
    vals = np.percentile(np.asarray(samples, dtype=np.float64), PERCENTILES)
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, vals)}


def process_rss_bytes() -> int:
    """Resident set size of this process."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def peak_rss_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass(slots=True)
class MetricsSnapshot:
    """Everything ``engine.metrics()`` reports, as plain Python values."""

    requests: dict[str, int] = field(default_factory=dict)
    """submitted, completed, aborted, errored, running, waiting."""
    tokens: dict[str, int] = field(default_factory=dict)
    """prompt, completion, cached_prompt."""
    latency_s: dict[str, dict[str, float | None]] = field(default_factory=dict)
    """queued, ttft, tpot, e2e -> p50/p90/p95/p99 over the window."""
    throughput: dict[str, float] = field(default_factory=dict)
    """generated and total tokens per second since the engine started."""
    kv_cache: dict[str, float] = field(default_factory=dict)
    """num_blocks, block_size, usage, peak_usage, prefix_hit_rate, evictions."""
    scheduler: dict[str, float] = field(default_factory=dict)
    """steps, preemptions, padding_waste (padded / processed decode-attention keys)."""
    memory: dict[str, int] = field(default_factory=dict)
    """now and peak bytes (CUDA allocator on GPU, process RSS on CPU)."""
    engine: dict[str, Any] = field(default_factory=dict)
    """model, device, dtype, attention backend, quantization."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MetricsRecorder:
    """Thread-safe accumulation of per-request and per-step numbers."""

    def __init__(self, window: int = 10_000) -> None:
        self._lock = threading.Lock()
        self.start_time = time.monotonic()
        self.counts = {"submitted": 0, "completed": 0, "aborted": 0, "errored": 0}
        self.tokens = {"prompt": 0, "completion": 0, "cached_prompt": 0}
        self.samples: dict[str, deque[float]] = {
            k: deque(maxlen=window) for k in ("queued", "ttft", "tpot", "e2e")
        }
        self.steps = 0
        self.padded = 0
        self.processed = 0
        self.peak_kv_usage = 0.0

    def on_submit(self) -> None:
        with self._lock:
            self.counts["submitted"] += 1

    def on_finish(
        self,
        outcome: str,
        prompt: int,
        completion: int,
        cached: int,
        timings: dict[str, float | None],
    ) -> None:
        with self._lock:
            self.counts[outcome] += 1
            self.tokens["prompt"] += prompt
            self.tokens["completion"] += completion
            self.tokens["cached_prompt"] += cached
            if outcome == "completed":
                for k, v in timings.items():
                    if v is not None:
                        self.samples[k].append(v)

    def on_step(self, padded: int, processed: int, kv_usage: float) -> None:
        with self._lock:
            self.steps += 1
            self.padded += padded
            self.processed += processed
            self.peak_kv_usage = max(self.peak_kv_usage, kv_usage)

    def latency(self) -> dict[str, dict[str, float | None]]:
        with self._lock:
            copies = {k: list(v) for k, v in self.samples.items()}
        return {k: percentiles(v) for k, v in copies.items()}
