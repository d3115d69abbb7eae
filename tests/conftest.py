"""Shared fixtures: the real SmolLM2-135M engine (loaded once), its transformers
twin, a factory for engines with special configs, and the block-pool check that
runs after every test. Helpers that test modules call live in tests/helpers.py."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

# Triton decides interpreter or compiler when it is first imported; without a GPU
# the kernel tests (and the engine's Triton backend tests) need the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llmprod import Engine
from tests.helpers import (
    assert_pool_whole,
    first_divergence,
    hf_greedy,
    wait_idle,
)

# Re-exported for test modules that still import them from here.
__all__ = ["assert_pool_whole", "first_divergence", "hf_greedy", "wait_idle"]

MODEL = "smollm2-135m"


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """The default engine on the real model, shared by the whole session."""
    eng = Engine.from_pretrained(MODEL, dtype="float32", seed=0)
    yield eng
    eng.close()


@pytest.fixture(autouse=True)
def _pool_whole_after_test(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "engine" in request.fixturenames:
        assert_pool_whole(request.getfixturevalue("engine"))


@pytest.fixture
def make_engine() -> Iterator[Callable[..., Engine]]:
    """Build engines with special configs; each is checked whole and closed."""
    made: list[Engine] = []

    def make(model: str = MODEL, **kwargs: Any) -> Engine:
        eng = Engine.from_pretrained(model, **kwargs)
        made.append(eng)
        return eng

    yield make
    try:
        for eng in made:
            if not eng.is_closed:
                assert_pool_whole(eng)
    finally:
        for eng in made:
            eng.close()


@pytest.fixture(scope="session")
def hf_model(engine: Engine) -> Any:
    """transformers' own model on the same weights (the correctness reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(engine.model_path, dtype=torch.float32)
    model.eval()
    return model


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-long",
        action="store_true",
        default=False,
        help="run tests/test_chaos.py with ten times as many requests",
    )
