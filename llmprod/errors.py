"""Errors raised by llmprod.

Every bad request raises a subclass of both :class:`LLMProdError` and
:class:`ValueError`, with a message naming the field and the limit, so callers can
catch either.
"""

from __future__ import annotations

from typing import Any


class LLMProdError(Exception):
    """Base class of every error llmprod raises on purpose."""


class InvalidRequestError(LLMProdError, ValueError):
    """A request (prompt, messages, sampling parameters) is invalid.

    Attributes:
        field: the name of the offending field, e.g. ``"top_p"`` or ``"prompt"``.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidConfigError(LLMProdError, ValueError):
    """An engine configuration or model choice is invalid."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnsupportedModelError(InvalidConfigError):
    """The model's architecture has no implementation here."""


class ModelLoadError(LLMProdError):
    """Fetching, converting or loading model weights failed."""


class EngineClosedError(LLMProdError, RuntimeError):
    """The engine was closed before or while the request ran."""


class RequestFailedError(LLMProdError, RuntimeError):
    """The model failed while running the request (e.g. the forward pass raised).

    Only the requests in the failing step get this error; the engine goes on
    serving the next ones.
    """

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class RateLimited(LLMProdError):
    """A tenant went over one of its limits.

    Also importable as :data:`RateLimitedError`, a deprecated alias of this class.

    Attributes:
        retry_after: seconds after which the same request may succeed.
        tenant: the tenant that hit the limit.
        limit: which limit was hit, e.g. ``"requests_per_second"``.
    """

    def __init__(
        self, message: str, retry_after: float, tenant: str = "", limit: str = ""
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.tenant = tenant
        self.limit = limit


RateLimitedError = RateLimited
"""Deprecated alias of :class:`RateLimited` (the same class object); new code
should say ``RateLimited``."""


class GuardBlockedError(InvalidRequestError):
    """A safety guard blocked the prompt or the output.

    Attributes:
        guard: the guard's name; ``findings``: what it found (kinds and counts,
        never the matched text itself).
    """

    def __init__(
        self, message: str, guard: str = "", findings: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, field="prompt")
        self.guard = guard
        self.findings = findings or {}


class TensorParallelError(RequestFailedError):
    """A tensor-parallel worker died or the ranks fell out of step: the
    engine's requests in flight fail with it and the engine stops."""
