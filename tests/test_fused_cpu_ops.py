"""The fused CPU operations (llmprod.layers.cpu) against the torch operations
they replace, and the engine's choice to run them."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import llmprod.layers.cpu as cpu
from llmprod import Engine, InvalidConfigError, SamplingParams
from llmprod.layers.attention.reference import paged_attention_ref, store_kv_ref

ops = cpu.fused_ops()
needs_ops = pytest.mark.skipif(ops is None, reason="no C compiler here")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@needs_ops
@pytest.mark.parametrize("delta_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_matches_torch(
    delta_dtype: torch.dtype | None, out_dtype: torch.dtype
) -> None:
    assert ops is not None
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 100, generator=g) * 4  # 100: not a multiple of 16
    weight = torch.randn(100, generator=g)
    wide = torch.randn(5, 300, generator=g)
    delta = None if delta_dtype is None else wide[:, 50:150].to(delta_dtype)
    expect_h = hidden if delta is None else hidden + delta.float()
    expect = F.rms_norm(expect_h, (100,), weight, 1e-5)
    h = hidden.clone()
    out = ops.add_rms_norm(h, delta, weight, 1e-5, out_dtype)
    assert torch.equal(h, expect_h)  # the residual stream, updated in place
    assert out.dtype == out_dtype
    tol = 1e-6 if out_dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.float(), expect, rtol=tol, atol=tol)


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_torch(dtype: torch.dtype) -> None:
    assert ops is not None
    gate_up = (
        torch.randn(3, 2 * 72, generator=torch.Generator().manual_seed(1)) * 6
    ).to(dtype)
    gate, up = gate_up.float().chunk(2, dim=-1)
    expect = F.silu(gate) * up
    out = ops.silu_mul(gate_up, dtype)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.float(), expect, rtol=tol, atol=tol)


@needs_ops
def test_rope_is_bit_equal_to_torch() -> None:
    assert ops is not None
    g = torch.Generator().manual_seed(2)
    fused = torch.randn(4, 7 * 16 + 5, generator=g)  # q and k heads, then more
    x = fused[:, : 7 * 16].view(4, 7, 16)  # rows strided as in the fused qkv
    cos = torch.randn(4, 1, 16, generator=g)
    sin = torch.randn(4, 1, 16, generator=g)
    expect = x * cos + _rotate_half(x) * sin
    tail = fused[:, 7 * 16 :].clone()
    ops.rope(x, cos, sin)
    assert torch.equal(x, expect)
    assert torch.equal(fused[:, 7 * 16 :], tail)


@needs_ops
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2)])
def test_paged_decode_matches_the_reference(
    window: int | None, heads: int, kv_heads: int
) -> None:
    assert ops is not None
    g = torch.Generator().manual_seed(3)
    block_size, head_dim, num_blocks = 4, 16, 24
    lens = [1, 6, 13]  # context after this step's token, per sequence
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g)
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    tables = perm[: 3 * 5].view(3, 5).contiguous()
    slots = torch.tensor(
        [int(tables[s, (n - 1) // block_size]) * block_size + (n - 1) % block_size
         for s, n in enumerate(lens)]
    )  # fmt: skip
    qkv = torch.randn(3, (heads + 2 * kv_heads) * head_dim, generator=g)
    q = qkv[:, : heads * head_dim].view(3, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(3, kv_heads, -1)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(3, kv_heads, head_dim)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    expect_cache = cache.clone()
    store_kv_ref(k, v, expect_cache, slots)
    expect = paged_attention_ref(
        q, expect_cache, tables, seq_lens, torch.arange(4, dtype=torch.int32), 0.3,
        window,
    )  # fmt: skip
    out = ops.paged_decode(q, k, v, cache, slots, tables, seq_lens, 0.3, window)
    assert torch.equal(cache, expect_cache)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def test_no_compiler_falls_back_to_torch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A fresh cache and a compiler that is not there: nothing to load, said once.
    monkeypatch.setenv("LLMPROD_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(cpu, "_tried", False)
    monkeypatch.setattr(cpu, "_loaded", None)
    with caplog.at_level(logging.WARNING, logger="llmprod"):
        assert cpu.fused_ops() is None
        assert cpu.fused_ops() is None
    said = [r for r in caplog.records if "fused CPU operations" in r.getMessage()]
    assert len(said) == 1
    assert "no-such-cc" in said[0].getMessage()
    model = torch.nn.Linear(2, 2)
    model.fused_ops = None  # type: ignore[assignment]
    device = torch.device("cpu")
    assert not cpu.attach_fused_ops(model, "auto", "torch", device, torch.float32)
    with pytest.raises(ValueError, match="could not be built here"):
        cpu.attach_fused_ops(model, "on", "torch", device, torch.float32)


@needs_ops
def test_engine_runs_them_and_off_gives_the_same_tokens(
    engine: Engine, make_engine: Any
) -> None:
    assert engine.fused_cpu_ops
    assert engine.metrics().engine["fused_cpu_ops"] is True
    off = make_engine(fused_ops="off")
    assert off.metrics().engine["fused_cpu_ops"] is False
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    sp = SamplingParams(max_tokens=24, temperature=0)
    # A mixed step too: three decodes beside a prefill chunk.
    for a, b in zip(engine.generate(prompts, sp), off.generate(prompts, sp)):
        assert a.token_ids == b.token_ids


def test_on_where_they_cannot_run_is_a_config_error(make_engine: Any) -> None:
    with pytest.raises(InvalidConfigError) as err:
        make_engine(fused_ops="on", dtype="bfloat16")
    assert err.value.field == "fused_ops"
    assert "bfloat16" in str(err.value)


@needs_ops
@pytest.mark.parametrize(("rows", "k"), [(1, 576), (3, 40)])  # 40: a scalar tail
def test_int8_linear_matches_the_float64_product(rows: int, k: int) -> None:
    assert ops is not None
    g = torch.Generator().manual_seed(4)
    w = torch.randint(-127, 128, (300, k), dtype=torch.int8, generator=g)
    scales = torch.rand(300, generator=g) + 0.01
    x = torch.randn(rows, k, generator=g)
    expect = x.double() @ (w.double() * scales.double()[:, None]).t()
    out = ops.int8_linear(x, w, scales)
    # float32 sums of k terms: within k * 2^-24 of the sum of |terms|.
    terms = x.double().abs() @ (w.double().abs() * scales.double()[:, None]).t()
    assert ((out.double() - expect).abs() <= k * 2.0**-24 * terms + 1e-30).all()
