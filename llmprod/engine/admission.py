"""Admission: what happens to a prompt in the caller's thread, before the model.

validate -> prompt guards -> tokenize and check lengths -> tenant limits, one
prompt at a time; a batch is admitted whole or not at all (a refused prompt gives
back the limits its earlier prompts took). The answer-cache lookup comes last,
at submit (:meth:`Admission.lookup`).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from llmprod.answers.caches import conversation_text
from llmprod.config import EngineConfig
from llmprod.engine import inputs
from llmprod.engine.inputs import Message, Prompt
from llmprod.errors import (
    EngineClosedError,
    InvalidRequestError,
    LLMProdError,
    RateLimited,
    RequestFailedError,
)
from llmprod.exec.sampler import seeded_generator
from llmprod.ops.guards import apply_guards
from llmprod.outputs import Completion
from llmprod.sampling_params import SamplingParams
from llmprod.sched.request import Request

logger = logging.getLogger("llmprod")

_MARK = re.compile("\ue000(\\d+)\ue001")
"""A message's place in a template rendered around placeholders."""

if TYPE_CHECKING:
    from llmprod.answers.caches import AnswerCaches
    from llmprod.lora.manager import LoRAManager
    from llmprod.ops.limits import Throttle
    from llmprod.structured.backend import GrammarBackend


class Admission:
    """Turns prompts into admitted :class:`Request` objects, or raises.

    Args:
        config: the engine's config (guards, prices).
        tokenizer: the model's tokenizer.
        model_name: for error messages.
        vocab_size, max_model_len: limits a prompt is checked against.
        num_blocks, block_size: the KV pool a request must fit.
        device: where seeded requests' generators live.
        throttle: tenant limits, or None.
        answers: the answer caches, or None.
        grammars: compiles structured-output constraints, or None.
    """

    def __init__(
        self,
        config: EngineConfig,
        tokenizer: Any,
        model_name: str,
        vocab_size: int,
        max_model_len: int,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        throttle: Throttle | None,
        answers: AnswerCaches | None,
        grammars: GrammarBackend | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.grammars = grammars
        self.lora: LoRAManager | None = None
        """The engine's adapters, once one is loaded."""
        """Compiles structured-output constraints (None: they are refused)."""
        self.model_name = model_name
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = device
        self.guards = list(config.guards or [])
        self.prices = config.prices
        self.allow_special_tokens_in_content = config.allow_special_tokens_in_content
        self.is_tenant_scoped = config.cache_scope == "tenant"
        """Requests of different tenants share no KV prefix blocks."""
        self._added_token_texts: dict[str, list[str]] = {}
        """Texts the tokenizer turns into one added (often control) token, by
        their first two characters: a model may have thousands (Gemma 3 has
        6,384), and content is searched only for those whose start it holds."""
        for text in getattr(tokenizer, "added_tokens_encoder", {}):
            self._added_token_texts.setdefault(text[:2], []).append(text)
        self.throttle = throttle
        self.answers = answers
        self.is_closed = False
        """Set by the engine when it closes: new prompts are refused."""
        self.closed_because: BaseException | None = None
        """Why the engine stopped taking requests, when it stopped on a failure."""
        self._ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:8]

    def admit_batch(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None,
        tenant: str,
        return_exceptions: bool,
        wait_timeout: float | None,
        submit: Callable[[int, Request], None],
        adapter: str | Sequence[str | None] | None = None,
    ) -> list[Request | LLMProdError]:
        """Admit a batch and hand each admitted request to ``submit`` (with its
        index). Every prompt is validated before any takes a tenant limit, so
        a bad prompt holds no slot or token budget. Bad input raises here,
        naming its index, unless ``return_exceptions`` keeps the error in its
        place (see :meth:`_take_batch_limits` for refused limits). Where this
        raises after submitting, the caller aborts what it submitted."""
        inputs.check_tenant(tenant)
        batch = inputs.as_prompt_list(prompts)
        plist = inputs.params_list(params, len(batch))
        alist = inputs.adapter_list(adapter, len(batch))
        built: list[Request | LLMProdError] = []
        for i, (p, sp, a) in enumerate(zip(batch, plist, alist)):
            try:
                built.append(self.build(p, sp, tenant, a))
            except InvalidRequestError as exc:
                if not return_exceptions:
                    if len(batch) > 1:
                        raise type(exc)(f"prompts[{i}]: {exc}", exc.field) from exc
                    raise
                built.append(exc)
            except EngineClosedError:
                raise
            except Exception as exc:  # a prompt guard or tokenizer of the user's
                logger.exception("admitting prompts[%d] failed", i)
                err = RequestFailedError(f"prompts[{i}] failed at admission: {exc!r}")
                if not return_exceptions:
                    raise err from exc
                built.append(err)
        self._take_batch_limits(built, return_exceptions, wait_timeout, submit)
        return built

    def _take_batch_limits(
        self,
        built: list[Request | LLMProdError],
        return_exceptions: bool,
        wait_timeout: float | None,
        submit: Callable[[int, Request], None],
    ) -> None:
        """Take the batch's limits and submit it.

        Without waiting, the batch is admitted whole or not at all: a refusal
        gives back what the batch took, and nothing has run. Where a prompt must
        wait for a slot, what the batch holds is submitted first, so the batch
        never waits on slots that only its own requests would free; a refusal
        after that raises (or stays in place) and the caller aborts what ran.
        """
        taken: list[tuple[int, Request]] = []
        waiting_from = len(built)
        will_wait = wait_timeout is not None and wait_timeout > 0
        try:
            for i, r in enumerate(built):
                if not isinstance(r, Request):
                    continue
                try:
                    self.take_limits(r, None, count_refusal=not will_wait)
                    taken.append((i, r))
                except RateLimited as exc:
                    if will_wait:
                        waiting_from = i
                        break
                    if not return_exceptions:
                        raise
                    built[i] = exc
        except BaseException:
            for _, r in taken:  # nothing of this batch runs: give the limits back
                self.release(r)
            raise
        for i, r in taken:
            submit(i, r)
        for i in range(waiting_from, len(built)):
            r = built[i]
            if not isinstance(r, Request):
                continue
            try:
                self.take_limits(r, wait_timeout)
            except RateLimited as exc:
                if not return_exceptions:
                    raise
                built[i] = exc
                continue
            submit(i, r)

    def admit(
        self,
        prompt: Prompt | Sequence[Message],
        params: SamplingParams,
        tenant: str,
        wait_timeout: float | None = None,
        adapter: str | None = None,
    ) -> Request:
        """Validate, guard, tokenize and admit one prompt or conversation."""
        inputs.check_tenant(tenant)
        inputs.adapter_list(adapter, 1)
        try:
            req = self.build(prompt, params, tenant, adapter)
        except LLMProdError:
            raise
        except Exception as exc:  # a prompt guard or tokenizer of the user's
            raise RequestFailedError(f"prompt failed at admission: {exc!r}") from exc
        self.take_limits(req, wait_timeout)
        return req

    def build(
        self,
        prompt: Prompt | Sequence[Message],
        params: SamplingParams,
        tenant: str,
        adapter: str | None = None,
    ) -> Request:
        """A validated request, before limits: raises InvalidRequestError (or
        EngineClosedError), with no side effect."""
        if self.is_closed:
            why = self.closed_because
            raise EngineClosedError(
                "the engine is closed" + (f" ({why})" if why is not None else "")
            )
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(
                f"params must be SamplingParams, got {type(params).__name__}", "params"
            )
        inputs.check_prompt(prompt)
        inputs.check_token_ids(params, self.vocab_size)
        text = context = None
        flags: dict[str, Any] = {}
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            messages: list[Message] = list(prompt)  # type: ignore[arg-type]
            inputs.check_messages(messages)
            if self.guards:
                messages, flags = self._guard_messages(messages)
            ids = self.render_chat(messages)
            text, context = conversation_text(messages)
        else:
            ids = inputs.prompt_token_ids(prompt, self.tokenizer, self.vocab_size)  # type: ignore[arg-type]
            text = prompt if isinstance(prompt, str) else None
            if self.guards:
                seen = text if text is not None else self.tokenizer.decode(ids)
                res = apply_guards(self.guards, seen, "prompt")
                flags = res.flags
                if res.text != seen:  # redacted: the model sees the redacted text
                    text = res.text
                    ids = list(self.tokenizer.encode(text))
        if not ids:
            raise InvalidRequestError(
                "prompt is empty after the prompt guards", "prompt"
            )
        inputs.check_lengths(
            len(ids), params, self.max_model_len, self.num_blocks, self.block_size
        )
        rid = f"req-{self._id_prefix}-{next(self._ids)}"
        req = Request(rid, ids, params, tenant=tenant, text=text, context=context)
        if self.is_tenant_scoped:
            req.cache_keys = (f"tenant:{tenant}",)
        if adapter is not None:
            if self.lora is None:
                raise InvalidRequestError(
                    f"adapter {adapter!r} is not loaded (loaded: none); load it "
                    "with engine.load_adapter(name, path)",
                    "adapter",
                )
            req.adapter = adapter
            req.adapter_hash = self.lora.content_hash(adapter)
            req.cache_keys = (*req.cache_keys, f"adapter:{req.adapter_hash}")
        if params.structured is not None:
            if self.grammars is None:
                raise InvalidRequestError(
                    "structured outputs are not available on this engine", "structured"
                )
            req.matcher = self.grammars.matcher(params.structured)
        if params.seed is not None:
            req.generator = seeded_generator(params.seed, self.device)
        if flags:
            req.flags["guards"] = {"prompt": flags}
        return req

    def take_limits(
        self, req: Request, wait_timeout: float | None, count_refusal: bool = True
    ) -> None:
        """Take the tenant's limits for a built request (raises RateLimited)."""
        if self.throttle is None:
            return
        n = req.num_prompt_tokens
        max_tokens = req.params.max_tokens
        estimate = 0.0
        if self.prices is not None:
            try:
                estimate = float(self.prices.cost(n, max_tokens))
            except Exception as exc:  # a user's price table: only budgets lose it
                logger.warning("price table failed to estimate a request: %r", exc)
            if not math.isfinite(estimate) or estimate < 0:
                logger.warning("price table estimated cost=%r; using 0", estimate)
                estimate = 0.0
        req.ticket = self.throttle.admit(
            req.tenant,
            n + max_tokens,
            wait_timeout,
            estimated_cost=estimate,
            count_refusal=count_refusal,
        )

    @staticmethod
    def release(req: Request) -> None:
        """Give back the limits of a request that will not run."""
        if req.ticket is not None:
            req.ticket.release(0, 0.0)
            req.ticket = None

    def lookup(self, req: Request) -> Completion | None:
        """The cached answer to an admitted request, if an answer cache has one."""
        return self.answers.lookup(req) if self.answers is not None else None

    def render_chat(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of a conversation rendered with the chat template.

        Special-token text inside a message's content (``<|im_start|>system``...)
        is tokenized as plain text, so content cannot open a control turn;
        ``allow_special_tokens_in_content=True`` gives transformers' own
        tokenization of the rendered text instead.
        """
        inputs.check_messages(messages)
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(
                f"model {self.model_name!r} has no chat template; use generate()",
                "messages",
            )
        if self.allow_special_tokens_in_content or not any(
            self._holds_added_token(m["content"]) for m in messages
        ):
            text = self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=False
            )
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return self._render_with_plain_content(messages)

    def _holds_added_token(self, content: str) -> bool:
        return any(
            start in content and any(text in content for text in texts)
            for start, texts in self._added_token_texts.items()
        )

    def _render_with_plain_content(self, messages: Sequence[Message]) -> list[int]:
        """Render the template around placeholders, then tokenize the template's
        text as usual and each content with special tokens split into text."""
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        shells = [{**m, "content": marks[i]} for i, m in enumerate(messages)]
        text = self.tokenizer.apply_chat_template(
            shells, add_generation_prompt=True, tokenize=False
        )
        encode = self.tokenizer.encode
        ids: list[int] = []
        pos = 0
        for match in _MARK.finditer(text):
            ids += encode(text[pos : match.start()], add_special_tokens=False)
            content = messages[int(match.group(1))]["content"]
            ids += encode(content, add_special_tokens=False, split_special_tokens=True)
            pos = match.end()
        ids += encode(text[pos:], add_special_tokens=False)
        return ids

    def _guard_messages(
        self, messages: list[Message]
    ) -> tuple[list[Message], dict[str, Any]]:
        """Run the prompt guards over each message's content."""
        out: list[Message] = []
        flags: dict[str, Any] = {}
        for i, m in enumerate(messages):
            res = apply_guards(self.guards, m["content"], "prompt")
            out.append({**m, "content": res.text})
            if res.flags:
                flags[f"messages[{i}]"] = res.flags
        return out, flags
