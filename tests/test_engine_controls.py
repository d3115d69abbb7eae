"""Cost, guards, signals, per-tenant limits and fairness inside the Engine, on
the real model."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np
import pytest

from llmprod import SamplingParams
from llmprod.errors import GuardBlockedError, RateLimited
from llmprod.ops.guards import BlockListGuard, PIIGuard
from llmprod.ops.limits import TenantLimits
from llmprod.ops.pricing import PriceTable
from llmprod.ops.signals import UNGROUNDED_BELOW, split_sentences
from llmprod.sampling_params import MAX_LOGPROBS

PRICES = PriceTable(prompt_per_1k=0.5, completion_per_1k=1.5)
GREEDY = SamplingParams(max_tokens=8, temperature=0)
FULL_LENGTH = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def test_cost_on_every_completion_equal_in_stream_and_generate(
    make_engine: Any,
) -> None:
    eng = make_engine(kv_cache_memory="64MiB", prices=PRICES)
    out = eng.generate("Pricing check", GREEDY)[0]
    expected = PRICES.cost(out.usage.prompt_tokens, out.usage.completion_tokens)
    assert out.usage.cost == pytest.approx(expected) and out.usage.cost > 0
    final = list(eng.stream("Pricing check", GREEDY))[-1].completion
    assert final is not None and final.usage.cost == pytest.approx(out.usage.cost)
    m = eng.metrics()
    assert m.cost["total"] == pytest.approx(2 * out.usage.cost)
    assert m.tenants["default"]["cost"] == pytest.approx(2 * out.usage.cost)


def test_pii_is_redacted_in_prompts_and_outputs(make_engine: Any) -> None:
    eng = make_engine(kv_cache_memory="64MiB", guards=[PIIGuard(action="redact")])
    prompt = "Repeat exactly: my email is jane.doe@example.com and my card 4111 1111 1111 1111."
    out = eng.generate(prompt, SamplingParams(max_tokens=30, temperature=0))[0]
    seen = eng.tokenizer.decode(out.prompt_token_ids)
    assert "jane.doe@example.com" not in seen and "[EMAIL]" in seen and "[CARD]" in seen
    assert out.flags["guards"]["prompt"]
    assert "@example.com" not in out.text
    # output side: a guard that redacts what the model says
    eng2 = make_engine(kv_cache_memory="64MiB", guards=[
        BlockListGuard(["Paris"], action="redact")])  # fmt: skip
    ans = eng2.generate(
        "The capital of France is", SamplingParams(max_tokens=8, temperature=0)
    )[0]
    assert "Paris" not in ans.text and "[BLOCKED]" in ans.text
    assert ans.flags["guards"]["output"]


def test_blocked_prompt_uses_no_model_time(make_engine: Any) -> None:
    eng = make_engine(kv_cache_memory="64MiB", guards=[BlockListGuard(["forbidden"])])
    steps = eng.metrics().scheduler["steps"]
    with pytest.raises(GuardBlockedError) as info:
        eng.generate("this is forbidden text", GREEDY)
    assert "forbidden" not in str(info.value)  # findings never echo the text
    assert eng.metrics().scheduler["steps"] == steps
    fine = eng.generate("this is fine", FULL_LENGTH)[0]
    assert fine.finish_reason == "length" and len(fine.token_ids) == 8


def test_confidence_signals_from_logprobs(engine: Any) -> None:
    out = engine.generate("The capital of France is", SamplingParams(
        max_tokens=6, temperature=0, logprobs=MAX_LOGPROBS, ignore_eos=True))[0]  # fmt: skip
    lps = out.logprobs
    assert len(lps) == 6
    conf = out.flags["confidence"]
    assert conf["num_tokens"] == 6
    assert conf["mean_logprob"] == pytest.approx(
        float(np.mean([t.logprob for t in lps]))
    )
    assert conf["min_logprob"] == min(t.logprob for t in lps)
    assert conf["perplexity"] == pytest.approx(math.exp(-conf["mean_logprob"]))
    # The engine has each position's full-vocabulary entropy: not a lower bound.
    assert conf["entropy_is_lower_bound"] is False
    assert conf["max_entropy"] == max(t.entropy for t in lps)
    vocab = engine.hf_config.vocab_size
    for t in lps:
        # Greedy: the chosen token is the best of the top alternatives.
        assert t.token_id == max(t.top, key=t.top.__getitem__)
        assert t.logprob == t.top[t.token_id]
        # From the top 20 by hand: H = -sum p ln p over them, plus what the rest
        # (mass r over vocab - 20 tokens) adds: between -r ln r (all of it on one
        # token) and -r ln r + r ln(vocab - 20) (spread evenly).
        probs = [math.exp(v) for v in t.top.values()]
        rest = max(1.0 - sum(probs), 0.0)
        top_part = -sum(p * math.log(p) for p in probs if p > 0)
        lower = top_part - (rest * math.log(rest) if rest > 0 else 0.0)
        upper = lower + rest * math.log(vocab - len(probs))
        assert lower - 1e-4 <= t.entropy <= upper + 1e-4, (lower, t.entropy, upper)
    context = "Paris is the capital of France."
    grounded = engine.generate("Paris is the capital of France. Repeat: Paris is",
                               GREEDY, grounding_context=context)[0]  # fmt: skip
    g = grounded.flags["grounding"]
    assert g["num_sentences"] == len(split_sentences(grounded.text))
    assert len(g["scores"]) == g["num_sentences"]
    assert g["threshold"] == UNGROUNDED_BELOW


def test_rate_limit_raised_at_the_right_request_and_released(make_engine: Any) -> None:
    eng = make_engine(kv_cache_memory="64MiB",
                      limits={"metered": TenantLimits(requests_per_second=2.0,
                                                      max_request_burst=2)})  # fmt: skip
    p = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    eng.generate("a", p, tenant="metered")
    eng.generate("b", p, tenant="metered")
    with pytest.raises(RateLimited) as info:
        eng.generate("c", p, tenant="metered")  # the third within a second
    assert 0 < info.value.retry_after <= 1.0 and info.value.tenant == "metered"
    # others unaffected
    assert eng.generate("free", p, tenant="other")[0].finish_reason == "length"
    time.sleep(info.value.retry_after + 0.05)
    # released
    assert eng.generate("c", p, tenant="metered")[0].finish_reason == "length"
    # or wait for room instead of raising: three more at once, none refused
    t0 = time.monotonic()
    outs = eng.generate(["d", "e", "f"], p, tenant="metered", wait_timeout=5.0)
    assert [o.finish_reason for o in outs] == ["length"] * 3
    assert time.monotonic() - t0 >= 0.4  # it had to wait for the bucket
    assert eng.metrics().tenants["metered"]["throttle"]


def _latencies(eng: Any, flood_tenant: str, n_flood: int) -> list[float]:
    """e2e latency of 3 small-tenant requests sent just after a flood."""
    flood = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    small = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    threads = []
    if n_flood:
        t = threading.Thread(target=eng.generate, args=(
            [f"flood {i}" for i in range(n_flood)], flood), kwargs={"tenant": "big"})  # fmt: skip
        t.start()
        threads.append(t)
        time.sleep(0.3)
    outs = eng.generate([f"small {i}" for i in range(3)], small, tenant=flood_tenant)
    for t in threads:
        t.join(timeout=300)
    return [o.timings.e2e_s for o in outs]


@pytest.mark.slow
def test_two_tenants_at_ten_to_one_both_progress(make_engine: Any) -> None:
    eng = make_engine(kv_cache_memory="64MiB", max_num_seqs=4)
    alone = max(_latencies(eng, "small", 0))
    loaded = max(_latencies(eng, "small", 30))  # 30 : 3
    assert loaded <= 2.0 * alone, (loaded, alone)
    # the control: the same requests queued as the flooding tenant wait behind it
    unfair = max(_latencies(eng, "big", 30))
    assert unfair > loaded
