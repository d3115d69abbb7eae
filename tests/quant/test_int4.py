"""The int4 scheme, its layer, and reading GGUF Q4 blocks (no model needed)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llmprod.quant.gguf import (
    GGUFTensor,
    GGUFTypeError,
    check_gguf_types,
    read_gguf,
    read_q4,
)
from llmprod.quant.int4 import (
    Int4Weight,
    WeightOnlyInt4Linear,
    dequantize_int4,
    is_int4pack_available,
    quantize_int4,
)

needs_kernel = pytest.mark.skipif(
    not is_int4pack_available(), reason="aten._weight_int4pack_mm_for_cpu unusable"
)


def _weight(n: int = 48, k: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ the scheme
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantize_int4_codes_and_error(group_size: int) -> None:
    w = _weight()
    q = quantize_int4(w, group_size)
    assert q.q.dtype == torch.uint8 and int(q.q.max()) <= 15
    assert q.scales.shape == (48, 128 // group_size) == q.mins.shape
    assert q.group_size == group_size
    rel = (q.dequantize() - w).norm() / w.norm()
    assert rel < 0.12, rel  # 4 bits per weight on a Gaussian: about 0.06-0.10


def test_the_range_search_never_loses_to_plain_rounding() -> None:
    w = _weight(64, 256, seed=1)
    w[3, 5] = 12.0  # one outlier in one group
    searched = quantize_int4(w, 32)
    lo, hi = w.view(64, 8, 32).amin(-1), w.view(64, 8, 32).amax(-1)
    d = (hi - lo) / 15
    plain_q = torch.round((w.view(64, 8, 32) - lo[..., None]) / d[..., None])
    plain = (plain_q * d[..., None] + lo[..., None]).view(64, 256)
    err_search = ((searched.dequantize() - w) ** 2).view(64, 8, 32).sum(-1)
    err_plain = ((plain - w) ** 2).view(64, 8, 32).sum(-1)
    assert bool((err_search <= err_plain * (1 + 1e-5) + 1e-9).all())
    assert float(err_search.sum()) < float(err_plain.sum())


def test_quantize_int4_refuses_what_it_cannot_hold() -> None:
    with pytest.raises(
        ValueError, match="group_size=64 does not divide in_features=96"
    ):
        quantize_int4(torch.randn(4, 96), 64)
    with pytest.raises(ValueError, match="group_size=16 must be one of"):
        quantize_int4(torch.randn(4, 64), 16)
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_int4(torch.full((4, 64), float("nan")), 32)


# ------------------------------------------------------------------- the layer
def test_the_fallback_layer_is_the_float32_reference_exactly() -> None:
    w = quantize_int4(_weight(), 32)
    bias = torch.randn(48)
    layer = WeightOnlyInt4Linear.from_int4(w, bias, use_kernel=False)
    x = torch.randn(5, 128)
    assert torch.equal(layer(x), x @ w.dequantize().t() + bias)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_the_kernel_layer_matches_the_reference(rows: int) -> None:
    w = quantize_int4(_weight(96, 256), 32)
    layer = WeightOnlyInt4Linear.from_int4(w, use_kernel=True)
    x = torch.randn(rows, 256)
    ref = x @ w.dequantize().t()
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == (rows, 96)
    # bfloat16 activations and scales: about 3 significant digits.
    assert (out - ref).abs().max() <= 0.02 * ref.abs().max()


@needs_kernel
def test_state_dict_gives_back_the_codes_after_packing() -> None:
    w = quantize_int4(_weight(48, 192, seed=3), 64)
    layer = WeightOnlyInt4Linear.from_int4(w, use_kernel=True)
    layer.prepare()  # the codes now live only in the kernel's layout
    assert layer._q is None
    assert torch.equal(layer.codes(), w.q)
    state = layer.state_dict()
    assert state["qweight"].shape == (48, 96)
    fresh = WeightOnlyInt4Linear(192, 48, 64, use_kernel=False)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.codes(), w.q)
    x = torch.randn(2, 192)
    assert torch.equal(fresh(x), x @ w.dequantize().t())


def test_a_layer_the_kernel_cannot_pack_falls_back_exactly() -> None:
    w = quantize_int4(_weight(40, 64), 32)  # 40 rows: the kernel packs 16 at a time
    layer = WeightOnlyInt4Linear.from_int4(w)
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), x @ w.dequantize().t())
    assert layer.uses_kernel is False


def test_a_state_dict_of_the_wrong_shape_is_refused() -> None:
    layer = WeightOnlyInt4Linear(64, 8, 32, use_kernel=False)
    state = layer.state_dict()
    state["qweight"] = torch.zeros(8, 64, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="qweight: expected uint8"):
        layer.load_state_dict(state)


# ---------------------------------------------------------------- GGUF blocks
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_q4_blocks_read_exactly_as_gguf_dequantizes_them(kind: str) -> None:
    qtype = gguf.GGMLQuantizationType[kind]
    x = np.random.default_rng(0).standard_normal((6, 128)).astype(np.float32)
    raw = gguf.quants.quantize(x, qtype)
    tensor = GGUFTensor("w", kind, (128, 6), raw)
    w = read_q4(tensor)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    assert torch.equal(w.dequantize(), expected)
    if kind == "Q4_0":  # the minimum is -8 scales
        assert torch.equal(w.mins, -8 * w.scales)


def _write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, str]]) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_token_list(["a", "b", "c"])  # a string array to skip over
    for name, (data, kind) in tensors.items():
        qtype = gguf.GGMLQuantizationType[kind]
        raw = data if kind == "F32" else gguf.quants.quantize(data, qtype)
        writer.add_tensor(name, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_the_header_reader_agrees_with_gguf_py(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path = tmp_path / "m.gguf"
    _write_gguf(path, {
        "blk.0.attn_q.weight": (rng.standard_normal((8, 64)).astype(np.float32), "Q4_1"),
        "blk.0.attn_k.weight": (rng.standard_normal((4, 64)).astype(np.float32), "Q4_0"),
        "blk.0.attn_norm.weight": (rng.standard_normal(64).astype(np.float32), "F32"),
    })  # fmt: skip
    mine = read_gguf(path)
    theirs = gguf.GGUFReader(path)
    assert mine.architecture == "llama"
    assert sorted(mine.tensors) == sorted(t.name for t in theirs.tensors)
    for t in theirs.tensors:
        m = mine.tensors[t.name]
        assert m.type_name == t.tensor_type.name
        assert np.asarray(m.data).tobytes() == np.asarray(t.data).tobytes()
    assert check_gguf_types(path) == {"Q4_1": 1, "Q4_0": 1, "F32": 1}


def test_an_unsupported_tensor_type_is_named(tmp_path: Path) -> None:
    path = tmp_path / "k.gguf"
    raw = np.zeros((2, 144), dtype=np.uint8)  # two rows of one Q4_K super-block
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor(
        "blk.0.ffn_up.weight", raw, raw_dtype=gguf.GGMLQuantizationType.Q4_K
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFTypeError, match=r"'blk\.0\.ffn_up\.weight' has type Q4_K"):
        check_gguf_types(path)


def test_dequantize_int4_is_a_multiply_then_an_add() -> None:
    q = torch.tensor([[0, 15, 7, 8]], dtype=torch.uint8)
    out = dequantize_int4(q, torch.tensor([[0.5, 2.0]]), torch.tensor([[-1.0, 3.0]]))
    assert out.tolist() == [[-1.0, 6.5, 17.0, 19.0]]
    assert isinstance(
        Int4Weight(q, torch.ones(1, 1), torch.zeros(1, 1)).group_size, int
    )
