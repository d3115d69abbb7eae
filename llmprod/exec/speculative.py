"""Speculative decoding's verification: which guessed tokens a step keeps.

The runner computes the logits (or, for plain greedy steps, the argmax) at the
last known position and at every guessed one of a speculating request, in one
forward pass; these functions decide what the step yields. The proposer and
the policy live in :mod:`llmprod.sched.speculative`, with the overview.
"""

from __future__ import annotations

import torch

__all__ = ["verify_greedy", "verify_sampled"]


def verify_greedy(argmax: list[int], draft: list[int]) -> list[int]:
    """The tokens a greedy request keeps: guesses while they equal the model's
    argmax at their position, then the model's own token (``argmax`` has
    ``len(draft) + 1`` entries)."""
    out = []
    for want, guess in zip(argmax, draft):
        out.append(want)
        if want != guess:
            return out
    out.append(argmax[len(draft)])
    return out


def verify_sampled(
    probs: torch.Tensor,  # [k + 1, vocab] the target distribution per position
    draft: list[int],
    generator: torch.Generator | None,
) -> list[int]:
    """Rejection sampling against deterministic guesses: keep guess ``x`` with
    probability ``p(x)``; at the first refusal draw from ``p`` without ``x``
    (renormalised) and stop; when all are kept, draw one more from the last
    position. The kept tokens are distributed as ``p`` itself."""
    k = len(draft)
    u = torch.rand(k, generator=generator, device=probs.device) if k else None
    out: list[int] = []
    for j, x in enumerate(draft):
        assert u is not None
        if float(u[j]) < float(probs[j, x]):
            out.append(x)
            continue
        residual = probs[j].clone()
        residual[x] = 0.0
        if float(residual.sum()) <= 0.0:  # p(x) was 1: cannot refuse; keep it
            out.append(x)
            continue
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(probs[k], 1, generator=generator)))
    return out
