"""Canonical JSON: equal documents give equal bytes in every process (for hashing)."""

from __future__ import annotations

import json
from typing import Any


def canonical_json(doc: Any) -> bytes:
    """Return the canonical JSON encoding of ``doc`` used for hashing.

    Keys are sorted, there is no whitespace, non-ASCII is escaped, and NaN or
    infinity raise, so equal documents give equal bytes in every process.

    Args:
        doc: JSON-able values (dicts with ``str`` keys, lists, numbers, strings).

    Returns:
        The UTF-8 bytes.

    Raises:
        TypeError: ``doc`` holds something JSON cannot encode.
        ValueError: ``doc`` holds NaN or infinity.
    """
    return json.dumps(
        doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")
