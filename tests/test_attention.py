"""The torch attention backend against the obviously-correct reference."""

from __future__ import annotations

import pytest
import torch

from llmprod.layers.attention import (
    AttentionMetadata,
    TorchAttentionBackend,
    paged_attention_ref,
)
from llmprod.sched.scheduler import group_by_length

# (context length after the step, query length) per sequence
BATCHES = {
    "decodes": [(1, 1), (17, 1), (33, 1), (200, 1)],
    "one_decode": [(57, 1)],  # batch 1: the single-group path, no copy into out
    "prefill": [(40, 40), (16, 16), (1, 1)],
    "chunked_and_prefix_hits": [(48, 16), (35, 3), (64, 32)],
    "mixed": [(5, 1), (90, 1), (31, 31), (70, 6)],
}
GQA = [(4, 4), (6, 2), (8, 1)]  # (num_heads, num_kv_heads)


def build(batch: list[tuple[int, int]], num_kv_heads: int, block_size: int = 16):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    head_dim = 32
    decodes = sorted([b for b in batch if b[1] == 1])
    prefills = [b for b in batch if b[1] > 1]
    batch = decodes + prefills
    num_blocks = sum(-(-s // block_size) for s, _ in batch) + 3
    perm = torch.randperm(num_blocks).tolist()  # shuffled, non-contiguous ids
    tables, used = [], 0
    for s, _ in batch:
        n = -(-s // block_size)
        tables.append(perm[used : used + n])
        used += n
    max_blocks = max(len(t) for t in tables)
    bt = torch.tensor(
        [t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32
    )
    kv = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim)
    cu = [0]
    slots = []
    for (s, q), t in zip(batch, tables):
        cu.append(cu[-1] + q)
        slots += [
            t[p // block_size] * block_size + p % block_size for p in range(s - q, s)
        ]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        seq_lens=torch.tensor([s for s, _ in batch], dtype=torch.int32),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        block_tables=bt,
        block_size=block_size,
        seq_lens_host=[s for s, _ in batch],
        cu_seqlens_q_host=cu,
        num_decodes=len(decodes),
        decode_groups=group_by_length([s for s, _ in decodes]),
    )
    return kv, meta, head_dim


@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"h{h[0]}kv{h[1]}")
@pytest.mark.parametrize("name", list(BATCHES))
def test_torch_backend_matches_reference(name: str, heads: tuple[int, int]) -> None:
    num_heads, num_kv_heads = heads
    kv, meta, d = build(BATCHES[name], num_kv_heads)
    n = meta.cu_seqlens_q_host[-1]
    q = torch.randn(n, num_heads, d)
    k = torch.randn(n, num_kv_heads, d)
    v = torch.randn(n, num_kv_heads, d)
    expected_cache = kv.clone()
    flat = expected_cache.view(2, -1, num_kv_heads, d)
    flat[0, meta.slot_mapping] = k
    flat[1, meta.slot_mapping] = v
    ref = paged_attention_ref(
        q, expected_cache, meta.block_tables, meta.seq_lens, meta.cu_seqlens_q, d**-0.5
    )
    backend = TorchAttentionBackend()
    backend.prepare(meta)
    out = backend.forward(q, k, v, kv, meta, d**-0.5)
    torch.testing.assert_close(kv, expected_cache, atol=0, rtol=0)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


# (sliding_window, softcap): windows shorter and longer than the contexts above,
# a window of 1 (a token sees only itself), and Gemma 2's score soft-capping.
VARIANTS = [(8, None), (33, None), (1, None), (None, 5.0), (20, 3.0)]


@pytest.mark.parametrize(
    "variant", VARIANTS, ids=lambda v: f"window{v[0]}-softcap{v[1]}"
)
@pytest.mark.parametrize("name", list(BATCHES))
def test_torch_backend_window_and_softcap(
    name: str, variant: tuple[int | None, float | None]
) -> None:
    window, softcap = variant
    kv, meta, d = build(BATCHES[name], 2)
    n = meta.cu_seqlens_q_host[-1]
    q, k, v = torch.randn(n, 6, d), torch.randn(n, 2, d), torch.randn(n, 2, d)
    expected_cache = kv.clone()
    flat = expected_cache.view(2, -1, 2, d)
    flat[0, meta.slot_mapping] = k
    flat[1, meta.slot_mapping] = v
    args = (meta.block_tables, meta.seq_lens, meta.cu_seqlens_q, d**-0.5)
    ref = paged_attention_ref(q, expected_cache, *args, window, softcap)
    full = paged_attention_ref(q, expected_cache, *args)
    backend = TorchAttentionBackend()
    backend.prepare(meta)
    out = backend.forward(q, k, v, kv, meta, d**-0.5, window, softcap)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    # A layer with full attention in the same step (Gemma interleaves them)
    # still sees every key: per-window masks do not leak between layers.
    out_full = backend.forward(q, k, v, kv, meta, d**-0.5)
    torch.testing.assert_close(out_full, full, atol=2e-5, rtol=1e-5)


def test_reference_window_limits_keys() -> None:
    """The reference's window rule itself: with window 1 each token attends only
    to its own key, so the output is its own value."""
    kv, meta, d = build([(10, 10)], 1)
    n = 10
    q, k, v = torch.randn(n, 1, d), torch.randn(n, 1, d), torch.randn(n, 1, d)
    flat = kv.view(2, -1, 1, d)
    flat[0, meta.slot_mapping] = k
    flat[1, meta.slot_mapping] = v
    out = paged_attention_ref(
        q, kv, meta.block_tables, meta.seq_lens, meta.cu_seqlens_q, 1.0, 1
    )
    torch.testing.assert_close(out, v, atol=1e-6, rtol=0)


def test_one_backend_across_steps_of_different_sizes_and_dtypes() -> None:
    # The gather workspace is reused by every layer and step of a thread: a large
    # step, a smaller one, the large one again, then bfloat16 (the workspace is
    # replaced), each must match the reference exactly as a fresh backend would.
    backend = TorchAttentionBackend()
    for name, dtype in [
        ("mixed", torch.float32),
        ("decodes", torch.float32),
        ("chunked_and_prefix_hits", torch.float32),
        ("mixed", torch.float32),
        ("decodes", torch.bfloat16),
    ]:
        kv, meta, d = build(BATCHES[name], 2, block_size=8)
        kv = kv.to(dtype)
        n = meta.cu_seqlens_q_host[-1]
        q, k, v = (torch.randn(n, h, d, dtype=dtype) for h in (6, 2, 2))
        expected_cache = kv.clone()
        flat = expected_cache.view(2, -1, 2, d)
        flat[0, meta.slot_mapping] = k
        flat[1, meta.slot_mapping] = v
        args = (meta.block_tables, meta.seq_lens, meta.cu_seqlens_q, d**-0.5)
        ref = paged_attention_ref(q.float(), expected_cache.float(), *args)
        backend.prepare(meta)
        out = backend.forward(q, k, v, kv, meta, d**-0.5)
        assert out.dtype == dtype
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_release_lets_the_kv_cache_go() -> None:
    # The backend keeps views of each cache it has seen (built once, reused by
    # every step); release() must drop them, or a closed engine keeps its KV memory.
    import gc
    import weakref

    kv, meta, d = build(BATCHES["mixed"], 2)
    n = meta.cu_seqlens_q_host[-1]
    backend = TorchAttentionBackend()
    backend.prepare(meta)
    backend.forward(
        torch.randn(n, 4, d), torch.randn(n, 2, d), torch.randn(n, 2, d), kv, meta, 1.0
    )
    alive = weakref.ref(kv)
    del kv
    gc.collect()
    assert alive() is not None  # held by the backend's views
    backend.release()
    gc.collect()
    assert alive() is None


def test_both_backends_are_attention_backends() -> None:
    from llmprod.layers.attention import AttentionBackend, TritonAttentionBackend

    assert isinstance(TorchAttentionBackend(), AttentionBackend)
    assert isinstance(TritonAttentionBackend(), AttentionBackend)
