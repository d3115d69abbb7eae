"""Cache backends: key-value stores of bytes for responses and embeddings.

>>> from llmprod.cache import FailSafeCache, TieredCache, open_cache
>>> cache = TieredCache([open_cache("memory://?max_bytes=1048576")])
>>> cache.set("k", b"v")
>>> cache.get_with_tier("k")
(b'v', 'memory')

``open_cache(url)`` returns a bare backend that raises on failure;
:class:`FailSafeCache` and :class:`TieredCache` turn failures into counted misses.
``DiskCache``, ``RedisCache`` and ``FsspecCache`` are imported on first use, so
their optional packages are needed only by those who use them.

On top of the backends: :class:`ResponseCache` (exact answers, keyed by
:func:`response_key`) and :class:`SemanticCache` (answers to prompts that mean
the same; imported on first use, it needs numpy). See ``docs/caching.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from llmprod.cache.failsafe import FailSafeCache
from llmprod.cache.memory import MemoryCache
from llmprod.cache.protocol import (
    CacheBackend,
    CacheError,
    CorruptEntryError,
    MissingDependencyError,
    UnsafeEntryError,
)
from llmprod.cache.registry import open_cache, register_backend, registered_schemes
from llmprod.cache.response import (
    ResponseCache,
    completion_from_bytes,
    completion_to_bytes,
    model_fingerprint,
    response_key,
)
from llmprod.cache.tiered import TieredCache

if TYPE_CHECKING:
    from llmprod.cache.disk import DiskCache
    from llmprod.cache.fsspec import FsspecCache
    from llmprod.cache.redis import RedisCache
    from llmprod.cache.semantic import SemanticCache

__all__ = [
    "CacheBackend",
    "CacheError",
    "CorruptEntryError",
    "DiskCache",
    "FailSafeCache",
    "FsspecCache",
    "MemoryCache",
    "MissingDependencyError",
    "RedisCache",
    "ResponseCache",
    "SemanticCache",
    "TieredCache",
    "UnsafeEntryError",
    "completion_from_bytes",
    "completion_to_bytes",
    "model_fingerprint",
    "open_cache",
    "register_backend",
    "registered_schemes",
    "response_key",
]

_LAZY = {
    "DiskCache": "llmprod.cache.disk",
    "FsspecCache": "llmprod.cache.fsspec",
    "RedisCache": "llmprod.cache.redis",
    "SemanticCache": "llmprod.cache.semantic",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llmprod.cache' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
