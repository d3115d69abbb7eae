"""Incremental detokenization and stop strings on the real tokenizer."""

from __future__ import annotations

from typing import Any

import pytest

from llmprod.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(engine: Any) -> Any:
    return engine.tokenizer


def feed(tok: Any, detok: IncrementalDetokenizer, text: str) -> list[str]:
    pieces = []
    for t in tok.encode(text):
        stop = detok.add(t)
        pieces.append(detok.take_delta(final=stop is not None))
        if stop:
            break
    pieces.append(detok.take_delta(final=True))
    return pieces


def test_deltas_concatenate_to_the_full_decode(tokenizer: Any) -> None:
    text = "Héllo wörld — naïve café 😀 done."
    d = IncrementalDetokenizer(tokenizer)
    assert "".join(feed(tokenizer, d, text)) == tokenizer.decode(tokenizer.encode(text))
    # no delta ever carries a broken UTF-8 replacement character
    assert "\ufffd" not in d.text


def test_stop_string_split_across_tokens_is_found_and_never_emitted(
    tokenizer: Any,
) -> None:
    text = "alpha beta STOPWORD gamma"
    ids = tokenizer.encode(text)
    # the stop string spans several tokens
    assert len(tokenizer.encode("STOPWORD")) > 1
    d = IncrementalDetokenizer(tokenizer, stop=("STOPWORD",))
    pieces = feed(tokenizer, d, text)
    assert d.stop_reason == "STOPWORD"
    assert "".join(pieces) == "alpha beta "
    assert all("STOP" not in p for p in pieces)
    assert len(ids) > len(d.token_ids)  # stopped before the end


def test_include_stop_string(tokenizer: Any) -> None:
    d = IncrementalDetokenizer(
        tokenizer, stop=("beta",), include_stop_str_in_output=True
    )
    assert "".join(feed(tokenizer, d, "alpha beta gamma")) == "alpha beta"
