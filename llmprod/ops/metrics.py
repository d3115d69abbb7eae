"""Engine metrics: counters, latency percentiles over a bounded window, memory.

Percentiles are exact over the most recent ``window`` finished requests (numpy's
default linear interpolation), not estimated from buckets.

Per-tenant rows are bounded: beyond ``max_tenants`` named tenants, the least
recently active idle tenants (nothing in flight) are folded into the
:data:`OTHER_TENANT` row, so the rows always add up to the engine's totals.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, MutableMapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 95, 99)
"""The percentiles of every latency metric."""

OTHER_TENANT = "other"
"""The row (and Prometheus label value) that holds the tenants beyond a cap. A
tenant really called ``other`` shares it."""

DEFAULT_MAX_TENANTS = 1_000
"""Named tenant rows a :class:`MetricsRecorder` keeps by default."""


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


def merge_row(into: MutableMapping[str, Any], row: Mapping[str, Any]) -> None:
    """Add one tenant row into another: numbers are summed, nested dicts merged
    key by key, booleans or-ed; strings, ``None`` and lists are left out, as is
    a key whose kind differs from the one already there."""
    for key, value in row.items():
        have = into.get(key)
        if isinstance(value, bool):
            if have is None or isinstance(have, bool):
                into[key] = bool(have) or value
        elif isinstance(value, (int, float)):
            if have is None:
                into[key] = value
            elif isinstance(have, (int, float)) and not isinstance(have, bool):
                into[key] = have + value
        elif isinstance(value, Mapping):
            if have is None:
                have = into[key] = {}
            if isinstance(have, dict):
                merge_row(have, value)


def fold_tenants(tenants: Mapping[str, Any], keep: int) -> dict[str, Any]:
    """The ``keep`` tenants with the most requests (``submitted``; ties by name)
    under their own names, every other one merged into :data:`OTHER_TENANT`.

    An ``other`` row already there is merged too and never counts as one of the
    ``keep``. The kept rows stay in their order and ``other`` comes last. Values
    that are not dicts are not tenant rows: they pass through unchanged.

    >>> rows = {"a": {"submitted": 1}, "b": {"submitted": 5}, "c": {"submitted": 2}}
    >>> fold_tenants(rows, 1)
    {'b': {'submitted': 5}, 'other': {'submitted': 3}}
    """
    if keep < 0:
        raise ValueError(f"keep={keep!r} must be >= 0")
    rows = {t: r for t, r in tenants.items() if isinstance(r, Mapping)}
    named = [t for t in rows if t != OTHER_TENANT]
    if len(named) <= keep:
        return dict(tenants)
    ranked = sorted(named, key=lambda t: (-_requests(rows[t]), str(t)))
    kept = set(ranked[:keep])
    out = {t: v for t, v in tenants.items() if t in kept or t not in rows}
    other: dict[str, Any] = {}
    for t, row in rows.items():
        if t not in kept:
            merge_row(other, row)
    out[OTHER_TENANT] = other
    return out


def _requests(row: Mapping[str, Any]) -> float:
    n = row.get("submitted", 0)
    ok = isinstance(n, (int, float)) and not isinstance(n, bool) and n == n
    return float(n) if ok else 0.0


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
    scheduler: dict[str, Any] = field(default_factory=dict)
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
    :meth:`~llmprod.ops.limits.Throttle.snapshot` row) when limits are set.
    Tenants folded away by the recorder's cap are summed in ``other``."""
    cache: dict[str, Any] = field(default_factory=dict)
    """response-cache hits per tier, misses and backend errors."""
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    """per LoRA adapter (requests that named one): submitted, completed,
    aborted, errored, prompt_tokens, completion_tokens, cost, e2e_s (summed
    latency of the completed ones) and mean_e2e_s; capped like tenants (the
    rest in ``other``)."""

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as nested dicts of plain values (ready for ``json.dumps``)."""
        return asdict(self)


class MetricsRecorder:
    """Thread-safe accumulation of per-request and per-step numbers.

    Args:
        window: finished requests whose latencies the percentiles cover.
        max_tenants: named tenant rows kept (>= 1). Past it, the least recently
            active tenant with nothing in flight is folded into the
            :data:`OTHER_TENANT` row; a tenant with requests in flight keeps its
            row until they finish, so rows never lose a request midway.
    """

    def __init__(
        self, window: int = 10_000, max_tenants: int = DEFAULT_MAX_TENANTS
    ) -> None:
        self._lock = threading.Lock()
        self._window = window
        self._max_tenants = _check_max_tenants(max_tenants)
        self._clear()

    def reset(self) -> None:
        """Start counting afresh (a benchmark's measured run after its warm-up).
        Call it while no request is in flight."""
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        window = self._window
        self.start_time = time.monotonic()
        self.counts = {"submitted": 0, "completed": 0, "aborted": 0, "errored": 0}
        self.tokens = {"prompt": 0, "completion": 0, "cached_prompt": 0}
        self.cost = 0.0
        self.cache_hits: dict[str, int] = {}
        self.tenants: dict[str, dict[str, float]] = {}
        self.adapters: dict[str, dict[str, float]] = {}
        # named tenants with nothing in flight, least recently active first
        self._idle: OrderedDict[str, None] = OrderedDict()
        self.samples: dict[str, deque[float]] = {
            k: deque(maxlen=window) for k in ("queued", "ttft", "tpot", "e2e")
        }
        self.steps = 0
        self.padded = 0
        self.processed = 0
        self.peak_kv_usage = 0.0
        self.slot_waste_at_peak = 0.0
        self.spec = {"steps": 0, "drafted_tokens": 0, "accepted_tokens": 0}

    @property
    def max_tenants(self) -> int:
        """Named tenant rows kept; setting it folds the excess idle ones now."""
        return self._max_tenants

    @max_tenants.setter
    def max_tenants(self, value: int) -> None:
        with self._lock:
            self._max_tenants = _check_max_tenants(value)
            self._evict()

    def _tenant(self, tenant: str) -> dict[str, float]:
        t = self.tenants.get(tenant)
        if t is None:
            t = self.tenants[tenant] = {
                "submitted": 0, "completed": 0, "aborted": 0, "errored": 0,
                "prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0,
            }  # fmt: skip
        return t

    def _touch(self, tenant: str, row: dict[str, float]) -> None:
        """Mark the tenant active now; idle ones queue for eviction (under lock)."""
        if tenant == OTHER_TENANT:
            return
        done = row["completed"] + row["aborted"] + row["errored"]
        self._idle.pop(tenant, None)
        if done >= row["submitted"]:
            self._idle[tenant] = None
        self._evict()

    def _evict(self) -> None:
        """Fold the least recently active idle tenants into ``other`` while
        there are more named rows than the cap (under lock)."""
        named = len(self.tenants) - (OTHER_TENANT in self.tenants)
        while named > self._max_tenants and self._idle:
            tenant, _ = self._idle.popitem(last=False)
            merge_row(self._tenant(OTHER_TENANT), self.tenants.pop(tenant))
            named -= 1

    def on_submit(self, tenant: str = "default", adapter: str | None = None) -> None:
        """Record a submitted request."""
        with self._lock:
            self.counts["submitted"] += 1
            t = self._tenant(tenant)
            t["submitted"] += 1
            self._touch(tenant, t)
            if adapter is not None:
                self._adapter(adapter)["submitted"] += 1

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
        adapter: str | None = None,
    ) -> None:
        """Record a finished request; ``outcome`` is completed, aborted or errored;
        ``cache_tier`` names the response-cache tier that answered, if one did;
        ``adapter`` the LoRA adapter it ran with."""
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
            self._touch(tenant, t)
            if adapter is not None:
                a = self._adapter(adapter)
                a[outcome] += 1
                a["prompt_tokens"] += prompt
                a["completion_tokens"] += completion
                a["cost"] += cost
                if outcome == "completed" and timings.get("e2e") is not None:
                    a["e2e_s"] += timings["e2e"]  # type: ignore[operator]
            if outcome == "completed":
                for k, v in timings.items():
                    if v is not None:
                        self.samples[k].append(v)

    def _adapter(self, name: str) -> dict[str, float]:
        row = self.adapters.get(name)
        if row is None:
            keys = ("submitted", "completed", "aborted", "errored", "prompt_tokens",
                    "completion_tokens", "cost", "e2e_s")  # fmt: skip
            row = self.adapters[name] = dict.fromkeys(keys, 0)
        return row

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

    def on_speculation(self, drafted: int, accepted: int) -> None:
        """Record one request's verification step: guesses made and kept."""
        with self._lock:
            self.spec["steps"] += 1
            self.spec["drafted_tokens"] += drafted
            self.spec["accepted_tokens"] += accepted

    def snapshot(self, **sections: dict[str, Any]) -> MetricsSnapshot:
        """Everything recorded so far, plus the sections the engine adds
        (``kv_cache``, ``scheduler``, ``memory``, ``engine``, ``cache``)."""
        elapsed = max(time.monotonic() - self.start_time, 1e-9)
        with self._lock:
            counts = dict(self.counts)
            tokens = dict(self.tokens)
            tenants = {k: dict(v) for k, v in self.tenants.items()}
            adapters = fold_tenants(
                {k: dict(v) for k, v in self.adapters.items()}, self._max_tenants
            )
            samples = {k: list(v) for k, v in self.samples.items()}
            scheduler = {
                "steps": self.steps,
                "padding_waste": self.padded / self.processed
                if self.processed
                else 0.0,
                "speculative": speculation_stats(**self.spec),
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
            adapters={k: _with_mean(row) for k, row in adapters.items()},
            cache={
                "hits": hits,
                "hit_rate": sum(hits.values()) / answered if answered else 0.0,
            },
        )
        for name, values in sections.items():
            getattr(snap, name).update(values)
        return snap


def _with_mean(row: dict[str, Any]) -> dict[str, Any]:
    done = row.get("completed")
    return {**row, "mean_e2e_s": row["e2e_s"] / done if done else None}


def speculation_stats(
    steps: int, drafted_tokens: int, accepted_tokens: int
) -> dict[str, float]:
    """Speculative decoding's counts and rates: guesses kept per guess made, and
    tokens yielded per verification step (kept guesses + the model's own)."""
    return {
        "steps": steps,
        "drafted_tokens": drafted_tokens,
        "accepted_tokens": accepted_tokens,
        "acceptance_rate": accepted_tokens / drafted_tokens if drafted_tokens else 0.0,
        "mean_accepted_length": (accepted_tokens + steps) / steps if steps else 0.0,
    }


def _check_max_tenants(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"max_tenants={value!r} must be an int >= 1")
    return value
