"""Continuous batching: which requests run in the next step, and how many tokens.

CPU bookkeeping only (no torch). The engine calls :meth:`Scheduler.schedule`
once per step and reads nothing but the :class:`SchedulerOutput` it returns.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from llmprod.config import SchedulerConfig
from llmprod.kv.manager import KVCacheManager
from llmprod.sched.fair_queue import FairQueue
from llmprod.sched.request import Request, RequestStatus
from llmprod.sched.speculative import (
    NgramProposer,
    Proposer,
    SpecState,
    SpeculativeConfig,
    eligible,
)


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step: tokens ``start .. start + num_new_tokens``."""

    request: Request
    start: int
    num_new_tokens: int
    draft: list[int] = field(default_factory=list)
    """Guessed tokens that follow the last known one (speculative decoding):
    they are the last ``len(draft)`` of the ``num_new_tokens`` positions."""
    samples: bool = False
    """True when this step reaches the last known token, so a token is sampled."""

    def __post_init__(self) -> None:
        known = self.num_new_tokens - len(self.draft)
        self.samples = self.start + known == self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    """What runs in one step.

    ``scheduled`` lists the single-token entries (decodes) first, sorted by
    context length and cut into ``decode_groups`` of similar length, then the
    multi-token entries (prefill chunks).
    """

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_decodes: int = 0
    decode_groups: list[tuple[int, int]] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)
    """Requests the scheduler ended itself (the pool cannot hold them)."""
    padded_elements: int = 0
    """Padding in the decode attention layout (keys), summed over groups."""
    processed_elements: int = 0
    """Keys processed by the decode attention layout, padding included."""

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    def split(self) -> list[SchedulerOutput]:
        """The same step as one step per request (to find which request's path
        fails when the whole step did)."""
        parts = []
        for e in self.scheduled:
            part = SchedulerOutput(scheduled=[e], num_batched_tokens=e.num_new_tokens)
            if e.num_new_tokens == 1:
                part.num_decodes = 1
                part.decode_groups = [(0, 1)]
                part.processed_elements = e.start + 1
            parts.append(part)
        return parts


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """What the scheduler reports; the engine reads this, never its queues."""

    num_running: int
    num_waiting: int
    num_preemptions: int
    num_allocated_tokens: int
    """KV slots held by running requests (blocks x block size)."""
    num_computed_tokens: int
    """Of those, the slots whose KV is written."""


def group_by_length(
    lengths: list[int], max_ratio: float = 1.25
) -> list[tuple[int, int]]:
    """Cut sorted ``lengths`` into runs whose longest is at most ``max_ratio`` x
    (shortest + 64), so padding each run to its longest wastes little.

    >>> group_by_length([10, 20, 30, 500, 600])
    [(0, 3), (3, 5)]
    """
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(lengths) + 1):
        if i == len(lengths) or lengths[i] > max_ratio * (lengths[start] + 64):
            groups.append((start, i))
            start = i
    return groups


class Scheduler:
    """Decodes first, then prefills (chunked to the token budget); preempts the
    newest request by recompute when KV blocks run out.

    The padding objective: the only padded layout is the batched decode attention
    (keys padded to the longest context in a group). Decodes are sorted by
    context length and cut into groups of similar length, which bounds the waste;
    every running request decodes every step, so grouping never starves one.
    Waiting requests are admitted round-robin across tenants (weighted), so one
    tenant's flood cannot starve another; preempted requests go first, and a
    request older than ``max_wait_s`` goes before the fair order.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        speculative: SpeculativeConfig | None = None,
        proposer: Proposer | None = None,
    ) -> None:
        self.speculative = speculative
        self.proposer: Proposer | None = proposer
        if speculative is not None and proposer is None:
            self.proposer = NgramProposer(speculative)
        self.max_model_len: int | None = None
        """Set by the engine: drafts never run past it."""
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.kv = kv
        # Admission order: round-robin across tenants (weighted), preempted
        # requests first, anything older than the age bound next.
        self.waiting: FairQueue[Request] = FairQueue(
            config.tenant_weights,
            max_wait_s=config.max_wait_s,
            key=lambda r: r.tenant,
            arrival=lambda r: r.arrival_time,
        )
        self.running: list[Request] = []
        self.num_preemptions = 0

    # --- queue -------------------------------------------------------------------
    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> SchedulerStats:
        running = self.running
        return SchedulerStats(
            num_running=len(running),
            num_waiting=len(self.waiting),
            num_preemptions=self.num_preemptions,
            num_allocated_tokens=sum(len(r.block_ids) for r in running)
            * self.kv.block_size,
            num_computed_tokens=sum(r.num_computed_tokens for r in running),
        )

    def abort(self, request: Request) -> bool:
        """Remove a request wherever it is and free its blocks. False if unknown."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        else:
            return False
        self._finish(request, "abort")
        return True

    def finish(self, request: Request, reason: str) -> None:
        """End a running request (stop, length, error) and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._finish(request, reason)

    def _finish(self, request: Request, reason: str) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    # --- the step ----------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Choose the next step's batch within the token budget and ``max_num_seqs``."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        chosen: dict[Request, ScheduledRequest] = {}

        # Phase 1 - running requests, oldest first: decodes (one token each), then
        # prefill chunks. Out of blocks: preempt the newest running request.
        order = [r for r in self.running if not r.is_prefilling]
        order += [r for r in self.running if r.is_prefilling]
        speculate = (
            self.proposer is not None
            and len(self.running) + len(self.waiting) <= self._spec_max_seqs()
        )
        for req in order:
            if req.status is not RequestStatus.RUNNING or budget == 0:
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            draft = self._draft(req, budget - 1) if speculate and n == 1 else []
            n += len(draft)
            while not self.kv.allocate_slots(req, n):
                victim = self.running[-1]
                if victim is req and len(self.running) == 1:
                    # Alone and still too big for the pool: it can grow no further.
                    self.running.remove(req)
                    self._finish(req, "length")
                    out.finished.append(req)
                    break
                entry = chosen.pop(victim, None)
                if entry is not None:
                    budget += entry.num_new_tokens
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is RequestStatus.RUNNING:
                chosen[req] = ScheduledRequest(req, req.num_computed_tokens, n, draft)
                budget -= n

        # Phase 2 - admit waiting requests while budget, seats and blocks last
        # (not in a step that had to preempt: the pool is full).
        now = time.monotonic()
        while (
            self.waiting
            and budget > 0
            and len(self.running) < self.max_num_seqs
            and not out.preempted
        ):
            req = self.waiting[0]
            first_time = req.first_scheduled_time is None
            cached = (
                self.kv.find_cached_prefix(req) if req.num_computed_tokens == 0 else []
            )
            remaining = (
                req.num_tokens
                - req.num_computed_tokens
                - len(cached) * self.kv.block_size
            )
            n = min(remaining, budget)
            if not self.kv.allocate_slots(req, n, cached):
                break
            self.waiting.popleft()
            req.num_computed_tokens += len(cached) * self.kv.block_size
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            if first_time:
                req.first_scheduled_time = now
                req.num_cached_tokens = len(cached) * self.kv.block_size
            chosen[req] = ScheduledRequest(req, req.num_computed_tokens, n)
            budget -= n

        self._lay_out(out, list(chosen.values()))
        return out

    def _lay_out(self, out: SchedulerOutput, entries: list[ScheduledRequest]) -> None:
        decodes = sorted(
            (e for e in entries if e.num_new_tokens == 1), key=lambda e: e.start
        )
        prefills = [e for e in entries if e.num_new_tokens > 1]
        out.scheduled = decodes + prefills
        out.num_decodes = len(decodes)
        out.num_batched_tokens = sum(e.num_new_tokens for e in entries)
        lengths = [e.start + 1 for e in decodes]
        out.decode_groups = group_by_length(lengths)
        for lo, hi in out.decode_groups:
            longest = lengths[hi - 1]
            out.processed_elements += longest * (hi - lo)
            out.padded_elements += longest * (hi - lo) - sum(lengths[lo:hi])

    def update(
        self, out: SchedulerOutput, accepted: Mapping[int, int] | None = None
    ) -> None:
        """Record that the step ran: advance computed counts, register full blocks.

        ``accepted``: for the entries (by index) that carried guesses, how many
        the model kept. Only those positions count as computed; the blocks past
        the next position return to the pool (the refused guesses' KV is
        overwritten when those positions run again).
        """
        for i, e in enumerate(out.scheduled):
            req = e.request
            if e.draft:
                kept = (accepted or {}).get(i, 0)
                req.num_computed_tokens = e.start + e.num_new_tokens - len(e.draft)
                req.num_computed_tokens += kept
                self.kv.trim(req, req.num_computed_tokens + 1)
                assert self.speculative is not None and req.spec is not None
                req.spec.record(len(e.draft), kept, self.speculative)
            else:
                req.num_computed_tokens = e.start + e.num_new_tokens
            self.kv.cache_full_blocks(req)

    # --- speculative decoding ---------------------------------------------------
    def _spec_max_seqs(self) -> int:
        return self.speculative.max_num_seqs if self.speculative else 0

    def _draft(self, req: Request, budget: int) -> list[int]:
        """Guesses for a decoding request's next tokens (none when it may not
        speculate now, or the proposer finds nothing)."""
        cfg = self.speculative
        if cfg is None or self.proposer is None or budget <= 0 or not eligible(req):
            return []
        if req.spec is None:
            req.spec = SpecState()
        state: SpecState = req.spec
        state.seen_steps += 1
        if state.seen_steps < state.paused_until:
            return []
        # Never guess past max_tokens or the model's length: the last kept token
        # would end the request anyway.
        room = req.params.max_tokens - req.num_output_tokens - 1
        if self.max_model_len is not None:
            room = min(room, self.max_model_len - req.num_tokens - 1)
        k = min(cfg.num_speculative_tokens, room, budget)
        if k <= 0:
            return []
        return self.proposer.draft(req, k)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
