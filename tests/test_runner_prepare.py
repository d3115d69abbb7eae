"""ModelRunner.prepare on a hand-built step: the exact flat tensors.

Blocks of 4 tokens. Step 1 prefills A (9 tokens, blocks 0-2) and B (6 tokens,
blocks 3-4); each samples one token. Step 2, the one checked, holds:

- two decodes, sorted by context length: B at position 6, A at position 9;
- D, whose first 8 prompt tokens equal A's: a prefix-cache hit on blocks 0 and 1,
  so only its last 2 tokens run, in a new block 5;
- C, a 20-token prompt of which the budget (16) leaves 12: a chunk in blocks
  6-8 that does not reach the prompt's end, so it samples nothing.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from llmprod.config import SchedulerConfig
from llmprod.exec.runner import ModelRunner
from llmprod.kv import KVCacheManager
from llmprod.sampling_params import SamplingParams
from llmprod.sched.request import Request
from llmprod.sched.scheduler import Scheduler, SchedulerOutput

BS = 4
GREEDY = SamplingParams(temperature=0, max_tokens=8)
A = list(range(100, 109))  # 9 tokens
B = list(range(200, 206))  # 6 tokens
C = list(range(300, 320))  # 20 tokens
D = [*A[:8], 400, 401]  # A's first two blocks, then its own


class OneHotModel(nn.Module):
    """No weights: token i of the flat batch gets hidden state one_hot(i), and the
    logits are the hidden states, so a greedy row samples the flat index of the
    hidden state the runner picked for it. Records what it was called with."""

    num_layers = 1
    num_kv_heads = 1
    head_dim = 2

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, ...]] = []

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, *rest: Any
    ) -> Any:
        self.calls.append((input_ids, positions, *rest))
        return torch.eye(len(input_ids), 32)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.float()


def make_runner() -> ModelRunner:
    model: Any = OneHotModel()  # enough of PagedCausalLM for the runner
    return ModelRunner(
        model,
        num_blocks=16,
        block_size=BS,
        device=torch.device("cpu"),
        dtype=torch.float32,
        backend=cast(Any, None),  # the model never calls it
        seed=0,
        eos_token_ids=(),
    )


def run_step(s: Scheduler, tokens: dict[str, int]) -> SchedulerOutput:
    """Schedule a step and record it as run, appending each sampler's token."""
    out = s.schedule()
    s.update(out)
    for e in out.scheduled:
        if e.samples:
            e.request.append_token(tokens[e.request.request_id])
    return out


def build_step() -> tuple[SchedulerOutput, dict[str, Request]]:
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16), kv)
    reqs = {rid: Request(rid, p, GREEDY) for rid, p in zip("ABCD", (A, B, C, D))}
    s.add(reqs["A"])
    s.add(reqs["B"])
    run_step(s, {"A": 109, "B": 206})
    s.add(reqs["D"])
    s.add(reqs["C"])
    return s.schedule(), reqs


def test_the_scheduled_step_is_the_one_described() -> None:
    out, reqs = build_step()
    assert [
        (e.request.request_id, e.start, e.num_new_tokens, e.samples)
        for e in out.scheduled
    ] == [
        ("B", 6, 1, True),
        ("A", 9, 1, True),
        ("D", 8, 2, True),
        ("C", 0, 12, False),
    ]
    assert [reqs[r].block_ids for r in "ABCD"] == [
        [0, 1, 2],
        [3, 4],
        [6, 7, 8],
        [0, 1, 5],
    ]
    assert reqs["D"].num_cached_tokens == 8
    assert out.num_decodes == 2 and out.decode_groups == [(0, 2)]


def test_prepare_flattens_decodes_a_prefix_hit_and_a_chunk() -> None:
    out, _ = build_step()
    input_ids, positions, meta = make_runner().prepare(out)

    # B's token 6 (sampled: 206), A's token 9 (sampled: 109), D's two tokens
    # after its cached prefix, C's first 12 prompt tokens.
    assert input_ids.dtype == torch.long
    assert input_ids.tolist() == [206, 109, 400, 401, *range(300, 312)]
    assert positions.tolist() == [6, 9, 8, 9, *range(12)]
    # cu_seqlens_q: query lengths 1, 1, 2, 12; seq_lens: context after the step.
    assert meta.cu_seqlens_q.dtype == torch.int32
    assert meta.cu_seqlens_q.tolist() == meta.cu_seqlens_q_host == [0, 1, 2, 4, 16]
    assert meta.seq_lens.dtype == torch.int32
    assert meta.seq_lens.tolist() == meta.seq_lens_host == [7, 10, 10, 12]
    # Block tables padded with 0 to the longest (3 blocks).
    assert meta.block_tables.dtype == torch.int32
    assert meta.block_tables.tolist() == [[3, 4, 0], [0, 1, 2], [0, 1, 5], [6, 7, 8]]
    # slot = block * 4 + position % 4: B pos 6 in block 4 -> 18; A pos 9 in block
    # 2 -> 9; D pos 8, 9 in block 5 -> 20, 21 (blocks 0-1 are A's: not written);
    # C pos 0-11 in blocks 6, 7, 8 -> 24..35.
    assert meta.slot_mapping.dtype == torch.long
    assert meta.slot_mapping.tolist() == [18, 9, 20, 21, *range(24, 36)]
    assert meta.block_size == BS
    assert meta.num_decodes == 2 and meta.decode_groups == [(0, 2)]
    assert meta.num_seqs == 4


def test_execute_samples_the_last_token_of_each_entry_that_samples() -> None:
    out, _ = build_step()
    runner = make_runner()
    result = runner.execute(out)
    model = runner.model
    assert isinstance(model, OneHotModel) and len(model.calls) == 1
    ids, positions = model.calls[0][:2]
    assert ids.tolist() == [206, 109, 400, 401, *range(300, 312)]
    assert positions.tolist() == [6, 9, 8, 9, *range(12)]
    # Entries 0, 1, 2 sample (C's chunk does not); their last tokens sit at flat
    # rows 0, 1 and 3, which the one-hot model hands back as the tokens.
    assert result.sampled_entries == [0, 1, 2]
    assert result.sampled.token_ids == [0, 1, 3]
