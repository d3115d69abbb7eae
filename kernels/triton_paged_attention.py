"""Varlen causal attention over the paged KV cache.

One kernel serves prefill, chunked prefill, decode and prefix-cache hits mixed in
one flat batch. Query token ``i`` of sequence ``s`` sits at position
``seq_lens[s] - q_len[s] + i`` and attends to keys ``0..position`` of that
sequence, read through its block table. Layouts::

    query         [num_tokens, num_heads, head_dim]
    kv_cache      [2, num_blocks, block_size, num_kv_heads, head_dim]   0 = K, 1 = V
    block_tables  int32 [num_seqs, max_blocks]
    seq_lens      int32 [num_seqs]      context length after this step's tokens
    cu_seqlens_q  int32 [num_seqs + 1]  prefix sums of the query lengths
    out           [num_tokens, num_heads, head_dim]

Algorithm: FlashAttention-2's tiled online softmax (Dao, 2023) with fp32
accumulators and ``exp2``, reading keys and values through the block table as
PagedAttention does (Kwon et al., 2023). A program owns one *query tile* of one
sequence and one KV head. Its rows are ``BLOCK_Q`` consecutive query tokens times
the ``GROUP`` query heads that share the KV head (GQA), so every key and value
loaded from the cache serves all of them::

    row m  ->  token  q_tile_start + m // GROUP_PAD,  head  kv_head * GROUP + m % GROUP_PAD
    (GROUP_PAD = GROUP rounded up to a power of two; padded rows are masked)

Query tiles never straddle two sequences. Sequence ``s`` owns the tile indices
``cu_seqlens_q[s] // BLOCK_Q + s + j`` for ``j < cdiv(q_len[s], BLOCK_Q)``, so
``num_tokens // BLOCK_Q + num_seqs`` bounds the number of tiles from the shapes
alone; the launcher never reads a device value. A program finds its sequence by
binary search over ``cu_seqlens_q`` and exits if its tile index is unused.

Split-KV (decode): with ``num_kv_splits > 1`` each tile's key range is cut into that
many contiguous chunks handled by separate programs, which write unnormalised
partial outputs plus their running max and sum to an fp32 workspace; a second
kernel merges them. This fills the GPU when a few long sequences decode.
The reference is ``llmprod.layers.attention.reference.paged_attention_ref``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llmprod.layers.attention.reference import paged_attention_ref

from .triton_store_kv import check_device

__all__ = [
    "CONFIGS",
    "AttentionConfig",
    "paged_attention",
    "paged_attention_ref",
    "select_config",
    "select_num_kv_splits",
]

# ---------------------------------------------------------------------------
# Tile configurations, as data
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionConfig:
    """Tile sizes and launch options of the attention kernel."""

    block_m: int  # query rows per program (query tokens x heads of one group)
    block_n: int  # keys per inner-loop step
    num_warps: int
    num_stages: int


# Candidates for a GPU sweep (benchmarks/kernels/bench_paged_attention.py
# --sweep-configs). `select_config` picks among them from shapes alone; rows must
# hold at least one whole GQA group, which `keep` enforces per call.
CONFIGS = [
    AttentionConfig(block_m, block_n, num_warps, num_stages)
    for block_m in (16, 32, 64, 128)
    for block_n in (32, 64, 128)
    for num_warps in (4, 8)
    for num_stages in (2, 3)
    if block_m * block_n <= 128 * 64 and (num_warps == 4 or block_m >= 64)
]

# The untuned default the interpreter tests run.
DEFAULT_CONFIG = AttentionConfig(block_m=16, block_n=32, num_warps=4, num_stages=2)

# Split-KV bounds: at most this many splits, each worth at least this many keys.
MAX_KV_SPLITS = 16
MIN_KEYS_PER_SPLIT = 512


def keep(config: AttentionConfig, group_pad: int) -> bool:
    """Whether ``config`` fits a GQA group of ``group_pad`` (padded) query heads."""
    return config.block_m >= group_pad


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


@triton.jit
def _find_seq(
    cu_seqlens_q_ptr,  # int32 [num_seqs + 1]
    num_seqs,
    tile,
    BLOCK_Q: tl.constexpr,
):
    """Largest ``s`` with ``cu_seqlens_q[s] // BLOCK_Q + s <= tile`` (binary search)."""
    # Explicit int32 scalars: a size equal to 1 arrives as a compile-time constant.
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first_tile = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
        found = first_tile <= tile
        lo = tl.where(found, mid, lo)
        hi = tl.where(found, hi, mid - 1)
    return lo


@triton.jit
def _paged_attention_kernel(
    # pointers
    out_ptr,  # [num_tokens, num_heads, head_dim]
    query_ptr,  # [num_tokens, num_heads, head_dim]
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # int32 [num_seqs, max_blocks]
    seq_lens_ptr,  # int32 [num_seqs]
    cu_seqlens_q_ptr,  # int32 [num_seqs + 1]
    partial_out_ptr,  # fp32 [num_kv_splits, num_tokens, num_heads, HEAD_DIM]
    partial_max_ptr,  # fp32 [num_kv_splits, num_tokens, num_heads]
    partial_sum_ptr,  # fp32 [num_kv_splits, num_tokens, num_heads]
    # sizes
    num_seqs,
    num_tokens,
    num_heads,
    max_blocks,
    num_kv_splits,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    sm_scale,  # softmax scale (used only with SOFTCAP)
    softcap,  # scores become softcap * tanh(score / softcap) (used only with SOFTCAP)
    sliding_window,  # keys within this many positions (used only with HAS_WINDOW)
    # strides (the last dimension of every tensor is contiguous)
    stride_query_token,
    stride_query_head,
    stride_out_token,
    stride_out_head,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_block_tables_seq,
    # meta-parameters
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two
    BLOCK_M: tl.constexpr,  # query rows per program: BLOCK_Q tokens x GROUP_PAD heads
    BLOCK_N: tl.constexpr,  # keys per loop step
    BLOCK_SIZE: tl.constexpr,  # KV-cache block size
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    IS_SPLIT_KV: tl.constexpr,  # write partials to the workspace instead of out
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, so no silent TF32
    HAS_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_PAD
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # -- which sequence and which of its query tokens this program owns --------
    seq = _find_seq(cu_seqlens_q_ptr, num_seqs, tile, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    q_tile_start = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if q_tile_start < q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        context_len = seq_len - q_len  # keys that precede the first query token

        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        q_idx = q_tile_start + offs_m // GROUP_PAD  # index within the sequence
        head = kv_head * GROUP + offs_m % GROUP_PAD
        row_mask = (q_idx < q_len) & (offs_m % GROUP_PAD < GROUP)
        d_mask = offs_d < HEAD_DIM
        q_pos = context_len + q_idx
        token = (q_start + q_idx).to(tl.int64)

        offs_q = token[:, None] * stride_query_token + head[:, None] * stride_query_head
        q = tl.load(
            query_ptr + offs_q + offs_d[None, :],
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )

        # -- the keys this tile needs, and this split's share of them ------------
        # The last row of the tile sees keys up to its own position, no further.
        kv_end = tl.minimum(seq_len, context_len + q_tile_start + BLOCK_Q)
        first_kv_tile = 0
        if HAS_WINDOW:
            # The first row of the tile sees nothing before its window.
            kv_start = tl.maximum(context_len + q_tile_start - sliding_window + 1, 0)
            first_kv_tile = kv_start // BLOCK_N
        num_kv_tiles = tl.cdiv(kv_end, BLOCK_N) - first_kv_tile
        tiles_per_split = tl.cdiv(num_kv_tiles, num_kv_splits)
        kv_tile_lo = first_kv_tile + split * tiles_per_split
        kv_tile_hi = tl.minimum(
            kv_tile_lo + tiles_per_split, first_kv_tile + num_kv_tiles
        )

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

        block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_block_tables_seq
        offs_n = tl.arange(0, BLOCK_N)
        for kv_tile in range(kv_tile_lo, kv_tile_hi):
            k_pos = kv_tile * BLOCK_N + offs_n
            logical_block = k_pos // BLOCK_SIZE
            k_mask = (k_pos < kv_end) & (logical_block < max_blocks)
            block_id = tl.load(block_table_row + logical_block, mask=k_mask, other=0)
            # int64: block_id * stride_cache_block exceeds 2**31 in large caches.
            offs_kv = (
                block_id.to(tl.int64) * stride_cache_block
                + (k_pos % BLOCK_SIZE) * stride_cache_slot
                + kv_head * stride_cache_head
            )
            k = tl.load(  # [HEAD_DIM_PAD, BLOCK_N]
                key_cache_ptr + offs_kv[None, :] + offs_d[:, None],
                mask=k_mask[None, :] & d_mask[:, None],
                other=0.0,
            )
            v = tl.load(  # [BLOCK_N, HEAD_DIM_PAD]
                value_cache_ptr + offs_kv[:, None] + offs_d[None, :],
                mask=k_mask[:, None] & d_mask[None, :],
                other=0.0,
            )

            if SOFTCAP:
                # c * tanh(x / c), tanh(y) = 1 - 2 / (exp(2y) + 1), then base 2.
                s = tl.dot(q, k, input_precision=DOT_PRECISION) * sm_scale
                t = 1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0)
                s = softcap * t * 1.4426950408889634
            else:
                s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
            causal = (k_pos[None, :] <= q_pos[:, None]) & k_mask[None, :]
            if HAS_WINDOW:
                causal = causal & (k_pos[None, :] > q_pos[:, None] - sliding_window)
            s = tl.where(causal, s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no key yet keeps max -inf; shift by 0 so that
            # exp2 gives 0 instead of NaN from (-inf) - (-inf).
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_shift)
            p = tl.exp2(s - m_shift[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            m_i = m_new

        out_mask = row_mask[:, None] & d_mask[None, :]
        if IS_SPLIT_KV:
            # Unnormalised partials; a split with no keys writes max -inf, sum 0.
            offs_stat = (split * num_tokens + token) * num_heads + head
            tl.store(partial_max_ptr + offs_stat, m_i, mask=row_mask)
            tl.store(partial_sum_ptr + offs_stat, l_i, mask=row_mask)
            tl.store(
                partial_out_ptr + offs_stat[:, None] * HEAD_DIM + offs_d[None, :],
                acc,
                mask=out_mask,
            )
        else:
            # Every real row saw key 0, so its sum is positive; padded rows are
            # guarded only to keep NaN out of registers.
            acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            offs_out = (
                token[:, None] * stride_out_token + head[:, None] * stride_out_head
            )
            tl.store(
                out_ptr + offs_out + offs_d[None, :],
                acc.to(out_ptr.dtype.element_ty),
                mask=out_mask,
            )


@triton.jit
def _merge_kv_splits_kernel(
    # pointers
    out_ptr,  # [num_tokens, num_heads, head_dim]
    partial_out_ptr,  # fp32 [num_kv_splits, num_tokens, num_heads, HEAD_DIM]
    partial_max_ptr,  # fp32 [num_kv_splits, num_tokens, num_heads]
    partial_sum_ptr,  # fp32 [num_kv_splits, num_tokens, num_heads]
    # sizes
    num_tokens,
    num_heads,
    num_kv_splits,
    # strides
    stride_out_token,
    stride_out_head,
    # meta-parameters
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,  # num_heads rounded up to a power of two
    HEAD_DIM_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    h_mask = offs_h < num_heads
    hd_mask = h_mask[:, None] & (offs_d[None, :] < HEAD_DIM)

    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM_PAD], dtype=tl.float32)
    for split in range(num_kv_splits):
        offs_stat = (split * num_tokens + token) * num_heads + offs_h
        m_s = tl.load(partial_max_ptr + offs_stat, mask=h_mask, other=float("-inf"))
        l_s = tl.load(partial_sum_ptr + offs_stat, mask=h_mask, other=0.0)
        acc_s = tl.load(
            partial_out_ptr + offs_stat[:, None] * HEAD_DIM + offs_d[None, :],
            mask=hd_mask,
            other=0.0,
        )
        # The same rescaling as the attention loop, with whole splits as tiles.
        m_new = tl.maximum(m, m_s)
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_shift)
        beta = tl.exp2(m_s - m_shift)
        total = total * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m = m_new

    acc = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    offs_out = token * stride_out_token + offs_h[:, None] * stride_out_head
    tl.store(
        out_ptr + offs_out + offs_d[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=hd_mask,
    )


# ---------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------


def _check_inputs(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
) -> None:
    if query.dim() != 3:
        raise ValueError(
            f"query must be [num_tokens, num_heads, head_dim]; got {tuple(query.shape)}"
        )
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            "kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim]; "
            f"got {tuple(kv_cache.shape)}"
        )
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[3]
    if kv_cache.shape[4] != head_dim:
        raise ValueError(f"kv_cache head_dim {kv_cache.shape[4]} != query's {head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"{num_heads=} must be a multiple of {num_kv_heads=}")
    if query.dtype != kv_cache.dtype:
        raise ValueError(f"{query.dtype=} must equal {kv_cache.dtype=}")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"query dtype must be float16, bfloat16 or float32; got {query.dtype}"
        )
    if block_tables.dim() != 2 or seq_lens.dim() != 1 or cu_seqlens_q.dim() != 1:
        raise ValueError(
            "block_tables must be [num_seqs, max_blocks], seq_lens [num_seqs] and "
            f"cu_seqlens_q [num_seqs + 1]; got {tuple(block_tables.shape)}, "
            f"{tuple(seq_lens.shape)}, {tuple(cu_seqlens_q.shape)}"
        )
    num_seqs = seq_lens.shape[0]
    if block_tables.shape[0] != num_seqs or cu_seqlens_q.shape[0] != num_seqs + 1:
        raise ValueError(
            f"{num_seqs=} (from seq_lens) needs block_tables.shape[0] == {num_seqs} and "
            f"cu_seqlens_q.shape[0] == {num_seqs + 1}; got {block_tables.shape[0]} "
            f"and {cu_seqlens_q.shape[0]}"
        )
    for name, t in (
        ("block_tables", block_tables),
        ("seq_lens", seq_lens),
        ("cu_seqlens_q", cu_seqlens_q),
    ):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32; got {t.dtype}")
        if t.numel() > 0 and t.stride(-1) != 1:
            raise ValueError(
                f"{name} must be contiguous in its last dim; {t.stride()=}"
            )
    for name, t in (("query", query), ("kv_cache", kv_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim; {t.stride()=}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float; got {scale}")
    check_device(
        "paged_attention", query, kv_cache, block_tables, seq_lens, cu_seqlens_q
    )


def select_num_kv_splits(
    num_tokens: int, num_seqs: int, num_kv_heads: int, max_context: int, num_sms: int
) -> int:
    """Split keys only where few programs would otherwise face long contexts.

    Decided from shapes: a decode-shaped batch (no more query tokens than
    sequences) whose (sequence, KV head) programs cannot fill two waves of
    ``num_sms``, and whose block tables (``max_context`` keys) are long enough to
    give every split ``MIN_KEYS_PER_SPLIT`` keys. Returns a power of two, so
    shapes that differ a little share a launch shape.
    """
    if num_tokens > num_seqs:
        return 1
    wanted = triton.cdiv(2 * num_sms, max(1, num_seqs * num_kv_heads))
    num_splits = min(MAX_KV_SPLITS, wanted, max_context // MIN_KEYS_PER_SPLIT)
    return 1 if num_splits < 2 else 1 << (num_splits.bit_length() - 1)


def select_config(
    num_tokens: int, num_seqs: int, group_pad: int, on_gpu: bool
) -> AttentionConfig:
    """Pick tile sizes from shapes; a GPU sweep can refine these rules."""
    if not on_gpu:
        config = DEFAULT_CONFIG
    elif num_tokens <= num_seqs:
        # Decode: one query token per tile, so keep rows to one GQA group.
        config = AttentionConfig(16, 64, 4, 2)
    else:
        # Prefill: larger query tiles reuse each key for more rows.
        config = AttentionConfig(64, 64, 4, 3)
    if not keep(config, group_pad):
        config = AttentionConfig(group_pad, config.block_n, config.num_warps, 2)
    return config


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # int32 [num_seqs, max_blocks]
    seq_lens: torch.Tensor,  # int32 [num_seqs]
    cu_seqlens_q: torch.Tensor,  # int32 [num_seqs + 1]
    scale: float,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    num_kv_splits: int | None = None,
    config: AttentionConfig | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal varlen attention of each query token over its sequence's paged keys.

    Args:
        query: ``[num_tokens, num_heads, head_dim]``, the batch's query tokens,
            sequence after sequence as ``cu_seqlens_q`` describes.
        kv_cache: ``[2, num_blocks, block_size, num_kv_heads, head_dim]``, same dtype
            as ``query``, with this step's keys and values already stored.
        block_tables: int32 ``[num_seqs, max_blocks]``, cache block ids per sequence.
        seq_lens: int32 ``[num_seqs]``, context length after this step's tokens.
        cu_seqlens_q: int32 ``[num_seqs + 1]``, prefix sums of the query lengths;
            ``cu_seqlens_q[-1]`` must equal ``num_tokens``.
        scale: Softmax scale, usually ``head_dim ** -0.5``.
        sliding_window: A query at position ``p`` sees keys ``p - w + 1 .. p``
            only; ``None`` = full causal attention.
        softcap: Scaled scores become ``softcap * tanh(score / softcap)``
            before the softmax (Gemma 2); ``None`` = no capping.
        num_kv_splits: Programs per query tile along the keys. ``None`` chooses
            from shapes (more than 1 only for decode-shaped batches on a GPU).
        config: Tile sizes; ``None`` chooses from shapes. For sweeps and tests.

    Returns:
        ``[num_tokens, num_heads, head_dim]`` in ``query``'s dtype, computed with
        fp32 accumulation.

    Raises:
        ValueError: On a shape, dtype, stride or device mismatch.
    """
    _check_inputs(query, kv_cache, block_tables, seq_lens, cu_seqlens_q, scale)
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None; got {sliding_window}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a positive float or None; got {softcap}")
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    out = torch.empty_like(query)
    if num_tokens == 0 or num_seqs == 0:
        return out

    on_gpu = query.device.type == "cuda"
    if num_kv_splits is None:
        num_kv_splits = 1
        if on_gpu:
            num_kv_splits = select_num_kv_splits(
                num_tokens,
                num_seqs,
                num_kv_heads,
                max_context=block_tables.shape[1] * kv_cache.shape[2],
                num_sms=torch.cuda.get_device_properties(
                    query.device
                ).multi_processor_count,
            )
    if num_kv_splits < 1:
        raise ValueError(f"{num_kv_splits=} must be >= 1")
    if config is None:
        config = select_config(num_tokens, num_seqs, group_pad, on_gpu)
    elif not keep(config, group_pad):
        raise ValueError(
            f"{config.block_m=} must be >= the padded GQA group {group_pad}"
        )

    is_split_kv = num_kv_splits > 1
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    if is_split_kv:
        stats_shape = (num_kv_splits, num_tokens, num_heads)
        partial_out = torch.empty(
            (*stats_shape, head_dim), dtype=torch.float32, device=query.device
        )
        partial_max = torch.empty(stats_shape, dtype=torch.float32, device=query.device)
        partial_sum = torch.empty(stats_shape, dtype=torch.float32, device=query.device)
    else:
        # Never touched: IS_SPLIT_KV is a compile-time constant.
        partial_out = partial_max = partial_sum = out

    block_q = config.block_m // group_pad
    # Upper bound on query tiles (see the module docstring); spare programs exit.
    num_q_tiles = num_tokens // block_q + num_seqs
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    grid = (num_q_tiles, num_kv_heads, num_kv_splits)
    _paged_attention_kernel[grid](
        out_ptr=out,
        query_ptr=query,
        key_cache_ptr=key_cache,
        value_cache_ptr=value_cache,
        block_tables_ptr=block_tables,
        seq_lens_ptr=seq_lens,
        cu_seqlens_q_ptr=cu_seqlens_q,
        partial_out_ptr=partial_out,
        partial_max_ptr=partial_max,
        partial_sum_ptr=partial_sum,
        num_seqs=num_seqs,
        num_tokens=num_tokens,
        num_heads=num_heads,
        max_blocks=block_tables.shape[1],
        num_kv_splits=num_kv_splits,
        qk_scale=scale * math.log2(math.e),
        sm_scale=scale,
        softcap=softcap or 1.0,
        sliding_window=sliding_window or 0,
        stride_query_token=query.stride(0),
        stride_query_head=query.stride(1),
        stride_out_token=out.stride(0),
        stride_out_head=out.stride(1),
        stride_cache_block=key_cache.stride(0),
        stride_cache_slot=key_cache.stride(1),
        stride_cache_head=key_cache.stride(2),
        stride_block_tables_seq=block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_SIZE=kv_cache.shape[2],
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        IS_SPLIT_KV=is_split_kv,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        HAS_WINDOW=sliding_window is not None,
        SOFTCAP=softcap is not None,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if is_split_kv:
        _merge_kv_splits_kernel[(num_tokens,)](
            out_ptr=out,
            partial_out_ptr=partial_out,
            partial_max_ptr=partial_max,
            partial_sum_ptr=partial_sum,
            num_tokens=num_tokens,
            num_heads=num_heads,
            num_kv_splits=num_kv_splits,
            stride_out_token=out.stride(0),
            stride_out_head=out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_H=triton.next_power_of_2(num_heads),
            HEAD_DIM_PAD=head_dim_pad,
            num_warps=4,
        )
    return out
