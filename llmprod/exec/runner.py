"""Runs one scheduled step on the model: flat inputs in, sampled tokens out."""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field

import torch

from llmprod.config import CacheConfig, parse_bytes
from llmprod.errors import InvalidConfigError
from llmprod.exec.parallel import TensorParallelGroup
from llmprod.exec.sampler import Sampler, SamplerOutput, make_logprob
from llmprod.exec.speculative import verify_greedy, verify_sampled
from llmprod.layers.attention import AttentionBackend
from llmprod.layers.attention.metadata import AttentionMetadata
from llmprod.layers.screened_head import ScreenedGreedyHead
from llmprod.lora.manager import LoRAManager
from llmprod.models.protocol import PagedCausalLM
from llmprod.outputs import TokenLogprob
from llmprod.sched.request import Request
from llmprod.sched.scheduler import SchedulerOutput
from llmprod.structured.backend import mask_guessed_run


@dataclass(slots=True)
class StepResult:
    """What one step produced. The runner writes nothing into the requests: the
    engine's output phase applies this."""

    sampled: SamplerOutput
    sampled_entries: list[int] = field(default_factory=list)
    """Indices into ``SchedulerOutput.scheduled`` of the rows in ``sampled``."""
    prompt_logprobs: list[tuple[int, int, list[TokenLogprob | None]]] = field(
        default_factory=list
    )
    """(index into ``scheduled``, first prompt token covered, log-probabilities
    of the prompt tokens this step's chunk predicts; None before
    ``prompt_logprobs_start`` and for token 0)."""
    tokens: dict[int, list[int]] = field(default_factory=dict)
    """Entries (index into ``scheduled``) that carried guesses: the tokens the
    step yields for them, in order (the kept guesses, then the model's own)."""

    def accepted(self) -> dict[int, int]:
        """Kept guesses per speculating entry."""
        return {i: len(toks) - 1 for i, toks in self.tokens.items()}


PROMPT_LOGPROB_ROWS = 256
"""Prompt positions whose log-probabilities go through lm_head in one product
(256 rows of SmolLM2's 49,152-token vocabulary: 48 MiB of float32 logits)."""


def zeroed_kv_caches(
    num_layers: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """One zeroed KV cache per layer.

    Zeroed, not empty: padded decode attention reads slots that were never
    written, masked to weight 0, and 0 * NaN garbage would still be NaN.

    On the CPU the caches are views of one anonymous memory mapping, which the
    operating system fills with zero pages on first touch: the budget becomes
    resident only as blocks are first used, where ``torch.zeros`` would write (and
    so make resident) all of it at start-up.
    """
    if device.type != "cpu":
        return [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)
        ]
    nbytes = num_layers * math.prod(shape) * dtype.itemsize
    buffer = mmap.mmap(-1, nbytes)
    whole = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes)
    return list(whole.view(dtype).view(num_layers, *shape).unbind(0))


class ModelRunner:
    """Owns the model, its KV tensors and the sampler.

    Args:
        model: a native model with ``forward``/``compute_logits``.
        num_blocks: KV blocks per layer.
        block_size: tokens per block.
        device, dtype: where and how the KV cache is held.
        backend: the attention backend.
        seed: seed of the sampler's shared generator.
        eos_token_ids: tokens that end a sequence unless ``ignore_eos``.
        greedy_head: picks the tokens of all-greedy steps of a few rows without
            the full logits (``ScreenedGreedyHead``); None: always the full logits.
    """

    def __init__(
        self,
        model: PagedCausalLM,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        backend: AttentionBackend,
        seed: int,
        eos_token_ids: tuple[int, ...],
        greedy_head: ScreenedGreedyHead | None = None,
    ) -> None:
        self.model = model
        self.greedy_head = greedy_head
        self.block_size = block_size
        self.device = device
        self.backend = backend
        self.eos_token_ids = eos_token_ids
        num_layers = int(model.num_layers)
        kv_heads, head_dim = int(model.num_kv_heads), int(model.head_dim)
        shape = (2, num_blocks, block_size, kv_heads, head_dim)
        self.kv_caches = zeroed_kv_caches(num_layers, shape, dtype, device)
        self.sampler = Sampler(seed, device)
        self.tp: TensorParallelGroup | None = None
        """The tensor-parallel group: each step's inputs go to its workers
        before this rank runs its own shard."""
        self.lora: LoRAManager | None = None
        """The engine's LoRA adapters, once one is loaded: each step holds their
        slots steady and maps its tokens onto them."""

    @staticmethod
    def num_blocks_for(cc: CacheConfig, per_block: int) -> int:
        """KV blocks from ``num_kv_blocks`` or from the ``kv_cache_memory`` budget
        (``per_block``: bytes of one block, all layers, from ``bytes_per_block``)."""
        if cc.num_kv_blocks is not None:
            return cc.num_kv_blocks
        n = parse_bytes(cc.kv_cache_memory or "1GiB") // per_block
        if n < 2:
            raise InvalidConfigError(
                f"kv_cache_memory={cc.kv_cache_memory!r} holds {n} blocks of "
                f"{per_block} bytes; at least 2 are needed",
                "kv_cache_memory",
            )
        return int(n)

    @staticmethod
    def bytes_per_block(
        model: PagedCausalLM, block_size: int, dtype: torch.dtype
    ) -> int:
        num_layers = int(model.num_layers)
        per_token = 2 * model.num_kv_heads * model.head_dim * dtype.itemsize
        return int(num_layers * block_size * per_token)

    def prepare(
        self, out: SchedulerOutput
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flatten the step into input ids, positions and attention metadata."""
        bs = self.block_size
        entries = out.scheduled
        input_ids: list[int] = []
        starts: list[int] = []
        q_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        for e in entries:
            r = e.request
            known = e.num_new_tokens - len(e.draft)
            input_ids.extend(r.token_ids[e.start : e.start + known])
            input_ids.extend(e.draft)
            starts.append(e.start)
            q_lens.append(e.num_new_tokens)
            seq_lens.append(e.start + e.num_new_tokens)
            tables.append(r.block_ids)
        max_blocks = max(len(t) for t in tables)
        table_t = torch.tensor(
            [t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32
        )
        q_lens_t = torch.tensor(q_lens)
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        cu_t = torch.tensor(cu, dtype=torch.int32)
        seq_idx = torch.repeat_interleave(torch.arange(len(entries)), q_lens_t)
        # position of each token = its sequence's start + its index inside the chunk
        positions = (
            torch.arange(cu[-1]) - (cu_t[:-1].long() - torch.tensor(starts))[seq_idx]
        )
        blocks = table_t[seq_idx, positions // bs].long()
        slot_mapping = blocks * bs + positions % bs
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=slot_mapping.to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(
                dev, non_blocking=True
            ),
            cu_seqlens_q=cu_t.to(dev, non_blocking=True),
            block_tables=table_t.to(dev, non_blocking=True),
            block_size=bs,
            seq_lens_host=seq_lens,
            cu_seqlens_q_host=cu,
            num_decodes=out.num_decodes,
            decode_groups=out.decode_groups,
        )
        ids_t = torch.tensor(input_ids, dtype=torch.long).to(dev, non_blocking=True)
        return ids_t, positions.to(dev, non_blocking=True), meta

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        input_ids, positions, meta = self.prepare(out)
        lora = self.lora
        if self.tp is not None:
            try:
                self.tp.step((input_ids, positions, meta))
                hidden = self.model(
                    input_ids, positions, self.kv_caches, meta, self.backend
                )
            except Exception as exc:
                raise self.tp.error(exc) from exc
        elif lora is None or all(e.request.adapter is None for e in out.scheduled):
            hidden = self.model(
                input_ids, positions, self.kv_caches, meta, self.backend
            )
        else:
            with lora.step([(e.request.adapter, e.num_new_tokens)
                            for e in out.scheduled]):  # fmt: skip
                hidden = self.model(
                    input_ids, positions, self.kv_caches, meta, self.backend
                )
        cu = meta.cu_seqlens_q_host
        rows = [i for i, e in enumerate(out.scheduled) if e.samples]
        prompt_lps = self._prompt_logprobs(out, hidden, cu)
        if not rows:
            return StepResult(SamplerOutput([], []), [], prompt_lps)
        if any(out.scheduled[i].draft for i in rows):
            return self._verify(out, rows, hidden, cu, prompt_lps)
        last = torch.tensor([cu[i + 1] - 1 for i in rows], device=hidden.device)
        sampled_hidden = hidden[last]
        requests = [out.scheduled[i].request for i in rows]
        head = self.greedy_head
        noise = None
        if (
            head is not None
            and len(rows) <= head.max_rows
            and all(map(Sampler.races_on_plain_logits, requests))
        ):
            # Drawn once: the full product below (if screening gives up) races
            # over the same noise.
            noise = self.sampler.race_noise(requests, head.vocab)
            temps = [None if r.params.is_greedy else r.params.temperature
                     for r in requests]  # fmt: skip
            token_ids = head.choose(sampled_hidden, temps, noise)
            if token_ids is not None:
                return StepResult(
                    SamplerOutput(token_ids, [None] * len(rows)), rows, prompt_lps
                )
        logits = self.model.compute_logits(sampled_hidden)
        sampled = self.sampler(logits, requests, self.eos_token_ids, noise)
        return StepResult(sampled, rows, prompt_lps)

    def _verify(
        self,
        out: SchedulerOutput,
        rows: list[int],
        hidden: torch.Tensor,
        cu: list[int],
        prompt_lps: list[tuple[int, int, list[TokenLogprob | None]]],
    ) -> StepResult:
        """A step with guesses: the logits (or argmax) of every guessed position
        and of the last known one; each speculating entry keeps what its
        verification accepts, the others sample as usual."""
        spans = [len(out.scheduled[i].draft) + 1 for i in rows]
        index = [
            p for i, n in zip(rows, spans) for p in range(cu[i + 1] - n, cu[i + 1])
        ]
        h = hidden[torch.tensor(index, device=hidden.device)]
        per_pos = [
            out.scheduled[i].request for i, n in zip(rows, spans) for _ in range(n)
        ]
        head = self.greedy_head
        argmax: list[int] | None = None
        if (
            head is not None
            and len(index) <= head.max_rows
            and all(map(Sampler.needs_only_argmax, per_pos))
        ):
            argmax = head.argmax(h)
        logits = self.model.compute_logits(h) if argmax is None else None
        if argmax is None and any(r.params.is_greedy for r in per_pos):
            assert logits is not None
            argmax = logits.argmax(dim=-1).tolist()
        first: list[int] = []
        lps: list[TokenLogprob | None] = []
        plain: list[tuple[int, int]] = []  # (row, position) of entries without guesses
        tokens: dict[int, list[int]] = {}
        pos = 0
        for row, (i, n) in enumerate(zip(rows, spans)):
            e = out.scheduled[i]
            r = e.request
            first.append(-1)
            lps.append(None)
            if not e.draft:
                plain.append((row, pos))
            elif r.matcher is not None:
                assert logits is not None  # a grammar row is never screened
                tokens[i] = self._verify_grammar(logits[pos : pos + n], e.draft, r)
            elif r.params.is_greedy:
                assert argmax is not None
                tokens[i] = verify_greedy(argmax[pos : pos + n], e.draft)
            else:
                assert logits is not None
                probs = Sampler.target_probs(logits[pos : pos + n], [r] * n)
                tokens[i] = verify_sampled(probs, e.draft, self.sampler.generator_of(r))
            if e.draft:
                first[row] = tokens[i][0]
            pos += n
        if plain:
            reqs = [out.scheduled[rows[row]].request for row, _ in plain]
            if logits is None:  # all greedy, screened: the argmax is the token
                assert argmax is not None
                got = SamplerOutput([argmax[p] for _, p in plain], [None] * len(plain))
            else:
                at = torch.tensor([p for _, p in plain], device=logits.device)
                got = self.sampler(logits[at], reqs, self.eos_token_ids)
            for (row, _), tok, lp in zip(plain, got.token_ids, got.logprobs):
                first[row], lps[row] = tok, lp
        return StepResult(SamplerOutput(first, lps), rows, prompt_lps, tokens)

    def _verify_grammar(
        self, logits: torch.Tensor, draft: list[int], r: Request
    ) -> list[int]:
        """Verify guesses under the request's grammar: each position is masked
        as the grammar stands after the guesses before it; a guess the grammar
        forbids (and every one after it) is refused."""
        masked, m = mask_guessed_run(logits, draft, r.matcher)
        if r.params.is_greedy:
            return verify_greedy(masked.argmax(dim=-1).tolist(), draft[:m])
        probs = Sampler.target_probs(masked, [r] * (m + 1))
        return verify_sampled(probs, draft[:m], self.sampler.generator_of(r))

    def _prompt_logprobs(
        self, out: SchedulerOutput, hidden: torch.Tensor, cu: list[int]
    ) -> list[tuple[int, int, list[TokenLogprob | None]]]:
        """Log-probability of each prompt token given the ones before it, for the
        entries that asked and whose prompt logprobs are not complete yet:
        (index into ``scheduled``, index of the first prompt token covered, the
        entries). Tokens before ``prompt_logprobs_start`` get None."""
        found: list[tuple[int, int, list[TokenLogprob | None]]] = []
        rows: list[torch.Tensor] = []  # hidden rows to score, all entries together
        wanted: list[tuple[list[TokenLogprob | None], list[int], int]] = []
        for i, e in enumerate(out.scheduled):
            r = e.request
            k = r.params.prompt_logprobs
            if k is None or r.prompt_logprobs_done:
                continue
            num_prompt = r.num_prompt_tokens
            # Position p predicts prompt token p + 1; token 0 has nothing before it.
            first = e.start + 1 if e.start else 0
            end = min(e.start + e.num_new_tokens, num_prompt - 1)
            lo = max(e.start, r.params.prompt_logprobs_start - 1)
            lps: list[TokenLogprob | None] = [None] * (max(lo, e.start) + 1 - first)
            if end > lo:
                rows.append(hidden[cu[i] + (lo - e.start) : cu[i] + (end - e.start)])
                wanted.append((lps, r.prompt_token_ids[lo + 1 : end + 1], k))
            else:
                lps = [None] * max(min(end, num_prompt - 1) + 1 - first, 0)
            found.append((i, first, lps))
        if rows:
            self._score_rows(torch.cat(rows), wanted)
        return found

    def _score_rows(
        self,
        hidden: torch.Tensor,
        wanted: list[tuple[list[TokenLogprob | None], list[int], int]],
    ) -> None:
        """Append to each ``(lps, targets, k)`` of ``wanted`` the log-probability
        of each target (and its ``k`` best alternatives) from consecutive rows of
        ``hidden``. The rows of all entries go through lm_head together, in
        slices of ``PROMPT_LOGPROB_ROWS`` (one matrix product reads the head's
        weights once, where one per entry would read them once each)."""
        targets = [(lps, t, k) for lps, ts, k in wanted for t in ts]
        for at in range(0, len(targets), PROMPT_LOGPROB_ROWS):
            part = targets[at : at + PROMPT_LOGPROB_ROWS]
            lp = torch.log_softmax(
                self.model.compute_logits(hidden[at : at + len(part)]), dim=-1
            )
            for j, (lps, t, k) in enumerate(part):
                lps.append(make_logprob(lp[j], t, k))
