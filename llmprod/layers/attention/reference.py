"""Pure-torch references for the paged KV-cache ops.

Slow and obviously correct: they loop over sequences and tokens. The Triton
kernels in ``llmprod.kernels`` are tested against them, and they define the rule
every attention backend follows (see docs/concepts.md):

    Query token ``i`` of sequence ``s`` sits at position
    ``seq_lens[s] - q_len[s] + i`` and attends causally to keys ``0..position``.

Layouts (shared with the kernels)::

    kv_cache      [2, num_blocks, block_size, num_kv_heads, head_dim]  0 = K, 1 = V
    query         [num_tokens, num_heads, head_dim]
    key, value    [num_tokens, num_kv_heads, head_dim]
    slot_mapping  int64 [num_tokens]   block_id * block_size + offset, -1 = skip
    block_tables  int32 [num_seqs, max_blocks]
    seq_lens      int32 [num_seqs]     context length after this step's tokens
    cu_seqlens_q  int32 [num_seqs + 1] prefix sums of the query lengths
"""

from __future__ import annotations

import torch


def store_kv_ref(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # int64 [num_tokens]
) -> None:
    """Write each token's key and value at its slot; slot -1 is skipped."""
    block_size = kv_cache.shape[2]
    for i, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        block, offset = divmod(slot, block_size)
        kv_cache[0, block, offset] = key[i]
        kv_cache[1, block, offset] = value[i]


def paged_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks]
    seq_lens: torch.Tensor,  # int32 [num_seqs]
    cu_seqlens_q: torch.Tensor,  # int32 [num_seqs + 1]
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal varlen attention of each query token over its sequence's paged keys.

    ``sliding_window=w`` limits a query at position ``p`` to the ``w`` keys
    ``p - w + 1 .. p`` (transformers' convention). ``softcap=c`` squashes the
    scaled scores to ``c * tanh(score / c)`` before the softmax (Gemma 2).
    Computed in float32 and returned in the query's dtype.
    """
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    assert num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    cu = cu_seqlens_q.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        q_start, q_end = cu[s], cu[s + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        num_blocks = (seq_len + block_size - 1) // block_size
        blocks = block_tables[s, :num_blocks].long()
        k = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        v = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        k = k.float().repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_dim]
        v = v.float().repeat_interleave(group, dim=1)
        q = query[q_start:q_end].float()  # [q_len, num_heads, head_dim]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
        k_pos = torch.arange(seq_len).unsqueeze(0)
        hidden = k_pos > q_pos
        if sliding_window is not None:
            hidden |= k_pos <= q_pos - sliding_window
        scores = scores.masked_fill(hidden.unsqueeze(0), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
    return out
