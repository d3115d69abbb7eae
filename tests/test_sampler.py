"""The sampler on hand-made logits: each mask and option, alone and in one batch.

Draws are checked exactly: the sampler picks ``argmax(p / E)`` with ``E ~ Exp(1)``
drawn from the request's generator (the exponential race), so with the same seed
the expected token follows from the probabilities written out here by hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from llmprod.exec.sampler import Sampler, SamplerOutput, seeded_generator
from llmprod.sampling_params import SamplingParams
from llmprod.sched.request import Request

CPU = torch.device("cpu")
EOS = 2
SEEDS = range(24)


def make_request(
    params: SamplingParams,
    prompt: Sequence[int] = (0,),
    outputs: Sequence[int] = (),
) -> Request:
    """A request with ``outputs`` already generated; a seeded one gets its own
    generator, as admission gives it."""
    r = Request("r", list(prompt), params)
    for t in outputs:
        r.append_token(t)
    if params.seed is not None:
        r.generator = seeded_generator(params.seed, CPU)
    return r


def sample(
    rows: Sequence[Sequence[float]],
    requests: list[Request],
    eos: tuple[int, ...] = (EOS,),
    seed: int = 0,
) -> SamplerOutput:
    return Sampler(seed, CPU)(torch.tensor(rows, dtype=torch.float32), requests, eos)


def race(probs: Sequence[float], seed: int) -> int:
    """The token the exponential race picks from ``probs`` with a request seed."""
    noise = torch.empty(len(probs)).exponential_(generator=seeded_generator(seed, CPU))
    ratios = [p / float(e) for p, e in zip(probs, noise)]
    return max(range(len(probs)), key=ratios.__getitem__)


def softmax(xs: Sequence[float]) -> list[float]:
    m = max(xs)
    es = [math.exp(x - m) for x in xs]
    return [e / sum(es) for e in es]


def draw_each_seed(row: Sequence[float], **params: Any) -> list[int]:
    """The token drawn for ``row`` by a fresh request of each seed in SEEDS."""
    return [
        sample([row], [make_request(SamplingParams(seed=s, **params))]).token_ids[0]
        for s in SEEDS
    ]


# --------------------------------------------------------------------- greedy
def test_greedy_takes_the_argmax_and_the_first_index_on_ties() -> None:
    rows = [[0.5, 3.0, 1.0, 3.0], [4.0, -1.0, 4.0, 0.0], [-2.0, -1.0, -3.0, -1.5]]
    greedy = SamplingParams(temperature=0)
    out = sample(rows, [make_request(greedy) for _ in rows])
    assert out.token_ids == [1, 0, 1]
    assert out.logprobs == [None, None, None]


# ---------------------------------------------------------------- temperature
def test_temperature_scales_the_logits_before_the_draw() -> None:
    row = [1.0, 2.0, 0.5, 1.5]
    for t in (0.5, 2.0):
        probs = softmax([x / t for x in row])
        assert draw_each_seed(row, temperature=t) == [race(probs, s) for s in SEEDS]
    # The two temperatures do pick differently for some seeds.
    assert draw_each_seed(row, temperature=0.5) != draw_each_seed(row, temperature=2.0)


def test_low_temperature_is_greedy_and_high_temperature_flat() -> None:
    row = [1.0, 1.2, 0.9]
    # T = 0.01: token 1 is e^20 times likelier than token 0.
    assert set(draw_each_seed(row, temperature=0.01)) == {1}
    assert set(draw_each_seed(row, temperature=100.0)) == {0, 1, 2}


# ---------------------------------------------------------------------- top-k
def test_top_k_keeps_the_k_largest_logits() -> None:
    row = [3.0, 1.0, 2.0, 0.0, 2.5]
    t = 2.0
    # k = 2 keeps tokens 0 and 4, in proportion e^(3/2) : e^(2.5/2).
    kept = softmax([3.0 / t, 2.5 / t])
    probs = [kept[0], 0.0, 0.0, 0.0, kept[1]]
    drawn = draw_each_seed(row, temperature=t, top_k=2)
    assert drawn == [race(probs, s) for s in SEEDS]
    assert set(drawn) == {0, 4}
    # k = 1 is the argmax at any temperature.
    assert set(draw_each_seed(row, temperature=50.0, top_k=1)) == {0}
    # k past the vocabulary keeps everything.
    wide = draw_each_seed(row, temperature=50.0, top_k=10)
    assert wide == draw_each_seed(row, temperature=50.0)
    assert set(wide) == {0, 1, 2, 3, 4}


# ---------------------------------------------------------------------- top-p
PROBS = [0.5, 0.3, 0.15, 0.05]
LOG_PROBS = [math.log(p) for p in PROBS]


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    # Mass before each token: 0, 0.5, 0.8, 0.95. A token goes when the mass
    # before it reaches top_p: 0.75 keeps {0, 1}.
    drawn = draw_each_seed(LOG_PROBS, top_p=0.75)
    assert drawn == [race([0.5, 0.3, 0.0, 0.0], s) for s in SEEDS]
    assert set(drawn) == {0, 1}
    # 0.45 keeps token 0 alone (0.5 >= 0.45 before token 1).
    assert set(draw_each_seed(LOG_PROBS, top_p=0.45)) == {0}
    # 1.0 drops nothing.
    everything = draw_each_seed(LOG_PROBS, top_p=1.0)
    assert everything == [race(PROBS, s) for s in SEEDS]


def test_top_p_applies_to_the_top_k_distribution() -> None:
    # top_k=3 first: [0.4, 0.3, 0.2] renormalised to [4/9, 3/9, 2/9]; the mass
    # before token 2 is then 7/9 = 0.78 >= 0.75, so token 2 goes. (On the full
    # distribution it would be 0.7 < 0.75 and token 2 would stay.)
    row = [math.log(p) for p in (0.4, 0.3, 0.2, 0.1)]
    drawn = draw_each_seed(row, top_k=3, top_p=0.75)
    assert drawn == [race([4 / 9, 3 / 9, 0.0, 0.0], s) for s in SEEDS]
    assert set(drawn) == {0, 1}


# ----------------------------------------------------------------- min_tokens
def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    row = [0.0, 1.0, 5.0, 4.0, 3.0]  # EOS (2) best, then stop id 3, then 4
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(3,))
    picks = [
        sample([row], [make_request(params, outputs=[1] * n)]).token_ids[0]
        for n in range(4)
    ]
    assert picks == [4, 4, 2, 2]
    # Every EOS id of the model is masked.
    assert sample([row], [make_request(params)], eos=(2, 4)).token_ids == [1]


def test_min_tokens_with_ignore_eos_masks_only_the_stop_ids() -> None:
    row = [0.0, 1.0, 4.0, 5.0, 3.0]  # stop id 3 best, then EOS (2)
    params = SamplingParams(
        temperature=0, min_tokens=2, stop_token_ids=(3,), ignore_eos=True
    )
    assert sample([row], [make_request(params)]).token_ids == [2]
    plain = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(3,))
    assert sample([row], [make_request(plain)]).token_ids == [4]


# --------------------------------------------------------- repetition penalty
def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    pen = SamplingParams(temperature=0, repetition_penalty=2.0)
    # Seen tokens 1 and 2: 4.0 -> 2.0 and -1.0 -> -2.0; token 3 (3.5) wins.
    row = [3.0, 4.0, -1.0, 3.5]
    assert sample([row], [make_request(pen, prompt=[1, 2])]).token_ids == [3]
    # Token 0 seen instead: 3.0 -> 1.5, and token 1 (4.0) wins.
    assert sample([row], [make_request(pen, prompt=[0])]).token_ids == [1]
    # A negative seen logit is pushed down, not up: -1.0 -> -2.0 < -1.5.
    assert sample([[-1.0, -1.5]], [make_request(pen, prompt=[0])]).token_ids == [1]
    # Generated tokens count as seen too: 0 from the prompt, 1 generated.
    assert sample([row], [make_request(pen, prompt=[0], outputs=[1])]).token_ids == [3]
    # Below 1 it favours seen tokens: 2.0 / 0.5 = 4.0 > 3.0.
    boost = SamplingParams(temperature=0, repetition_penalty=0.5)
    assert sample([[3.0, 2.0]], [make_request(boost, prompt=[1])]).token_ids == [1]


def test_penalties_leave_the_callers_logits_alone() -> None:
    logits = torch.tensor([[3.0, 4.0, 5.0]])
    params = SamplingParams(
        temperature=0, repetition_penalty=2.0, min_tokens=1, logprobs=0
    )
    out = Sampler(0, CPU)(logits, [make_request(params, prompt=[1])], (EOS,))
    assert out.token_ids == [0]  # EOS masked, 4.0 -> 2.0
    assert torch.equal(logits, torch.tensor([[3.0, 4.0, 5.0]]))


# ------------------------------------------------------------------- logprobs
def test_logprobs_of_the_chosen_token_its_alternatives_and_the_entropy() -> None:
    row = [math.log(p) for p in (0.5, 0.25, 0.125, 0.125)]
    # Entropy: -(0.5 ln 0.5 + 0.25 ln 0.25 + 2 * 0.125 ln 0.125) = 1.75 ln 2.
    entropy = 1.75 * math.log(2)
    reqs = [
        make_request(SamplingParams(temperature=0, logprobs=2)),
        make_request(SamplingParams(temperature=0, logprobs=0)),
        make_request(SamplingParams(temperature=0)),
    ]
    out = sample([row] * 3, reqs)
    assert out.token_ids == [0, 0, 0]
    two, zero, none = out.logprobs
    assert two is not None and zero is not None and none is None
    assert two.token_id == 0 and two.logprob == pytest.approx(math.log(0.5))
    assert list(two.top) == [0, 1]
    assert two.top[0] == pytest.approx(math.log(0.5))
    assert two.top[1] == pytest.approx(math.log(0.25))
    assert two.entropy == pytest.approx(entropy)
    assert zero.top == {} and zero.logprob == pytest.approx(math.log(0.5))
    assert zero.entropy == pytest.approx(entropy)


def test_logprobs_describe_the_raw_distribution() -> None:
    row = [math.log(p) for p in (0.5, 0.25, 0.125, 0.125)]
    # Temperature and top_k change the draw (top_k=1: token 0), not the logprobs.
    hot = SamplingParams(temperature=0.3, top_k=1, seed=1, logprobs=1)
    # The penalty moves the argmax to token 1 (0.5 -> ln 0.5 * 4); its logprob
    # is still ln 0.25.
    pen = SamplingParams(temperature=0, repetition_penalty=4.0, logprobs=1)
    out = sample([row, row], [make_request(hot), make_request(pen, prompt=[0])])
    assert out.token_ids == [0, 1]
    lp_hot, lp_pen = out.logprobs
    assert lp_hot is not None and lp_pen is not None
    assert lp_hot.logprob == pytest.approx(math.log(0.5))
    assert lp_pen.logprob == pytest.approx(math.log(0.25))
    assert lp_pen.top == {0: pytest.approx(math.log(0.5))}


# ---------------------------------------------------------------------- seeds
FLAT = [0.0] * 16


def _steps(batch: list[Request], n: int, sampler: Sampler) -> list[list[int]]:
    """n steps of flat logits; the tokens drawn per request."""
    got: list[list[int]] = [[] for _ in batch]
    for _ in range(n):
        out = sampler(torch.zeros(len(batch), 16), batch, (EOS,))
        for i, t in enumerate(out.token_ids):
            got[i].append(t)
    return got


def test_a_seeded_request_draws_the_same_tokens_alone_or_in_any_batch() -> None:
    # On flat logits the race picks the smallest noise: the first token of seed 7
    # is the argmin of its generator's first 16 exponential draws.
    first = int(
        torch.empty(16).exponential_(generator=seeded_generator(7, CPU)).argmin()
    )
    alone = _steps([make_request(SamplingParams(seed=7))], 6, Sampler(0, CPU))[0]
    assert alone[0] == first
    batch = [
        make_request(SamplingParams()),
        make_request(SamplingParams(seed=8)),
        make_request(SamplingParams(seed=7)),
        make_request(SamplingParams(temperature=0)),
    ]
    got = _steps(batch, 6, Sampler(123, CPU))
    assert got[2] == alone
    assert got[1] != alone  # another seed, another sequence
    assert got[3] == [0] * 6  # greedy on ties: the first index


def test_unseeded_requests_share_the_samplers_generator() -> None:
    def run(seed: int) -> list[list[int]]:
        batch = [make_request(SamplingParams()) for _ in range(3)]
        return _steps(batch, 4, Sampler(seed, CPU))

    assert run(5) == run(5)
    assert run(5) != run(6)
    # One generator, drawn row by row: the rows of one step differ.
    assert len({tuple(seq) for seq in run(5)}) == 3


# ---------------------------------------------------------- mixed batch, argmax
def test_each_row_of_a_mixed_batch_gets_its_own_options() -> None:
    rows = [
        [1.0, 3.0, 2.0, 0.0],  # greedy
        [1.0, 0.0, 0.5, 2.0],  # temperature 5, top_k 1: the argmax, 3
        [0.0, 1.0, 5.0, 4.0],  # min_tokens: EOS (2) masked -> 3
        [3.0, 4.0, -1.0, 3.5],  # greedy + penalty on 1 -> 3
        [math.log(p) for p in (0.1, 0.2, 0.3, 0.4)],  # seeded, top_p 0.35 -> 3
        [math.log(p) for p in (0.4, 0.3, 0.2, 0.1)],  # seeded, full race
    ]
    reqs = [
        make_request(SamplingParams(temperature=0)),
        make_request(SamplingParams(temperature=5.0, top_k=1)),
        make_request(SamplingParams(temperature=0, min_tokens=1, logprobs=1)),
        make_request(SamplingParams(temperature=0, repetition_penalty=2.0), [1]),
        make_request(SamplingParams(seed=3, top_p=0.35)),
        make_request(SamplingParams(seed=4)),
    ]
    out = sample(rows, reqs)
    assert out.token_ids == [1, 3, 3, 3, 3, race([0.4, 0.3, 0.2, 0.1], 4)]
    # Only the row that asked has logprobs.
    assert [lp is not None for lp in out.logprobs] == [
        False,
        False,
        True,
        False,
        False,
        False,
    ]
    # Each row alone gives the same token.
    for row, r, tok in zip(rows, reqs, out.token_ids):
        fresh = make_request(r.params, r.prompt_token_ids)
        assert sample([row], [fresh]).token_ids == [tok]


def test_needs_only_argmax() -> None:
    only = Sampler.needs_only_argmax
    assert only(make_request(SamplingParams(temperature=0)))
    assert not only(make_request(SamplingParams(temperature=0.7)))
    assert not only(make_request(SamplingParams(temperature=0, logprobs=0)))
    pen = SamplingParams(temperature=0, repetition_penalty=1.2)
    assert not only(make_request(pen))
    assert not only(make_request(SamplingParams(temperature=0, min_tokens=2)))
    done = make_request(SamplingParams(temperature=0, min_tokens=2), outputs=[5, 6])
    assert only(done)
