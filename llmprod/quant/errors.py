"""Errors raised by :mod:`llmprod.quant`.

Each is an :class:`~llmprod.errors.LLMProdError` and keeps the builtin base it has
always had, so ``except RuntimeError`` / ``except ValueError`` still catch it.
"""

from __future__ import annotations

from llmprod.errors import LLMProdError

__all__ = ["Int8UnavailableError", "QuantizedCheckpointError"]


class Int8UnavailableError(LLMProdError, RuntimeError):
    """No int8 path can run here (no usable fused op, no bitsandbytes)."""


class QuantizedCheckpointError(LLMProdError, ValueError):
    """A quantized file is corrupt, of an unknown format, or made for another model."""
