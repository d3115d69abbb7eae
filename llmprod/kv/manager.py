"""Per-request block tables on top of the :class:`BlockPool`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmprod.kv.block_pool import BlockPool, hash_block

if TYPE_CHECKING:
    from llmprod.sched.request import Request


@dataclass(frozen=True, slots=True)
class KVStats:
    """What the KV cache reports; the engine reads this, never the pool itself."""

    num_blocks: int
    block_size: int
    usage: float
    """Fraction of blocks held by running requests."""
    num_free_blocks: int
    num_cached_blocks: int
    """Blocks that hold a registered prefix (in use or reusable)."""
    num_evictions: int
    num_touched_blocks: int
    """Blocks ever handed out (their memory has been written at least once)."""
    prefix_hit_rate: float
    """Prompt tokens found in the prefix cache / prompt tokens looked up."""


class KVCacheManager:
    """Gives requests the blocks their tokens need and finds cached prefixes.

    Args:
        num_blocks: blocks in the pool.
        block_size: tokens per block.
        enable_prefix_caching: reuse full blocks with equal prefix hashes.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool
    ) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.num_prefix_queries = 0
        self.num_prefix_hit_tokens = 0
        self.num_prefix_query_tokens = 0

    def stats(self) -> KVStats:
        pool = self.pool
        queries = self.num_prefix_query_tokens
        return KVStats(
            num_blocks=pool.num_blocks,
            block_size=self.block_size,
            usage=pool.usage(),
            num_free_blocks=pool.num_free_blocks,
            num_cached_blocks=pool.num_cached_blocks,
            num_evictions=pool.num_evictions,
            num_touched_blocks=pool.num_touched_blocks,
            prefix_hit_rate=self.num_prefix_hit_tokens / queries if queries else 0.0,
        )

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def update_hashes(self, request: Request) -> None:
        """Extend ``request.block_hashes`` over every full block of known tokens."""
        bs = self.block_size
        hashes = request.block_hashes
        tokens = request.token_ids
        while (len(hashes) + 1) * bs <= len(tokens):
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(
                hash_block(parent, tokens[i * bs : (i + 1) * bs], request.cache_keys)
            )

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Blocks holding the longest cached prefix of the request's known tokens.

        At least one token is always left to compute, so the step that finishes
        the prefill has logits to sample from.
        """
        if not self.enable_prefix_caching:
            return []
        self.update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        p = request.params
        if p.prompt_logprobs is not None and not request.prompt_logprobs_done:
            # Position i predicts token i + 1: the positions from
            # prompt_logprobs_start - 1 on must run, so only whole blocks before
            # it may come from the cache.
            max_blocks = min(
                max_blocks, max(p.prompt_logprobs_start - 1, 0) // self.block_size
            )
            if max_blocks == 0:
                return []
        found: list[int] = []
        bs = self.block_size
        for i, h in enumerate(request.block_hashes[:max_blocks]):
            b = self.pool.lookup(h, request.token_ids[i * bs : (i + 1) * bs])
            if b is None:
                break
            found.append(b)
        self.num_prefix_queries += 1
        self.num_prefix_query_tokens += request.num_tokens
        self.num_prefix_hit_tokens += len(found) * self.block_size
        return found

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        cached_blocks: list[int] | None = None,
    ) -> bool:
        """Make room for ``num_new_tokens`` more tokens (after any cached prefix,
        whose blocks join the request's table; the scheduler then counts their
        tokens as computed).

        Returns False, changing nothing, when the pool lacks free blocks.
        """
        cached = cached_blocks or []
        num_tokens = request.num_computed_tokens + len(cached) * self.block_size
        need = self.blocks_needed(num_tokens + num_new_tokens)
        num_new_blocks = need - len(request.block_ids) - len(cached)
        # Cached blocks nobody holds sit in the free queue: taking them uses it up.
        num_free_hits = sum(1 for b in cached if self.pool.ref_counts[b] == 0)
        if num_new_blocks > self.pool.num_free_blocks - num_free_hits:
            return False
        if cached:
            self.pool.touch(cached)
            request.block_ids.extend(cached)
        if num_new_blocks > 0:
            request.block_ids.extend(self.pool.allocate(num_new_blocks))
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register the blocks whose tokens all have KV now."""
        if not self.enable_prefix_caching:
            return
        self.update_hashes(request)
        num_full = min(
            request.num_computed_tokens // self.block_size,
            len(request.block_hashes),
            len(request.block_ids),
        )
        for i in range(request.num_registered_blocks, num_full):
            tokens = request.token_ids[i * self.block_size : (i + 1) * self.block_size]
            self.pool.cache_block(request.block_ids[i], request.block_hashes[i], tokens)
        request.num_registered_blocks = max(request.num_registered_blocks, num_full)

    def trim(self, request: Request, num_tokens: int) -> None:
        """Return the blocks past the first ``num_tokens`` positions (tail first):
        room taken for guesses the model refused. Registered blocks lie wholly
        before the computed positions and are never trimmed."""
        keep = max(self.blocks_needed(num_tokens), request.num_registered_blocks)
        if len(request.block_ids) > keep:
            self.pool.free(reversed(request.block_ids[keep:]))
            del request.block_ids[keep:]

    def free(self, request: Request) -> None:
        """Return the request's blocks (tail first, so the tail is evicted first).

        The scheduler resets what it tracks (``num_computed_tokens``) itself."""
        self.pool.free(reversed(request.block_ids))
        request.block_ids = []
        request.num_registered_blocks = 0
