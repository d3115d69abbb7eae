"""Structured outputs on the real model: JSON Schema, regex, choice and Lark
grammars, valid by construction, in mixed batches, streamed and cached."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import torch

from llmprod import Engine, SamplingParams
from llmprod.answers.keys import sampling_key_fields
from llmprod.errors import InvalidRequestError
from llmprod.structured import StructuredOutputs

pytest.importorskip("llguidance", reason="the llmprod[structured] extra")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"},
        "tags": {
            "type": "array",
            "items": {"enum": ["admin", "user", "guest"]},
            "minItems": 1,
            "maxItems": 3,
        },
        "address": {"$ref": "#/$defs/address"},
    },
    "required": ["name", "age", "email", "tags", "address"],
    "additionalProperties": False,
    "$defs": {
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        }
    },
}


def _json(schema: dict[str, Any], **kw: Any) -> SamplingParams:
    kw.setdefault("max_tokens", 128)
    kw.setdefault("temperature", 0)
    return SamplingParams(structured=StructuredOutputs(json=schema), **kw)


# ----------------------------------------------------------- the parameters
def test_exactly_one_constraint() -> None:
    with pytest.raises(InvalidRequestError, match="exactly one of") as e:
        StructuredOutputs(regex="a", choice=["a"])
    assert e.value.field == "structured"
    with pytest.raises(InvalidRequestError, match="got none"):
        StructuredOutputs()


def test_an_invalid_schema_names_its_path() -> None:
    bad = {"type": "object", "properties": {"a": {"type": "nope"}}}
    with pytest.raises(
        InvalidRequestError, match="invalid schema at properties/a/type"
    ):
        StructuredOutputs(json=bad)
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        StructuredOutputs(json="{nope")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"choice": []}, "at least one"),
        ({"choice": "yes"}, "list of strings"),
        ({"choice": ["a", ""]}, "non-empty strings"),
        ({"regex": ""}, "non-empty string"),
        ({"grammar": "  "}, "non-empty string"),
        ({"json_object": 1}, "exactly one of|True or False"),
    ],
)
def test_bad_constraints_are_refused(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        StructuredOutputs(**kwargs)


def test_sampling_params_take_only_structured_outputs() -> None:
    with pytest.raises(InvalidRequestError, match="structured") as e:
        SamplingParams(structured={"json": {}})  # type: ignore[arg-type]
    assert e.value.field == "structured"


def test_the_constraint_is_part_of_the_answer_cache_key() -> None:
    a = sampling_key_fields(_json({"type": "object"}))
    b = sampling_key_fields(_json({"type": "array"}))
    free = sampling_key_fields(SamplingParams(max_tokens=128, temperature=0))
    assert a["structured"] == {"json": '{"type":"object"}'}
    assert a != b and "structured" not in free  # unconstrained keys as before
    json.dumps(a)  # plain values


def test_a_bad_regex_is_refused_at_submit(engine: Engine) -> None:
    params = SamplingParams(structured=StructuredOutputs(regex="(unclosed"))
    with pytest.raises(InvalidRequestError, match=r"structured regex: .*unclosed") as e:
        engine.generate("x", params)
    assert e.value.field == "structured"


# ------------------------------------------------------------ on the model
def test_json_schema_output_is_valid_and_parsed(engine: Engine) -> None:
    msgs = [{"role": "user", "content": "Describe a user of our shop as JSON."}]
    out = engine.chat(msgs, _json(PERSON))
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), PERSON)
    assert out.parsed == json.loads(out.text)
    assert out.flags["structured"] == {"kind": "json", "complete": True}


def test_mixed_batch_all_valid_and_free_rows_unchanged(engine: Engine) -> None:
    free = SamplingParams(max_tokens=16, temperature=0)
    prompts = ["The capital of France is", "A user record:", "Once upon a time",
               "Inventory item:", "Pick a word:"]  # fmt: skip
    alone = [o.token_ids for o in engine.generate([prompts[0], prompts[2]], free)]
    params = [
        free,
        _json(PERSON),
        free,
        _json(PERSON, temperature=0.9, seed=7),
        SamplingParams(max_tokens=8, temperature=0.7, seed=3,
                       structured=StructuredOutputs(choice=["alpha", "beta"])),
    ]  # fmt: skip
    outs = engine.generate(prompts, params)
    assert [outs[0].token_ids, outs[2].token_ids] == alone
    for o in (outs[1], outs[3]):
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), PERSON)
    assert outs[4].text in ("alpha", "beta")
    # A seeded sampled constrained request draws the same alone and in a batch.
    again = engine.generate(prompts[3], params[3])[0]
    assert again.token_ids == outs[3].token_ids


def test_regex_choice_and_grammar(engine: Engine) -> None:
    lark = r"""
start: "The answer is " NUMBER "."
NUMBER: /[1-9][0-9]{0,2}/
"""
    cases = [
        (StructuredOutputs(regex=r"[A-Z][a-z]{2,8}-\d{3}"), r"[A-Z][a-z]{2,8}-\d{3}"),
        (StructuredOutputs(choice=["red", "green", "blue"]), r"red|green|blue"),
        (StructuredOutputs(grammar=lark), r"The answer is [1-9][0-9]{0,2}\."),
    ]
    import re

    for so, pattern in cases:
        for temperature in (0, 1.0):
            p = SamplingParams(max_tokens=24, temperature=temperature, seed=5,
                               structured=so)  # fmt: skip
            out = engine.generate("Give an answer:", p)[0]
            assert out.finish_reason == "stop", (so.kind, out.text)
            assert re.fullmatch(pattern, out.text), (so.kind, out.text)


def test_json_object_and_an_unfinished_structure(engine: Engine) -> None:
    p = SamplingParams(max_tokens=6, temperature=0,
                       structured=StructuredOutputs(json_object=True))  # fmt: skip
    out = engine.generate("Some JSON:", p)[0]
    assert out.finish_reason == "length"
    assert out.flags["structured"] == {"kind": "json_object", "complete": False}
    assert out.parsed is None
    assert out.text.lstrip().startswith("{")


def test_streaming_a_structured_answer(engine: Engine) -> None:
    deltas = list(engine.stream("A user record:", _json(PERSON)))
    final = deltas[-1].completion
    assert final is not None and final.finish_reason == "stop"
    assert "".join(d.text for d in deltas) == final.text
    jsonschema.validate(final.parsed, PERSON)


def test_the_mask_never_excludes_a_token_of_a_valid_document(engine: Engine) -> None:
    """Forced path: a known-valid document, token by token; at each step the
    mask must allow the document's next token, and EOS only at the end."""
    import llguidance.torch as llt

    doc = {"name": "Ada", "age": 36, "email": "ada@math.com", "tags": ["admin"],
           "address": {"city": "London", "zip": "12345"}}  # fmt: skip
    text = json.dumps(doc)  # the layout the grammar holds outputs to
    grammars = engine.admission.grammars
    assert grammars is not None
    m = grammars.matcher(StructuredOutputs(json=PERSON))
    eos = engine.eos_token_ids[0]
    mask = llt.allocate_token_bitmask(1, engine.vocab_size)
    for tok in engine.tokenizer.encode(text):
        llt.fill_next_token_bitmask(m, mask, 0)
        logits = torch.zeros(1, engine.vocab_size)
        llt.apply_token_bitmask_inplace(logits, mask)
        assert logits[0, tok] == 0, engine.tokenizer.decode([tok])
        assert logits[0, eos] != 0  # not finished yet
        assert m.consume_token(tok)
    assert m.is_accepting()
    llt.fill_next_token_bitmask(m, mask, 0)
    logits = torch.zeros(1, engine.vocab_size)
    llt.apply_token_bitmask_inplace(logits, mask)
    assert logits[0, eos] == 0


def test_structured_answers_are_cached_per_constraint(make_engine: Any) -> None:
    eng = make_engine(cache="memory://")
    p = _json({"type": "object", "properties": {"ok": {"type": "boolean"}},
               "required": ["ok"], "additionalProperties": False})  # fmt: skip
    first = eng.generate("Status:", p)[0]
    eng.answers.exact.flush(10.0)  # stores are queued, written behind
    second = eng.generate("Status:", p)[0]
    assert second.cache_hit is not None and second.text == first.text
    assert second.parsed == first.parsed == json.loads(first.text)
    other = eng.generate("Status:", SamplingParams(max_tokens=128, temperature=0))[0]
    assert other.cache_hit is None
