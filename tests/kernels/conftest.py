"""Kernel tests run in Triton's interpreter on CPU and natively on a CUDA GPU.

Triton picks interpreter or compiler when a ``@triton.jit`` function is defined,
its own library's included, so without CUDA ``TRITON_INTERPRET`` is set here, at
import, before any test module imports triton or ``llmprod.kernels``.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    if "triton" in sys.modules:
        # Triton's own library functions were defined for the compiler already;
        # switching now would leave them uncallable from interpreted kernels.
        raise RuntimeError(
            "triton was imported before tests/kernels/conftest.py could set "
            "TRITON_INTERPRET=1; run with TRITON_INTERPRET=1 in the environment"
        )
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    """Seed every generator the tests draw from, for each test on its own."""
    random.seed(0)
    torch.manual_seed(0)
    yield
