"""Write new keys and values into the paged KV cache.

For each token ``t`` with ``slot = slot_mapping[t] >= 0``::

    kv_cache[0, slot // block_size, slot % block_size] = key[t]
    kv_cache[1, slot // block_size, slot % block_size] = value[t]

Tokens whose slot is ``-1`` are skipped (padding, or tokens whose KV is already
cached). Layouts::

    key, value    [num_tokens, num_kv_heads, head_dim]
    kv_cache      [2, num_blocks, block_size, num_kv_heads, head_dim]   0 = K, 1 = V
    slot_mapping  int64 [num_tokens]   block_id * block_size + offset, -1 = skip

Algorithm: one program per token copies that token's whole ``[num_kv_heads,
head_dim]`` tile of K and of V. It is a pure copy, so it runs at memory
bandwidth; the only arithmetic is the slot split, done in int64 because
``block_id * stride`` outgrows int32 for large caches. The reference is
``llmprod.layers.attention.reference.store_kv_ref``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llmprod.layers.attention.reference import store_kv_ref

__all__ = ["store_kv", "store_kv_ref"]

# A copy has nothing to tune but the warp count; it is chosen from the tile size.
_ELEMS_PER_WARP = 256


@triton.jit
def _store_kv_kernel(
    # pointers
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # int64 [num_tokens]
    # sizes
    num_kv_heads,
    # strides (the last dimension of every tensor is contiguous)
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    # meta-parameters
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,  # num_kv_heads rounded up to a power of two
    BLOCK_D: tl.constexpr,  # head_dim rounded up to a power of two
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    block_id = slot // BLOCK_SIZE
    block_offset = slot % BLOCK_SIZE

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # A skipped slot masks every lane (zero heads to write) instead of branching.
    num_heads_to_write = tl.where(slot >= 0, num_kv_heads, 0)
    mask = (offs_h[:, None] < num_heads_to_write) & (offs_d[None, :] < HEAD_DIM)

    offs_key = token * stride_key_token + offs_h[:, None] * stride_key_head
    offs_value = token * stride_value_token + offs_h[:, None] * stride_value_head
    offs_cache = (
        block_id * stride_cache_block
        + block_offset * stride_cache_slot
        + offs_h[:, None] * stride_cache_head
        + offs_d[None, :]
    )
    key = tl.load(key_ptr + offs_key + offs_d[None, :], mask=mask)
    value = tl.load(value_ptr + offs_value + offs_d[None, :], mask=mask)
    tl.store(key_cache_ptr + offs_cache, key, mask=mask)
    tl.store(value_cache_ptr + offs_cache, value, mask=mask)


def check_device(op: str, *tensors: torch.Tensor) -> None:
    """All ``tensors`` on one device, and one the kernels can run on."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(
                f"all tensors must be on one device; got {device} and {t.device}"
            )
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{op} needs CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 "
            "before the kernels first load to run Triton's interpreter"
        )


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # int64 [num_tokens]
) -> None:
    """Write each token's key and value into ``kv_cache`` at its slot, in place.

    Args:
        key: New keys, ``[num_tokens, num_kv_heads, head_dim]``.
        value: New values, same shape and dtype as ``key``.
        kv_cache: The layer's cache, ``[2, num_blocks, block_size, num_kv_heads,
            head_dim]`` (index 0 keys, 1 values), same dtype as ``key``.
        slot_mapping: int64 ``[num_tokens]``, ``block_id * block_size + offset``;
            ``-1`` skips the token. Slots must lie below ``num_blocks * block_size``.

    Raises:
        ValueError: On a shape, dtype, stride or device mismatch.
    """
    if key.dim() != 3:
        raise ValueError(
            f"key must be [num_tokens, num_kv_heads, head_dim]; got {tuple(key.shape)}"
        )
    if value.shape != key.shape:
        raise ValueError(f"{tuple(value.shape)=} must equal {tuple(key.shape)=}")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            "kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim]; "
            f"got {tuple(kv_cache.shape)}"
        )
    num_tokens, num_kv_heads, head_dim = key.shape
    if tuple(kv_cache.shape[3:]) != (num_kv_heads, head_dim):
        raise ValueError(
            f"kv_cache (num_kv_heads, head_dim) = {tuple(kv_cache.shape[3:])} must "
            f"equal key's {(num_kv_heads, head_dim)}"
        )
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"{tuple(slot_mapping.shape)=} must be ({num_tokens},)")
    if slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be int64; got {slot_mapping.dtype}")
    if not (key.dtype == value.dtype == kv_cache.dtype):
        raise ValueError(
            f"key, value and kv_cache must share a dtype; got {key.dtype}, "
            f"{value.dtype}, {kv_cache.dtype}"
        )
    for name, t in (("key", key), ("value", value), ("kv_cache", kv_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim; {t.stride()=}")
    if slot_mapping.stride(0) != 1:
        raise ValueError(f"slot_mapping must be contiguous; {slot_mapping.stride()=}")
    check_device("store_kv", key, value, kv_cache, slot_mapping)
    if num_tokens == 0:
        return

    key_cache, value_cache = kv_cache[0], kv_cache[1]
    block_h = triton.next_power_of_2(num_kv_heads)
    block_d = triton.next_power_of_2(head_dim)
    num_warps = max(1, min(8, block_h * block_d // _ELEMS_PER_WARP))
    _store_kv_kernel[(num_tokens,)](
        key_ptr=key,
        value_ptr=value,
        key_cache_ptr=key_cache,
        value_cache_ptr=value_cache,
        slot_mapping_ptr=slot_mapping,
        num_kv_heads=num_kv_heads,
        stride_key_token=key.stride(0),
        stride_key_head=key.stride(1),
        stride_value_token=value.stride(0),
        stride_value_head=value.stride(1),
        stride_cache_block=key_cache.stride(0),
        stride_cache_slot=key_cache.stride(1),
        stride_cache_head=key_cache.stride(2),
        BLOCK_SIZE=kv_cache.shape[2],
        HEAD_DIM=head_dim,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
