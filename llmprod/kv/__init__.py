"""Paged KV-cache bookkeeping (CPU only; imports without torch)."""

from llmprod.kv.block_pool import BlockPool, hash_block
from llmprod.kv.manager import KVCacheManager, KVStats

__all__ = ["BlockPool", "KVCacheManager", "KVStats", "hash_block"]
