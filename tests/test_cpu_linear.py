"""oneDNN linear layers on CPU: same results as nn.Linear, same module state."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmprod.errors import InvalidConfigError
from llmprod.layers.linear import (
    OneDNNLinear,
    bf16_hardware,
    onednn_available,
    pack_onednn_linears,
    packing_available,
    padded_rows,
    resolve_linear_backend,
    use_onednn_linears,
)
from llmprod.quant.int8 import WeightOnlyInt8Linear, quantize_per_channel

needs_onednn = pytest.mark.skipif(
    not onednn_available(), reason="this PyTorch has no oneDNN linear"
)


@needs_onednn
@pytest.mark.parametrize(
    ("lead", "in_f", "out_f", "bias"),
    [
        ((1,), 576, 960, False),
        ((7,), 40, 24, True),
        ((2, 5), 64, 49, True),
        ((17,), 48, 40, False),  # padded to 24 rows
        ((3, 199), 32, 16, True),  # 597 rows, padded to 640
    ],
)
def test_onednn_linear_matches_nn_linear(
    lead: tuple[int, ...], in_f: int, out_f: int, bias: bool
) -> None:
    torch.manual_seed(0)
    ref = nn.Linear(in_f, out_f, bias=bias)
    x = torch.randn(*lead, in_f)
    want = ref(x)
    use_onednn_linears(ref)
    assert type(ref) is OneDNNLinear
    with torch.inference_mode():
        got = ref(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # A strided input (a column slice) gives the same rows.
    wide = torch.randn(*lead, in_f + 3)
    with torch.inference_mode():
        torch.testing.assert_close(
            ref(wide[..., 3:]),
            F.linear(wide[..., 3:], ref.weight, ref.bias),
            rtol=1e-5,
            atol=1e-5,
        )


@pytest.mark.skipif(
    not packing_available(torch.bfloat16), reason="no oneDNN bfloat16 packing here"
)
@pytest.mark.parametrize("rows", [1, 5, 40, 300])
def test_bfloat16_layers_pack_and_match_a_float32_product_of_their_values(
    rows: int,
) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(576, 960, bias=True).to(torch.bfloat16)
    x = torch.randn(rows, 576).to(torch.bfloat16)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    use_onednn_linears(layer)
    assert pack_onednn_linears(layer) == 1 and layer.is_packed
    with torch.inference_mode():
        got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 960)
    # The same values multiplied in float32, then rounded once to bfloat16: the
    # packed product accumulates in float32 and rounds its output once.
    want = F.linear(x.float(), w.float(), b.float())
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=2**-7)
    assert torch.equal(layer.state_dict()["weight"], w)


def test_row_buckets_bound_the_number_of_shapes() -> None:
    # oneDNN keeps a kernel, with memory of its own, per problem shape: every row
    # count from 1 to 2048 must map to few shapes, never to fewer rows than asked,
    # and to few extra rows: none up to 16, at most 7 up to 128, 31 up to 512.
    buckets = {padded_rows(m) for m in range(1, 2049)}
    assert len(buckets) <= 60
    for m in range(1, 2049):
        p = padded_rows(m)
        slack = 0 if m <= 16 else 7 if m <= 128 else 31 if m <= 512 else 127
        assert m <= p <= m + slack and padded_rows(p) == p


@needs_onednn
def test_switching_keeps_parameters_ties_and_other_layers() -> None:
    emb = nn.Embedding(50, 16)
    head = nn.Linear(16, 50, bias=False)
    head.weight = emb.weight
    proj = nn.Linear(16, 16)
    proj.shard_sizes = [8, 8]  # type: ignore[assignment]
    q, s = quantize_per_channel(torch.randn(32, 16))
    model = nn.ModuleDict(
        {
            "emb": emb,
            "head": head,
            "proj": proj,
            "bf16": nn.Linear(16, 16).to(torch.bfloat16),
            "fp16": nn.Linear(16, 16).to(torch.float16),
            "int8": WeightOnlyInt8Linear.from_quantized(q, s),
        }
    )
    keys = dict(model.state_dict())
    assert use_onednn_linears(model) == 3
    assert type(model["head"]) is OneDNNLinear and type(model["proj"]) is OneDNNLinear
    assert type(model["bf16"]) is OneDNNLinear
    assert type(model["fp16"]) is nn.Linear  # other dtypes stay with torch
    assert type(model["int8"]) is WeightOnlyInt8Linear
    assert model["head"].weight is emb.weight  # still tied
    assert model["proj"].shard_sizes == [8, 8]
    after = model.state_dict()
    assert after.keys() == keys.keys()
    assert all(after[k] is keys[k] or torch.equal(after[k], keys[k]) for k in keys)


needs_packing = pytest.mark.skipif(
    not packing_available(), reason="this PyTorch cannot pack oneDNN weights"
)


@needs_packing
def test_packed_weights_compute_the_same_and_keep_the_state_dict() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(50, 64)
    head = nn.Linear(64, 50, bias=False)
    head.weight = emb.weight  # tied: the embedding reads it as a plain tensor
    model = nn.ModuleDict(
        {
            "emb": emb,
            "head": head,
            "up": nn.Linear(64, 96, bias=True),
            "down": nn.Linear(96, 64, bias=False),
            "kept": nn.Linear(64, 64),
        }
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xs = {rows: torch.randn(rows, 64) for rows in (1, 3, 8, 40, 300)}
    with torch.inference_mode():
        want = {r: model["down"](model["up"](x)) for r, x in xs.items()}
    use_onednn_linears(model)
    assert pack_onednn_linears(model, exclude=(model["kept"],)) == 2
    assert model["up"].is_packed and model["down"].is_packed
    assert not model["head"].is_packed and model["head"].weight is emb.weight
    assert not model["kept"].is_packed
    assert model["up"].weight.shape == (96, 64)
    with torch.inference_mode():
        for r, x in xs.items():
            got = model["down"](model["up"](x))
            torch.testing.assert_close(got, want[r], rtol=1e-5, atol=1e-5)
    # The state dict is the plain one, value for value.
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert not after[k].is_mkldnn and torch.equal(after[k], v), k
    # Loading plain weights into packed layers lays the new values out again.
    new = {k: v * 2 for k, v in before.items()}
    model.load_state_dict(new)
    assert model["up"].is_packed
    with torch.inference_mode():
        torch.testing.assert_close(
            model["up"](xs[8]), F.linear(xs[8], new["up.weight"], new["up.bias"])
        )
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict({**new, "up.weight": torch.zeros(3, 3)})
    assert model["up"].is_packed  # still usable after the refused load
    assert pack_onednn_linears(model) == 1  # only "kept" was left


@needs_onednn
def test_training_mode_falls_back_to_autograd() -> None:
    layer = nn.Linear(8, 4)
    use_onednn_linears(layer)
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()  # oneDNN's op has no backward; F.linear does
    assert x.grad is not None and layer.weight.grad is not None


def test_backend_resolution() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_linear_backend("torch", cpu, torch.float32) == "torch"
    assert resolve_linear_backend("auto", cuda, torch.float32) == "torch"
    # bfloat16 through oneDNN only where the CPU has bf16 instructions.
    bf16 = "onednn" if bf16_hardware() and onednn_available(torch.bfloat16) else "torch"
    assert resolve_linear_backend("auto", cpu, torch.bfloat16) == bf16
    assert resolve_linear_backend("auto", cpu, torch.float16) == "torch"
    with pytest.raises(ValueError, match="float32 or bfloat16 on CPU"):
        resolve_linear_backend("onednn", cpu, torch.float16)
    with pytest.raises(ValueError, match="linear_backend"):
        resolve_linear_backend("mkl", cpu, torch.float32)


@needs_onednn
def test_auto_keeps_mkl_for_float32_on_intel_cpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The vendor is faked: the rule is what is checked, on whatever CPU runs it.
    import platform

    import llmprod.layers.linear as linear

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the oneDNN choice is made on x86-64 only")
    cpu = torch.device("cpu")
    monkeypatch.setattr(linear, "cpu_vendor", lambda: "GenuineIntel")
    assert resolve_linear_backend("auto", cpu, torch.float32) == "torch"
    assert resolve_linear_backend("onednn", cpu, torch.float32) == "onednn"
    # Speculative steps verify several rows, where packed oneDNN is faster.
    assert resolve_linear_backend("auto", cpu, torch.float32, True) == "onednn"
    monkeypatch.setattr(linear, "cpu_vendor", lambda: "AuthenticAMD")
    assert resolve_linear_backend("auto", cpu, torch.float32) == "onednn"


def test_cpu_vendor_reads_the_cpu() -> None:
    from llmprod.layers.linear import cpu_vendor

    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        assert cpu_vendor() == ""
        return
    if "vendor_id" in text:
        assert cpu_vendor() and cpu_vendor() in text
    else:  # e.g. an ARM CPU
        assert cpu_vendor() == ""


def test_engine_reports_and_validates_its_linear_backend(
    engine: Any, make_engine: Any
) -> None:
    assert engine.linear_backend in ("onednn", "torch")
    assert engine.metrics().engine["linear_backend"] == engine.linear_backend
    kinds = {type(m) for m in engine.model.modules() if isinstance(m, nn.Linear)}
    want = OneDNNLinear if engine.linear_backend == "onednn" else nn.Linear
    assert kinds == {want}
    # On oneDNN the 30 layers' 4 (fused) projections are packed, not lm_head.
    packed = engine.metrics().engine["packed_linears"]
    if engine.linear_backend == "onednn" and packing_available():
        assert packed == 4 * engine.hf_config.num_hidden_layers
        assert not engine.model.lm_head.is_packed
    else:
        assert packed == 0
    with pytest.raises(InvalidConfigError) as err:
        make_engine(linear_backend="blas")
    assert err.value.field == "linear_backend"
    with pytest.raises(InvalidConfigError) as err:
        make_engine(linear_backend="onednn", dtype="float16")
    assert err.value.field == "linear_backend"
