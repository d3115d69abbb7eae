"""Scheduler: token budget, seats, chunking, decode grouping, preemption."""

from __future__ import annotations

from llmprod.config import SchedulerConfig
from llmprod.kv import KVCacheManager
from llmprod.sampling_params import SamplingParams
from llmprod.sched.request import Request
from llmprod.sched.scheduler import Scheduler, SchedulerOutput, group_by_length


def make_scheduler(num_blocks: int = 64, block_size: int = 4, **cfg: int) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
    return Scheduler(SchedulerConfig(**cfg), kv)


def make_request(n: int, rid: str) -> Request:
    return Request(rid, list(range(100, 100 + n)), SamplingParams(max_tokens=50))


def run_step(s: Scheduler, token: int = 7) -> SchedulerOutput:
    """Pretend the model ran: advance counts and append one token per sampler."""
    out = s.schedule()
    s.update(out)
    for e in out.scheduled:
        if e.samples:
            e.request.append_token(token)
    return out


def test_decodes_first_then_chunked_prefill_within_budget() -> None:
    s = make_scheduler(max_num_batched_tokens=16, max_num_seqs=4)
    a, b = make_request(10, "a"), make_request(30, "b")
    s.add(a)
    out = run_step(s)
    assert [
        (e.request.request_id, e.start, e.num_new_tokens) for e in out.scheduled
    ] == [("a", 0, 10)]
    s.add(b)
    out = run_step(s)
    # a decodes (1 token), b gets the other 15 of the budget: a chunk
    assert [
        (e.request.request_id, e.start, e.num_new_tokens) for e in out.scheduled
    ] == [("a", 10, 1), ("b", 0, 15)]
    assert out.num_decodes == 1 and out.num_batched_tokens == 16
    assert not out.scheduled[1].samples  # the chunk does not reach b's end
    out = run_step(s)
    assert [
        (e.request.request_id, e.start, e.num_new_tokens) for e in out.scheduled
    ] == [("a", 11, 1), ("b", 15, 15)]
    assert out.scheduled[1].samples


def test_max_num_seqs_caps_the_batch() -> None:
    s = make_scheduler(max_num_batched_tokens=64, max_num_seqs=2)
    for i in range(3):
        s.add(make_request(3, f"r{i}"))
    out = run_step(s)
    assert [e.request.request_id for e in out.scheduled] == ["r0", "r1"]
    assert len(s.waiting) == 1


def test_a_new_request_joins_while_others_decode() -> None:
    s = make_scheduler(max_num_batched_tokens=32, max_num_seqs=8)
    s.add(make_request(5, "old"))
    run_step(s)
    run_step(s)
    s.add(make_request(5, "new"))
    out = run_step(s)
    assert {e.request.request_id for e in out.scheduled} == {"old", "new"}


def test_preempts_newest_when_blocks_run_out_and_recomputes_it() -> None:
    # 4 blocks x 4 tokens. Two requests of 8 tokens take all 4 blocks; the first
    # decode needs a fifth block, so the newest request is preempted.
    s = make_scheduler(
        num_blocks=4, block_size=4, max_num_batched_tokens=32, max_num_seqs=8
    )
    a, b = make_request(8, "a"), make_request(8, "b")
    s.add(a)
    s.add(b)
    run_step(s)
    assert s.kv.pool.num_free_blocks == 0
    out = run_step(s)
    assert out.preempted == [b] and b.num_preemptions == 1
    assert [e.request.request_id for e in out.scheduled] == ["a"]
    assert s.waiting[0] is b and b.num_computed_tokens == 0 and b.block_ids == []


def test_alone_and_out_of_blocks_ends_with_length() -> None:
    s = make_scheduler(
        num_blocks=2, block_size=4, max_num_batched_tokens=32, max_num_seqs=8
    )
    a = make_request(8, "a")
    s.add(a)
    run_step(s)
    out = run_step(s)  # needs a third block; nobody to preempt
    assert out.finished == [a] and a.finish_reason == "length"
    assert s.kv.pool.is_whole()


def test_abort_frees_blocks_wherever_the_request_is() -> None:
    s = make_scheduler()
    a, b = make_request(9, "a"), make_request(9, "b")
    s.add(a)
    run_step(s)
    s.add(b)
    assert s.abort(a) and s.abort(b)
    assert a.finish_reason == b.finish_reason == "abort"
    assert not s.abort(a)
    assert s.kv.pool.is_whole() and not s.has_work()


def test_decode_groups_bound_padding() -> None:
    assert group_by_length([1, 2, 3]) == [(0, 3)]
    assert group_by_length([10, 20, 30, 500, 600]) == [(0, 3), (3, 5)]
    s = make_scheduler(num_blocks=512, block_size=4, max_num_batched_tokens=2048)
    for i, n in enumerate([10, 400, 12, 420]):
        s.add(make_request(n, f"r{i}"))
    run_step(s)
    out = run_step(s)
    assert [e.start + 1 for e in out.scheduled] == [
        11,
        13,
        401,
        421,
    ]  # sorted by length
    assert out.decode_groups == [(0, 2), (2, 4)]
    # padding: group 1 pads 11 -> 13 (2 keys), group 2 pads 401 -> 421 (20 keys)
    assert out.padded_elements == 22 and out.processed_elements == 26 + 842
