"""LangChain chat model on an llmprod :class:`~llmprod.Engine`: ``ChatLLMProd``.

>>> from llmprod.integrations.langchain import ChatLLMProd  # doctest: +SKIP
>>> chat = ChatLLMProd(model="smollm2-135m", max_tokens=32, temperature=0)  # doctest: +SKIP
>>> chat.invoke("Hi").usage_metadata  # doctest: +SKIP
{'input_tokens': 31, 'output_tokens': 9, 'total_tokens': 40, ...}

The engine runs in this process: ``invoke``/``batch`` go through
:meth:`Engine.chat`/:meth:`Engine.generate`, ``ainvoke`` through
:meth:`Engine.agenerate`, ``stream``/``astream`` through :meth:`Engine.stream` and
:meth:`Engine.astream`. ``with_structured_output`` constrains decoding with
llmprod's structured outputs (docs/structured-output.md), so the answer parses
by construction. Tool calling is not offered: the model has no tool format.

Needs ``pip install 'llmprod[langchain]'``.
"""

# ruff: noqa: E402
from __future__ import annotations

from llmprod.integrations import require

require("langchain_core", "langchain")

from collections.abc import AsyncIterator, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from llmprod.outputs import Completion
from llmprod.sampling_params import SamplingParams
from llmprod.structured import StructuredOutputs

_ROLES: dict[type[BaseMessage], str] = {
    SystemMessage: "system",
    HumanMessage: "user",
    AIMessage: "assistant",
    ToolMessage: "tool",
}

# Call-time keyword arguments that become SamplingParams fields.
_SAMPLING_KWARGS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "repetition_penalty",
)


class ChatLLMProd(BaseChatModel):
    """A LangChain chat model answered by an in-process llmprod Engine.

    Pass an existing ``engine=`` (shared with the rest of the application), or a
    ``model`` name/path and ``engine_kwargs`` to build one (then call
    :meth:`close` when done). Sampling fields left ``None`` take
    :class:`~llmprod.SamplingParams`' defaults; any of them can also be given
    per call (``chat.invoke(msgs, max_tokens=8)``) or with ``.bind(...)``.
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    engine: Any = Field(default=None, exclude=True)
    """The :class:`~llmprod.Engine` that answers; built from ``model`` if None."""
    model_name: str = Field(default="smollm2-135m", alias="model")
    """Registered model name, transformers folder or GGUF file (with ``engine``
    given, the engine's own name)."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Options for :meth:`Engine.from_pretrained` when the engine is built here."""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    stop: list[str] | None = None
    """Strings that end generation (excluded from the answer)."""
    tenant: str = "default"
    """Who is asking, for the engine's per-tenant limits and accounting."""
    streaming: bool = False
    """Answer ``invoke`` by streaming (callbacks then see every token)."""

    _owns_engine: bool = PrivateAttr(default=False)

    @model_validator(mode="after")
    def _build_engine(self) -> ChatLLMProd:
        if self.engine is None:
            from llmprod import Engine

            self.engine = Engine.from_pretrained(self.model_name, **self.engine_kwargs)
            self._owns_engine = True
        else:
            self.model_name = str(self.engine.model_name)
        return self

    def close(self) -> None:
        """Close the engine if this model built it (a given engine stays open)."""
        if self._owns_engine:
            self.engine.close()

    @property
    def _llm_type(self) -> str:
        return "llmprod"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            **{k: getattr(self, k) for k in _SAMPLING_KWARGS},
            "stop": self.stop,
        }

    def _get_ls_params(
        self, stop: list[str] | None = None, **kwargs: Any
    ) -> LangSmithParams:
        model = kwargs.get("model")
        params = LangSmithParams(
            ls_provider="llmprod",
            ls_model_name=model if isinstance(model, str) else self.model_name,
            ls_model_type="chat",
        )
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = float(temperature)
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = int(max_tokens)
        if stop := stop or self.stop:
            params["ls_stop"] = list(stop)
        return params

    # ------------------------------------------------------------------ requests
    def _params(self, stop: list[str] | None, kwargs: dict[str, Any]) -> SamplingParams:
        model = kwargs.get("model", self.model_name)
        if model != self.model_name:
            # One engine holds one model's weights: never answer with another.
            raise ValueError(
                f"model={model!r}: this ChatLLMProd serves {self.model_name!r} only; "
                "build another ChatLLMProd for another model"
            )
        fields: dict[str, Any] = {}
        for name in _SAMPLING_KWARGS:
            value = kwargs.get(name, getattr(self, name))
            if value is not None:
                fields[name] = value
        stops = stop if stop is not None else self.stop
        if stops:
            fields["stop"] = tuple(stops)
        structured = kwargs.get("structured")
        if structured is not None:
            fields["structured"] = structured
        return SamplingParams(**fields)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        completion = self.engine.chat(
            to_engine_messages(messages), self._params(stop, kwargs), tenant=self.tenant
        )
        return self._result(completion)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        (completion,) = await self.engine.agenerate(
            [to_engine_messages(messages)],
            self._params(stop, kwargs),
            tenant=self.tenant,
        )
        return self._result(completion)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        deltas = self.engine.stream(
            to_engine_messages(messages), self._params(stop, kwargs), tenant=self.tenant
        )
        for delta in deltas:
            if delta.text:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta.text))
                if run_manager is not None:
                    run_manager.on_llm_new_token(delta.text, chunk=chunk)
                yield chunk
            if delta.completion is not None:
                yield self._last_chunk(delta.completion)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        deltas = self.engine.astream(
            to_engine_messages(messages), self._params(stop, kwargs), tenant=self.tenant
        )
        async for delta in deltas:
            if delta.text:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta.text))
                if run_manager is not None:
                    await run_manager.on_llm_new_token(delta.text, chunk=chunk)
                yield chunk
            if delta.completion is not None:
                yield self._last_chunk(delta.completion)

    def _metadata(self, completion: Completion) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "model_provider": "llmprod",
            "finish_reason": completion.finish_reason,
            "cost": completion.usage.cost,
            "cache_hit": completion.cache_hit,
        }

    def _result(self, completion: Completion) -> ChatResult:
        message = AIMessage(
            content=completion.text,
            usage_metadata=usage_metadata(completion),
            response_metadata=self._metadata(completion),
        )
        if completion.parsed is not None:
            message.additional_kwargs["parsed"] = completion.parsed
        info = {"finish_reason": completion.finish_reason}
        return ChatResult(
            generations=[ChatGeneration(message=message, generation_info=info)],
            llm_output={"model_name": self.model_name},
        )

    def _last_chunk(self, completion: Completion) -> ChatGenerationChunk:
        """The closing chunk: no text, the usage and metadata (counted once)."""
        return ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                usage_metadata=usage_metadata(completion),
                response_metadata=self._metadata(completion),
                chunk_position="last",
            ),
            generation_info={"finish_reason": completion.finish_reason},
        )

    # --------------------------------------------------------- structured output
    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        include_raw: bool = False,
        method: Literal["json_schema", "json_mode", "function_calling"] = "json_schema",
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """A runnable whose answers match ``schema`` (constrained decoding).

        Args:
            schema: a pydantic model (answers are instances of it), a TypedDict,
                or a JSON Schema dict (answers are dicts). May be None with
                ``method="json_mode"`` (any JSON object).
            include_raw: return ``{"raw": AIMessage, "parsed": ...,
                "parsing_error": ...}`` instead of the parsed answer.
            method: ``"json_schema"`` (the default) decodes only documents valid
                against the schema. ``"json_mode"`` decodes any JSON object, or,
                with a schema, documents valid against it (a small model does
                not follow a format from instructions alone).
                ``"function_calling"`` is taken as ``"json_schema"``: there is
                no tool format, the schema is enforced all the same.
            **kwargs: call options bound to the model (e.g. ``max_tokens``).
        """
        if method not in ("json_schema", "json_mode", "function_calling"):
            raise ValueError(
                f"method={method!r} must be 'json_schema', 'json_mode' or "
                "'function_calling'"
            )
        if schema is None and method != "json_mode":
            raise ValueError("schema is required unless method='json_mode'")
        json_schema = None if schema is None else convert_to_json_schema(schema)
        structured = (
            StructuredOutputs(json_object=True)
            if json_schema is None
            else StructuredOutputs(json=json_schema)
        )
        llm = self.bind(
            structured=structured,
            ls_structured_output_format={
                "kwargs": {"method": method},
                "schema": schema if schema is not None else {"type": "object"},
            },
            **kwargs,
        )
        parser: Runnable[Any, Any]
        if isinstance(schema, type) and is_basemodel_subclass(schema):
            parser = PydanticOutputParser(pydantic_object=schema)
        else:
            parser = JsonOutputParser()
        if not include_raw:
            return llm | parser
        parse = RunnablePassthrough.assign(
            parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
        )
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parse.with_fallbacks(
            [fallback], exception_key="parsing_error"
        )


def to_engine_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as the engine's ``{"role", "content"}`` dicts.

    Text content blocks are joined; other blocks (images, files) are refused,
    since the model reads text only.
    """
    out: list[dict[str, str]] = []
    for m in messages:
        if isinstance(m, ChatMessage):
            role = m.role
        else:
            role = next((r for cls, r in _ROLES.items() if isinstance(m, cls)), m.type)
        out.append({"role": role, "content": _text(m.content)})
    return out


def _text(content: str | list[Any]) -> str:
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block)
            raise ValueError(
                f"content block of type {kind!r}: the model reads text only"
            )
    return "".join(parts)


def usage_metadata(completion: Completion) -> UsageMetadata:
    """The completion's token counts in LangChain's shape (prefix-cache hits as
    ``input_token_details["cache_read"]``)."""
    u = completion.usage
    return UsageMetadata(
        input_tokens=u.prompt_tokens,
        output_tokens=u.completion_tokens,
        total_tokens=u.prompt_tokens + u.completion_tokens,
        input_token_details={"cache_read": u.cached_prompt_tokens},
        output_token_details={},
    )
