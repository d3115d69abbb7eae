"""The batch description every attention backend reads (one object per step)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """A flat batch of query tokens from several sequences (layout in reference.py).

    The first ``num_decodes`` sequences have one query token each and are sorted
    by context length; ``decode_groups`` cuts them into runs of similar length.
    """

    slot_mapping: torch.Tensor  # int64 [num_tokens]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    cu_seqlens_q: torch.Tensor  # int32 [num_seqs + 1]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    block_size: int
    seq_lens_host: list[int]
    cu_seqlens_q_host: list[int]
    num_decodes: int
    decode_groups: list[tuple[int, int]]
    backend_state: dict[str, Any] = field(default_factory=dict)
    """Per-step scratch a backend builds once and reuses in every layer."""

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)
