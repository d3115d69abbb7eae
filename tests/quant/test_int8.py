"""Tests of llmprod.quant.int8 on small random models (no downloads, CPU)."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from llmprod.quant import int8, runtime
from llmprod.quant.int8 import (
    Int8UnavailableError,
    QuantizedCheckpointError,
    WeightOnlyInt8Linear,
    convert_for_runtime,
    create_quantized_state_dict,
    int8_linear_ref,
    linear_weight_bytes,
    load_quantized,
    quantize_model,
    quantize_per_channel,
    read_quantized_metadata,
    save_quantized,
)

pytestmark = pytest.mark.skipif(
    not int8.is_int8pack_available("cpu"),
    reason="torch lacks a working aten._weight_int8pack_mm on CPU",
)

LLAMA_PROJ = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
SKIP = ("lm_head", "embed_tokens")

# Bound on |out - ref| / (|x| @ |q * scale|^T), elementwise, against the float32
# dequantized reference, from first-order rounding analysis (bf16 unit roundoff
# u = 2**-8). bf16 activations: x, the scales, the GEMM output and the scaled output
# are each rounded to bf16 once (4u on the large-M path, 3u on the fused one); all
# paths add float32 accumulation over K terms (<= K * 2**-24); a bf16 output adds
# its own rounding and, with a bias, the bias cast and the add (3u). The worst-case
# bound is loose: measured maxima over this file's cases are printed in
# docs/quantization.md.
BF16_U = 2**-8


def _tolerance(compute_dtype: torch.dtype, in_dtype: torch.dtype, k: int) -> float:
    tol = k * 2**-24
    if compute_dtype == torch.bfloat16:
        tol += 4 * BF16_U
    if in_dtype == torch.bfloat16:
        tol += 3 * BF16_U
    return tol


def _tiny_llama(seed: int = 0, intermediate: int = 128, layers: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    # The default init (std 0.02, zero-ish biases) is fine; make rows differ in scale
    # so per-channel scales matter.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not model.lm_head:
                rows = module.weight.shape[0]
                module.weight.mul_(torch.logspace(-1, 1, rows)[:, None])
    return model


def _logits(model: nn.Module, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return _tiny_llama()


# --------------------------------------------------------------------------------------
# Quantization math
# --------------------------------------------------------------------------------------


def test_round_trip_error_per_channel() -> None:
    torch.manual_seed(0)
    w = torch.randn(40, 96) * torch.logspace(-4, 2, 40)[:, None]
    w[3] = 0.0  # all-zero row: must not divide by zero
    w[5, 7] = 1e3  # one outlier: only its own row's scale grows
    q, scales = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scales.dtype == torch.float32
    assert int(q.abs().max()) <= 127 and bool(torch.isfinite(scales).all())
    deq = q.float() * scales[:, None]
    err = (w - deq).abs().amax(dim=1)
    # Rounding to the nearest step: at most half a step, plus float32 slack.
    assert bool((err <= scales / 2 * (1 + 1e-5) + 1e-30).all()), err / scales
    nonzero = w.abs().amax(dim=1) > 0
    assert bool((q[nonzero].abs().amax(dim=1) == 127).all())
    assert bool((q[3] == 0).all())
    # The outlier row pays for its outlier; the others keep their fine steps.
    assert float(scales[5]) == pytest.approx(1e3 / 127)
    assert float(scales[4]) < 1e-1


def test_quantize_rejects_bad_weights() -> None:
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_per_channel(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="2-D floating"):
        quantize_per_channel(torch.ones(3, dtype=torch.float32))


# --------------------------------------------------------------------------------------
# int8 matmul vs the float32 reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 7, 64, 300])  # fused up to 31, GEMM after
@pytest.mark.parametrize("shape", [(64, 48), (576, 960)])
@pytest.mark.parametrize("has_bias", [False, True])
def test_int8_linear_vs_ref(
    compute_dtype: torch.dtype,
    in_dtype: torch.dtype,
    num_tokens: int,
    shape: tuple[int, int],
    has_bias: bool,
) -> None:
    k, n = shape
    torch.manual_seed(num_tokens + k)
    q, scales = quantize_per_channel(torch.randn(n, k) * 0.05)
    bias = torch.randn(n) if has_bias else None
    mod = WeightOnlyInt8Linear.from_quantized(
        q, scales, bias, compute_dtype=compute_dtype, large_m_threshold=32
    )
    x = torch.randn(num_tokens, k).to(in_dtype)
    out = mod(x)
    assert out.dtype == in_dtype and out.shape == (num_tokens, n)
    ref = int8_linear_ref(x.float(), q, scales, bias)
    mag = x.float().abs() @ (q.float().abs() * scales[:, None]).t()
    if bias is not None:
        mag = mag + bias.abs()
    tol = _tolerance(compute_dtype, in_dtype, k)
    worst = float(((out.float() - ref).abs() / mag).max())
    assert worst <= tol, f"normalized error {worst:.3e} > {tol:.3e}"


def test_leading_dims_and_misaligned_input() -> None:
    torch.manual_seed(0)
    q, scales = quantize_per_channel(torch.randn(32, 64))
    mod = WeightOnlyInt8Linear.from_quantized(q, scales)
    # A bf16 view starting 2 bytes into its storage: the fused kernel reads it with
    # aligned loads and crashed on such input before it was realigned.
    flat = torch.randn(2 * 3 * 64 + 1).bfloat16()
    x = flat[1:].view(2, 3, 64)
    assert x.data_ptr() % 64 != 0
    out = mod(x)
    assert out.shape == (2, 3, 32)
    ref = int8_linear_ref(x.float(), q, scales)
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=2e-2)


def test_misaligned_weight_is_realigned() -> None:
    torch.manual_seed(0)
    q, scales = quantize_per_channel(torch.randn(32, 64))
    shifted = torch.empty(q.numel() + 1, dtype=torch.int8)[1:].view_as(q)
    shifted.copy_(q)
    mod = WeightOnlyInt8Linear.from_quantized(q, scales)
    mod.weight = shifted  # as if assigned from a memory-mapped file
    out = mod(torch.randn(40, 64))  # rows > 31 took the weight-misalignment crash
    out1 = mod(torch.randn(3, 64))
    assert out.shape == (40, 32) and out1.shape == (3, 32)
    assert mod.weight.data_ptr() % 64 == 0


def test_width_not_multiple_of_16_takes_gemm_path() -> None:
    torch.manual_seed(0)
    q, scales = quantize_per_channel(torch.randn(10, 24))
    mod = WeightOnlyInt8Linear.from_quantized(q, scales)
    assert not mod.uses_fused_kernel
    x = torch.randn(3, 24)
    torch.testing.assert_close(
        mod(x), int8_linear_ref(x, q, scales), atol=0.05, rtol=2e-2
    )


# --------------------------------------------------------------------------------------
# Module swap
# --------------------------------------------------------------------------------------


def test_quantize_model_swaps_linears_and_leaves_skipped(llama: nn.Module) -> None:
    model = copy.deepcopy(llama)
    ref = _logits(model)
    lm_head, embed = model.lm_head, model.model.embed_tokens
    assert quantize_model(model, "auto") == "int8-wo"
    assert model.lm_head is lm_head and type(model.lm_head) is nn.Linear
    assert model.model.embed_tokens is embed
    assert model.lm_head.weight is embed.weight  # tie kept
    for layer in model.model.layers:
        mods = {
            **dict(layer.self_attn.named_children()),
            **dict(layer.mlp.named_children()),
        }
        for proj in LLAMA_PROJ:
            assert isinstance(mods[proj], WeightOnlyInt8Linear), proj
    out = _logits(model)
    # Whole-model sanity check, loose by design (per-layer bounds are tested above):
    # random weights amplify errors; measured 0.042 for this model and seed.
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 0.1, rel


def test_skip_patterns(llama: nn.Module) -> None:
    model = copy.deepcopy(llama)
    quantize_model(
        model, "int8-wo", skip=("lm_head", "mlp.down_proj", "model.layers.0")
    )
    layer0, layer1 = model.model.layers
    assert type(layer0.self_attn.q_proj) is nn.Linear
    assert type(layer0.mlp.gate_proj) is nn.Linear
    assert isinstance(layer1.self_attn.q_proj, WeightOnlyInt8Linear)
    assert type(layer1.mlp.down_proj) is nn.Linear


def test_native_style_names() -> None:
    """The Engine's model: fused qkv/gate_up projections under model.layers[i]."""

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv_proj = nn.Linear(64, 128, bias=False)
            self.o_proj = nn.Linear(64, 64, bias=False)
            self.gate_up_proj = nn.Linear(64, 256, bias=False)
            self.down_proj = nn.Linear(128, 64, bias=False)

    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(100, 64)
            self.layers = nn.ModuleList([Layer(), Layer()])

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Inner()
            self.lm_head = nn.Linear(64, 100, bias=False)

    model = Model()
    quantize_model(model)
    names = {n for n, m in model.named_modules() if isinstance(m, WeightOnlyInt8Linear)}
    expected = {
        f"model.layers.{i}.{p}"
        for i in range(2)
        for p in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    }
    assert names == expected
    assert type(model.lm_head) is nn.Linear


def test_two_steps_equal_quantize_model(llama: nn.Module) -> None:
    reference = copy.deepcopy(llama)
    quantize_model(reference)

    model = copy.deepcopy(llama)
    state = create_quantized_state_dict(model, skip=SKIP)
    assert state["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8
    assert "model.layers.0.mlp.up_proj.scales" in state
    assert "lm_head.scales" not in state
    assert all(
        type(m) is not WeightOnlyInt8Linear for m in model.modules()
    )  # unchanged
    convert_for_runtime(model, "int8-wo", skip=SKIP)
    model.load_state_dict(state, assign=True)
    _assert_same_state(model.state_dict(), reference.state_dict())
    assert torch.equal(_logits(model), _logits(reference))

    # The state_dict= form builds the modules itself.
    other = copy.deepcopy(llama)
    convert_for_runtime(other, "int8-wo", state_dict=state)
    assert torch.equal(_logits(other), _logits(reference))


def test_unknown_method_and_empty_model(llama: nn.Module) -> None:
    with pytest.raises(ValueError, match="unknown int8 method"):
        quantize_model(copy.deepcopy(llama), "int4")
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        quantize_model(nn.Sequential(nn.Embedding(4, 4)))


def test_unavailable_platform(
    llama: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_bnb() -> None:
        raise Int8UnavailableError("bitsandbytes is not installed")

    monkeypatch.setattr(
        runtime, "is_int8pack_available", lambda device_type="cpu": False
    )
    monkeypatch.setattr(runtime, "_import_bnb", no_bnb)
    model = copy.deepcopy(llama)
    with pytest.raises(Int8UnavailableError, match="cannot run on cpu"):
        quantize_model(model, "auto")
    with pytest.raises(Int8UnavailableError, match="_weight_int8pack_mm"):
        quantize_model(model, "int8-wo")
    with pytest.raises(Int8UnavailableError, match="bitsandbytes"):
        quantize_model(model, "int8-bnb")
    assert all(type(m) is not WeightOnlyInt8Linear for m in model.modules())


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "limit"), [(torch.float32, 0.28), (torch.bfloat16, 0.55)]
)
def test_linear_memory_ratio(
    llama: nn.Module, dtype: torch.dtype, limit: float
) -> None:
    model = copy.deepcopy(llama).to(dtype)
    before = linear_weight_bytes(model, skip=SKIP)
    n_params = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n != "lm_head"
    )
    assert before == n_params * dtype.itemsize  # no bias in Llama
    quantize_model(model)
    after = linear_weight_bytes(model, skip=SKIP)
    assert after / before <= limit, after / before
    # Counted: int8 weights, float32 scales and their bf16 copies once used.
    _logits(model)
    assert linear_weight_bytes(model, skip=SKIP) / before <= limit


# --------------------------------------------------------------------------------------
# Save and load
# --------------------------------------------------------------------------------------


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def saved(
    llama: nn.Module, tmp_path_factory: pytest.TempPathFactory
) -> tuple[nn.Module, Path]:
    model = copy.deepcopy(llama)
    quantize_model(model)
    path = tmp_path_factory.mktemp("int8") / "model.int8.safetensors"
    save_quantized(model, path, source="tiny-llama@seed0")
    return model, path


def test_save_load_round_trip_bit_identical(saved: tuple[nn.Module, Path]) -> None:
    model, path = saved
    meta = read_quantized_metadata(path)
    assert meta["method"] == "int8-wo" and meta["format_version"] == "1"
    aliases = json.loads(meta["aliases"])  # the tied pair is stored once
    assert len(aliases) == 1
    assert {*aliases, *aliases.values()} == {
        "lm_head.weight",
        "model.embed_tokens.weight",
    }

    fresh = _tiny_llama(seed=123)  # other random weights, same architecture
    assert load_quantized(fresh, path, source="tiny-llama@seed0") == "int8-wo"
    _assert_same_state(fresh.state_dict(), model.state_dict())
    assert torch.equal(_logits(fresh), _logits(model))

    # Saving the loaded model gives the same tensors and header (safetensors does
    # not keep the header's key order, so the bytes themselves may differ).
    again = path.with_name("again.safetensors")
    save_quantized(fresh, again, source="tiny-llama@seed0")
    assert read_quantized_metadata(again) == meta
    _assert_same_state(_load_tensors(again), _load_tensors(path))


def test_save_from_state_dict_and_load_on_meta(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    state = create_quantized_state_dict(model, skip=())
    save_quantized(state, tmp_path / "m.safetensors")
    quantize_model(model, skip=())
    with torch.device("meta"):
        empty = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    load_quantized(empty, tmp_path / "m.safetensors")
    _assert_same_state(empty.state_dict(), model.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(empty(x), model(x))


def _header_len(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip_payload", "empty"])
def test_corrupt_file_raises(
    saved: tuple[nn.Module, Path], tmp_path: Path, damage: str
) -> None:
    _, path = saved
    data = bytearray(path.read_bytes())
    bad = tmp_path / f"{damage}.safetensors"
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "garbage":
        data = bytearray(b"\x00\x01not a safetensors file" * 10)
    elif damage == "flip_payload":
        data[_header_len(path) + 1000] ^= 0xFF
    else:
        data = bytearray()
    bad.write_bytes(bytes(data))
    target = _tiny_llama(seed=5)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError) as info:
        load_quantized(target, bad)
    assert isinstance(info.value, QuantizedCheckpointError)
    assert str(bad) in str(info.value)
    _assert_same_state(target.state_dict(), before)  # left untouched


def test_foreign_or_future_file_raises(
    tmp_path: Path, saved: tuple[nn.Module, Path]
) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(QuantizedCheckpointError, match="not a llmprod-int8 file"):
        load_quantized(_tiny_llama(), plain)

    _, path = saved
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        names = f.keys()  # safe_open is not iterable itself
        tensors = {k: f.get_tensor(k) for k in names}
    future = tmp_path / "future.safetensors"
    save_file(tensors, str(future), metadata={**meta, "format_version": "99"})
    with pytest.raises(QuantizedCheckpointError, match="format_version '99'"):
        load_quantized(_tiny_llama(), future)


def test_shape_mismatch_raises(saved: tuple[nn.Module, Path]) -> None:
    _, path = saved
    with pytest.raises(
        QuantizedCheckpointError, match=r"shape mismatch .*mlp\.down_proj"
    ):
        load_quantized(_tiny_llama(intermediate=96), path)
    with pytest.raises(QuantizedCheckpointError, match="not in the model"):
        load_quantized(_tiny_llama(layers=1), path)


def test_other_source_raises(saved: tuple[nn.Module, Path]) -> None:
    _, path = saved
    with pytest.raises(QuantizedCheckpointError, match="expected 'other-model'"):
        load_quantized(_tiny_llama(), path, source="other-model")


# --------------------------------------------------------------------------------------
# bitsandbytes (its CPU backend here; the same code path serves CUDA)
# --------------------------------------------------------------------------------------


def test_bnb_path(
    llama: nn.Module, saved: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    model = copy.deepcopy(llama)
    ref = _logits(model)
    assert quantize_model(model, "int8-bnb", threshold=4.0) == "int8-bnb"
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt)
    assert layer.state.threshold == 4.0 and not layer.training
    assert type(model.lm_head) is nn.Linear
    # bitsandbytes also quantizes the activations: measured 0.069 here.
    out = _logits(model)
    assert out.dtype == ref.dtype
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 0.15, rel

    # Same int8 weights and scales as the weight-only path: the files are equal.
    _, wo_path = saved
    path = tmp_path / "bnb.safetensors"
    save_quantized(model, path, source="tiny-llama@seed0")
    with_method = read_quantized_metadata(path)
    assert with_method["method"] == "int8-bnb"
    a = _load_tensors(path)
    b = _load_tensors(wo_path)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)

    # A weight-only file loads into bitsandbytes modules, scales kept exactly.
    fresh = _tiny_llama(seed=9)
    assert load_quantized(fresh, wo_path, method="int8-bnb") == "int8-bnb"
    again = tmp_path / "again.safetensors"
    save_quantized(fresh, again)
    c = _load_tensors(again)
    assert all(torch.equal(c[k], b[k]) for k in b)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
