"""store_kv against store_kv_ref: every written slot, every skipped one, exactly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip(
    "triton", reason="triton is not installed: pip install llmprod[triton]"
)

from llmprod.kernels import store_kv

from llmprod.layers.attention.reference import store_kv_ref

BLOCK_SIZES = [16, 32]
HEAD_DIMS = [64, 128]
# 3 is not a power of two: the kernel pads the head axis and must mask the rest.
NUM_KV_HEADS = [1, 3]
# 8192 blocks puts the written slots past 131072: far from block 0, so a slot
# split done in the wrong integer width or against the wrong stride shows.
NUM_BLOCKS = [6, 8192]
GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_slot_mapping(
    num_blocks: int, block_size: int, num_tokens: int, device: str = "cpu"
) -> torch.Tensor:
    """Distinct slots in the highest blocks, both block edges included, some -1."""
    span_blocks = max(4, -(-2 * num_tokens // block_size))  # half the span is used
    first_slot = (num_blocks - span_blocks) * block_size
    slots = first_slot + torch.randperm(span_blocks * block_size)[:num_tokens]
    slots[0] = first_slot  # offset 0 of a block
    slots[1] = first_slot + block_size - 1  # last offset of the same block
    slots[2] = first_slot + block_size  # first offset of the next block
    slots[3::4] = -1  # every fourth token is skipped
    return slots.to(device=device, dtype=torch.int64)


def run_and_compare(
    num_tokens: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    num_blocks: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> None:
    shape = (num_tokens, num_kv_heads, head_dim)
    key = torch.randn(shape, device=device).to(dtype)
    value = torch.randn(shape, device=device).to(dtype)
    kv_cache = torch.randn(
        2, num_blocks, block_size, num_kv_heads, head_dim, device=device
    )
    kv_cache = kv_cache.to(dtype)
    expected = kv_cache.clone()
    slot_mapping = make_slot_mapping(num_blocks, block_size, num_tokens, device)

    store_kv(key, value, kv_cache, slot_mapping)
    store_kv_ref(key, value, expected, slot_mapping)

    # A copy: equal to the bit, including every slot that was not written.
    assert torch.equal(kv_cache, expected), (
        f"mismatch at {(kv_cache != expected).nonzero()[:5].tolist()} (first 5)"
    )


@pytest.mark.parametrize("num_blocks", NUM_BLOCKS)
@pytest.mark.parametrize("num_kv_heads", NUM_KV_HEADS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_store_kv(
    block_size: int, head_dim: int, num_kv_heads: int, num_blocks: int
) -> None:
    # 13 tokens over 4 blocks: blocks partly written, 3 tokens skipped.
    run_and_compare(13, num_kv_heads, head_dim, block_size, num_blocks)


def test_store_kv_all_skipped_leaves_cache_untouched() -> None:
    key = torch.randn(4, 2, 64)
    kv_cache = torch.randn(2, 3, 16, 2, 64)
    before = kv_cache.clone()
    store_kv(key, key.clone(), kv_cache, torch.full((4,), -1, dtype=torch.int64))
    assert torch.equal(kv_cache, before)


def test_store_kv_empty_batch() -> None:
    kv_cache = torch.randn(2, 3, 16, 2, 64)
    before = kv_cache.clone()
    empty = torch.empty(0, 2, 64)
    store_kv(empty, empty, kv_cache, torch.empty(0, dtype=torch.int64))
    assert torch.equal(kv_cache, before)


def test_store_kv_strided_inputs() -> None:
    # K and V sliced out of one fused projection: token stride 3x the row size.
    num_tokens, num_kv_heads, head_dim = 5, 2, 64
    qkv = torch.randn(num_tokens, 3 * num_kv_heads, head_dim)
    key, value = qkv[:, num_kv_heads : 2 * num_kv_heads], qkv[:, 2 * num_kv_heads :]
    kv_cache = torch.zeros(2, 4, 16, num_kv_heads, head_dim)
    expected = kv_cache.clone()
    slot_mapping = torch.tensor([0, 17, -1, 63, 30], dtype=torch.int64)
    store_kv(key, value, kv_cache, slot_mapping)
    store_kv_ref(key, value, expected, slot_mapping)
    assert torch.equal(kv_cache, expected)


BAD_INPUTS = {
    # name: (key shape, cache shape, slot dtype, cache dtype, message fragment)
    "key_rank": (
        (4, 128),
        (2, 3, 16, 2, 64),
        torch.int64,
        torch.float32,
        "key must be",
    ),
    "cache_rank": (
        (4, 2, 64),
        (3, 16, 2, 64),
        torch.int64,
        torch.float32,
        "kv_cache must",
    ),
    "cache_heads": (
        (4, 2, 64),
        (2, 3, 16, 4, 64),
        torch.int64,
        torch.float32,
        "num_kv_heads",
    ),
    "slot_dtype": ((4, 2, 64), (2, 3, 16, 2, 64), torch.int32, torch.float32, "int64"),
    "cache_dtype": ((4, 2, 64), (2, 3, 16, 2, 64), torch.int64, torch.float64, "dtype"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_store_kv_rejects_bad_inputs(case: str) -> None:
    key_shape, cache_shape, slot_dtype, cache_dtype, fragment = BAD_INPUTS[case]
    key = torch.randn(key_shape)
    kv_cache = torch.zeros(cache_shape, dtype=cache_dtype)
    slot_mapping = torch.zeros(key_shape[0], dtype=slot_dtype)
    with pytest.raises(ValueError, match=fragment):
        store_kv(key, key.clone(), kv_cache, slot_mapping)


def test_store_kv_rejects_non_contiguous_head_dim() -> None:
    key = torch.randn(4, 64, 2).transpose(1, 2)  # head_dim stride 2
    kv_cache = torch.zeros(2, 3, 16, 2, 64)
    with pytest.raises(ValueError, match="contiguous in head_dim"):
        store_kv(key, key, kv_cache, torch.zeros(4, dtype=torch.int64))


def test_store_kv_needs_cuda_or_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU tensors only; this machine runs the kernels on CUDA")
    monkeypatch.delenv("TRITON_INTERPRET")
    key = torch.randn(4, 2, 64)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        store_kv(
            key, key, torch.zeros(2, 3, 16, 2, 64), torch.zeros(4, dtype=torch.int64)
        )


def test_package_imports_without_triton() -> None:
    # A child process where `import triton` fails: the package must import and
    # each kernel must say what to install when called.
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import llmprod.kernels as k
        assert not k.HAS_TRITON
        for fn in (k.store_kv, k.paged_attention):
            try:
                fn()
            except ImportError as exc:
                assert "pip install llmprod[triton]" in str(exc), exc
            else:
                raise AssertionError("no ImportError")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_store_kv_gpu(dtype: torch.dtype, block_size: int) -> None:
    # A prefill-sized batch with a model-sized cache (8 KV heads of 128).
    run_and_compare(2048, 8, 128, block_size, 20_000, dtype=dtype, device="cuda")
