"""The contract suite every cache backend must pass, as importable pytest tests.

Subclass :class:`BackendContract` in a test module and provide a ``backend``
fixture (a fresh, empty backend per test; close it after ``yield``). To run the
two-process test as well, provide a ``backend_spec`` fixture returning a
:class:`BackendSpec` that a fresh process can open the same store from::

    import pytest
    from llmprod.testing import BackendContract, BackendSpec

    class TestMyBackend(BackendContract):
        @pytest.fixture
        def backend_spec(self, tmp_path):
            return BackendSpec("mystore:///" + str(tmp_path),
                               imports=("mypackage.cache",))

        @pytest.fixture
        def backend(self, backend_spec):
            cache = open_cache(backend_spec.url, **backend_spec.options)
            yield cache
            cache.close()

Both fixtures may live in a ``conftest.py`` instead. Without ``backend_spec`` the
two-process test is skipped. The 50 MB test is marked ``slow``.
"""

from __future__ import annotations

import importlib
import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest

from llmprod.cache.protocol import CacheBackend
from llmprod.cache.registry import open_cache

LARGE_VALUE_BYTES = 50 * 2**20
NUM_THREADS = 4
NUM_KEYS_PER_WRITER = 25
PROCESS_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class BackendSpec:
    """How a fresh process opens the store under test.

    Attributes:
        url: the URL given to :func:`llmprod.cache.open_cache`.
        options: keyword options for ``open_cache`` (plain, picklable values).
        imports: modules to import first, e.g. the one that registers the scheme.
    """

    url: str
    options: dict[str, Any] = field(default_factory=dict)
    imports: tuple[str, ...] = ()

    def open(self) -> CacheBackend:
        """Import ``imports`` and open the store.

        Returns:
            A new backend on the same store.
        """
        for module in self.imports:
            importlib.import_module(module)
        return open_cache(self.url, **self.options)


def value_for(writer: str, i: int, size: int = 1000) -> bytes:
    """Return a value that names its writer and index (for torn-write checks).

    Args:
        writer: who wrote it.
        i: the index of the write.
        size: length in bytes.

    Returns:
        ``size`` bytes starting with ``writer:i:`` and padded with a byte
        pattern that depends on both.
    """
    head = f"{writer}:{i}:".encode()
    fill = bytes([(len(writer) * 31 + i) % 251]) * max(0, size - len(head))
    return head + fill


def _write_from_process(
    spec: BackendSpec, writer: str, shared_key: str, barrier: Any
) -> None:
    backend = spec.open()
    try:
        barrier.wait()
        _write_all(backend, writer, shared_key)
    finally:
        backend.close()


def _write_all(backend: CacheBackend, writer: str, shared_key: str) -> None:
    for i in range(NUM_KEYS_PER_WRITER):
        backend.set(f"{writer}/{i}", value_for(writer, i))
        backend.set(shared_key, value_for(writer, i))


def _wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


class BackendContract:
    """Tests every :class:`~llmprod.cache.protocol.CacheBackend` must pass."""

    def test_name_is_a_class_level_string(self, backend: CacheBackend) -> None:
        assert isinstance(type(backend).name, str) and type(backend).name

    def test_satisfies_protocol(self, backend: CacheBackend) -> None:
        assert isinstance(backend, CacheBackend)

    def test_missing_key_is_none(self, backend: CacheBackend) -> None:
        assert backend.get("never-set") is None

    def test_set_then_get(self, backend: CacheBackend) -> None:
        backend.set("k", b"value")
        assert backend.get("k") == b"value"
        assert type(backend.get("k")) is bytes

    def test_overwrite_replaces_value(self, backend: CacheBackend) -> None:
        backend.set("k", b"first")
        backend.set("k", b"second, longer than the first")
        assert backend.get("k") == b"second, longer than the first"
        backend.set("k", b"3")  # shorter again: no leftover tail
        assert backend.get("k") == b"3"

    def test_delete(self, backend: CacheBackend) -> None:
        backend.set("a", b"1")
        backend.set("b", b"2")
        backend.delete("a")
        assert backend.get("a") is None
        assert backend.get("b") == b"2"  # only the named key goes

    def test_delete_missing_key_is_not_an_error(self, backend: CacheBackend) -> None:
        backend.delete("never-set")
        assert backend.get("never-set") is None

    def test_empty_value_is_a_hit(self, backend: CacheBackend) -> None:
        # b"" is a value, not a miss.
        backend.set("empty", b"")
        assert backend.get("empty") == b""

    def test_all_byte_values_round_trip(self, backend: CacheBackend) -> None:
        value = bytes(range(256)) * 4 + bytes(range(255, -1, -1))
        backend.set("binary", value)
        assert backend.get("binary") == value

    def test_value_above_inline_threshold(self, backend: CacheBackend) -> None:
        # 100 kB: diskcache moves values of 32 kB and more to files.
        value = bytes(range(256)) * 400
        backend.set("file-sized", value)
        assert backend.get("file-sized") == value

    def test_awkward_keys(self, backend: CacheBackend) -> None:
        keys = [
            "",
            "with space",
            "slash/and/../dots",
            "ünïcödé-键-🔑",
            "x" * 1000,
            "nul\x00inside",
        ]
        for i, key in enumerate(keys):
            backend.set(key, str(i).encode())
        for i, key in enumerate(keys):
            assert backend.get(key) == str(i).encode(), repr(key)

    @pytest.mark.parametrize("value", ["text", bytearray(b"x"), memoryview(b"x"), 1])
    def test_non_bytes_value_raises_type_error(
        self, backend: CacheBackend, value: Any
    ) -> None:
        with pytest.raises(TypeError):
            backend.set("k", value)
        assert backend.get("k") is None  # nothing was stored

    def test_non_str_key_raises_type_error(self, backend: CacheBackend) -> None:
        for op in (
            lambda: backend.get(b"k"),  # type: ignore[arg-type]
            lambda: backend.set(1, b"v"),  # type: ignore[arg-type]
            lambda: backend.delete(None),  # type: ignore[arg-type]
        ):
            with pytest.raises(TypeError):
                op()

    @pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf")])
    def test_bad_ttl_raises_value_error(
        self, backend: CacheBackend, ttl: float
    ) -> None:
        with pytest.raises(ValueError):
            backend.set("k", b"v", ttl=ttl)

    def test_ttl_expiry(self, backend: CacheBackend) -> None:
        backend.set("short", b"s", ttl=0.3)
        backend.set("long", b"l", ttl=600)
        backend.set("forever", b"f")
        assert _wait_until(lambda: backend.get("short") is None, timeout_s=10.0)
        assert backend.get("long") == b"l"
        assert backend.get("forever") == b"f"

    def test_set_without_ttl_clears_old_ttl(self, backend: CacheBackend) -> None:
        backend.set("k", b"old", ttl=0.3)
        backend.set("k", b"new")
        time.sleep(0.5)
        assert backend.get("k") == b"new"

    @pytest.mark.slow
    def test_large_value(self, backend: CacheBackend) -> None:
        value = bytes(range(256)) * (LARGE_VALUE_BYTES // 256)
        backend.set("large", value)
        got = backend.get("large")
        assert got is not None and len(got) == len(value)
        assert got == value

    def test_concurrent_writers_from_threads(self, backend: CacheBackend) -> None:
        shared = "shared"
        writers = [f"t{n}" for n in range(NUM_THREADS)]
        start = threading.Barrier(NUM_THREADS)

        def write(writer: str) -> None:
            start.wait()
            for i in range(NUM_KEYS_PER_WRITER):
                backend.set(f"{writer}/{i}", value_for(writer, i))
                backend.set(shared, value_for(writer, i))
                assert backend.get(f"{writer}/{i}") == value_for(writer, i)

        with ThreadPoolExecutor(NUM_THREADS) as pool:
            for future in [pool.submit(write, w) for w in writers]:
                future.result(timeout=PROCESS_TIMEOUT_S)
        _check_writers(backend, writers, shared)

    def test_concurrent_writers_from_processes(
        self, backend: CacheBackend, request: pytest.FixtureRequest
    ) -> None:
        try:
            spec = request.getfixturevalue("backend_spec")
        except pytest.FixtureLookupError:
            spec = None
        if spec is None:
            pytest.skip(
                "no backend_spec: this store cannot be opened from another process"
            )
        # Two processes: this one and a spawned child that reopens the store
        # from its URL. A barrier starts both writers at once.
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(2, timeout=PROCESS_TIMEOUT_S)
        child = ctx.Process(
            target=_write_from_process, args=(spec, "child", "shared", barrier)
        )
        child.start()
        try:
            barrier.wait()
            _write_all(backend, "parent", "shared")
            child.join(PROCESS_TIMEOUT_S)
        finally:
            if child.is_alive():
                child.kill()
                child.join()
        assert child.exitcode == 0, "the writer process failed"
        _check_writers(backend, ["parent", "child"], "shared")


def _check_writers(backend: CacheBackend, writers: list[str], shared: str) -> None:
    for writer in writers:
        for i in range(NUM_KEYS_PER_WRITER):
            assert backend.get(f"{writer}/{i}") == value_for(writer, i), (writer, i)
    # Last writer wins, and its value arrives whole: never a mix of two writes.
    last = backend.get(shared)
    finals = [value_for(w, NUM_KEYS_PER_WRITER - 1) for w in writers]
    assert last in finals
