"""FairQueue: the scheduler's waiting queue, fair turns across tenants."""

from __future__ import annotations

import pytest

from llmprod.config import SchedulerConfig
from llmprod.kv import KVCacheManager
from llmprod.sampling_params import SamplingParams
from llmprod.sched import fair_queue
from llmprod.sched.fair_queue import FairQueue
from llmprod.sched.request import Request
from llmprod.sched.scheduler import Scheduler


def drain(q: FairQueue[str]) -> list[str]:
    return [q.popleft() for _ in range(len(q))]


def fill(q: FairQueue[str], names: str, tenant: str, arrival: float = 0.0) -> None:
    for n in names.split():
        q.append(n, tenant, arrival)


def test_round_robin_across_tenants_fifo_within() -> None:
    q: FairQueue[str] = FairQueue(clock=lambda: 0.0)
    fill(q, "a1 a2 a3 a4", "a")
    fill(q, "b1 b2", "b")
    fill(q, "c1", "c")
    assert list(q) == ["a1", "b1", "c1", "a2", "b2", "a3", "a4"]  # pop order
    assert drain(q) == ["a1", "b1", "c1", "a2", "b2", "a3", "a4"]
    assert not q and len(q) == 0


def test_weights_give_proportional_turns() -> None:
    q: FairQueue[str] = FairQueue({"a": 2.0}, clock=lambda: 0.0)
    fill(q, "a1 a2 a3 a4 a5 a6", "a")
    fill(q, "b1 b2 b3", "b")
    # a's tag grows by 1/2 per turn, b's by 1: two a for each b; ties: older first
    assert drain(q) == ["a1", "b1", "a2", "a3", "b2", "a4", "a5", "b3", "a6"]


def test_fractional_weights() -> None:
    q: FairQueue[str] = FairQueue({"slow": 0.5}, clock=lambda: 0.0)
    fill(q, "s1 s2", "slow")
    fill(q, "f1 f2 f3 f4", "fast")
    assert drain(q) == ["s1", "f1", "f2", "s2", "f3", "f4"]


def test_a_flood_does_not_starve_a_small_tenant() -> None:
    q: FairQueue[str] = FairQueue(clock=lambda: 0.0)
    fill(q, " ".join(f"a{i}" for i in range(100)), "a")  # 100 waiting first
    out = []
    for i in range(10):  # b sends one request per pop
        q.append(f"b{i}", "b", 1.0)
        out.append(q.popleft())
        out.append(q.popleft())
    # b's request leaves within two pops of arriving, every time
    assert [x for x in out if x.startswith("b")] == [f"b{i}" for i in range(10)]
    assert all(pair[0].startswith("b") or pair[1].startswith("b")
               for pair in zip(out[::2], out[1::2]))  # fmt: skip


def test_idle_tenant_earns_no_credit() -> None:
    q: FairQueue[str] = FairQueue(clock=lambda: 0.0)
    fill(q, "a1 a2 a3 a4 a5 a6", "a")
    assert [q.popleft() for _ in range(3)] == ["a1", "a2", "a3"]  # b is idle
    fill(q, "a7 a8", "a")
    fill(q, "b1 b2 b3", "b")
    # b comes back at the current virtual time: alternation, no burst of turns
    # (b joins at the tag of a3, the last served: one turn ahead of a4, no more)
    assert drain(q) == ["b1", "a4", "b2", "a5", "b3", "a6", "a7", "a8"]


def test_age_bound_goes_first_regardless_of_turns() -> None:
    now = [100.0]
    q: FairQueue[str] = FairQueue(max_wait_s=10.0, clock=lambda: now[0])
    fill(q, "a1 a2 a3", "a", arrival=95.0)
    q.append("old", "b", 80.0)  # waited 20 s > 10 s
    q.append("b2", "b", 99.0)
    assert q.peek() == "old"
    # then fair turns (b's turn was used by "old"; ties go to the older item)
    assert drain(q) == ["old", "a1", "a2", "b2", "a3"]


def test_age_bound_under_overload_is_oldest_first() -> None:
    q: FairQueue[str] = FairQueue(max_wait_s=1.0, clock=lambda: 100.0)
    q.append("a1", "a", 10.0)
    q.append("a2", "a", 11.0)
    q.append("b1", "b", 12.0)
    assert drain(q) == ["a1", "a2", "b1"]


def test_preempted_items_go_first_like_a_deque() -> None:
    q: FairQueue[str] = FairQueue(max_wait_s=0.0, clock=lambda: 100.0)
    fill(q, "a1 a2", "a")  # overdue, but preempted items still go first
    q.appendleft("p_newest")
    q.appendleft("p_older")  # the scheduler preempts newest first
    assert q[0] == "p_older"
    assert drain(q) == ["p_older", "p_newest", "a1", "a2"]


def test_deque_operations() -> None:
    q: FairQueue[str] = FairQueue(clock=lambda: 0.0)
    with pytest.raises(IndexError):
        q.peek()
    with pytest.raises(IndexError):
        q.popleft()
    fill(q, "a1 a2", "a")
    fill(q, "b1", "b")
    q.appendleft("p")
    assert len(q) == 4 and bool(q)
    assert "a2" in q and "p" in q and "zz" not in q
    assert q[0] == q.peek() == "p" and q[2] == "b1"
    q.remove("p")
    q.remove("b1")  # b's line empties
    with pytest.raises(ValueError):
        q.remove("b1")
    assert "b1" not in q and len(q) == 2
    assert q.num_waiting() == {"a": 2}
    assert drain(q) == ["a1", "a2"]


def test_peek_is_what_popleft_returns() -> None:
    now = [0.0]
    q: FairQueue[str] = FairQueue(max_wait_s=5.0, clock=lambda: now[0])
    fill(q, "a1 a2", "a", arrival=0.0)
    q.append("b1", "b", 1.0)
    assert q.peek() == "a1"
    assert q.popleft() == "a1"
    head = q.peek()
    now[0] = 100.0  # time passes between peek and popleft: same answer
    assert q.popleft() == head


def test_requests_read_tenant_and_arrival_from_attributes() -> None:
    q: FairQueue[Request] = FairQueue(clock=lambda: 0.0)
    reqs = [make_request(4, f"a{i}", "a", float(i)) for i in range(3)]
    reqs.append(make_request(4, "b0", "b", 5.0))
    for r in reqs:
        q.append(r)
    assert [r.request_id for r in q] == ["a0", "b0", "a1", "a2"]


def test_bad_weights_and_age_bound() -> None:
    with pytest.raises(ValueError, match="weights"):
        FairQueue({"a": 0.0})
    with pytest.raises(ValueError, match="default_weight"):
        FairQueue(default_weight=-1.0)
    with pytest.raises(ValueError, match="max_wait_s"):
        FairQueue(max_wait_s=-1.0)


# -- the scheduler with a FairQueue as its waiting queue (scheduler.py unchanged)
def make_request(n: int, rid: str, tenant: str, arrival: float) -> Request:
    return Request(
        rid, list(range(100, 100 + n)), SamplingParams(max_tokens=50),
        tenant=tenant, arrival_time=arrival,
    )  # fmt: skip


def test_scheduler_admits_tenants_in_turn() -> None:
    kv = KVCacheManager(64, 4, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), kv)
    sched.waiting = FairQueue()  # type: ignore[assignment]
    for i in range(8):  # tenant a floods first
        sched.add(make_request(4, f"a{i}", "a", float(i)))
    sched.add(make_request(4, "b0", "b", 10.0))
    sched.add(make_request(4, "b1", "b", 11.0))
    out = sched.schedule()
    # 4 seats: b's two requests get in at once instead of after a's eight
    assert [e.request.request_id for e in out.scheduled] == ["a0", "b0", "a1", "b1"]
    assert len(sched.waiting) == 6
    sched.abort(sched.waiting[0])  # abort works on the queue too
    assert len(sched.waiting) == 5
    for r in list(sched.running):
        sched.abort(r)
    assert kv.pool.is_whole()


def test_docstring_examples_run() -> None:
    import doctest

    result = doctest.testmod(fair_queue)
    assert result.attempted > 0 and result.failed == 0
