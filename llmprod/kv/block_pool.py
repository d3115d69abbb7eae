"""The pool of KV blocks: free list, reference counts, prefix map.

A block is *free* when no request holds it (ref count 0). Free blocks wait in one
LRU queue; a free block that still carries a prefix hash stays findable through
the prefix map until it is handed out again (that is its eviction)::

    allocate() pops from the front ─┐          free() appends at the back
                                    ▼                         ▼
    free queue:   [ never used / oldest freed ... most recently freed ]
    prefix map:   hash -> block id (blocks whose KV is a full, known prefix)

Prefix hashes are SHA-256 digests, and a hit also compares the block's token ids,
so a crafted prompt can never attach to KV computed for other tokens.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

BlockHash = bytes
"""A SHA-256 digest identifying a full block and everything before it."""


def hash_block(
    parent_hash: BlockHash | None,
    token_ids: Sequence[int],
    extra_keys: tuple[str, ...] = (),
) -> BlockHash:
    """Hash of a full block: its parent's hash, its own token ids, and extra keys
    that change what the KV means (a cache scope, an adapter's content hash).

    Chaining the parent makes equal hashes mean equal whole prefixes.

    >>> hash_block(None, [1, 2]) == hash_block(None, [1, 2])
    True
    >>> hash_block(None, [1, 2]) == hash_block(hash_block(None, [0]), [1, 2])
    False
    >>> hash_block(None, [1, 2]) == hash_block(None, [1, 2], ("tenant:a",))
    False
    """
    h = hashlib.sha256()
    h.update(parent_hash if parent_hash is not None else b"\0" * 32)
    h.update(len(token_ids).to_bytes(4, "little"))
    h.update(array("q", token_ids).tobytes())
    for key in extra_keys:
        data = key.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(4, "little"))
        h.update(data)
    return h.digest()


class BlockPool:
    """Reference-counted KV blocks with automatic prefix caching.

    Args:
        num_blocks: blocks in the pool.
        enable_prefix_caching: keep full blocks findable by hash after they are
            freed, until the space is needed.
    """

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[BlockHash | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        """The token ids of each cached block, compared on every hit."""
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._prefix: dict[BlockHash, int] = {}
        self.num_evictions = 0
        # Distinct blocks ever handed out. Never-used blocks leave the queue first,
        # so this grows until the pool has been through all of them once.
        self._touched = bytearray(num_blocks)
        self.num_touched_blocks = 0

    # --- queries -----------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached or not)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by prefix hash (held or free)."""
        return len(self._prefix)

    def usage(self) -> float:
        """Fraction of blocks held by requests."""
        return 1.0 - len(self._free) / self.num_blocks

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def lookup(self, block_hash: BlockHash, token_ids: Sequence[int]) -> int | None:
        """The block holding this prefix hash and exactly these token ids, or None."""
        block_id = self._prefix.get(block_hash)
        if block_id is None or self.block_tokens[block_id] != tuple(token_ids):
            return None
        return block_id

    def is_whole(self) -> bool:
        """True when every block is free: no request holds any."""
        return len(self._free) == self.num_blocks and not any(self.ref_counts)

    # --- actions -----------------------------------------------------------------
    def allocate(self, num_blocks: int) -> list[int]:
        """Hand out ``num_blocks`` fresh blocks (ref count 1), evicting cached ones.

        Raises:
            RuntimeError: fewer free blocks than asked (check ``can_allocate``).
        """
        if num_blocks > len(self._free):
            raise RuntimeError(f"asked for {num_blocks} blocks, {len(self._free)} free")
        out = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            if not self._touched[block_id]:
                self._touched[block_id] = 1
                self.num_touched_blocks += 1
            self._maybe_evict(block_id)
            self.ref_counts[block_id] = 1
            out.append(block_id)
        return out

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take one more reference on blocks found by prefix hash."""
        for b in block_ids:
            if self.ref_counts[b] == 0:
                del self._free[b]
            self.ref_counts[b] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference; blocks reaching zero join the back of the free queue.

        Pass a request's blocks in reverse order so its tail is evicted first.
        """
        for b in block_ids:
            rc = self.ref_counts[b]
            if rc <= 0:
                raise RuntimeError(f"double free of KV block {b}")
            self.ref_counts[b] = rc - 1
            if rc == 1:
                self._free[b] = None

    def cache_block(
        self, block_id: int, block_hash: BlockHash, token_ids: Sequence[int]
    ) -> None:
        """Make a full block findable by its prefix hash (and its token ids)."""
        if not self.enable_prefix_caching or self.block_hashes[block_id] is not None:
            return
        if block_hash in self._prefix:  # same prefix computed twice: keep the first
            return
        self.block_hashes[block_id] = block_hash
        self.block_tokens[block_id] = tuple(token_ids)
        self._prefix[block_hash] = block_id

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks held by requests stay valid)."""
        self._prefix.clear()
        self.block_hashes = [None] * self.num_blocks
        self.block_tokens = [None] * self.num_blocks

    def _maybe_evict(self, block_id: int) -> None:
        h = self.block_hashes[block_id]
        if h is not None:
            self.block_hashes[block_id] = None
            self.block_tokens[block_id] = None
            if self._prefix.get(h) == block_id:
                del self._prefix[h]
            self.num_evictions += 1
