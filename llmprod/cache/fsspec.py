"""A store on any fsspec filesystem: ``s3://bucket/prefix``, ``file:///dir``...

Each key becomes one object at ``<root>/<h[:2]>/<h>``, where ``h`` is the SHA-256
of the key, so any key is a safe object name. Values are framed with an expiry
time and a checksum (:mod:`llmprod.cache._frame`): an expired entry reads as a miss
and is deleted, a corrupted one is deleted and reported.

Schemes. ``s3``, ``s3a`` and ``file`` are registered by name. fsspec's own
in-memory filesystem clashes with llmprod's ``memory://`` LRU, so it is reached as
``fsspec+memory://``; the ``fsspec+<protocol>://`` form works for every fsspec
protocol, and a scheme llmprod does not register itself falls through to fsspec
when fsspec knows it (``gcs://``, ``az://``...).

S3 through s3fs. Pass ``endpoint_url``, ``key``, ``secret`` (and any other
:class:`s3fs.S3FileSystem` argument) as options. The simple ones may be given in
the query string instead (``s3://bucket/prefix?endpoint_url=http://host:9000``, see
:data:`S3_QUERY_OPTIONS`); keyword options win over the query. A query option that
is not in that list (``client_kwargs``, a typo) raises
:class:`~llmprod.errors.InvalidConfigError` rather than becoming part of the
object path; other protocols take no query options. s3fs and botocore each retry a
dead endpoint with backoff (seconds per call), and s3fs raises botocore's
``EndpointConnectionError``, which is not an ``OSError``. This backend sets one
attempt and short timeouts by default (``retries=1``, ``connect_timeout=1.0``,
``read_timeout=10.0``) and leaves the exception alone for
:class:`~llmprod.cache.failsafe.FailSafeCache` to count as a miss.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from typing import Any, ClassVar
from urllib.parse import parse_qsl

import fsspec
from fsspec.implementations.local import LocalFileSystem

from llmprod.cache import _frame
from llmprod.cache.protocol import (
    CorruptEntryError,
    UnsafeEntryError,
    check_key,
    check_ttl,
    check_value,
)
from llmprod.errors import InvalidConfigError

PREFIX = "fsspec+"
_S3_PROTOCOLS = ("s3", "s3a")
DEFAULT_RETRIES = 1
DEFAULT_CONNECT_S = 1.0
DEFAULT_READ_S = 10.0

S3_QUERY_OPTIONS: dict[str, type] = {
    "endpoint_url": str,
    "key": str,
    "secret": str,
    "token": str,
    "profile": str,
    "anon": bool,
    "use_ssl": bool,
    "requester_pays": bool,
    "version_aware": bool,
    "retries": int,
    "connect_timeout": float,
    "read_timeout": float,
}
"""The options an ``s3://`` URL may carry in its query string, with their types."""

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


class FsspecCache:
    """A store of bytes on an fsspec filesystem, one object per key.

    >>> import tempfile
    >>> cache = FsspecCache("file://" + tempfile.mkdtemp())
    >>> cache.set("k", b"v")
    >>> cache.get("k"), cache.label
    (b'v', 'file')

    Args:
        url: the root, e.g. ``s3://bucket/prefix`` or ``fsspec+memory://root``.
        retries: S3 only: attempts per call, for s3fs and botocore alike (1).
        connect_timeout: S3 only: seconds to wait for a connection (1.0).
        read_timeout: S3 only: seconds to wait on a read (10.0).
        **storage_options: forwarded to the fsspec filesystem untouched.

    Raises:
        InvalidConfigError: the URL's query string holds an option that is not
            accepted there (see :func:`split_query`).
    """

    name: ClassVar[str] = "fsspec"

    def __init__(
        self,
        url: str,
        *,
        retries: int | None = None,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        **storage_options: Any,
    ) -> None:
        if url.startswith(PREFIX):
            url = url[len(PREFIX) :]
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        url, query = split_query(url, protocol)
        self.label = protocol
        self.url = url
        # Keyword options win over the query string, which wins over defaults.
        retries = _pick(retries, query.pop("retries", None), DEFAULT_RETRIES)
        connect_timeout = _pick(
            connect_timeout, query.pop("connect_timeout", None), DEFAULT_CONNECT_S
        )
        read_timeout = _pick(
            read_timeout, query.pop("read_timeout", None), DEFAULT_READ_S
        )
        storage_options = {**query, **storage_options}
        if protocol in _S3_PROTOCOLS:
            storage_options = _s3_options(
                storage_options, retries, connect_timeout, read_timeout
            )
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        if protocol in _S3_PROTOCOLS:
            # s3fs retries with backoff in its own loop too; a class attribute,
            # so set it on this private instance (skip_instance_cache above).
            fs.retries = max(1, retries)
        self.fs = fs
        self.root = root.rstrip("/")
        self._is_local = isinstance(fs, LocalFileSystem)
        if self._is_local:
            os.makedirs(self.root, exist_ok=True)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> FsspecCache:
        """Open any fsspec URL; see :class:`FsspecCache` for options.

        Args:
            url: the root URL.
            **options: see :class:`FsspecCache`.

        Returns:
            The backend.
        """
        return cls(url, **options)

    def path_for(self, key: str) -> str:
        """Return the object path that holds ``key``.

        Args:
            key: the cache key.

        Returns:
            The path inside the filesystem (no protocol).
        """
        digest = hashlib.sha256(check_key(key).encode("utf-8", "surrogatepass"))
        h = digest.hexdigest()
        return f"{self.root}/{h[:2]}/{h}"

    def get(self, key: str) -> bytes | None:
        """See :meth:`CacheBackend.get`."""
        path = self.path_for(key)
        try:
            blob = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            value, expires_at = _frame.unpack(key, blob)
        except (CorruptEntryError, UnsafeEntryError):
            self._discard(path)
            raise
        if expires_at and time.time() >= expires_at:
            self._discard(path)
            return None
        return value

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """See :meth:`CacheBackend.set`."""
        path = self.path_for(key)
        check_value(value)
        ttl = check_ttl(ttl)
        expires_at = 0.0 if ttl is None else time.time() + ttl
        blob = _frame.pack(key, value, expires_at)
        if self._is_local:
            # Readers must never see half a file: write aside, then rename.
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(blob)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
        else:
            # An S3 PUT replaces the object atomically.
            self.fs.pipe_file(path, blob)

    def delete(self, key: str) -> None:
        """See :meth:`CacheBackend.delete`."""
        path = self.path_for(key)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    def close(self) -> None:
        """Nothing to release; kept for the contract. Calling it again is fine."""

    def _discard(self, path: str) -> None:
        with contextlib.suppress(Exception):
            self.fs.rm_file(path)


def split_query(url: str, protocol: str) -> tuple[str, dict[str, Any]]:
    """Split the query string off an fsspec URL and parse it into options.

    >>> split_query("s3://bucket/prefix?endpoint_url=http://127.0.0.1:9000&anon=true", "s3")
    ('s3://bucket/prefix', {'endpoint_url': 'http://127.0.0.1:9000', 'anon': True})

    Args:
        url: the URL (without the ``fsspec+`` prefix).
        protocol: its protocol; only ``s3``/``s3a`` accept query options.

    Returns:
        The URL without its query string, and the options it carried, typed as
        :data:`S3_QUERY_OPTIONS` says.

    Raises:
        InvalidConfigError: an option that is not accepted, given twice, or whose
            value does not parse; the message lists the accepted options.
    """
    base, sep, query = url.partition("?")
    if not sep:
        return url, {}
    accepted = S3_QUERY_OPTIONS if protocol in _S3_PROTOCOLS else {}
    listed = ", ".join(accepted) or "none"
    out: dict[str, Any] = {}
    for name, raw in parse_qsl(query, keep_blank_values=True):
        kind = accepted.get(name)
        if kind is None:
            raise InvalidConfigError(
                f"{protocol}:// cache URL option {name!r} is not read from the "
                f"query string; accepted there: {listed}. Pass other storage "
                "options (client_kwargs, config_kwargs...) as keyword arguments "
                "to open_cache",
                field="cache",
            )
        if name in out:
            raise InvalidConfigError(
                f"{protocol}:// cache URL gives option {name!r} twice", field="cache"
            )
        out[name] = _parse_option(protocol, name, raw, kind)
    return base, out


def _pick(given: Any, from_query: Any, default: Any) -> Any:
    if given is not None:
        return given
    return default if from_query is None else from_query


def _parse_option(protocol: str, name: str, raw: str, kind: type) -> Any:
    if kind is str and raw:
        return raw
    if kind is bool and raw.lower() in _TRUE + _FALSE:
        return raw.lower() in _TRUE
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    expected = {str: "a non-empty string", bool: "true or false"}.get(
        kind, f"a number ({kind.__name__})"
    )
    raise InvalidConfigError(
        f"{protocol}:// cache URL option {name}={raw!r} must be {expected}",
        field="cache",
    )


def _s3_options(
    options: dict[str, Any],
    retries: int,
    connect_timeout: float,
    read_timeout: float,
) -> dict[str, Any]:
    out = dict(options)
    config = dict(out.get("config_kwargs") or {})
    config.setdefault("connect_timeout", connect_timeout)
    config.setdefault("read_timeout", read_timeout)
    config.setdefault("retries", {"total_max_attempts": max(1, retries)})
    out["config_kwargs"] = config
    # A private instance: fsspec would otherwise share one per set of arguments,
    # and the retries attribute set above would leak into it.
    out.setdefault("skip_instance_cache", True)
    out.setdefault("use_listings_cache", False)
    return out
