"""A transformers-saved bitsandbytes int8 checkpoint loads into the Engine
(issue: int8 quantization loader), made for real by transformers + bitsandbytes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from llmprod import Engine, SamplingParams
from llmprod.errors import ModelLoadError, UnsupportedModelError
from llmprod.quant import int8
from llmprod.quant.bnb import (
    SOURCE,
    BnbCheckpointError,
    load_bnb_int8_model,
)
from tests.prompts import TEXT_PROMPTS
from tests.quant.test_engine_int8 import ENGLISH, perplexity

WEIGHTS = "model.safetensors"
Q_PROJ = "model.layers.0.self_attn.q_proj"
DOWN_PROJ = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def bnb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 quantized by transformers + bitsandbytes (LLM.int8, CPU backend)
    and written by ``save_pretrained``, with the tokenizer files beside it."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from llmprod.models.registry import resolve_model

    src = resolve_model("smollm2-135m")
    out = tmp_path_factory.mktemp("bnb-int8")
    model = AutoModelForCausalLM.from_pretrained(
        src,
        quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        device_map="cpu",
        dtype=torch.float32,
    )
    model.save_pretrained(out)
    del model
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def bnb_tensors(bnb_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(bnb_dir / WEIGHTS))


@pytest.fixture(scope="module")
def bnb_engine(bnb_dir: Path) -> Iterator[Engine]:
    eng = Engine.from_pretrained(str(bnb_dir), kv_cache_memory="64MiB")
    yield eng
    eng.close()


def variant(
    base: Path,
    dest: Path,
    *,
    config: Callable[[dict[str, Any]], None] | None = None,
    tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A copy of ``base`` with its config and/or tensors changed."""
    dest.mkdir()
    for f in base.iterdir():
        if f.name not in ("config.json", WEIGHTS):
            shutil.copy(f, dest / f.name)
    cfg = json.loads((base / "config.json").read_text())
    if config is not None:
        config(cfg)
    (dest / "config.json").write_text(json.dumps(cfg))
    if tensors is None:
        (dest / WEIGHTS).symlink_to(base / WEIGHTS)
    else:
        from safetensors.torch import save_file

        assert state is not None
        changed = dict(state)
        tensors(changed)
        save_file(changed, str(dest / WEIGHTS), metadata={"format": "pt"})
    return dest


def test_the_checkpoint_is_what_transformers_saves(
    bnb_dir: Path, bnb_tensors: dict[str, torch.Tensor]
) -> None:
    qc = json.loads((bnb_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_8bit"] is True
    assert bnb_tensors[f"{Q_PROJ}.weight"].dtype == torch.int8
    assert bnb_tensors[f"{Q_PROJ}.SCB"].shape == (576,)
    assert int(bnb_tensors[f"{Q_PROJ}.weight_format"]) == 0  # row-major


def test_loads_in_int8_with_the_method_reported(
    bnb_engine: Engine, bnb_tensors: dict[str, torch.Tensor]
) -> None:
    engine_info = bnb_engine.metrics().engine
    assert engine_info["quantization"] == int8.resolve_method("int8", "cpu")
    assert engine_info["quantization_source"] == SOURCE == "bitsandbytes-checkpoint"
    layer = bnb_engine.model.model.layers[0]  # type: ignore[union-attr,index]
    qkv = layer.self_attn.qkv_proj
    assert isinstance(qkv, int8.WeightOnlyInt8Linear)
    # q, k, v rows concatenated as the native model fuses them; scale = SCB / 127.
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert torch.equal(
        qkv.weight, torch.cat([bnb_tensors[f"{n}.weight"] for n in names])
    )
    torch.testing.assert_close(
        qkv.scales, torch.cat([bnb_tensors[f"{n}.SCB"] for n in names]) / 127.0
    )
    assert isinstance(layer.mlp.gate_up_proj, int8.WeightOnlyInt8Linear)
    # Tied embeddings stay tied and in full precision.
    model: Any = bnb_engine.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.float32


def test_linear_weights_take_at_most_028x_of_fp32(
    engine: Engine, bnb_engine: Engine
) -> None:
    fp32 = int8.linear_weight_bytes(engine.model, skip=int8.DEFAULT_SKIP)
    q = int8.linear_weight_bytes(bnb_engine.model, skip=int8.DEFAULT_SKIP)
    print(f"linear weights: fp32 {fp32 / 2**20:.1f} MiB, bnb int8 {q / 2**20:.1f} MiB")
    assert q <= 0.28 * fp32, (q, fp32)
    # No full-precision weight was kept for any quantized layer.
    for name, module in bnb_engine.model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            raise AssertionError(f"{name} left in full precision")


def test_perplexity_and_greedy_answers_close_to_fp32(
    engine: Engine, bnb_engine: Engine
) -> None:
    base, quant = perplexity(engine, ENGLISH), perplexity(bnb_engine, ENGLISH)
    params = SamplingParams(max_tokens=12, temperature=0)
    prompts = TEXT_PROMPTS[:12]
    a = engine.generate(prompts, params)
    b = bnb_engine.generate(prompts, params)
    exact = sum(x.token_ids == y.token_ids for x, y in zip(a, b)) / len(prompts)
    print(
        f"bnb checkpoint: perplexity fp32={base:.3f} int8={quant:.3f} "
        f"({100 * (quant / base - 1):+.2f}%), greedy exact match {exact:.2f}"
    )
    assert abs(quant / base - 1) <= 0.03
    assert exact >= 0.5


def test_int8_bnb_is_honoured_with_the_checkpoint_scb(
    make_engine: Callable[..., Engine],
    bnb_dir: Path,
    bnb_tensors: dict[str, torch.Tensor],
    bnb_engine: Engine,
) -> None:
    eng = make_engine(str(bnb_dir), quantization="int8-bnb", kv_cache_memory="32MiB")
    assert eng.metrics().engine["quantization"] == "int8-bnb"
    assert eng.metrics().engine["quantization_source"] == SOURCE
    down = eng.model.model.layers[0].mlp.down_proj  # type: ignore[union-attr,index]
    assert type(down).__name__ == "Linear8bitLt"
    assert torch.equal(down.weight.SCB, bnb_tensors[f"{DOWN_PROJ}.SCB"])
    assert torch.equal(down.weight.CB, bnb_tensors[f"{DOWN_PROJ}.weight"])
    params = SamplingParams(max_tokens=4, temperature=0)
    out = eng.generate("The capital of France is", params)[0]
    ref = bnb_engine.generate("The capital of France is", params)[0]
    assert out.token_ids[:2] == ref.token_ids[:2], (out.text, ref.text)


def test_int8_wo_is_honoured(bnb_dir: Path) -> None:
    from llmprod.models.loader import load_config

    model, ran = load_bnb_int8_model(
        load_config(bnb_dir), bnb_dir, torch.float32, torch.device("cpu"), "int8-wo"
    )
    assert ran == "int8-wo"
    assert isinstance(model.model.layers[29].mlp.down_proj, int8.WeightOnlyInt8Linear)  # type: ignore[union-attr,index]


def test_4bit_checkpoint_is_refused_naming_the_field(
    bnb_dir: Path, tmp_path: Path
) -> None:
    def four_bit(cfg: dict[str, Any]) -> None:
        qc = cfg["quantization_config"]
        qc.update(load_in_4bit=True, _load_in_4bit=True)
        qc.update(load_in_8bit=False, _load_in_8bit=False)

    folder = variant(bnb_dir, tmp_path / "4bit", config=four_bit)
    with pytest.raises(UnsupportedModelError, match="4-bit") as info:
        Engine.from_pretrained(str(folder))
    assert info.value.field == "quantization_config.load_in_4bit"


def test_other_quantization_methods_are_refused(bnb_dir: Path, tmp_path: Path) -> None:
    def gptq(cfg: dict[str, Any]) -> None:
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}

    folder = variant(bnb_dir, tmp_path / "gptq", config=gptq)
    with pytest.raises(UnsupportedModelError, match="gptq") as info:
        Engine.from_pretrained(str(folder))
    assert info.value.field == "quantization_config.quant_method"


def test_missing_scb_is_a_typed_error_naming_the_tensor(
    bnb_dir: Path, bnb_tensors: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    def drop(t: dict[str, torch.Tensor]) -> None:
        del t[f"{Q_PROJ}.SCB"]

    folder = variant(bnb_dir, tmp_path / "no-scb", tensors=drop, state=bnb_tensors)
    with pytest.raises(BnbCheckpointError, match=r"q_proj\.SCB") as info:
        Engine.from_pretrained(str(folder))
    assert info.value.field == f"{Q_PROJ}.SCB"
    assert isinstance(info.value, int8.QuantizedCheckpointError)
    assert isinstance(info.value, ModelLoadError)


def test_mismatched_scb_is_a_typed_error_naming_the_tensor(
    bnb_dir: Path, bnb_tensors: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    def shorten(t: dict[str, torch.Tensor]) -> None:
        t[f"{DOWN_PROJ}.SCB"] = t[f"{DOWN_PROJ}.SCB"][:-1].clone()

    folder = variant(bnb_dir, tmp_path / "bad-scb", tensors=shorten, state=bnb_tensors)
    with pytest.raises(BnbCheckpointError, match=r"down_proj\.SCB: shape") as info:
        Engine.from_pretrained(str(folder))
    assert info.value.field == f"{DOWN_PROJ}.SCB"


def test_non_row_weight_format_is_refused(
    bnb_dir: Path, bnb_tensors: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    def col32(t: dict[str, torch.Tensor]) -> None:
        t[f"{Q_PROJ}.weight_format"] = torch.tensor(1, dtype=torch.uint8)

    folder = variant(bnb_dir, tmp_path / "col32", tensors=col32, state=bnb_tensors)
    with pytest.raises(BnbCheckpointError, match="col32") as info:
        Engine.from_pretrained(str(folder))
    assert info.value.field == f"{Q_PROJ}.weight_format"


def test_fused_group_with_a_full_precision_shard_loads_in_full_precision(
    bnb_dir: Path, bnb_tensors: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """As ``llm_int8_skip_modules=["k_proj"]`` saves it: k_proj in float32, q/v
    int8; the fused qkv_proj of the native model cannot mix, so it is dequantized."""
    from llmprod.models.loader import load_config

    k_proj = "model.layers.0.self_attn.k_proj"

    def k_in_fp32(t: dict[str, torch.Tensor]) -> None:
        q, scb = t.pop(f"{k_proj}.weight"), t.pop(f"{k_proj}.SCB")
        del t[f"{k_proj}.weight_format"]
        t[f"{k_proj}.weight"] = q.float() * (scb / 127.0)[:, None]

    folder = variant(bnb_dir, tmp_path / "k-fp32", tensors=k_in_fp32, state=bnb_tensors)
    model: Any
    model, _ = load_bnb_int8_model(
        load_config(folder), folder, torch.float32, torch.device("cpu"), "int8-wo"
    )
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert type(qkv) is torch.nn.Linear and qkv.weight.dtype == torch.float32
    q_rows = bnb_tensors[f"{Q_PROJ}.weight"].float()
    q_rows *= (bnb_tensors[f"{Q_PROJ}.SCB"] / 127.0)[:, None]
    torch.testing.assert_close(qkv.weight[:576], q_rows)
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, int8.WeightOnlyInt8Linear)
    assert isinstance(
        model.model.layers[1].self_attn.qkv_proj, int8.WeightOnlyInt8Linear
    )
