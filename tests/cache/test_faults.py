"""Faults on real servers and real files (RELIABILITY.md F1-F6, N6).

Every fault here is caused for real: redis-server and moto's S3 server are
SIGKILLed, diskcache files and SQLite headers are overwritten on disk, pickles are
planted with diskcache's own default Disk. No mocks.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diskcache
import pytest

from llmprod import SamplingParams
from llmprod.cache import (
    CorruptEntryError,
    FailSafeCache,
    TieredCache,
    UnsafeEntryError,
    open_cache,
)
from llmprod.cache.disk import DiskCache
from llmprod.cache.fsspec import FsspecCache
from llmprod.cache.redis import RedisCache
from llmprod.testing import value_for

from .conftest import RedisServer, S3Server, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
# "Well under a second" (F1): a dead store must cost milliseconds. The bound is
# loose on purpose so a busy 2-core CI box does not flake; the measured cost is
# a few ms (connection refused on 127.0.0.1, no retry backoff).
CALL_BOUND_S = 0.5
FILE_SIZED = 100_000  # above diskcache's 32 kB inline limit: stored as a .val file


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (a process restart), failing loudly."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


class _PickleBomb:
    """Unpickling this creates ``path``: proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


# --- Redis (F1, F2, F3) ----------------------------------------------------------


@pytest.mark.redis
def test_redis_sigkill_mid_run_calls_bounded_and_counted(
    redis_factory: Callable[[], RedisServer],
) -> None:
    server = redis_factory()
    # cooldown_s=0: every call really goes to the dead server, so the bound
    # below measures redis-py's own cost, not the skip.
    cache = FailSafeCache(open_cache(server.url), cooldown_s=0)
    for i in range(20):
        cache.set(f"k{i}", value_for("w", i))
        assert cache.get(f"k{i}") == value_for("w", i)
    assert cache.stats() == {
        "hits": 20, "misses": 0, "errors": 0, "sets": 20, "set_errors": 0,
    }  # fmt: skip

    server.kill()

    durations = []
    for i in range(20):
        value, seconds = timed(functools.partial(cache.get, f"k{i}"))
        durations.append(seconds)
        assert value is None  # the server is gone: a miss, not an exception
        _, seconds = timed(functools.partial(cache.set, f"new{i}", b"v"))
        durations.append(seconds)
    assert max(durations) < CALL_BOUND_S, durations
    stats = cache.stats()
    assert stats["errors"] == 20 and stats["set_errors"] == 20
    assert stats["hits"] == 20 and stats["misses"] == 20
    assert cache.is_down
    cache.close()


@pytest.mark.redis
def test_redis_bare_backend_fails_fast_without_retry_stall(
    redis_factory: Callable[[], RedisServer],
) -> None:
    server = redis_factory()
    backend = RedisCache(server.url)
    backend.set("k", b"v")
    server.kill()
    # redis-py's default policy retries with backoff; ours fails in milliseconds.
    for _ in range(5):
        start = time.perf_counter()
        with pytest.raises(Exception) as info:
            backend.get("k")
        assert time.perf_counter() - start < CALL_BOUND_S
        assert "redis" in type(info.value).__module__
    backend.close()


@pytest.mark.redis
def test_redis_restart_hits_resume_with_same_object(
    redis_factory: Callable[[], RedisServer],
) -> None:
    server = redis_factory()
    backend = RedisCache(server.url)
    cache = FailSafeCache(backend, cooldown_s=0.2)
    cache.set("before", b"1")
    assert cache.get("before") == b"1"

    server.kill()
    assert cache.get("before") is None
    assert cache.is_down and cache.stats()["errors"] == 1

    server.restart()  # same port; the kill lost the data (no persistence)
    # The bare backend reconnects on its first call: its one immediate retry
    # replaces the dead pooled connection.
    backend.set("after", b"2")
    assert backend.get("after") == b"2"
    # The wrapper resumes by itself once its short cooldown is over.
    deadline = time.monotonic() + 5
    while cache.get("after") != b"2":
        assert time.monotonic() < deadline, "hits did not resume after restart"
        time.sleep(0.05)
    assert not cache.is_down
    cache.set("again", b"3")
    assert cache.get("again") == b"3"
    cache.close()


@pytest.mark.redis
def test_redis_hung_costs_one_timeout_then_cooldown(
    redis_factory: Callable[[], RedisServer],
) -> None:
    server = redis_factory()
    backend = RedisCache(server.url)
    cache = FailSafeCache(backend, cooldown_s=30)
    cache.set("k", b"v")
    server.freeze()  # SIGSTOP: the socket stays open, nothing answers
    try:
        value, seconds = timed(lambda: cache.get("k"))
        assert value is None
        assert seconds < 0.5 + CALL_BOUND_S  # one 0.5 s socket timeout, no retry
        for _ in range(10):  # then skipped for the cooldown: no more timeouts
            value, seconds = timed(lambda: cache.get("k"))
            assert value is None and seconds < 0.05
        assert cache.stats()["errors"] == 11 and cache.is_down
    finally:
        server.thaw()
    # The timed-out connection was dropped, so no late reply is read as the
    # answer to a later command.
    backend.set("k2", b"v2")
    assert backend.get("k") == b"v" and backend.get("k2") == b"v2"
    cache.close()


@pytest.mark.redis
def test_redis_down_at_open(caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    backend, seconds = timed(lambda: open_cache(url))  # opening does not connect
    assert seconds < CALL_BOUND_S
    cache = FailSafeCache(backend)
    with caplog.at_level(logging.WARNING, logger="llmprod.cache"):
        up, seconds = timed(cache.ping)
    assert up is False and cache.is_down and seconds < CALL_BOUND_S
    assert any("redis" in r.getMessage() for r in caplog.records)  # it warns
    assert cache.get("k") is None
    cache.set("k", b"v")  # dropped, counted
    assert cache.stats() == {
        "hits": 0, "misses": 1, "errors": 1, "sets": 0, "set_errors": 1,
    }  # fmt: skip
    cache.close()


@pytest.mark.redis
def test_down_warning_names_the_url_without_its_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()  # nothing listens there
    cache = FailSafeCache(open_cache(f"redis://:hunter2@127.0.0.1:{port}/0"))
    with caplog.at_level(logging.WARNING, logger="llmprod.cache"):
        assert cache.ping() is False
    (record,) = caplog.records
    message = record.getMessage()
    assert f"redis (redis://***@127.0.0.1:{port}/0)" in message
    assert "hunter2" not in message
    cache.close()


@pytest.mark.redis
def test_redis_garbage_is_a_miss_and_deleted(redis_server: RedisServer) -> None:
    ns = f"t{uuid.uuid4().hex}:"
    backend = RedisCache(redis_server.url, namespace=ns)
    cache = FailSafeCache(backend)
    backend.client.set(ns + "garbage", b"not an llmprod entry")
    backend.client.set(ns + "pickle", pickle.dumps({"a": 1}))
    backend.set("truncated", b"x" * 1000)
    backend.client.setrange(ns + "truncated", 500, b"\x00" * 10)  # flipped bytes
    with pytest.raises(UnsafeEntryError):
        backend.get("garbage")
    for key in ("pickle", "truncated"):
        assert cache.get(key) is None
    assert cache.stats()["errors"] == 2 and not cache.is_down  # the store is up
    for key in ("garbage", "pickle", "truncated"):
        assert backend.client.exists(ns + key) == 0  # removed
    backend.close()


@pytest.mark.redis
def test_failures_logged_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    cache = FailSafeCache(open_cache(url), log_interval_s=0.3, cooldown_s=0)
    with caplog.at_level(logging.WARNING, logger="llmprod.cache"):
        for _ in range(30):
            cache.get("k")
        assert len(caplog.records) == 1
        time.sleep(0.35)
        cache.get("k")
    assert len(caplog.records) == 2
    assert "29 similar failures" in caplog.records[1].getMessage()
    assert cache.stats()["errors"] == 31


# --- diskcache (F5, F6) ----------------------------------------------------------


def _value_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*.val") if "corrupt-" not in str(p))


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_damaged_value_file_is_a_miss_and_deleted(tmp_path: Path, damage: str) -> None:
    backend = DiskCache(tmp_path)
    value = bytes(range(256)) * (FILE_SIZED // 256)
    backend.set("k", value)
    backend.set("other", b"fine")
    (path,) = _value_files(tmp_path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        middle = len(data) // 2
        path.write_bytes(
            data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        )
    else:
        path.write_bytes(b"")

    with pytest.raises((CorruptEntryError, UnsafeEntryError)):
        backend.get("k")
    assert backend.get("k") is None  # the entry was removed: a plain miss now
    assert not path.exists()
    assert backend.get("other") == b"fine"  # nothing else lost
    backend.set("k", value)  # and the key is usable again
    assert backend.get("k") == value
    backend.close()


def test_damaged_inline_value_is_a_miss_through_failsafe(tmp_path: Path) -> None:
    backend = DiskCache(tmp_path)
    cache = FailSafeCache(backend)
    cache.set("k", b"small value kept inside SQLite")
    # Rewrite the row's bytes behind diskcache's back.
    with contextlib.closing(sqlite3.connect(tmp_path / "cache.db")) as con:
        con.execute("UPDATE Cache SET value = substr(value, 1, 30) WHERE key = 'k'")
        con.commit()
    assert cache.get("k") is None
    assert cache.stats()["errors"] == 1
    assert backend.get("k") is None  # deleted, so no error the second time
    cache.close()


def test_overwritten_sqlite_header_is_moved_aside_and_recreated(
    tmp_path: Path,
) -> None:
    backend = DiskCache(tmp_path)
    backend.set("k", b"v")
    backend.close()
    with open(tmp_path / "cache.db", "r+b") as f:
        f.write(b"\xde\xad\xbe\xef" * 25)  # the 100-byte SQLite header

    reopened = DiskCache(tmp_path)  # does not raise
    assert reopened.get("k") is None  # a fresh, empty store
    reopened.set("k", b"new")
    assert reopened.get("k") == b"new"
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("corrupt-")]
    assert (aside / "cache.db").read_bytes().startswith(b"\xde\xad\xbe\xef")
    reopened.close()


def test_database_corrupted_while_open_recovers(tmp_path: Path) -> None:
    backend = DiskCache(tmp_path)
    cache = FailSafeCache(backend, cooldown_s=0)
    cache.set("k", b"v")
    with open(tmp_path / "cache.db", "r+b") as f:
        f.write(b"\x00garbage" * 13)
    results: list[bytes | None] = []

    def in_new_thread() -> None:
        # A new thread opens its own SQLite connection and meets the bad header.
        results.append(cache.get("k"))
        cache.set("k2", b"v2")
        results.append(cache.get("k2"))

    thread = threading.Thread(target=in_new_thread)
    thread.start()
    thread.join(30)
    assert results == [None, b"v2"]
    assert cache.stats()["errors"] == 1
    assert any(p.name.startswith("corrupt-") for p in tmp_path.iterdir())
    assert cache.get("k2") == b"v2"  # the old thread sees the new store too
    cache.close()


@pytest.mark.parametrize("size", ["inline", "file"])
def test_planted_pickle_is_refused_and_never_executed(
    tmp_path: Path, size: str
) -> None:
    store = tmp_path / "store"
    DiskCache(store).close()
    # The payload works: unpickling it here creates its marker file.
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_PickleBomb(control))).close()
    assert control.exists()

    marker = tmp_path / "marker"
    payload: Any = _PickleBomb(marker)
    if size == "file":
        payload = [payload, b"x" * FILE_SIZED]  # pickled into a .val file
    planter = diskcache.Cache(str(store))  # diskcache's default, pickling Disk
    planter.set("k", payload)
    planter.close()

    backend = DiskCache(store)
    with pytest.raises(UnsafeEntryError):
        backend.get("k")
    assert not marker.exists()
    assert backend.get("k") is None  # removed, so a plain miss now
    cache = FailSafeCache(backend)
    planter = diskcache.Cache(str(store))
    planter.set("k", _PickleBomb(marker))
    planter.close()
    assert cache.get("k") is None and cache.stats()["errors"] == 1
    assert not marker.exists()
    backend.close()


def test_planted_text_and_numbers_are_refused(tmp_path: Path) -> None:
    DiskCache(tmp_path).close()
    planter = diskcache.Cache(str(tmp_path))
    planter.set("text", "x" * FILE_SIZED)  # MODE_TEXT file
    planter.set("int", 7)  # MODE_RAW int
    planter.set("str", "short")  # MODE_RAW str
    planter.close()
    backend = DiskCache(tmp_path)
    for key in ("text", "int", "str"):
        with pytest.raises(UnsafeEntryError):
            backend.get(key)
        assert backend.get(key) is None
    backend.close()


@pytest.mark.parametrize("value", ["text", 1, {"a": 1}, None])
def test_non_bytes_value_refused_before_storing(tmp_path: Path, value: Any) -> None:
    backend = DiskCache(tmp_path)
    with pytest.raises(TypeError):
        backend.set("k", value)
    with pytest.raises(TypeError):
        FailSafeCache(backend).set("k", value)  # not swallowed as a failure
    assert backend.get("k") is None
    backend.close()


def test_sigkilled_writer_loses_nothing_it_reported(tmp_path: Path) -> None:
    code = f"""
        import sys
        from llmprod.cache.disk import DiskCache
        from llmprod.testing import value_for
        cache = DiskCache({str(tmp_path)!r})
        i = 0
        while True:
            size = 100 if i % 2 else {FILE_SIZED}  # inline and file entries
            cache.set(f"k{{i}}", value_for("w", i, size))
            print(i, flush=True)
            i += 1
    """
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=env,
    )
    assert proc.stdout is not None
    last = -1
    try:
        for line in proc.stdout:
            last = int(line)
            if last >= 40:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
    assert last >= 40, "the writer died before writing"

    backend = DiskCache(tmp_path)
    for i in range(last + 1):
        size = 100 if i % 2 else FILE_SIZED
        assert backend.get(f"k{i}") == value_for("w", i, size), i
    # The write in flight at the kill is whole or absent, never a crash.
    in_flight = backend.get(f"k{last + 1}")
    assert in_flight in (
        None,
        value_for("w", last + 1, 100 if (last + 1) % 2 else FILE_SIZED),
    )
    backend.close()


# --- diskcache directories that cannot be used, or vanish (F2 for diskcache) -----

ENGINE_GREEDY_TOKENS = 8


def _unusable_dirs(tmp_path: Path) -> dict[str, Path]:
    """Directories diskcache cannot open, each for a reason that holds for root.

    The tests run as root, for whom a chmod-read-only directory is still
    writable, and mounting a read-only tmpfs needs privileges a test should not
    assume; so these cases fail for root as they would for anyone.
    """
    regular = tmp_path / "a-regular-file"
    regular.write_bytes(b"not a directory")
    return {
        # procfs refuses to create entries: mkdir fails with ENOENT.
        "under-proc": Path(f"/proc/llmprod-test-{uuid.uuid4().hex}"),
        # The path exists but is a file: SQLite cannot open "<file>/cache.db".
        "regular-file": regular,
        # A directory cannot be created under a file: ENOTDIR.
        "under-a-file": regular / "cache",
    }


def test_unusable_diskcache_url_engine_starts_serves_and_reports_down(
    make_engine: Any, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    path = _unusable_dirs(tmp_path)["under-proc"]
    url = f"diskcache://{path}"
    with caplog.at_level(logging.WARNING):
        eng = make_engine(kv_cache_memory="64MiB", cache=url)  # does not raise
    # Both warnings name the backend and its directory, never an empty name.
    failed = [r.getMessage() for r in caplog.records if "ping failed" in r.getMessage()]
    down = [r.getMessage() for r in caplog.records if "down at start" in r.getMessage()]
    assert failed and down, caplog.text
    for message in failed + down:
        assert f"backend diskcache ({path})" in message, message
    assert eng.answers.exact.backend.is_down

    params = SamplingParams(max_tokens=ENGINE_GREEDY_TOKENS, temperature=0)
    out = eng.generate("Name a colour.", params)[0]
    assert out.finish_reason in ("stop", "length") and out.token_ids
    assert eng.answers.exact.flush(10.0)
    again = eng.generate("Name a colour.", params)[0]
    assert again.cache_hit is None and again.token_ids == out.token_ids
    response = eng.metrics().cache["response"]
    tier = response["backend"]["diskcache"]
    assert tier["errors"] >= 1 and tier["set_errors"] >= 1
    assert tier["hits"] == 0 and tier["sets"] == 0
    assert response["writes"] == 0 and response["failed_writes"] >= 1
    assert not path.exists()


def test_unusable_diskcache_tiers_are_skipped_and_hot_tier_serves(
    make_engine: Any, tmp_path: Path
) -> None:
    cases = _unusable_dirs(tmp_path)
    tiers = TieredCache(
        [open_cache("memory://")]
        + [open_cache(f"diskcache://{path}") for path in cases.values()]
    )
    eng = make_engine(kv_cache_memory="64MiB", cache=tiers)  # does not raise
    labels = tiers.labels[1:]
    assert labels == ["diskcache", "diskcache-1", "diskcache-2"]
    assert all(tier.is_down for tier in tiers.tiers[1:])

    params = SamplingParams(max_tokens=ENGINE_GREEDY_TOKENS, temperature=0)
    out = eng.generate("Name a river.", params)[0]
    assert out.finish_reason in ("stop", "length") and out.token_ids
    assert eng.answers.exact.flush(10.0)
    again = eng.generate("Name a river.", params)[0]
    assert again.cache_hit == "memory" and again.token_ids == out.token_ids
    backend = eng.metrics().cache["response"]["backend"]
    assert backend["memory"]["sets"] == 1 and backend["memory"]["hits"] == 1
    for label in labels:
        assert backend[label]["errors"] >= 1, (label, backend)
        assert backend[label]["set_errors"] >= 1 and backend[label]["sets"] == 0
    regular = cases["regular-file"]
    assert regular.read_bytes() == b"not a directory"  # left alone


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root writes to a chmod-read-only directory anyway"
)
def test_read_only_diskcache_directory_is_down(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o555)
    try:
        cache = FailSafeCache(open_cache(f"diskcache://{directory}"))
        assert cache.ping() is False and cache.is_down
        cache.set("k", b"v")
        assert cache.get("k") is None
        assert cache.stats()["set_errors"] == 1 and cache.stats()["sets"] == 0
    finally:
        directory.chmod(0o755)


def test_unusable_directory_raises_on_each_call_and_recovers(tmp_path: Path) -> None:
    regular = _unusable_dirs(tmp_path)["regular-file"]
    backend = DiskCache(regular)  # opening does not raise, like Redis
    for call in (lambda: backend.get("k"), lambda: backend.set("k", b"v")):
        with pytest.raises((OSError, sqlite3.Error)):
            call()
    regular.unlink()  # the path becomes usable: the next call opens it
    backend.set("k", b"v")
    assert backend.get("k") == b"v" and (regular / "cache.db").is_file()
    backend.close()


def test_directory_deleted_mid_run_writes_are_errors_reads_are_misses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "dc"
    backend = DiskCache(directory)
    cache = FailSafeCache(backend, cooldown_s=0)
    cache.set("small", b"inline")
    cache.set("big", b"x" * FILE_SIZED)
    assert cache.get("small") == b"inline"

    shutil.rmtree(directory)  # SQLite would keep writing to the unlinked file

    with caplog.at_level(logging.WARNING, logger="llmprod.cache"):
        cache.set("after", b"lost")  # no exception reaches the caller
        cache.set("after-big", b"y" * FILE_SIZED)
        assert cache.get("small") is None
        assert cache.get("after") is None
    stats = cache.stats()
    assert stats["sets"] == 2 and stats["set_errors"] == 2
    assert stats["hits"] == 1 and stats["misses"] == 2 and stats["errors"] == 2
    assert cache.is_down
    assert not directory.exists()  # not recreated behind the operator's back
    assert any("removed" in r.getMessage() for r in caplog.records)
    with pytest.raises(FileNotFoundError):  # the bare backend says why
        backend.get("small")

    directory.mkdir()  # someone restores the directory: a fresh, empty store
    cache.set("back", b"again")
    assert cache.get("back") == b"again" and not cache.is_down
    assert cache.get("small") is None
    reader = DiskCache(directory)  # the write went to the file on disk
    assert reader.get("back") == b"again"
    reader.close()
    cache.close()


def test_database_file_replaced_mid_run_is_reopened(tmp_path: Path) -> None:
    backend = DiskCache(tmp_path)
    backend.set("old", b"1")
    for name in ("cache.db", "cache.db-wal", "cache.db-shm"):
        with contextlib.suppress(FileNotFoundError):
            (tmp_path / name).unlink()
    backend.set("new", b"2")  # goes to a new database file, not the unlinked one
    reader = DiskCache(tmp_path)
    assert reader.get("new") == b"2" and reader.get("old") is None
    reader.close()
    backend.close()


def test_corrupt_database_moved_aside_without_other_files(tmp_path: Path) -> None:
    user_files = {
        "notes.txt": b"mine",
        "cache.txt": b"also mine",
        "data/table.csv": b"a,b\n",
        "ab/readme.txt": b"a directory with a value-directory name",
        "ab/cd/0123456789abcdef0123456789ab.txt": b"not a .val",
    }
    for name, data in user_files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    backend = DiskCache(tmp_path)
    backend.set("inline", b"v")
    backend.set("file", b"x" * FILE_SIZED)
    (value_file,) = _value_files(tmp_path)
    backend.close()
    with open(tmp_path / "cache.db", "r+b") as f:
        f.write(b"\xde\xad\xbe\xef" * 25)  # the 100-byte SQLite header

    reopened = DiskCache(tmp_path)
    assert reopened.get("inline") is None and reopened.get("file") is None
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("corrupt-")]
    moved = sorted(str(p.relative_to(aside)) for p in aside.rglob("*") if p.is_file())
    assert "cache.db" in moved
    assert str(value_file.relative_to(tmp_path)) in moved  # its value file too
    assert not value_file.exists()
    for name, data in user_files.items():  # everything else stays where it was
        assert (tmp_path / name).read_bytes() == data, name
        assert name not in moved
    reopened.set("inline", b"new")
    assert reopened.get("inline") == b"new"
    reopened.close()


# --- S3 (F4) ---------------------------------------------------------------------


@pytest.mark.s3
def test_corrupted_s3_object_is_a_miss_and_deleted(s3_server: S3Server) -> None:
    backend = FsspecCache(f"s3://llmprod/{uuid.uuid4().hex}", **s3_server.options)
    cache = FailSafeCache(backend)
    backend.set("truncated", b"x" * 1000)
    path = backend.path_for("truncated")
    backend.fs.pipe_file(path, backend.fs.cat_file(path)[:500])
    backend.fs.pipe_file(backend.path_for("garbage"), b"\x80\x04garbage")
    for key in ("truncated", "garbage"):
        assert cache.get(key) is None
        assert not backend.fs.exists(backend.path_for(key))
    assert cache.stats()["errors"] == 2
    backend.close()


@pytest.mark.s3
def test_s3_killed_hot_tier_serves_and_failed_writes_counted(
    s3_factory: Callable[[], S3Server],
) -> None:
    server = s3_factory()
    url = f"s3://llmprod/{uuid.uuid4().hex}"
    s3 = open_cache(url, **server.options)
    tiers = TieredCache([open_cache("memory://"), s3], cooldown_s=0)
    tiers.set("a", b"alpha")
    assert s3.get("a") == b"alpha"  # written through

    server.kill()

    # The bare backend raises botocore's EndpointConnectionError, not an OSError.
    with pytest.raises(Exception) as info:
        s3.get("a")
    assert type(info.value).__name__ == "EndpointConnectionError"
    assert not isinstance(info.value, OSError)

    (value, tier), seconds = timed(lambda: tiers.get_with_tier("a"))
    assert (value, tier) == (b"alpha", "memory") and seconds < CALL_BOUND_S
    (value, tier), seconds = timed(lambda: tiers.get_with_tier("never-set"))
    assert (value, tier) == (None, None) and seconds < 1.0
    _, seconds = timed(lambda: tiers.set("b", b"beta"))
    assert seconds < 1.0
    assert tiers.get_with_tier("b") == (b"beta", "memory")
    stats = tiers.stats()
    assert stats["s3"]["errors"] == 1  # the lookup of "never-set"
    assert stats["s3"]["set_errors"] == 1  # the write of "b"
    assert stats["memory"]["sets"] == 2 and stats["memory"]["set_errors"] == 0
    tiers.close()


# --- Persistence across a process restart (N6) -----------------------------------


@pytest.mark.s3
def test_tiered_write_then_fresh_process_reads_disk_and_s3(
    s3_server: S3Server, tmp_path: Path
) -> None:
    disk_dir = tmp_path / "disk"
    s3_url = f"s3://llmprod/{uuid.uuid4().hex}"
    values = {
        "small": b"\x00\x01small\xff",
        "file-sized": bytes(range(256)) * (FILE_SIZED // 256),
        "binary-5mb": os.urandom(5 * 2**20),
    }
    tiers = TieredCache(
        [
            open_cache("memory://"),
            open_cache(f"diskcache://{disk_dir}"),
            open_cache(s3_url, **s3_server.options),
        ]
    )
    for key, value in values.items():
        tiers.set(key, value)
    tiers.close()

    out = tmp_path / "out"
    out.mkdir()
    proc = run_python(
        f"""
        import json
        from llmprod.cache import TieredCache, open_cache
        options = {s3_server.options!r}
        disk = open_cache("diskcache://{disk_dir}")
        s3 = open_cache({s3_url!r}, **options)
        answered = {{}}
        for key in {list(values)!r}:
            for label, tier in (("disk", disk), ("s3", s3)):
                with open(f"{out}/{{label}}-{{key}}", "wb") as f:
                    f.write(tier.get(key))
            tiers = TieredCache([open_cache("memory://"), disk, s3])
            answered[key] = tiers.get_with_tier(key)[1]
            answered[key + "@s3"] = TieredCache([open_cache("memory://"), s3]).get_with_tier(key)[1]
        print(json.dumps(answered))
        """
    )
    answered = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, value in values.items():
        assert (out / f"disk-{key}").read_bytes() == value, key
        assert (out / f"s3-{key}").read_bytes() == value, key
        assert answered[key] == "diskcache"
        assert answered[key + "@s3"] == "s3"
