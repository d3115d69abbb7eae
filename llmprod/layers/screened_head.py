"""Greedy tokens without the full float32 lm_head product (CPU).

A greedy step needs only the argmax of ``hidden @ W.T``, not every logit. On CPU
at a few token rows that product is bound by reading ``W``: SmolLM2-135M's
49152 x 576 float32 lm_head is 113 MB per step, the largest single cost of
batch-1 decode once the other layers are int8. :class:`ScreenedGreedyHead` keeps
an int8 copy of ``W`` (per-row scales, a quarter of the bytes) and, per step:

1. scores every token with the int8 copy (``aten._weight_int8pack_mm``, bf16
   activations): ``A``;
2. bounds, per token ``n``, how far ``A[n]`` can be from the exact logit
   ``L[n] = sum_k x[k] W[n, k]`` (and from what a float32 product computes), with
   ``b[n] = c_A |A[n]| + alpha a[n] + beta r[n]``:

   - ``r[n] = ||W[n] - s[n] q[n]||_2`` (the rounding of the weights, exact, from
     load time) times ``beta = ||x||_2`` (Cauchy-Schwarz), plus the float32
     summation error of a K-long product, ``gamma_K ||x||_2 ||W[n]||_2``;
   - ``a[n] = s[n] ||q[n]||_2`` times ``alpha = ||x - bf16(x)||_2 +
     gamma_K ||bf16(x)||_2``: the activations' rounding to bf16 and the kernel's
     float32 accumulation;
   - ``c_A |A[n]|``: the kernel's bf16 scale and bf16 output, each at most 2^-8
     relative;

3. keeps the tokens with ``A[n] + b[n] >= max_m (A[m] - b[m])``: any token outside
   that set is beaten by the token that attains the maximum, whatever the exact
   values, so the true argmax is always kept;
4. scores those candidates in float32 against the float32 weights and takes the
   argmax (the first index on ties, like ``torch.argmax`` over the full logits).

The token is therefore the one the full float32 product picks, up to float32's
own rounding (two products summed in different orders, as between any two BLAS
libraries). On SmolLM2-135M chat decoding the bound keeps 4 candidates per row
(median; mean 6.8, at most 77 over 256 rows), so step 4 costs microseconds, and
the int8 product reads a quarter of the bytes: at one row the screened argmax
took 0.90 ms against 2.40 ms for the full product on the benchmark machine
(docs/benchmarks.md, "Greedy screening").

The engine uses it only for steps whose rows are all plain greedy (no
logprobs, no repetition penalty or min_tokens in effect) or plain temperature
sampling (:meth:`ScreenedGreedyHead.choose` runs the sampler's exponential race
over the candidates), at most ``max_rows`` of them; every other step computes
the full logits. Non-finite hidden
states, or more candidates than ``max_candidates`` per row, also fall back to the
full product.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from llmprod.quant.q8 import Q8Head, Q8Weight
from llmprod.quant.scheme import quantize_per_channel
from llmprod.quant.weight_only import (
    _FUSED_K_MULTIPLE,
    _aligned,
    is_int8pack_available,
)

logger = logging.getLogger("llmprod")

__all__ = ["ScreenedGreedyHead", "screened_head_for"]

# Relative error of the kernel's output against s[n] * (its float32 sum): bf16
# scales and a bf16 result, each within 2^-8, so 1/((1 - 2^-8)^2) - 1 < 2^-7 + 2^-12.
_C_OUTPUT = 2.0**-7 + 2.0**-12
# Float32 evaluation of the bound itself and of A +- b (all terms are >= 0): a
# relative margin far above the few float32 roundings involved (~2^-21).
_MARGIN = 1.0 + 2.0**-12
# Rows up to which screening measured faster than the float32 product, on real
# SmolLM2-135M decode rows (benchmarks/e2e/greedy_screening.py): 2.7x at 1 row,
# 1.6x at 8, 1.1x at 16, 0.85x at 32.
DEFAULT_MAX_ROWS = 16
DEFAULT_MAX_CANDIDATES = 256
_BUILD_ROWS = 2048


class ScreenedGreedyHead:
    """Greedy argmax of ``hidden @ weight.T`` through an int8 screen.

    Args:
        weight: the float32 lm_head weight ``[vocab, hidden]`` (kept by reference,
            not copied; a tied embedding stays shared), or its Q8_0 blocks
            (candidates are rescored from them, exactly).
        max_rows: steps with more sampled rows take the full product.
        max_candidates: per-row average above which a step takes the full product.

    Raises:
        ValueError: the weight is not a finite 2-D float32 tensor whose width is a
            multiple of 16 (the int8 kernel's block).
    """

    def __init__(
        self,
        weight: torch.Tensor | Q8Weight,
        max_rows: int = DEFAULT_MAX_ROWS,
        max_candidates: int = DEFAULT_MAX_CANDIDATES,
    ) -> None:
        if isinstance(weight, Q8Weight):
            self.weight: torch.Tensor | Q8Weight = weight
            rows, self._gather = weight.rows, weight.gather
        else:
            if weight.dim() != 2 or weight.dtype != torch.float32:
                raise ValueError(
                    f"screening needs a 2-D float32 weight, got {weight.dtype} "
                    f"{tuple(weight.shape)}"
                )
            w32 = self.weight = weight.detach()

            def rows(lo: int, hi: int) -> torch.Tensor:
                return w32[lo:hi]

            def gather(index: torch.Tensor) -> torch.Tensor:
                return w32.index_select(0, index)

            self._gather = gather
        vocab, k = int(weight.shape[0]), int(weight.shape[1])
        if k % _FUSED_K_MULTIPLE:
            raise ValueError(
                f"screening needs a hidden size that is a multiple of "
                f"{_FUSED_K_MULTIPLE}, got {k}"
            )
        self.vocab = vocab
        self.max_rows = max_rows
        self.max_candidates = max_candidates
        # gamma_K: float32 summation error of a K-long dot product, relative to
        # the sum of the absolute terms.
        u = 2.0**-24
        self._gamma = k * u / (1 - k * u)
        q = torch.empty(vocab, k, dtype=torch.int8)
        s = torch.empty(vocab, dtype=torch.float32)
        r = torch.empty(vocab, dtype=torch.float64)
        a = torch.empty(vocab, dtype=torch.float64)
        # In row chunks, so that the float64 temporaries stay small (a 262k-token
        # vocabulary would need GBs at once).
        for lo in range(0, vocab, _BUILD_ROWS):
            hi = min(lo + _BUILD_ROWS, vocab)
            w = rows(lo, hi)
            q[lo:hi], s[lo:hi] = quantize_per_channel(w)  # raises on inf/NaN
            w64, q64, s64 = w.double(), q[lo:hi].double(), s[lo:hi].double()
            # r[n] and a[n] from the module docstring, in float64.
            r[lo:hi] = (w64 - q64 * s64[:, None]).norm(dim=1)
            r[lo:hi] += self._gamma * w64.norm(dim=1)
            a[lo:hi] = q64.norm(dim=1) * s64
        self._q = _aligned(q)
        self._scales = _aligned(s.to(torch.bfloat16))
        self._scales32 = s
        self._r = _round_up(r)
        self._a = _round_up(a)
        self.fused_ops: Any = None
        """The fused CPU operations (``llmprod.layers.cpu``), set by the engine
        where they run: one-row steps score through their int8 kernel (float32
        activations and sums, whose error the bound's ``alpha`` covers)."""
        self.rows = 0
        """Rows (tokens) chosen by screening."""
        self.candidates = 0
        """Candidates scored in float32 over those rows."""
        self.fallback_rows = 0
        """Rows sent back to the full product (non-finite input, too many
        candidates)."""

    @property
    def nbytes(self) -> int:
        """Memory held beside the float32 weight (int8 copy, scales, bounds)."""
        return sum(
            t.numel() * t.element_size()
            for t in (self._q, self._scales, self._scales32, self._r, self._a)
        )

    def release(self) -> None:
        """Drop the tensors (engine close); the counters stay readable."""
        empty = torch.empty(0)
        self.weight = self._q = self._scales = self._scales32 = empty
        self._r = self._a = empty
        self._gather = lambda index: empty

    def stats(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "candidates": self.candidates,
            "fallback_rows": self.fallback_rows,
            "extra_bytes": self.nbytes,
        }

    @torch.inference_mode()
    def screen(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """int8 scores ``A`` and their bounds ``b`` (float32 ``[rows, vocab]``),
        such that every exact logit lies in ``[A - b, A + b]``; None when a row is
        not finite.

        Args:
            hidden: ``[rows, hidden]``, the input of lm_head.
        """
        x = hidden.to(torch.float32).contiguous()
        xb = x.to(torch.bfloat16)
        x64 = x.double()
        beta = x64.norm(dim=1)
        alpha = (x64 - xb.double()).norm(dim=1) + self._gamma * xb.double().norm(dim=1)
        if not bool(torch.isfinite(beta).all()):
            return None
        if self.fused_ops is not None and x.shape[0] == 1:
            # float32 activations, sums and scales: within the same bound.
            scores = self.fused_ops.int8_linear(x, self._q, self._scales32)
        else:
            scores = torch.ops.aten._weight_int8pack_mm(
                _aligned(xb), self._q, self._scales
            ).float()
        bound = scores.abs().mul_(_C_OUTPUT)
        bound.add_(_round_up(alpha)[:, None] * self._a)
        bound.add_(_round_up(beta)[:, None] * self._r)
        return scores, bound.mul_(_MARGIN)

    @torch.inference_mode()
    def argmax(self, hidden: torch.Tensor) -> list[int] | None:
        """The greedy token of each row, or None to compute the full logits.

        Args:
            hidden: float32 ``[rows, hidden]``, the input of lm_head.
        """
        m = hidden.shape[0]
        screened = self.screen(hidden)
        if screened is None:
            self.fallback_rows += m
            return None
        scores, bound = screened
        floor = (scores - bound).amax(dim=1)  # the best guaranteed score per row
        keep = scores.add_(bound).ge(floor[:, None])  # A + b >= floor
        cand = self._candidates(keep, floor)
        if cand is None:
            return None
        rows, cols = cand
        return self._first_best(rows, cols, self._exact(hidden, rows, cols), m)

    def _candidates(
        self, keep: torch.Tensor, floor: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (row, token) pairs ``keep`` marks, row-major (tokens ascend in a
        row), or None (counted as fallback rows) when there are too many or a
        row's floor is not finite."""
        m = keep.shape[0]
        rows, cols = keep.nonzero(as_tuple=True)
        if rows.numel() > self.max_candidates * m or not bool(
            torch.isfinite(floor).all()
        ):
            self.fallback_rows += m
            return None
        return rows, cols

    def _exact(
        self, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
    ) -> torch.Tensor:
        """The candidates' logits in float32, from the exact weights."""
        x = hidden.to(torch.float32)
        return (self._gather(cols) * x.index_select(0, rows)).sum(1)

    def _first_best(
        self, rows: torch.Tensor, cols: torch.Tensor, key: torch.Tensor, m: int
    ) -> list[int]:
        """Per row, the first candidate token with the largest ``key`` (like
        ``argmax`` over the full row); counts the rows and candidates."""
        top = key == _row_max(rows, key, m).index_select(0, rows)
        first = torch.full((m,), self.vocab, dtype=cols.dtype).scatter_reduce(
            0, rows[top], cols[top], "amin", include_self=True
        )
        self.rows += m
        self.candidates += int(rows.numel())
        return first.tolist()  # type: ignore[no-any-return]

    @torch.inference_mode()
    def choose(
        self,
        hidden: torch.Tensor,
        temperatures: list[float | None],
        noise: torch.Tensor | None,
    ) -> list[int] | None:
        """The next token of each row, or None to compute the full logits.

        A greedy row (temperature None) takes the argmax, as :meth:`argmax`. A
        sampling row takes the winner of the sampler's exponential race: the
        argmax over tokens of ``softmax(L / T)[n] / E[n]``, ``E`` its row of
        ``noise``. That is the argmax of the key ``L[n] / T - log E[n]``, which
        lies within ``(A[n] +- b[n]) / T - log E[n]``: tokens whose highest key
        is below the best lowest key (less a margin for the float32 rounding of
        the sampler's own softmax) cannot win, and the others are scored
        exactly. The winner is the sampler's, up to that rounding.

        Args:
            hidden: float32 ``[rows, hidden]``, the input of lm_head.
            temperatures: per row, None for greedy.
            noise: ``[rows, vocab]`` Exp(1) draws (``Sampler.race_noise``), or
                None when every row is greedy.
        """
        if noise is None:
            return self.argmax(hidden)
        m = hidden.shape[0]
        sampling = torch.tensor([t is not None for t in temperatures])
        if not bool((noise > 0).all()):  # E = 0: the sampler divides by zero
            self.fallback_rows += m
            return None
        screened = self.screen(hidden)
        if screened is None:
            self.fallback_rows += m
            return None
        scores, bound = screened
        # The sampler divides the logits by these (greedy rows: 1, unused).
        temps = torch.tensor(
            [t if t is not None else 1.0 for t in temperatures], dtype=torch.float32
        )
        inv_t = temps.double().reciprocal()[:, None]
        gumbel = torch.where(
            sampling[:, None],
            -noise.double().log(),
            torch.zeros((), dtype=torch.float64),
        )
        a64, b64 = scores.double(), bound.double()
        lo = (a64 - b64).mul_(inv_t).add_(gumbel)
        hi = (a64 + b64).mul_(inv_t).add_(gumbel)
        floor = lo.amax(dim=1)
        # Keys within this of the floor may rank above it in the sampler's
        # float32 softmax and division (relative errors of a few 2^-24).
        slack = torch.where(sampling, 2.0**-14 + 2.0**-18 * floor.abs(), 0.0)
        keep = hi.ge_((floor - slack)[:, None])
        cand = self._candidates(keep, floor)
        if cand is None:
            return None
        rows, cols = cand
        exact = self._exact(hidden, rows, cols)
        # As the sampler ranks them: float32 logits / T, exp against the row's
        # best, divided by the noise; greedy rows by the logit itself.
        scaled = exact / temps.index_select(0, rows)
        best = _row_max(rows, scaled, m).index_select(0, rows)
        race = (scaled - best).exp() / noise[rows, cols]
        key = torch.where(sampling.index_select(0, rows), race, exact)
        return self._first_best(rows, cols, key, m)


def _row_max(rows: torch.Tensor, values: torch.Tensor, m: int) -> torch.Tensor:
    """The largest of ``values`` in each of the ``m`` rows (-inf where none)."""
    return torch.full((m,), float("-inf")).scatter_reduce(
        0, rows, values, "amax", include_self=True
    )


def _round_up(t: torch.Tensor) -> torch.Tensor:
    """Float64 -> float32, never below the float64 value."""
    f = t.to(torch.float32)
    return torch.where(
        f.double() < t, torch.nextafter(f, torch.full_like(f, torch.inf)), f
    )


def screened_head_for(
    model: nn.Module, mode: str, device: torch.device
) -> ScreenedGreedyHead | None:
    """The screen for ``model``'s lm_head, or None where it does not apply.

    It applies on CPU when the logits are exactly ``lm_head(hidden)`` (the model's
    ``plain_logits``), lm_head is a float32 linear layer without bias (or a
    :class:`~llmprod.quant.q8.Q8Head`) whose width is a multiple of 16, and
    ``aten._weight_int8pack_mm`` runs here.

    Args:
        model: a native or generic model.
        mode: "auto" (where it applies), "on" (raise where it does not) or "off".
        device: the model's device.

    Raises:
        ValueError: ``mode="on"`` and screening does not apply (says why).
    """
    if mode == "off":
        return None
    head = getattr(model, "lm_head", None)
    weight = head.q8 if isinstance(head, Q8Head) else getattr(head, "weight", None)
    why = None
    if device.type != "cpu":
        why = f"it runs on CPU, not {device.type}"
    elif not getattr(model, "plain_logits", False):
        why = "the model post-processes its logits (scaling or soft-capping)"
    elif isinstance(weight, Q8Weight):
        pass
    elif not isinstance(head, nn.Linear) or head.bias is not None:
        why = (
            f"lm_head is {type(head).__name__}, not a float32 linear layer without bias"
        )
    elif not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32:
        why = "lm_head's weight is not float32"
    elif weight.shape[1] % _FUSED_K_MULTIPLE:
        why = f"the hidden size {weight.shape[1]} is not a multiple of 16"
    elif not is_int8pack_available("cpu"):
        why = "aten._weight_int8pack_mm does not run here"
    if why is not None:
        if mode == "on":
            raise ValueError(f"greedy_screening='on' cannot apply: {why}")
        logger.debug("greedy screening off: %s", why)
        return None
    assert isinstance(weight, (torch.Tensor, Q8Weight))
    return ScreenedGreedyHead(weight)
