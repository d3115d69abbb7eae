"""A persistent local store on diskcache: ``diskcache:///path/to/dir``.

diskcache is fast and process-safe, but out of the box it unpickles whatever it
finds in its database (CVE-2025-69872) and hands back a truncated value file
without complaint. This backend closes both gaps:

* :class:`BytesOnlyDisk` stores ``bytes`` only and refuses to decode any entry that
  is not raw bytes: a planted pickle (``MODE_PICKLE``), text or number is never
  decoded, only removed.
* Each value is framed with a checksum (see :mod:`llmprod.cache._frame`) that is
  checked on every read; a mismatch removes the entry and reads as a miss.
* A database that SQLite cannot read (an overwritten header, a torn file) is moved
  aside into ``<dir>/corrupt-<time>-<pid>-<id>/`` with its value files, and a fresh
  one is created. Nothing else in the directory is moved.

Like Redis, the store fails open: a directory that cannot be used (a path under
``/proc``, a regular file, a read-only mount) does not fail construction; every
call raises the ``OSError`` or ``sqlite3`` error until the directory becomes usable,
and :class:`~llmprod.cache.failsafe.FailSafeCache` reports the backend as down. A
directory removed while in use is noticed on the next call (the database file is
checked before each one) and is not recreated: calls fail until someone creates it
again, so writes never go to an unlinked database.

Options are forwarded to :class:`diskcache.Cache` (``size_limit``,
``eviction_policy``, ``disk_min_file_size``...), except ``timeout``, the SQLite
busy timeout, which defaults to 2 s here instead of diskcache's 60 s. An option
diskcache does not know raises :class:`~llmprod.errors.InvalidConfigError`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import unquote, urlsplit

import diskcache
from diskcache.core import MODE_BINARY, MODE_RAW, UNKNOWN

from llmprod.cache import _frame
from llmprod.cache.protocol import (
    CorruptEntryError,
    UnsafeEntryError,
    check_key,
    check_ttl,
    check_value,
)
from llmprod.cache.registry import parse_query
from llmprod.errors import InvalidConfigError

logger = logging.getLogger("llmprod.cache")

DEFAULT_TIMEOUT_S = 2.0
_DB_FILE = "cache.db"
_DB_FILES = (_DB_FILE, "cache.db-wal", "cache.db-shm")
# diskcache's value files: <2 hex>/<2 hex>/<28 hex>.val (Disk.filename).
_HEX2 = re.compile(r"[0-9a-f]{2}")
_VALUE_FILE = re.compile(r"[0-9a-f]{28}\.val")
OPTIONS = ("timeout", *sorted(diskcache.DEFAULT_SETTINGS))
"""The options :class:`DiskCache` accepts, in the query string or as keywords."""

T = TypeVar("T")


class BytesOnlyDisk(diskcache.Disk):  # type: ignore[misc]
    """A :class:`diskcache.Disk` that never pickles and never unpickles.

    Keys must be ``str`` and values ``bytes``; anything else raises
    :class:`TypeError`. ``fetch`` returns the stored bytes for raw and file entries
    and raises :class:`UnsafeEntryError` for every other mode, so an entry planted
    by another writer (a pickle, above all) is never decoded.
    """

    def put(self, key: Any) -> tuple[Any, bool]:
        """Convert a key for the Cache table (``str`` only, stored raw)."""
        check_key(key)
        return key, True

    def get(self, key: Any, raw: bool) -> Any:
        """Convert a key read from the Cache table; refuses pickled keys."""
        if not raw:
            raise UnsafeEntryError(
                "refusing to unpickle a key stored by another writer"
            )
        return bytes(key) if isinstance(key, (bytes, memoryview)) else key

    def store(self, value: Any, read: bool, key: Any = UNKNOWN) -> tuple[Any, ...]:
        """Frame ``value`` with its checksum and store it inline or in a file."""
        if read:
            raise TypeError("file-like values are not supported; pass bytes")
        check_value(value)
        if not isinstance(key, str):
            raise TypeError("BytesOnlyDisk needs the key to frame a value")
        head = _frame.header(key, value)
        if len(head) + len(value) < self.min_file_size:
            return 0, MODE_RAW, None, sqlite3.Binary(head + value)
        filename, full_path = self.filename(key, value)
        size = self._write(full_path, iter((head, value)), "xb")
        return size, MODE_BINARY, filename, None

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> bytes:
        """Return the framed bytes of an entry; refuse every non-bytes mode."""
        if read:
            raise TypeError("file handles are not supported; read bytes")
        if mode == MODE_RAW and isinstance(value, bytes):
            return value
        if mode == MODE_BINARY and filename is not None:
            with open(os.path.join(self._directory, filename), "rb") as reader:
                data: bytes = reader.read()
            return data
        raise UnsafeEntryError(
            f"refusing to decode a diskcache entry of mode {mode} "
            "(only raw bytes are read; pickles are never loaded)"
        )


class DiskCache:
    """A persistent, process-safe store of bytes in one directory.

    >>> import tempfile
    >>> cache = DiskCache(tempfile.mkdtemp())
    >>> cache.set("k", b"v")
    >>> cache.get("k")
    b'v'
    >>> cache.close()

    Args:
        directory: the cache directory; created if missing when first opened. An
            unusable directory does not raise here: every call raises until it
            can be opened.
        timeout: SQLite busy timeout in seconds.
        **settings: :class:`diskcache.Cache` settings (see :data:`OPTIONS`).

    Raises:
        InvalidConfigError: a setting diskcache does not know.
    """

    name: ClassVar[str] = "diskcache"

    def __init__(
        self,
        directory: str | os.PathLike[str],
        timeout: float = DEFAULT_TIMEOUT_S,
        **settings: Any,
    ) -> None:
        if "disk" in settings:
            raise ValueError("DiskCache always uses BytesOnlyDisk; drop 'disk'")
        unknown = sorted(set(settings) - set(OPTIONS))
        if unknown:
            raise InvalidConfigError(
                f"unknown diskcache option(s) {', '.join(unknown)}; accepted: "
                + ", ".join(OPTIONS),
                field="cache",
            )
        self.directory = Path(directory)
        self._timeout = timeout
        self._settings = settings
        self._swap_lock = threading.Lock()
        self._cache: diskcache.Cache | None = None
        self._db_id: tuple[int, int] | None = None
        self._opened = False
        with contextlib.suppress(OSError, sqlite3.Error):
            self._cache = self._open()  # else: the first call retries and raises

    @classmethod
    def from_url(cls, url: str, **options: Any) -> DiskCache:
        """Open ``diskcache:///abs/dir`` (or ``diskcache://./rel/dir``).

        Args:
            url: the directory as a URL; a query string (``?size_limit=N``)
                adds options (see :data:`OPTIONS`).
            **options: forwarded to :class:`DiskCache`; they win over the query.

        Returns:
            The cache (opened, or failing each call while the directory is
            unusable).
        """
        parts = urlsplit(url)
        path = unquote(parts.netloc + parts.path)
        if not path:
            raise ValueError(f"diskcache URL needs a directory, got {url!r}")
        merged = parse_query(url)
        merged.update(options)
        return cls(path, **merged)

    def get(self, key: str) -> bytes | None:
        """See :meth:`CacheBackend.get`."""
        check_key(key)
        try:
            blob = self._call(lambda c: c.get(key))
        except UnsafeEntryError:
            self._discard(key)
            raise
        if blob is None:
            return None
        try:
            value, _ = _frame.unpack(key, blob)
        except (CorruptEntryError, UnsafeEntryError):
            self._discard(key)
            raise
        return value

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """See :meth:`CacheBackend.set`."""
        check_key(key)
        check_value(value)
        ttl = check_ttl(ttl)
        self._call(lambda c: c.set(key, value, expire=ttl))

    def delete(self, key: str) -> None:
        """See :meth:`CacheBackend.delete`."""
        check_key(key)
        self._call(lambda c: c.delete(key))

    def close(self) -> None:
        """Close this thread's database connection. Calling it again does nothing."""
        cache = self._cache
        if cache is not None:
            cache.close()

    def _open(self) -> diskcache.Cache:
        if self._opened and not self.directory.is_dir():
            # Removed while in use (or unmounted): recreating it here could write
            # somewhere nobody looks. Fail until it is back.
            raise FileNotFoundError(
                errno.ENOENT,
                "diskcache directory was removed while in use; it is not recreated",
                str(self.directory),
            )
        try:
            cache = self._new_cache()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):
                raise
            self._move_aside(exc)
            cache = self._new_cache()
        self._opened = True
        return cache

    def _new_cache(self) -> diskcache.Cache:
        cache = diskcache.Cache(
            str(self.directory),
            timeout=self._timeout,
            disk=BytesOnlyDisk,
            **self._settings,
        )
        self._db_id = _file_id(self.directory / _DB_FILE)
        return cache

    def _current(self) -> diskcache.Cache:
        """The open cache, after checking its database is still the one on disk.

        SQLite keeps writing to a database file that was deleted (with its
        directory) or replaced, so each call first compares the file's identity.
        """
        cache = self._cache
        if cache is not None and _file_id(self.directory / _DB_FILE) == self._db_id:
            return cache
        with self._swap_lock:
            cache = self._cache
            if cache is not None:
                if _file_id(self.directory / _DB_FILE) == self._db_id:
                    return cache  # another thread reopened it
                cache.close()
                self._cache = None
                logger.warning(
                    "diskcache database in %s was removed or replaced while in "
                    "use; closed it (it is reopened only where the directory "
                    "still exists)",
                    self.directory,
                )
            self._cache = self._open()
            return self._cache

    def _call(self, op: Callable[[diskcache.Cache], T]) -> T:
        cache = self._current()
        try:
            return op(cache)
        except sqlite3.DatabaseError as exc:
            # OperationalError is "locked", "busy", "no such table": transient or
            # ours to report, not a reason to throw the store away.
            if isinstance(exc, sqlite3.OperationalError):
                raise
            self._recover(cache, exc)
            raise

    def _recover(self, broken: diskcache.Cache, exc: BaseException) -> None:
        with self._swap_lock:
            cache = self._cache
            if cache is None or cache is not broken:
                return  # another thread already recovered
            cache.close()
            self._cache = None
            self._move_aside(exc)
            self._cache = self._new_cache()

    def _move_aside(self, exc: BaseException) -> None:
        """Move the database and its value files, and nothing else, aside."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.directory / f"corrupt-{stamp}-{os.getpid()}-{id(exc):x}"
        target.mkdir(parents=True)
        for name in _DB_FILES:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / name).rename(target / name)
        for path in _value_files(self.directory):
            relative = path.relative_to(self.directory)
            with contextlib.suppress(FileNotFoundError):
                (target / relative.parent).mkdir(parents=True, exist_ok=True)
                path.rename(target / relative)
        for sub in sorted(_value_dirs(self.directory), reverse=True):
            with contextlib.suppress(OSError):
                sub.rmdir()  # only if empty: someone else's file keeps it
        logger.warning(
            "diskcache database in %s is unreadable (%s); moved it to %s and "
            "started an empty one",
            self.directory,
            exc,
            target,
        )

    def _discard(self, key: str) -> None:
        cache = self._cache
        if cache is not None:
            with contextlib.suppress(Exception):
                cache.delete(key)


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _value_dirs(directory: Path) -> list[Path]:
    """diskcache's two levels of value directories (``ab`` and ``ab/cd``)."""
    out = []
    for top in directory.iterdir():
        if top.is_symlink() or not top.is_dir() or not _HEX2.fullmatch(top.name):
            continue
        out.append(top)
        out.extend(
            sub
            for sub in top.iterdir()
            if not sub.is_symlink() and sub.is_dir() and _HEX2.fullmatch(sub.name)
        )
    return out


def _value_files(directory: Path) -> list[Path]:
    """The value files diskcache wrote: ``ab/cd/<28 hex>.val``, nothing else."""
    return [
        f
        for sub in _value_dirs(directory)
        if sub.parent != directory
        for f in sub.iterdir()
        if not f.is_symlink() and f.is_file() and _VALUE_FILE.fullmatch(f.name)
    ]
