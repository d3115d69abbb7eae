"""The correctness anchor: greedy output equals transformers'
generate(do_sample=False) token for token, whatever else is in the batch."""

from __future__ import annotations

from typing import Any

import pytest

from llmprod import Engine, SamplingParams
from llmprod.layers.linear import onednn_available
from tests.helpers import first_divergence, hf_greedy
from tests.prompts import CHAT_PROMPTS, TEXT_PROMPTS, TOKEN_PROMPTS

MAX_NEW = 24
TIE_GAP = 1e-3  # top-2 logit gap under which the reference itself is a coin flip


@pytest.fixture(scope="session")
def prompt_ids(engine: Engine) -> list[list[int]]:
    ids = [engine.tokenizer.encode(p) for p in TEXT_PROMPTS]
    ids += [engine.render_chat(m) for m in CHAT_PROMPTS]
    ids += [list(t) for t in TOKEN_PROMPTS]
    return ids


@pytest.fixture(scope="session")
def references(
    hf_model: Any, prompt_ids: list[list[int]]
) -> list[tuple[list[int], list[Any]]]:
    # Vary the lengths so some end on EOS and others run to the limit.
    return [hf_greedy(hf_model, ids, MAX_NEW) for ids in prompt_ids]


def check_against_reference(outs: list[Any], references: list[Any]) -> None:
    ties = []
    for i, (out, (ref, scores)) in enumerate(zip(outs, references)):
        d = first_divergence(out.token_ids, ref, scores)
        if d is not None:
            pos, gap = d
            assert gap < TIE_GAP, (
                f"prompt {i}: token {pos} differs ({out.token_ids[pos : pos + 3]} vs "
                f"{ref[pos : pos + 3]}) and the reference top-2 gap {gap:.2e} is no tie"
            )
            ties.append(i)
    assert len(ties) <= 1, f"more than one numerical tie: prompts {ties}"


def test_prompts_cover_the_promised_range(prompt_ids: list[list[int]]) -> None:
    lengths = sorted(len(p) for p in prompt_ids)
    assert len(prompt_ids) >= 24
    assert lengths[0] == 1 and 900 <= lengths[-1] <= 1100, lengths


@pytest.mark.slow
def test_batched_greedy_equals_transformers(
    engine: Engine, prompt_ids: list[list[int]], references: list[Any]
) -> None:
    outs = engine.generate(
        prompt_ids, SamplingParams(max_tokens=MAX_NEW, temperature=0)
    )
    check_against_reference(outs, references)
    assert engine.metrics().scheduler["steps"] > 0


@pytest.mark.slow
def test_greedy_equal_under_preemption(
    make_engine: Any, prompt_ids: list[list[int]], references: list[Any]
) -> None:
    # 80 blocks x 16 = 1280 token slots for ~3,600 prompt tokens: requests must
    # be preempted and recomputed, and still give the same tokens.
    small = make_engine(
        num_kv_blocks=80, block_size=16, max_num_batched_tokens=512, dtype="float32"
    )
    outs = small.generate(prompt_ids, SamplingParams(max_tokens=MAX_NEW, temperature=0))
    check_against_reference(outs, references)
    assert small.metrics().scheduler["preemptions"] > 0


def test_single_greedy_request_equals_transformers(
    engine: Engine, hf_model: Any
) -> None:
    ids = engine.tokenizer.encode("The capital of France is")
    ref, scores = hf_greedy(hf_model, ids, 16)
    out = engine.generate(ids, SamplingParams(max_tokens=16, temperature=0))[0]
    assert first_divergence(out.token_ids, ref, scores) is None


@pytest.mark.slow
def test_greedy_equal_with_each_linear_backend(
    make_engine: Any,
    engine: Engine,
    prompt_ids: list[list[int]],
    references: list[Any],
) -> None:
    # The shared engine takes the default ("auto": oneDNN on x86-64 CPUs but
    # Intel's, for float32); this one takes the other path, so both stay
    # anchored to transformers.
    other = "torch" if engine.linear_backend == "onednn" else "onednn"
    if other == "onednn" and not onednn_available():
        pytest.skip("oneDNN linears do not run here")
    alt = make_engine(linear_backend=other)
    assert alt.linear_backend == other
    outs = alt.generate(prompt_ids, SamplingParams(max_tokens=MAX_NEW, temperature=0))
    check_against_reference(outs, references)


# Speculating in every step here (max_num_seqs=64), not only in small ones: by
# prompt lookup, and by a draft model (the same SmolLM2 in its GGUF file's 4-bit
# weights, prompt lookup first, the default).
SPECULATIVE = {
    "ngram": {"num_speculative_tokens": 4, "max_num_seqs": 64},
    "draft": {
        "method": "draft",
        "draft_model": "smollm2-135m",
        "draft_quantization": "gguf",
        "max_num_seqs": 64,
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(SPECULATIVE))
def test_greedy_equal_with_speculative_decoding(
    method: str,
    make_engine: Any,
    prompt_ids: list[list[int]],
    references: list[Any],
) -> None:
    """Speculation in a mixed batch and alone: the same tokens as transformers,
    with guesses actually made and kept."""
    spec = make_engine(dtype="float32", speculative=SPECULATIVE[method])
    p = SamplingParams(max_tokens=MAX_NEW, temperature=0)
    check_against_reference(spec.generate(prompt_ids, p), references)
    alone = [spec.generate(ids, p)[0] for ids in prompt_ids[::3]]
    check_against_reference(alone, references[::3])
    stats = spec.metrics().scheduler["speculative"]
    assert stats["steps"] > 0 and stats["accepted_tokens"] > 0, stats
