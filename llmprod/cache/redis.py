"""A shared store on Redis: ``redis://host:port/db`` (``rediss://`` for TLS).

redis-py's defaults suit a database, not a cache: a dead server is retried with
exponential backoff and each call can stall for seconds. Here a call against a
dead server fails in milliseconds:

* ``socket_connect_timeout`` and ``socket_timeout`` default to 0.5 s;
* one immediate retry (no backoff) on connection errors only, so the first call
  after a server restart reconnects and succeeds, while timeouts are not retried.

Wrap the backend in :class:`~llmprod.cache.failsafe.FailSafeCache` so that those
failures read as misses. Values are framed with a checksum like the disk backend's,
so garbage under a key reads as a miss and is deleted. Expiry is Redis's own
(``SET ... PX``). Other options go to :meth:`redis.Redis.from_url` untouched.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, ClassVar

import redis as redis_py
from redis.backoff import NoBackoff
from redis.retry import Retry

from llmprod.cache import _frame
from llmprod.cache.protocol import (
    CorruptEntryError,
    UnsafeEntryError,
    check_key,
    check_ttl,
    check_value,
)

DEFAULT_SOCKET_TIMEOUT_S = 0.5
DEFAULT_CONNECT_TIMEOUT_S = 0.5
DEFAULT_RETRIES = 1


class RedisCache:
    """A Redis-backed store of bytes that fails fast when Redis is down.

    Opening never touches the network: the first command connects. Use
    :meth:`ping` (or ``FailSafeCache.ping``) to learn whether the server is up.

    Args:
        url: ``redis://[user:password@]host:port/db``.
        namespace: prefix added to every key, e.g. ``"llmprod:"``.
        socket_timeout: seconds to wait on a read or write.
        socket_connect_timeout: seconds to wait for a connection.
        retries: immediate retries after a connection error (0 = none).
        **options: forwarded to :meth:`redis.Redis.from_url` untouched.
    """

    name: ClassVar[str] = "redis"

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "",
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT_S,
        socket_connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        **options: Any,
    ) -> None:
        self.url = url
        self.namespace = namespace
        retry = Retry(
            NoBackoff(), retries, supported_errors=(redis_py.ConnectionError,)
        )
        self._client = redis_py.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            retry=retry,
            **options,
        )

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisCache:
        """Open ``redis://host:port/db``; see :class:`RedisCache` for options.

        Args:
            url: the server URL.
            **options: see :class:`RedisCache`.

        Returns:
            The backend (not yet connected).
        """
        return cls(url, **options)

    @property
    def client(self) -> redis_py.Redis:
        """The underlying redis-py client."""
        return self._client

    def ping(self) -> bool:
        """Return whether the server answers (never raises)."""
        try:
            return bool(self._client.ping())
        except Exception:
            return False

    def get(self, key: str) -> bytes | None:
        """See :meth:`CacheBackend.get`."""
        name = self.namespace + check_key(key)
        blob = self._client.get(name)
        if blob is None:
            return None
        if not isinstance(blob, bytes):
            # decode_responses=True would hand back str; we only read bytes.
            self._discard(name)
            raise UnsafeEntryError(f"entry for key {key!r} is not bytes")
        try:
            value, _ = _frame.unpack(key, blob)
        except (CorruptEntryError, UnsafeEntryError):
            self._discard(name)
            raise
        return value

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """See :meth:`CacheBackend.set`."""
        check_key(key)
        check_value(value)
        ttl = check_ttl(ttl)
        px = None if ttl is None else max(1, math.ceil(ttl * 1000))
        self._client.set(self.namespace + key, _frame.pack(key, value), px=px)

    def delete(self, key: str) -> None:
        """See :meth:`CacheBackend.delete`."""
        self._client.delete(self.namespace + check_key(key))

    def close(self) -> None:
        """Close pooled connections. Calling it again does nothing."""
        self._client.close()

    def _discard(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self._client.delete(name)
