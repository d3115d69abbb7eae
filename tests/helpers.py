"""Helpers shared by the test modules: waiting for an engine to go idle, the
block-pool check, greedy equality against transformers, and a sampler with a
fault injected."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import pytest

    from llmprod import Engine
    from llmprod.outputs import Delta
    from llmprod.sched.request import Request


def wait_idle(engine: Engine, timeout: float = 30.0) -> None:
    """Wait until the engine holds no request (aborts are processed by its thread)."""
    deadline = time.monotonic() + timeout
    while not engine.core.is_idle():
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


def drain(stream: Iterable[Delta]) -> tuple[list[Delta], BaseException | None]:
    """Every delta of a stream, and the exception that ended it (or None)."""
    deltas: list[Delta] = []
    try:
        for d in stream:
            deltas.append(d)
    except Exception as exc:
        return deltas, exc
    return deltas, None


class EndingsSpy:
    """Records, on an engine's output processor, every request it made a handle
    for (``made``) and every last item it delivered (``finals``: request id ->
    items), to check that each request ends exactly once."""

    def __init__(self, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.made: list[str] = []
        self.finals: dict[str, list[Any]] = {}
        self._lock = threading.Lock()
        output = engine.output
        make_handle, deliver = output.make_handle, output._deliver

        def spy_make(req: Request, sink: Any, streaming: bool) -> Any:
            with self._lock:
                self.made.append(req.request_id)
            return make_handle(req, sink, streaming)

        def spy_deliver(h: Any, item: Any) -> None:
            with self._lock:
                self.finals.setdefault(h.request.request_id, []).append(item)
            deliver(h, item)

        monkeypatch.setattr(output, "make_handle", spy_make)
        monkeypatch.setattr(output, "_deliver", spy_deliver)


class SamplerWithFault:
    """The engine's sampler with a fault injected (no real input makes the
    sampler raise on demand): it samples, or draws the race noise a screened
    step uses (greedy screening races over it without calling the sampler), and
    then calls ``check(requests)``, which raises the fault. A seeded request's
    generator has then already moved: the engine must rewind it before the step
    is rerun."""

    def __init__(self, inner: Any, check: Callable[[list[Request]], None]) -> None:
        self.inner = inner
        self.check = check

    def __call__(
        self, logits: Any, requests: list[Request], eos: Any, noise: Any = None
    ) -> Any:
        out = self.inner(logits, requests, eos, noise)
        self.check(requests)
        return out

    def race_noise(self, requests: list[Request], vocab: int) -> Any:
        out = self.inner.race_noise(requests, vocab)
        self.check(requests)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
