"""int4 in the Engine on the real model: the GGUF file's own Q4_1 codes
(``quantization="gguf"``) and int4 quantized at load (``quantization="int4"``)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from llmprod import Engine, SamplingParams
from llmprod.errors import InvalidConfigError
from llmprod.quant import int8
from llmprod.quant.gguf import _unpermute, gguf_file_of, read_gguf
from llmprod.quant.int4 import WeightOnlyInt4Linear
from tests.prompts import CHAT_PROMPTS, TEXT_PROMPTS
from tests.quant.test_engine_int8 import ENGLISH, perplexity


@pytest.fixture(scope="module")
def gguf_engine() -> Iterator[Engine]:
    eng = Engine.from_pretrained(
        "smollm2-135m", quantization="gguf", kv_cache_memory="256MiB"
    )
    yield eng
    eng.close()


def _int4_layers(eng: Engine) -> dict[str, WeightOnlyInt4Linear]:
    return {
        n: m
        for n, m in eng.model.named_modules()
        if isinstance(m, WeightOnlyInt4Linear)
    }


def test_gguf_runs_every_q4_tensor_of_the_file_as_int4(gguf_engine: Engine) -> None:
    layers = _int4_layers(gguf_engine)
    n_layers = gguf_engine.hf_config.num_hidden_layers
    assert len(layers) == 4 * n_layers  # qkv, o, gate_up, down in each layer
    assert gguf_engine.metrics().engine["quantization"] == "gguf"
    assert gguf_engine.quantization_source == "gguf"


def test_gguf_codes_reproduce_gguf_py_dequantization_bit_for_bit(
    gguf_engine: Engine,
) -> None:
    path = gguf_file_of(gguf_engine.model_path)
    assert path is not None
    reader = gguf.GGUFReader(path)
    raw = {t.name: t for t in reader.tensors}
    cfg = gguf_engine.hf_config

    def dequant(name: str) -> torch.Tensor:
        t = raw[name]
        return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))

    for i in (0, cfg.num_hidden_layers - 1):
        layer = gguf_engine.model.model.layers[i]
        q = _unpermute(dequant(f"blk.{i}.attn_q.weight"), cfg.num_attention_heads)
        k = _unpermute(dequant(f"blk.{i}.attn_k.weight"), cfg.num_key_value_heads)
        v = dequant(f"blk.{i}.attn_v.weight")
        got = layer.self_attn.qkv_proj.int4_weight().dequantize()
        assert torch.equal(got, torch.cat([q, k, v]))
        got = layer.mlp.down_proj.int4_weight().dequantize()
        assert torch.equal(got, dequant(f"blk.{i}.ffn_down.weight"))


def test_gguf_weights_take_a_quarter_of_float32(
    engine: Engine, gguf_engine: Engine
) -> None:
    fp32 = int8.linear_weight_bytes(engine.model, skip=int8.DEFAULT_SKIP)
    weights = gguf_engine.metrics().engine["weights_bytes"]
    print(f"linear weights fp32={fp32} int4={weights['int4']}; all: {weights}")
    assert weights["int4"] <= 0.25 * fp32
    # What stays float32 is the embedding (tied to lm_head) and the norms.
    emb = gguf_engine.model.model.embed_tokens.weight
    assert weights["float32"] <= emb.numel() * 4 * 1.01


def test_gguf_perplexity_within_half_a_percent_of_its_float32_expansion(
    engine: Engine, gguf_engine: Engine
) -> None:
    base, q4 = perplexity(engine, ENGLISH), perplexity(gguf_engine, ENGLISH)
    print(f"perplexity float32 expansion={base:.3f} Q4_1 native={q4:.3f} "
          f"({100 * (q4 / base - 1):+.2f}%)")  # fmt: skip
    assert abs(q4 / base - 1) <= 0.005


def _prompts(eng: Engine) -> list[Any]:
    prompts: list[Any] = [eng.tokenizer.encode(p) for p in TEXT_PROMPTS]
    return prompts + [eng.render_chat(m) for m in CHAT_PROMPTS]


@pytest.mark.slow
def test_gguf_greedy_agrees_with_the_float32_expansion(
    engine: Engine, gguf_engine: Engine
) -> None:
    from llmprod.eval.quality import semantic_similarity

    prompts = _prompts(engine)
    params = SamplingParams(max_tokens=24, temperature=0)
    a = engine.generate(prompts, params)
    b = gguf_engine.generate(prompts, params)
    same = [x.token_ids == y.token_ids for x, y in zip(a, b)]
    first = [
        next(
            (j for j, (s, t) in enumerate(zip(x.token_ids, y.token_ids)) if s != t), 24
        )
        for x, y in zip(a, b)
    ]
    sims = semantic_similarity([x.text for x in a], [y.text for y in b])
    print(f"Q4_1 native vs float32 expansion on {len(prompts)} prompts: identical "
          f"{sum(same)}, mean first divergence {np.mean(first):.1f} of 24 tokens, "
          f"mean similarity {np.mean(sims):.3f}")  # fmt: skip
    assert float(np.mean(sims)) >= 0.9


def test_gguf_on_a_model_not_from_a_gguf_file_is_refused(
    engine: Engine, tmp_path: Path
) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    for f in Path(engine.model_path).iterdir():
        if f.name != "llmprod-converted.json":
            (folder / f.name).symlink_to(f)
    with pytest.raises(InvalidConfigError, match="did not come from a GGUF file"):
        Engine.from_pretrained(folder, quantization="gguf")


def test_gguf_with_an_unsupported_tensor_type_fails_before_loading(
    engine: Engine, tmp_path: Path
) -> None:
    bad = tmp_path / "k.gguf"
    writer = gguf.GGUFWriter(str(bad), "llama")
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((2, 144), dtype=np.uint8),
                      raw_dtype=gguf.GGMLQuantizationType.Q4_K)  # fmt: skip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(Path(engine.model_path) / "config.json", folder)  # no weights at all
    (folder / "llmprod-converted.json").write_text(json.dumps({"source": str(bad)}))
    with pytest.raises(InvalidConfigError, match=r"ffn_up\.weight' has type Q4_K") as e:
        Engine.from_pretrained(folder, quantization="gguf")
    assert e.value.field == "quantization"


def test_the_header_reader_reads_the_shipped_file(gguf_engine: Engine) -> None:
    path = gguf_file_of(gguf_engine.model_path)
    assert path is not None
    f = read_gguf(path)
    assert f.architecture == "llama"
    kinds = {t.type_name for t in f.tensors.values()}
    assert kinds == {"Q4_1", "Q8_0", "F32"}


# ------------------------------------------------------------ int4 at load
@pytest.fixture(scope="module")
def int4_engine() -> Iterator[Engine]:
    eng = Engine.from_pretrained(
        "smollm2-135m", quantization="int4", kv_cache_memory="256MiB"
    )
    yield eng
    eng.close()


def test_int4_finds_the_q4_1_grid_of_the_shipped_weights_again(
    engine: Engine, gguf_engine: Engine, int4_engine: Engine
) -> None:
    # The float32 expansion of a Q4_1 file sits on a 16-level grid per group of
    # 32 (each group's minimum and maximum are codes 0 and 15): int4 with groups
    # of 32 must find the same codes, and so the file's quality.
    assert len(_int4_layers(int4_engine)) == 4 * engine.hf_config.num_hidden_layers
    ours = _int4_layers(int4_engine)["model.layers.0.mlp.down_proj"].codes()
    theirs = _int4_layers(gguf_engine)["model.layers.0.mlp.down_proj"].codes()
    assert torch.equal(ours, theirs)
    base, q4 = perplexity(engine, ENGLISH), perplexity(int4_engine, ENGLISH)
    native = perplexity(gguf_engine, ENGLISH)
    print(f"perplexity float32={base:.3f} int4 g32={q4:.3f} "
          f"({100 * (q4 / base - 1):+.2f}%), Q4_1 native={native:.3f}")  # fmt: skip
    assert abs(q4 / native - 1) <= 0.001
    assert abs(q4 / base - 1) <= 0.03


def test_int4_group_size_must_divide_every_layer() -> None:
    with pytest.raises(InvalidConfigError, match=r"group_size=128 does not divide "
                       r"in_features=576 of model\.layers\.0") as e:  # fmt: skip
        Engine.from_pretrained(
            "smollm2-135m", quantization="int4", quantization_group_size=128
        )
    assert e.value.field == "quantization"


def test_int4_group_size_is_validated_with_the_config() -> None:
    with pytest.raises(InvalidConfigError, match="quantization_group_size"):
        Engine.from_pretrained("smollm2-135m", quantization_group_size=48)
