"""TieredCache: read order, promotion, write-through, per-tier TTL; FailSafeCache."""

from __future__ import annotations

import time
from typing import ClassVar

import pytest

from llmprod.cache import FailSafeCache, MemoryCache, TieredCache


class Broken:
    """A backend whose store is unreachable (an in-process stand-in for a dead
    server; the real-server versions of this fault are in test_faults.py)."""

    name: ClassVar[str] = "broken"

    def __init__(self) -> None:
        self.calls = 0

    def get(self, key: str) -> bytes | None:
        self.calls += 1
        raise ConnectionError("down")

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        self.calls += 1
        raise TimeoutError("down")

    def delete(self, key: str) -> None:
        self.calls += 1
        raise OSError("down")

    def close(self) -> None:
        raise RuntimeError("down")


def test_reads_hot_to_cold_and_promotes() -> None:
    hot, warm, cold = MemoryCache(), MemoryCache(), MemoryCache()
    tiers = TieredCache([hot, warm, cold])
    assert tiers.labels == ["memory", "memory-1", "memory-2"]
    cold.set("k", b"v")
    assert tiers.get_with_tier("k") == (b"v", "memory-2")
    assert hot.get("k") == b"v" and warm.get("k") == b"v"  # promoted to both
    assert tiers.get_with_tier("k") == (b"v", "memory")
    assert tiers.get_with_tier("absent") == (None, None)
    stats = tiers.stats()
    assert stats["memory"] == {
        "hits": 1, "misses": 2, "errors": 0, "sets": 1, "set_errors": 0,
    }  # fmt: skip
    assert stats["memory-2"]["hits"] == 1


def test_no_promotion_when_disabled() -> None:
    hot, cold = MemoryCache(), MemoryCache()
    tiers = TieredCache([hot, cold], promote=False)
    cold.set("k", b"v")
    assert tiers.get("k") == b"v" and hot.get("k") is None


def test_writes_through_and_deletes_everywhere() -> None:
    hot, cold = MemoryCache(), MemoryCache()
    tiers = TieredCache([hot, cold])
    tiers.set("k", b"v")
    assert hot.get("k") == b"v" and cold.get("k") == b"v"
    tiers.delete("k")
    assert hot.get("k") is None and cold.get("k") is None


def test_ttl_per_tier_caps_lifetime() -> None:
    hot, cold = MemoryCache(), MemoryCache()
    tiers = TieredCache([hot, cold], ttls=[0.2, None])
    tiers.set("k", b"v")  # hot keeps it 0.2 s, cold forever
    tiers.set("short", b"s", ttl=0.2)  # the entry's own ttl wins where smaller
    time.sleep(0.35)
    assert hot.get("k") is None and cold.get("k") == b"v"
    assert cold.get("short") is None
    assert tiers.get_with_tier("k") == (b"v", "memory-1")
    assert hot.get("k") == b"v"  # promoted again, with the hot tier's ttl


def test_bad_tier_config() -> None:
    with pytest.raises(ValueError):
        TieredCache([])
    with pytest.raises(ValueError):
        TieredCache([MemoryCache()], ttls=[1.0, 2.0])
    with pytest.raises(ValueError):
        TieredCache([MemoryCache()], ttls=[0])


def test_failing_tier_is_skipped_and_counted() -> None:
    broken = Broken()
    cold = MemoryCache()
    tiers = TieredCache([broken, cold], cooldown_s=60)
    cold.set("k", b"v")
    assert tiers.get_with_tier("k") == (b"v", "memory")
    tiers.set("k2", b"v2")
    tiers.delete("k")
    tiers.close()  # a failing close is logged, not raised
    assert broken.calls == 1  # after the first failure the cooldown skips it
    assert tiers.stats()["broken"] == {
        "hits": 0, "misses": 1, "errors": 2, "sets": 0, "set_errors": 2,
    }  # fmt: skip
    # (get "k" failed, promotion of "k" skipped, set "k2" skipped, delete skipped)


def test_failsafe_cooldown_then_probe_again() -> None:
    broken = Broken()
    cache = FailSafeCache(broken, cooldown_s=0.1)
    assert cache.get("k") is None and broken.calls == 1
    assert cache.get("k") is None and broken.calls == 1  # skipped in the cooldown
    time.sleep(0.15)
    assert cache.get("k") is None and broken.calls == 2  # probed again
    assert cache.is_down and isinstance(cache.last_error, ConnectionError)
    assert cache.ping() is False


def test_failsafe_does_not_swallow_programming_errors() -> None:
    cache = FailSafeCache(Broken())
    with pytest.raises(TypeError):
        cache.set("k", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        cache.get(1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        cache.set("k", b"v", ttl=-1)
