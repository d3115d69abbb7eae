"""The engines a CPU user would pick instead of llmprod, each loaded behind one
small interface (run a list of requests; time one prompt) for
``benchmarks.e2e.peers``, which documents what each runs and how it is measured.

None of these packages is installed by CI or by the test extras:
``scripts/install-peers.sh`` installs them.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.e2e.baselines import RequestRecord, _llmprod_params, _llmprod_records
from benchmarks.workload import DEFAULT_MODEL, BenchRequest

CACHE = Path(
    os.environ.get("LLMPROD_PEERS_CACHE", "~/.cache/llmprod/peers")
).expanduser()
LLMPROD_VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "int8": {"quantization": "int8"},
    "gguf": {"quantization": "gguf"},
    "int4": {"quantization": "int4"},
}
CT2_BATCH = 16


def _alone(ids: list[int], n: int) -> BenchRequest:
    """One prompt as a request of its own (the batch-1 measurement)."""
    return BenchRequest(
        index=0, prompt_token_ids=list(ids), max_tokens=n, arrival_s=0.0, messages=[]
    )


@dataclass
class Loaded:
    """A loaded system: run a list of requests, or time one prompt."""

    run: Callable[[list[BenchRequest]], tuple[float, list[RequestRecord]]]
    one: Callable[[list[int], int], None]
    close: Callable[[], None] = lambda: None
    extra: dict[str, Any] | None = None
    tokens: dict[int, list[int]] = field(default_factory=dict)
    """The generated tokens of the latest ``run``, by request index (to check
    that the systems decode the same greedy tokens)."""


def load_llmprod(variant: str, model_path: str, threads: int) -> Loaded:
    import torch

    from llmprod import Engine

    if variant not in LLMPROD_VARIANTS:
        raise SystemExit(f"llmprod variants: {list(LLMPROD_VARIANTS)}")
    engine = Engine.from_pretrained(
        DEFAULT_MODEL, num_threads=threads, **LLMPROD_VARIANTS[variant]
    )

    def run(reqs: list[BenchRequest]) -> tuple[float, list[RequestRecord]]:
        t0 = time.perf_counter()
        comps = engine.generate(
            [r.prompt_token_ids for r in reqs], _llmprod_params(reqs)
        )
        wall = time.perf_counter() - t0
        loaded.tokens = {r.index: list(c.token_ids) for r, c in zip(reqs, comps)}
        return wall, _llmprod_records(reqs, comps)

    def one(ids: list[int], n: int) -> None:
        engine.generate([ids], _llmprod_params([_alone(ids, n)]))

    extra = {
        "torch": torch.__version__,
        "weights_bytes": engine.metrics().engine.get("weights_bytes"),
    }
    loaded = Loaded(run, one, engine.close, extra)
    return loaded


def _gguf_variant(variant: str, model_path: str) -> Path:
    """The GGUF file of ``variant``: the shipped Q4_1 file itself, or an F32 / Q8_0
    file that llama.cpp's own quantizer makes from it once (cached)."""
    import llama_cpp

    from llmprod.quant.gguf import gguf_file_of

    shipped = gguf_file_of(Path(model_path))
    if shipped is None:
        raise SystemExit(f"no GGUF file on disk behind {model_path}")
    if variant == "q4_1":
        return shipped
    ftypes = {
        "f32": llama_cpp.LLAMA_FTYPE_ALL_F32,
        "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    }
    if variant not in ftypes:
        raise SystemExit(f"llamacpp variants: q4_1, {', '.join(ftypes)}")
    out = CACHE / f"{shipped.stem}.{variant}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftypes[variant]
        params.allow_requantize = True
        params.nthread = os.cpu_count() or 1
        tmp = out.with_suffix(".part")
        rc = llama_cpp.llama_model_quantize(
            str(shipped).encode(), str(tmp).encode(), params
        )
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize to {variant} failed: {rc}")
        tmp.rename(out)
    return out


def load_llamacpp(
    variant: str, model_path: str, threads: int, opts: dict[str, Any]
) -> Loaded:
    import llama_cpp
    import numpy as np

    parallel = int(opts.get("parallel", 16))
    n_batch = int(opts.get("n_batch", 512))
    seq_ctx = int(opts.get("seq_ctx", 1024))
    path = _gguf_variant(variant, model_path)
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = parallel * seq_ctx
    cparams.n_batch = n_batch
    cparams.n_ubatch = n_batch
    cparams.n_seq_max = parallel
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    cparams.kv_unified = bool(opts.get("kv_unified", False))
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context")
    mem = llama_cpp.llama_get_memory(ctx)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def argmax(i: int) -> int:
        ptr = llama_cpp.llama_get_logits_ith(ctx, i)
        row = np.ctypeslib.as_array(
            ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)
        )
        return int(row.argmax())

    def run(reqs: list[BenchRequest]) -> tuple[float, list[RequestRecord]]:
        """Continuous batching: each decode call carries one token of every
        decoding sequence, then prompt chunks of waiting ones up to ``n_batch``."""
        waiting = list(reqs)
        free_slots = list(range(parallel))
        # slot -> [request, tokens fed, generated, next token, first token time,
        #          the generated tokens]
        active: dict[int, list[Any]] = {}
        records: dict[int, RequestRecord] = {}
        t0 = time.perf_counter()
        while waiting or active:
            while waiting and free_slots:
                active[free_slots.pop(0)] = [waiting.pop(0), 0, 0, None, None, []]
            n = 0
            wants: list[tuple[int, int]] = []  # (batch index, slot)
            for slot, st in active.items():  # decoding sequences first
                r, fed = st[0], st[1]
                if st[3] is not None:
                    batch.token[n], batch.pos[n] = st[3], fed
                    batch.n_seq_id[n], batch.seq_id[n][0], batch.logits[n] = (
                        1,
                        slot,
                        True,
                    )
                    wants.append((n, slot))
                    st[1] += 1
                    n += 1
            for slot, st in active.items():  # then prompt chunks
                r, fed = st[0], st[1]
                if st[3] is None and n < n_batch:
                    ids = r.prompt_token_ids
                    take = min(len(ids) - fed, n_batch - n)
                    for j in range(take):
                        batch.token[n], batch.pos[n] = ids[fed + j], fed + j
                        batch.n_seq_id[n], batch.seq_id[n][0] = 1, slot
                        last = fed + j == len(ids) - 1
                        batch.logits[n] = last
                        if last:
                            wants.append((n, slot))
                        n += 1
                    st[1] += take
            batch.n_tokens = n
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            now = time.perf_counter()
            for i, slot in wants:
                st = active[slot]
                st[3] = argmax(i)
                st[5].append(st[3])
                st[2] += 1
                if st[4] is None:
                    st[4] = now
                r = st[0]
                if st[2] >= r.max_tokens:
                    records[r.index] = RequestRecord(
                        r.index, len(r.prompt_token_ids), st[2], st[4] - t0, now - t0
                    )
                    loaded.tokens[r.index] = st[5]
                    llama_cpp.llama_memory_seq_rm(mem, slot, -1, -1)
                    del active[slot]
                    free_slots.append(slot)
        wall = time.perf_counter() - t0
        return wall, [records[r.index] for r in reqs]

    def one(ids: list[int], n: int) -> None:
        run([_alone(ids, n)])

    def close() -> None:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)

    extra = {
        "llama_cpp_python": llama_cpp.__version__,
        "gguf": str(path),
        "gguf_bytes": path.stat().st_size,
        "parallel": parallel,
        "n_batch": n_batch,
        "kv_unified": cparams.kv_unified,
    }
    loaded = Loaded(run, one, close, extra)
    return loaded


def _ct2_model(compute_type: str, model_path: str) -> Path:
    """The CTranslate2 conversion of the model (its converter, once, cached)."""
    import ctranslate2

    quant = {"float32": "float32", "int8": "int8", "int8_float32": "int8"}[compute_type]
    out = CACHE / f"ct2-{ctranslate2.__version__}-{quant}"
    if not (out / "model.bin").exists():
        from ctranslate2.converters import TransformersConverter

        TransformersConverter(model_path).convert(
            str(out), quantization=quant, force=True
        )
    return out


def load_ctranslate2(
    variant: str, model_path: str, threads: int, opts: dict[str, Any]
) -> Loaded:
    import ctranslate2
    from transformers import AutoTokenizer

    if variant not in ("float32", "int8"):
        raise SystemExit("ctranslate2 variants: float32, int8")
    path = _ct2_model(variant, model_path)
    gen = ctranslate2.Generator(
        str(path),
        device="cpu",
        compute_type=variant,
        intra_threads=threads,
        inter_threads=1,
    )
    tok = AutoTokenizer.from_pretrained(model_path)
    size = int(opts.get("batch_size", CT2_BATCH))

    def batch_run(reqs: list[BenchRequest], t0: float) -> dict[int, RequestRecord]:
        # The prompt goes through at once up to the batch's shortest prompt and
        # one token per step after it, so batches hold prompts of similar length;
        # every row decodes the batch's longest output (the extra is padding).
        steps = max(r.max_tokens for r in reqs)
        res = gen.generate_batch(
            [tok.convert_ids_to_tokens(r.prompt_token_ids) for r in reqs],
            max_length=steps,
            min_length=steps,
            sampling_topk=1,
            include_prompt_in_result=False,
        )
        end = time.perf_counter()
        out = {}
        for r, x in zip(reqs, res):
            got = x.sequences_ids[0]
            if len(got) < r.max_tokens:
                raise RuntimeError("CTranslate2 generated fewer tokens than asked")
            loaded.tokens[r.index] = list(got[: r.max_tokens])
            out[r.index] = RequestRecord(
                r.index, len(r.prompt_token_ids), r.max_tokens, None, end - t0
            )
        return out

    def run(reqs: list[BenchRequest]) -> tuple[float, list[RequestRecord]]:
        order = sorted(reqs, key=lambda r: len(r.prompt_token_ids))
        records: dict[int, RequestRecord] = {}
        t0 = time.perf_counter()
        for i in range(0, len(order), size):
            records.update(batch_run(order[i : i + size], t0))
        return time.perf_counter() - t0, [records[r.index] for r in reqs]

    def one(ids: list[int], n: int) -> None:
        batch_run([_alone(ids, n)], 0.0)

    extra = {
        "ctranslate2": ctranslate2.__version__,
        "batch_size": size,
        "model_dir": str(path),
    }
    loaded = Loaded(run, one, lambda: None, extra)
    return loaded


def load_vllm(
    variant: str, model_path: str, threads: int, opts: dict[str, Any]
) -> Loaded:
    import vllm
    from vllm import LLM, SamplingParams

    dtypes = {"fp32": "float32", "bf16": "bfloat16"}
    if variant not in dtypes:
        raise SystemExit(f"vllm variants: {list(dtypes)}")
    llm = LLM(
        model=model_path,
        dtype=dtypes[variant],
        max_model_len=int(opts.get("max_model_len", 2048)),
        seed=0,
    )

    def params(n: int) -> Any:
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    def run(reqs: list[BenchRequest]) -> tuple[float, list[RequestRecord]]:
        t0 = time.perf_counter()
        outs = llm.generate(
            [{"prompt_token_ids": list(r.prompt_token_ids)} for r in reqs],
            [params(r.max_tokens) for r in reqs],
            use_tqdm=False,
        )
        wall = time.perf_counter() - t0
        recs = []
        for r, o in zip(reqs, outs):
            got = len(o.outputs[0].token_ids)
            loaded.tokens[r.index] = list(o.outputs[0].token_ids)
            recs.append(
                RequestRecord(r.index, len(r.prompt_token_ids), got, None, wall)
            )
        return wall, recs

    def one(ids: list[int], n: int) -> None:
        llm.generate([{"prompt_token_ids": list(ids)}], params(n), use_tqdm=False)

    extra = {
        "vllm": vllm.__version__,
        "e2e_note": "end-to-end latency is the batch's wall time",
    }
    loaded = Loaded(run, one, lambda: None, extra)
    return loaded


LOADERS: dict[str, Callable[..., Loaded]] = {
    "llmprod": lambda v, path, threads, opts: load_llmprod(v, path, threads),
    "llamacpp": load_llamacpp,
    "ctranslate2": load_ctranslate2,
    "vllm": load_vllm,
}
# The systems whose requests carry their own TTFT and end-to-end times.
PER_REQUEST_LATENCY = {"llmprod", "llamacpp"}
