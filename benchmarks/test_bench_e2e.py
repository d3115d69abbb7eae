"""pytest-benchmark suite: the end-to-end workload at a small size.

Eight chat requests from the shared workload generator (user messages of 20-120
tokens, 8-16 new tokens, EOS ignored), timed through llmprod and through
transformers ``generate`` one request at a time, in one process on two threads.
llmprod runs with prefix caching off so that every round does the same work
(with it on, later rounds would reuse the first round's KV).

Not part of the unit-test run (``--benchmark-disable`` in pyproject runs each
function once without timing). Timed runs, saving and comparing a baseline::

    nox -s bench
    python -m pytest benchmarks/test_bench_e2e.py --benchmark-enable \\
        --benchmark-storage=file://benchmarks/.baseline --benchmark-save=cpu-2threads
    python -m pytest benchmarks/test_bench_e2e.py --benchmark-enable \\
        --benchmark-storage=file://benchmarks/.baseline \\
        --benchmark-compare=0001 --benchmark-compare-fail=median:25%
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytest_benchmark")

from benchmarks.e2e.baselines import hf_generate_sequential, load_hf_model  # noqa: E402
from benchmarks.workload import (  # noqa: E402
    DEFAULT_MODEL,
    Workload,
    WorkloadSpec,
    build_workload,
    load_tokenizer,
)

THREADS = 2
SPEC = WorkloadSpec(
    num_requests=8, seed=0, prompt_tokens=(20, 120), output_tokens=(8, 16)
)


@pytest.fixture(scope="module")
def workload() -> Workload:
    return build_workload(SPEC, load_tokenizer(DEFAULT_MODEL))


@pytest.fixture(scope="module")
def threads() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield THREADS
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine(threads: int) -> Any:
    from llmprod import Engine

    eng = Engine.from_pretrained(
        DEFAULT_MODEL, num_threads=threads, enable_prefix_caching=False
    )
    yield eng
    eng.close()


def _extra(benchmark: Any, wl: Workload) -> None:
    benchmark.extra_info["requests"] = len(wl.requests)
    benchmark.extra_info["prompt_tokens"] = wl.prompt_tokens
    benchmark.extra_info["generated_tokens"] = wl.output_tokens
    benchmark.extra_info["threads"] = THREADS


def test_llmprod_generate(benchmark: Any, engine: Any, workload: Workload) -> None:
    from llmprod import SamplingParams

    prompts = [r.prompt_token_ids for r in workload.requests]
    params = [
        SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True)
        for r in workload.requests
    ]
    comps = benchmark.pedantic(
        engine.generate, args=(prompts, params), rounds=5, warmup_rounds=1
    )
    assert [c.usage.completion_tokens for c in comps] == [
        r.max_tokens for r in workload.requests
    ]
    _extra(benchmark, workload)


def test_hf_generate_one_at_a_time(
    benchmark: Any, threads: int, workload: Workload
) -> None:
    from llmprod.models.registry import resolve_model

    model = load_hf_model(str(resolve_model(DEFAULT_MODEL)))
    _wall, records = benchmark.pedantic(
        hf_generate_sequential,
        args=(model, workload.requests),
        rounds=3,
        warmup_rounds=1,
    )
    assert [r.generated_tokens for r in records] == [
        r.max_tokens for r in workload.requests
    ]
    _extra(benchmark, workload)
