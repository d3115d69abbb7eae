"""What the answer caches store, on top of the byte stores of :mod:`llmprod.cache`.

- exact answers (:class:`ResponseCache`, keyed by :func:`response_key`),
- semantic answers (:class:`SemanticCache`: prompts that mean the same),
- embeddings (:class:`~llmprod.answers.embeddings.Embedder`, imported on first use:
  it needs torch),
- :class:`AnswerCaches`: how the Engine looks them up and fills them.

Keys are made in :mod:`~llmprod.answers.keys`, answers encoded in
:mod:`~llmprod.answers.codec`; the semantic cache's vectors live in
:mod:`~llmprod.answers.index` and :mod:`~llmprod.answers.vectors`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from llmprod.answers.caches import AnswerCaches
from llmprod.answers.exact import (
    ResponseCache,
    completion_from_bytes,
    completion_to_bytes,
    response_key,
)
from llmprod.answers.semantic import DEFAULT_THRESHOLD, SemanticCache, TextEmbedder

if TYPE_CHECKING:
    from llmprod.answers.embeddings import Embedder

__all__ = [
    "DEFAULT_THRESHOLD",
    "AnswerCaches",
    "Embedder",
    "ResponseCache",
    "SemanticCache",
    "TextEmbedder",
    "completion_from_bytes",
    "completion_to_bytes",
    "response_key",
]


def __getattr__(name: str) -> Any:
    if name == "Embedder":
        return importlib.import_module("llmprod.answers.embeddings").Embedder
    raise AttributeError(f"module 'llmprod.answers' has no attribute {name!r}")
