"""Shared fixtures: the real SmolLM2-135M engine (loaded once), its transformers
twin, a factory for engines with special configs, and the block-pool check that
runs after every test."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

# Triton decides interpreter or compiler when it is first imported; without a GPU
# the kernel tests (and the engine's Triton backend tests) need the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llmprod import Engine

MODEL = "smollm2-135m"


def wait_idle(engine: Engine, timeout: float = 30.0) -> None:
    """Wait until the engine holds no request (aborts are processed by its thread)."""
    deadline = time.monotonic() + timeout
    while engine._handles or engine.scheduler.has_work():
        if time.monotonic() > deadline:
            raise AssertionError("engine still busy after the test")
        time.sleep(0.01)


def assert_pool_whole(engine: Engine) -> None:
    wait_idle(engine)
    pool = engine.kv.pool
    assert pool.is_whole(), (
        f"KV pool not whole: {pool.num_free_blocks}/{pool.num_blocks} free, "
        f"held: {[i for i, r in enumerate(pool.ref_counts) if r]}"
    )


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


def hf_greedy(
    model: Any, ids: list[int], max_new_tokens: int
) -> tuple[list[int], list[torch.Tensor]]:
    """transformers generate(do_sample=False): tokens and the logits at each step."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=model.generation_config.pad_token_id,
        )
    return out.sequences[0, len(ids) :].tolist(), [s[0] for s in out.scores]


def first_divergence(
    ours: list[int], ref: list[int], scores: list[torch.Tensor]
) -> tuple[int, float] | None:
    """None if equal; else (position, top-2 logit gap of the reference there)."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            top2 = scores[i].float().topk(2).values
            return i, float(top2[0] - top2[1])
    if len(ours) != len(ref):
        return min(len(ours), len(ref)), float("inf")
    return None
