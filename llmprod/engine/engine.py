"""The Engine: the public API users call, in any thread or event loop.

It builds the parts (admission, the step loop, output processing) and turns the
sync, async and streaming calls into requests for the loop; each request's
results come back through its own sink. Follow one request through the parts in
``docs/architecture.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import torch

from llmprod.answers.caches import AnswerCaches
from llmprod.config import EngineConfig
from llmprod.engine import inputs, report
from llmprod.engine.admission import Admission
from llmprod.engine.core import EngineCore
from llmprod.engine.inputs import Message, Prompt
from llmprod.engine.loading import (
    DraftModel,
    load_draft,
    load_model,
    speed_up,
    start_tensor_parallel,
)
from llmprod.engine.output import Handle, OutputProcessor
from llmprod.errors import (
    EngineClosedError,
    InvalidConfigError,
    InvalidRequestError,
    UnsupportedModelError,
)
from llmprod.exec.draft import DraftProposer
from llmprod.exec.memory import release_freed_memory
from llmprod.exec.parallel import TensorParallelGroup, shard_llama, shard_plan
from llmprod.exec.runner import ModelRunner
from llmprod.exec.threads import run_in_own_thread
from llmprod.kv.manager import KVCacheManager
from llmprod.layers.attention import get_attention_backend
from llmprod.layers.cpu import attach_fused_ops
from llmprod.lora import AdapterInfo, LoRAManager
from llmprod.models.loader import eos_token_ids, max_model_len, pick_device
from llmprod.models.protocol import PagedCausalLM
from llmprod.ops.metrics import (
    MetricsRecorder,
    MetricsSnapshot,
)
from llmprod.outputs import Completion, Delta
from llmprod.quant.footprint import weight_bytes_by_format
from llmprod.sampling_params import SamplingParams
from llmprod.sched.request import Request
from llmprod.sched.scheduler import Scheduler
from llmprod.sched.speculative import NgramProposer, SpeculativeConfig
from llmprod.structured.backend import GrammarBackend

if TYPE_CHECKING:
    from llmprod.ops.limits import Throttle
    from llmprod.sched.request import Request

logger = logging.getLogger("llmprod")


class Engine:
    """An embedded LLM engine. Build it with :meth:`from_pretrained`.

    Thread-safe: ``generate``, ``chat``, ``stream`` and their async forms may be
    called from many threads and event loops at once.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        hf_config: Any,
        model_path: Path,
        config: EngineConfig,
        model_name: str,
        quantization: str | None = None,
        quantization_source: str | None = None,
        tp: TensorParallelGroup | None = None,
        draft: DraftModel | None = None,
    ) -> None:
        self.model = model
        self.tp = tp
        """The tensor-parallel workers and their group (None: one process)."""
        self.tokenizer = tokenizer
        self.hf_config = hf_config
        self.model_path = model_path
        self.config = config
        self.model_name = model_name
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.model_impl: str = getattr(model, "impl", "native")
        """"native" (llmprod's own model code) or "generic" (transformers')."""
        fast = speed_up(model, config, self.device, self.dtype)
        self.linear_backend = fast.linear_backend
        """"onednn" or "torch": who computes the float32 linear layers."""
        self.packed_linears = fast.packed_linears
        """Linear layers whose weights oneDNN holds in its blocked layout."""
        self.greedy_head = fast.greedy_head
        """Picks the tokens of small all-greedy steps without the full lm_head
        product (``llmprod.layers.screened_head``); None where it is off."""
        self.weight_bytes = weight_bytes_by_format(model, self.greedy_head)
        """Resident weight bytes by format ("float32", "int8", "int4"...)."""
        self.vocab_size = int(hf_config.vocab_size)
        self.max_model_len = max_model_len(hf_config, config.max_model_len)
        self.eos_token_ids = eos_token_ids(hf_config, tokenizer, model_path)
        if not isinstance(model, PagedCausalLM):
            raise UnsupportedModelError(
                f"{type(model).__name__} does not run on the paged KV cache (see "
                "llmprod.models.protocol.PagedCausalLM); load it with from_pretrained"
            )
        cc = config.cache_config
        self.backend = get_attention_backend(config.attention_backend, self.device)
        try:
            fused = attach_fused_ops(
                model,
                config.fused_ops,
                self.backend.name,
                self.device,
                self.dtype,
                self.greedy_head,
            )
        except ValueError as exc:
            raise InvalidConfigError(str(exc), "fused_ops") from exc
        self.fused_cpu_ops = fused
        """Whether the step runs the fused CPU operations (llmprod.layers.cpu)."""
        self.block_size: int = cc.block_size or self.backend.default_block_size
        self.kv_block_bytes = ModelRunner.bytes_per_block(
            model, self.block_size, self.dtype
        )
        self.num_blocks = ModelRunner.num_blocks_for(cc, self.kv_block_bytes)
        self.quantization = quantization
        # Where the quantized weights came from: "quantized-at-load" (llmprod
        # quantized them, or reloaded its own saved copy), "gguf" (the file's own
        # Q4 codes) or "bitsandbytes-checkpoint".
        self.quantization_source = quantization_source
        self.throttle = _make_throttle(config.limits, config.default_limits)
        self.guards = list(config.guards or [])
        self._embedder: Any = None
        self.answers: AnswerCaches | None = None
        if config.cache is not None or config.semantic_cache is not None:
            self.answers = AnswerCaches(
                config.cache,
                config.semantic_cache,
                model_path,
                str(self.dtype).removeprefix("torch."),
                quantization,
                config.semantic_threshold,
                config.cache_ttl,
                cache_scope=config.cache_scope,
            )
        self.recorder = MetricsRecorder()
        self.admission = Admission(
            config,
            tokenizer,
            model_name,
            self.vocab_size,
            self.max_model_len,
            self.num_blocks,
            self.block_size,
            self.device,
            self.throttle,
            self.answers,
            GrammarBackend(tokenizer, self.vocab_size, self.eos_token_ids),
        )
        kv = KVCacheManager(self.num_blocks, self.block_size, cc.enable_prefix_caching)
        runner = ModelRunner(
            model,
            self.num_blocks,
            self.block_size,
            self.device,
            self.dtype,
            self.backend,
            config.seed,
            self.eos_token_ids,
            self.greedy_head,
        )
        self.output = OutputProcessor(
            config,
            tokenizer,
            self.eos_token_ids,
            self.max_model_len,
            self.recorder,
            self.answers,
        )
        spec = SpeculativeConfig.parse(config.speculative)
        self.draft: DraftProposer | None = None
        """The draft model's proposer (``speculative`` with ``method="draft"``)."""
        if draft is not None:
            assert spec is not None
            attach_fused_ops(
                draft.loaded.model,
                "off" if config.fused_ops == "off" else "auto",
                self.backend.name,
                self.device,
                draft.dtype,
                draft.fast.greedy_head,
            )
            self.draft = DraftProposer(
                draft.loaded.model,  # type: ignore[arg-type]
                spec.max_num_seqs,
                self.num_blocks,
                self.block_size,
                self.device,
                draft.dtype,
                self.backend,
                draft.fast.greedy_head,
                self.vocab_size,
                self.eos_token_ids,
                NgramProposer(spec) if spec.lookup_first else None,
            )
            self.draft_weight_bytes = weight_bytes_by_format(
                draft.loaded.model, draft.fast.greedy_head
            )
            """The draft model's resident weight bytes by format."""
        scheduler = Scheduler(config.scheduler_config, kv, spec, self.draft)
        scheduler.max_model_len = self.max_model_len
        self.core = EngineCore(
            scheduler,
            kv,
            runner,
            self.output,
            self.recorder,
            config.num_threads,
        )
        """The step loop; it owns the scheduler, the KV cache and the runner."""
        self.core.on_dead = self._stopped
        if tp is not None:
            tp.setup(self.num_blocks, self.block_size)
            runner.tp = tp
        self._dead: BaseException | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        self.core.start()
        logger.info(
            "engine ready: %s (%s path) on %s/%s, %d KV blocks x %d tokens, "
            "attention=%s",
            model_name,
            self.model_impl,
            self.device,
            self.dtype,
            self.num_blocks,
            self.block_size,
            self.backend.name,
        )

    # The step loop's parts, for diagnostics and tests (the loop thread owns them).
    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler

    @property
    def kv(self) -> KVCacheManager:
        return self.core.kv

    @property
    def runner(self) -> ModelRunner:
        return self.core.runner

    # ------------------------------------------------------------------ building
    @classmethod
    def from_pretrained(
        cls, model: str | Path = "smollm2-135m", **kwargs: Any
    ) -> Engine:
        """Load a registered model name, a transformers folder or a ``.gguf`` file.

        Args:
            model: e.g. ``"smollm2-135m"`` (fetched and converted once), a folder
                with ``config.json`` and safetensors, or a GGUF file.
            **kwargs: fields of :class:`EngineConfig`, :class:`CacheConfig` and
                :class:`SchedulerConfig`, flat (e.g. ``kv_cache_memory="1GiB"``,
                ``max_num_seqs=32``).

        Raises:
            InvalidConfigError: unknown model or option (the message lists the
                accepted values); UnsupportedModelError for other architectures.
        """
        config = EngineConfig.from_kwargs(**kwargs)
        device = pick_device(config.device)
        if config.num_threads is not None and device.type == "cpu":
            # Process-wide: the loading thread and the compute thread take it up.
            torch.set_num_threads(config.num_threads)
        # Loading runs torch ops in parallel; doing it on a thread that then exits
        # leaves no idle OpenMP team behind to slow the steps (exec/threads.py).
        return run_in_own_thread(cls._load, model, config, device)

    @classmethod
    def _load(
        cls, model: str | Path, config: EngineConfig, device: torch.device
    ) -> Engine:
        draft = load_draft(model, config, device)
        tp = None
        if config.tensor_parallel_size > 1:
            tp = start_tensor_parallel(model, config, device)
        try:
            m = load_model(model, config, device)
            if tp is not None:
                plan = shard_plan(m.hf_config, tp.size, 0)
                shard_llama(m.model, plan, tp.comm)
            return cls(
                m.model,
                m.tokenizer,
                m.hf_config,
                m.path,
                config,
                str(model),
                m.quantization,
                m.quantization_source,
                tp,
                draft,
            )
        except BaseException:
            if tp is not None:
                tp.close()
            raise

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        progress: bool = False,
        tenant: str = "default",
        return_exceptions: bool = False,
        wait_timeout: float | None = None,
        grounding_context: str | None = None,
        adapter: str | Sequence[str | None] | None = None,
    ) -> list[Completion]:
        """Complete one prompt or many; one :class:`Completion` per prompt, in order.

        Args:
            prompts: a string, a list of token ids, or a list of either.
            params: one SamplingParams for all, or one per prompt.
            progress: show a tqdm progress bar.
            tenant: who is asking (for limits and accounting).
            return_exceptions: put a failed request's exception in its place in
                the list instead of raising. Without it, bad input raises before
                anything runs, and a request failing in the model raises after
                the others have finished.
            wait_timeout: over a tenant limit, wait up to this many seconds for
                room instead of raising :class:`~llmprod.errors.RateLimited` at
                once.
            grounding_context: text the answers should be grounded in; each
                completion gets ``flags["grounding"]`` (MiniLM similarity of each
                output sentence to the context).
            adapter: the LoRA adapter to run with (a name given to
                :meth:`load_adapter`), one per prompt, or None for the base model.
        """
        done: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        prepared, handles = self._admit_batch(
            prompts, params, tenant, return_exceptions, wait_timeout,
            lambda i: functools.partial(_put_indexed, done, i), adapter,
        )  # fmt: skip
        results: list[Any] = [
            req if isinstance(req, BaseException) else None for req in prepared
        ]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(handles), desc="generate", unit="req")
        try:
            for _ in handles:
                i, item = done.get()
                results[i] = item
                if bar is not None:
                    bar.update(1)
        except BaseException:
            for h in handles:
                self.abort(h.request.request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        if not return_exceptions:
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        if grounding_context is not None:
            self._add_grounding(results, grounding_context)
        return results

    def _add_grounding(self, results: list[Any], context: str) -> None:
        from llmprod.ops.signals import grounding

        if self._embedder is None:
            from llmprod.answers.embeddings import Embedder

            self._embedder = Embedder()
        for r in results:
            if isinstance(r, Completion):
                r.flags["grounding"] = grounding(r.text, context, self._embedder)

    @overload
    def chat(
        self,
        messages: Sequence[Message],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        **kwargs: Any,
    ) -> Completion: ...

    @overload
    def chat(
        self,
        messages: Sequence[Sequence[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        **kwargs: Any,
    ) -> list[Completion]: ...

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        **kwargs: Any,
    ) -> Completion | list[Completion]:
        """Answer one conversation (returns a Completion) or a list of them (a list).

        Messages are ``{"role": ..., "content": ...}`` dicts, rendered with the
        model's chat template.
        """
        single = inputs.is_conversation(messages)
        convs = [messages] if single else list(messages)
        for conv in convs:
            inputs.check_messages(conv)  # type: ignore[arg-type]
        outs = self.generate(convs, params, **kwargs)  # type: ignore[arg-type]
        return outs[0] if single else outs

    def stream(
        self,
        prompt: Prompt | Sequence[Message],
        params: SamplingParams | None = None,
        *,
        tenant: str = "default",
        wait_timeout: float | None = None,
        adapter: str | None = None,
    ) -> Iterator[Delta]:
        """Yield :class:`Delta` pieces as they are produced; the last one carries
        ``finish_reason`` and the full ``completion``. Stopping the iteration
        early aborts the request."""
        req = self.admission.admit(
            prompt, params or SamplingParams(), tenant, wait_timeout, adapter
        )
        q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        h = self._submit(req, q.put, True)
        return self._iter_stream(h, q)

    def _admit_batch(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None,
        tenant: str,
        return_exceptions: bool,
        wait_timeout: float | None,
        sink_for: Callable[[int], Callable[[Any], None]],
        adapter: str | Sequence[str | None] | None = None,
    ) -> tuple[list[Any], list[Handle]]:
        """Admit a batch, submitting each admitted prompt with the sink
        ``sink_for(index)`` gives; if admission raises, abort what it
        submitted. Returns the admission's list (requests or their errors) and
        the handles."""
        handles: list[Handle] = []

        def submit(i: int, req: Request) -> None:
            handles.append(self._submit(req, sink_for(i), False))

        try:
            prepared = self.admission.admit_batch(
                prompts, params, tenant, return_exceptions, wait_timeout, submit,
                adapter,
            )  # fmt: skip
        except BaseException:
            for h in handles:
                self.abort(h.request.request_id)
            raise
        return list(prepared), handles

    def _iter_stream(self, h: Handle, q: queue.SimpleQueue[Any]) -> Iterator[Delta]:
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not h.done:
                self.abort(h.request.request_id)

    async def agenerate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        tenant: str = "default",
        return_exceptions: bool = False,
        wait_timeout: float | None = None,
        adapter: str | Sequence[str | None] | None = None,
    ) -> list[Completion]:
        """Async :meth:`generate`: waits without blocking the event loop.

        Cancelling the awaiting task aborts its requests.
        """
        loop = asyncio.get_running_loop()
        slots: dict[int, asyncio.Future[Any]] = {}

        def sink_for(i: int) -> Callable[[Any], None]:
            fut = slots[i] = loop.create_future()
            return _future_setter(loop, fut)

        reqs, handles = self._admit_batch(
            prompts, params, tenant, return_exceptions, wait_timeout, sink_for, adapter
        )
        futures: list[asyncio.Future[Any]] = []
        for i, req in enumerate(reqs):
            if i not in slots:
                slots[i] = loop.create_future()
                slots[i].set_result(req)
            futures.append(slots[i])
        try:
            results = list(await asyncio.gather(*futures))
        except BaseException:
            for h in handles:
                self.abort(h.request.request_id)
            raise
        if not return_exceptions:
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        return results

    async def astream(
        self,
        prompt: Prompt | Sequence[Message],
        params: SamplingParams | None = None,
        *,
        tenant: str = "default",
        wait_timeout: float | None = None,
        adapter: str | None = None,
    ) -> AsyncIterator[Delta]:
        """Async :meth:`stream`. Closing the iterator or cancelling the consuming
        task aborts the request."""
        req = self.admission.admit(
            prompt, params or SamplingParams(), tenant, wait_timeout, adapter
        )
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Any] = asyncio.Queue()

        def sink(item: Any) -> None:
            # A closed loop has nobody listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(q.put_nowait, item)

        h = self._submit(req, sink, True)
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not h.done:
                self.abort(h.request.request_id)

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        """Load a PEFT LoRA adapter from a local folder under ``name`` (replacing
        an idle adapter of that name); requests choose it with ``adapter=name``.

        Past ``max_loras`` adapters, the least recently used one with no request
        in flight is evicted. Native model path only (docs/lora.md).

        Raises:
            InvalidConfigError: a bad folder, an unsupported module or option, a
                rank above ``max_lora_rank``, no idle adapter to evict; the
                error's ``field`` names what.
            InvalidRequestError: the name is in use by requests in flight.
            UnsupportedModelError: the engine runs the generic model path.
        """
        lora = self.admission.lora
        if lora is None:
            with self._close_lock:
                lora = self.admission.lora or LoRAManager(
                    self.model, self.config.max_loras, self.config.max_lora_rank,
                    self.dtype, self.device,
                )  # fmt: skip
                self.runner.lora = self.admission.lora = self.output.lora = lora
        return lora.load(name, path)

    def unload_adapter(self, name: str) -> None:
        """Drop an adapter and free its memory (refused while requests use it)."""
        if self.admission.lora is None:
            raise InvalidRequestError(f"adapter {name!r} is not loaded", "adapter")
        self.admission.lora.unload(name)

    def adapters(self) -> dict[str, AdapterInfo]:
        """The loaded adapters by name."""
        lora = self.admission.lora
        return {} if lora is None else lora.infos()

    def abort(self, request_id: str) -> None:
        """End a request early; it finishes with ``finish_reason="abort"``.

        Unknown or finished ids are ignored.
        """
        if not self._closed:
            self.core.abort(request_id)

    def metrics(self) -> MetricsSnapshot:
        """A snapshot of counters, latency percentiles, cache and memory use."""
        return report.snapshot(self)

    def close(self) -> None:
        """Abort what is in flight, stop the step thread, free model and KV memory.

        A second call does nothing.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self.admission.is_closed = True
        self.core.shutdown()
        if self.tp is not None:
            self.tp.close()
        if self.answers is not None:
            self.answers.close()
        self.runner.kv_caches = []
        self.backend.release()
        self.runner.model = None  # type: ignore[assignment]
        if self.greedy_head is not None:
            self.greedy_head.release()
        self.model = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
        else:
            release_freed_memory()

    @property
    def is_closed(self) -> bool:
        return self._closed

    def _stopped(self, exc: BaseException) -> None:
        """The step loop stopped for good (a tensor-parallel worker died): no
        new request is taken; ``close()`` still releases the rest."""
        with self._close_lock:
            self._dead = exc
            self.admission.closed_because = exc
            self.admission.is_closed = True

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    def render_chat(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of a conversation rendered with the chat template."""
        return self.admission.render_chat(messages)

    def _submit(
        self, req: Request, sink: Callable[[Any], None], streaming: bool
    ) -> Handle:
        """Hand an admitted request to the loop (or answer it from the caches)."""
        h = self.output.make_handle(req, sink, streaming)
        cached = self.admission.lookup(req)
        with self._close_lock:
            if self._closed or self._dead is not None:
                raise EngineClosedError(
                    "the engine is closed"
                    + (f" ({self._dead})" if self._dead is not None else "")
                )
            if cached is None and req.adapter is not None:
                lora = self.admission.lora
                assert lora is not None and req.adapter_hash is not None
                try:
                    lora.pin(req.adapter, req.adapter_hash)
                except BaseException:
                    self.admission.release(req)
                    raise
                req.adapter_pinned = True
            self.recorder.on_submit(req.tenant, req.adapter)
            if cached is None:
                self.core.submit(h)
        if cached is not None:  # answered without touching the model
            self.output.deliver_cached(h, cached)
        return h


# ---------------------------------------------------------------------- helpers
def _put_indexed(q: queue.SimpleQueue[tuple[int, Any]], i: int, item: Any) -> None:
    q.put((i, item))


def _future_setter(
    loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any]
) -> Callable[[Any], None]:
    def set_(item: Any) -> None:
        def apply() -> None:
            if not fut.done():
                fut.set_result(item)

        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(apply)

    return set_


def _make_throttle(limits: Any, default: Any) -> Throttle | None:
    """A Throttle from ``{tenant: TenantLimits}`` (or use the one given)."""
    if limits is None and default is None:
        return None
    from llmprod.ops.limits import Throttle

    if isinstance(limits, Throttle):
        return limits
    return Throttle(limits, default)
