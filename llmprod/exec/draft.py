"""Draft-model speculation: a smaller (or quantized) model guesses the next tokens.

The scheduler asks :class:`DraftProposer` for up to k guesses of a decoding
request; the runner then verifies them on the target model in one forward pass
(``llmprod.exec.speculative``), exactly as it verifies prompt-lookup guesses.

The draft model keeps its own paged KV cache, apart from the target's, with as
many blocks as the target's (the tokens in flight never outnumber what the
target's cache holds). A request that drafts gets a *lane*: its own blocks,
taken from the draft's pool as it grows. A lane remembers the tokens whose KV it
holds; the next proposal for its request keeps the longest common prefix with
the request's tokens (the guesses the target accepted stay; refused ones are
overwritten) and runs only the rest: the prompt once, then one or two positions
per step. On the CPU the cache is an anonymous mapping, resident only where
written.

Guesses are the draft's argmax, a deterministic proposal, so the target's
verification (greedy: keep while equal to its argmax; sampled: keep guess ``x``
with probability ``p(x)``) yields the target model's own tokens and distribution
whatever the draft says; a poor draft costs speed, never correctness.

A lane is given to a request when it first drafts (at most ``lanes`` at once)
and taken back, with its blocks, when lanes or blocks run out and the request
holding it has finished or is not running (its KV is rebuilt if it drafts again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from llmprod.exec.runner import zeroed_kv_caches
from llmprod.exec.threads import run_on_compute_thread
from llmprod.layers.attention import AttentionBackend
from llmprod.layers.attention.metadata import AttentionMetadata
from llmprod.layers.screened_head import ScreenedGreedyHead
from llmprod.models.protocol import PagedCausalLM
from llmprod.sched.request import Request, RequestStatus
from llmprod.sched.speculative import NgramProposer

__all__ = ["DraftProposer"]

LOOKUP_FIRST_MIN = 2
"""Shortest suffix whose earlier occurrence replaces the draft's guesses (or
``prompt_lookup_min`` if larger). Chosen in exploratory runs at batch 1 on 2
cores, where 2 gained more than 1 or 3 on copying, summarising, answering from
a context and code (a one-token match guesses worse than the draft)."""


@dataclass(slots=True)
class _Lane:
    index: int
    request: Request | None = None
    tokens: list[int] = field(default_factory=list)
    """The tokens whose KV this lane holds, positions 0.. in order."""
    blocks: list[int] = field(default_factory=list)
    """The lane's blocks in the draft's cache, in position order."""


class DraftProposer:
    """Guesses from a draft model through its own paged KV lanes.

    Args:
        model: the draft model (native or generic path, any quantization).
        lanes: requests that may hold draft KV at once.
        num_blocks: blocks of the draft's cache (the target's count).
        block_size: tokens per block.
        device, dtype: where and how the lanes' KV is held.
        backend: the attention backend.
        greedy_head: the draft's screened argmax (None: full logits).
        target_vocab: the target model's vocabulary size (a guess past it is
            dropped, with the ones after it).
        eos_token_ids: drafting stops after one of these.
        lookup: prompt lookup tried first (its guesses, when a suffix of at
            least ``LOOKUP_FIRST_MIN`` tokens occurred before, replace the
            draft's for that step).
    """

    def __init__(
        self,
        model: PagedCausalLM,
        lanes: int,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        backend: AttentionBackend,
        greedy_head: ScreenedGreedyHead | None,
        target_vocab: int,
        eos_token_ids: tuple[int, ...],
        lookup: NgramProposer | None = None,
    ) -> None:
        self.model = model
        self.backend = backend
        self.greedy_head = greedy_head
        self.device = device
        self.block_size = block_size
        self.target_vocab = target_vocab
        self.eos_token_ids = frozenset(eos_token_ids)
        self.lookup = lookup
        self._lookup_min = max(
            LOOKUP_FIRST_MIN, lookup.cfg.prompt_lookup_min if lookup else 0
        )
        self.lookups = 0
        """Proposals that came from prompt lookup (no draft forward)."""
        self.free_blocks = list(range(num_blocks - 1, -1, -1))
        shape = (
            2,
            num_blocks,
            block_size,
            int(model.num_kv_heads),
            int(model.head_dim),
        )
        self.kv_caches = zeroed_kv_caches(int(model.num_layers), shape, dtype, device)
        self.kv_bytes = int(model.num_layers) * math.prod(shape) * dtype.itemsize
        """The draft cache's size (on the CPU, address space; resident as used)."""
        self.lanes = [_Lane(i) for i in range(lanes)]
        self.forwards = 0
        """Draft forward passes run (each over one or more positions)."""

    # ------------------------------------------------------------------ lanes
    def _lane_of(self, req: Request) -> _Lane | None:
        for lane in self.lanes:
            if lane.request is req:
                return lane
        for lane in self.lanes:
            if lane.request is None:
                lane.request = req
                return lane
        for lane in self._idle():
            self._release(lane)
            lane.request = req
            return lane
        return None

    def _idle(self) -> list[_Lane]:
        """Lanes whose request finished or is not running (waiting, preempted)."""
        return [
            lane
            for lane in self.lanes
            if lane.request is not None
            and lane.request.status is not RequestStatus.RUNNING
        ]

    def _release(self, lane: _Lane) -> None:
        self.free_blocks.extend(reversed(lane.blocks))
        lane.request, lane.tokens, lane.blocks = None, [], []

    def _reserve(self, lane: _Lane, num_tokens: int) -> bool:
        """Blocks for ``num_tokens`` positions in ``lane`` (taking back idle
        lanes' blocks if the pool runs short)."""
        need = math.ceil(num_tokens / self.block_size) - len(lane.blocks)
        if need > len(self.free_blocks):
            for other in self._idle():
                if other is not lane:
                    self._release(other)
        if need > len(self.free_blocks):
            return False
        for _ in range(max(need, 0)):
            lane.blocks.append(self.free_blocks.pop())
        return True

    # --------------------------------------------------------------- proposing
    def draft(self, req: Request, k: int) -> list[int]:
        """Up to ``k`` guesses following ``req``'s tokens ([] when no lane or no
        blocks are free). The model runs on the compute thread."""
        if self.lookup is not None:
            guesses = self.lookup.propose(req.token_ids, k, n_min=self._lookup_min)
            if guesses:
                self.lookups += 1
                return guesses
        lane = self._lane_of(req)
        if lane is None:
            return []
        # The last guess is not run: positions up to len + k - 2 are written.
        if not self._reserve(lane, len(req.token_ids) + k - 1):
            self._release(lane)
            return []
        return run_on_compute_thread(self._draft, lane, list(req.token_ids), k)

    @torch.inference_mode()
    def _draft(self, lane: _Lane, tokens: list[int], k: int) -> list[int]:
        keep = 0
        for a, b in zip(lane.tokens, tokens):
            if a != b:
                break
            keep += 1
        # The last known token always runs: its logits give the first guess.
        keep = min(keep, len(tokens) - 1)
        guess = self._forward(lane, tokens[keep:], keep)
        lane.tokens = list(tokens)
        out: list[int] = []
        while True:
            if guess >= self.target_vocab:
                break
            out.append(guess)
            if len(out) == k or guess in self.eos_token_ids:
                break
            guess = self._forward(lane, [guess], len(lane.tokens))
            lane.tokens.append(out[-1])
        return out

    def _forward(self, lane: _Lane, ids: list[int], start: int) -> int:
        """Run ``ids`` at positions ``start``.. of ``lane``; the argmax after the
        last one."""
        n = len(ids)
        bs = self.block_size
        dev = self.device
        end = start + n
        table = torch.tensor(lane.blocks[: math.ceil(end / bs)], dtype=torch.int32)
        positions = torch.arange(start, end)
        slots = table[positions // bs].long() * bs + positions % bs
        meta = AttentionMetadata(
            slot_mapping=slots.to(dev),
            seq_lens=torch.tensor([end], dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=dev),
            block_tables=table.unsqueeze(0).to(dev),
            block_size=bs,
            seq_lens_host=[end],
            cu_seqlens_q_host=[0, n],
            num_decodes=1 if n == 1 else 0,
            decode_groups=[(0, 1)] if n == 1 else [],
        )
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
        hidden = self.model(
            ids_t, positions.to(dev), self.kv_caches, meta, self.backend
        )
        self.forwards += 1
        last = hidden[-1:]
        if self.greedy_head is not None:
            picked = self.greedy_head.argmax(last)
            if picked is not None:
                return int(picked[0])
        return int(self.model.compute_logits(last).argmax(dim=-1)[0])
