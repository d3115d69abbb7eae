"""The Engine: the public entry point, and the one thread that runs the steps.

Callers in any thread or event loop submit requests; a single step-loop thread
owns the scheduler, the KV cache and the model, and pushes results into each
request's own sink. ``step()`` is schedule -> run -> process, one call each.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import hashlib
import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmprod.answers.caches import AnswerCaches, conversation_text
from llmprod.config import EngineConfig
from llmprod.engine import inputs
from llmprod.engine.detokenizer import IncrementalDetokenizer
from llmprod.engine.inputs import Message, Prompt
from llmprod.errors import (
    EngineClosedError,
    GuardBlockedError,
    InvalidConfigError,
    InvalidRequestError,
    LLMProdError,
    RateLimitedError,
    RequestFailedError,
)
from llmprod.exec.runner import ModelRunner, StepResult
from llmprod.exec.threads import run_in_own_thread, run_on_compute_thread
from llmprod.kv.manager import KVCacheManager
from llmprod.layers.attention import get_attention_backend
from llmprod.layers.linear import (
    pack_onednn_linears,
    resolve_linear_backend,
    use_onednn_linears,
)
from llmprod.layers.screened_head import screened_head_for
from llmprod.models.loader import (
    build_model,
    eos_token_ids,
    load_config,
    max_model_len,
    pick_device,
    pick_dtype,
)
from llmprod.models.registry import resolve_model
from llmprod.ops.guards import apply_guards
from llmprod.ops.metrics import (
    MetricsRecorder,
    MetricsSnapshot,
    peak_rss_bytes,
    process_rss_bytes,
)
from llmprod.ops.signals import logprob_signals
from llmprod.outputs import Completion, Delta, Timings, Usage
from llmprod.sampling_params import SamplingParams
from llmprod.sched.request import Request
from llmprod.sched.scheduler import Scheduler, SchedulerOutput

logger = logging.getLogger("llmprod")


@dataclass(slots=True, eq=False)
class _Handle:
    """A submitted request and where its results go."""

    request: Request
    detok: IncrementalDetokenizer
    sink: Callable[[Any], None]
    """Receives Delta objects (streaming), the final Completion, or an exception."""
    streaming: bool
    submit_time: float = field(default_factory=time.monotonic)
    done: bool = False


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
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.hf_config = hf_config
        self.model_path = model_path
        self.config = config
        self.model_name = model_name
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.model_impl: str = getattr(model, "impl", "native")
        """"native" (llmprod's own model code) or "generic" (transformers')."""
        self.linear_backend = _linear_backend(config, self.device, self.dtype)
        """"onednn" or "torch": who computes the float32 linear layers."""
        self.packed_linears = 0
        """Linear layers whose weights oneDNN holds in its blocked layout."""
        if self.linear_backend == "onednn":
            use_onednn_linears(model)
            # Not lm_head: screening and a tied embedding read its weight.
            self.packed_linears = pack_onednn_linears(
                model,
                exclude=(model.lm_head,),  # type: ignore[arg-type]
            )
        try:
            self.greedy_head = screened_head_for(
                model, config.greedy_screening, self.device
            )
        except ValueError as exc:
            raise InvalidConfigError(str(exc), "greedy_screening") from exc
        """Picks the tokens of small all-greedy steps without the full lm_head
        product (``llmprod.layers.screened_head``); None where it is off."""
        self.vocab_size = int(hf_config.vocab_size)
        self.max_model_len = max_model_len(hf_config, config.max_model_len)
        self.eos_token_ids = eos_token_ids(hf_config, tokenizer, model_path)
        cc = config.cache_config
        self.backend = get_attention_backend(config.attention_backend, self.device)
        self.block_size: int = cc.block_size or self.backend.default_block_size
        self._kv_block_bytes = ModelRunner.bytes_per_block(
            model, self.block_size, self.dtype
        )
        self.num_blocks = ModelRunner.num_blocks_for(cc, self._kv_block_bytes)
        self.quantization = quantization
        # Where the int8 weights came from: "quantized-at-load" (llmprod quantized
        # them, or reloaded its own saved copy) or "bitsandbytes-checkpoint".
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
            )
        self.kv = KVCacheManager(
            self.num_blocks, self.block_size, cc.enable_prefix_caching
        )
        self.scheduler = Scheduler(config.scheduler_config, self.kv)
        self.runner = ModelRunner(
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
        self._metrics = MetricsRecorder()
        self._handles: dict[str, _Handle] = {}
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._closed = False
        self._close_lock = threading.Lock()
        self._ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:8]
        self._thread = threading.Thread(
            target=self._loop, name="llmprod-engine", daemon=True
        )
        self._thread.start()
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
        # leaves no idle OpenMP team behind to slow the steps (_threads.py).
        return run_in_own_thread(cls._load, model, config, device)

    @classmethod
    def _load(
        cls, model: str | Path, config: EngineConfig, device: torch.device
    ) -> Engine:
        from transformers import AutoTokenizer

        from llmprod.quant import bnb as bnb_checkpoint

        path = resolve_model(model)
        hf_config = load_config(path)
        dtype = pick_dtype(config.dtype, device)
        _linear_backend(config, device, dtype)  # fail before loading the weights
        quant: str | None = None
        quant_source: str | None = None
        if bnb_checkpoint.is_bnb_int8_checkpoint(hf_config):
            nn_model, quant = bnb_checkpoint.load_bnb_int8_model(
                hf_config, path, dtype, device, config.quantization
            )
            quant_source = bnb_checkpoint.SOURCE
        else:
            nn_model = build_model(hf_config, path, dtype, device, config.model_impl)
            if config.quantization is not None:
                quant = _quantize(
                    nn_model, config.quantization, path, config.quantization_skip
                )
                quant_source = "quantized-at-load"
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(
            nn_model,
            tokenizer,
            hf_config,
            path,
            config,
            str(model),
            quant,
            quant_source,
        )

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
        """
        prepared = self._prepare(
            prompts, params, tenant, return_exceptions, wait_timeout
        )
        results: list[Any] = [None] * len(prepared)
        done: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        handles = []
        for i, req in enumerate(prepared):
            if isinstance(req, BaseException):
                results[i] = req
                continue
            sink = functools.partial(_put_indexed, done, i)
            handles.append(self._submit(req, sink, False))
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
    ) -> Iterator[Delta]:
        """Yield :class:`Delta` pieces as they are produced; the last one carries
        ``finish_reason`` and the full ``completion``. Stopping the iteration
        early aborts the request."""
        req = self._make_request(
            prompt, params or SamplingParams(), tenant, wait_timeout
        )
        q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        h = self._submit(req, q.put, True)
        return self._iter_stream(h, q)

    def _iter_stream(self, h: _Handle, q: queue.SimpleQueue[Any]) -> Iterator[Delta]:
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
    ) -> list[Completion]:
        """Async :meth:`generate`: waits without blocking the event loop.

        Cancelling the awaiting task aborts its requests.
        """
        reqs = self._prepare(prompts, params, tenant, return_exceptions, wait_timeout)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        handles = []
        for req in reqs:
            fut: asyncio.Future[Any] = loop.create_future()
            futures.append(fut)
            if isinstance(req, BaseException):
                fut.set_result(req)
                continue
            handles.append(self._submit(req, _future_setter(loop, fut), False))
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
    ) -> AsyncIterator[Delta]:
        """Async :meth:`stream`. Closing the iterator or cancelling the consuming
        task aborts the request."""
        req = self._make_request(
            prompt, params or SamplingParams(), tenant, wait_timeout
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

    def abort(self, request_id: str) -> None:
        """End a request early; it finishes with ``finish_reason="abort"``.

        Unknown or finished ids are ignored.
        """
        if not self._closed:
            self._inbox.put(("abort", request_id))
            self._wakeup.set()

    def metrics(self) -> MetricsSnapshot:
        """A snapshot of counters, latency percentiles, cache and memory use."""
        kv = self.kv
        if self.device.type == "cuda":
            mem = {
                "now_bytes": int(torch.cuda.memory_allocated(self.device)),
                "peak_bytes": int(torch.cuda.max_memory_allocated(self.device)),
            }
        else:
            mem = {"now_bytes": process_rss_bytes(), "peak_bytes": peak_rss_bytes()}
        queries = kv.num_prefix_query_tokens
        snap = self._metrics.snapshot(
            kv_cache={
                "num_blocks": self.num_blocks,
                "block_size": self.block_size,
                "usage": kv.pool.usage(),
                "cached_blocks": kv.pool.num_cached_blocks,
                "prefix_hit_rate": kv.num_prefix_hit_tokens / queries
                if queries
                else 0.0,
                "evictions": kv.pool.num_evictions,
                "budget_bytes": self.num_blocks * self._kv_block_bytes,
                "touched_bytes": kv.pool.num_touched_blocks * self._kv_block_bytes,
            },
            scheduler={"preemptions": self.scheduler.num_preemptions},
            cache=self.answers.stats() if self.answers is not None else {},
            memory=mem,
            engine={
                "model": self.model_name,
                "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."),
                "attention_backend": self.backend.name,
                "linear_backend": self.linear_backend,
                "packed_linears": self.packed_linears,
                "greedy_screening": {
                    "enabled": self.greedy_head is not None,
                    **(self.greedy_head.stats() if self.greedy_head else {}),
                },
                "model_impl": self.model_impl,
                "quantization": self.quantization,
                "quantization_source": self.quantization_source,
                "model_path": str(self.model_path),
            },
        )
        if self.throttle is not None:
            for tenant, usage in self.throttle.snapshot().items():
                snap.tenants.setdefault(tenant, {})["throttle"] = usage
        return snap

    def close(self) -> None:
        """Abort what is in flight, stop the step thread, free model and KV memory.

        A second call does nothing.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._inbox.put(("close", None))
        self._wakeup.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        if self.answers is not None:
            self.answers.close()
        self.runner.kv_caches = []
        self.backend.release()
        self.runner.model = None  # type: ignore[assignment]
        if self.greedy_head is not None:
            self.greedy_head.release()
        self.model = None  # type: ignore[assignment]
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def is_closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    def render_chat(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of a conversation rendered with the chat template."""
        inputs.check_messages(messages)
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(
                f"model {self.model_name!r} has no chat template; use generate()",
                "messages",
            )
        text = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=False
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _prepare(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None,
        tenant: str,
        return_exceptions: bool,
        wait_timeout: float | None = None,
    ) -> list[Request | LLMProdError]:
        """Validate a batch in the caller's thread: bad input raises here, naming
        its index, unless ``return_exceptions`` keeps the error in its place."""
        batch = inputs.as_prompt_list(prompts)
        plist = inputs.params_list(params, len(batch))
        out: list[Request | LLMProdError] = []
        for i, (p, sp) in enumerate(zip(batch, plist)):
            try:
                out.append(self._make_request(p, sp, tenant, wait_timeout))
            except (InvalidRequestError, RateLimitedError) as exc:
                if return_exceptions:
                    out.append(exc)
                    continue
                for r in out:  # nothing of this batch runs: give the slots back
                    if isinstance(r, Request) and r.ticket is not None:
                        r.ticket.release(0, 0.0)
                if len(batch) > 1 and isinstance(exc, InvalidRequestError):
                    raise type(exc)(f"prompts[{i}]: {exc}", exc.field) from exc
                raise
        return out

    def _make_request(
        self,
        prompt: Prompt | Sequence[Message],
        params: SamplingParams,
        tenant: str,
        wait_timeout: float | None = None,
    ) -> Request:
        """Validate, guard, tokenize and admit one prompt or conversation (errors
        raise in the caller's thread, before the model sees anything)."""
        if self._closed:
            raise EngineClosedError("the engine is closed")
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(
                f"params must be SamplingParams, got {type(params).__name__}", "params"
            )
        text = context = None
        flags: dict[str, Any] = {}
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            messages = list(prompt)
            inputs.check_messages(messages)  # type: ignore[arg-type]
            if self.guards:
                messages, flags = self._guard_messages(messages)  # type: ignore[arg-type]
            ids = self.render_chat(messages)  # type: ignore[arg-type]
            text, context = conversation_text(messages)  # type: ignore[arg-type]
        else:
            ids = inputs.prompt_token_ids(prompt, self.tokenizer, self.vocab_size)  # type: ignore[arg-type]
            text = prompt if isinstance(prompt, str) else None
            if self.guards:
                seen = text if text is not None else self.tokenizer.decode(ids)
                res = apply_guards(self.guards, seen, "prompt")
                flags = res.flags
                if res.text != seen:  # redacted: the model sees the redacted text
                    text = res.text
                    ids = list(self.tokenizer.encode(text))
        inputs.check_lengths(
            len(ids), params, self.max_model_len, self.num_blocks, self.block_size
        )
        rid = f"req-{self._id_prefix}-{next(self._ids)}"
        req = Request(rid, ids, params, tenant=tenant, text=text, context=context)
        if flags:
            req.flags["guards"] = {"prompt": flags}
        if self.throttle is not None:
            prices = self.config.prices
            estimate = prices.cost(len(ids), params.max_tokens) if prices else 0.0
            req.ticket = self.throttle.admit(
                tenant, len(ids) + params.max_tokens, wait_timeout,
                estimated_cost=estimate,
            )  # fmt: skip
        return req

    def _guard_messages(
        self, messages: list[Message]
    ) -> tuple[list[Message], dict[str, Any]]:
        """Run the prompt guards over each message's content."""
        out, flags = [], {}
        for i, m in enumerate(messages):
            res = apply_guards(self.guards, m["content"], "prompt")
            out.append({**m, "content": res.text})
            if res.flags:
                flags[f"messages[{i}]"] = res.flags
        return out, flags

    def _submit(
        self, req: Request, sink: Callable[[Any], None], streaming: bool
    ) -> _Handle:
        p = req.params
        detok = IncrementalDetokenizer(
            self.tokenizer, p.stop, p.include_stop_str_in_output, p.skip_special_tokens
        )
        h = _Handle(req, detok, sink, streaming)
        cached = self.answers.lookup(req) if self.answers is not None else None
        with self._close_lock:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            self._metrics.on_submit(req.tenant)
            if cached is None:
                self._inbox.put(("add", h))
        if cached is not None:  # answered without touching the model
            self._deliver_cached(h, cached)
        else:
            self._wakeup.set()
        return h

    def _deliver_cached(self, h: _Handle, comp: Completion) -> None:
        h.done = True
        req = h.request
        if req.ticket is not None:
            req.ticket.release(0, 0.0)
        self._metrics.on_finish(
            "completed",
            comp.usage.prompt_tokens,
            comp.usage.completion_tokens,
            comp.usage.cached_prompt_tokens,
            {"queued": 0.0, "ttft": comp.timings.ttft_s, "e2e": comp.timings.e2e_s},
            tenant=req.tenant,
            cost=0.0,
            cache_tier=comp.cache_hit,
        )
        if h.streaming:
            h.sink(Delta(req.request_id, comp.text, list(comp.token_ids),
                         comp.finish_reason, comp))  # fmt: skip
        else:
            h.sink(comp)

    # ------------------------------------------------------------------ step loop
    def _loop(self) -> None:
        while True:
            self._wakeup.clear()
            if not self._drain_inbox():
                self._shutdown()
                return
            if not self.scheduler.has_work():
                self._wakeup.wait()
                continue
            try:
                self.step()
            except Exception:
                logger.exception("engine step failed outside the model")
                for h in list(self._handles.values()):
                    self._fail(h, RequestFailedError("engine step failed; see the log"))

    def _drain_inbox(self) -> bool:
        """Take new requests and aborts. False when close() was asked."""
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if kind == "add":
                self._handles[item.request.request_id] = item
                self.scheduler.add(item.request)
            elif kind == "abort":
                h = self._handles.get(item)
                if h is not None and not h.done:
                    self.scheduler.abort(h.request)
                    self._finalize(h, "abort")
            elif kind == "close":
                return False

    def _shutdown(self) -> None:
        for h in list(self._handles.values()):
            if not h.done:
                self.scheduler.abort(h.request)
                self._finalize(h, "abort")
        while True:  # requests that raced with close()
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                item.request.block_ids = []
                self._finalize(item, "abort")

    def step(self) -> None:
        """One engine step: schedule, run the model, process the outputs."""
        out = self.scheduler.schedule()
        for req in out.finished:  # the pool cannot hold them any longer
            self._finalize(self._handles[req.request_id], req.finish_reason or "length")
        if out.is_empty:
            return
        t0 = time.perf_counter()
        try:
            if self.device.type == "cpu":  # one OpenMP team for all engines
                result = run_on_compute_thread(self._execute_cpu, out)
            else:
                result = self.runner.execute(out)
        except Exception as exc:
            self._fail_step(out, exc)
            return
        self.scheduler.update(out)
        self._account(out, time.perf_counter() - t0)
        self._process(out, result)

    def _execute_cpu(self, out: SchedulerOutput) -> StepResult:
        """The model step, on the compute thread shared by all engines: with
        this engine's thread count, which another engine may have changed."""
        n = self.config.num_threads
        if n is not None and torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return self.runner.execute(out)

    def _account(self, out: SchedulerOutput, elapsed: float) -> None:
        """Share the step's model time by tokens; record padding and KV use."""
        per_token = elapsed / max(out.num_batched_tokens, 1)
        for e in out.scheduled:
            e.request.compute_s += per_token * e.num_new_tokens
        bs = self.block_size
        running = self.scheduler.running
        allocated = sum(len(r.block_ids) for r in running) * bs
        used = sum(r.num_computed_tokens for r in running)
        self._metrics.on_step(
            out.padded_elements,
            out.processed_elements,
            self.kv.pool.usage(),
            (allocated - used) / allocated if allocated else 0.0,
        )

    def _process(self, out: SchedulerOutput, result: StepResult) -> None:
        now = time.monotonic()
        for row, idx in enumerate(result.sampled_entries):
            req = out.scheduled[idx].request
            h = self._handles[req.request_id]
            token = result.sampled.token_ids[row]
            req.append_token(token)
            if req.first_token_time is None:
                req.first_token_time = now
            lp = result.sampled.logprobs[row]
            if lp is not None:
                req.logprobs.append(lp)
            stop_str = h.detok.add(token)
            reason = self._check_stop(req, token, stop_str)
            if reason is not None:
                self.scheduler.finish(req, reason)
                self._finalize(h, reason, last_token_ids=[token])
            elif h.streaming:
                text = h.detok.take_delta(final=False)
                h.sink(Delta(req.request_id, text, [token]))

    def _check_stop(self, req: Request, token: int, stop_str: str | None) -> str | None:
        p = req.params
        if stop_str is not None:
            req.stop_reason = stop_str
            return "stop"
        n_out = req.num_output_tokens
        if n_out >= p.min_tokens:
            if token in p.stop_token_ids:
                req.stop_reason = token
                return "stop"
            if not p.ignore_eos and token in self.eos_token_ids:
                return "stop"
        if n_out >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _fail_step(self, out: SchedulerOutput, exc: Exception) -> None:
        logger.error(
            "model forward failed; failing the %d requests of this step: %r",
            len(out.scheduled),
            exc,
        )
        for e in out.scheduled:
            h = self._handles.get(e.request.request_id)
            self.scheduler.finish(e.request, "error")
            if h is not None:
                err = RequestFailedError(
                    f"request {e.request.request_id} failed in the model: {exc!r}",
                    e.request.request_id,
                )
                self._fail(h, err)

    def _fail(self, h: _Handle, err: BaseException) -> None:
        if h.done:
            return
        if not h.request.is_finished:
            self.scheduler.finish(h.request, "error")
        self._release(h, "errored", {})
        h.sink(err)

    def _release(
        self, h: _Handle, outcome: str, timings: dict[str, float | None]
    ) -> float:
        """Forget a finished handle and record it; returns the request's cost."""
        h.done = True
        self._handles.pop(h.request.request_id, None)
        req = h.request
        prices = self.config.prices
        cost = 0.0
        if prices is not None:
            cost = prices.cost(
                prompt_tokens=req.num_prompt_tokens,
                completion_tokens=req.num_output_tokens,
                cached_prompt_tokens=req.num_cached_tokens,
                compute_s=req.compute_s,
            )
        self._metrics.on_finish(
            outcome,
            req.num_prompt_tokens,
            req.num_output_tokens,
            req.num_cached_tokens,
            timings,
            tenant=req.tenant,
            cost=cost,
        )
        if req.ticket is not None:
            req.ticket.release(req.num_prompt_tokens + req.num_output_tokens, cost)
        return cost

    def _finalize(
        self, h: _Handle, reason: str, last_token_ids: list[int] | None = None
    ) -> None:
        """Build the Completion, record metrics, deliver the last item.

        ``last_token_ids``: tokens of this step not yet streamed (they ride on the
        final delta).
        """
        if h.done:
            return
        req = h.request
        req.finish_reason = reason
        req.finish_time = time.monotonic()
        t0 = h.submit_time
        n_out = req.num_output_tokens
        timings = Timings(
            queued_s=None
            if req.first_scheduled_time is None
            else req.first_scheduled_time - t0,
            ttft_s=None if req.first_token_time is None else req.first_token_time - t0,
            e2e_s=req.finish_time - t0,
            tpot_s=(req.finish_time - req.first_token_time) / (n_out - 1)
            if req.first_token_time is not None and n_out > 1
            else None,
        )
        comp = Completion(
            request_id=req.request_id,
            text=h.detok.text,
            token_ids=req.output_token_ids,
            finish_reason=reason,
            prompt_token_ids=req.prompt_token_ids,
            stop_reason=req.stop_reason,
            usage=Usage(req.num_prompt_tokens, n_out, req.num_cached_tokens),
            timings=timings,
            logprobs=req.logprobs if req.params.logprobs is not None else None,
            prompt_logprobs=req.prompt_logprobs
            if req.params.prompt_logprobs is not None
            else None,
        )
        if req.flags:
            comp.flags.update(req.flags)
        if req.params.logprobs is not None and req.logprobs:
            comp.flags["confidence"] = logprob_signals(
                req.logprobs, [lp.entropy for lp in req.logprobs]
            )
        if self.guards and reason != "abort":
            try:
                res = apply_guards(self.guards, comp.text, "output")
            except GuardBlockedError as exc:
                self._fail(h, exc)
                return
            comp.text = res.text
            if res.flags:
                comp.flags.setdefault("guards", {})["output"] = res.flags
        outcome = "aborted" if reason == "abort" else "completed"
        comp.usage.cost = self._release(
            h,
            outcome,
            {
                "queued": timings.queued_s,
                "ttft": timings.ttft_s,
                "tpot": timings.tpot_s,
                "e2e": timings.e2e_s,
            },
        )
        if self.answers is not None and reason in ("stop", "length"):
            self.answers.store(req, comp)
        if h.streaming:
            text = h.detok.take_delta(final=True)
            h.sink(Delta(req.request_id, text, last_token_ids or [], reason, comp))
        else:
            h.sink(comp)


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


def _linear_backend(
    config: EngineConfig, device: torch.device, dtype: torch.dtype
) -> str:
    try:
        return resolve_linear_backend(config.linear_backend, device, dtype)
    except ValueError as exc:
        raise InvalidConfigError(str(exc), "linear_backend") from exc


def _quantize(
    model: torch.nn.Module,
    method: str,
    path: Path,
    skip: tuple[str, ...],
) -> str:
    """Quantize once, reuse: the int8 weights are saved in the model cache and
    reloaded (with their scales) by later loads instead of quantizing again."""
    from llmprod.models.fingerprint import model_fingerprint
    from llmprod.models.registry import cache_dir
    from llmprod.quant import int8

    device = next(model.parameters()).device
    try:
        resolved = int8.resolve_method(method, device)
    except int8.Int8UnavailableError as exc:
        raise InvalidConfigError(str(exc), "quantization") from exc
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    source = model_fingerprint(path, dtype, None)
    # The two model paths hold the same weights under different module names.
    impl = "" if getattr(model, "impl", "native") == "native" else "-generic"
    if skip != int8.DEFAULT_SKIP:  # another set of int8 layers
        impl += "-skip" + hashlib.sha256(repr(sorted(skip)).encode()).hexdigest()[:8]
    saved = (
        cache_dir()
        / "quantized"
        / f"{path.name}-{dtype}{impl}-{source[:16]}.safetensors"
    )
    if saved.exists():
        try:
            ran = int8.load_quantized(model, saved, method=resolved, source=source)
            logger.info("int8 weights loaded from %s (%s)", saved, ran)
            return str(ran)
        except int8.QuantizedCheckpointError as exc:
            logger.warning("ignoring the saved int8 weights %s: %s", saved, exc)
    ran = int8.quantize_model(model, method=resolved, skip=skip)
    saved.parent.mkdir(parents=True, exist_ok=True)
    int8.save_quantized(model, saved, source=source)
    logger.info("int8 (%s) quantized; saved to %s", ran, saved)
    return str(ran)


def _make_throttle(limits: Any, default: Any) -> Any:
    """A Throttle from ``{tenant: TenantLimits}`` (or use the one given)."""
    if limits is None and default is None:
        return None
    from llmprod.ops.limits import Throttle

    if isinstance(limits, Throttle):
        return limits
    return Throttle(limits, default)
