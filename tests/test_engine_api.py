"""The public API on the real model: streaming, chat, async, threads, seeds,
stops, logprobs, prefix caching and the counters."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from llmprod import Completion, Engine, SamplingParams
from llmprod.ops.metrics import process_rss_bytes
from tests.helpers import wait_idle

GREEDY = SamplingParams(max_tokens=16, temperature=0)


def test_generate_returns_one_completion_per_prompt_in_order(engine: Engine) -> None:
    prompts = ["The sky is", "Two plus two is", "My favourite food is"]
    outs = engine.generate(prompts, GREEDY)
    solo = [engine.generate(p, GREEDY)[0] for p in prompts]
    assert [o.token_ids for o in outs] == [s.token_ids for s in solo]
    for o in outs:
        assert isinstance(o, Completion) and o.request_id
        assert o.usage.prompt_tokens == len(o.prompt_token_ids)
        assert o.usage.completion_tokens == len(o.token_ids)
        assert o.timings.e2e_s is not None and o.timings.ttft_s is not None
        assert o.timings.ttft_s <= o.timings.e2e_s
        assert o.text == engine.tokenizer.decode(o.token_ids, skip_special_tokens=True)


def test_mixed_lengths_in_order_each_equal_to_solo(engine: Engine) -> None:
    # L2: 32 prompts of mixed lengths and max_tokens, in input order.
    prompts = [("word " * (1 + 7 * i)).strip() for i in range(32)]
    params = [
        SamplingParams(max_tokens=2 + i % 7, temperature=0, ignore_eos=True)
        for i in range(32)
    ]
    outs = engine.generate(prompts, params)
    for i, o in enumerate(outs):
        assert len(o.token_ids) == 2 + i % 7 and o.finish_reason == "length"
    for i in (0, 13, 31):
        assert outs[i].token_ids == engine.generate(prompts[i], params[i])[0].token_ids


def test_stream_concatenates_to_generate(engine: Engine) -> None:
    prompt = "Write a sentence about the ocean."
    full = engine.generate(prompt, GREEDY)[0]
    deltas = list(engine.stream(prompt, GREEDY))
    finals = [d for d in deltas if d.finish_reason is not None]
    assert len(finals) == 1 and deltas[-1] is finals[0]
    assert "".join(d.text for d in deltas) == full.text
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert finals[0].completion is not None and finals[0].completion.text == full.text


def test_stop_string_not_streamed_and_reported(engine: Engine) -> None:
    prompt = "Count: one, two, three, four, five, six,"
    free = engine.generate(prompt, SamplingParams(max_tokens=24, temperature=0))[0].text
    # choose a stop string that really occurs in the free-running output
    stop = free.strip().split(",")[1].strip()[:5]
    assert stop and stop in free
    params = SamplingParams(max_tokens=24, temperature=0, stop=[stop])
    deltas = list(engine.stream(prompt, params))
    text = "".join(d.text for d in deltas)
    assert stop not in text
    assert text == free[: free.index(stop)]
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].completion.stop_reason == stop  # type: ignore[union-attr]
    with_stop = engine.generate(
        prompt,
        SamplingParams(
            max_tokens=24, temperature=0, stop=[stop], include_stop_str_in_output=True
        ),
    )[0]
    assert with_stop.text == free[: free.index(stop) + len(stop)]


def test_stop_token_ids_eos_and_ignore_eos(engine: Engine) -> None:
    base = engine.generate(
        "Hello", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    )[0]
    # the first token (after the first) that did not occur before it
    k = next(
        i for i, t in enumerate(base.token_ids) if i and t not in base.token_ids[:i]
    )
    tok = base.token_ids[k]
    out = engine.generate(
        "Hello", SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[tok])
    )[0]
    assert out.token_ids == base.token_ids[: k + 1]
    assert out.finish_reason == "stop" and out.stop_reason == tok
    chat = engine.chat(
        [{"role": "user", "content": "Say hi."}],
        SamplingParams(max_tokens=64, temperature=0),
    )
    assert isinstance(chat, Completion)
    assert chat.finish_reason == "stop" and chat.token_ids[-1] in engine.eos_token_ids
    forced = engine.chat(
        [{"role": "user", "content": "Say hi."}],
        SamplingParams(
            max_tokens=len(chat.token_ids) + 5, temperature=0, ignore_eos=True
        ),
    )
    assert forced.finish_reason == "length"  # type: ignore[union-attr]
    assert len(forced.token_ids) == len(chat.token_ids) + 5  # type: ignore[union-attr]


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine: Engine) -> None:
    p = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = engine.generate("Tell me a story about a dragon.", p)[0]
    others = [SamplingParams(max_tokens=30, temperature=1.0) for _ in range(5)]
    batch = engine.generate(
        [
            "Once",
            "Tell me a story about a dragon.",
            "The weather",
            "x = ",
            "In Paris",
            "Why",
        ],
        [others[0], p, *others[1:]],
    )
    assert batch[1].token_ids == alone.token_ids
    other_seed = engine.generate(
        "Tell me a story about a dragon.",
        SamplingParams(max_tokens=20, temperature=0.9, seed=99),
    )[0]
    assert other_seed.token_ids != alone.token_ids


def test_repetition_penalty_changes_greedy_output(engine: Engine) -> None:
    prompt = "the the the the the the the the"
    plain = engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0))[0]
    penal = engine.generate(
        prompt, SamplingParams(max_tokens=8, temperature=0, repetition_penalty=2.0)
    )[0]

    def repeats(o: Completion) -> int:
        seen = o.prompt_token_ids
        return sum(t in seen or t in o.token_ids[:i] for i, t in enumerate(o.token_ids))

    assert repeats(plain) > repeats(penal)


def test_logprobs_and_prompt_logprobs_match_transformers(
    engine: Engine, hf_model: Any
) -> None:
    prompt = "The capital of France is Paris. The capital of Italy is"
    out = engine.generate(
        prompt,
        SamplingParams(max_tokens=4, temperature=0, logprobs=3, prompt_logprobs=2),
    )[0]
    ids = out.prompt_token_ids
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids + out.token_ids])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(ids)
    for j in range(1, len(ids)):
        entry = out.prompt_logprobs[j]
        assert entry is not None and entry.token_id == ids[j] and len(entry.top) == 2
        assert abs(entry.logprob - float(lp[j - 1, ids[j]])) < 1e-3
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    for k, entry in enumerate(out.logprobs):
        pos = len(ids) - 1 + k
        assert entry.token_id == out.token_ids[k]
        assert abs(entry.logprob - float(lp[pos, entry.token_id])) < 1e-3
        assert max(entry.top.values()) == pytest.approx(
            entry.logprob, abs=1e-6
        )  # greedy


def test_prompt_logprobs_from_a_start_reuse_the_cached_context(
    engine: Engine,
) -> None:
    """Scoring several continuations of one context (lm-eval's multiple choice):
    with ``prompt_logprobs_start`` the context comes from the prefix cache and
    the continuation's log-probabilities are those of a full computation."""
    ctx = engine.tokenizer.encode("Question: which of these is a colour? " * 6)
    full = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
    for choice in (" red", " table", " seven"):
        ids = ctx + engine.tokenizer.encode("Answer:" + choice)
        ref = engine.generate(ids, full)[0]
        p = SamplingParams(
            max_tokens=1,
            temperature=0,
            prompt_logprobs=1,
            prompt_logprobs_start=len(ctx),
        )
        got = engine.generate(ids, p)[0]
        assert got.usage.cached_prompt_tokens >= 8 * (len(ctx) // 8 - 1)
        assert got.prompt_logprobs is not None and ref.prompt_logprobs is not None
        assert len(got.prompt_logprobs) == len(ids)
        assert all(e is None for e in got.prompt_logprobs[: len(ctx)])
        for a, b in zip(
            got.prompt_logprobs[len(ctx) :], ref.prompt_logprobs[len(ctx) :]
        ):
            assert a is not None and b is not None and a.token_id == b.token_id
            assert abs(a.logprob - b.logprob) < 1e-4
    with pytest.raises(ValueError, match="prompt_logprobs_start"):
        SamplingParams(prompt_logprobs=1, prompt_logprobs_start=-1)


def test_logprob_token_ids_score_one_token_continuations_in_one_request(
    engine: Engine,
) -> None:
    """Several one-token continuations of one context scored by one request
    (lm-eval's multiple choice): each equals that token's prompt log-probability
    after the context, whatever its rank; bad ids are refused naming the field,
    and the other requests of the batch still finish."""
    ctx = engine.tokenizer.encode("Question: which of these is a colour?\nAnswer:")
    choices = [engine.tokenizer.encode(c)[0] for c in (" red", " table", " seven")]
    p = SamplingParams(
        max_tokens=1, temperature=0, logprobs=1, logprob_token_ids=choices
    )
    lp = engine.generate(ctx, p)[0].logprobs
    assert lp is not None and sorted(lp[0].scored) == sorted(choices)
    full = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
    for t in choices:
        ref = engine.generate([*ctx, t], full)[0].prompt_logprobs
        assert ref is not None and ref[-1] is not None
        assert abs(lp[0].scored[t] - ref[-1].logprob) < 1e-4
    with pytest.raises(ValueError, match="logprob_token_ids") as err:
        SamplingParams(logprob_token_ids=[5])  # without logprobs
    assert err.value.field == "logprob_token_ids"  # type: ignore[attr-defined]
    bad = SamplingParams(max_tokens=4, logprobs=0, logprob_token_ids=[10**9])
    with pytest.raises(ValueError, match="out of vocabulary") as err:
        engine.generate([ctx, ctx], [GREEDY, bad])
    assert err.value.field == "logprob_token_ids"  # type: ignore[attr-defined]
    assert engine.generate(ctx, GREEDY)[0].token_ids


def test_prefix_caching_reuses_blocks_and_keeps_output(
    engine: Engine, make_engine: Any
) -> None:
    shared = "You are a careful assistant. " * 20
    a = engine.generate(shared + "First question: what is rain?", GREEDY)[0]
    b = engine.generate(shared + "Second question: what is snow?", GREEDY)[0]
    assert (
        a.usage.cached_prompt_tokens == 0
        or a.usage.cached_prompt_tokens < b.usage.cached_prompt_tokens
    )
    assert b.usage.cached_prompt_tokens >= 16 * (
        len(engine.tokenizer.encode(shared)) // 16 - 1
    )
    off = make_engine(enable_prefix_caching=False, kv_cache_memory="256MiB")
    b_off = off.generate(shared + "Second question: what is snow?", GREEDY)[0]
    assert b_off.usage.cached_prompt_tokens == 0
    assert b_off.token_ids == b.token_ids
    assert engine.metrics().kv_cache["prefix_hit_rate"] > 0


def test_eight_threads_get_their_own_answers(engine: Engine) -> None:
    prompts = [f"Fact number {i}: the number {i} squared is" for i in range(8)]
    expected = {p: engine.generate(p, GREEDY)[0].token_ids for p in prompts}
    got: dict[str, list[int]] = {}
    barrier = threading.Barrier(8)

    def worker(p: str) -> None:
        barrier.wait()
        got[p] = engine.generate(p, GREEDY)[0].token_ids

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == expected


def test_identical_concurrent_requests_identical_outputs(engine: Engine) -> None:
    # L1: eight identical greedy requests at once give eight identical texts.
    outs = engine.generate(["Describe a cat."] * 8, GREEDY)
    assert len({tuple(o.token_ids) for o in outs}) == 1


def test_threads_and_async_streams_together(engine: Engine) -> None:
    # L6: K threads calling generate plus M asyncio astream consumers at once.
    prompts = [f"Item {i} on the list is" for i in range(6)]
    expected = {p: engine.generate(p, GREEDY)[0].text for p in prompts}
    results: dict[str, str] = {}

    def thread_worker(p: str) -> None:
        results[p] = engine.generate(p, GREEDY)[0].text

    async def consume(p: str) -> None:
        parts = [d.text async for d in engine.astream(p, GREEDY)]
        results[p] = "".join(parts)

    async def main() -> None:
        await asyncio.gather(*(consume(p) for p in prompts[3:]))

    threads = [threading.Thread(target=thread_worker, args=(p,)) for p in prompts[:3]]
    for t in threads:
        t.start()
    asyncio.run(asyncio.wait_for(main(), timeout=120))
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive()
    assert results == expected


def test_agenerate_matches_generate(engine: Engine) -> None:
    prompts = ["Alpha", "Beta gamma"]
    sync = engine.generate(prompts, GREEDY)
    outs = asyncio.run(engine.agenerate(prompts, GREEDY))
    assert [o.token_ids for o in outs] == [o.token_ids for o in sync]


def test_chat_one_conversation_or_many(engine: Engine) -> None:
    conv = [{"role": "user", "content": "Name a colour."}]
    one = engine.chat(conv, GREEDY)
    many = engine.chat([conv, [{"role": "user", "content": "Name a fruit."}]], GREEDY)
    assert isinstance(one, Completion) and isinstance(many, list) and len(many) == 2
    assert many[0].token_ids == one.token_ids
    assert one.prompt_token_ids == engine.render_chat(conv)


def test_request_joins_while_others_decode_within_step_limits(make_engine: Any) -> None:
    # L3: the late request starts before the early one finishes; every step stays
    # within the token budget and seat limit.
    eng = make_engine(
        max_num_batched_tokens=64, max_num_seqs=4, kv_cache_memory="128MiB"
    )
    seen: list[tuple[int, int]] = []
    original = eng.scheduler.schedule

    def observe() -> Any:
        out = original()
        seen.append((out.num_batched_tokens, len(out.scheduled)))
        return out

    eng.scheduler.schedule = observe
    long = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    stream = eng.stream("A long story begins: " * 10, long)
    next(stream)  # the long request is decoding
    late = eng.generate("Quick question:", SamplingParams(max_tokens=3, temperature=0))[
        0
    ]
    rest = list(stream)
    assert rest[-1].finish_reason == "length"
    long_done = rest[-1].completion
    assert long_done is not None and long_done.timings.e2e_s is not None
    assert late.finish_reason is not None
    # the late one finished while the long one was still running
    assert len(rest) > 3
    assert all(n <= 64 and s <= 4 for n, s in seen)


def test_counters_agree(engine: Engine) -> None:
    wait_idle(engine)
    before = engine.metrics().requests
    engine.generate(["a", "b"], GREEDY)
    s = engine.stream(
        "c", SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    )
    next(s)
    s.close()  # aborts
    wait_idle(engine)
    m = engine.metrics().requests
    assert m["submitted"] - before["submitted"] == 3
    assert m["completed"] - before["completed"] == 2
    assert m["aborted"] - before["aborted"] == 1
    assert (
        m["submitted"] == m["completed"] + m["aborted"] + m["errored"] + m["in_flight"]
    )
    d = engine.metrics().to_dict()
    assert d["latency_s"]["e2e"]["p50"] is not None and d["tokens"]["completion"] > 0


def test_model_path_opens_with_transformers(engine: Engine) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(engine.model_path)
    assert cfg.model_type == "llama" and isinstance(engine.model, torch.nn.Module)


@pytest.mark.skipif(
    not Path("/proc/self/statm").exists(),
    reason="needs the current RSS from /proc (elsewhere only the peak is known)",
)
def test_cpu_kv_budget_becomes_resident_only_as_blocks_are_used(
    make_engine: Any,
) -> None:
    # A 2 GiB budget must not cost 2 GiB of RAM at start-up: the blocks' memory
    # comes in as they are first used, and kv_cache.touched_bytes says how much.
    before = process_rss_bytes()
    eng = make_engine(kv_cache_memory="2GiB", dtype="float32")
    kv = eng.metrics().kv_cache
    assert kv["budget_bytes"] >= 2**31 - kv["budget_bytes"] // kv["num_blocks"]
    assert kv["touched_bytes"] == 0
    weights = sum(p.numel() * p.element_size() for p in eng.model.parameters())
    assert process_rss_bytes() - before < weights + 2**30  # not the 2 GiB budget
    eng.generate(["Tell me about paged attention."], GREEDY)
    kv = eng.metrics().kv_cache
    per_block = kv["budget_bytes"] // kv["num_blocks"]
    assert 0 < kv["touched_bytes"] <= 8 * per_block
