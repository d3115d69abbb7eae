"""SamplingParams validation: each bad value names its field and the range."""

from __future__ import annotations

import math

import pytest

from llmprod import SamplingParams
from llmprod.errors import InvalidRequestError

BAD = [
    ("temperature", -0.1, "temperature"),
    ("temperature", math.nan, "temperature"),
    ("top_p", 0.0, "[1e-08, 1]"),
    ("top_p", 1.5, "[1e-08, 1]"),  # transformers accepts this; we do not
    ("top_p", 1e-300, "[1e-08, 1]"),  # would keep the top token alone anyway
    ("top_k", -2, "top_k"),
    ("max_tokens", 0, ">= 1"),
    ("logprobs", 21, "[0, 20]"),
    ("prompt_logprobs", -1, "[0, 20]"),
    ("repetition_penalty", 0.0, "[0.01, 100.0]"),
    ("repetition_penalty", 1e-300, "[0.01, 100.0]"),  # logits would overflow
    ("temperature", True, "temperature"),  # a bool is not a number
    ("ignore_eos", "yes", "True or False"),
    ("skip_special_tokens", 1, "True or False"),
    ("stop", 5, "str"),
    ("stop", ["\ud800"], "Unicode"),
    ("stop_token_ids", 7, "list of int"),
    ("seed", 2**64, "2**64"),  # beyond what a generator takes
    ("seed", -(2**63) - 1, "-2**63"),
    ("stop", [""], "non-empty"),
    ("stop_token_ids", ["x"], "int"),
    ("seed", 1.5, "integer"),
]


@pytest.mark.parametrize(
    ("name", "value", "limit"), BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD]
)
def test_invalid_values_raise_value_error_naming_field(
    name: str, value: object, limit: str
) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**{name: value})  # type: ignore[arg-type]
    assert isinstance(info.value, InvalidRequestError)
    assert info.value.field == name
    assert name in str(info.value) and limit in str(info.value)


def test_min_tokens_above_max_tokens_names_both() -> None:
    with pytest.raises(ValueError, match=r"min_tokens=9.*max_tokens=4"):
        SamplingParams(min_tokens=9, max_tokens=4)


def test_seed_range_ends_are_accepted() -> None:
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1
    assert SamplingParams(seed=-(2**63)).seed == -(2**63)


def test_tiny_temperatures_sample_greedily() -> None:
    # Dividing logits by 1e-46 overflows to inf and NaN probabilities.
    assert SamplingParams(temperature=1e-46).is_greedy
    assert SamplingParams(temperature=0.99e-5).is_greedy
    assert not SamplingParams(temperature=1e-5).is_greedy


def test_normalisation_and_flags() -> None:
    p = SamplingParams(stop="END", top_k=-1, temperature=0)
    assert p.stop == ("END",) and p.top_k is None
    assert p.is_greedy and p.is_deterministic
    assert SamplingParams(temperature=0.7, seed=3).is_deterministic
    assert not SamplingParams(temperature=0.7).is_deterministic
    assert p.to_dict()["stop"] == ["END"]
