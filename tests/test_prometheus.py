"""Prometheus exporter: the documented name mapping, parsed back with
prometheus-client's own parser and compared with the snapshot dict."""

from __future__ import annotations

import sys
import urllib.request
from collections.abc import Mapping
from typing import Any

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

from llmprod.ops.prometheus import (
    PIP_HINT,
    SnapshotCollector,
    render,
    start_http_server,
)
from llmprod.sampling_params import SamplingParams

Key = tuple[str, tuple[tuple[str, str], ...]]


def make_snapshot() -> dict[str, Any]:
    """Shaped like MetricsSnapshot.to_dict(), plus sections the engine may add."""
    return {
        "requests": {
            "submitted": 12,
            "completed": 9,
            "aborted": 1,
            "errored": 1,
            "in_flight": 1,
        },
        "tokens": {"prompt": 480, "completion": 230, "cached_prompt": 64},
        "latency_s": {
            "ttft": {"p50": 0.05, "p90": 0.09, "p95": 0.11, "p99": 0.2},
            "e2e": {"p50": None, "p90": None, "p95": None, "p99": None},  # no samples
        },
        "throughput": {"generated_tokens_per_s": 41.5, "uptime_s": 12.0},
        "kv_cache": {"num_blocks": 512, "usage": 0.25, "evictions": 3},
        "scheduler": {"steps": 77, "preemptions": 2, "padding_waste": 0.125},
        "memory": {"now_bytes": 1_000_000, "peak_bytes": 2_000_000},
        "engine": {"model": "smollm2-135m", "device": "cpu", "quantization": None},
        "cost": {"total": 0.75},
        "tenants": {
            "acme-corp": {
                "submitted": 10,
                "cost": 0.5,
                "throttle": {"in_flight": 1, "rejected": {"budget": 2}},
            },
            "beta": {"submitted": 2, "cost": 0.25},
        },
        "cache": {"tiers": {"memory": {"hits": 5, "hit_rate": 0.5}}, "misses": 7},
        "router": {
            "is_enabled": True,
            "routes": ["small", "large"],
        },  # bool; list left out
    }


def parse(text: str) -> tuple[dict[Key, float], dict[str, str]]:
    """Samples keyed by (sample name, sorted labels), and each family's type."""
    samples: dict[Key, float] = {}
    types: dict[str, str] = {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return samples, types


def test_documented_names_labels_and_values() -> None:
    samples, types = parse(render(make_snapshot))
    expected: dict[Key, float] = {
        ("llmprod_requests_submitted_total", ()): 12,
        ("llmprod_requests_completed_total", ()): 9,
        ("llmprod_requests_aborted_total", ()): 1,
        ("llmprod_requests_errored_total", ()): 1,
        ("llmprod_requests_in_flight", ()): 1,
        ("llmprod_tokens_prompt_total", ()): 480,
        ("llmprod_tokens_completion_total", ()): 230,
        ("llmprod_tokens_cached_prompt_total", ()): 64,
        ("llmprod_latency_s_ttft", (("quantile", "0.5"),)): 0.05,
        ("llmprod_latency_s_ttft", (("quantile", "0.9"),)): 0.09,
        ("llmprod_latency_s_ttft", (("quantile", "0.95"),)): 0.11,
        ("llmprod_latency_s_ttft", (("quantile", "0.99"),)): 0.2,
        ("llmprod_throughput_generated_tokens_per_s", ()): 41.5,
        ("llmprod_throughput_uptime_s", ()): 12.0,
        ("llmprod_kv_cache_num_blocks", ()): 512,
        ("llmprod_kv_cache_usage", ()): 0.25,
        ("llmprod_kv_cache_evictions_total", ()): 3,
        ("llmprod_scheduler_steps_total", ()): 77,
        ("llmprod_scheduler_preemptions_total", ()): 2,
        ("llmprod_scheduler_padding_waste", ()): 0.125,
        ("llmprod_memory_now_bytes", ()): 1_000_000,
        ("llmprod_memory_peak_bytes", ()): 2_000_000,
        ("llmprod_engine_info", (("device", "cpu"), ("model", "smollm2-135m"))): 1,
        ("llmprod_cost_total", ()): 0.75,
        ("llmprod_tenants_submitted_total", (("tenant", "acme-corp"),)): 10,
        ("llmprod_tenants_submitted_total", (("tenant", "beta"),)): 2,
        ("llmprod_tenants_cost_total", (("tenant", "acme-corp"),)): 0.5,
        ("llmprod_tenants_cost_total", (("tenant", "beta"),)): 0.25,
        ("llmprod_tenants_throttle_in_flight", (("tenant", "acme-corp"),)): 1,
        (
            "llmprod_tenants_throttle_rejected_budget_total",
            (("tenant", "acme-corp"),),
        ): 2,
        ("llmprod_cache_tiers_hits_total", (("tier", "memory"),)): 5,
        ("llmprod_cache_tiers_hit_rate", (("tier", "memory"),)): 0.5,
        ("llmprod_cache_misses_total", ()): 7,
        ("llmprod_router_is_enabled", ()): 1,
    }
    assert (
        samples == expected
    )  # nothing missing, nothing extra (None and lists left out)
    assert types["llmprod_requests_completed"] == "counter"
    assert types["llmprod_cost"] == "counter"
    assert types["llmprod_latency_s_ttft"] == "gauge"
    assert types["llmprod_kv_cache_usage"] == "gauge"


def flatten(snap: Mapping[str, Any]) -> dict[Key, float]:
    """The documented mapping, restated independently for the default settings
    (numbers, booleans as 0/1; quantile dicts; the ``tenants`` label level)."""
    out: dict[Key, float] = {}

    def walk(
        node: Mapping[str, Any], name: list[str], labels: dict[str, str], path: str
    ) -> None:
        for k, v in node.items():
            if path == "tenants":
                c_name, c_labels, c_path = name, {**labels, "tenant": k}, "tenants.*"
            else:
                c_name, c_labels, c_path = [*name, k], labels, f"{path}.{k}".lstrip(".")
            if isinstance(v, Mapping) and v and all(str(q).startswith("p") for q in v):
                for q, val in v.items():
                    if val is not None:
                        quant = {**c_labels, "quantile": str(float(q[1:]) / 100)}
                        out[
                            (
                                "_".join(["llmprod", *c_name]),
                                tuple(sorted(quant.items())),
                            )
                        ] = val
            elif isinstance(v, Mapping):
                walk(v, c_name, c_labels, c_path)
            elif isinstance(v, (int, float)):  # a bool is a gauge of 0 or 1
                sample = "_".join(["llmprod", *c_name])
                if SnapshotCollector(dict)._is_counter(c_path.split(".")):
                    sample = sample.removesuffix("_total") + "_total"
                out[(sample, tuple(sorted(c_labels.items())))] = float(v)

    walk(snap, [], {}, "")
    return out


def test_real_engine_exposition_matches_its_metrics(engine: Any) -> None:
    engine.generate(["Hello there"], SamplingParams(max_tokens=4, temperature=0.0))
    snap = engine.metrics().to_dict()
    samples, _ = parse(render(lambda: snap))
    numeric = {k: v for k, v in samples.items() if not k[0].endswith("_info")}
    assert numeric == flatten(snap)
    assert (
        samples[("llmprod_requests_completed_total", ())]
        == snap["requests"]["completed"]
        >= 1
    )
    # the MetricsSnapshot itself (to_dict() is called on each scrape)
    live, _ = parse(render(engine.metrics))
    assert (
        live[("llmprod_requests_completed_total", ())] == snap["requests"]["completed"]
    )
    assert live[("llmprod_kv_cache_num_blocks", ())] == engine.num_blocks


def test_http_server_serves_the_same_text() -> None:
    server, thread = start_http_server(make_snapshot, 0)
    try:
        port = server.server_port
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=10
        ) as r:
            body = r.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert parse(body)[0] == parse(render(make_snapshot))[0]


def test_custom_label_levels_and_prefix() -> None:
    snap = {"cache": {"hit_rate": {"memory": 0.5, "redis": 0.25}}}
    text = render(lambda: snap, prefix="app", label_levels={"cache.hit_rate": "tier"})
    assert parse(text)[0] == {
        ("app_cache_hit_rate", (("tier", "memory"),)): 0.5,
        ("app_cache_hit_rate", (("tier", "redis"),)): 0.25,
    }


def test_response_cache_stats_shape(caplog: pytest.LogCaptureFixture) -> None:
    # ResponseCache.stats() with a two-tier backend, as the engine may report it
    stats = {
        "hits": {"memory": 4, "redis": 1},
        "hits_total": 5,  # same name as the per-tier hits: left out, not doubled
        "misses": 6,
        "errors": 0,
        "writes": 6,
        "pending_writes": 2,
        "backend": {"memory": {"hits": 4, "set_errors": 1}},
    }
    with caplog.at_level("WARNING", logger="llmprod.ops.prometheus"):
        samples, types = parse(render(lambda: {"cache": {"response": stats}}))
    assert samples == {
        ("llmprod_cache_response_hits_total", (("tier", "memory"),)): 4,
        ("llmprod_cache_response_hits_total", (("tier", "redis"),)): 1,
        ("llmprod_cache_response_misses_total", ()): 6,
        ("llmprod_cache_response_errors_total", ()): 0,
        ("llmprod_cache_response_writes_total", ()): 6,
        ("llmprod_cache_response_pending_writes", ()): 2,
        ("llmprod_cache_response_backend_hits_total", (("tier", "memory"),)): 4,
        ("llmprod_cache_response_backend_set_errors_total", (("tier", "memory"),)): 1,
    }
    assert types["llmprod_cache_response_pending_writes"] == "gauge"
    assert "cache.response.hits_total" in caplog.text


def test_odd_keys_are_sanitised() -> None:
    snap = {"cache": {"s3://bucket": {"p99.9": 0.5}, "9lives": 1}}
    samples, _ = parse(render(lambda: snap))
    assert samples == {
        ("llmprod_cache_s3___bucket", (("quantile", "0.999"),)): 0.5,
        ("llmprod_cache_9lives", ()): 1.0,
    }


def test_bad_snapshot_type() -> None:
    with pytest.raises(TypeError, match="mapping"):
        render(lambda: [1, 2])


def test_missing_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"llmprod\[metrics\]") as info:
        SnapshotCollector(dict)
    assert PIP_HINT in str(info.value)


def test_tenant_labels_are_capped_and_the_rest_is_other() -> None:
    snap = make_snapshot()
    snap["tenants"] = {
        f"t{i}": {"submitted": i, "completed": i, "cost": i / 4} for i in range(1, 6)
    }
    snap["tenants"]["t2"]["throttle"] = {"in_flight": 1, "rejected": {"budget": 2}}
    samples, _ = parse(render(lambda: snap, max_tenants=2))
    tenant_samples = {
        k: v for k, v in samples.items() if k[0].startswith("llmprod_tenants")
    }
    assert tenant_samples == {
        ("llmprod_tenants_submitted_total", (("tenant", "t5"),)): 5,
        ("llmprod_tenants_submitted_total", (("tenant", "t4"),)): 4,
        ("llmprod_tenants_submitted_total", (("tenant", "other"),)): 6,
        ("llmprod_tenants_completed_total", (("tenant", "t5"),)): 5,
        ("llmprod_tenants_completed_total", (("tenant", "t4"),)): 4,
        ("llmprod_tenants_completed_total", (("tenant", "other"),)): 6,
        ("llmprod_tenants_cost_total", (("tenant", "t5"),)): 1.25,
        ("llmprod_tenants_cost_total", (("tenant", "t4"),)): 1.0,
        ("llmprod_tenants_cost_total", (("tenant", "other"),)): 1.5,
        ("llmprod_tenants_throttle_in_flight", (("tenant", "other"),)): 1,
        (
            "llmprod_tenants_throttle_rejected_budget_total",
            (("tenant", "other"),),
        ): 2,
    }
    # everything outside the tenants section is as without a cap
    uncapped, _ = parse(render(lambda: snap, max_tenants=None))

    def outside(s: dict[Key, float]) -> dict[Key, float]:
        return {k: v for k, v in s.items() if not k[0].startswith("llmprod_tenants")}

    assert outside(samples) == outside(uncapped)
    assert len({k for k in uncapped if k[0] == "llmprod_tenants_submitted_total"}) == 5


def test_default_tenant_cap_is_one_hundred() -> None:
    tenants = {f"tenant-{i:03d}": {"submitted": 1000 - i} for i in range(150)}
    samples, _ = parse(render(lambda: {"tenants": tenants}))
    assert len(samples) == 101
    for i in range(100):
        assert (
            samples[
                ("llmprod_tenants_submitted_total", (("tenant", f"tenant-{i:03d}"),))
            ]
            == 1000 - i
        )
    # the other 50: 900 + 899 + ... + 851
    assert samples[("llmprod_tenants_submitted_total", (("tenant", "other"),))] == sum(
        range(851, 901)
    )


def test_bad_tenant_cap() -> None:
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="max_tenants"):
            SnapshotCollector(dict, max_tenants=bad)  # type: ignore[arg-type]
