"""Bounded per-tenant metrics: the recorder folds its least recently active idle
tenants into ``other`` past its cap, rows always add up to the totals, and the
Prometheus exposition names only the top tenants (the rest are ``other``)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from llmprod.ops.metrics import (
    DEFAULT_MAX_TENANTS,
    OTHER_TENANT,
    MetricsRecorder,
    fold_tenants,
)
from llmprod.sampling_params import SamplingParams

ZERO = {
    "submitted": 0, "completed": 0, "aborted": 0, "errored": 0,
    "prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0,
}  # fmt: skip


def row(**kw: float) -> dict[str, float]:
    return {**ZERO, **kw}


def serve(
    rec: MetricsRecorder,
    tenant: str,
    prompt: int = 3,
    completion: int = 2,
    cost: float = 0.5,
    outcome: str = "completed",
) -> None:
    """One request of ``tenant``, submitted and finished."""
    rec.on_submit(tenant)
    rec.on_finish(outcome, prompt, completion, 0, {}, tenant=tenant, cost=cost)


def assert_rows_add_up(rec: MetricsRecorder) -> None:
    snap = rec.snapshot()
    for key in ("submitted", "completed", "aborted", "errored"):
        assert sum(t[key] for t in snap.tenants.values()) == snap.requests[key]
    assert (
        sum(t["prompt_tokens"] for t in snap.tenants.values()) == snap.tokens["prompt"]
    )
    completion = sum(t["completion_tokens"] for t in snap.tenants.values())
    assert completion == snap.tokens["completion"]
    assert sum(t["cost"] for t in snap.tenants.values()) == pytest.approx(
        snap.cost["total"]
    )


# ------------------------------------------------------------------ recorder
def test_default_recorder_keeps_every_tenant_below_the_cap() -> None:
    rec = MetricsRecorder()
    assert rec.max_tenants == DEFAULT_MAX_TENANTS == 1_000
    serve(rec, "a")
    serve(rec, "b", prompt=4, completion=1, cost=0.25, outcome="aborted")
    assert rec.snapshot().tenants == {
        "a": row(submitted=1, completed=1, prompt_tokens=3, completion_tokens=2,
                 cost=0.5),
        "b": row(submitted=1, aborted=1, prompt_tokens=4, completion_tokens=1,
                 cost=0.25),
    }  # fmt: skip


def test_least_recently_active_idle_tenant_is_folded_into_other() -> None:
    rec = MetricsRecorder(max_tenants=2)
    serve(rec, "a")
    serve(rec, "b")
    serve(rec, "a")  # a is now more recent than b
    serve(rec, "c")  # over the cap: b goes
    tenants = rec.snapshot().tenants
    assert tenants == {
        "a": row(submitted=2, completed=2, prompt_tokens=6, completion_tokens=4,
                 cost=1.0),
        "c": row(submitted=1, completed=1, prompt_tokens=3, completion_tokens=2,
                 cost=0.5),
        OTHER_TENANT: row(submitted=1, completed=1, prompt_tokens=3,
                          completion_tokens=2, cost=0.5),
    }  # fmt: skip
    serve(rec, "d")  # then a
    serve(rec, "b")  # b comes back with a fresh row; c goes
    tenants = rec.snapshot().tenants
    assert sorted(tenants) == ["b", "d", OTHER_TENANT]
    assert tenants["b"]["submitted"] == 1
    assert tenants[OTHER_TENANT]["submitted"] == 4  # b, a, a, c
    assert_rows_add_up(rec)


def test_a_tenant_with_requests_in_flight_keeps_its_row() -> None:
    rec = MetricsRecorder(max_tenants=1)
    rec.on_submit("a")
    rec.on_submit("b")  # a is busy: both rows stay for now
    rec.on_submit("b")
    assert sorted(rec.snapshot().tenants) == ["a", "b"]
    rec.on_finish("completed", 5, 1, 0, {}, tenant="b")
    assert sorted(rec.snapshot().tenants) == ["a", "b"]  # b still has one
    rec.on_finish("errored", 7, 0, 0, {}, tenant="a")  # a idle, over the cap
    assert rec.snapshot().tenants == {
        "b": row(submitted=2, completed=1, prompt_tokens=5, completion_tokens=1),
        OTHER_TENANT: row(submitted=1, errored=1, prompt_tokens=7),
    }
    assert rec.snapshot().requests["in_flight"] == 1
    assert_rows_add_up(rec)


def test_random_tenant_names_stay_bounded_and_add_up() -> None:
    rng = random.Random(0)
    rec = MetricsRecorder(max_tenants=50)
    for i in range(5_000):
        serve(rec, f"t{rng.getrandbits(64):x}", prompt=i % 7, completion=i % 3)
    snap = rec.snapshot()
    assert len(snap.tenants) == 51
    assert snap.requests["submitted"] == snap.requests["completed"] == 5_000
    assert sum(t["submitted"] for t in snap.tenants.values()) == 5_000
    assert snap.tenants[OTHER_TENANT]["submitted"] == 4_950
    assert len(rec._idle) == 50  # the eviction queue is bounded too
    assert_rows_add_up(rec)


def test_lowering_the_cap_folds_now_and_bad_caps_are_refused() -> None:
    rec = MetricsRecorder()
    for t in ("a", "b", "c", "d"):
        serve(rec, t)
    rec.max_tenants = 1
    assert rec.snapshot().tenants == {
        "d": row(submitted=1, completed=1, prompt_tokens=3, completion_tokens=2,
                 cost=0.5),
        OTHER_TENANT: row(submitted=3, completed=3, prompt_tokens=9,
                          completion_tokens=6, cost=1.5),
    }  # fmt: skip
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="max_tenants"):
            MetricsRecorder(max_tenants=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="max_tenants"):
            rec.max_tenants = bad  # type: ignore[assignment]
    assert rec.max_tenants == 1


def test_a_tenant_called_other_shares_the_bucket() -> None:
    rec = MetricsRecorder(max_tenants=1)
    serve(rec, OTHER_TENANT)
    serve(rec, "a")
    serve(rec, "b")  # a goes into other; the tenant "other" is never evicted
    assert rec.snapshot().tenants == {
        OTHER_TENANT: row(submitted=2, completed=2, prompt_tokens=6,
                          completion_tokens=4, cost=1.0),
        "b": row(submitted=1, completed=1, prompt_tokens=3, completion_tokens=2,
                 cost=0.5),
    }  # fmt: skip


# ------------------------------------------------------------------ folding
def test_fold_keeps_the_most_requested_and_sums_the_rest() -> None:
    tenants: dict[str, Any] = {
        "small": {"submitted": 1, "cost": 0.5, "throttle": {"in_flight": 1}},
        "big": {"submitted": 9, "cost": 1.0},
        "tie-b": {"submitted": 3, "cost": 0.25},
        "tie-a": {"submitted": 3, "cost": 0.25, "throttle": {"budget_left": None}},
        OTHER_TENANT: {"submitted": 4, "cost": 2.0, "throttle": {"rejected": {"rpm": 2}}},
        "limits-only": {"throttle": {"in_flight": 2, "rejected": {"rpm": 1},
                                     "budget_left": 1.5, "blocked": True}},
    }  # fmt: skip
    assert fold_tenants(tenants, 2) == {
        "big": {"submitted": 9, "cost": 1.0},
        "tie-a": {"submitted": 3, "cost": 0.25, "throttle": {"budget_left": None}},
        OTHER_TENANT: {
            "submitted": 8,  # small 1 + tie-b 3 + other 4
            "cost": 2.75,
            "throttle": {"in_flight": 3, "rejected": {"rpm": 3},
                         "budget_left": 1.5, "blocked": True},
        },
    }  # fmt: skip
    assert list(fold_tenants(tenants, 2)) == ["big", "tie-a", OTHER_TENANT]
    assert fold_tenants(tenants, 0) == {
        OTHER_TENANT: {
            "submitted": 20,
            "cost": 4.0,
            "throttle": {"in_flight": 3, "rejected": {"rpm": 3},
                         "budget_left": 1.5, "blocked": True},
        }
    }  # fmt: skip
    # five named tenants fit a cap of five: nothing changes
    assert fold_tenants(tenants, 5) == tenants
    with pytest.raises(ValueError, match="keep"):
        fold_tenants(tenants, -1)


# ------------------------------------------------------------------ the engine
def test_engine_exposition_names_at_most_two_tenants(engine: Any) -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from llmprod.ops.prometheus import render

    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    sizes = {"mt-a": 3, "mt-b": 2, "mt-c": 1, "mt-d": 2, "mt-e": 1}
    seen: dict[str, list[Any]] = {}
    for tenant, n in sizes.items():
        prompts = [f"Tenant {tenant} asks question {i}." for i in range(n)]
        seen[tenant] = engine.generate(prompts, greedy, tenant=tenant)
    snap = engine.metrics().to_dict()
    # the recorder's rows are what the callers saw
    for tenant, comps in seen.items():
        r = snap["tenants"][tenant]
        assert r["submitted"] == r["completed"] == sizes[tenant]
        assert r["prompt_tokens"] == sum(c.usage.prompt_tokens for c in comps)
        assert r["completion_tokens"] == sum(c.usage.completion_tokens for c in comps)

    by_tenant: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(render(lambda: snap, max_tenants=2)):
        for s in fam.samples:
            if "tenant" in s.labels:
                by_tenant.setdefault(s.labels["tenant"], {})[s.name] = s.value
    # the two most requested tenants of the whole engine (other tests share it)
    named = [t for t in snap["tenants"] if t != OTHER_TENANT]
    top = sorted(named, key=lambda t: (-snap["tenants"][t]["submitted"], t))[:2]
    assert sorted(by_tenant) == sorted([*top, OTHER_TENANT])
    for tenant in top:
        assert (
            by_tenant[tenant]["llmprod_tenants_submitted_total"]
            == (snap["tenants"][tenant]["submitted"])
        )
    pairs = {
        "llmprod_tenants_submitted_total": snap["requests"]["submitted"],
        "llmprod_tenants_completed_total": snap["requests"]["completed"],
        "llmprod_tenants_prompt_tokens_total": snap["tokens"]["prompt"],
        "llmprod_tenants_completion_tokens_total": snap["tokens"]["completion"],
    }
    for name, total in pairs.items():
        assert sum(v[name] for v in by_tenant.values()) == total
    assert snap["requests"]["submitted"] >= sum(sizes.values())


def test_engine_recorder_cap_of_two(make_engine: Any) -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from llmprod.ops.prometheus import render

    eng = make_engine(kv_cache_memory="64MiB", dtype="float32", seed=0)
    eng.recorder.max_tenants = 2
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    sizes = {"t1": 1, "t2": 1, "t3": 1, "t4": 2, "t5": 3}
    seen: dict[str, list[Any]] = {}
    for tenant, n in sizes.items():  # one after another: t4 and t5 are the latest
        prompts = [f"Question {i} from {tenant}." for i in range(n)]
        seen[tenant] = eng.generate(prompts, greedy, tenant=tenant)
    m = eng.metrics()
    assert sorted(m.tenants) == ["other", "t4", "t5"]
    assert m.requests["submitted"] == m.requests["completed"] == 8

    def caller_row(tenants: list[str]) -> dict[str, float]:
        comps = [c for t in tenants for c in seen[t]]
        return {
            "submitted": len(comps),
            "completed": len(comps),
            "prompt_tokens": sum(c.usage.prompt_tokens for c in comps),
            "completion_tokens": sum(c.usage.completion_tokens for c in comps),
        }

    expected = {
        "t5": caller_row(["t5"]),
        "t4": caller_row(["t4"]),
        OTHER_TENANT: caller_row(["t1", "t2", "t3"]),
    }
    for tenant, want in expected.items():
        got = m.tenants[tenant]
        assert {k: got[k] for k in want} == want
        assert got["aborted"] == got["errored"] == 0

    samples: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(render(eng.metrics, max_tenants=2)):
        for s in fam.samples:
            if "tenant" in s.labels:
                samples[(s.name, s.labels["tenant"])] = s.value
    assert {t for _, t in samples} == {"t4", "t5", OTHER_TENANT}
    for tenant, want in expected.items():
        assert samples[("llmprod_tenants_submitted_total", tenant)] == want["submitted"]
        assert (
            samples[("llmprod_tenants_completion_tokens_total", tenant)]
            == want["completion_tokens"]
        )
    submitted = [v for (n, _), v in samples.items() if n.endswith("submitted_total")]
    assert sum(submitted) == m.requests["submitted"] == 8
