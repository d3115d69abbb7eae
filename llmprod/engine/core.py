"""The step loop: one thread owns the scheduler, the KV cache and the model.

Callers hand requests in through an inbox (:meth:`EngineCore.submit`,
:meth:`EngineCore.abort`); the loop takes them in between steps, runs
``step()`` (schedule -> execute -> update -> process) while there is work, and
sleeps when there is none. Every request ends exactly once, through
:meth:`EngineCore._end` or :meth:`EngineCore._fail`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Literal

import torch

from llmprod.engine.output import Handle, OutputProcessor, failed
from llmprod.errors import RequestFailedError, TensorParallelError
from llmprod.exec.runner import ModelRunner, StepResult
from llmprod.exec.threads import run_on_compute_thread
from llmprod.kv.manager import KVCacheManager
from llmprod.ops.metrics import MetricsRecorder
from llmprod.sched.request import Request
from llmprod.sched.scheduler import Scheduler, SchedulerOutput

logger = logging.getLogger("llmprod")

_Message = (
    tuple[Literal["add"], Handle]
    | tuple[Literal["abort"], str]
    | tuple[Literal["close"], None]
)


class EngineCore:
    """Runs the steps on its own thread.

    Args:
        scheduler, kv, runner: the step's three parts.
        output: turns step results into what callers receive.
        metrics: per-step counters.
        num_threads: torch threads for this engine's steps on CPU (None: leave).
    """

    def __init__(
        self,
        scheduler: Scheduler,
        kv: KVCacheManager,
        runner: ModelRunner,
        output: OutputProcessor,
        metrics: MetricsRecorder,
        num_threads: int | None,
    ) -> None:
        self.scheduler = scheduler
        self.kv = kv
        self.runner = runner
        self.output = output
        self.metrics = metrics
        self.num_threads = num_threads
        self.dead: BaseException | None = None
        """Set when the loop stopped for good (a tensor-parallel worker died)."""
        self.on_dead: Callable[[BaseException], None] = lambda exc: None
        """Called once, on the loop's thread, when it stops for good (before it
        fails what is left in the inbox)."""
        self.handles: dict[str, Handle] = {}
        """Requests in the loop, by id (only the loop thread touches it)."""
        self._inbox: queue.SimpleQueue[_Message] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self.thread = threading.Thread(
            target=self._loop, name="llmprod-engine", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    # ------------------------------------------------------------------ the inbox
    def submit(self, h: Handle) -> None:
        self._inbox.put(("add", h))
        self._wakeup.set()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wakeup.set()

    def shutdown(self) -> None:
        """Abort what is in flight and stop the loop (waits for it)."""
        self._inbox.put(("close", None))
        self._wakeup.set()
        if self.thread is not threading.current_thread():
            self.thread.join()

    def is_idle(self) -> bool:
        """No request is held: none in the loop, none waiting in the inbox."""
        return (
            not self.handles and self._inbox.empty() and not self.scheduler.has_work()
        )

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            self._wakeup.clear()
            if not self._drain_inbox():
                self._abort_all()
                return
            if not self.scheduler.has_work():
                self._wakeup.wait()
                continue
            try:
                self.step()
                if self.dead is not None:
                    self._die()
                    return
            except Exception:
                logger.exception("engine step failed outside the model")
                for h in list(self.handles.values()):
                    self._fail(h, RequestFailedError("engine step failed; see the log"))

    def _drain_inbox(self) -> bool:
        """Take new requests and aborts. False when shutdown was asked."""
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if msg[0] == "add":
                h = msg[1]
                self.handles[h.request.request_id] = h
                self.scheduler.add(h.request)
            elif msg[0] == "abort":
                found = self.handles.get(msg[1])
                if found is not None and not found.done:
                    self.scheduler.abort(found.request)
                    self._end(found, "abort")
            else:
                return False

    def _abort_all(self) -> None:
        for h in list(self.handles.values()):
            if not h.done:
                self.scheduler.abort(h.request)
                self._end(h, "abort")
        while True:  # requests that raced with shutdown
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if msg[0] == "add":
                self.output.finalize(msg[1], "abort")

    # ------------------------------------------------------------------ one step
    def step(self) -> None:
        """One engine step: schedule, run the model, process the outputs."""
        out = self.scheduler.schedule()
        for req in out.finished:  # the pool cannot hold them any longer
            self._end(self.handles[req.request_id], req.finish_reason or "length")
        if out.is_empty:
            return
        t0 = time.perf_counter()
        rng = _generator_states(out)
        try:
            result = self._execute(out)
        except TensorParallelError as exc:
            # The ranks may be out of step: nothing more can run.
            self.dead = exc
            return
        except Exception as exc:
            for gen, state in rng:
                gen.set_state(state)
            self._isolate(out, exc)
            return
        self._apply(out, result, time.perf_counter() - t0)

    def _apply(self, out: SchedulerOutput, result: StepResult, elapsed: float) -> None:
        """The step ran: record it, then hand each request its part."""
        accepted = result.accepted()
        self.scheduler.update(out, accepted)
        for i, kept in accepted.items():
            self.metrics.on_speculation(len(out.scheduled[i].draft), kept)
        self._account(out, elapsed)
        self._process(out, result)

    def _isolate(self, out: SchedulerOutput, exc: Exception) -> None:
        """The step raised: run its requests one at a time, so only the ones
        whose own path raises fail; the others go on with the tokens they would
        have produced alone (a seeded request's generator is rewound first)."""
        if len(out.scheduled) == 1:
            self._fail_step(out, exc)
            return
        logger.warning(
            "a step of %d requests failed (%r); running them one at a time",
            len(out.scheduled),
            exc,
        )
        for part in out.split():
            t0 = time.perf_counter()
            try:
                result = self._execute(part)
            except Exception as part_exc:
                self._fail_step(part, part_exc)
                continue
            self._apply(part, result, time.perf_counter() - t0)

    def _execute(self, out: SchedulerOutput) -> StepResult:
        if self.runner.device.type != "cpu":
            return self.runner.execute(out)
        return run_on_compute_thread(self._execute_cpu, out)  # one OpenMP team

    def _execute_cpu(self, out: SchedulerOutput) -> StepResult:
        """The model step, on the compute thread shared by all engines: with
        this engine's thread count, which another engine may have changed."""
        n = self.num_threads
        if n is not None and torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return self.runner.execute(out)

    def _account(self, out: SchedulerOutput, elapsed: float) -> None:
        """Share the step's model time by tokens; record padding and KV use."""
        per_token = elapsed / max(out.num_batched_tokens, 1)
        for e in out.scheduled:
            e.request.compute_s += per_token * e.num_new_tokens
        s = self.scheduler.stats()
        allocated = s.num_allocated_tokens
        self.metrics.on_step(
            out.padded_elements,
            out.processed_elements,
            self.kv.stats().usage,
            (allocated - s.num_computed_tokens) / allocated if allocated else 0.0,
        )

    def _process(self, out: SchedulerOutput, result: StepResult) -> None:
        """Hand each request its part of the result; a request whose output
        processing raises (detokenizer, a stream's sink) fails alone."""
        for idx, first, lps in result.prompt_logprobs:
            req = out.scheduled[idx].request
            try:
                self.output.add_prompt_logprobs(req, first, lps)
            except Exception as exc:
                self._fail_request(req, "processing its prompt log-probabilities", exc)
        now = time.monotonic()
        sampled = result.sampled
        for row, idx in enumerate(result.sampled_entries):
            req = out.scheduled[idx].request
            h = self.handles.get(req.request_id)
            if h is None or h.done:  # failed above
                continue
            tokens = result.tokens.get(idx) or [sampled.token_ids[row]]
            for j, token in enumerate(tokens):
                lp = sampled.logprobs[row] if j == 0 else None
                try:
                    reason = self.output.add_token(h, token, lp, now)
                except Exception as exc:
                    self._fail_request(req, "processing its output", exc)
                    break
                if reason is not None:
                    # A stop inside a run of kept guesses ends the request at
                    # exactly that token; the rest are dropped.
                    self.scheduler.finish(req, reason)
                    self._end(h, reason, last_token_ids=[token])
                    break

    def _die(self) -> None:
        """Fail every request (in the loop and in the inbox) with the error
        that stopped the loop."""
        err = self.dead
        assert err is not None
        logger.error("the engine stops: %s", err)
        self.on_dead(err)
        for h in list(self.handles.values()):
            self._fail(h, err)
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                self.output.fail(msg[1], err)

    # ------------------------------------------------------------------ endings
    def _end(
        self, h: Handle, reason: str, last_token_ids: list[int] | None = None
    ) -> None:
        self.handles.pop(h.request.request_id, None)
        self.output.finalize(h, reason, last_token_ids)

    def _fail(self, h: Handle, err: BaseException) -> None:
        if h.done:
            return
        if not h.request.is_finished:
            self.scheduler.finish(h.request, "error")
        self.handles.pop(h.request.request_id, None)
        self.output.fail(h, err)

    def _fail_request(self, req: Request, where: str, exc: Exception) -> None:
        logger.exception("request %s failed %s", req.request_id, where)
        h = self.handles.get(req.request_id)
        if h is not None:
            self._fail(h, failed(req, where, exc))

    def _fail_step(self, out: SchedulerOutput, exc: Exception) -> None:
        logger.error(
            "model forward failed; failing the %d requests of this step: %r",
            len(out.scheduled),
            exc,
        )
        for e in out.scheduled:
            h = self.handles.get(e.request.request_id)
            self.scheduler.finish(e.request, "error")
            if h is not None:
                self._fail(h, failed(e.request, "in the model", exc))


def _generator_states(
    out: SchedulerOutput,
) -> list[tuple[torch.Generator, torch.Tensor]]:
    """The state of each seeded request's generator before a step draws from it."""
    return [
        (e.request.generator, e.request.generator.get_state())
        for e in out.scheduled
        if e.request.generator is not None
    ]
