"""Send each request to the cheapest engine that should answer it well.

A :class:`Router` holds several engines, ordered from cheapest to most expensive,
and exposes the Engine's ``generate``, ``chat``, ``stream``, ``agenerate`` and
``astream``, with the Engine's parameters. A policy
(:mod:`llmprod.router.policies`, :mod:`llmprod.router.complexity`) decides where
each request goes:

- :class:`~llmprod.router.complexity.ComplexityPolicy` scores the prompt from
  cheap text features and sends high scores to the expensive engine, before
  anything runs.
- :class:`~llmprod.router.policies.CascadePolicy` answers with the cheapest engine
  first, with token log-probabilities switched on, and escalates to the next
  engine when the answer's confidence is below a threshold. The escalated answer
  is returned; both calls are paid for.

Every method runs the same keep-or-escalate core
(:mod:`llmprod.router.escalation`); ``router.stats()`` counts requests, calls,
tokens and cost per engine, escalations, and the cost saved against sending
everything to the most expensive engine (:mod:`llmprod.router.accounting`).

>>> router = Router({"small": small, "large": large},  # doctest: +SKIP
...                 CascadePolicy(min_confidence=-0.8))
>>> router.generate("Why is the sky blue?")[0].flags["route"]  # doctest: +SKIP
{'engine': 'large', 'tried': ['small', 'large'], 'confidence': [...], ...}
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from llmprod.engine import inputs
from llmprod.engine.inputs import Message, Prompt
from llmprod.errors import InvalidConfigError, InvalidRequestError
from llmprod.outputs import Completion, Delta
from llmprod.router import escalation
from llmprod.router.accounting import Ledger, Price
from llmprod.router.policies import RoutePlan, RouteQuery, RoutingPolicy
from llmprod.sampling_params import SamplingParams

if TYPE_CHECKING:
    from llmprod.engine.engine import Engine

__all__ = ["Router"]


def _conversation_text(messages: Sequence[Message]) -> str:
    users = [str(m.get("content", "")) for m in messages if m.get("role") == "user"]
    if not users:
        users = [str(m.get("content", "")) for m in messages]
    return "\n".join(users)


class Router:
    """Engines of different cost behind the Engine's API, one chosen per request.

    Thread-safe: the counters behind :meth:`stats` are updated under a lock, and
    each engine already accepts calls from many threads.

    Args:
        engines: name -> Engine. The engines stay the caller's; :meth:`close`
            closes them all when asked.
        policy: a :class:`RoutingPolicy` (:class:`ComplexityPolicy`,
            :class:`CascadePolicy`, or your own).
        order: the names from cheapest to most expensive (default: the order of
            ``engines``). The last one is the baseline for "cost saved".
        prices: optional name -> price, used for a call whose Completion carries
            no cost (the engine has no price table) and for the baseline. A price
            is an object with ``cost(prompt_tokens=, completion_tokens=)`` such as
            ``llmprod.ops.pricing.PriceTable``, a float per 1K tokens, or a pair
            ``(per 1K prompt tokens, per 1K completion tokens)``.

    Raises:
        InvalidConfigError: no engines, an ``order`` that is not a permutation of
            the names, or prices for unknown names.
    """

    def __init__(
        self,
        engines: Mapping[str, Engine],
        policy: RoutingPolicy,
        *,
        order: Sequence[str] | None = None,
        prices: Mapping[str, Price] | None = None,
    ) -> None:
        if not engines:
            raise InvalidConfigError("a Router needs at least one engine", "engines")
        self.engines: dict[str, Engine] = dict(engines)
        names = list(self.engines)
        self.order: list[str] = list(order) if order is not None else names
        if sorted(self.order) != sorted(names) or len(set(self.order)) != len(names):
            raise InvalidConfigError(
                f"order={self.order!r} must name each engine once: {sorted(names)}",
                "order",
            )
        self.prices: dict[str, Price] = dict(prices or {})
        unknown = set(self.prices) - set(names)
        if unknown:
            raise InvalidConfigError(
                f"prices for unknown engines {sorted(unknown)}; engines are {names}",
                "prices",
            )
        if not isinstance(policy, RoutingPolicy):
            raise InvalidConfigError(
                f"policy must be a RoutingPolicy, got {type(policy).__name__}", "policy"
            )
        self.policy = policy
        self._ledger = Ledger(self.order, self.prices, self.engines)

    # ---------------------------------------------------------------- accounting
    @property
    def most_expensive(self) -> str:
        """Name of the last engine in the order (the "always" baseline)."""
        return self.order[-1]

    def stats(self) -> dict[str, Any]:
        """Counters since the Router was built (or :meth:`reset_stats`).

        Returns:
            A dict of plain values:

            - ``requests``: requests answered; ``escalations``: answers dropped
              for a more expensive engine's.
            - ``routes``: per engine ``requests`` (answers returned), ``calls``
              (runs, escalated ones included), ``escalated``, ``prompt_tokens``,
              ``completion_tokens``, ``cost``, ``share`` (of requests answered).
            - ``cost``: everything paid, escalated calls included.
            - ``baseline_cost``: the estimated cost of sending every request to
              the most expensive engine alone: its actual cost where it answered
              first time, else its price for the same prompt tokens and the
              returned answer's completion tokens. None when that engine has no
              known price.
            - ``cost_saved`` = ``baseline_cost - cost`` (negative when
              escalations cost more than they saved) and ``cost_saved_fraction``
              (of the baseline); None when the baseline is unknown or zero.
        """
        return self._ledger.snapshot(self.policy.describe())

    def reset_stats(self) -> None:
        """Set every counter of :meth:`stats` back to zero."""
        self._ledger.reset()

    # ------------------------------------------------------------------ planning
    def _tokenizer(self) -> Any:
        return self.engines[self.order[0]].tokenizer

    def _query_of_prompt(self, prompt: Prompt) -> RouteQuery:
        tok = self._tokenizer()
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty", "prompt")
            return RouteQuery(prompt, len(tok.encode(prompt, add_special_tokens=False)))
        ids = list(prompt)
        return RouteQuery(tok.decode(ids, skip_special_tokens=True), len(ids))

    def _query_of_messages(self, messages: Sequence[Message]) -> RouteQuery:
        inputs.check_messages(messages)
        text = _conversation_text(messages)
        return RouteQuery(
            text, len(self._tokenizer().encode(text, add_special_tokens=False))
        )

    def _query_of_any(self, prompt: Prompt | Sequence[Message]) -> RouteQuery:
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            return self._query_of_messages(prompt)  # type: ignore[arg-type]
        return self._query_of_prompt(prompt)  # type: ignore[arg-type]

    def route(self, prompt: Prompt | Sequence[Message]) -> RoutePlan:
        """The plan the policy makes for one prompt or conversation, without running it.

        Args:
            prompt: a string, token ids, or a conversation.

        Returns:
            The policy's :class:`RoutePlan`.
        """
        return self._plans([self._query_of_any(prompt)])[0]

    def _plans(self, queries: Sequence[RouteQuery]) -> list[RoutePlan]:
        plans = self.policy.plan_batch(queries, self.order)
        for p in plans:
            if not p.routes or any(r not in self.engines for r in p.routes):
                raise InvalidConfigError(
                    f"policy {self.policy.describe()} planned {p.routes!r}; engines "
                    f"are {self.order}",
                    "policy",
                )
        return plans

    def _core(
        self, queries: Sequence[RouteQuery], plist: Sequence[SamplingParams]
    ) -> escalation.Core:
        """Plan the requests and start the keep-or-escalate core on them."""
        plans = self._plans(queries)
        return escalation.keep_or_escalate(
            plans, plist, self.order, self.policy, self._ledger
        )

    # ---------------------------------------------------------------- public API
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        progress: bool = False,
        tenant: str = "default",
        return_exceptions: bool = False,
        wait_timeout: float | None = None,
        grounding_context: str | None = None,
        adapter: str | Sequence[str | None] | None = None,
    ) -> list[Completion]:
        """Like :meth:`Engine.generate`, each prompt answered by the engine the
        policy picks; prompts bound for the same engine run as one batch.

        Each returned Completion has ``flags["route"]``: ``engine`` (who
        answered), ``tried`` (every engine that ran it), ``confidence`` (the
        cascade signal per try, None where not judged) and ``score`` (the
        complexity score, if any).

        Args:
            prompts: a string, token ids, or a list of either. Token ids must
                suit every engine's tokenizer.
            params: one SamplingParams for all, or one per prompt.
            progress: show a progress bar per engine batch.
            tenant: who is asking (passed to the engines).
            return_exceptions: as in :meth:`Engine.generate`.
            wait_timeout: as in :meth:`Engine.generate`, for each engine call.
            grounding_context: as in :meth:`Engine.generate`; every engine call
                scores its answers (escalated ones too), so the answer returned
                carries ``flags["grounding"]`` from the engine that gave it.
            adapter: the LoRA adapter per request (one name, one per prompt, or
                None), as in :meth:`Engine.generate`. Each engine a plan may
                reach must have loaded it under that name
                (:meth:`Engine.load_adapter`); one that has not fails that
                request with an error naming ``adapter``.

        Returns:
            One Completion per prompt, in input order.
        """
        batch = inputs.as_prompt_list(prompts)
        plist = inputs.params_list(params, len(batch))
        inputs.adapter_list(adapter, len(batch))
        core = self._core([self._query_of_prompt(p) for p in batch], plist)
        return escalation.run(
            core,
            self.engines,
            lambda _engine, i: batch[i],
            progress=progress,
            tenant=tenant,
            return_exceptions=return_exceptions,
            wait_timeout=wait_timeout,
            grounding_context=grounding_context,
            adapter=adapter,
        )

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        **kwargs: Any,
    ) -> Completion | list[Completion]:
        """Like :meth:`Engine.chat`: one conversation gives a Completion, a list of
        them a list. Each engine renders the messages with its own chat template;
        the policy reads the user turns.

        Args:
            messages: a conversation or a list of conversations.
            params: one SamplingParams for all, or one per conversation.
            **kwargs: the keyword arguments of :meth:`generate` (``progress``,
                ``tenant``, ``return_exceptions``, ``wait_timeout``,
                ``grounding_context``, ``adapter``).

        Returns:
            A Completion, or a list of them.
        """
        single = inputs.is_conversation(messages)
        convs: list[Sequence[Message]] = (
            [messages] if single else list(messages)  # type: ignore[list-item, arg-type]
        )
        if not convs:
            raise InvalidRequestError("messages is empty", "messages")
        plist = inputs.params_list(params, len(convs))
        core = self._core([self._query_of_messages(c) for c in convs], plist)
        outs = escalation.run(
            core, self.engines, lambda engine, i: engine.render_chat(convs[i]), **kwargs
        )
        return outs[0] if single else outs

    async def agenerate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        tenant: str = "default",
        return_exceptions: bool = False,
        wait_timeout: float | None = None,
        adapter: str | Sequence[str | None] | None = None,
    ) -> list[Completion]:
        """Async :meth:`generate` (each engine batch is awaited in turn).

        Args:
            prompts: a string, token ids, or a list of either.
            params: one SamplingParams for all, or one per prompt.
            tenant: who is asking.
            return_exceptions: as in :meth:`Engine.agenerate`.
            wait_timeout: as in :meth:`Engine.agenerate`, for each engine call.
            adapter: as in :meth:`generate`.

        Returns:
            One Completion per prompt, in input order.
        """
        batch = inputs.as_prompt_list(prompts)
        plist = inputs.params_list(params, len(batch))
        inputs.adapter_list(adapter, len(batch))
        core = self._core([self._query_of_prompt(p) for p in batch], plist)
        return await escalation.arun(
            core,
            self.engines,
            lambda _engine, i: batch[i],
            tenant=tenant,
            return_exceptions=return_exceptions,
            wait_timeout=wait_timeout,
            adapter=adapter,
        )

    def stream(
        self,
        prompt: Prompt | Sequence[Message],
        params: SamplingParams | None = None,
        *,
        tenant: str = "default",
        wait_timeout: float | None = None,
        adapter: str | None = None,
    ) -> Iterator[Delta]:
        """Like :meth:`Engine.stream`, from the engine the policy picks.

        With a one-engine plan (complexity routing) the engine's stream passes
        through as it is produced. In a cascade, an answer that may still be
        refused cannot be shown early: each try but the last runs to the end
        first; a kept answer then arrives as one final Delta, and an escalated
        request streams live from the engine that answers. The final Delta's
        completion carries ``flags["route"]``; a stream left early is not counted.

        Args:
            prompt: a string, token ids, or a conversation.
            params: sampling parameters.
            tenant: who is asking.
            wait_timeout: as in :meth:`Engine.stream`, for each engine call.
            adapter: as in :meth:`generate`.

        Returns:
            An iterator of Deltas; exactly one, the last, has ``finish_reason``.
        """
        sp = params or SamplingParams()
        core = self._core([self._query_of_any(prompt)], [sp])
        return escalation.stream(
            core,
            self.engines,
            prompt,
            tenant=tenant,
            wait_timeout=wait_timeout,
            adapter=adapter,
        )

    async def astream(
        self,
        prompt: Prompt | Sequence[Message],
        params: SamplingParams | None = None,
        *,
        tenant: str = "default",
        wait_timeout: float | None = None,
        adapter: str | None = None,
    ) -> AsyncIterator[Delta]:
        """Async :meth:`stream`, with the same cascade behaviour.

        Args:
            prompt: a string, token ids, or a conversation.
            params: sampling parameters.
            tenant: who is asking.
            wait_timeout: as in :meth:`Engine.astream`, for each engine call.
            adapter: as in :meth:`generate`.

        Yields:
            Deltas; exactly one, the last, has ``finish_reason``.
        """
        sp = params or SamplingParams()
        core = self._core([self._query_of_any(prompt)], [sp])
        deltas = escalation.astream(
            core,
            self.engines,
            prompt,
            tenant=tenant,
            wait_timeout=wait_timeout,
            adapter=adapter,
        )
        try:
            async for d in deltas:
                yield d
        finally:
            await deltas.aclose()

    def close(self) -> None:
        """Close every engine of the Router (each close is idempotent)."""
        for engine in self.engines.values():
            engine.close()

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
