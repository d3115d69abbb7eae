"""Projections that add each token's own LoRA delta to the base output.

Every resident adapter has a slot; a module holds the slots stacked:
``A`` ``[slots, in, shards * R]`` (the shards' ``A`` side by side) and one
``B`` per shard ``[slots, R, out_shard]``, zero-padded to the largest rank R of
the resident adapters. A step's tokens carry a slot each (or none), and the
delta is computed per group of tokens that share a slot, never by merging
weights, so rows of different adapters and rows of the base model run in one
batch:

* every token on one adapter: two matrix products on the whole batch;
* a few groups: gather each group's rows, two products, add them back;
* steps of long runs of tokens (prefill chunks: each request's tokens are
  side by side in the flat batch): "runs", two products per run of tokens on
  one adapter, on views of the batch (nothing gathered or scattered);
* several adapters in a step of few tokens (decode): "dense", every token
  through every taking-part slot's ``A`` in one product (the slots' ``A`` side
  by side), the columns of other slots zeroed by a one-hot mask, then one
  product with the slots' ``B`` stacked; three operations whatever the number of
  adapters, at the cost of multiplying by ``slots * R`` columns instead of ``R``
  (small next to the base product while ``slots * R`` is small);
* many small groups in a larger step: the groups padded into one
  ``[slots, rows, in]`` tensor and two batched products over the stacked slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

RUNS_MIN_LENGTH = 16
"""Runs of at least this many tokens on one adapter (prefill chunks) take the
"runs" path; the step's other adapter tokens (decodes beside them) are gathered
and take the path their count and slots call for."""

DENSE_MAX_TOKEN_SLOTS = 4096
"""Steps with at most this many (token, slot) pairs take the "dense" path: decode
steps of many requests over many adapters; a step with long prefill chunks
gathers per group instead."""


@dataclass(slots=True)
class LoRABatch:
    """How one step's tokens map onto adapter slots (set by the manager under
    its lock for the duration of the model's forward pass)."""

    mode: str | None = None
    """None (no token has an adapter), "all" (every token on ``slot``),
    "runs" (``runs``: (slot, first token, end) of each run of tokens on one
    adapter), "groups" (``groups``: (slot, token index) pairs), "dense" or
    "padded"."""
    runs: list[tuple[int, int, int]] = field(default_factory=list)
    rest: LoRABatch | None = None
    """"runs": how the tokens outside the runs map onto slots (None: no such
    token has an adapter)."""
    rest_index: torch.Tensor | None = None
    """"runs": the flat batch's index of each of those tokens."""
    slot: int = 0
    groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    num_slots: int = 0
    """"padded": slots 0..num_slots-1 take part."""
    gather: torch.Tensor | None = None
    """"padded": token index of each (slot, row) place, ``[num_slots * rows]``
    (padding places point at token 0 and are dropped)."""
    rows: int = 0
    keep: torch.Tensor | None = None
    """"padded": the places that hold real tokens."""
    tokens: torch.Tensor | None = None
    """"padded": the token of each kept place."""
    onehot: torch.Tensor | None = None
    """"dense": ``[tokens, num_slots]``, 1 at each token's slot (a row of zeros
    for a token without adapter)."""

    def set(self, slots: list[int], device: torch.device) -> None:
        """Group the step's tokens (``slots[i]``: token i's slot, -1: none)."""
        self.clear()
        by_slot: dict[int, list[int]] = {}
        for i, s in enumerate(slots):
            if s >= 0:
                by_slot.setdefault(s, []).append(i)
        if not by_slot:
            return
        if len(by_slot) == 1 and len(next(iter(by_slot.values()))) == len(slots):
            self.mode, self.slot = "all", next(iter(by_slot))
            return
        n = sum(len(v) for v in by_slot.values())
        runs: list[tuple[int, int, int]] = []
        for i, s in enumerate(slots):
            if s < 0:
                continue
            if runs and runs[-1][0] == s and runs[-1][2] == i:
                runs[-1] = (s, runs[-1][1], i + 1)
            else:
                runs.append((s, i, i + 1))
        long = [run for run in runs if run[2] - run[1] >= RUNS_MIN_LENGTH]
        if long:
            self.mode, self.runs = "runs", long
            others = [i for _, lo, hi in runs if hi - lo < RUNS_MIN_LENGTH
                      for i in range(lo, hi)]  # fmt: skip
            if others:
                self.rest = LoRABatch()
                self.rest.set([slots[i] for i in others], device)
                self.rest_index = torch.tensor(others, device=device)
            return
        num_slots = max(by_slot) + 1
        if len(by_slot) > 1 and len(slots) * num_slots <= DENSE_MAX_TOKEN_SLOTS:
            onehot = torch.zeros(len(slots), num_slots)
            for s, idx in by_slot.items():
                onehot[idx, s] = 1.0
            self.mode, self.num_slots = "dense", num_slots
            self.onehot = onehot.to(device)
            return
        rows = max(len(v) for v in by_slot.values())
        # Few groups, or groups so uneven (a long prefill beside decodes) that
        # padding would multiply the work: one gather per group.
        if len(by_slot) <= 2 or num_slots * rows > 2 * n:
            self.mode = "groups"
            self.groups = [
                (s, torch.tensor(v, device=device)) for s, v in sorted(by_slot.items())
            ]
            return
        gather = [0] * (num_slots * rows)
        keep: list[int] = []
        tokens: list[int] = []
        for s, idx in by_slot.items():
            for j, t in enumerate(idx):
                gather[s * rows + j] = t
                keep.append(s * rows + j)
                tokens.append(t)
        self.mode, self.num_slots, self.rows = "padded", num_slots, rows
        self.gather = torch.tensor(gather, device=device)
        self.keep = torch.tensor(keep, device=device)
        self.tokens = torch.tensor(tokens, device=device)

    def clear(self) -> None:
        self.mode = None
        self.groups = []
        self.runs = []
        self.rest = self.rest_index = None
        self.gather = self.keep = self.tokens = self.onehot = None


def _add_delta(
    y: torch.Tensor, xa: torch.Tensor, bs: list[torch.Tensor], rank: int
) -> None:
    """``y += `` each shard's ``B`` applied to its part of ``x A``, accumulated in
    place (the product's output is as wide as the base's: a temporary of that
    size, written then added, cost as much as the base product in prefill)."""
    col = 0
    for j, b in enumerate(bs):
        width = b.shape[-1]
        y[:, col : col + width].addmm_(xa[:, j * rank : (j + 1) * rank], b)
        col += width


def _delta(xa: torch.Tensor, bs: list[torch.Tensor], rank: int) -> torch.Tensor:
    """Each shard's ``B`` applied to its part of ``x A``, side by side."""
    if len(bs) == 1:
        return torch.matmul(xa, bs[0])
    return torch.cat(
        [torch.matmul(xa[..., j * rank : (j + 1) * rank], b) for j, b in enumerate(bs)],
        dim=-1,
    )


class LoRALinear(nn.Module):
    """A base projection (any kind: float, packed, int8, 4-bit) plus the LoRA
    deltas of the step's tokens. With no adapter loaded it is the base module."""

    def __init__(self, base: nn.Module, batch: LoRABatch) -> None:
        super().__init__()
        self.base = base
        self.batch = batch
        self.a: torch.Tensor | None = None
        """``[slots, in, shards * rank]``; None when no resident adapter adapts
        this module."""
        self.b: list[torch.Tensor] = []
        """Per shard ``[slots, rank, out_shard]``."""
        self.rank = 0
        self._a_cols: torch.Tensor | None = None
        """``a`` as ``[in, slots * shards * rank]`` (for "dense"), made from the
        ``a`` it was made from (``_a_cols_of``) on first use after a restack."""
        self._a_cols_of: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.batch.mode is not None and self.a is not None:
            self._add_deltas(y, x, self.batch)
        return y

    def _add_deltas(self, y: torch.Tensor, x: torch.Tensor, b: LoRABatch) -> None:
        """``y += `` the LoRA delta of each token of ``x`` as ``b`` maps them."""
        a = self.a
        assert a is not None
        r = self.rank
        if b.mode == "all":
            _add_delta(y, x @ a[b.slot], [m[b.slot] for m in self.b], r)
        elif b.mode == "dense":
            assert b.onehot is not None
            n, t = b.num_slots, x.shape[0]
            if self._a_cols_of is not a:  # the slots' A side by side (restacked)
                self._a_cols = a.permute(1, 0, 2).reshape(a.shape[1], -1)
                self._a_cols_of = a
            cols = self._a_cols
            assert cols is not None
            oh = b.onehot if b.onehot.dtype == x.dtype else b.onehot.to(x.dtype)
            xa = (x @ cols[:, : n * a.shape[2]]).view(t, n, -1)
            xa = xa * oh[:, :, None]
            parts = [
                xa[:, :, j * r : (j + 1) * r].reshape(t, n * r)
                @ m[:n].reshape(n * r, -1)
                for j, m in enumerate(self.b)
            ]
            y += parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        elif b.mode == "runs":
            for s, lo, hi in b.runs:
                _add_delta(y[lo:hi], x[lo:hi] @ a[s], [m[s] for m in self.b], r)
            if b.rest is not None:
                assert b.rest_index is not None
                xs = x.index_select(0, b.rest_index)
                d = y.new_zeros(xs.shape[0], y.shape[1])
                self._add_deltas(d, xs, b.rest)
                y.index_add_(0, b.rest_index, d)
        elif b.mode == "groups":
            for s, idx in b.groups:
                xs = x.index_select(0, idx)
                y.index_add_(0, idx, _delta(xs @ a[s], [m[s] for m in self.b], r))
        else:
            assert b.gather is not None and b.keep is not None and b.tokens is not None
            n = b.num_slots
            xp = x.index_select(0, b.gather).view(n, b.rows, -1)
            d = _delta(torch.bmm(xp, a[:n]), [m[:n] for m in self.b], r)
            y.index_add_(0, b.tokens, d.view(n * b.rows, -1).index_select(0, b.keep))
