"""int8 in the Engine on the real model: memory, perplexity, agreement with fp32,
quantize once and reuse (issue: int8 quantization loader)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from llmprod import Engine, SamplingParams, quant
from llmprod.quant import int8
from tests.prompts import CHAT_PROMPTS, PARAGRAPH, TEXT_PROMPTS

ENGLISH = (
    "The river rose slowly through the night, and by morning the low fields were "
    "under water. Farmers moved their animals to the hills, and the school closed "
    "for a week. When the water fell, people came back to clean their houses and "
    "count what they had lost. " + PARAGRAPH
)


@pytest.fixture(scope="module")
def int8_engine(engine: Engine) -> Any:
    eng = Engine.from_pretrained(
        "smollm2-135m", quantization="int8", kv_cache_memory="256MiB"
    )
    yield eng
    eng.close()


def perplexity(eng: Engine, text: str) -> float:
    out = eng.generate(
        text, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    )[0]
    lps = [e.logprob for e in out.prompt_logprobs[1:]]  # type: ignore[union-attr]
    return math.exp(-float(np.mean(lps)))


def test_linear_weights_take_at_most_028x_of_fp32(
    engine: Engine, int8_engine: Any
) -> None:
    fp32 = int8.linear_weight_bytes(engine.model, skip=int8.DEFAULT_SKIP)
    q = int8.linear_weight_bytes(int8_engine.model, skip=int8.DEFAULT_SKIP)
    assert q <= 0.28 * fp32, (q, fp32)
    assert int8_engine.metrics().engine["quantization"] in ("int8-wo", "int8-bnb")


def test_perplexity_within_two_percent_of_fp32(
    engine: Engine, int8_engine: Any
) -> None:
    base, quant = perplexity(engine, ENGLISH), perplexity(int8_engine, ENGLISH)
    print(
        f"perplexity fp32={base:.3f} int8={quant:.3f} ({100 * (quant / base - 1):+.2f}%)"
    )
    assert abs(quant / base - 1) <= 0.02


@pytest.mark.slow
def test_greedy_answers_agree_with_fp32(engine: Engine, int8_engine: Any) -> None:
    from llmprod.eval.quality import semantic_similarity

    prompts: list[Any] = [engine.tokenizer.encode(p) for p in TEXT_PROMPTS]
    prompts += [engine.render_chat(m) for m in CHAT_PROMPTS]
    prompts += [engine.tokenizer.encode(f"Write one sentence about topic number {i}.")
                for i in range(32 - len(prompts))]  # fmt: skip
    assert len(prompts) == 32
    params = SamplingParams(max_tokens=24, temperature=0)
    a = engine.generate(prompts, params)
    b = int8_engine.generate(prompts, params)
    exact = np.mean([x.token_ids == y.token_ids for x, y in zip(a, b)])
    sims = semantic_similarity([x.text for x in a], [y.text for y in b])
    print(
        f"int8 vs fp32 on 32 prompts: exact match {exact:.2f}, mean similarity {np.mean(sims):.3f}"
    )
    assert float(np.mean(sims)) >= 0.9


def test_second_load_reuses_the_saved_int8_weights(
    int8_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_quantizing(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("quantized again")

    monkeypatch.setattr(quant, "quantize_model", no_quantizing)
    eng = Engine.from_pretrained(
        "smollm2-135m", quantization="int8", kv_cache_memory="64MiB"
    )
    try:
        p = SamplingParams(max_tokens=8, temperature=0)
        assert (
            eng.generate("Reuse", p)[0].token_ids
            == int8_engine.generate("Reuse", p)[0].token_ids
        )
    finally:
        eng.close()


def test_lm_head_in_int8_when_asked(engine: Engine, make_engine: Any) -> None:
    """quantization_skip=["embed_tokens"] quantizes the (tied) lm_head as well: the
    embedding stays full precision, perplexity stays within 2% of fp32."""
    eng = make_engine(
        "smollm2-135m",
        quantization="int8",
        quantization_skip=["embed_tokens"],
        kv_cache_memory="256MiB",
    )
    assert isinstance(eng.model.lm_head, int8.WeightOnlyInt8Linear)
    assert eng.model.model.embed_tokens.weight.dtype == torch.float32
    assert not isinstance(engine.model.lm_head, int8.WeightOnlyInt8Linear)
    ref = perplexity(engine, ENGLISH)
    assert abs(perplexity(eng, ENGLISH) - ref) / ref <= 0.02


def test_quantization_skip_must_be_names() -> None:
    from llmprod.errors import InvalidConfigError

    with pytest.raises(InvalidConfigError) as info:
        Engine.from_pretrained("smollm2-135m", quantization_skip="lm_head")
    assert info.value.field == "quantization_skip"
