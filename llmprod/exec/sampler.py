"""Turn the logits of the sampled rows into next tokens.

Order of operations (as transformers applies them): the grammar mask of a
structured request, repetition penalty, min-token suppression, temperature,
top-k, top-p, then a draw. Greedy rows take the argmax
(the first index on ties, like transformers). Draws use the exponential race
(argmax of p / E with E ~ Exp(1)), whose noise comes from the request's own
generator when it has a seed, so a seeded request draws the same tokens alone or
in any batch. The only host sync is reading back the chosen token ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmprod.outputs import TokenLogprob
from llmprod.sched.request import Request
from llmprod.structured.backend import apply_masks


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    """Samples one token per row.

    Args:
        seed: seed of the generator shared by requests without their own seed.
        device: where the logits live.
    """

    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(
        self,
        logits: torch.Tensor,  # fp32 [num_rows, vocab_size]
        requests: list[Request],
        eos_token_ids: tuple[int, ...],
        noise: torch.Tensor | None = None,
    ) -> SamplerOutput:
        """The next token (and logprobs) of each row.

        Args:
            noise: the rows' race noise when already drawn (:meth:`race_noise`),
                so that a step which tried greedy screening first draws it once.
        """
        params = [r.params for r in requests]
        raw = logits  # the model's own, for logprobs
        matchers = [r.matcher for r in requests]
        if any(m is not None for m in matchers):
            # Grammar masks first: a forbidden token is never drawn.
            wants_lp = any(p.logprobs is not None for p in params)
            logits = apply_masks(logits.clone() if wants_lp else logits, matchers)
        logits = self._apply_penalties(logits, requests, eos_token_ids)
        if all(p.is_greedy for p in params):
            chosen = logits.argmax(dim=-1)
        else:
            chosen = self._draw(logits, requests, noise)
        token_ids: list[int] = chosen.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(requests)
        if any(p.logprobs is not None for p in params):
            lp = torch.log_softmax(raw, dim=-1)
            entropy = (-(lp.exp() * lp).sum(dim=-1)).tolist()
            for i, p in enumerate(params):
                if p.logprobs is not None:
                    logprobs[i] = make_logprob(lp[i], token_ids[i], p.logprobs)
                    logprobs[i].entropy = entropy[i]  # type: ignore[union-attr]
                    if p.logprob_token_ids:
                        ids = list(p.logprob_token_ids)
                        logprobs[i].scored = dict(  # type: ignore[union-attr]
                            zip(ids, lp[i, ids].tolist())
                        )
        return SamplerOutput(token_ids, logprobs)

    @staticmethod
    def races_on_plain_logits(request: Request) -> bool:
        """Whether the request's next token is the greedy argmax or an
        exponential race over ``softmax(logits / temperature)`` of the model's
        own logits (no top-k, top-p, grammar, penalty, min_tokens or logprobs):
        a step of such rows can be screened (``ScreenedGreedyHead.choose``)."""
        p = request.params
        return _plain_logits(request) and (
            p.is_greedy or (p.top_k is None and p.top_p >= 1.0)
        )

    def race_noise(self, requests: list[Request], vocab: int) -> torch.Tensor | None:
        """The race noise a draw over these rows uses (an Exp(1) per row and
        token, from each row's generator, in row order), or None when every row
        is greedy (no draw). Drawn here once, it is passed to ``__call__``."""
        if all(r.params.is_greedy for r in requests):
            return None
        noise = torch.empty(len(requests), vocab, device=self.device)
        for i, r in enumerate(requests):
            noise[i].exponential_(generator=self.generator_of(r))
        return noise

    @staticmethod
    def needs_only_argmax(request: Request) -> bool:
        """Whether the request's next token is the plain argmax of its logits:
        greedy, no logprobs, and no repetition penalty or min_tokens in effect
        (so the logits themselves are not needed, see ``ScreenedGreedyHead``)."""
        return request.params.is_greedy and _plain_logits(request)

    def _apply_penalties(
        self,
        logits: torch.Tensor,
        requests: list[Request],
        eos_token_ids: tuple[int, ...],
    ) -> torch.Tensor:
        cloned = False
        for i, r in enumerate(requests):
            p = r.params
            if _penalized(r):
                if not cloned:
                    logits, cloned = logits.clone(), True
                ids = torch.tensor(sorted(r.seen_token_ids or ()), device=logits.device)
                row = logits[i, ids]
                pen = p.repetition_penalty
                logits[i, ids] = torch.where(row > 0, row / pen, row * pen)
            if _min_tokens_active(r):
                if not cloned:
                    logits, cloned = logits.clone(), True
                banned = list(p.stop_token_ids) + (
                    [] if p.ignore_eos else list(eos_token_ids)
                )
                if banned:
                    logits[i, banned] = float("-inf")
        return logits

    @staticmethod
    def target_probs(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """The distribution each row draws from: softmax of the logits after
        temperature, top-k and top-p (greedy rows: temperature 1, unused)."""
        params = [r.params for r in requests]
        temps = torch.tensor(
            [p.temperature if not p.is_greedy else 1.0 for p in params],
            device=logits.device,
            dtype=logits.dtype,
        )
        scaled = logits / temps[:, None]
        vocab = scaled.shape[-1]
        if any(p.top_k is not None for p in params):
            ks = torch.tensor(
                [min(p.top_k or vocab, vocab) for p in params], device=logits.device
            )
            kth = scaled.sort(dim=-1, descending=True).values.gather(
                1, (ks - 1)[:, None]
            )
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], device=logits.device)
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # Drop a token when the mass before it already reaches top_p.
            drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p[:, None]
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_p)
        return probs

    def generator_of(self, request: Request) -> torch.Generator:
        """Where a request's random draws come from: its own seeded generator,
        else the engine's shared one."""
        return self.generator if request.generator is None else request.generator

    def _draw(
        self,
        logits: torch.Tensor,
        requests: list[Request],
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        probs = self.target_probs(logits, requests)
        if noise is None:
            noise = self.race_noise(requests, probs.shape[-1])
        assert noise is not None
        drawn = (probs / noise).argmax(dim=-1)
        greedy = torch.tensor(
            [r.params.is_greedy for r in requests], device=logits.device
        )
        return torch.where(greedy, logits.argmax(dim=-1), drawn)


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    """The generator of a request with its own seed (set once, at admission)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _plain_logits(r: Request) -> bool:
    """No logprobs, grammar, repetition penalty or min_tokens in effect: the
    next token depends on the model's logits only through the draw."""
    return (
        r.params.logprobs is None
        and r.matcher is None
        and not _penalized(r)
        and not _min_tokens_active(r)
    )


def _penalized(r: Request) -> bool:
    return r.params.repetition_penalty != 1.0 and bool(r.seen_token_ids)


def _min_tokens_active(r: Request) -> bool:
    return bool(r.params.min_tokens) and r.num_output_tokens < r.params.min_tokens


def make_logprob(
    row_logprobs: torch.Tensor, token_id: int, num_top: int
) -> TokenLogprob:
    """The log-probability of ``token_id`` and the ``num_top`` best alternatives."""
    top: dict[int, float] = {}
    if num_top:
        vals, idx = row_logprobs.topk(num_top)
        top = dict(zip(idx.tolist(), vals.tolist()))
    return TokenLogprob(token_id, float(row_logprobs[token_id]), top)
