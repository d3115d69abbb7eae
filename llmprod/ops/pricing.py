"""Price tables: what one request costs.

A :class:`PriceTable` prices tokens (per 1,000 prompt, cached-prompt and completion
tokens, as hosted APIs do) and compute time (per second of model time, the honest
unit for a self-hosted model). Both parts may be set; the cost is their sum.

>>> table = PriceTable(prompt_per_1k=0.5, completion_per_1k=1.5)
>>> table.cost(prompt_tokens=1000, completion_tokens=2000)
3.5
>>> PriceTable(per_compute_s=0.002, currency="EUR").cost(0, 0, compute_s=10.0)
0.02
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class PriceTable:
    """Prices of one engine's work. The default table is free (all zeros)."""

    prompt_per_1k: float = 0.0
    """Price of 1,000 prompt tokens that were computed (not served from the prefix
    cache)."""
    completion_per_1k: float = 0.0
    """Price of 1,000 generated tokens."""
    cached_prompt_per_1k: float | None = None
    """Price of 1,000 prompt tokens whose KV came from the prefix cache; ``None``
    charges them at ``prompt_per_1k``."""
    per_compute_s: float = 0.0
    """Price of one second of model time (the request's share of each step)."""
    currency: str = "USD"
    """A label only: no conversion is done."""

    def __post_init__(self) -> None:
        for name in ("prompt_per_1k", "completion_per_1k", "per_compute_s"):
            _check_price(name, getattr(self, name))
        if self.cached_prompt_per_1k is not None:
            _check_price("cached_prompt_per_1k", self.cached_prompt_per_1k)
        if not isinstance(self.currency, str) or not self.currency:
            raise ValueError(
                f"currency must be a non-empty string, got {self.currency!r}"
            )

    @property
    def is_free(self) -> bool:
        """True when every price is zero."""
        return (
            self.prompt_per_1k == 0
            and self.completion_per_1k == 0
            and not self.cached_prompt_per_1k
            and self.per_compute_s == 0
        )

    def cost(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        cached_prompt_tokens: int = 0,
        compute_s: float = 0.0,
    ) -> float:
        """Price one request.

        Args:
            prompt_tokens: all prompt tokens, cached ones included (as in
                :class:`llmprod.outputs.Usage`).
            completion_tokens: generated tokens.
            cached_prompt_tokens: the part of ``prompt_tokens`` served from the
                prefix cache, charged at ``cached_prompt_per_1k``.
            compute_s: model time spent on the request, in seconds.

        Returns:
            The cost in ``currency``.

        Raises:
            ValueError: a negative count or time, or more cached tokens than
                prompt tokens.
        """
        if prompt_tokens < 0 or completion_tokens < 0 or cached_prompt_tokens < 0:
            raise ValueError(
                f"token counts must be >= 0, got {prompt_tokens=}, "
                f"{completion_tokens=}, {cached_prompt_tokens=}"
            )
        if cached_prompt_tokens > prompt_tokens:
            raise ValueError(f"{cached_prompt_tokens=} must be <= {prompt_tokens=}")
        if not compute_s >= 0:  # also rejects NaN
            raise ValueError(f"{compute_s=} must be >= 0")
        cached_rate = (
            self.prompt_per_1k
            if self.cached_prompt_per_1k is None
            else self.cached_prompt_per_1k
        )
        tokens = (
            (prompt_tokens - cached_prompt_tokens) * self.prompt_per_1k
            + cached_prompt_tokens * cached_rate
            + completion_tokens * self.completion_per_1k
        ) / 1000.0
        return tokens + compute_s * self.per_compute_s

    def to_dict(self) -> dict[str, Any]:
        """The table as plain values (for logs and ``engine.metrics()``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PriceTable:
        """Build a table from a mapping of field names (e.g. parsed from config).

        Raises:
            ValueError: an unknown field (the message lists the known ones) or a
                bad price.
        """
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown price fields {unknown}; known: {sorted(known)}")
        return cls(**values)


def _check_price(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")


FREE = PriceTable()
"""The all-zero table: what an engine without prices uses."""
