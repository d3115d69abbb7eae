"""Paged KV-cache bookkeeping (CPU only; imports without torch)."""

from llmprod.kv.block_pool import BlockPool, hash_block
from llmprod.kv.manager import KVCacheManager

__all__ = ["BlockPool", "KVCacheManager", "hash_block"]
