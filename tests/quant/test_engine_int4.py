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
from llmprod.quant.gguf import _unpermute, gguf_file_of, read_gguf, read_q4
from llmprod.quant.int4 import Int4Weight, WeightOnlyInt4Linear
from llmprod.quant.q8 import Q8Embedding, Q8Head
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
    ours = read_gguf(path).tensors
    cfg = gguf_engine.hf_config

    def dequant(name: str) -> torch.Tensor:
        t = raw[name]
        return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))

    for i in (0, cfg.num_hidden_layers - 1):
        layer = gguf_engine.model.model.layers[i]
        names = [f"blk.{i}.attn_{p}.weight" for p in "qkv"]
        # Our reader of the blocks against gguf-py's dequantization.
        for name in [*names, f"blk.{i}.ffn_down.weight"]:
            assert torch.equal(read_q4(ours[name]).dequantize(), dequant(name)), name
        heads = (cfg.num_attention_heads, cfg.num_key_value_heads, 0)
        parts = [read_q4(ours[n]) for n in names]
        want = [
            Int4Weight(_unpermute(w.q, h), _unpermute(w.scales, h),
                       _unpermute(w.mins, h)) if h else w
            for w, h in zip(parts, heads)
        ]  # fmt: skip
        got = layer.self_attn.qkv_proj.int4_weight()
        # The layer holds the file's codes, in the kernel's layout, and the
        # kernel's bfloat16 copy of the file's scales (the float32 ones are
        # released: the file keeps them).
        assert torch.equal(got.q, torch.cat([w.q for w in want]))
        scales = torch.cat([w.scales for w in want])
        assert torch.equal(got.scales, scales.bfloat16().float())
        down = layer.mlp.down_proj.int4_weight()
        assert torch.equal(down.q, read_q4(ours[f"blk.{i}.ffn_down.weight"]).q)


def test_gguf_holds_the_q8_0_embedding_and_lm_head_in_their_blocks_exactly(
    engine: Engine, gguf_engine: Engine
) -> None:
    emb, head = gguf_engine.model.model.embed_tokens, gguf_engine.model.lm_head
    assert isinstance(emb, Q8Embedding) and isinstance(head, Q8Head)
    assert head.q8 is emb.q8  # tied: one copy
    ref = engine.model.model.embed_tokens.weight.detach()
    assert torch.equal(emb.q8.dequantize(), ref)  # the float32 expansion, bit for bit
    ids = torch.tensor([[0, 5, 49151], [7, 7, 1000]])
    assert torch.equal(emb(ids), torch.nn.functional.embedding(ids, ref))
    hidden = torch.randn(5, ref.shape[1])
    assert torch.allclose(head(hidden), hidden @ ref.t(), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="released its float32 scales"):
        gguf_engine.model.state_dict()


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
