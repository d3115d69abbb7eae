"""Attention over the paged KV cache with torch ops (the CPU path).

Decodes are batched: each group of similar-length sequences gathers its keys into
one padded tensor and runs one SDPA call, masked to each sequence's length.
Prefill chunks run one SDPA call per sequence; a chunk with no earlier context
attends to its own keys directly, without reading the cache back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmprod.attention.metadata import AttentionMetadata

# SDPA grew ``enable_gqa`` in torch 2.5; older versions repeat the KV heads.
_HAS_ENABLE_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _sdpa(
    q: torch.Tensor,  # [batch, num_heads, q_len, head_dim]
    k: torch.Tensor,  # [batch, num_kv_heads, kv_len, head_dim]
    v: torch.Tensor,  # [batch, num_kv_heads, kv_len, head_dim]
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    if group > 1 and not _HAS_ENABLE_GQA:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    kwargs = {"enable_gqa": True} if group > 1 and _HAS_ENABLE_GQA else {}
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, **kwargs
    )


class TorchAttentionBackend:
    """Paged attention with torch ops; runs anywhere torch runs."""

    name = "torch"

    def prepare(self, meta: AttentionMetadata) -> None:
        """Build block indices and masks once per step (shared by all layers).

        Keys are gathered a whole block at a time (``index_select`` of contiguous
        ``block_size`` rows), several times faster than gathering token rows;
        positions past a sequence's length are masked out.
        """
        bs = meta.block_size
        device = meta.block_tables.device
        groups: list[tuple[int, int, torch.Tensor, torch.Tensor | None]] = []
        for lo, hi in meta.decode_groups:
            lens = meta.seq_lens_host[lo:hi]
            num_blocks = -(-max(lens) // bs)
            blocks = meta.block_tables[lo:hi, :num_blocks].reshape(-1)
            padded = num_blocks * bs
            mask = None
            if min(lens) != padded:
                lens_t = torch.tensor(lens, device=device)
                pos = torch.arange(padded, device=device)
                mask = (pos[None, :] < lens_t[:, None])[:, None, None, :]  # [n,1,1,L]
            groups.append((lo, hi, blocks, mask))
        prefills: list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]] = []
        cu = meta.cu_seqlens_q_host
        for s in range(meta.num_decodes, meta.num_seqs):
            t0, t1 = cu[s], cu[s + 1]
            q_len, seq_len = t1 - t0, meta.seq_lens_host[s]
            if q_len == seq_len:  # no earlier context: attend to this chunk's keys
                prefills.append((t0, t1, None, None))
                continue
            num_blocks = -(-seq_len // bs)
            blocks = meta.block_tables[s, :num_blocks]
            q_pos = torch.arange(seq_len - q_len, seq_len, device=device)
            k_pos = torch.arange(num_blocks * bs, device=device)
            mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, q_len, L]
            prefills.append((t0, t1, blocks, mask))
        meta.backend_state["torch"] = (groups, prefills)

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
        flat = kv_cache.view(2, -1, num_kv_heads, head_dim)
        flat[0].index_copy_(0, meta.slot_mapping, key)
        flat[1].index_copy_(0, meta.slot_mapping, value)
        out = torch.empty_like(query)
        groups, prefills = meta.backend_state["torch"]
        for lo, hi, blocks, mask in groups:
            n = hi - lo
            kv = kv_cache.index_select(1, blocks).view(2, n, -1, num_kv_heads, head_dim)
            q = query[lo:hi].unsqueeze(2)  # [n, num_heads, 1, head_dim]
            k = kv[0].transpose(1, 2)  # [n, num_kv_heads, L, head_dim]
            v = kv[1].transpose(1, 2)
            out[lo:hi] = _sdpa(q, k, v, mask, False, scale).squeeze(2)
        for t0, t1, blocks, mask in prefills:
            q = query[t0:t1].transpose(0, 1).unsqueeze(0)  # [1, num_heads, q_len, d]
            if blocks is None:
                k = key[t0:t1].transpose(0, 1).unsqueeze(0)
                v = value[t0:t1].transpose(0, 1).unsqueeze(0)
                o = _sdpa(q, k, v, None, True, scale)
            else:
                kv = kv_cache.index_select(1, blocks).view(
                    2, -1, num_kv_heads, head_dim
                )
                k = kv[0].transpose(0, 1).unsqueeze(0)  # [1, num_kv_heads, L, d]
                v = kv[1].transpose(0, 1).unsqueeze(0)
                o = _sdpa(q, k, v, mask, False, scale)
            out[t0:t1] = o.squeeze(0).transpose(0, 1)
        return out


class TritonAttentionBackend:
    """The Triton kernels of ``llmprod.kernels`` (CUDA, or TRITON_INTERPRET=1)."""

    name = "triton"

    def __init__(self) -> None:
        import importlib

        kernels = importlib.import_module("llmprod.kernels")

        self._store_kv = kernels.store_kv
        self._paged_attention = kernels.paged_attention

    def prepare(self, meta: AttentionMetadata) -> None:
        return None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        self._store_kv(key, value, kv_cache, meta.slot_mapping)
        return self._paged_attention(
            query, kv_cache, meta.block_tables, meta.seq_lens, meta.cu_seqlens_q, scale
        )
