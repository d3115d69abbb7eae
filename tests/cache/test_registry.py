"""open_cache URLs, scheme registration, and the memory backend's byte bound."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from llmprod.cache import (
    FailSafeCache,
    MemoryCache,
    MissingDependencyError,
    open_cache,
    register_backend,
    registered_schemes,
)
from llmprod.cache.disk import DiskCache
from llmprod.cache.fsspec import FsspecCache, split_query
from llmprod.cache.redis import RedisCache
from llmprod.cache.registry import parse_query
from llmprod.errors import InvalidConfigError

from .conftest import S3_KEY, S3_SECRET, S3Server, free_port


def test_builtin_schemes() -> None:
    assert set(registered_schemes()) >= {
        "memory", "diskcache", "redis", "rediss", "s3", "s3a", "file", "fsspec+memory",
    }  # fmt: skip


@pytest.mark.parametrize("url", ["nosuch://x", "just-a-path", "", "memory:/x"])
def test_unknown_scheme_lists_accepted_ones(url: str) -> None:
    with pytest.raises(ValueError) as info:
        open_cache(url)
    assert isinstance(info.value, InvalidConfigError)
    message = str(info.value)
    for scheme in ("memory://", "diskcache://", "redis://", "s3://", "file://"):
        assert scheme in message
    assert "fsspec+<protocol>://" in message


def test_urls_open_the_right_backend(tmp_path: Path) -> None:
    memory = open_cache("memory://?max_bytes=4096")
    assert isinstance(memory, MemoryCache) and memory.max_bytes == 4096
    assert open_cache("memory://", max_bytes=10).max_bytes == 10  # type: ignore[attr-defined]
    disk = open_cache(f"diskcache://{tmp_path / 'd'}?size_limit=1000000")
    assert isinstance(disk, DiskCache)
    disk.close()
    redis = open_cache("redis://127.0.0.1:1/3", namespace="ns:")  # does not connect
    assert isinstance(redis, RedisCache) and redis.namespace == "ns:"
    files = open_cache(f"file://{tmp_path / 'f'}")
    assert isinstance(files, FsspecCache) and files.label == "file"
    fs_memory = open_cache("fsspec+memory://registry-test")
    assert isinstance(fs_memory, FsspecCache) and fs_memory.label == "memory"


def test_memory_url_rejects_a_path() -> None:
    with pytest.raises(ValueError):
        open_cache("memory://somewhere/else")


def test_parse_query() -> None:
    assert parse_query("x://?a=1&b=2.5&c=TRUE&d=no") == {
        "a": 1, "b": 2.5, "c": True, "d": "no",
    }  # fmt: skip


class _Custom(MemoryCache):
    name = "custom"


def test_register_is_lazy_and_refuses_to_clobber() -> None:
    register_backend("llmprod-test-custom", _Custom)
    register_backend("llmprod-test-custom", _Custom)  # the same again: fine
    assert isinstance(open_cache("llmprod-test-custom://"), _Custom)
    with pytest.raises(ValueError, match="already registered"):
        register_backend("llmprod-test-custom", MemoryCache)
    with pytest.raises(ValueError, match="already registered"):
        register_backend("memory", _Custom)  # a built-in is protected too
    register_backend("llmprod-test-custom", MemoryCache, clobber=True)
    assert type(open_cache("llmprod-test-custom://")) is MemoryCache
    with pytest.raises(ValueError):
        register_backend("Bad Scheme", MemoryCache)


def test_missing_package_names_the_extra() -> None:
    # A lazily imported target whose package is not installed.
    register_backend(
        "llmprod-test-missing", "llmprod_no_such_pkg.cache:Backend", extra="s3"
    )
    with pytest.raises(ImportError) as info:
        open_cache("llmprod-test-missing://x")
    assert isinstance(info.value, MissingDependencyError)
    assert "pip install 'llmprod[s3]'" in str(info.value)


def test_memory_lru_is_bounded_in_bytes() -> None:
    # Each entry: 1-byte key + 100-byte value + 64 bytes of overhead = 165 bytes.
    cache = MemoryCache(max_bytes=165 * 3)
    for key in "abc":
        cache.set(key, b"x" * 100)
    assert cache.num_bytes == 165 * 3 and len(cache) == 3
    assert cache.get("a") == b"x" * 100  # "a" is now the most recently used
    cache.set("d", b"x" * 100)  # evicts "b", the least recently used
    assert [k for k in "abcd" if cache.get(k) is not None] == ["a", "c", "d"]
    cache.set("big", b"x" * 1000)  # larger than the whole cache: not stored
    assert cache.get("big") is None and len(cache) == 3
    cache.set("a", b"y" * 1000)  # an oversized overwrite drops the old value
    assert cache.get("a") is None and cache.num_bytes == 165 * 2
    with pytest.raises(ValueError):
        MemoryCache(max_bytes=0)


# --- query strings: parsed into options, or refused (never ignored) -------------


def test_diskcache_query_option_it_does_not_know_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError) as info:
        open_cache(f"diskcache://{tmp_path / 'd'}?sizelimit=1000")  # a typo
    message = str(info.value)
    assert "sizelimit" in message and "size_limit" in message
    assert "eviction_policy" in message and "timeout" in message
    assert not (tmp_path / "d").exists()  # refused before anything was created
    with pytest.raises(InvalidConfigError):
        DiskCache(tmp_path / "d", no_such_setting=1)


def test_split_query_types_the_s3_options() -> None:
    url, options = split_query(
        "s3://bucket/pre/fix?endpoint_url=http://127.0.0.1:9000/&key=123"
        "&anon=TRUE&use_ssl=0&retries=2&connect_timeout=0.5",
        "s3",
    )
    assert url == "s3://bucket/pre/fix"
    assert options == {
        "endpoint_url": "http://127.0.0.1:9000/",
        "key": "123",  # a string option stays a string, even when it looks numeric
        "anon": True,
        "use_ssl": False,
        "retries": 2,
        "connect_timeout": 0.5,
    }
    assert split_query("s3://bucket/prefix", "s3") == ("s3://bucket/prefix", {})


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("s3://bucket/p?client_kwargs={}", ["'client_kwargs'", "endpoint_url", "anon"]),
        ("s3://bucket/p?endpoint=http://x", ["'endpoint'", "endpoint_url"]),
        ("s3a://bucket/p?anon=maybe", ["anon='maybe'", "true or false"]),
        ("s3://bucket/p?retries=many", ["retries='many'", "number"]),
        ("s3://bucket/p?endpoint_url=", ["endpoint_url=''", "non-empty"]),
        ("s3://bucket/p?anon=1&anon=0", ["'anon' twice"]),
        ("file:///tmp/llmprod-unused?auto_mkdir=1", ["'auto_mkdir'", "none"]),
        ("fsspec+memory://root?x=1", ["'x'", "none"]),
    ],
)
def test_fsspec_query_options_it_does_not_read_are_refused(
    url: str, words: list[str]
) -> None:
    with pytest.raises(InvalidConfigError) as info:
        open_cache(url)
    assert info.value.field == "cache"
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.s3
def test_s3_endpoint_url_in_the_query_reaches_the_server(s3_server: S3Server) -> None:
    prefix = f"llmprod/{uuid.uuid4().hex}"
    url = (
        f"s3://{prefix}?endpoint_url={s3_server.endpoint_url}"
        f"&key={S3_KEY}&secret={S3_SECRET}"
    )
    backend = open_cache(url)
    assert isinstance(backend, FsspecCache)
    assert backend.url == f"s3://{prefix}" and "?" not in backend.root
    assert FailSafeCache(backend).ping()
    backend.set("k", b"through the query")
    # A cache opened the keyword way, on the moto server, sees the same object.
    control = FsspecCache(f"s3://{prefix}", **s3_server.options)
    assert control.get("k") == b"through the query"
    assert control.fs.exists(backend.path_for("k"))
    # Keyword options win over the query: a dead endpoint there is overridden.
    dead = f"s3://{prefix}?endpoint_url=http://127.0.0.1:{free_port()}"
    assert open_cache(dead, **s3_server.options).get("k") == b"through the query"
    backend.close()
    control.close()
