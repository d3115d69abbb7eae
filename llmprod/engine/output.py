"""Output processing: from sampled tokens to what the caller receives.

Per token: append it, detokenize, check stops, stream a :class:`Delta`. Per
finished request: build the :class:`Completion` (timings, usage, signals), run the
output guards, price it, record metrics, release its tenant ticket, store it in
the answer caches, and hand it to the caller's sink.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmprod.config import EngineConfig
from llmprod.engine.detokenizer import IncrementalDetokenizer
from llmprod.errors import GuardBlockedError, RequestFailedError
from llmprod.ops.guards import apply_guards
from llmprod.ops.metrics import MetricsRecorder, speculation_stats
from llmprod.ops.signals import logprob_signals
from llmprod.outputs import Completion, Delta, Timings, TokenLogprob, Usage
from llmprod.sched.request import Request

if TYPE_CHECKING:
    from llmprod.answers.caches import AnswerCaches
    from llmprod.lora.manager import LoRAManager

logger = logging.getLogger("llmprod")

Sink = Callable[[Any], None]
"""Receives Delta objects (streaming), the final Completion, or an exception."""


@dataclass(slots=True, eq=False)
class Handle:
    """A submitted request and where its results go."""

    request: Request
    detok: IncrementalDetokenizer
    sink: Sink
    streaming: bool
    submit_time: float = field(default_factory=time.monotonic)
    done: bool = False
    """Set once the caller got its last item (completion, final delta or error)."""
    released: bool = False
    """Set once the request is recorded in the metrics and its ticket released."""
    raw: str = ""
    """With output guards: the text released by the detokenizer so far."""
    sent: str = ""
    """With output guards: the guarded text streamed so far (a prefix of what
    the guards make of ``raw``)."""


class OutputProcessor:
    """Writes a request's outputs and delivers them.

    Args:
        config: the engine's config (guards, prices).
        tokenizer: for incremental detokenization.
        eos_token_ids, max_model_len: when a sequence must end.
        metrics: where finished requests are recorded.
        answers: the answer caches finished requests are stored in, or None.
    """

    def __init__(
        self,
        config: EngineConfig,
        tokenizer: Any,
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
        metrics: MetricsRecorder,
        answers: AnswerCaches | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.guards = list(config.guards or [])
        self.prices = config.prices
        self.metrics = metrics
        self.answers = answers
        self.lora: LoRAManager | None = None
        """The engine's adapters (set when the first one is loaded)."""

    def make_handle(self, req: Request, sink: Sink, streaming: bool) -> Handle:
        p = req.params
        detok = IncrementalDetokenizer(
            self.tokenizer, p.stop, p.include_stop_str_in_output, p.skip_special_tokens
        )
        return Handle(req, detok, sink, streaming)

    # ------------------------------------------------------------------ per token
    def add_prompt_logprobs(
        self, req: Request, first: int, logprobs: list[TokenLogprob | None]
    ) -> None:
        """Place a step's prompt log-probabilities, which start at prompt token
        ``first`` (a chunk run again after preemption overwrites its own)."""
        lst = req.prompt_logprobs
        if len(lst) < first:
            lst.extend([None] * (first - len(lst)))
        lst[first : first + len(logprobs)] = logprobs
        if len(lst) >= req.num_prompt_tokens:
            req.prompt_logprobs_done = True

    def add_token(
        self, h: Handle, token: int, logprob: TokenLogprob | None, now: float
    ) -> str | None:
        """Append one sampled token; stream it unless the request ends here.

        Returns the finish reason ("stop", "length") or None to go on.
        """
        req = h.request
        req.append_token(token)
        if req.first_token_time is None:
            req.first_token_time = now
        if logprob is not None:
            req.logprobs.append(logprob)
        stop_str = h.detok.add(token)
        if req.matcher is not None:
            req.matcher.consume_token(token)
        reason = self._check_stop(req, token, stop_str)
        if reason is None and h.streaming:
            text = h.detok.take_delta(final=False)
            if self.guards:
                text = self._settled(h, text)
            h.sink(Delta(req.request_id, text, [token]))
        return reason

    def _settled(self, h: Handle, text: str) -> str:
        """The part of a guarded stream's text that is safe to send now.

        The guards run on all the text so far; what is sent stays a prefix of
        their output and ends :func:`stream_holdback` characters before its
        end, so a match that more tokens could still complete (or a word a
        block list holds) is never sent before the guards have seen it whole
        (see :class:`~llmprod.ops.guards.Guard`). While the text so far is
        blocked, or a guard fails, nothing more is sent; finalize decides.
        """
        if not text:
            return ""
        h.raw += text
        holdback = stream_holdback(self.guards)  # a guard may change its own
        if holdback is None:
            return ""
        try:
            guarded = apply_guards(self.guards, h.raw, "output").text
        except Exception:  # blocked (or a guard fault): finalize runs them again
            return ""
        settled = guarded[: max(len(guarded) - holdback, 0)]
        if len(settled) <= len(h.sent) or not settled.startswith(h.sent):
            return ""
        out = settled[len(h.sent) :]
        h.sent = settled
        return out

    def _check_stop(self, req: Request, token: int, stop_str: str | None) -> str | None:
        p = req.params
        if stop_str is not None:
            req.stop_reason = stop_str
            return "stop"
        n_out = req.num_output_tokens
        if req.matcher is not None and req.matcher.is_stopped():
            return "stop"  # the grammar is complete: nothing may follow
        if n_out >= p.min_tokens:
            if token in p.stop_token_ids:
                req.stop_reason = token
                return "stop"
            if not p.ignore_eos and token in self.eos_token_ids:
                return "stop"
        if n_out >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    # ------------------------------------------------------------------ the end
    def finalize(
        self, h: Handle, reason: str, last_token_ids: list[int] | None = None
    ) -> None:
        """Build the Completion, record it, deliver the last item.

        ``last_token_ids``: tokens of this step not yet streamed (they ride on the
        final delta). Never raises: whatever fails here (an output guard, the
        price table, the detokenizer) ends this request with an error instead.
        """
        if h.done:
            return
        req = h.request
        try:
            req.finish_reason = reason
            req.finish_time = time.monotonic()
            comp = self._completion(h, reason)
            if self.guards:
                try:
                    self.guard_output(comp)
                except GuardBlockedError as exc:
                    if reason != "abort":
                        raise
                    # An aborted request ends as aborted, with none of its text.
                    comp.text = ""
                    blocked = {exc.guard: dict(exc.findings)}
                    comp.flags.setdefault("guards", {})["output"] = blocked
            cost = self._price(req)
            final: Completion | Delta = comp
            if h.streaming:
                text = h.detok.take_delta(final=True)
                if self.guards:
                    text = _rest(comp.text, h.sent)
                final = Delta(req.request_id, text, last_token_ids or [], reason, comp)
        except GuardBlockedError as exc:
            self.fail(h, exc)
            return
        except Exception as exc:
            logger.exception("request %s failed while finishing", req.request_id)
            self.fail(h, failed(req, "while finishing", exc))
            return
        t = comp.timings
        comp.usage.cost = cost
        outcome = "aborted" if reason == "abort" else "completed"
        self._release(
            h,
            outcome,
            {"queued": t.queued_s, "ttft": t.ttft_s, "tpot": t.tpot_s, "e2e": t.e2e_s},
            cost,
        )
        if self.answers is not None and reason in ("stop", "length"):
            try:
                self.answers.store(req, comp)
            except Exception:  # caching is best effort; the answer stands
                logger.exception("storing the answer of %s failed", req.request_id)
        self._deliver(h, final)

    def fail(self, h: Handle, err: BaseException) -> None:
        """Deliver an error as the request's last item (never raises)."""
        if h.done:
            return
        self._release(h, "errored", {}, None)
        self._deliver(h, err)

    def guard_output(self, comp: Completion) -> None:
        """Run the output guards on a completion (redact in place, add flags);
        raises GuardBlockedError when one blocks it."""
        res = apply_guards(self.guards, comp.text, "output")
        comp.text = res.text
        if res.flags:
            comp.flags.setdefault("guards", {})["output"] = res.flags

    def _deliver(self, h: Handle, item: Any) -> None:
        h.done = True
        try:
            h.sink(item)
        except Exception:  # the caller's side is gone; nothing else to tell
            logger.exception("delivering the result of %s failed", h.request.request_id)

    def deliver_cached(self, h: Handle, comp: Completion) -> None:
        """Deliver an answer from the answer caches (the model never ran). The
        output guards run on it as on a fresh answer; a blocked one is an error."""
        req = h.request
        if self.guards:
            try:
                self.guard_output(comp)
            except GuardBlockedError as exc:
                self.fail(h, exc)
                return
            except Exception as exc:
                logger.exception("output guards failed on %s", req.request_id)
                self.fail(h, failed(req, "in the output guards", exc))
                return
        so = req.params.structured
        if so is not None and so.is_json and comp.finish_reason == "stop":
            comp.parsed = _parse_json(comp.text)
        h.released = True
        try:
            if req.ticket is not None:
                req.ticket.release(0, 0.0)
            self.metrics.on_finish(
                "completed",
                comp.usage.prompt_tokens,
                comp.usage.completion_tokens,
                comp.usage.cached_prompt_tokens,
                {"queued": 0.0, "ttft": comp.timings.ttft_s, "e2e": comp.timings.e2e_s},
                tenant=req.tenant,
                cost=0.0,
                cache_tier=comp.cache_hit,
                adapter=req.adapter,
            )
        except Exception:
            logger.exception("recording the cached answer of %s failed", req.request_id)
        if h.streaming:
            self._deliver(h, Delta(req.request_id, comp.text, list(comp.token_ids),
                                   comp.finish_reason, comp))  # fmt: skip
        else:
            self._deliver(h, comp)

    def _completion(self, h: Handle, reason: str) -> Completion:
        req = h.request
        t0 = h.submit_time
        n_out = req.num_output_tokens
        end = req.finish_time if req.finish_time is not None else time.monotonic()
        first = req.first_token_time
        timings = Timings(
            queued_s=None
            if req.first_scheduled_time is None
            else req.first_scheduled_time - t0,
            ttft_s=None if first is None else first - t0,
            e2e_s=end - t0,
            tpot_s=(end - first) / (n_out - 1)
            if first is not None and n_out > 1
            else None,
        )
        comp = Completion(
            request_id=req.request_id,
            text=h.detok.text,
            token_ids=req.output_token_ids,
            finish_reason=reason,
            prompt_token_ids=req.prompt_token_ids,
            stop_reason=req.stop_reason,
            usage=Usage(req.num_prompt_tokens, n_out, req.num_cached_tokens),
            timings=timings,
            logprobs=req.logprobs if req.params.logprobs is not None else None,
            prompt_logprobs=req.prompt_logprobs
            if req.params.prompt_logprobs is not None
            else None,
        )
        if req.flags:
            comp.flags.update(req.flags)
        if req.spec is not None and req.spec.steps:
            comp.metrics["speculative"] = speculation_stats(
                req.spec.steps, req.spec.drafted, req.spec.accepted
            )
        so = req.params.structured
        if so is not None and req.matcher is not None:
            complete = bool(req.matcher.is_accepting())
            comp.flags["structured"] = {"kind": so.kind, "complete": complete}
            if so.is_json and complete:
                comp.parsed = _parse_json(comp.text)
        if req.params.logprobs is not None and req.logprobs:
            comp.flags["confidence"] = logprob_signals(
                req.logprobs, [lp.entropy for lp in req.logprobs]
            )
        return comp

    def _price(self, req: Request) -> float:
        """The request's cost; raises when the price table fails or gives a
        cost that is not a finite number >= 0."""
        if self.prices is None:
            return 0.0
        cost = float(
            self.prices.cost(
                prompt_tokens=req.num_prompt_tokens,
                completion_tokens=req.num_output_tokens,
                cached_prompt_tokens=req.num_cached_tokens,
                compute_s=req.compute_s,
            )
        )
        if not math.isfinite(cost) or cost < 0:
            raise ValueError(f"the price table gave cost={cost!r}")
        return cost

    def _release(
        self,
        h: Handle,
        outcome: str,
        timings: dict[str, float | None],
        cost: float | None,
    ) -> None:
        """Record a finished request and release its ticket, once (never
        raises). ``cost`` None: price it here, 0 if the price table fails."""
        if h.released:
            return
        h.released = True
        req = h.request
        if req.adapter_pinned and self.lora is not None:
            req.adapter_pinned = False
            self.lora.unpin(req.adapter)  # type: ignore[arg-type]
        if cost is None:
            try:
                cost = self._price(req)
            except Exception:
                logger.exception("price table failed on %s", req.request_id)
                cost = 0.0
        try:
            self.metrics.on_finish(
                outcome,
                req.num_prompt_tokens,
                req.num_output_tokens,
                req.num_cached_tokens,
                timings,
                tenant=req.tenant,
                cost=cost,
                adapter=req.adapter,
            )
        except Exception:
            logger.exception("recording %s failed", req.request_id)
        if req.ticket is not None:
            try:
                req.ticket.release(req.num_prompt_tokens + req.num_output_tokens, cost)
            except Exception:
                logger.exception("releasing the ticket of %s failed", req.request_id)


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:  # an output guard redacted it, or a grammar gap
        logger.warning("a structured JSON answer did not parse")
        return None


def stream_holdback(guards: list[Any]) -> int | None:
    """Characters a guarded stream holds back: the most any output guard asks
    for (its ``stream_holdback``), or None (hold all the text until the end)
    when one does not say."""
    most = 0
    for g in guards:
        if "output" not in getattr(g, "where", ("output",)):
            continue
        n = getattr(g, "stream_holdback", None)
        if not isinstance(n, int) or n < 0:
            return None
        most = max(most, n)
    return most


def _rest(text: str, sent: str) -> str:
    """What the final delta carries: the final text past what was streamed. The
    final text normally extends what was sent; where a guard changed text that
    was already sent (a match longer than its ``stream_holdback``), it carries
    the final text past the common prefix and the completion is authoritative."""
    if text.startswith(sent):
        return text[len(sent) :]
    logger.warning("an output guard changed text already streamed")
    i = 0
    for a, b in zip(text, sent):
        if a != b:
            break
        i += 1
    return text[i:]


def failed(req: Request, where: str, exc: BaseException) -> RequestFailedError:
    """The typed error a request ends with when its own path raised."""
    return RequestFailedError(
        f"request {req.request_id} failed {where}: {exc!r}", req.request_id
    )
