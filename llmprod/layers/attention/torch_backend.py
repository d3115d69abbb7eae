"""Attention over the paged KV cache with torch ops (the CPU path).

Decodes are batched: each group of similar-length sequences gathers its keys into
one padded tensor and runs one SDPA call, masked to each sequence's length.
Prefill chunks run one SDPA call per sequence; a chunk with no earlier context
attends to its own keys directly, without reading the cache back.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from llmprod.layers.attention.metadata import AttentionMetadata

if TYPE_CHECKING:
    from llmprod.layers.cpu import FusedOps

# Served here too for the old path ``llmprod.attention.torch_backend``.
from llmprod.layers.attention.triton_backend import TritonAttentionBackend

__all__ = ["TorchAttentionBackend", "TritonAttentionBackend"]

# SDPA grew ``enable_gqa`` in torch 2.5; older versions repeat the KV heads.
_HAS_ENABLE_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _sdpa(
    q: torch.Tensor,  # [batch, num_heads, q_len, head_dim]
    k: torch.Tensor,  # [batch, num_kv_heads, kv_len, head_dim]
    v: torch.Tensor,  # [batch, num_kv_heads, kv_len, head_dim]
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    if softcap is not None:
        return _softcapped(q, k, v, mask, is_causal, scale, softcap)
    if group > 1 and not _HAS_ENABLE_GQA:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    kwargs = {"enable_gqa": True} if group > 1 and _HAS_ENABLE_GQA else {}
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, **kwargs
    )


def _softcapped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    softcap: float,
) -> torch.Tensor:
    """Attention with scores squashed to ``softcap * tanh(s / softcap)`` (SDPA
    cannot), the same operations in the same order as transformers' eager path."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        q_len, kv_len = scores.shape[-2], scores.shape[-1]
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(
            kv_len - q_len
        )
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


# (first row, end row, block ids to gather or None, mask or None)
_Gather = tuple[int, int, "torch.Tensor | None", "torch.Tensor | None"]
# Per step, in ``AttentionMetadata.backend_state["torch"]``: the decode groups
# (first row, end row, block ids), the prefill chunks (first token, end token,
# block ids or None) and the plans built so far, by attention window.
_State = tuple[
    list[tuple[int, int, torch.Tensor]],
    list[tuple[int, int, "torch.Tensor | None"]],
    dict["int | None", tuple[list[_Gather], list[_Gather]]],
]


class TorchAttentionBackend:
    """Paged attention with torch ops; runs anywhere torch runs."""

    name = "torch"
    default_block_size = 8
    """Half the slots a 16-token block leaves empty, at no measured cost here
    (docs/benchmarks.md, "KV block size and unused slots")."""

    def __init__(self) -> None:
        self._local = threading.local()
        # (data_ptr, shape, dtype) -> views of one layer's cache (see _views).
        self._cache_views: dict[
            tuple[int, torch.Size, torch.dtype], tuple[torch.Tensor, ...]
        ] = {}

    def release(self) -> None:
        """Drop the views this backend keeps of the KV caches (engine close)."""
        self._cache_views.clear()

    def _views(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Slot rows and block rows of one layer's cache, for K and V.

        Slot rows (``[slots, num_kv_heads, head_dim]``) take the new keys and
        values; block rows (``[num_blocks, block_size * num_kv_heads *
        head_dim]``) are what the gathers copy, whole blocks at a time, about 10x
        faster than ``index_select`` along dimension 1 of the 5-d cache. Built once
        per cache and reused: rebuilding them in every layer of every step costs
        more than the attention itself at batch 1.
        """
        # The views keep their storage alive, so no other cache can take this
        # address while they are held.
        key = (kv_cache.data_ptr(), kv_cache.shape, kv_cache.dtype)
        views = self._cache_views.get(key)
        if views is None:
            num_blocks, num_kv_heads, head_dim = (
                kv_cache.shape[1],
                kv_cache.shape[3],
                kv_cache.shape[4],
            )
            views = (
                kv_cache[0].view(-1, num_kv_heads, head_dim),
                kv_cache[1].view(-1, num_kv_heads, head_dim),
                kv_cache[0].view(num_blocks, -1),
                kv_cache[1].view(num_blocks, -1),
            )
            self._cache_views[key] = views
        return views

    def prepare(self, meta: AttentionMetadata) -> None:
        """Build block indices once per step (shared by all layers); what each
        attention window gathers and masks is planned on first use (``_plan``) and
        reused by later layers with that window.

        Keys are gathered a whole block at a time (``index_select`` of contiguous
        ``block_size`` rows), several times faster than gathering token rows;
        positions past a sequence's length are masked out.
        """
        bs = meta.block_size
        groups: list[tuple[int, int, torch.Tensor]] = []
        for lo, hi in meta.decode_groups:
            num_blocks = -(-max(meta.seq_lens_host[lo:hi]) // bs)
            groups.append((lo, hi, meta.block_tables[lo:hi, :num_blocks].reshape(-1)))
        prefills: list[tuple[int, int, torch.Tensor | None]] = []
        cu = meta.cu_seqlens_q_host
        for s in range(meta.num_decodes, meta.num_seqs):
            t0, t1 = cu[s], cu[s + 1]
            if t1 - t0 == meta.seq_lens_host[s]:  # no earlier context
                prefills.append((t0, t1, None))
            else:
                num_blocks = -(-meta.seq_lens_host[s] // bs)
                prefills.append((t0, t1, meta.block_tables[s, :num_blocks]))
        meta.backend_state["torch"] = (groups, prefills, {})

    def _plan(
        self, meta: AttentionMetadata, window: int | None
    ) -> tuple[list[_Gather], list[_Gather]]:
        """What each decode group and prefill chunk gathers and masks for one
        attention window, built once per step and reused by every layer with that
        window. A window shorter than the context gathers only the blocks the
        window reaches, so a local layer reads ``window`` keys, not the whole
        context. Mask ``None`` = none needed (or, for a chunk with no earlier
        context, plain causal)."""
        state: _State = meta.backend_state["torch"]
        groups, prefills, cache = state
        if window in cache:
            return cache[window]
        bs = meta.block_size
        device = meta.block_tables.device
        group_plan: list[_Gather] = []
        for lo, hi, group_blocks in groups:
            lens = meta.seq_lens_host[lo:hi]
            n = hi - lo
            padded = group_blocks.numel() // n * bs
            if window is None or max(lens) <= window:
                mask = None
                if min(lens) != padded:
                    lens_t = torch.tensor(lens, device=device)[:, None]
                    pos = torch.arange(padded, device=device)[None, :]
                    mask = (pos < lens_t)[:, None, None, :]  # [n, 1, 1, L]
                group_plan.append((lo, hi, group_blocks, mask))
                continue
            # Per sequence, the blocks from the first one its window reaches.
            first = [max(0, length - window) // bs for length in lens]
            count = max(-(-length // bs) - f for length, f in zip(lens, first))
            cols = torch.tensor(first, device=device)[:, None] + torch.arange(
                count, device=device
            )
            table = meta.block_tables[lo:hi]
            ids = table.gather(1, cols.clamp(max=table.shape[1] - 1)).reshape(-1)
            pos = (cols[:, :, None] * bs + torch.arange(bs, device=device)).reshape(
                n, -1
            )
            lens_t = torch.tensor(lens, device=device)[:, None]
            mask = (pos < lens_t) & (pos >= lens_t - window)
            group_plan.append((lo, hi, ids, mask[:, None, None, :]))
        prefill_plan: list[_Gather] = []
        for i, (t0, t1, blocks) in enumerate(prefills):
            q_len = t1 - t0
            seq_len = meta.seq_lens_host[meta.num_decodes + i]
            if blocks is None and (window is None or window >= q_len):
                prefill_plan.append((t0, t1, None, None))
                continue
            skip = 0  # leading blocks no query of the chunk can see
            if blocks is not None and window is not None:
                skip = max(0, seq_len - q_len - window + 1) // bs
                blocks = blocks[skip:]
            kv_len = q_len if blocks is None else blocks.numel() * bs
            q_pos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]
            k_pos = torch.arange(kv_len, device=device)[None, :]
            k_pos = k_pos + ((seq_len - q_len) if blocks is None else skip * bs)
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
            prefill_plan.append((t0, t1, blocks, mask[None, None]))  # [1,1,q,L]
        cache[window] = (group_plan, prefill_plan)
        return group_plan, prefill_plan

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
        fused: FusedOps | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """See ``AttentionBackend.forward``. With ``fused`` (float32 caches, no
        softcap), the decode rows are stored and attended in one fused call that
        reads the cache blocks in place; prefill chunks take the torch path."""
        if fused is not None and softcap is None and kv_cache.dtype == torch.float32:
            return self._forward_fused(
                query, key, value, kv_cache, meta, scale, sliding_window, fused
            )
        num_kv_heads = kv_cache.shape[3]
        slots_k, slots_v, blocks_k, blocks_v = self._views(kv_cache)
        slots_k.index_copy_(0, meta.slot_mapping, key)
        slots_v.index_copy_(0, meta.slot_mapping, value)
        group_plan, prefill_plan = self._plan(meta, sliding_window)
        if not prefill_plan and len(group_plan) == 1:  # one decode group only
            _, _, blocks, mask = group_plan[0]
            return self._decode(
                query, blocks_k, blocks_v, blocks, num_kv_heads, mask, scale, softcap
            )
        out = torch.empty_like(query)
        for lo, hi, blocks, mask in group_plan:
            out[lo:hi] = self._decode(
                query[lo:hi],
                blocks_k,
                blocks_v,
                blocks,
                num_kv_heads,
                mask,
                scale,
                softcap,
            )
        self._prefill(
            query, key, value, blocks_k, blocks_v, prefill_plan, scale, softcap, out
        )
        return out

    def _prefill(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        blocks_k: torch.Tensor,
        blocks_v: torch.Tensor,
        prefill_plan: list[_Gather],
        scale: float,
        softcap: float | None,
        out: torch.Tensor,
    ) -> None:
        """One SDPA call per prefill chunk, written into its rows of ``out``."""
        num_kv_heads, head_dim = key.shape[1], key.shape[2]
        for t0, t1, blocks, mask in prefill_plan:
            q = query[t0:t1].transpose(0, 1).unsqueeze(0)  # [1, num_heads, q_len, d]
            if blocks is None:
                k = key[t0:t1].transpose(0, 1).unsqueeze(0)
                v = value[t0:t1].transpose(0, 1).unsqueeze(0)
            else:
                kb, vb = self._gather(blocks_k, blocks_v, blocks)
                # [1, num_kv_heads, L, d]
                k = kb.view(-1, num_kv_heads, head_dim).transpose(0, 1).unsqueeze(0)
                v = vb.view(-1, num_kv_heads, head_dim).transpose(0, 1).unsqueeze(0)
            o = _sdpa(q, k, v, mask, mask is None, scale, softcap)
            out[t0:t1] = o.squeeze(0).transpose(0, 1)

    def _forward_fused(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        fused: FusedOps,
    ) -> torch.Tensor:
        nd = meta.num_decodes
        if nd == 0:
            return self.forward(
                query, key, value, kv_cache, meta, scale, sliding_window
            )
        decoded = fused.paged_decode(
            query[:nd],
            key[:nd],
            value[:nd],
            kv_cache,
            meta.slot_mapping[:nd],
            meta.block_tables[:nd],
            meta.seq_lens[:nd],
            scale,
            sliding_window,
        )
        if nd == query.shape[0]:
            return decoded
        slots_k, slots_v, blocks_k, blocks_v = self._views(kv_cache)
        slots_k.index_copy_(0, meta.slot_mapping[nd:], key[nd:])
        slots_v.index_copy_(0, meta.slot_mapping[nd:], value[nd:])
        _, prefill_plan = self._plan(meta, sliding_window)
        out = torch.empty_like(query)
        out[:nd] = decoded
        self._prefill(
            query, key, value, blocks_k, blocks_v, prefill_plan, scale, None, out
        )
        return out

    def _decode(
        self,
        query: torch.Tensor,  # [n, num_heads, head_dim]: one query per sequence
        blocks_k: torch.Tensor,
        blocks_v: torch.Tensor,
        blocks: torch.Tensor | None,  # the group's block ids, n rows of them
        num_kv_heads: int,
        mask: torch.Tensor | None,
        scale: float,
        softcap: float | None,
    ) -> torch.Tensor:  # [n, num_heads, head_dim]
        """One batched SDPA call for a decode group over its gathered blocks."""
        assert blocks is not None
        n, head_dim = query.shape[0], query.shape[2]
        kb, vb = self._gather(blocks_k, blocks_v, blocks)
        q = query.unsqueeze(2)  # [n, num_heads, 1, head_dim]
        k = kb.view(n, -1, num_kv_heads, head_dim).transpose(1, 2)
        v = vb.view(n, -1, num_kv_heads, head_dim).transpose(1, 2)
        return _sdpa(q, k, v, mask, False, scale, softcap).squeeze(2)

    def _gather(
        self, blocks_k: torch.Tensor, blocks_v: torch.Tensor, blocks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy the listed blocks' keys and values into this thread's workspace.

        The workspace grows to the largest gather seen and is reused by every
        layer and step: a fresh tensor of this size per layer would come from
        newly mapped memory each time, and the page faults of filling it cost
        several times the copy itself. The views returned are valid until the
        next gather on this thread.
        """
        rows, width = blocks.numel(), blocks_k.shape[1]
        need = 2 * rows * width
        ws: torch.Tensor | None = getattr(self._local, "workspace", None)
        if (
            ws is None
            or ws.numel() < need
            or ws.dtype != blocks_k.dtype
            or ws.device != blocks_k.device
        ):
            ws = torch.empty(need, dtype=blocks_k.dtype, device=blocks_k.device)
            self._local.workspace = ws
        k = ws[: rows * width].view(rows, width)
        v = ws[rows * width : need].view(rows, width)
        torch.index_select(blocks_k, 0, blocks, out=k)
        torch.index_select(blocks_v, 0, blocks, out=v)
        return k, v
