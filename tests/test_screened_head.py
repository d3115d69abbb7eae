"""Greedy screening: the int8 screen keeps the token the full float32 lm_head
product picks, on the real model's lm_head and hidden states and on weights built
to make it hard; the engine uses it only where the logits are not needed."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from llmprod import Engine, SamplingParams
from llmprod.errors import InvalidConfigError
from llmprod.layers.screened_head import ScreenedGreedyHead
from llmprod.quant.int8 import is_int8pack_available
from tests.prompts import TEXT_PROMPTS as PROMPTS

pytestmark = pytest.mark.skipif(
    not is_int8pack_available("cpu"), reason="aten._weight_int8pack_mm does not run"
)


def full_argmax(hidden: torch.Tensor, weight: torch.Tensor) -> list[int]:
    return F.linear(hidden, weight).argmax(dim=1).tolist()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def real_hidden(engine: Engine, hf_model: Any) -> torch.Tensor:
    """lm_head inputs at every position of a few chat prompts (real activations)."""
    rows = []
    with torch.inference_mode():
        for text in PROMPTS[:4]:
            ids = engine.render_chat([{"role": "user", "content": text}])
            out = hf_model(torch.tensor([ids]), output_hidden_states=True)
            rows.append(out.hidden_states[-1][0])
    return torch.cat(rows).float()


@pytest.fixture(scope="module")
def head(engine: Engine) -> ScreenedGreedyHead:
    return ScreenedGreedyHead(engine.model.lm_head.weight.detach())


def test_bound_contains_every_exact_logit(
    head: ScreenedGreedyHead, real_hidden: torch.Tensor
) -> None:
    screened = head.screen(real_hidden)
    assert screened is not None
    scores, bound = screened
    exact = real_hidden.double() @ head.weight.double().t()
    slack = bound.double() - (exact - scores.double()).abs()
    assert float(slack.min()) >= 0, "an exact logit lies outside its bound"
    # The bound is useful: a few tokens per row survive, not the vocabulary.
    keep = (scores + bound) >= (scores - bound).amax(dim=1, keepdim=True)
    assert float(keep.sum(dim=1).float().median()) < 100


def test_real_rows_pick_the_full_product_token(
    head: ScreenedGreedyHead, real_hidden: torch.Tensor
) -> None:
    assert real_hidden.shape[0] > 100
    before = head.rows
    for i in range(real_hidden.shape[0]):
        row = real_hidden[i : i + 1]
        assert head.argmax(row) == full_argmax(row, head.weight), f"row {i}"
    # Several rows at once, as in a decode batch.
    for m in (2, 5, 8):
        rows = real_hidden[m : 2 * m + 3][:m]
        assert head.argmax(rows) == full_argmax(rows, head.weight)
    assert head.rows == before + real_hidden.shape[0] + 15
    assert head.fallback_rows == 0


def test_near_ties_and_exact_ties() -> None:
    torch.manual_seed(0)
    vocab, k = 512, 64
    w = torch.randn(vocab, k)
    x = torch.randn(3, k)
    # Token 300 beats token 7 by a hair far below the int8 rounding: the screen
    # cannot tell them apart and must hand both to the float32 pass.
    w[7] = w[300] = w[200] * 0 + x[0] * 2.0
    w[300] += 1e-4 * torch.sign(x[0])
    # Row 1: tokens 11 and 400 are the same row, the maximum: the first wins.
    w[11] = w[400] = x[1] * 2.0
    h = ScreenedGreedyHead(w)
    got = h.argmax(x)
    assert got is not None
    assert got[:2] == [300, 11]
    assert got == full_argmax(x, w)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_random_weights_and_magnitudes(scale: float) -> None:
    gen = torch.Generator().manual_seed(1)
    vocab, k = 4096, 128
    # Heavy-tailed rows: a few large entries make the int8 steps coarse.
    w = torch.randn(vocab, k, generator=gen) * torch.rand(vocab, 1, generator=gen)
    w[:, 0] *= 20
    h = ScreenedGreedyHead(w)
    x = torch.randn(16, k, generator=gen) * scale
    for i in range(16):
        assert h.argmax(x[i : i + 1]) == full_argmax(x[i : i + 1], w)
    assert h.argmax(x[:8]) == full_argmax(x[:8], w)


def test_falls_back_on_non_finite_rows_and_too_many_candidates() -> None:
    w = torch.randn(256, 32)
    h = ScreenedGreedyHead(w)
    x = torch.randn(2, 32)
    x[1, 3] = float("nan")
    assert h.argmax(x) is None
    assert h.fallback_rows == 2
    # All rows equal: every token is a candidate.
    flat = ScreenedGreedyHead(w[:1].repeat(256, 1), max_candidates=16)
    assert flat.argmax(torch.randn(1, 32)) is None
    assert flat.fallback_rows == 1


def test_refuses_weights_it_cannot_screen() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        ScreenedGreedyHead(torch.randn(8, 40))
    with pytest.raises(ValueError, match="float32"):
        ScreenedGreedyHead(torch.randn(8, 32, dtype=torch.float64))


# ------------------------------------------------------------------------ engine
def test_engine_screens_plain_greedy_steps_only(engine: Engine) -> None:
    def screened_rows() -> int:
        stats = engine.metrics().engine["greedy_screening"]
        assert stats["enabled"] is True
        return int(stats["rows"])

    ids = engine.render_chat([{"role": "user", "content": PROMPTS[0]}])
    before = screened_rows()
    engine.generate([ids], SamplingParams(max_tokens=6, temperature=0))
    assert screened_rows() == before + 6
    # Plain temperature sampling races over the screened candidates.
    engine.generate([ids], SamplingParams(max_tokens=5, temperature=0.8, seed=1))
    assert screened_rows() == before + 11
    # Logprobs, top-p/top-k and a repetition penalty need the logits: not
    # screened.
    for params in (
        SamplingParams(max_tokens=4, temperature=0, logprobs=2),
        SamplingParams(max_tokens=4, temperature=0.8, seed=1, top_p=0.9),
        SamplingParams(max_tokens=4, temperature=0.8, seed=1, top_k=20),
        SamplingParams(max_tokens=4, temperature=0, repetition_penalty=1.3),
    ):
        engine.generate([ids], params)
    assert screened_rows() == before + 11


def test_int8_engine_tokens_equal_with_and_without_screening(
    make_engine: Any,
) -> None:
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outs = []
    for mode in ("on", "off"):
        eng = make_engine(quantization="int8", greedy_screening=mode, seed=0)
        prompts = [
            eng.render_chat([{"role": "user", "content": p}]) for p in PROMPTS[:5]
        ]
        # One at a time (batch-1 decode) and all together (5-row steps).
        alone = [eng.generate([p], params)[0].token_ids for p in prompts[:2]]
        together = [c.token_ids for c in eng.generate(prompts, params)]
        outs.append((alone, together))
        stats = eng.metrics().engine["greedy_screening"]
        assert stats["enabled"] is (mode == "on")
        if mode == "on":
            assert stats["rows"] > 0 and stats["fallback_rows"] == 0
    assert outs[0] == outs[1]


@pytest.mark.parametrize("quantization", [None, "gguf"])
def test_seeded_sampling_draws_the_same_tokens_with_and_without_screening(
    make_engine: Any, quantization: str | None
) -> None:
    # The screened race must pick the sampler's token, from the same noise:
    # same seed, same text, screening on or off, alone and in mixed batches.
    outs = []
    for mode in ("on", "off"):
        eng = make_engine(quantization=quantization, greedy_screening=mode, seed=0)
        prompts = [
            eng.render_chat([{"role": "user", "content": p}]) for p in PROMPTS[:4]
        ]
        params = [
            SamplingParams(max_tokens=24, temperature=t, seed=s, ignore_eos=True)
            for t, s in ((0.7, 1), (1.0, 2), (0.0, None), (1.3, 3))
        ]
        alone = [eng.generate([p], params[i])[0].token_ids for i, p in
                 enumerate(prompts)]  # fmt: skip
        together = [c.token_ids for c in eng.generate(prompts, params)]
        outs.append((alone, together))
        stats = eng.metrics().engine["greedy_screening"]
        if mode == "on":
            assert stats["rows"] >= 4 * 24 * 2 and stats["fallback_rows"] == 0
    assert outs[0] == outs[1]


def test_screening_config_errors_name_the_field(make_engine: Any) -> None:
    with pytest.raises(InvalidConfigError) as bad:
        make_engine(greedy_screening="always")
    assert bad.value.field == "greedy_screening"
    # lm_head in int8: nothing to screen, and "on" says so.
    with pytest.raises(
        InvalidConfigError, match="lm_head is WeightOnlyInt8Linear"
    ) as e:
        make_engine(
            quantization="int8",
            quantization_skip=["embed_tokens"],
            greedy_screening="on",
        )
    assert e.value.field == "greedy_screening"
    off = make_engine(quantization="int8", quantization_skip=["embed_tokens"])
    assert off.metrics().engine["greedy_screening"] == {"enabled": False}


def test_close_releases_the_int8_copy(make_engine: Any) -> None:
    eng = make_engine()
    head = eng.greedy_head
    assert head is not None and head.nbytes > 0
    eng.close()
    assert head.nbytes == 0
    assert eng.metrics().engine["greedy_screening"]["enabled"] is True


def _q8_blocks(weight: torch.Tensor) -> Any:
    """``weight`` rounded to Q8_0 blocks (an int8 code per weight, a float16
    scale per 32), as a GGUF file stores SmolLM2's embedding."""
    from llmprod.quant.q8 import Q8Weight

    n, k = weight.shape
    blocks = weight.view(n, k // 32, 32)
    d = (blocks.abs().amax(-1) / 127).half()
    q = (blocks / d.float().clamp_min(1e-30)[..., None]).round().clamp(-127, 127)
    return Q8Weight(q.to(torch.int8).view(n, k), d)


def test_q8_blocks_screen_to_the_full_product_token(
    engine: Engine, real_hidden: torch.Tensor
) -> None:
    # lm_head held in Q8_0 blocks (quantization="gguf"): the screen is built from
    # the blocks and rescores its candidates from them, exactly.
    q8 = _q8_blocks(engine.model.lm_head.weight.detach())
    head = ScreenedGreedyHead(q8)
    exact_w = q8.dequantize()
    screened = head.screen(real_hidden)
    assert screened is not None
    scores, bound = screened
    exact = real_hidden.double() @ exact_w.double().t()
    assert float((bound.double() - (exact - scores.double()).abs()).min()) >= 0
    for i in range(0, real_hidden.shape[0], 3):
        row = real_hidden[i : i + 1]
        assert head.argmax(row) == full_argmax(row, exact_w), f"row {i}"
    assert head.argmax(real_hidden[:8]) == full_argmax(real_hidden[:8], exact_w)
    assert head.fallback_rows == 0


def test_the_screened_race_picks_the_samplers_token(
    head: ScreenedGreedyHead, real_hidden: torch.Tensor
) -> None:
    # Sampler._draw's arithmetic over the full product, against choose(), on
    # real rows, several temperatures, greedy rows mixed in.
    gen = torch.Generator().manual_seed(5)
    weight = head.weight
    assert isinstance(weight, torch.Tensor)
    rows = real_hidden[:48]
    for temps in ([0.7] * 8, [1.0, None, 1.5, 0.3, None, 2.0, 1.0, 0.9]):
        for lo in range(0, rows.shape[0], 8):
            x = rows[lo : lo + 8]
            noise = torch.empty(8, weight.shape[0]).exponential_(generator=gen)
            logits = F.linear(x, weight)
            t = torch.tensor([v if v is not None else 1.0 for v in temps])
            probs = torch.softmax(logits / t[:, None], dim=-1)
            want = (probs / noise).argmax(dim=-1)
            greedy = torch.tensor([v is None for v in temps])
            want = torch.where(greedy, logits.argmax(dim=-1), want).tolist()
            assert head.choose(x, temps, noise) == want
    assert head.fallback_rows == 0
