"""PriceTable: validation and the cost of one request."""

from __future__ import annotations

import math

import pytest

from llmprod.ops.pricing import FREE, PriceTable


def test_token_prices_per_thousand() -> None:
    table = PriceTable(prompt_per_1k=0.5, completion_per_1k=1.5)
    # 1200 prompt tokens at 0.5/1K + 300 completion tokens at 1.5/1K
    assert table.cost(1200, 300) == pytest.approx(0.6 + 0.45)


def test_cached_prompt_tokens_have_their_own_price() -> None:
    table = PriceTable(
        prompt_per_1k=1.0, completion_per_1k=2.0, cached_prompt_per_1k=0.1
    )
    # 1000 prompt tokens, 800 of them from the prefix cache: 200 x 1.0 + 800 x 0.1
    assert table.cost(1000, 0, cached_prompt_tokens=800) == pytest.approx(0.2 + 0.08)


def test_cached_tokens_default_to_the_prompt_price() -> None:
    table = PriceTable(prompt_per_1k=1.0)
    assert table.cost(1000, 0, cached_prompt_tokens=800) == pytest.approx(1.0)


def test_compute_seconds_for_self_hosted_models() -> None:
    table = PriceTable(per_compute_s=0.002, currency="EUR")
    assert table.cost(5000, 5000, compute_s=12.5) == pytest.approx(0.025)
    assert table.currency == "EUR"


def test_token_and_compute_prices_add_up() -> None:
    table = PriceTable(prompt_per_1k=1.0, per_compute_s=0.5)
    assert table.cost(1000, 0, compute_s=2.0) == pytest.approx(2.0)


def test_free_table_costs_nothing() -> None:
    assert FREE.is_free
    assert FREE.cost(10_000, 10_000, 5_000, 100.0) == 0.0
    assert not PriceTable(per_compute_s=1e-6).is_free


@pytest.mark.parametrize(
    "field",
    ["prompt_per_1k", "completion_per_1k", "cached_prompt_per_1k", "per_compute_s"],
)
@pytest.mark.parametrize("bad", [-0.01, math.inf, math.nan, "1", True])
def test_bad_prices_raise_naming_the_field(field: str, bad: object) -> None:
    with pytest.raises(ValueError, match=field):
        PriceTable(**{field: bad})  # type: ignore[arg-type]


def test_empty_currency_raises() -> None:
    with pytest.raises(ValueError, match="currency"):
        PriceTable(currency="")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((-1, 0, 0, 0.0), "prompt_tokens"),
        ((0, -1, 0, 0.0), "completion_tokens"),
        ((10, 0, 11, 0.0), "cached_prompt_tokens"),
        ((0, 0, 0, -1.0), "compute_s"),
        ((0, 0, 0, math.nan), "compute_s"),
    ],
)
def test_bad_counts_raise(args: tuple[int, int, int, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PriceTable(prompt_per_1k=1.0).cost(*args)


def test_frozen_and_round_trips_through_a_dict() -> None:
    table = PriceTable(prompt_per_1k=0.3, completion_per_1k=0.6, currency="GBP")
    with pytest.raises(AttributeError):
        table.prompt_per_1k = 1.0  # type: ignore[misc]
    assert PriceTable.from_dict(table.to_dict()) == table
    with pytest.raises(ValueError, match="unknown price fields"):
        PriceTable.from_dict({"prompt_per_1M": 1.0})
