"""The contract every cache backend keeps, and the errors the cache layer raises.

A cache backend is a key-value store for bytes: responses serialised as JSON,
embeddings as ``.npy``. It never stores or returns Python objects, so nothing read
from a shared store is ever unpickled.

The contract (checked for every backend by :mod:`llmprod.testing`):

* Keys are ``str``; values are ``bytes`` (``bytes`` itself, not ``bytearray`` or
  ``memoryview``). Anything else raises :class:`TypeError` before the store is
  touched.
* ``get`` returns exactly the bytes last stored under the key, or ``None`` when the
  key is absent or expired. A reader sees the old value or the new one, never a mix.
* ``ttl`` is in seconds; ``None`` keeps the entry until it is evicted or deleted.
  A ``ttl`` that is not a positive finite number raises :class:`ValueError`.
* A backend that cannot reach its store raises (whatever its client raises). Wrap it
  in :class:`~llmprod.cache.failsafe.FailSafeCache` to turn failures into misses.
* An entry that fails its integrity check is removed and reported by raising
  :class:`CorruptEntryError`; a planted pickle or any other entry not written by
  llmprod is removed and reported by raising :class:`UnsafeEntryError`.
* ``close`` releases connections and may be called more than once.
"""

from __future__ import annotations

import math
from typing import ClassVar, Protocol, runtime_checkable

from llmprod.errors import LLMProdError

__all__ = [
    "CacheBackend",
    "CacheError",
    "CorruptEntryError",
    "MissingDependencyError",
    "UnsafeEntryError",
    "check_key",
    "check_ttl",
    "check_value",
]


@runtime_checkable
class CacheBackend(Protocol):
    """A key-value store of bytes with optional expiry.

    Attributes:
        name: short name of the backend kind, e.g. ``"redis"``. It labels the
            backend in logs and metrics unless the instance has a ``label``
            attribute (the fsspec backend labels itself with its protocol,
            e.g. ``"s3"``).
    """

    name: ClassVar[str]

    def get(self, key: str) -> bytes | None:
        """Return the value stored under ``key``.

        Args:
            key: the key to look up.

        Returns:
            The exact bytes last stored, or ``None`` if the key is absent or expired.

        Raises:
            TypeError: ``key`` is not a ``str``.
            CorruptEntryError: the stored entry failed its integrity check; it has
                been removed.
            UnsafeEntryError: the stored entry is not in llmprod's format (a pickle,
                for example); it has been removed and was not decoded.
            Exception: whatever the client raises when the store is unreachable.
        """
        ...

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``, replacing any previous value.

        Args:
            key: the key to store under.
            value: the bytes to store.
            ttl: lifetime in seconds, or ``None`` for no expiry.

        Raises:
            TypeError: ``key`` is not a ``str`` or ``value`` is not ``bytes``.
            ValueError: ``ttl`` is not a positive finite number.
            Exception: whatever the client raises when the store is unreachable.
        """
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; a key that is absent is not an error.

        Args:
            key: the key to remove.

        Raises:
            TypeError: ``key`` is not a ``str``.
            Exception: whatever the client raises when the store is unreachable.
        """
        ...

    def close(self) -> None:
        """Release connections and files. Calling it again does nothing."""
        ...


class CacheError(LLMProdError):
    """Base class of the errors the cache layer raises on purpose."""


class CorruptEntryError(CacheError):
    """A stored entry failed its integrity check (truncated, flipped bits, garbage).

    The backend removes the entry before raising, so the next read is a plain miss.
    """


class UnsafeEntryError(CacheError):
    """A stored entry is not in llmprod's bytes format (e.g. a planted pickle).

    The entry was not decoded; the backend removes it before raising.
    """


class MissingDependencyError(CacheError, ImportError):
    """A backend needs an optional package that is not installed."""


def check_key(key: object) -> str:
    """Return ``key`` if it is a ``str``.

    Args:
        key: the candidate key.

    Returns:
        The key, unchanged.

    Raises:
        TypeError: ``key`` is not a ``str``.
    """
    if not isinstance(key, str):
        raise TypeError(f"cache key must be str, got {type(key).__name__}")
    return key


def check_value(value: object) -> bytes:
    """Return ``value`` if it is ``bytes``.

    Args:
        value: the candidate value.

    Returns:
        The value, unchanged.

    Raises:
        TypeError: ``value`` is not ``bytes`` (objects are never pickled).
    """
    if not isinstance(value, bytes):
        raise TypeError(
            f"cache value must be bytes, got {type(value).__name__}; serialise it "
            "first (JSON, np.save with allow_pickle=False); objects are never pickled"
        )
    return value


def check_ttl(ttl: object) -> float | None:
    """Return ``ttl`` as a float, or ``None``.

    Args:
        ttl: the candidate lifetime in seconds.

    Returns:
        ``None`` or a positive finite float.

    Raises:
        TypeError: ``ttl`` is not a number.
        ValueError: ``ttl`` is not positive and finite.
    """
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TypeError(f"ttl must be a number of seconds or None, got {ttl!r}")
    if not math.isfinite(ttl) or ttl <= 0:
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
    return float(ttl)
