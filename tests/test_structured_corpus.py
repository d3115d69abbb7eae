"""160 real-world JSON Schemas (SchemaStore, tests/data/schemastore/SOURCE.md)
on the real model: every finished output is valid against its schema.

SmolLM2-135M fills these configuration-file schemas with optional fields for
as long as it is let: within 160 tokens 34 of 160 documents closed (the rest
were cut, each a prefix of a valid document). The grammar guarantees what is
finished, not that the model finishes.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from llmprod import Engine, SamplingParams
from llmprod.structured import StructuredOutputs

pytest.importorskip("llguidance", reason="the llmprod[structured] extra")

DATA = Path(__file__).parent / "data" / "schemastore"
MAX_TOKENS = 96


def _corpus() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(DATA.glob("*.json"))]


def test_the_corpus_is_there_and_cited() -> None:
    corpus = _corpus()
    assert len(corpus) >= 150
    assert "Apache License 2.0" in (DATA / "SOURCE.md").read_text()
    for entry in corpus:
        jsonschema.validators.validator_for(entry["schema"]).check_schema(
            entry["schema"]
        )


@pytest.mark.slow
def test_every_finished_output_is_valid(engine: Engine) -> None:
    corpus = _corpus()
    grammars = engine.admission.grammars
    assert grammars is not None
    compile_ms = []
    for entry in corpus:  # compile times, on a fresh grammar cache
        t = time.perf_counter()
        grammars.matcher(StructuredOutputs(json=entry["schema"]))
        compile_ms.append(1000 * (time.perf_counter() - t))
    prompts = [
        engine.render_chat([{"role": "user", "content":
            f"Write a short example {e['name']} document as JSON."}])
        for e in corpus
    ]  # fmt: skip
    params = [
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                       structured=StructuredOutputs(json=e["schema"]))
        for e in corpus
    ]  # fmt: skip
    outs = engine.generate(prompts, params)
    finished = [(e, o) for e, o in zip(corpus, outs) if o.finish_reason == "stop"]
    for entry, out in finished:
        jsonschema.validate(out.parsed, entry["schema"])
        assert out.parsed == json.loads(out.text)
    cut = [e["name"] for e, o in zip(corpus, outs) if o.finish_reason == "length"]
    compile_ms.sort()
    print(f"{len(corpus)} schemas: {len(finished)} finished and valid, "
          f"{len(cut)} cut at {MAX_TOKENS} tokens ({', '.join(cut[:8])}...); "
          f"compile p50 {statistics.median(compile_ms):.1f} ms, "
          f"p99 {compile_ms[int(0.99 * (len(compile_ms) - 1))]:.1f} ms")  # fmt: skip
    for o in outs:
        assert o.flags["structured"]["complete"] == (o.finish_reason == "stop")
    assert finished, "no document closed within the token budget"
