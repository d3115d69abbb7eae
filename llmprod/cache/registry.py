"""Open a cache backend from a URL: ``open_cache("redis://127.0.0.1:6379/0")``.

Backends are registered by URL scheme and imported only when first opened, so
``import llmprod`` needs none of redis, diskcache, fsspec or s3fs. A backend whose
packages are missing raises :class:`~llmprod.cache.protocol.MissingDependencyError`
naming the extra to install. Registering a scheme that is taken raises unless
``clobber=True``.

Built in:

==================  ==============================  =================
scheme              backend                         extra
==================  ==============================  =================
``memory``          in-process LRU                  (none)
``diskcache``       diskcache directory             ``llmprod[cache]``
``redis``/``rediss``  Redis server                  ``llmprod[cache]``
``s3``/``s3a``      S3 through s3fs                 ``llmprod[s3]``
``file``            local files through fsspec      ``llmprod[cache]``
``fsspec+<proto>``  any fsspec protocol             ``llmprod[cache]``
==================  ==============================  =================

Any other scheme that fsspec knows (``gcs``, ``az``...) opens through fsspec too.
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from llmprod.cache.protocol import CacheBackend, MissingDependencyError
from llmprod.errors import InvalidConfigError

__all__ = ["open_cache", "parse_query", "register_backend", "registered_schemes"]

BackendFactory = Callable[..., CacheBackend]

_SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.\-]*$")
_FSSPEC_TARGET = "llmprod.cache.fsspec:FsspecCache"
_FSSPEC_PREFIX = "fsspec+"


@dataclass(frozen=True)
class _Entry:
    target: str | BackendFactory
    extra: str | None


_lock = threading.Lock()
_registry: dict[str, _Entry] = {}


def register_backend(
    scheme: str,
    target: str | BackendFactory,
    *,
    extra: str | None = None,
    clobber: bool = False,
) -> None:
    """Make ``open_cache`` open URLs of ``scheme`` with ``target``.

    Args:
        scheme: the URL scheme, lowercase, e.g. ``"myredis"``.
        target: a class or callable, or ``"package.module:Name"`` to import lazily.
            A class with a ``from_url`` classmethod is opened with
            ``from_url(url, **options)``, anything else with ``target(url,
            **options)``.
        extra: the ``llmprod[...]`` extra that provides its packages, named in the
            error when they are missing.
        clobber: replace an existing, different registration for ``scheme``.

    Raises:
        ValueError: ``scheme`` is malformed, or taken by another target and
            ``clobber`` is false.
    """
    if not isinstance(scheme, str) or not _SCHEME_RE.match(scheme):
        raise ValueError(f"invalid URL scheme {scheme!r}: use [a-z][a-z0-9+.-]*")
    entry = _Entry(target, extra)
    with _lock:
        existing = _registry.get(scheme)
        if existing is not None and existing != entry and not clobber:
            raise ValueError(
                f"cache scheme {scheme!r} is already registered to "
                f"{existing.target!r}; pass clobber=True to replace it"
            )
        _registry[scheme] = entry


def registered_schemes() -> list[str]:
    """Return the registered schemes, sorted.

    Returns:
        The schemes ``open_cache`` accepts by name (``fsspec+<protocol>`` and
        fsspec's own protocols are accepted on top).
    """
    with _lock:
        return sorted(_registry)


def open_cache(url: str, **options: Any) -> CacheBackend:
    """Open the backend a URL names.

    >>> cache = open_cache("memory://?max_bytes=1048576")
    >>> cache.name, cache.max_bytes
    ('memory', 1048576)

    Args:
        url: e.g. ``memory://?max_bytes=N``, ``diskcache:///dir``,
            ``redis://host:port/db``, ``s3://bucket/prefix``, ``file:///dir``.
            ``memory``, ``diskcache`` and ``s3`` URLs may carry options in their
            query string (``s3://bucket/prefix?endpoint_url=http://host:9000``).
        **options: forwarded to the backend untouched (e.g. ``endpoint_url``,
            ``key`` and ``secret`` for S3; ``size_limit`` for diskcache).

    Returns:
        The bare backend; it raises on failure. Wrap it in
        :class:`~llmprod.cache.failsafe.FailSafeCache` (or put it in a
        :class:`~llmprod.cache.tiered.TieredCache`) to turn failures into misses.

    Raises:
        InvalidConfigError: a ``ValueError``; the URL has no scheme or an unknown
            one (the message lists the accepted schemes), or the query string
            of a ``diskcache`` or fsspec URL holds an option the backend does not
            read (the message lists those it does).
        MissingDependencyError: an ``ImportError``; the backend's packages are
            missing (the message says which extra to install).
    """
    if not isinstance(url, str):
        raise TypeError(f"cache URL must be a str, got {type(url).__name__}")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    entry = _lookup(scheme)
    if entry is None:
        raise InvalidConfigError(
            f"unknown cache URL {url!r}: accepted schemes are "
            + ", ".join(f"{s}://" for s in registered_schemes())
            + f", {_FSSPEC_PREFIX}<protocol>:// and any other protocol fsspec "
            "knows (gcs://, az://...)",
            field="cache",
        )
    try:
        factory = _resolve(entry.target)
        return factory(url, **options)
    except ImportError as exc:
        missing = exc.name or ""
        if isinstance(exc, MissingDependencyError) or (
            missing == "llmprod" or missing.startswith("llmprod.")
        ):
            raise  # a bug in llmprod itself, not a missing extra
        extra = entry.extra or "cache"
        raise MissingDependencyError(
            f"cache backend for {scheme}:// needs a package that is not installed "
            f"({exc}); install it with: pip install 'llmprod[{extra}]'"
        ) from exc


def parse_query(url: str) -> dict[str, Any]:
    """Return a URL's query string as options, with numbers and booleans parsed.

    >>> parse_query("memory://?max_bytes=1024&verbose=true&name=x")
    {'max_bytes': 1024, 'verbose': True, 'name': 'x'}

    Args:
        url: any URL.

    Returns:
        Option name to value (``int``, ``float``, ``bool`` or ``str``).
    """
    out: dict[str, Any] = {}
    for name, raw in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        out[name] = _parse_scalar(raw)
    return out


def _parse_scalar(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def _lookup(scheme: str) -> _Entry | None:
    with _lock:
        entry = _registry.get(scheme)
    if entry is not None:
        return entry
    if not scheme:
        return None
    if scheme.startswith(_FSSPEC_PREFIX):
        return _Entry(_FSSPEC_TARGET, "cache")
    try:
        import fsspec
    except ImportError:
        return None
    if scheme in fsspec.available_protocols():
        return _Entry(_FSSPEC_TARGET, "cache")
    return None


def _resolve(target: str | BackendFactory) -> BackendFactory:
    if isinstance(target, str):
        module_name, _, attr = target.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    else:
        obj = target
    factory = getattr(obj, "from_url", obj)
    if not callable(factory):
        raise TypeError(f"cache backend target {target!r} is not callable")
    return factory  # type: ignore[no-any-return]


for _scheme, _target, _extra in (
    ("memory", "llmprod.cache.memory:MemoryCache", None),
    ("diskcache", "llmprod.cache.disk:DiskCache", "cache"),
    ("redis", "llmprod.cache.redis:RedisCache", "cache"),
    ("rediss", "llmprod.cache.redis:RedisCache", "cache"),
    ("s3", _FSSPEC_TARGET, "s3"),
    ("s3a", _FSSPEC_TARGET, "s3"),
    ("file", _FSSPEC_TARGET, "cache"),
    ("fsspec+memory", _FSSPEC_TARGET, "cache"),
):
    register_backend(_scheme, _target, extra=_extra)
