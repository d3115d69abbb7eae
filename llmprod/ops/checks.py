"""Argument checks shared by the limits and the fair queue.

Booleans are ints in Python; a limit of ``True`` is a mistake, so neither check
takes them.

>>> is_number(0.5), is_number(float("nan")), is_number(True), is_int(3.0)
(True, False, False, False)
"""

from __future__ import annotations

import math
from typing import TypeGuard


def is_number(x: object) -> TypeGuard[int | float]:
    """An int or a float, not a bool and not NaN (infinities pass)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def is_int(x: object) -> TypeGuard[int]:
    """An int, not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)
