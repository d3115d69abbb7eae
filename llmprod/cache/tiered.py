"""Tiers of caches, hot to cold: ``TieredCache([memory, redis, disk, s3])``.

* ``get`` asks each tier in order and stops at the first hit; the value is then
  copied into every hotter tier (promotion), with that tier's own TTL.
* ``set`` writes through to every tier, hot first, so the value is readable from
  the fastest tier as soon as possible; ``delete`` removes it from all.
* ``ttls[i]`` caps the lifetime of entries on tier ``i`` (``None`` = no cap): an
  entry lives ``min(ttl, ttls[i])`` on that tier. Give hot tiers short TTLs and
  keep the long-lived copy on cold ones.
* Every tier is wrapped in :class:`~llmprod.cache.failsafe.FailSafeCache`, so a
  tier that is down is skipped as a miss and counted; the others keep serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from llmprod.cache.failsafe import (
    DEFAULT_COOLDOWN_S,
    DEFAULT_LOG_INTERVAL_S,
    FailSafeCache,
    backend_label,
)
from llmprod.cache.protocol import CacheBackend, check_key, check_ttl, check_value


class TieredCache:
    """Several backends read hot to cold, written through.

    >>> from llmprod.cache.memory import MemoryCache
    >>> hot, cold = MemoryCache(), MemoryCache()
    >>> tiers = TieredCache([hot, cold], ttls=[60.0, None])
    >>> cold.set("k", b"v")
    >>> tiers.get_with_tier("k")
    (b'v', 'memory-1')
    >>> tiers.get_with_tier("k")  # promoted on the first hit
    (b'v', 'memory')

    Args:
        tiers: backends from hottest to coldest (at least one).
        ttls: per-tier lifetime caps in seconds (``None`` = no cap); default none.
        promote: copy hits into the hotter tiers.
        log_interval_s: passed to each tier's :class:`FailSafeCache`.
        cooldown_s: passed to each tier's :class:`FailSafeCache`.
    """

    name: ClassVar[str] = "tiered"

    def __init__(
        self,
        tiers: Sequence[CacheBackend],
        ttls: Sequence[float | None] | None = None,
        *,
        promote: bool = True,
        log_interval_s: float = DEFAULT_LOG_INTERVAL_S,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
    ) -> None:
        if not tiers:
            raise ValueError("TieredCache needs at least one tier")
        if ttls is None:
            ttls = [None] * len(tiers)
        if len(ttls) != len(tiers):
            raise ValueError(
                f"{len(ttls)=} must equal the number of tiers {len(tiers)}"
            )
        self.ttls = [check_ttl(t) for t in ttls]
        self.promote = promote
        self.tiers: list[FailSafeCache] = []
        seen: dict[str, int] = {}
        for tier in tiers:
            base = (
                tier.label if isinstance(tier, FailSafeCache) else backend_label(tier)
            )
            n = seen.get(base, 0)
            seen[base] = n + 1
            label = base if n == 0 else f"{base}-{n}"
            if isinstance(tier, FailSafeCache):
                tier.label = label
                self.tiers.append(tier)
            else:
                self.tiers.append(
                    FailSafeCache(
                        tier,
                        label=label,
                        log_interval_s=log_interval_s,
                        cooldown_s=cooldown_s,
                    )
                )

    @property
    def labels(self) -> list[str]:
        """The tier labels, hot to cold (unique; a repeat gets ``-1``, ``-2``...)."""
        return [t.label for t in self.tiers]

    def get(self, key: str) -> bytes | None:
        """See :meth:`CacheBackend.get`; a failing tier reads as a miss."""
        return self.get_with_tier(key)[0]

    def get_with_tier(self, key: str) -> tuple[bytes | None, str | None]:
        """Look ``key`` up hot to cold and say which tier answered.

        Args:
            key: the key to look up.

        Returns:
            ``(value, tier label)`` for a hit, ``(None, None)`` for a miss.
        """
        check_key(key)
        for i, tier in enumerate(self.tiers):
            value = tier.get(key)
            if value is None:
                continue
            if self.promote:
                for j in range(i):
                    self.tiers[j].set(key, value, self.ttls[j])
            return value, tier.label
        return None, None

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """Write through to every tier; a failing tier is counted and skipped."""
        check_key(key)
        check_value(value)
        ttl = check_ttl(ttl)
        for tier, cap in zip(self.tiers, self.ttls):
            tier.set(key, value, _min_ttl(ttl, cap))

    def delete(self, key: str) -> None:
        """Remove ``key`` from every tier."""
        check_key(key)
        for tier in self.tiers:
            tier.delete(key)

    def close(self) -> None:
        """Close every tier. Calling it again does nothing."""
        for tier in self.tiers:
            tier.close()

    def ping(self) -> dict[str, bool]:
        """Probe every tier now.

        Returns:
            Tier label to whether it answered.
        """
        return {t.label: t.ping() for t in self.tiers}

    def stats(self) -> dict[str, dict[str, int]]:
        """Return each tier's counters (see :meth:`FailSafeCache.stats`).

        Returns:
            Tier label to its counters, hot to cold.
        """
        return {t.label: t.stats() for t in self.tiers}


def _min_ttl(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
