"""BlockPool and KVCacheManager: exact block ids, free-list order, prefix hits."""

from __future__ import annotations

import pytest

from llmprod.kv import BlockPool, KVCacheManager, hash_block
from llmprod.sampling_params import SamplingParams
from llmprod.sched.request import Request


def make_request(tokens: list[int], rid: str = "r", **params: object) -> Request:
    return Request(rid, list(tokens), SamplingParams(**params))  # type: ignore[arg-type]


def test_allocate_hands_out_lowest_ids_first_and_free_appends_to_tail() -> None:
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    pool.free([1, 0])  # freed tail first
    # never-used blocks 2, 3 come before the freed ones, then 1 before 0
    assert pool.allocate(4) == [2, 3, 1, 0]
    assert pool.num_free_blocks == 0
    assert pool.num_touched_blocks == 4


def test_touched_blocks_count_each_block_once() -> None:
    # On the CPU a block's memory becomes resident when first used: the count
    # behind kv_cache.touched_bytes.
    pool = BlockPool(8)
    first = pool.allocate(3)
    assert pool.num_touched_blocks == 3
    pool.free(reversed(first))
    second = pool.allocate(2)  # fresh blocks 3 and 4
    assert pool.num_touched_blocks == 5
    third = pool.allocate(6)  # fresh 5, 6, 7, then the freed 2, 1, 0
    assert third == [5, 6, 7, 2, 1, 0]
    assert pool.num_touched_blocks == 8
    pool.free([*second, *third])
    pool.allocate(8)
    assert pool.num_touched_blocks == 8


def test_double_free_is_an_error() -> None:
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([b])


def test_cached_block_survives_free_until_evicted() -> None:
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    h = hash_block(None, [1, 2, 3, 4])
    pool.cache_block(b, h, [1, 2, 3, 4])
    pool.free([b])
    assert pool.lookup(h, [1, 2, 3, 4]) == b and pool.num_free_blocks == 2
    pool.touch([b])  # a prefix hit takes it back out of the free queue
    assert pool.num_free_blocks == 1 and pool.ref_counts[b] == 1
    pool.free([b])
    pool.allocate(2)  # needs every block: the cached one is evicted
    assert pool.lookup(h, [1, 2, 3, 4]) is None and pool.num_evictions == 1


def test_manager_prefix_hit_shares_blocks_and_leaves_one_token() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = make_request(list(range(10)), "a")  # 2 full blocks + 2 tokens
    assert kv.allocate_slots(a, 10)
    assert a.block_ids == [0, 1, 2]
    a.num_computed_tokens = 10
    kv.cache_full_blocks(a)
    assert kv.pool.num_cached_blocks == 2
    b = make_request(list(range(8)), "b")  # exactly 2 full blocks
    hit = kv.find_cached_prefix(b)
    # At most (8 - 1) // 4 = 1 block: the last token must be computed.
    assert hit == [0]
    assert kv.allocate_slots(b, 4, hit)
    # The table holds the hit; the scheduler, not the KV manager, counts its
    # tokens as computed.
    assert b.block_ids == [0, 3] and b.num_computed_tokens == 0
    assert kv.pool.ref_counts[0] == 2
    kv.free(a)
    kv.free(b)
    assert kv.pool.is_whole()


def test_manager_refuses_without_changing_anything() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=4, enable_prefix_caching=False)
    r = make_request(list(range(12)))
    assert not kv.allocate_slots(r, 12)  # needs 3 blocks
    assert r.block_ids == [] and kv.pool.num_free_blocks == 2


def test_prompt_logprobs_requests_use_the_prefix_cache_only_before_their_start() -> (
    None
):
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = make_request(list(range(9)))
    kv.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    kv.cache_full_blocks(a)
    b = make_request(list(range(9)), prompt_logprobs=1)
    assert kv.find_cached_prefix(b) == []
    # Log-probabilities from token 6 on: position 5 must run, so only the first
    # block (tokens 0-3) may come from the cache; from token 9 on, both blocks.
    c = make_request(list(range(9)), prompt_logprobs=1, prompt_logprobs_start=6)
    assert kv.find_cached_prefix(c) == a.block_ids[:1]
    d = make_request(list(range(10)), prompt_logprobs=1, prompt_logprobs_start=9)
    assert kv.find_cached_prefix(d) == a.block_ids[:2]
    kv.free(a)


def test_block_hash_is_a_sha256_digest_over_parent_tokens_and_keys() -> None:
    import hashlib
    from array import array

    h = hash_block(None, [1, 2])
    expected = hashlib.sha256(
        b"\0" * 32 + (2).to_bytes(4, "little") + array("q", [1, 2]).tobytes()
    ).digest()
    assert h == expected
    # A token id past 32 bits is not truncated into another prompt's hash.
    assert hash_block(None, [2**32 + 1]) != hash_block(None, [1])
    # Extra keys (cache scope, adapter) separate otherwise equal blocks.
    assert hash_block(None, [1, 2], ("tenant:a",)) != hash_block(
        None, [1, 2], ("tenant:b",)
    )


def test_a_hash_collision_never_reuses_a_block_of_other_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Force every block to hash alike (a stand-in for a crafted collision, which
    # cannot be made for SHA-256): the token-id check must still refuse the hit.
    import llmprod.kv.manager as manager

    monkeypatch.setattr(manager, "hash_block", lambda parent, tokens, keys=(): b"x")
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    victim = make_request([1, 2, 3, 4, 5, 6, 7, 8, 9], "victim")
    assert kv.allocate_slots(victim, 9)
    victim.num_computed_tokens = 9
    kv.cache_full_blocks(victim)
    assert kv.pool.num_cached_blocks == 1
    attacker = make_request([9, 9, 9, 9, 5, 6, 7, 8, 1], "attacker")
    assert kv.find_cached_prefix(attacker) == []
    twin = make_request([1, 2, 3, 4, 0, 0, 0, 0, 1], "twin")
    assert kv.find_cached_prefix(twin) == [victim.block_ids[0]]
    kv.free(victim)
    assert kv.pool.is_whole()


def test_requests_with_other_cache_keys_share_no_blocks() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = make_request(list(range(9)), "a")
    a.cache_keys = ("tenant:a",)
    assert kv.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    kv.cache_full_blocks(a)
    b = make_request(list(range(9)), "b")
    b.cache_keys = ("tenant:b",)
    assert kv.find_cached_prefix(b) == []
    c = make_request(list(range(9)), "c")
    c.cache_keys = ("tenant:a",)
    assert kv.find_cached_prefix(c) == a.block_ids[:2]
    kv.free(a)
