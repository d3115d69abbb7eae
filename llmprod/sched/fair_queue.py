"""The scheduler's waiting queue, fair across tenants (CPU bookkeeping, no torch).

Start-time fair queueing, weighted, with an age bound: see :class:`FairQueue`.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Generic, TypeVar

from llmprod.ops.checks import is_number

T = TypeVar("T")


@dataclass(slots=True, eq=False)
class _Entry(Generic[T]):
    item: T
    tenant: str
    arrival: float
    seq: int


class FairQueue(Generic[T]):
    """A waiting queue that shares turns across tenants; a drop-in for the
    ``collections.deque`` a scheduler keeps its waiting requests in.

    Pop order:

    1. Items put back with :meth:`appendleft` (preempted requests), newest first,
       as a deque does.
    2. When ``max_wait_s`` is set: the oldest item (by arrival time) if it has
       waited longer than that, whatever its tenant.
    3. Otherwise, start-time fair queueing: each tenant with items waiting has a
       virtual start tag; the tenant with the smallest tag gives its oldest
       item, and its tag grows by ``1 / weight``. A tenant that was idle comes
       back at the current virtual time, so idling earns no credit. With equal
       weights this is round-robin; weight 2 gets two turns per turn of weight 1.
       Ties go to the older item.

    Within a tenant, items leave in the order they were appended. :meth:`peek`
    (and ``queue[0]``) returns the item :meth:`popleft` removes next, as long as
    nothing is added or removed in between.

    >>> q = FairQueue(clock=lambda: 0.0)
    >>> for name, tenant in [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b")]:
    ...     q.append(name, tenant, arrival_time=0.0)
    >>> [q.popleft() for _ in range(len(q))]
    ['a1', 'b1', 'a2', 'a3']

    Args:
        weights: tenant -> weight (> 0); others get ``default_weight``.
        default_weight: weight of tenants missing from ``weights``.
        max_wait_s: age bound in seconds (``None``: none). Under sustained
            overload every head is overdue and the order becomes oldest-first.
        key: the tenant of an item, when :meth:`append` is not told; default:
            the item's ``tenant`` attribute, or ``"default"``.
        arrival: the arrival time of an item (the ``clock``'s time base), when
            :meth:`append` is not told; default: its ``arrival_time`` attribute,
            or the clock's time at append.
        clock: monotonic seconds (the age bound reads it).
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        *,
        default_weight: float = 1.0,
        max_wait_s: float | None = None,
        key: Callable[[T], str] | None = None,
        arrival: Callable[[T], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inv_weights: dict[str, Fraction] = {}
        for tenant, w in (weights or {}).items():
            self._inv_weights[tenant] = _inverse_weight(f"weights[{tenant!r}]", w)
        self._default_inv = _inverse_weight("default_weight", default_weight)
        if max_wait_s is not None and not (is_number(max_wait_s) and max_wait_s >= 0):
            raise ValueError(f"max_wait_s={max_wait_s!r} must be a number >= 0")
        self.max_wait_s = max_wait_s
        self._key = key
        self._arrival = arrival
        self._clock = clock
        self._seq = itertools.count()
        self._front: deque[_Entry[T]] = deque()
        self._queues: dict[str, deque[_Entry[T]]] = {}
        """Tenants with items waiting, each FIFO."""
        self._start: dict[str, Fraction] = {}
        """Virtual start tag of each waiting tenant's head item."""
        self._finish: dict[str, Fraction] = {}
        """Next tag of tenants that went idle (so idling earns no credit)."""
        self._vtime = Fraction(0)
        self._len = 0
        self._head: _Entry[T] | None = None
        """The choice of the last peek, valid until the queue changes."""

    # -- deque interface ---------------------------------------------------------
    def append(
        self, item: T, tenant: str | None = None, arrival_time: float | None = None
    ) -> None:
        """Add an item at the back of its tenant's line.

        Args:
            item: the item (e.g. a :class:`~llmprod.sched.request.Request`).
            tenant: its tenant; default: from ``key``.
            arrival_time: when it arrived (clock seconds); default: from
                ``arrival``.
        """
        if tenant is None:
            tenant = self._tenant_of(item)
        if arrival_time is None:
            arrival_time = self._arrival_of(item)
        entry = _Entry(item, tenant, float(arrival_time), next(self._seq))
        q = self._queues.get(tenant)
        if q is None:
            q = self._queues[tenant] = deque()
            self._start[tenant] = max(
                self._vtime, self._finish.pop(tenant, self._vtime)
            )
        q.append(entry)
        self._len += 1
        self._head = None

    def appendleft(self, item: T) -> None:
        """Put an item at the very front (a preempted request): it goes next."""
        entry = _Entry(item, "", 0.0, next(self._seq))
        self._front.appendleft(entry)
        self._len += 1
        self._head = None

    def peek(self) -> T:
        """The item :meth:`popleft` would return.

        Raises:
            IndexError: the queue is empty.
        """
        if self._head is None:
            self._head = self._choose()
        return self._head.item

    def popleft(self) -> T:
        """Remove and return the next item (see the class docstring for the order).

        Raises:
            IndexError: the queue is empty.
        """
        entry = self._head if self._head is not None else self._choose()
        self._head = None
        if self._front and self._front[0] is entry:
            self._front.popleft()
            self._len -= 1
            return entry.item
        tenant = entry.tenant
        q = self._queues[tenant]
        assert q[0] is entry  # only a tenant's oldest item is ever chosen
        q.popleft()
        self._len -= 1
        tag = self._start[tenant]
        if tag <= self._min_start():  # a fair turn (not an overdue jump)
            self._vtime = max(self._vtime, tag)
        nxt = tag + self._inv_weights.get(tenant, self._default_inv)
        if q:
            self._start[tenant] = nxt
        else:
            self._deactivate(tenant, nxt)
        return entry.item

    def remove(self, item: T) -> None:
        """Remove the first occurrence of ``item`` (compared with ``==``).

        Raises:
            ValueError: the item is not in the queue.
        """
        for i, entry in enumerate(self._front):
            if entry.item == item:
                del self._front[i]
                self._len -= 1
                self._head = None
                return
        for tenant in self._lookup_order(item):
            q = self._queues[tenant]
            for i, entry in enumerate(q):
                if entry.item == item:
                    del q[i]
                    self._len -= 1
                    self._head = None
                    if not q:  # removed unserved: keep its tag, earn nothing
                        self._deactivate(tenant, self._start[tenant])
                    return
        raise ValueError("FairQueue.remove(x): x not in queue")

    def __contains__(self, item: object) -> bool:
        if any(entry.item == item for entry in self._front):
            return True
        return any(
            entry.item == item
            for tenant in self._lookup_order(item)
            for entry in self._queues[tenant]
        )

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[T]:
        """Items in pop order as of now (simulated on a copy; O(n x tenants))."""
        sim: FairQueue[T] = FairQueue.__new__(FairQueue)
        sim.__dict__.update(self.__dict__)
        sim._front = deque(self._front)
        sim._queues = {t: deque(q) for t, q in self._queues.items()}
        sim._start = dict(self._start)
        sim._finish = dict(self._finish)
        sim._head = self._head
        now = self._clock()
        sim._clock = lambda: now
        while sim:
            yield sim.popleft()

    def __getitem__(self, index: int) -> T:
        """``queue[0]`` is :meth:`peek`; other indexes follow the pop order."""
        if index == 0:
            return self.peek()
        items = list(self)
        return items[index]

    def __repr__(self) -> str:
        waiting = {t: len(q) for t, q in self._queues.items()}
        return f"FairQueue(front={len(self._front)}, waiting={waiting})"

    # -- reporting ---------------------------------------------------------------
    def num_waiting(self) -> dict[str, int]:
        """Tenant -> items waiting in its line (items put back at the front are
        not counted)."""
        return {t: len(q) for t, q in self._queues.items()}

    # -- internals ---------------------------------------------------------------
    def _choose(self) -> _Entry[T]:
        if self._front:
            return self._front[0]
        if not self._queues:
            raise IndexError("pop from an empty FairQueue")
        heads = [q[0] for q in self._queues.values()]
        if self.max_wait_s is not None:
            oldest = min(heads, key=lambda e: (e.arrival, e.seq))
            if self._clock() - oldest.arrival > self.max_wait_s:
                return oldest
        return min(heads, key=lambda e: (self._start[e.tenant], e.arrival, e.seq))

    def _min_start(self) -> Fraction:
        return min(self._start.values(), default=self._vtime)

    def _deactivate(self, tenant: str, next_tag: Fraction) -> None:
        del self._queues[tenant]
        del self._start[tenant]
        if next_tag > self._vtime:
            self._finish[tenant] = next_tag
        # Tags at or below the virtual time no longer matter: forget them.
        if len(self._finish) > 2 * len(self._queues) + 64:
            self._finish = {t: f for t, f in self._finish.items() if f > self._vtime}

    def _lookup_order(self, item: object) -> list[str]:
        """Waiting tenants to search for ``item``: its own tenant first."""
        try:
            tenant = self._tenant_of(item)  # type: ignore[arg-type]
        except Exception:
            tenant = None
        order = list(self._queues)
        if tenant in self._queues:
            order.remove(tenant)
            order.insert(0, tenant)
        return order

    def _tenant_of(self, item: T) -> str:
        if self._key is not None:
            return self._key(item)
        return str(getattr(item, "tenant", "default"))

    def _arrival_of(self, item: T) -> float:
        if self._arrival is not None:
            return float(self._arrival(item))
        value = getattr(item, "arrival_time", None)
        return self._clock() if value is None else float(value)


def _inverse_weight(name: str, weight: object) -> Fraction:
    if not (is_number(weight) and 0 < weight < math.inf):
        raise ValueError(f"{name}={weight!r} must be a finite number > 0")
    return 1 / Fraction(weight)
