"""Bad input, faults and shutdown: errors name the field and the limit, and
nothing else is lost (RELIABILITY B1-B7, L5, F7-F9, N1-N2)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from llmprod import Engine, SamplingParams
from llmprod.errors import (
    EngineClosedError,
    InvalidConfigError,
    InvalidRequestError,
    RequestFailedError,
)
from tests.helpers import assert_pool_whole, wait_idle

GREEDY = SamplingParams(max_tokens=8, temperature=0)


def test_empty_prompt_and_messages(engine: Engine) -> None:
    with pytest.raises(ValueError, match="prompt") as info:
        engine.generate("", GREEDY)
    assert isinstance(info.value, InvalidRequestError) and info.value.field == "prompt"
    with pytest.raises(ValueError, match="prompt"):
        engine.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="messages"):
        engine.chat([], GREEDY)


def test_too_long_prompts_name_both_numbers(engine: Engine) -> None:
    limit = engine.max_model_len
    with pytest.raises(ValueError, match=rf"{limit + 1} tokens.*max_model_len={limit}"):
        engine.generate([[5] * (limit + 1)], GREEDY)
    with pytest.raises(
        ValueError, match=rf"\({limit - 2} tokens\).*\(8\).*max_model_len={limit}"
    ):
        engine.generate([[5] * (limit - 2)], GREEDY)


def test_out_of_vocabulary_token(engine: Engine) -> None:
    with pytest.raises(ValueError, match="out of vocabulary"):
        engine.generate([[1, 2, engine.vocab_size]], GREEDY)
    with pytest.raises(ValueError, match="not an int"):
        engine.generate([[1, "2"]], GREEDY)  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([{"content": "hi"}], r"messages\[0\] has no 'role'"),
        (
            [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}],
            r"messages\[1\]\['role'\]='wizard'",
        ),
        ([{"role": "user", "content": 5}], r"messages\[0\]\['content'\] must be a str"),
        ([{"role": "user"}], r"messages\[0\] has no 'content'"),
    ],
)
def test_malformed_chat_messages_name_index_and_key(
    engine: Engine, messages: Any, needle: str
) -> None:
    with pytest.raises(ValueError, match=needle):
        engine.chat(messages, GREEDY)


def test_unknown_model_option_and_values_list_accepted(tmp_path: Any) -> None:
    with pytest.raises(InvalidConfigError, match="smollm2-135m"):
        Engine.from_pretrained("no-such-model")
    with pytest.raises(InvalidConfigError, match="no such file"):
        Engine.from_pretrained(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match=r"quantization.*int8"):
        Engine.from_pretrained("smollm2-135m", quantization="int3")
    with pytest.raises(ValueError, match=r"accepted: .*kv_cache_memory"):
        Engine.from_pretrained("smollm2-135m", kv_cache_mem="1GiB")
    with pytest.raises(ValueError, match="kv_cache_memory"):
        Engine.from_pretrained("smollm2-135m", kv_cache_memory="lots")


def test_good_bad_good_batch(engine: Engine) -> None:
    good = ["The moon is", "Rivers flow to"]
    solo = [engine.generate(p, GREEDY)[0].token_ids for p in good]
    with pytest.raises(ValueError, match=r"prompts\[1\]: prompt is empty"):
        engine.generate([good[0], "", good[1]], GREEDY)
    outs = engine.generate([good[0], "", good[1]], GREEDY, return_exceptions=True)
    assert isinstance(outs[1], InvalidRequestError)
    assert [outs[0].token_ids, outs[2].token_ids] == solo


def test_pool_limits(make_engine: Any) -> None:
    # L5: 8 blocks x 16 = 128 token slots.
    eng = make_engine(num_kv_blocks=8, block_size=16)
    with pytest.raises(
        ValueError, match=r"200 tokens.*can never fit.*8 blocks x 16 = 128"
    ):
        eng.generate([[7] * 200], GREEDY)
    out = eng.generate(
        [[7] * 100], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    )[0]
    assert out.finish_reason == "length"
    assert (
        100 + len(out.token_ids) == 128 + 1
    )  # the pool's last slot, plus the sampled token
    wait_idle(eng)
    assert eng.scheduler.running == [] and not eng.scheduler.waiting


def test_a_transient_forward_fault_is_retried_request_by_request(
    make_engine: Any,
) -> None:
    # F7: the model raises once mid-batch (injected: no real fault makes a
    # forward pass fail on demand). The engine runs that step's requests one at
    # a time: none is lost, each gets exactly its solo tokens, blocks return.
    eng = make_engine(kv_cache_memory="128MiB")
    prompts = ["one", "two", "three"]
    params = SamplingParams(max_tokens=6, temperature=0)
    expected = [eng.generate(p, params)[0].token_ids for p in prompts]
    model = eng.runner.model
    original = model.forward
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected fault")
        return original(*args, **kwargs)

    model.forward = flaky
    try:
        outs = eng.generate(prompts, params)
    finally:
        model.forward = original
    assert calls["n"] > 3
    assert [o.token_ids for o in outs] == expected
    assert_pool_whole(eng)
    m = eng.metrics().requests
    assert m["errored"] == 0 and m["submitted"] == m["completed"]


def test_a_persistent_forward_fault_fails_only_its_request(make_engine: Any) -> None:
    # The forward pass raises whenever one poisoned request is in the batch
    # (injected): only that request fails, typed; the others get their solo
    # tokens.
    eng = make_engine(kv_cache_memory="128MiB")
    params = SamplingParams(max_tokens=6, temperature=0)
    poison = eng.tokenizer.encode("Zanzibar xylophone quartz")
    expected = {p: eng.generate(p, params)[0].token_ids for p in ["one", "two"]}
    model = eng.runner.model
    original = model.forward

    def poisoned(input_ids: Any, *args: Any, **kwargs: Any) -> Any:
        ids, n = input_ids.tolist(), len(poison)
        if any(ids[i : i + n] == poison for i in range(len(ids) - n + 1)):
            raise RuntimeError("injected fault")
        return original(input_ids, *args, **kwargs)

    model.forward = poisoned
    try:
        outs = eng.generate(["one", poison, "two"], params, return_exceptions=True)
    finally:
        model.forward = original
    assert isinstance(outs[1], RequestFailedError) and "injected fault" in str(outs[1])
    assert outs[0].token_ids == expected["one"]
    assert outs[2].token_ids == expected["two"]
    assert_pool_whole(eng)
    m = eng.metrics().requests
    assert m["errored"] == 1 and m["submitted"] == m["completed"] + m["errored"]


def test_abandoned_streams_abort_within_a_step(engine: Engine) -> None:
    # F8: break, aclose and task cancel each abort their request; the others in
    # the batch produce exactly their tokens.
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    bystander_expected = engine.generate("A calm bystander", GREEDY)[0].token_ids
    results: dict[str, Any] = {}

    def bystander() -> None:
        results["b"] = engine.generate("A calm bystander", GREEDY)[0].token_ids

    t = threading.Thread(target=bystander)
    t.start()
    before = engine.metrics().requests["aborted"]
    for d in engine.stream("Abandoned by break", long):
        if d.token_ids:
            break

    async def aclose_and_cancel() -> None:
        agen = engine.astream("Abandoned by aclose", long)
        await agen.__anext__()
        await agen.aclose()

        async def consume() -> None:
            async for _ in engine.astream("Abandoned by cancel", long):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(aclose_and_cancel())
    t.join(timeout=60)
    wait_idle(engine)
    assert engine.metrics().requests["aborted"] - before == 3
    assert results["b"] == bystander_expected


def test_abort_by_id(engine: Engine) -> None:
    stream = engine.stream(
        "Abort me", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    )
    first = next(stream)
    engine.abort(first.request_id)
    rest = list(stream)
    assert rest[-1].finish_reason == "abort"
    assert len(rest[-1].completion.token_ids) < 200  # type: ignore[union-attr]


def test_close_with_requests_in_flight_and_twice(make_engine: Any) -> None:
    # F9: in-flight requests end with "abort", no thread is left, close is idempotent.
    eng = make_engine(kv_cache_memory="128MiB")
    long = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
    box: dict[str, Any] = {}

    def run() -> None:
        box["outs"] = eng.generate(["first", "second"], long)

    t = threading.Thread(target=run)
    t.start()
    while eng.metrics().scheduler["steps"] < 3:
        time.sleep(0.01)
    eng.close()
    t.join(timeout=30)
    assert not t.is_alive()
    assert [o.finish_reason for o in box["outs"]] == ["abort", "abort"]
    assert not eng.core.thread.is_alive()
    eng.close()  # no-op
    assert eng.kv.pool.is_whole()
    with pytest.raises(EngineClosedError):
        eng.generate("late", GREEDY)
    assert not any(
        th.name == "llmprod-engine" and th.is_alive() and th is eng.core.thread
        for th in threading.enumerate()
    )


def test_two_engines_side_by_side_and_one_after_another(make_engine: Any) -> None:
    a = make_engine(kv_cache_memory="64MiB")
    b = make_engine(kv_cache_memory="64MiB")
    pa = a.generate("Side by side", GREEDY)[0].token_ids
    assert b.generate("Side by side", GREEDY)[0].token_ids == pa
    a.close()
    c = make_engine(kv_cache_memory="64MiB")
    assert c.generate("Side by side", GREEDY)[0].token_ids == pa
    assert a.model is None and a.runner.kv_caches == []
