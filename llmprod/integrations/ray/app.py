"""The FastAPI app of the OpenAI routes, over any
:class:`~llmprod.integrations.ray.openai_api.Backend`.

This module leaves out ``from __future__ import annotations`` on purpose: FastAPI
reads the route functions' annotations (``request: Request``) at runtime, and
they are local to :func:`build_fastapi_app`.
"""

from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llmprod.integrations.ray.openai_api import (
    MODEL_HEADER,
    REPLICA_HEADER,
    Backend,
    ModelNotFoundError,
    bad_request,
    error_response,
    parse_request,
    response_body,
    sse_stream,
)

__all__ = ["build_fastapi_app"]


def build_fastapi_app(
    get_backend: Callable[[], Backend], title: str = "llmprod"
) -> FastAPI:
    """A FastAPI app serving the OpenAI routes from ``get_backend()``.

    Args:
        get_backend: returns the backend of the process handling the request
            (in a Serve replica: the replica's deployment object).
        title: the OpenAPI title.
    """
    app = FastAPI(title=title)

    def fail(exc: BaseException, backend: Backend) -> Response:
        status, body, headers = error_response(exc)
        replica, model = backend.identity()
        headers |= {REPLICA_HEADER: replica, MODEL_HEADER: model}
        return JSONResponse(body, status_code=status, headers=headers)

    async def answer(kind: str, request: Request) -> Response:
        backend = get_backend()
        try:
            try:
                body = await request.json()
            except ValueError as e:
                raise bad_request(
                    f"the request body is not valid JSON: {e}", None
                ) from e
            req = parse_request(kind, body, request.headers)
            if req.model not in backend.model_names():
                raise ModelNotFoundError(
                    f"model {req.model!r} is not served here; models: "
                    f"{backend.model_names()}",
                    "model",
                )
            if not req.stream:
                answers = await backend.complete(req)
                return JSONResponse(
                    response_body(req, answers),
                    headers={
                        REPLICA_HEADER: answers[0].replica,
                        MODEL_HEADER: answers[0].model,
                    },
                )
            deltas = backend.stream(req)
            # The first piece before the headers: an error in admission (a bad
            # prompt, a rate limit) is still an HTTP status, and the headers
            # can name the replica that streams.
            first = await anext(deltas)
        except Exception as e:
            return fail(e, backend)
        return StreamingResponse(
            sse_stream(req, first, deltas),
            media_type="text/event-stream",
            headers={
                REPLICA_HEADER: first[1],
                MODEL_HEADER: first[2],
                "Cache-Control": "no-cache",
            },
        )

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await answer("completion", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await answer("chat", request)

    @app.get("/v1/models")
    async def models() -> Response:
        backend = get_backend()
        replica, model = backend.identity()
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "llmprod"}
            for name in backend.model_names()
        ]
        return JSONResponse(
            {"object": "list", "data": data},
            headers={REPLICA_HEADER: replica, MODEL_HEADER: model},
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        backend = get_backend()
        replica, model = backend.identity()
        text, content_type = backend.metrics_text()
        return Response(
            text,
            media_type=content_type,
            headers={REPLICA_HEADER: replica, MODEL_HEADER: model},
        )

    return app
