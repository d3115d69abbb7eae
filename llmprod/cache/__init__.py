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

What gets stored in them (exact and semantic answers, embeddings) lives in
:mod:`llmprod.answers`. See ``docs/caching.md``.
"""

from __future__ import annotations

import importlib
import warnings
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
from llmprod.cache.tiered import TieredCache

if TYPE_CHECKING:
    from llmprod.cache.disk import DiskCache
    from llmprod.cache.fsspec import FsspecCache
    from llmprod.cache.redis import RedisCache

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
    "TieredCache",
    "UnsafeEntryError",
    "open_cache",
    "register_backend",
    "registered_schemes",
]

_LAZY = {
    "DiskCache": "llmprod.cache.disk",
    "FsspecCache": "llmprod.cache.fsspec",
    "RedisCache": "llmprod.cache.redis",
}

# Names that moved to llmprod.answers (and llmprod.models.fingerprint); reachable
# here for one release with a DeprecationWarning.
_MOVED = {
    "ResponseCache": "llmprod.answers",
    "SemanticCache": "llmprod.answers",
    "completion_from_bytes": "llmprod.answers",
    "completion_to_bytes": "llmprod.answers",
    "response_key": "llmprod.answers",
    "model_fingerprint": "llmprod.models.fingerprint",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"llmprod.cache.{name} moved to {_MOVED[name]}.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llmprod.cache' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
