"""Tensor parallelism on CPU: the real model split over three processes (gloo,
one thread each) gives the tokens of one process; workers never outlive their
engine, and a dead worker fails requests instead of hanging them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from llmprod import Engine, SamplingParams
from llmprod.errors import (
    EngineClosedError,
    InvalidConfigError,
    TensorParallelError,
    UnsupportedModelError,
)
from llmprod.exec.parallel import shard_plan
from tests.helpers import assert_pool_whole, drain
from tests.prompts import CHAT_PROMPTS, PARAGRAPH, TEXT_PROMPTS, TOKEN_PROMPTS

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
MAX_NEW = 8
TIE_GAP = 1e-3  # as in the greedy-equality tests
TP = {"tensor_parallel_size": 3, "num_threads": 1, "dtype": "float32"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if os.path.exists(f"/proc/{p}") and _alive(p)]
        if not left:
            return []
        time.sleep(0.2)
    return left


@pytest.fixture(scope="module")
def tp_engine() -> Iterator[Engine]:
    eng = Engine.from_pretrained(MODEL, seed=0, **TP)
    yield eng
    pids = [p.pid for p in eng.tp.procs] if eng.tp is not None else []
    eng.close()
    assert not _wait_gone([p for p in pids if p is not None], 10.0)


@pytest.fixture(scope="module")
def prompt_ids(engine: Engine) -> list[list[int]]:
    ids = [engine.tokenizer.encode(p) for p in TEXT_PROMPTS]
    ids += [engine.render_chat(m) for m in CHAT_PROMPTS]
    return ids + [list(t) for t in TOKEN_PROMPTS]


def test_greedy_and_logprobs_equal_one_process(
    engine: Engine, tp_engine: Engine, prompt_ids: list[list[int]]
) -> None:
    assert len(prompt_ids) >= 24
    p = SamplingParams(max_tokens=MAX_NEW, temperature=0, logprobs=2)
    one, three = engine.generate(prompt_ids, p), tp_engine.generate(prompt_ids, p)
    ties = []
    for i, (a, b) in enumerate(zip(one, three)):
        for pos, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
            if x != y:  # allowed only where one process's top two nearly tie
                top = sorted(a.logprobs[pos].top.values(), reverse=True)  # type: ignore[index]
                gap = top[0] - top[1]
                assert gap < TIE_GAP, f"prompt {i}: token {pos} differs, gap {gap}"
                ties.append(i)
                break
        else:
            assert a.token_ids == b.token_ids
            for la, lb in zip(a.logprobs or [], b.logprobs or []):
                assert abs(la.logprob - lb.logprob) < 1e-4
    assert len(ties) <= 1, ties


def test_prompt_logprobs_within_1e4(engine: Engine, tp_engine: Engine) -> None:
    # Log-probabilities of every prompt token: the logits of every position.
    prompt = PARAGRAPH * 2 + "In one sentence, the main idea is"
    p = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    a = engine.generate(prompt, p)[0].prompt_logprobs
    b = tp_engine.generate(prompt, p)[0].prompt_logprobs
    assert a is not None and b is not None and len(a) == len(b) > 50
    worst = max(abs(x.logprob - y.logprob) for x, y in zip(a[1:], b[1:]))  # type: ignore[union-attr]
    assert worst < 1e-4, worst


def test_seeded_sampling_streaming_and_prefix_cache(
    engine: Engine, tp_engine: Engine
) -> None:
    sampled = SamplingParams(max_tokens=MAX_NEW, temperature=0.8, seed=11)
    prompts = TEXT_PROMPTS[:4]
    assert [c.token_ids for c in tp_engine.generate(prompts, sampled)] == [
        c.token_ids for c in engine.generate(prompts, sampled)
    ]
    greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0)
    long = PARAGRAPH * 4 + "The next layer will be"
    first = tp_engine.generate(long, greedy)[0]
    deltas, err = drain(tp_engine.stream(long, greedy))
    assert err is None
    assert [t for d in deltas for t in d.token_ids] == first.token_ids
    final = deltas[-1].completion
    assert final is not None and final.usage.cached_prompt_tokens > 0
    # Leaving a stream early aborts its request on every rank.
    stream = tp_engine.stream(long, SamplingParams(max_tokens=64, temperature=0))
    next(stream)
    stream.close()
    assert_pool_whole(tp_engine)


def test_preemption_and_per_rank_memory(
    make_engine: Callable[..., Engine], engine: Engine
) -> None:
    # 24 blocks of 8 tokens for 6 requests of ~40 tokens: some are preempted
    # and recomputed, on every rank, and still give one process's tokens.
    eng = make_engine(MODEL, num_kv_blocks=24, block_size=8, **TP)
    prompts = TEXT_PROMPTS[:6]
    p = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outs = eng.generate(prompts, p)
    assert eng.metrics().scheduler["preemptions"] > 0
    assert [c.token_ids for c in outs] == [
        c.token_ids for c in engine.generate(prompts, p)
    ]
    tp = eng.metrics().engine["tensor_parallel"]
    one = sum(engine.metrics().engine["weights_bytes"].values())
    assert tp["size"] == 3 and tp["weight_bytes_per_rank"] < 0.7 * one


def test_worker_killed_mid_request_fails_it_and_stops_the_engine(
    make_engine: Callable[..., Engine],
) -> None:
    eng = make_engine(MODEL, **TP)
    assert eng.tp is not None
    pids = [p.pid for p in eng.tp.procs]
    long = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)
    stream = eng.stream("Once upon a time", long)
    next(stream)
    t0 = time.monotonic()
    os.kill(pids[0], signal.SIGKILL)  # type: ignore[arg-type]
    _deltas, err = drain(stream)
    assert isinstance(err, TensorParallelError), err
    assert "exited with code -9" in str(err)
    assert time.monotonic() - t0 < 30
    with pytest.raises(EngineClosedError, match="exited with code"):
        eng.generate("hello", SamplingParams(max_tokens=2))
    eng.close()
    eng.close()
    assert not _wait_gone([p for p in pids if p is not None], 10.0)


def test_workers_exit_when_the_parent_is_killed(tmp_path: Any) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, time
        from llmprod import Engine
        if __name__ == "__main__":
            eng = Engine.from_pretrained({MODEL!r}, tensor_parallel_size=3,
                                         num_threads=1)
            print(" ".join(str(p.pid) for p in eng.tp.procs), flush=True)
            time.sleep(600)
    """)
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        parent.kill()
        parent.wait(10)
        assert not _wait_gone(pids, 10.0), "workers outlived their killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_sizes_and_paths_it_cannot_split(
    make_engine: Callable[..., Engine], tmp_path: Any
) -> None:
    with pytest.raises(InvalidConfigError, match=r"9 query heads, 3 KV heads") as e:
        make_engine(MODEL, tensor_parallel_size=2)
    assert e.value.field == "tensor_parallel_size" and "[1, 3]" in str(e.value)
    with pytest.raises(InvalidConfigError) as e:
        make_engine(MODEL, tensor_parallel_size=3, quantization="int8")
    assert e.value.field == "quantization"
    with pytest.raises(InvalidConfigError, match="generic") as e:
        make_engine(MODEL, tensor_parallel_size=3, model_impl="generic")
    assert e.value.field == "tensor_parallel_size"


def test_fewer_kv_heads_than_ranks_are_replicated() -> None:
    # Gemma-like: 4 query heads and 1 KV head over 2 ranks: each rank's two
    # query heads read the one KV head, which both ranks hold.
    cfg = SimpleNamespace(num_attention_heads=4, num_key_value_heads=1,
                          intermediate_size=2048)  # fmt: skip
    plans = [shard_plan(cfg, 2, r) for r in range(2)]
    assert [p.q_heads for p in plans] == [(0, 2), (2, 4)]
    assert [p.kv_heads for p in plans] == [(0, 1), (0, 1)]
    cfg = SimpleNamespace(num_attention_heads=8, num_key_value_heads=2,
                          intermediate_size=2048)  # fmt: skip
    assert [shard_plan(cfg, 4, r).kv_heads for r in range(4)] == [
        (0, 1), (0, 1), (1, 2), (1, 2)
    ]  # fmt: skip


def test_lora_refused_with_tensor_parallelism(tp_engine: Engine, tmp_path: Any) -> None:
    with pytest.raises(UnsupportedModelError, match="tensor_parallel_size") as e:
        tp_engine.load_adapter("x", tmp_path)
    assert e.value.field == "tensor_parallel_size"
