"""The keep-or-escalate core of a Router, and the drivers that run it.

:func:`keep_or_escalate` is the only place where answers are judged: a generator
that walks a batch of requests through their plans. It yields an
:class:`EngineCall` (run these requests on this engine with these parameters),
receives the answers, asks the policy whether to keep each one or to go to the
plan's next engine, and finally returns one Completion per request, annotated
with ``flags["route"]`` and counted in the Router's :class:`Ledger`. It never
runs an engine itself; the drivers below do:

- :func:`run` and :func:`arun` answer each call with ``Engine.generate`` or
  ``Engine.agenerate`` (one batch per engine and step);
- :func:`stream` and :func:`astream` run one request: each try that may still be
  refused runs to its end with ``generate``, and the last engine of the plan
  streams live, its final Delta's Completion going back to the core.
"""

from __future__ import annotations

from collections.abc import (
    AsyncGenerator,
    Callable,
    Generator,
    Iterator,
    Sequence,
)
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from llmprod.engine.inputs import Message, Prompt
from llmprod.outputs import Completion, Delta
from llmprod.sampling_params import SamplingParams

if TYPE_CHECKING:
    from llmprod.engine.engine import Engine
    from llmprod.router.accounting import Ledger
    from llmprod.router.policies import RoutePlan, RoutingPolicy

__all__ = [
    "Attempt",
    "Core",
    "EngineCall",
    "advance",
    "arun",
    "astream",
    "keep_or_escalate",
    "run",
    "stream",
]


@dataclass(slots=True)
class Attempt:
    """One engine's answer to one request."""

    route: str
    """The engine that answered."""
    completion: Completion
    confidence: float | None
    """The policy's confidence in the answer (None where it was not judged)."""
    cost: float
    """What the call cost."""


@dataclass(slots=True)
class EngineCall:
    """One batch the core asks a driver to run on one engine."""

    route: str
    """The engine to run."""
    indices: list[int]
    """Which requests of the batch (positions in the caller's list)."""
    params: list[SamplingParams]
    """Their sampling parameters for this engine (log-probabilities switched on
    where the policy reads them)."""
    finals: list[bool]
    """Per request: this engine is the last of its plan (its answer is kept)."""


Core = Generator[EngineCall, list[Any], list[Any]]
"""A running :func:`keep_or_escalate`: send each call's answers (Completions, or
exceptions in their places), get the next call; it returns the results."""


def keep_or_escalate(
    plans: Sequence[RoutePlan],
    params: Sequence[SamplingParams],
    order: Sequence[str],
    policy: RoutingPolicy,
    ledger: Ledger,
) -> Core:
    """Drive a batch of requests through their plans, one engine batch at a time.

    Each step gathers the requests whose current engine is the same (engines in
    ``order``) and yields them as one :class:`EngineCall`. An answer is kept when
    its engine is the last of the plan, when the policy's ``assess`` keeps it,
    or when it was aborted; otherwise the request moves to its next engine. An
    exception in an answer's place becomes that request's result.

    Args:
        plans: one plan per request.
        params: the caller's sampling parameters, one per request.
        order: engine names, cheapest first.
        policy: judges the answers that may be refused.
        ledger: prices each call and counts each finished request.

    Returns:
        (as the generator's return value) one Completion or exception per request.
    """
    n = len(plans)
    results: list[Any] = [None] * n
    step = dict.fromkeys(range(n), 0)
    attempts: list[list[Attempt]] = [[] for _ in range(n)]
    while step:
        for route in order:
            idxs = [i for i, s in step.items() if plans[i].routes[s] == route]
            if not idxs:
                continue
            finals = [step[i] == len(plans[i].routes) - 1 for i in idxs]
            call_params = [
                _attempt_params(policy, params[i], f) for i, f in zip(idxs, finals)
            ]
            outs = yield EngineCall(route, idxs, call_params, finals)
            for i, final, out in zip(idxs, finals, outs):
                if isinstance(out, BaseException):
                    results[i] = out
                    del step[i]
                    continue
                keep, conf = (True, None) if final else policy.assess(out)
                attempts[i].append(
                    Attempt(route, out, conf, ledger.call_cost(route, out))
                )
                if keep or out.finish_reason == "abort":
                    results[i] = _finish(attempts[i], plans[i], params[i])
                    ledger.record(attempts[i])
                    del step[i]
                else:
                    step[i] += 1
    return results


def _attempt_params(
    policy: RoutingPolicy, params: SamplingParams, final: bool
) -> SamplingParams:
    if not final and policy.needs_logprobs and params.logprobs is None:
        return replace(params, logprobs=0)
    return params


def _finish(
    attempts: list[Attempt], plan: RoutePlan, params: SamplingParams
) -> Completion:
    """Annotate the answer returned for a finished request."""
    comp = attempts[-1].completion
    if params.logprobs is None:
        comp.logprobs = None
    comp.flags["route"] = {
        "engine": attempts[-1].route,
        "tried": [a.route for a in attempts],
        "confidence": [a.confidence for a in attempts],
        "score": plan.score,
    }
    return comp


def advance(core: Core, answers: list[Any] | None) -> EngineCall | list[Any]:
    """Send ``answers`` to the core (None to start it).

    Returns:
        The next :class:`EngineCall`, or the results once every request is done.
    """
    try:
        return core.send(answers)  # type: ignore[arg-type]
    except StopIteration as stop:
        return list(stop.value)


def engine_prompt(engine: Engine, prompt: Prompt | Sequence[Message]) -> Prompt:
    """A prompt as ``engine.generate`` takes it (conversations rendered)."""
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
        return engine.render_chat(prompt)  # type: ignore[arg-type]
    return prompt  # type: ignore[return-value]


# -------------------------------------------------------------------- batch drivers
def _for_indices(kwargs: dict[str, Any], indices: list[int]) -> dict[str, Any]:
    """``kwargs`` for one engine call: a per-request ``adapter`` list is cut
    down to the call's requests."""
    adapter = kwargs.get("adapter")
    if adapter is None or isinstance(adapter, str):
        return kwargs
    return {**kwargs, "adapter": [adapter[i] for i in indices]}


def run(
    core: Core,
    engines: dict[str, Engine],
    prompt_for: Callable[[Engine, int], Prompt],
    **kwargs: Any,
) -> list[Any]:
    """Answer every call of ``core`` with ``Engine.generate``.

    Args:
        core: a fresh :func:`keep_or_escalate`.
        engines: name -> Engine.
        prompt_for: the prompt of request ``i`` for an engine.
        **kwargs: passed to each ``generate``.

    Returns:
        The core's results.
    """
    step = advance(core, None)
    while isinstance(step, EngineCall):
        engine = engines[step.route]
        prompts = [prompt_for(engine, i) for i in step.indices]
        call = _for_indices(kwargs, step.indices)
        step = advance(core, engine.generate(prompts, step.params, **call))
    return step


async def arun(
    core: Core,
    engines: dict[str, Engine],
    prompt_for: Callable[[Engine, int], Prompt],
    **kwargs: Any,
) -> list[Any]:
    """:func:`run` with ``Engine.agenerate`` (each engine batch awaited in turn)."""
    step = advance(core, None)
    while isinstance(step, EngineCall):
        engine = engines[step.route]
        prompts = [prompt_for(engine, i) for i in step.indices]
        call = _for_indices(kwargs, step.indices)
        step = advance(core, await engine.agenerate(prompts, step.params, **call))
    return step


# ------------------------------------------------------------------- stream drivers
def _whole(comp: Completion) -> Delta:
    """A kept answer as one final Delta."""
    return Delta(
        comp.request_id, comp.text, list(comp.token_ids), comp.finish_reason, comp
    )


def stream(
    core: Core,
    engines: dict[str, Engine],
    prompt: Prompt | Sequence[Message],
    **kwargs: Any,
) -> Iterator[Delta]:
    """Run a one-request ``core``, streaming the last engine of its plan.

    When that engine is the first (a one-engine plan), its stream is started
    here, before the first Delta is asked for, as ``Engine.stream`` does; tries
    before it run when the iteration starts.

    Args:
        core: a fresh :func:`keep_or_escalate` of one request.
        engines: name -> Engine.
        prompt: the request's prompt or conversation.
        **kwargs: passed to each ``generate`` and to ``stream``.

    Returns:
        The Deltas; the final one's Completion carries ``flags["route"]``.
    """
    step = advance(core, None)
    assert isinstance(step, EngineCall)  # a plan names at least one engine
    if step.finals[0]:
        return _live(core, engines[step.route].stream(prompt, step.params[0], **kwargs))
    return _cascade(core, step, engines, prompt, kwargs)


def _cascade(
    core: Core,
    step: EngineCall,
    engines: dict[str, Engine],
    prompt: Prompt | Sequence[Message],
    kwargs: dict[str, Any],
) -> Iterator[Delta]:
    while not step.finals[0]:
        engine = engines[step.route]
        outs = engine.generate([engine_prompt(engine, prompt)], step.params, **kwargs)
        nxt = advance(core, outs)
        if not isinstance(nxt, EngineCall):
            yield _whole(nxt[0])
            return
        step = nxt
    yield from _live(core, engines[step.route].stream(prompt, step.params[0], **kwargs))


def _live(core: Core, inner: Iterator[Delta]) -> Iterator[Delta]:
    try:
        for d in inner:
            if d.finish_reason is not None and d.completion is not None:
                advance(core, [d.completion])
            yield d
    finally:
        close = getattr(inner, "close", None)
        if close is not None:
            close()


async def astream(
    core: Core,
    engines: dict[str, Engine],
    prompt: Prompt | Sequence[Message],
    **kwargs: Any,
) -> AsyncGenerator[Delta, None]:
    """:func:`stream` with ``Engine.agenerate`` and ``Engine.astream`` (everything
    runs when the iteration starts)."""
    step = advance(core, None)
    assert isinstance(step, EngineCall)  # a plan names at least one engine
    while not step.finals[0]:
        engine = engines[step.route]
        outs = await engine.agenerate(
            [engine_prompt(engine, prompt)], step.params, **kwargs
        )
        nxt = advance(core, outs)
        if not isinstance(nxt, EngineCall):
            yield _whole(nxt[0])
            return
        step = nxt
    inner = engines[step.route].astream(prompt, step.params[0], **kwargs)
    try:
        async for d in inner:
            if d.finish_reason is not None and d.completion is not None:
                advance(core, [d.completion])
            yield d
    finally:
        aclose = getattr(inner, "aclose", None)
        if aclose is not None:
            await aclose()
