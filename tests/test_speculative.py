"""Speculative decoding (n-gram prompt lookup) on the real model: the same tokens
as without it, stops inside a run of kept guesses, rejection sampling's
distribution, rollback of refused positions, the policy and the counters."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from llmprod import Engine, SamplingParams
from llmprod.errors import InvalidConfigError
from llmprod.exec.speculative import verify_greedy, verify_sampled
from llmprod.sched.speculative import NgramProposer, SpecState, SpeculativeConfig
from tests.helpers import assert_pool_whole

TEXT = (
    "The lighthouse keeper climbed the stairs every evening at six. He lit the "
    "lamp, wound the clock and wrote one line in the log. "
)
# Copying a passage: the case prompt lookup is for (its guesses are mostly kept).
COPY = [{"role": "user", "content": "Repeat this text exactly: " + TEXT * 2}]


@pytest.fixture(scope="module")
def spec_engine() -> Iterator[Engine]:
    eng = Engine.from_pretrained(
        "smollm2-135m",
        kv_cache_memory="128MiB",
        speculative={"num_speculative_tokens": 4},
    )
    yield eng
    assert_pool_whole(eng)
    eng.close()


def _greedy(n: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, **kw)


def test_copying_keeps_most_guesses_and_gives_the_same_tokens(
    engine: Engine, spec_engine: Engine
) -> None:
    want = engine.chat(COPY, _greedy(48))
    got = spec_engine.chat(COPY, _greedy(48))
    assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
    s = got.metrics["speculative"]
    # Several tokens per forward: what makes it faster.
    assert s["acceptance_rate"] > 0.5 and s["mean_accepted_length"] > 2.5, s
    assert s["drafted_tokens"] >= s["accepted_tokens"] > 0
    assert not want.metrics  # no speculation, no counters
    snap = spec_engine.metrics().scheduler["speculative"]
    assert snap["accepted_tokens"] >= s["accepted_tokens"]


@pytest.mark.parametrize(
    "params",
    [
        _greedy(48, stop=["wound the"]),  # a stop string inside a kept run
        _greedy(13),  # max_tokens inside a kept run
        _greedy(40, stop_token_ids=[1169]),  # a stop token ("lamp" piece) if drawn
        _greedy(48, ignore_eos=True),
    ],
    ids=["stop-string", "max-tokens", "stop-token", "ignore-eos"],
)
def test_a_run_of_kept_guesses_ends_at_the_same_token(
    engine: Engine, spec_engine: Engine, params: SamplingParams
) -> None:
    want = engine.chat(COPY, params)
    got = spec_engine.chat(COPY, params)
    assert got.token_ids == want.token_ids
    assert got.text == want.text
    assert (got.finish_reason, got.stop_reason) == (
        want.finish_reason,
        want.stop_reason,
    )


def test_streaming_with_speculation_gives_the_text_token_by_token(
    engine: Engine, spec_engine: Engine
) -> None:
    want = engine.chat(COPY, _greedy(32))
    ids = spec_engine.render_chat(COPY)
    deltas = list(spec_engine.stream(ids, _greedy(32)))
    assert "".join(d.text for d in deltas) == want.text
    assert [t for d in deltas for t in d.token_ids] == want.token_ids
    assert deltas[-1].finish_reason == want.finish_reason


def test_prefix_cache_stays_consistent_after_refused_guesses(
    spec_engine: Engine,
) -> None:
    """Blocks registered in the prefix map hold only kept tokens: a second run of
    the same prompt reuses them and gives the same tokens."""
    prompt = "Count: one two three four five six seven eight nine ten one two"
    first = spec_engine.generate(prompt, _greedy(40))[0]
    again = spec_engine.generate(prompt, _greedy(40))[0]
    assert again.usage.cached_prompt_tokens > 0
    assert again.token_ids == first.token_ids
    # A continuation that starts from the first run's output as its prompt reuses
    # blocks that held guesses in the first run.
    cont = spec_engine.generate(
        list(first.prompt_token_ids) + first.token_ids[:24], _greedy(8)
    )[0]
    plain = Engine.from_pretrained("smollm2-135m", kv_cache_memory="64MiB")
    try:
        ref = plain.generate(
            list(first.prompt_token_ids) + first.token_ids[:24], _greedy(8)
        )[0]
    finally:
        plain.close()
    assert cont.token_ids == ref.token_ids


def test_seeded_sampling_with_speculation_is_reproducible(spec_engine: Engine) -> None:
    p = SamplingParams(max_tokens=32, temperature=0.7, seed=11)
    a = spec_engine.chat(COPY, p)
    b = spec_engine.chat(COPY, p)
    assert a.token_ids == b.token_ids
    assert a.metrics["speculative"]["drafted_tokens"] > 0


def test_requests_that_need_more_than_tokens_do_not_speculate(
    spec_engine: Engine,
) -> None:
    for p in (
        _greedy(16, logprobs=2),
        _greedy(16, repetition_penalty=1.2),
        _greedy(16, min_tokens=16),
    ):
        out = spec_engine.chat(COPY, p)
        assert "speculative" not in out.metrics, p


def test_large_steps_do_not_speculate(spec_engine: Engine) -> None:
    """Above ``max_num_seqs`` running requests the step is bound by computing,
    not by reading the weights: nobody drafts."""
    before = spec_engine.metrics().scheduler["speculative"]["steps"]
    outs = spec_engine.chat([COPY] * 6, _greedy(12))  # type: ignore[arg-type]
    after = spec_engine.metrics().scheduler["speculative"]["steps"]
    assert after == before
    assert all(not o.metrics for o in outs)


def test_a_request_whose_guesses_fail_stops_drafting_for_a_while() -> None:
    cfg = SpeculativeConfig(window=8, min_acceptance=0.5, backoff_steps=5)
    s = SpecState()
    for _ in range(2):
        s.seen_steps += 1
        s.record(4, 0, cfg)
    assert s.paused_until == s.seen_steps + 5
    t = SpecState()
    for _ in range(4):
        t.seen_steps += 1
        t.record(4, 3, cfg)
    assert t.paused_until == 0


def test_ngram_proposer_takes_the_latest_earlier_occurrence() -> None:
    prop = NgramProposer(SpeculativeConfig(prompt_lookup_max=3, prompt_lookup_min=1))
    # "7 8" occurred twice before; the latest is followed by 5 6.
    assert prop.propose([7, 8, 1, 2, 7, 8, 5, 6, 9, 7, 8], 3) == [5, 6, 9]
    assert prop.propose([1, 2, 3, 4], 3) == []  # nothing repeats
    assert prop.propose([5, 1, 2, 5], 2) == [1, 2]  # down to one token
    strict = NgramProposer(SpeculativeConfig(prompt_lookup_max=3, prompt_lookup_min=2))
    assert strict.propose([5, 1, 2, 5], 2) == []


def test_greedy_verification_keeps_the_agreeing_prefix() -> None:
    assert verify_greedy([4, 5, 6, 7], [4, 5, 6]) == [4, 5, 6, 7]  # all kept + bonus
    assert verify_greedy([4, 9, 6, 7], [4, 5, 6]) == [4, 9]  # refused at 2nd
    assert verify_greedy([8, 5, 6, 7], [4, 5, 6]) == [8]


def test_rejection_sampling_draws_from_the_model_distribution() -> None:
    """Whatever the guess, the first kept token is distributed as p itself."""
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    g = torch.Generator().manual_seed(0)
    n = 20000
    for guess in (0, 3):
        counts = Counter(verify_sampled(p, [guess], g)[0] for _ in range(n))
        freq = torch.tensor([counts[t] / n for t in range(4)])
        assert torch.allclose(freq, p[0], atol=0.015), (guess, freq)


def test_speculative_config_errors_name_the_field(make_engine: Any) -> None:
    for bad, name in (
        ({"method": "eagle"}, "speculative.method"),
        ({"num_speculative_tokens": 0}, "speculative.num_speculative_tokens"),
        (
            {"prompt_lookup_min": 4, "prompt_lookup_max": 2},
            "speculative.prompt_lookup_min",
        ),
        ({"k": 3}, "speculative"),
    ):
        with pytest.raises(InvalidConfigError) as err:
            make_engine(speculative=bad)
        assert err.value.field == name, bad


# ------------------------------------------------------------------ draft model
# The draft: the same SmolLM2 in its GGUF file's own 4-bit weights, drafting for
# the float32 model (the same tokenizer; guesses mostly right, each cheaper).
DRAFT = {
    "method": "draft",
    "draft_model": "smollm2-135m",
    "draft_quantization": "gguf",
    "num_speculative_tokens": 4,
}
OPEN = [
    [
        {
            "role": "user",
            "content": "Write a short story about a dragon who learns to cook.",
        }
    ],
    [{"role": "user", "content": "Explain photosynthesis to a child."}],
    COPY,
]


@pytest.fixture(scope="module")
def draft_engine() -> Iterator[Engine]:
    eng = Engine.from_pretrained(
        "smollm2-135m", kv_cache_memory="128MiB", speculative=DRAFT
    )
    yield eng
    assert_pool_whole(eng)
    eng.close()


def test_draft_model_guesses_open_text_and_gives_the_same_tokens(
    engine: Engine, draft_engine: Engine
) -> None:
    for conv in OPEN:
        want = engine.chat(conv, _greedy(40))
        got = draft_engine.chat(conv, _greedy(40))
        assert got.token_ids == want.token_ids, conv
        s = got.metrics["speculative"]
        # Open-ended text too (where prompt lookup finds little): most guesses kept.
        assert s["acceptance_rate"] > 0.5 and s["mean_accepted_length"] > 2.5, s
    report = draft_engine.metrics().engine["draft"]
    assert report["model"] == "smollm2-135m" and report["quantization"] == "gguf"
    assert report["weights_bytes"]["int4"] > 0 and report["forwards"] > 0
    # The copied passage was guessed by prompt lookup first (no draft passes).
    assert report["lookups"] > 0
    assert engine.metrics().engine["draft"] is None


def test_draft_model_without_lookup_first_runs_the_draft_for_every_guess(
    engine: Engine, make_engine: Any
) -> None:
    eng = make_engine(speculative={**DRAFT, "lookup_first": False})
    got = eng.chat(COPY, _greedy(32))
    assert got.token_ids == engine.chat(COPY, _greedy(32)).token_ids
    report = eng.metrics().engine["draft"]
    assert report["lookups"] == 0 and report["forwards"] > 0


def test_draft_model_stops_streams_and_seeds(
    engine: Engine, draft_engine: Engine
) -> None:
    p = _greedy(48, stop=["wound the"])
    want, got = engine.chat(COPY, p), draft_engine.chat(COPY, p)
    assert (got.token_ids, got.text, got.stop_reason) == (
        want.token_ids,
        want.text,
        want.stop_reason,
    )
    deltas = list(draft_engine.stream(draft_engine.render_chat(OPEN[0]), _greedy(24)))
    assert [t for d in deltas for t in d.token_ids] == engine.chat(
        OPEN[0], _greedy(24)
    ).token_ids
    sampled = SamplingParams(max_tokens=24, temperature=0.8, seed=5)
    a, b = draft_engine.chat(OPEN[1], sampled), draft_engine.chat(OPEN[1], sampled)
    assert a.token_ids == b.token_ids and a.metrics["speculative"]["drafted_tokens"] > 0


def test_draft_model_with_a_starved_kv_cache_and_several_requests(
    engine: Engine, make_engine: Any
) -> None:
    """Four requests drafting at once in a pool too small for all of them: some
    are preempted and recomputed, their lanes taken back and rebuilt, and every
    request still gets the tokens of plain decoding."""
    # Three short prompts fill 16 of 18 blocks; growing by 24 tokens each they
    # need 9 more; the long one waits.
    eng = make_engine(
        num_kv_blocks=18,
        block_size=8,
        speculative={**DRAFT, "max_num_seqs": 4},
    )
    short = [engine.render_chat(c) for c in OPEN[:2]]
    prompts = [*short, short[0][:-3], engine.render_chat(COPY)]
    p = _greedy(24, ignore_eos=True)
    outs = eng.generate(prompts, p)
    assert eng.metrics().scheduler["preemptions"] > 0
    assert [o.token_ids for o in outs] == [
        o.token_ids for o in engine.generate(prompts, p)
    ]
    assert eng.metrics().scheduler["speculative"]["accepted_tokens"] > 0


def test_draft_config_errors_name_the_field(make_engine: Any) -> None:
    for bad, name in (
        ({"method": "draft"}, "speculative.draft_model"),
        ({"draft_model": "smollm2-135m"}, "speculative.draft_model"),
        ({**DRAFT, "draft_quantization": "nf4"}, "speculative.draft_quantization"),
        ({**DRAFT, "draft_model": "no-such-model"}, "speculative.draft_model"),
        ({**DRAFT, "lookup_first": "yes"}, "speculative.lookup_first"),
    ):
        with pytest.raises(InvalidConfigError) as err:
            make_engine(speculative=bad)
        assert err.value.field == name, bad


@pytest.mark.slow
def test_a_draft_with_another_tokenizer_is_refused_before_loading(
    make_engine: Any,
) -> None:
    with pytest.raises(InvalidConfigError, match="another tokenizer") as err:
        make_engine(speculative={**DRAFT, "draft_model": "gemma3-270m",
                                 "draft_quantization": None})  # fmt: skip
    assert err.value.field == "speculative.draft_model"


# ------------------------------------------------------- with structured output
RECORD = {
    "type": "object",
    "properties": {
        "keeper": {"type": "string"},
        "time": {"type": "string"},
        "tasks": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    },
    "required": ["keeper", "time", "tasks"],
    "additionalProperties": False,
}
DOC = '{"keeper": "the lighthouse keeper", "time": "six", "tasks": ["lit the lamp", "wound the clock", "wrote one line in the log"]}'
JSON_COPY = [{"role": "user", "content": f"Return this JSON exactly: {DOC}\n{DOC}"}]


def _json_params(**kw: Any) -> SamplingParams:
    from llmprod.structured import StructuredOutputs

    kw.setdefault("temperature", 0)
    return SamplingParams(
        max_tokens=64, structured=StructuredOutputs(json=RECORD), **kw
    )


@pytest.mark.parametrize("which", ["ngram", "draft"])
def test_structured_requests_speculate_under_their_grammar(
    engine: Engine, spec_engine: Engine, draft_engine: Engine, which: str
) -> None:
    import json

    import jsonschema

    pytest.importorskip("llguidance")
    eng = spec_engine if which == "ngram" else draft_engine
    want = engine.chat(JSON_COPY, _json_params())
    got = eng.chat(JSON_COPY, _json_params())
    assert got.token_ids == want.token_ids
    jsonschema.validate(json.loads(got.text), RECORD)
    s = got.metrics["speculative"]
    assert s["accepted_tokens"] > 0, s
    # Sampled, seeded: valid, reproducible.
    sampled = _json_params(temperature=0.9, seed=3)
    a, b = eng.chat(JSON_COPY, sampled), eng.chat(JSON_COPY, sampled)
    assert a.token_ids == b.token_ids
    jsonschema.validate(json.loads(a.text), RECORD)


def test_guesses_the_grammar_forbids_are_refused(engine: Engine) -> None:
    """A guessed run under a grammar: each position masked as the grammar stands
    after the guesses before it; the run stops at the first forbidden guess and
    the matcher is left where it was."""
    pytest.importorskip("llguidance")
    from llmprod.structured import StructuredOutputs
    from llmprod.structured.backend import mask_guessed_run

    grammars = engine.admission.grammars
    assert grammars is not None
    matcher = grammars.matcher(StructuredOutputs(regex=r"[0-9]{3}"))
    tok = engine.tokenizer
    one, two, letter = (tok.convert_tokens_to_ids(t) for t in ("1", "2", "a"))
    logits = torch.zeros(4, engine.vocab_size)
    masked, m = mask_guessed_run(logits, [one, two, letter], matcher)
    assert m == 2 and masked.shape[0] == 3
    assert masked[2, letter] == float("-inf") and masked[2, one] == 0.0
    assert masked[0, letter] == float("-inf")
    # Rolled back: the matcher still expects three digits from the start.
    assert matcher.validate_tokens([one, two, one]) == 3
    # After three digits only the end may follow (row 3 of a three-digit run).
    masked, m = mask_guessed_run(logits, [one, two, one], matcher)
    assert m == 3 and masked[3, one] == float("-inf")
