"""An in-process LRU cache bounded in bytes: ``memory://?max_bytes=...``.

It is the hot tier: no serialisation, no I/O, one lock. Its contents die with the
process, and two processes never share it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, ClassVar
from urllib.parse import urlsplit

from llmprod.cache.protocol import check_key, check_ttl, check_value
from llmprod.cache.registry import parse_query

DEFAULT_MAX_BYTES = 256 * 2**20

# A rough per-entry bookkeeping cost (dict slot, tuple, key object), so that a
# flood of tiny entries is bounded too.
_ENTRY_OVERHEAD = 64


class MemoryCache:
    """A thread-safe LRU store of bytes, bounded by the bytes it holds.

    The size of an entry is the UTF-8 length of its key, plus its value, plus a
    small fixed overhead. Setting a value larger than ``max_bytes`` stores nothing
    (and drops any older value under that key).

    >>> cache = MemoryCache(max_bytes=1024)
    >>> cache.set("a", b"x" * 100)
    >>> cache.get("a")[:3]
    b'xxx'
    >>> cache.get("missing") is None
    True

    Args:
        max_bytes: the most bytes held before least recently used entries go.
    """

    name: ClassVar[str] = "memory"

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
            raise TypeError(f"max_bytes must be an int, got {max_bytes!r}")
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        # key -> (value, expires_at on the monotonic clock or None, size)
        self._entries: OrderedDict[str, tuple[bytes, float | None, int]] = OrderedDict()
        self._num_bytes = 0

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryCache:
        """Open from ``memory://`` (options come from the query string or kwargs).

        Args:
            url: ``memory://`` with an optional ``?max_bytes=N``.
            **options: ``max_bytes``; overrides the query string.

        Returns:
            A new, empty cache.
        """
        parts = urlsplit(url)
        if parts.netloc or parts.path not in ("", "/"):
            raise ValueError(
                f"memory:// takes no host or path, only ?max_bytes=N; got {url!r}"
            )
        merged = parse_query(url)
        merged.update(options)
        return cls(**merged)

    @property
    def num_bytes(self) -> int:
        """Bytes currently held (keys, values and overhead)."""
        return self._num_bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> bytes | None:
        """See :meth:`CacheBackend.get`."""
        check_key(key)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            value, expires_at, _ = entry
            if expires_at is not None and time.monotonic() >= expires_at:
                self._pop(key)
                return None
            self._entries.move_to_end(key)
            return value

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """See :meth:`CacheBackend.set`."""
        check_key(key)
        check_value(value)
        ttl = check_ttl(ttl)
        size = len(key.encode("utf-8", "surrogatepass")) + len(value) + _ENTRY_OVERHEAD
        expires_at = None if ttl is None else time.monotonic() + ttl
        with self._lock:
            self._pop(key)
            if size > self.max_bytes:
                return
            while self._num_bytes + size > self.max_bytes:
                _, (_, _, old_size) = self._entries.popitem(last=False)
                self._num_bytes -= old_size
            self._entries[key] = (value, expires_at, size)
            self._num_bytes += size

    def delete(self, key: str) -> None:
        """See :meth:`CacheBackend.delete`."""
        check_key(key)
        with self._lock:
            self._pop(key)

    def close(self) -> None:
        """Drop every entry. Calling it again does nothing."""
        with self._lock:
            self._entries.clear()
            self._num_bytes = 0

    def _pop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._num_bytes -= entry[2]
