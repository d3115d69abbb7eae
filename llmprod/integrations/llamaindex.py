"""LlamaIndex LLM on an llmprod :class:`~llmprod.Engine`: ``LLMProdLLM``.

>>> from llmprod.integrations.llamaindex import LLMProdLLM  # doctest: +SKIP
>>> llm = LLMProdLLM(model="smollm2-135m", max_tokens=32, temperature=0)  # doctest: +SKIP
>>> llm.complete("The capital of France is").text  # doctest: +SKIP

``complete``/``stream_complete`` continue the raw prompt (no chat template);
``chat``/``stream_chat`` render the messages with the model's chat template, as
:meth:`Engine.chat` does. The async forms go through :meth:`Engine.agenerate` and
:meth:`Engine.astream`. ``metadata`` reports the engine's ``max_model_len`` as the
context window, so LlamaIndex's prompt helpers size their chunks to it.

Needs ``pip install 'llmprod[llamaindex]'``.
"""

# ruff: noqa: E402
from __future__ import annotations

from llmprod.integrations import require

require("llama_index.core", "llamaindex")

from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from pydantic import Field, PrivateAttr

from llmprod.outputs import Completion
from llmprod.sampling_params import SamplingParams

# Call-time keyword arguments that become SamplingParams fields.
_SAMPLING_KWARGS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "repetition_penalty",
    "stop",
)


class LLMProdLLM(CustomLLM):
    """A LlamaIndex LLM answered by an in-process llmprod Engine.

    Pass an existing ``engine=``, or a ``model`` name/path and ``engine_kwargs``
    to build one (then call :meth:`close` when done). Sampling fields left
    ``None`` take :class:`~llmprod.SamplingParams`' defaults; each may also be
    given per call (``llm.complete(p, max_tokens=8)``).
    """

    engine: Any = Field(default=None, exclude=True)
    """The :class:`~llmprod.Engine` that answers; built from ``model`` if None."""
    model: str = Field(default="smollm2-135m")
    """Registered model name, transformers folder or GGUF file (with ``engine``
    given, the engine's own name)."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Options for :meth:`Engine.from_pretrained` when the engine is built here."""
    max_tokens: int = Field(default=256, gt=0)
    """Most tokens per answer (LlamaIndex's ``num_output``)."""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    stop: list[str] | None = None
    """Strings that end generation (excluded from the answer)."""
    tenant: str = "default"
    """Who is asking, for the engine's per-tenant limits and accounting."""

    _owns_engine: bool = PrivateAttr(default=False)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.engine is None:
            from llmprod import Engine

            self.engine = Engine.from_pretrained(self.model, **self.engine_kwargs)
            self._owns_engine = True
        else:
            self.model = str(self.engine.model_name)

    def close(self) -> None:
        """Close the engine if this LLM built it (a given engine stays open)."""
        if self._owns_engine:
            self.engine.close()

    @classmethod
    def class_name(cls) -> str:
        return "LLMProdLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=int(self.engine.max_model_len),
            num_output=self.max_tokens,
            is_chat_model=True,
            model_name=self.model,
        )

    # ------------------------------------------------------------------ requests
    def _params(self, kwargs: dict[str, Any]) -> SamplingParams:
        fields = {}
        for name in _SAMPLING_KWARGS:
            value = kwargs.get(name, getattr(self, name))
            if value is not None:
                fields[name] = value
        return SamplingParams(**fields)

    def _prompt(self, prompt: str, formatted: bool) -> str:
        if formatted or self.completion_to_prompt is None:
            return prompt
        return self.completion_to_prompt(prompt)

    @llm_completion_callback()
    def complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        (c,) = self.engine.generate(
            self._prompt(prompt, formatted), self._params(kwargs), tenant=self.tenant
        )
        return CompletionResponse(text=c.text, raw=c, additional_kwargs=_usage(c))

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        deltas = self.engine.stream(
            self._prompt(prompt, formatted), self._params(kwargs), tenant=self.tenant
        )

        def gen() -> CompletionResponseGen:
            text = ""
            for d in deltas:
                text += d.text
                if d.text or d.completion is not None:
                    yield _completion_piece(text, d.text, d.completion)

        return gen()

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        c = self.engine.chat(
            to_engine_messages(messages), self._params(kwargs), tenant=self.tenant
        )
        return _chat_piece(c.text, None, c)

    @llm_chat_callback()
    def stream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseGen:
        deltas = self.engine.stream(
            to_engine_messages(messages), self._params(kwargs), tenant=self.tenant
        )

        def gen() -> ChatResponseGen:
            text = ""
            for d in deltas:
                text += d.text
                if d.text or d.completion is not None:
                    yield _chat_piece(text, d.text, d.completion)

        return gen()

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        (c,) = await self.engine.agenerate(
            [self._prompt(prompt, formatted)], self._params(kwargs), tenant=self.tenant
        )
        return CompletionResponse(text=c.text, raw=c, additional_kwargs=_usage(c))

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        deltas = self.engine.astream(
            self._prompt(prompt, formatted), self._params(kwargs), tenant=self.tenant
        )

        async def gen() -> CompletionResponseAsyncGen:
            text = ""
            async for d in deltas:
                text += d.text
                if d.text or d.completion is not None:
                    yield _completion_piece(text, d.text, d.completion)

        return gen()

    @llm_chat_callback()
    async def achat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponse:
        (c,) = await self.engine.agenerate(
            [to_engine_messages(messages)], self._params(kwargs), tenant=self.tenant
        )
        return _chat_piece(c.text, None, c)

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        deltas = self.engine.astream(
            to_engine_messages(messages), self._params(kwargs), tenant=self.tenant
        )

        async def gen() -> ChatResponseAsyncGen:
            text = ""
            async for d in deltas:
                text += d.text
                if d.text or d.completion is not None:
                    yield _chat_piece(text, d.text, d.completion)

        return gen()


def to_engine_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """LlamaIndex messages as the engine's ``{"role", "content"}`` dicts."""
    out = []
    for m in messages:
        role = m.role.value if isinstance(m.role, MessageRole) else str(m.role)
        out.append({"role": role, "content": m.content or ""})
    return out


def _usage(c: Completion | None) -> dict[str, Any]:
    if c is None:
        return {}
    u = c.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "cached_prompt_tokens": u.cached_prompt_tokens,
        "finish_reason": c.finish_reason,
    }


def _completion_piece(
    text: str, delta: str, c: Completion | None
) -> CompletionResponse:
    """A stream piece: the text so far and the new part; the last carries the
    Completion (``raw``) and its usage."""
    return CompletionResponse(
        text=text, delta=delta, raw=c, additional_kwargs=_usage(c)
    )


def _chat_piece(text: str, delta: str | None, c: Completion | None) -> ChatResponse:
    return ChatResponse(
        message=ChatMessage(role=MessageRole.ASSISTANT, content=text),
        delta=delta,
        raw=c,
        additional_kwargs=_usage(c),
    )
