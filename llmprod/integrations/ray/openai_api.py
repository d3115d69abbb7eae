"""The OpenAI-compatible HTTP surface: request parsing, response bodies, errors.

Nothing here imports Ray or FastAPI: a :class:`Backend` answers parsed
requests, and :func:`llmprod.integrations.ray.app.build_fastapi_app` serves any
backend under the OpenAI routes (``POST /v1/completions``,
``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /metrics``). The Ray
Serve deployments in :mod:`llmprod.integrations.ray.serve` are two such
backends.

Errors become OpenAI-style bodies ``{"error": {"message", "type", "param",
"code"}}`` (:func:`error_response`); every response carries the replica and the
model that answered, in the ``x-llmprod-replica`` / ``x-llmprod-model`` headers
and in a ``llmprod`` object of the body (of the last chunk when streaming).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmprod.engine import inputs
from llmprod.engine.inputs import Message, Prompt
from llmprod.errors import (
    EngineClosedError,
    GuardBlockedError,
    InvalidConfigError,
    InvalidRequestError,
    LLMProdError,
    RateLimited,
    RequestFailedError,
)
from llmprod.outputs import Completion, Delta
from llmprod.sampling_params import SamplingParams

__all__ = [
    "MODEL_HEADER",
    "REPLICA_HEADER",
    "Answer",
    "Backend",
    "ModelNotFoundError",
    "OpenAIRequest",
    "decode_error",
    "encode_error",
    "error_response",
    "parse_request",
]

REPLICA_HEADER = "x-llmprod-replica"
"""Response header: the Ray Serve replica that answered."""
MODEL_HEADER = "x-llmprod-model"
"""Response header: the served model (deployment) that answered."""
TENANT_HEADER = "x-llmprod-tenant"
"""Request header: the tenant (limits, accounting, cache scope); else the body's
``user``, else ``"default"``."""

# Completions default to 16 tokens in the OpenAI API; chat has no default there,
# so it takes SamplingParams' own.
_COMPLETIONS_MAX_TOKENS = 16

# OpenAI fields this server does not implement: a value other than these
# defaults is refused with a 400 naming the field, never silently ignored.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}

# Extension fields (vLLM-style, sent with the openai client's ``extra_body``)
# that map one to one onto SamplingParams.
_EXTRA_PARAMS = (
    "top_k",
    "min_tokens",
    "repetition_penalty",
    "ignore_eos",
    "stop_token_ids",
    "include_stop_str_in_output",
    "skip_special_tokens",
)


class ModelNotFoundError(InvalidRequestError):
    """The request names a model this server does not serve (HTTP 404)."""


@dataclass(slots=True)
class OpenAIRequest:
    """One parsed request to ``/v1/completions`` or ``/v1/chat/completions``."""

    kind: str
    """"completion" or "chat"."""
    model: str
    params: SamplingParams
    prompts: list[Prompt] = field(default_factory=list)
    """The completion prompts (one choice each); empty for chat."""
    messages: list[Message] = field(default_factory=list)
    """The conversation; empty for completions."""
    stream: bool = False
    include_usage: bool = False
    """``stream_options.include_usage``: end the stream with a usage chunk."""
    tenant: str = "default"


@dataclass(slots=True)
class Answer:
    """A completion and who produced it."""

    completion: Completion
    replica: str
    model: str


class Backend(Protocol):
    """What answers the OpenAI routes (one engine, or a router of deployments)."""

    def model_names(self) -> list[str]:
        """Names ``/v1/models`` lists and requests may ask for."""
        ...

    def identity(self) -> tuple[str, str]:
        """(replica, model) of this backend, for headers of responses that no
        engine produced (errors, model lists, metrics)."""
        ...

    async def complete(self, req: OpenAIRequest) -> list[Answer]:
        """Answer every prompt (or the conversation) of ``req``."""
        ...

    def stream(self, req: OpenAIRequest) -> AsyncIterator[tuple[Delta, str, str]]:
        """Stream the one prompt or conversation of ``req``: (delta, replica,
        model); the last delta carries ``finish_reason`` and the completion."""
        ...

    def metrics_text(self) -> tuple[bytes, str]:
        """The Prometheus exposition and its content type."""
        ...


# ------------------------------------------------------------------ parsing
def bad_request(message: str, param: str | None) -> InvalidRequestError:
    return InvalidRequestError(message, param)


def _text_of_content(content: Any, i: int) -> Any:
    """OpenAI content parts (``[{"type": "text", "text": ...}]``) as one string."""
    if not isinstance(content, list):
        return content
    texts = []
    for j, part in enumerate(content):
        if not (isinstance(part, Mapping) and part.get("type") == "text"):
            raise bad_request(
                f"messages[{i}].content[{j}]: only text parts are supported",
                "messages",
            )
        texts.append(str(part.get("text", "")))
    return "".join(texts)


def _messages(value: Any) -> list[Message]:
    if not isinstance(value, list):
        raise bad_request(
            "messages must be a list of {role, content} objects", "messages"
        )
    out: list[Message] = []
    for i, m in enumerate(value):
        if isinstance(m, Mapping) and "content" in m:
            # role and content only: names and tool fields have no template here
            m = {k: v for k, v in m.items() if k in ("role", "content")}
            m["content"] = _text_of_content(m["content"], i)
        out.append(m)
    inputs.check_messages(out)
    return out


def _prompts(value: Any) -> list[Prompt]:
    if value is None:
        raise bad_request("prompt is required", "prompt")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        return list(value)
    if isinstance(value, list) and value and all(isinstance(p, list) for p in value):
        return [list(p) for p in value]
    if isinstance(value, list) and value and all(type(t) is int for t in value):
        return [list(value)]
    raise bad_request(
        "prompt must be a string, a list of strings, a list of token ids or a list "
        "of token-id lists",
        "prompt",
    )


def parse_request(
    kind: str, body: Any, headers: Mapping[str, str] | None = None
) -> OpenAIRequest:
    """Check a JSON body and turn it into an :class:`OpenAIRequest`.

    Args:
        kind: "completion" or "chat".
        body: the decoded JSON body.
        headers: request headers (``x-llmprod-tenant``).

    Raises:
        InvalidRequestError: a bad or unsupported field; ``field`` names it.
    """
    if not isinstance(body, Mapping):
        raise bad_request("the request body must be a JSON object", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required (a string; see GET /v1/models)", "model")
    for name, defaults in _UNSUPPORTED.items():
        # By type too: 0 == False, and logprobs=0 asks for log-probabilities.
        if name in body and not any(
            type(body[name]) is type(d) and body[name] == d for d in defaults
        ):
            raise bad_request(
                f"{name}={body[name]!r} is not supported by this server", name
            )
    kw: dict[str, Any] = {}
    if kind == "chat":
        messages = _messages(body.get("messages"))
        prompts: list[Prompt] = []
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    else:
        messages = []
        prompts = _prompts(body.get("prompt"))
        max_tokens = body.get("max_tokens", _COMPLETIONS_MAX_TOKENS)
    if max_tokens is not None:
        kw["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "seed", "stop", *_EXTRA_PARAMS):
        if body.get(name) is not None:
            kw[name] = body[name]
    try:
        params = SamplingParams(**kw)
    except InvalidRequestError:
        raise
    except (TypeError, ValueError) as e:
        raise bad_request(str(e), None) from e
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request(f"stream={stream!r} must be true or false", "stream")
    if stream and len(prompts) > 1:
        raise bad_request("stream=true takes one prompt", "prompt")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise bad_request("stream_options must be an object", "stream_options")
    tenant = (headers or {}).get(TENANT_HEADER) or body.get("user") or "default"
    if not isinstance(tenant, str):
        raise bad_request(f"user={tenant!r} must be a string", "user")
    return OpenAIRequest(
        kind=kind,
        model=model,
        params=params,
        prompts=prompts,
        messages=messages,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        tenant=tenant,
    )


# ------------------------------------------------------------------ bodies
def extension(answer: Answer) -> dict[str, Any]:
    """The ``llmprod`` object of a response: who answered, cache, cost, route."""
    c = answer.completion
    return {
        "replica": answer.replica,
        "model": answer.model,
        "request_id": c.request_id,
        "cache_hit": c.cache_hit,
        "cost": c.usage.cost,
        "cached_prompt_tokens": c.usage.cached_prompt_tokens,
        "route": c.flags.get("route"),
    }


def _usage(completions: list[Completion]) -> dict[str, Any]:
    p = sum(c.usage.prompt_tokens for c in completions)
    k = sum(c.usage.completion_tokens for c in completions)
    cached = sum(c.usage.cached_prompt_tokens for c in completions)
    return {
        "prompt_tokens": p,
        "completion_tokens": k,
        "total_tokens": p + k,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _finish(reason: str | None) -> str | None:
    # OpenAI knows "stop" and "length"; an aborted request ended early.
    return "stop" if reason == "abort" else reason


def response_body(req: OpenAIRequest, answers: list[Answer]) -> dict[str, Any]:
    """The JSON body of a non-streaming response."""
    created = int(time.time())
    comps = [a.completion for a in answers]
    if req.kind == "chat":
        choices: list[dict[str, Any]] = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": _finish(c.finish_reason),
                "logprobs": None,
            }
            for i, c in enumerate(comps)
        ]
        obj, prefix = "chat.completion", "chatcmpl-"
    else:
        choices = [
            {
                "index": i,
                "text": c.text,
                "finish_reason": _finish(c.finish_reason),
                "logprobs": None,
            }
            for i, c in enumerate(comps)
        ]
        obj, prefix = "text_completion", "cmpl-"
    ext = extension(answers[0])
    if len(answers) > 1:
        ext["cost"] = sum(c.usage.cost for c in comps)
        ext["choices"] = [extension(a) for a in answers]
    return {
        "id": prefix + comps[0].request_id,
        "object": obj,
        "created": created,
        "model": answers[0].model,
        "choices": choices,
        "usage": _usage(comps),
        "llmprod": ext,
    }


def sse(data: Any) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


async def sse_stream(
    req: OpenAIRequest,
    first: tuple[Delta, str, str],
    rest: AsyncIterator[tuple[Delta, str, str]],
) -> AsyncIterator[bytes]:
    """The event stream of a ``stream=true`` request, ``[DONE]`` last.

    An error after the first event is sent as one ``{"error": ...}`` event and
    the stream ends without ``[DONE]`` (the OpenAI client raises on it).
    """
    chat = req.kind == "chat"
    delta0, replica, model = first
    rid = ("chatcmpl-" if chat else "cmpl-") + delta0.request_id
    base = {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
    }

    def chunk(text: str | None, reason: str | None, role: bool = False) -> bytes:
        if chat:
            d: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                d["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": d}
        else:
            choice = {"index": 0, "text": text or ""}
        choice |= {"finish_reason": reason, "logprobs": None}
        return sse({**base, "choices": [choice]})

    if chat:
        yield chunk("", None, role=True)
    item: tuple[Delta, str, str] | None = first
    try:
        while item is not None:
            delta, replica, model = item
            if delta.finish_reason is None:
                if delta.text:
                    yield chunk(delta.text, None)
                item = await anext(rest, None)
                continue
            final = sse(
                {
                    **base,
                    "choices": [
                        {
                            "index": 0,
                            **(
                                {"delta": {"content": delta.text}}
                                if chat
                                else {"text": delta.text}
                            ),
                            "finish_reason": _finish(delta.finish_reason),
                            "logprobs": None,
                        }
                    ],
                    **(
                        {"llmprod": extension(Answer(delta.completion, replica, model))}
                        if delta.completion is not None
                        else {}
                    ),
                }
            )
            yield final
            if req.include_usage and delta.completion is not None:
                yield sse({**base, "choices": [], "usage": _usage([delta.completion])})
            yield sse("[DONE]")
            return
        raise RequestFailedError("the stream ended without a final piece")
    except Exception as e:  # headers are sent: the error travels as an event
        _, body, _ = error_response(e)
        yield sse(body)


# ------------------------------------------------------------------ errors
# Ray errors by name, so that this module imports without Ray: a replica that
# died, or a deployment whose queue is full.
_UNAVAILABLE = {
    "ActorDiedError",
    "ActorUnavailableError",
    "RayActorError",
    "BackPressureError",
    "DeploymentUnavailableError",
}


def error_response(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The HTTP status, OpenAI-style error body and headers for an exception.

    - :class:`ModelNotFoundError`: 404, ``code="model_not_found"``.
    - Invalid requests (``ValueError``, with the field in ``param``): 400;
      a guard that blocked the prompt has ``code="content_blocked"``.
    - :class:`~llmprod.errors.RateLimited`: 429 with ``Retry-After`` (whole
      seconds, rounded up; left out when no wait helps, e.g. a spent budget).
    - :class:`~llmprod.errors.EngineClosedError`, a dead replica, a full
      deployment queue: 503.
    - Anything else: 500.
    """
    headers: dict[str, str] = {}
    param = getattr(exc, "field", None)
    if isinstance(exc, ModelNotFoundError):
        status, kind, code = 404, "invalid_request_error", "model_not_found"
    elif isinstance(exc, GuardBlockedError):
        status, kind, code = 400, "invalid_request_error", "content_blocked"
    elif isinstance(exc, (InvalidRequestError, InvalidConfigError, ValueError)):
        status, kind, code = 400, "invalid_request_error", "invalid_value"
    elif isinstance(exc, RateLimited):
        status, kind, code = 429, "rate_limit_error", "rate_limit_exceeded"
        param = exc.limit or None
        if math.isfinite(exc.retry_after):
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    elif isinstance(exc, EngineClosedError) or type(exc).__name__ in _UNAVAILABLE:
        status, kind, code = 503, "service_unavailable", "overloaded"
    else:
        status, kind, code = 500, "server_error", "internal_error"
    message = str(exc) or type(exc).__name__
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return status, body, headers


_ERROR_TYPES: dict[str, type[LLMProdError]] = {
    "InvalidRequestError": InvalidRequestError,
    "GuardBlockedError": GuardBlockedError,
    "ModelNotFoundError": ModelNotFoundError,
    "EngineClosedError": EngineClosedError,
    "RateLimited": RateLimited,
}


def encode_error(exc: BaseException) -> dict[str, Any]:
    """An exception as plain values, to cross a deployment handle.

    llmprod's errors keep attributes that pickling would drop (``field``,
    ``retry_after``); :func:`decode_error` rebuilds them.
    """
    name = type(exc).__name__
    if isinstance(exc, ValueError) and name not in _ERROR_TYPES:
        name = "InvalidRequestError"
    return {
        "type": name,
        "message": str(exc),
        "field": getattr(exc, "field", None),
        "retry_after": getattr(exc, "retry_after", None),
        "tenant": getattr(exc, "tenant", ""),
        "limit": getattr(exc, "limit", ""),
    }


def decode_error(d: Mapping[str, Any]) -> LLMProdError:
    """The exception :func:`encode_error` described."""
    kind = _ERROR_TYPES.get(str(d.get("type")))
    msg = str(d.get("message", ""))
    if kind is RateLimited:
        return RateLimited(
            msg,
            float(d.get("retry_after") or 0.0),
            d.get("tenant", ""),
            d.get("limit", ""),
        )
    if kind is GuardBlockedError:
        return GuardBlockedError(msg)
    if kind in (InvalidRequestError, ModelNotFoundError):
        return kind(msg, d.get("field"))  # type: ignore[call-arg]
    if kind is EngineClosedError:
        return EngineClosedError(msg)
    return RequestFailedError(f"{d.get('type')}: {msg}")
