"""The generic path: transformers' own modeling code over the paged KV cache.

Tiny random-weight models of several architectures (configs built here, no
downloads) and the real Gemma 3 270M, each against transformers'
``generate(do_sample=False)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from llmprod import Engine, SamplingParams
from llmprod.errors import UnsupportedModelError
from llmprod.layers.linear import packing_available
from tests.factories import VOCAB, save_tiny, tiny_config
from tests.helpers import assert_pool_whole, first_divergence, hf_greedy
from tests.prompts import PARAGRAPH, TEXT_PROMPTS

TIE_GAP = 1e-3  # as in the Engine core's equality tests

# Every prompt is longer than WINDOW; the last one spans several KV blocks.
TINY_PROMPTS = [[5, 17, 300, 42] * k for k in (3, 5, 9)] + [list(range(100, 180))]


@pytest.mark.parametrize(
    "arch",
    ["llama", "qwen2", "mistral-sliding", "phi3", "gpt2", "opt", "gemma2", "gemma3"],
)
def test_tiny_model_greedy_equals_transformers_on_generic_path(
    arch: str, tmp_path: Path, engine: Engine, make_engine: Any
) -> None:
    from transformers import AutoModelForCausalLM

    path = save_tiny(arch, tmp_path, engine.model_path, config=tiny_config(arch))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # A small token budget chunks the long prompt: later chunks attend to keys
    # already in the cache, through the window.
    tiny = make_engine(
        str(path),
        model_impl="generic",
        num_kv_blocks=64,
        block_size=16,
        max_num_batched_tokens=48,
        max_num_seqs=4,
    )
    assert tiny.metrics().engine["model_impl"] == "generic"
    outs = tiny.generate(
        TINY_PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    )
    for p, o in zip(TINY_PROMPTS, outs):
        ref, scores = hf_greedy(hf, p, 12)
        hf_len = len(ref)  # transformers stops at EOS; compare that prefix
        assert first_divergence(o.token_ids[:hf_len], ref, scores) is None, arch


def test_native_path_honours_sliding_window(
    tmp_path: Path, engine: Engine, make_engine: Any
) -> None:
    """Mistral with a window shorter than the prompts, on the native path."""
    from transformers import AutoModelForCausalLM

    path = save_tiny(
        "mistral-sliding", tmp_path, engine.model_path, tiny_config("mistral-sliding")
    )
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tiny = make_engine(
        str(path), num_kv_blocks=64, max_num_batched_tokens=48, max_num_seqs=4
    )
    assert tiny.metrics().engine["model_impl"] == "native"
    outs = tiny.generate(
        TINY_PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    )
    for p, o in zip(TINY_PROMPTS, outs):
        ref, scores = hf_greedy(hf, p, 12)
        assert first_divergence(o.token_ids[: len(ref)], ref, scores) is None


def test_model_impl_auto_picks_native_where_it_exists(
    tmp_path: Path, engine: Engine, make_engine: Any
) -> None:
    assert engine.metrics().engine["model_impl"] == "native"
    path = save_tiny("gpt2", tmp_path, engine.model_path, tiny_config("gpt2"))
    tiny = make_engine(str(path), num_kv_blocks=16)
    assert tiny.model_impl == "generic"
    with pytest.raises(UnsupportedModelError, match=r"GPT2LMHeadModel.*native"):
        Engine.from_pretrained(str(path), model_impl="native")


def test_state_space_model_is_refused(tmp_path: Path, engine: Engine) -> None:
    import transformers as tf

    cfg = tf.MambaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4
    )
    path = save_tiny("mamba", tmp_path, engine.model_path, config=cfg)
    with pytest.raises(UnsupportedModelError, match="linear_attention"):
        Engine.from_pretrained(str(path), num_kv_blocks=4)


def test_layer_bypassing_the_attention_interface_is_refused(
    tmp_path: Path, engine: Engine
) -> None:
    """A layer that never calls transformers' attention interface would never
    fill its cache; the load-time check refuses the model. (The bypassing layer
    is a stand-in module: no shipped architecture we can build does this.)"""
    from torch import nn
    from transformers import AutoModelForCausalLM

    from llmprod.models.generic import (
        ATTN_IMPLEMENTATION,
        GenericForCausalLM,
        _smoke_test,
        register_attention,
    )

    class OwnAttention(nn.Module):
        def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> Any:
            return torch.zeros_like(hidden_states), None

    path = save_tiny("qwen2", tmp_path, engine.model_path, config=tiny_config("qwen2"))
    register_attention()
    hf = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=ATTN_IMPLEMENTATION
    )
    hf.model.layers[1].self_attn = OwnAttention()
    with pytest.raises(UnsupportedModelError, match="attention 1 times for 2 layers"):
        _smoke_test(GenericForCausalLM(hf), torch.device("cpu"), torch.float32)


def test_bad_model_impl_names_the_field() -> None:
    from llmprod.errors import InvalidConfigError

    with pytest.raises(InvalidConfigError, match="model_impl") as info:
        Engine.from_pretrained("smollm2-135m", model_impl="fast")
    assert info.value.field == "model_impl"


# ---------------------------------------------------------------------------
# Gemma 3 270M: the second real model
# ---------------------------------------------------------------------------

GEMMA_MAX_NEW = 20


@pytest.fixture(scope="module")
def gemma() -> Iterator[Engine]:
    eng = Engine.from_pretrained("gemma3-270m", kv_cache_memory="384MiB")
    yield eng
    try:
        assert_pool_whole(eng)
    finally:
        eng.close()


@pytest.fixture(scope="module")
def gemma_hf(gemma: Engine) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        gemma.model_path, dtype=torch.float32
    ).eval()


def check_tie_rule(outs: list[Any], refs: list[Any]) -> None:
    ties = []
    for i, (out, (ref, scores)) in enumerate(zip(outs, refs)):
        d = first_divergence(out.token_ids[: len(ref)], ref, scores)
        if d is not None:
            pos, gap = d
            assert gap < TIE_GAP, f"prompt {i}: token {pos} differs, gap {gap:.2e}"
            ties.append(i)
    assert len(ties) <= 1, f"more than one numerical tie: prompts {ties}"


@pytest.mark.slow
def test_gemma3_greedy_equals_transformers(gemma: Engine, gemma_hf: Any) -> None:
    window = gemma.hf_config.sliding_window
    ids = [gemma.tokenizer.encode(p) for p in TEXT_PROMPTS[:10] + TEXT_PROMPTS[-3:]]
    assert len(ids) >= 12
    assert sum(len(p) > window for p in ids) >= 2, [len(p) for p in ids]
    assert gemma.metrics().engine["model_impl"] == "generic"
    outs = gemma.generate(ids, SamplingParams(max_tokens=GEMMA_MAX_NEW, temperature=0))
    refs = [hf_greedy(gemma_hf, p, GEMMA_MAX_NEW) for p in ids]
    check_tie_rule(outs, refs)


@pytest.mark.slow
def test_gemma3_chunked_prefill_past_the_window(
    gemma: Engine, gemma_hf: Any, make_engine: Any
) -> None:
    """Prompts over the 512-token window, prefilled in 128-token chunks, so later
    chunks read the window from the paged cache."""
    chunked = make_engine(
        "gemma3-270m", kv_cache_memory="128MiB", max_num_batched_tokens=128
    )
    ids = [gemma.tokenizer.encode(PARAGRAPH * n + "Next,") for n in (9, 14)]
    assert min(len(p) for p in ids) > gemma.hf_config.sliding_window
    outs = chunked.generate(
        ids, SamplingParams(max_tokens=GEMMA_MAX_NEW, temperature=0)
    )
    check_tie_rule(outs, [hf_greedy(gemma_hf, p, GEMMA_MAX_NEW) for p in ids])


def test_int8_on_the_generic_path(
    tmp_path: Path, engine: Engine, make_engine: Any, monkeypatch: Any
) -> None:
    """int8 quantizes the generic model's linears, saves them apart from the native
    path's, and reloads them without quantizing again."""
    from llmprod.quant import int8

    monkeypatch.setenv("LLMPROD_CACHE_DIR", str(tmp_path / "cache"))
    path = save_tiny("qwen2", tmp_path, engine.model_path, config=tiny_config("qwen2"))
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    first = make_engine(str(path), model_impl="generic", quantization="int8-wo")
    q_proj = first.model.hf_model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, int8.WeightOnlyInt8Linear)
    saved = list((tmp_path / "cache" / "quantized").glob("*-generic-*.safetensors"))
    assert len(saved) == 1
    calls: list[Any] = []
    # The engine's loader calls llmprod.quant.quantize_model: patch it there.
    import llmprod.quant

    monkeypatch.setattr(
        llmprod.quant, "quantize_model", lambda *a, **k: calls.append(a)
    )
    again = make_engine(str(path), model_impl="generic", quantization="int8-wo")
    assert calls == []  # reloaded, not quantized again
    assert [o.token_ids for o in again.generate(TINY_PROMPTS, sp)] == [
        o.token_ids for o in first.generate(TINY_PROMPTS, sp)
    ]


@pytest.mark.slow
def test_smollm2_on_the_generic_path_equals_transformers(
    engine: Engine, hf_model: Any, make_engine: Any
) -> None:
    """The real SmolLM2 through transformers' own Llama code and paged attention."""
    generic = make_engine(
        "smollm2-135m", model_impl="generic", kv_cache_memory="256MiB"
    )
    # transformers' q/k/v/o/gate/up/down run with packed oneDNN weights too.
    if packing_available() and generic.linear_backend == "onednn":
        assert generic.metrics().engine["packed_linears"] == 7 * 30
    ids = [engine.tokenizer.encode(p) for p in TEXT_PROMPTS[:6] + TEXT_PROMPTS[-2:]]
    outs = generic.generate(ids, SamplingParams(max_tokens=16, temperature=0))
    check_tie_rule(outs, [hf_greedy(hf_model, p, 16) for p in ids])


def test_generation_config_eos_tokens_end_generation(
    tmp_path: Path, engine: Engine, make_engine: Any
) -> None:
    """End-of-turn tokens listed only in generation_config.json stop generation,
    as they stop transformers' generate."""
    import json

    path = save_tiny("qwen2", tmp_path, engine.model_path, tiny_config("qwen2"))
    tiny = make_engine(str(path), num_kv_blocks=16)
    free = tiny.generate([[5, 17, 300]], SamplingParams(max_tokens=6, temperature=0))[0]
    stop_at = free.token_ids[2]
    gen = json.loads((path / "generation_config.json").read_text())
    gen["eos_token_id"] = [gen.get("eos_token_id") or 0, stop_at]
    (path / "generation_config.json").write_text(json.dumps(gen))
    again = make_engine(str(path), num_kv_blocks=16)
    assert stop_at in again.eos_token_ids
    out = again.generate([[5, 17, 300]], SamplingParams(max_tokens=6, temperature=0))[0]
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop_at) + 1]
    assert out.finish_reason == "stop"
