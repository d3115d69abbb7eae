"""paged_attention against paged_attention_ref over the batch shapes a step can have."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip(
    "triton", reason="triton is not installed: pip install llmprod[triton]"
)

from llmprod.kernels import paged_attention, store_kv
from llmprod.kernels.triton_paged_attention import (
    CONFIGS,
    DEFAULT_CONFIG,
    AttentionConfig,
    select_config,
    select_num_kv_splits,
)

from llmprod.layers.attention.reference import paged_attention_ref

from .tolerances import tolerance

BLOCK_SIZES = [16, 32]
HEAD_DIMS = [64, 128]
# Query heads per KV head. 3 is not a power of two, so a program's rows include
# padded heads that must be masked; 8 leaves only 2 query tokens per 16-row tile.
GQA_RATIOS = [1, 3, 8]
NUM_KV_HEADS = 2
# Batches as (q_len, seq_len) per sequence: the query is the last q_len tokens of
# a context of seq_len. Lengths 16/32/64 sit exactly on a block boundary for
# block sizes 16 and 32; 17/33/65 are one past it.
BATCHES = {
    "decode": [(1, 1), (1, 16), (1, 17), (1, 32), (1, 33), (1, 65)],
    "prefill": [(1, 1), (16, 16), (17, 17), (33, 33)],
    # Prefix-cache hits and chunked prefill: earlier context is already cached.
    "prefix_hit": [(1, 33), (7, 32), (16, 48), (5, 65)],
    # Prefill, decode and prefix hit in one step, plus a sequence with no query
    # token this step (q_len 0), which must not disturb its neighbours.
    "mixed": [(40, 40), (1, 17), (0, 9), (7, 33), (1, 1), (16, 64)],
}
NUM_KV_SPLITS = [2, 3, 8]  # 8 exceeds the key tiles of short sequences: empty splits
# Tile shapes the GPU selection can pick, each with the interpreter's cheap options.
INTERPRETER_CONFIGS = [c for c in CONFIGS if c.num_warps == 4 and c.num_stages == 2]
# Far more blocks than the batch needs, with the batch in the highest ids: block
# ids near num_blocks must index correctly, and nothing may be sized by num_blocks.
LARGE_NUM_BLOCKS = 8192
GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@dataclass
class Batch:
    """One step's inputs for paged_attention, in the layouts of DESIGN.md."""

    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    cu_seqlens_q: torch.Tensor  # int32 [num_seqs + 1]
    scale: float

    def args(self) -> tuple:
        return (
            self.query,
            self.kv_cache,
            self.block_tables,
            self.seq_lens,
            self.cu_seqlens_q,
            self.scale,
        )


def make_batch(
    seqs: list[tuple[int, int]],
    *,
    block_size: int = 16,
    head_dim: int = 64,
    gqa_ratio: int = 3,
    num_kv_heads: int = NUM_KV_HEADS,
    num_blocks: int | None = None,
    shuffled: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Batch:
    """Random query and cache; each sequence gets its own (shuffled) cache blocks.

    Block tables have one spare column, filled with block 0, which the kernel
    must never use.
    """
    blocks_per_seq = [-(-seq_len // block_size) for _, seq_len in seqs]
    num_used = sum(blocks_per_seq)
    if num_blocks is None:
        num_blocks = num_used + 3  # a few blocks no sequence owns
    # The highest ids, so a large num_blocks puts the batch far from block 0.
    ids = torch.arange(num_blocks - num_used, num_blocks)
    if shuffled:
        ids = ids[torch.randperm(num_used)]
    block_tables = torch.zeros(len(seqs), max(blocks_per_seq) + 1, dtype=torch.int32)
    for s, row in enumerate(ids.split(blocks_per_seq)):
        block_tables[s, : len(row)] = row

    q_lens = [q_len for q_len, _ in seqs]
    cu_seqlens_q = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu_seqlens_q[1:] = torch.tensor(q_lens).cumsum(0)
    num_heads = num_kv_heads * gqa_ratio
    query = torch.randn(sum(q_lens), num_heads, head_dim, device=device, dtype=dtype)
    kv_cache = torch.randn(
        2, num_blocks, block_size, num_kv_heads, head_dim, device=device, dtype=dtype
    )
    return Batch(
        query=query,
        kv_cache=kv_cache,
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor([n for _, n in seqs], dtype=torch.int32, device=device),
        cu_seqlens_q=cu_seqlens_q.to(device),
        scale=head_dim**-0.5,
    )


def check(
    batch: Batch,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: object,
) -> None:
    out = paged_attention(
        *batch.args(), sliding_window=sliding_window, softcap=softcap, **kwargs
    )
    ref = paged_attention_ref(*batch.args(), sliding_window, softcap)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(
        out,
        ref,
        **tolerance(batch.query.dtype),
        msg=lambda m: f"{m}\nseq_lens={batch.seq_lens.tolist()} {kwargs=}",
    )


@pytest.mark.parametrize("batch_name", BATCHES)
@pytest.mark.parametrize("gqa_ratio", GQA_RATIOS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_paged_attention(
    block_size: int, head_dim: int, gqa_ratio: int, batch_name: str
) -> None:
    batch = make_batch(
        BATCHES[batch_name],
        block_size=block_size,
        head_dim=head_dim,
        gqa_ratio=gqa_ratio,
    )
    check(batch)


@pytest.mark.parametrize("batch_name", ["decode", "mixed"])
@pytest.mark.parametrize("num_kv_splits", NUM_KV_SPLITS)
def test_paged_attention_split_kv(num_kv_splits: int, batch_name: str) -> None:
    # The split path is a decode optimisation, but it must be right for any batch.
    batch = make_batch(BATCHES[batch_name], block_size=16, gqa_ratio=3)
    check(batch, num_kv_splits=num_kv_splits)


# (sliding_window, softcap): a window inside one key tile, one spanning several
# tiles and blocks, a window of 1, and Gemma 2's score capping with and without
# a window.
WINDOW_VARIANTS = [(5, None), (20, None), (1, None), (None, 2.0), (9, 3.0)]


@pytest.mark.parametrize("num_kv_splits", [1, 3])
@pytest.mark.parametrize(
    "variant", WINDOW_VARIANTS, ids=lambda v: f"window{v[0]}-softcap{v[1]}"
)
@pytest.mark.parametrize("batch_name", ["decode", "mixed"])
def test_paged_attention_window_and_softcap(
    batch_name: str, variant: tuple[int | None, float | None], num_kv_splits: int
) -> None:
    window, softcap = variant
    batch = make_batch(BATCHES[batch_name], block_size=16, gqa_ratio=3)
    check(batch, window, softcap, num_kv_splits=num_kv_splits)


@pytest.mark.parametrize(
    "config", INTERPRETER_CONFIGS, ids=lambda c: f"m{c.block_m}-n{c.block_n}"
)
def test_paged_attention_tile_configs(config: AttentionConfig) -> None:
    # GQA 8: the largest padded group; every config's rows must still hold it.
    batch = make_batch(BATCHES["mixed"], block_size=16, gqa_ratio=8)
    check(batch, config=config)


@pytest.mark.parametrize("shuffled", [True, False], ids=["shuffled", "contiguous"])
def test_paged_attention_block_order(shuffled: bool) -> None:
    batch = make_batch(BATCHES["prefix_hit"], shuffled=shuffled)
    check(batch)


@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_paged_attention_large_num_blocks(num_kv_splits: int) -> None:
    batch = make_batch(BATCHES["mixed"], num_blocks=LARGE_NUM_BLOCKS, head_dim=64)
    assert int(batch.block_tables.max()) == LARGE_NUM_BLOCKS - 1
    check(batch, num_kv_splits=num_kv_splits)


def test_paged_attention_strided_query() -> None:
    # Query sliced out of a fused QKV projection: its token stride is not
    # num_heads * head_dim.
    batch = make_batch(BATCHES["mixed"], gqa_ratio=3)
    num_tokens, num_heads, head_dim = batch.query.shape
    qkv = torch.randn(num_tokens, num_heads + 2 * NUM_KV_HEADS, head_dim)
    qkv[:, :num_heads] = batch.query
    batch.query = qkv[:, :num_heads]
    assert not batch.query.is_contiguous()
    check(batch)


def test_store_then_attend() -> None:
    # The engine's order within a layer: write this step's K/V, then attend.
    # Only earlier context is in the cache at first; store_kv fills in the rest.
    seqs = BATCHES["mixed"]
    batch = make_batch(seqs, block_size=16, gqa_ratio=2)
    block_size = batch.kv_cache.shape[2]
    slots = []
    for s, (q_len, seq_len) in enumerate(seqs):
        for pos in range(seq_len - q_len, seq_len):
            block = int(batch.block_tables[s, pos // block_size])
            slots.append(block * block_size + pos % block_size)
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    num_tokens = batch.query.shape[0]
    key = torch.randn(num_tokens, NUM_KV_HEADS, 64)
    value = torch.randn(num_tokens, NUM_KV_HEADS, 64)
    before = batch.kv_cache.clone()

    store_kv(key, value, batch.kv_cache, slot_mapping)

    # The new tokens' keys and values are where attention will read them ...
    assert torch.equal(batch.kv_cache[0].flatten(0, 1)[slot_mapping], key)
    assert torch.equal(batch.kv_cache[1].flatten(0, 1)[slot_mapping], value)
    # ... and attention over the updated cache differs from the stale one.
    check(batch)
    stale = paged_attention_ref(batch.query, before, *batch.args()[2:])
    assert not torch.allclose(paged_attention(*batch.args()), stale)


@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_paged_attention_fp16(num_kv_splits: int) -> None:
    # The 16-bit path (probabilities rounded to fp16 before P @ V) on CPU too.
    # bf16 runs on the GPU only: the interpreter's dot multiplies bf16's raw bits.
    batch = make_batch(BATCHES["mixed"], dtype=torch.float16)
    check(batch, num_kv_splits=num_kv_splits)


def test_paged_attention_empty_batch() -> None:
    batch = make_batch([(0, 5), (0, 17)])
    out = paged_attention(*batch.args())
    assert out.shape == (0, NUM_KV_HEADS * 3, 64)


def _bad(**change: object) -> Batch:
    batch = make_batch(BATCHES["decode"][:2])
    for name, value in change.items():
        setattr(batch, name, value)
    return batch


BAD_INPUTS = {
    # name: (batch, message fragment)
    "query_rank": (lambda: _bad(query=torch.randn(2, 6 * 64)), "query must be"),
    "cache_rank": (lambda: _bad(kv_cache=torch.randn(3, 16, 2, 64)), "kv_cache must"),
    "head_dim": (lambda: _bad(kv_cache=torch.randn(2, 4, 16, 2, 32)), "head_dim"),
    "gqa": (lambda: _bad(kv_cache=torch.randn(2, 4, 16, 4, 64)), "multiple"),
    "dtype": (lambda: _bad(query=torch.randn(2, 6, 64, dtype=torch.float64)), "dtype"),
    "table_dtype": (
        lambda: _bad(block_tables=torch.zeros(2, 3, dtype=torch.int64)),
        "block_tables must be int32",
    ),
    "seq_lens_len": (
        lambda: _bad(seq_lens=torch.ones(3, dtype=torch.int32)),
        "num_seqs=3",
    ),
    "cu_seqlens_len": (
        lambda: _bad(cu_seqlens_q=torch.arange(2, dtype=torch.int32)),
        "cu_seqlens_q.shape",
    ),
    "head_dim_stride": (
        lambda: _bad(query=torch.randn(2, 64, 6).transpose(1, 2)),
        "contiguous in head_dim",
    ),
    "scale": (lambda: _bad(scale=float("nan")), "scale"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_paged_attention_rejects_bad_inputs(case: str) -> None:
    make, fragment = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=fragment):
        paged_attention(*make().args())


def test_paged_attention_needs_cuda_or_interpreter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU tensors only; this machine runs the kernels on CUDA")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        paged_attention(*make_batch(BATCHES["decode"]).args())


SPLIT_CHOICES = {
    # name: ((num_tokens, num_seqs, num_kv_heads, max_context, num_sms), splits)
    # 1 sequence x 8 KV heads on 132 SMs, 32k context: 33 wanted, capped at 16.
    "long_single_decode": ((1, 1, 8, 32768, 132), 16),
    # 4 x 8 programs want 9 splits; powers of two only, so 8.
    "small_batch": ((4, 4, 8, 32768, 132), 8),
    # 256 x 8 programs already fill two waves: no split.
    "large_batch": ((256, 256, 8, 32768, 132), 1),
    # 1024 keys hold only 2 splits of 512.
    "short_tables": ((1, 1, 8, 1024, 132), 2),
    "shorter_tables": ((1, 1, 8, 1000, 132), 1),
    # More query tokens than sequences: a prefill is there, one pass.
    "prefill": ((40, 2, 8, 32768, 132), 1),
}


@pytest.mark.parametrize("case", SPLIT_CHOICES)
def test_select_num_kv_splits(case: str) -> None:
    shape, expected = SPLIT_CHOICES[case]
    assert select_num_kv_splits(*shape) == expected


def test_select_config() -> None:
    assert select_config(7, 7, group_pad=4, on_gpu=False) == DEFAULT_CONFIG
    decode = select_config(7, 7, group_pad=4, on_gpu=True)
    prefill = select_config(700, 7, group_pad=4, on_gpu=True)
    assert decode.block_m < prefill.block_m
    # A 32-head group needs 32 rows whatever the rule says.
    assert select_config(7, 7, group_pad=32, on_gpu=True).block_m == 32


# Compiles, without launching, the kernels as a GPU run would (sm_90, fp16 and
# bf16, with and without split-KV): the interpreter runs Python and never sees
# Triton's compiler, so code it accepts may still fail to compile.
COMPILE_CHECK = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from llmprod.kernels.triton_paged_attention import (
        _merge_kv_splits_kernel, _paged_attention_kernel
    )
    from llmprod.kernels.triton_store_kv import _store_kv_kernel

    def compile_for_gpu(kernel, pointers, constexprs, num_warps, num_stages):
        signature = {
            name: "constexpr" if name in constexprs else pointers.get(name, "i32")
            for name in kernel.arg_names
        }
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        options = {"num_warps": num_warps, "num_stages": num_stages}
        triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)

    for dtype, has_window, softcap in (
        ("fp16", False, False), ("bf16", False, False), ("bf16", True, True)
    ):
        for is_split_kv in (False, True):
            pointers = {name: f"*{dtype}" for name in (
                "out_ptr", "query_ptr", "key_cache_ptr", "value_cache_ptr")}
            pointers.update({name: "*i32" for name in (
                "block_tables_ptr", "seq_lens_ptr", "cu_seqlens_q_ptr")})
            pointers.update({name: "*fp32" for name in (
                "partial_out_ptr", "partial_max_ptr", "partial_sum_ptr")})
            pointers.update(
                qk_scale="fp32", sm_scale="fp32", softcap="fp32",
                stride_cache_block="i64",
            )
            constexprs = dict(
                GROUP=3, GROUP_PAD=4, BLOCK_M=64, BLOCK_N=64, BLOCK_SIZE=16,
                HEAD_DIM=128, HEAD_DIM_PAD=128, IS_SPLIT_KV=is_split_kv,
                DOT_PRECISION="tf32", HAS_WINDOW=has_window, SOFTCAP=softcap,
            )
            compile_for_gpu(_paged_attention_kernel, pointers, constexprs, 4, 3)
    compile_for_gpu(
        _merge_kv_splits_kernel,
        {"out_ptr": "*bf16", "partial_out_ptr": "*fp32", "partial_max_ptr": "*fp32",
         "partial_sum_ptr": "*fp32"},
        dict(HEAD_DIM=128, BLOCK_H=32, HEAD_DIM_PAD=128), 4, 1,
    )
    compile_for_gpu(
        _store_kv_kernel,
        {"key_ptr": "*bf16", "value_ptr": "*bf16", "key_cache_ptr": "*bf16",
         "value_cache_ptr": "*bf16", "slot_mapping_ptr": "*i64",
         "stride_cache_block": "i64"},
        dict(BLOCK_SIZE=16, HEAD_DIM=128, BLOCK_H=8, BLOCK_D=128), 4, 1,
    )
    """
)


def test_kernels_compile_for_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("the GPU tests compile and run the kernels on this machine")
    # A child process without TRITON_INTERPRET, so the kernels are compilable.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_CHECK],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]


# ---------------------------------------------------------------------------
# GPU: 16-bit dtypes, model-sized shapes, and the shape-based split/tile choice.
# ---------------------------------------------------------------------------

# Long contexts, many sequences, the mixes a busy server sees.
GPU_BATCHES = {
    "decode_long": [(1, n) for n in (1, 511, 512, 4097, 8191)],
    "decode_wide": [(1, 1 + 37 * i) for i in range(64)],
    "prefill": [(n, n) for n in (1, 300, 1024, 2049)],
    "mixed": [(1000, 1000), (1, 3000), (0, 70), (257, 4096), (1, 1), (64, 640)],
}


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("batch_name", GPU_BATCHES)
@pytest.mark.parametrize("gqa_ratio", [1, 4, 8])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_paged_attention_gpu(
    block_size: int, dtype: torch.dtype, gqa_ratio: int, batch_name: str
) -> None:
    batch = make_batch(
        GPU_BATCHES[batch_name],
        block_size=block_size,
        head_dim=128,
        gqa_ratio=gqa_ratio,
        num_kv_heads=8,
        dtype=dtype,
        device="cuda",
    )
    check(batch)  # shape-chosen tiles and splits
    check(batch, num_kv_splits=4)


@requires_cuda
@pytest.mark.gpu
def test_paged_attention_gpu_int64_offsets() -> None:
    # Value-cache offsets past 2**31 elements: 140_000 blocks of 16 x 8 x 128
    # fp16 hold 2.3e9 elements per half (9.2 GB in all). int32 offsets would wrap
    # and read the wrong blocks.
    num_blocks = 140_000
    elements = 2 * num_blocks * 16 * 8 * 128
    free, _ = torch.cuda.mem_get_info()
    if free < elements * 2 + (4 << 30):
        pytest.skip(f"needs {elements * 2 / 1e9 + 4:.1f} GB of free GPU memory")
    assert elements // 2 > 2**31
    batch = make_batch(
        GPU_BATCHES["mixed"],
        block_size=16,
        head_dim=128,
        gqa_ratio=4,
        num_kv_heads=8,
        num_blocks=num_blocks,
        dtype=torch.float16,
        device="cuda",
    )
    check(batch)
    check(batch, num_kv_splits=4)
