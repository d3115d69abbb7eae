"""Tensor parallelism: one model split over processes, the Megatron way.

The engine's process is rank 0: it keeps the scheduler, the KV block tables,
the caches and the API, and runs its own shard. It starts ranks 1..N-1 itself
(``spawn``), each holding one shard and its part of the KV cache. Every step,
rank 0 sends the step's flat batch (token ids, positions, attention metadata)
to the workers; all ranks run the forward pass, and the partial sums meet in
one all-reduce after each attention block's output projection and one after
each MLP's down projection. Only rank 0 computes logits and samples.

Sharding (``shard_llama``): q/k/v and gate/up are split by output rows (whole
heads; column-parallel), o and down by input columns (row-parallel, their bias
on rank 0 only); embeddings, norms and lm_head are replicated. The KV cache is
split by KV head; where there are fewer KV heads than ranks, each KV head is
replicated on the ranks whose query heads read it (as vLLM does).

The process group is a standalone ``ProcessGroupGloo`` (CPU) or
``ProcessGroupNCCL`` (CUDA) over a TCP store on 127.0.0.1, not torch's global
default group, so several engines can live in one process.

Faults: rank 0 watches its workers; a worker that exits makes the next (or the
running) step raise :class:`~llmprod.errors.TensorParallelError`, which stops
the engine and fails its requests; a collective waits at most ``timeout_s``.
Workers exit when told to, when rank 0's connection closes, and when their
parent process is gone (they poll for it), so a killed engine leaves no
orphans.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprod.errors import InvalidConfigError, TensorParallelError

logger = logging.getLogger("llmprod")

DEFAULT_TIMEOUT_S = 120.0
"""The longest a collective waits for the other ranks (one layer's work)."""


# ---------------------------------------------------------------------- plan
@dataclass(frozen=True, slots=True)
class ShardPlan:
    """Which heads and MLP columns one rank holds."""

    rank: int
    size: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    inter: tuple[int, int]


def shard_plan(hf_config: Any, size: int, rank: int) -> ShardPlan:
    """The rank's part of a Llama-family model split ``size`` ways.

    Raises:
        InvalidConfigError: the heads or the MLP width do not divide; the
            message names the head counts and the sizes that work.
    """
    heads = int(hf_config.num_attention_heads)
    kv = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    inter = int(hf_config.intermediate_size)
    ok = [n for n in range(1, heads + 1) if _divides(heads, kv, inter, n)]
    if not _divides(heads, kv, inter, size):
        raise InvalidConfigError(
            f"tensor_parallel_size={size} does not split this model: "
            f"{heads} query heads, {kv} KV heads and an MLP of {inter} must each "
            f"divide by it (or the KV heads be replicated: the size a multiple of "
            f"{kv}); sizes that work: {ok}",
            "tensor_parallel_size",
        )
    q = heads // size
    if kv >= size:
        k = kv // size
        kv_range = (rank * k, (rank + 1) * k)
    else:  # replicated: the KV head this rank's query heads read
        head = rank * kv // size
        kv_range = (head, head + 1)
    m = inter // size
    return ShardPlan(rank, size, (rank * q, (rank + 1) * q), kv_range,
                     (rank * m, (rank + 1) * m))  # fmt: skip


def _divides(heads: int, kv: int, inter: int, n: int) -> bool:
    if heads % n or inter % n:
        return False
    return kv % n == 0 if kv >= n else n % kv == 0


# ---------------------------------------------------------------------- comm
class Comm:
    """The collectives of one tensor-parallel group."""

    def __init__(self, pg: Any, rank: int, size: int, device: torch.device) -> None:
        self.pg = pg
        self.rank = rank
        self.size = size
        self.device = device

    def all_reduce(self, t: torch.Tensor) -> None:
        self.pg.allreduce([t]).wait()

    def send_object(self, obj: Any) -> None:
        """Rank 0: broadcast a picklable object to every worker."""
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        n = torch.tensor([len(data)], dtype=torch.int64)
        self.pg.broadcast([n], self._root()).wait()
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.pg.broadcast([buf], self._root()).wait()

    def recv_object(self) -> Any:
        """A worker: the next object rank 0 broadcasts."""
        n = torch.zeros(1, dtype=torch.int64)
        self.pg.broadcast([n], self._root()).wait()
        buf = torch.empty(int(n.item()), dtype=torch.uint8)
        self.pg.broadcast([buf], self._root()).wait()
        return pickle.loads(buf.numpy().tobytes())

    @staticmethod
    def _root() -> Any:
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank = 0
        return opts


def _store(port: int, rank: int, size: int, timeout_s: float) -> Any:
    """The group's TCP store on 127.0.0.1: rank 0 hosts it (``port`` 0: any
    free port, read back from ``store.port``)."""
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", port, size, rank == 0,
                         timedelta(seconds=timeout_s), wait_for_workers=False)  # fmt: skip


def _process_group(
    store: Any, rank: int, size: int, timeout_s: float, device: torch.device
) -> Any:
    """Gloo on CPU, NCCL on CUDA; standalone (not torch's default group)."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        return dist.ProcessGroupNCCL(store, rank, size, timeout=timeout)  # type: ignore[call-arg]
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def _to_device(meta: Any, device: torch.device) -> Any:
    """Attention metadata with its tensors on ``device``."""
    if device.type == "cpu":
        return meta
    import dataclasses

    moved = {
        f.name: getattr(meta, f.name).to(device)
        for f in dataclasses.fields(meta)
        if isinstance(getattr(meta, f.name), torch.Tensor)
    }
    return dataclasses.replace(meta, **moved)


# ---------------------------------------------------------------------- sharding
class RowParallel(nn.Module):
    """A row-parallel projection: this rank's partial product, summed over
    the ranks."""

    def __init__(self, base: nn.Module, comm: Comm) -> None:
        super().__init__()
        self.base = base
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base(x)
        self.comm.all_reduce(y)
        return y


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out, inp = weight.shape
    lin = nn.Linear(inp, out, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return lin


def shard_llama(model: nn.Module, plan: ShardPlan, comm: Comm) -> None:
    """Cut a loaded native Llama model down to ``plan``'s shard, in place."""
    for layer in model.model.layers:  # type: ignore[union-attr]
        attn, mlp = layer.self_attn, layer.mlp
        hd = attn.head_dim
        heads, kv = attn.num_heads, attn.num_kv_heads
        w, b = attn.qkv_proj.weight.data, attn.qkv_proj.bias
        q0, q1 = plan.q_heads
        k0, k1 = plan.kv_heads
        rows = torch.cat([
            torch.arange(q0 * hd, q1 * hd),
            heads * hd + torch.arange(k0 * hd, k1 * hd),
            (heads + kv) * hd + torch.arange(k0 * hd, k1 * hd),
        ])  # fmt: skip
        attn.qkv_proj = _linear(w[rows], None if b is None else b.data[rows])
        attn.num_heads, attn.num_kv_heads = q1 - q0, k1 - k0
        attn.qkv_sizes = [(q1 - q0) * hd, (k1 - k0) * hd, (k1 - k0) * hd]
        o = attn.o_proj
        attn.o_proj = RowParallel(
            _linear(o.weight.data[:, q0 * hd : q1 * hd],
                    o.bias.data if o.bias is not None and plan.rank == 0 else None),
            comm,
        )  # fmt: skip
        i0, i1 = plan.inter
        inter = mlp.down_proj.weight.shape[1]
        gu, gu_b = mlp.gate_up_proj.weight.data, mlp.gate_up_proj.bias
        rows = torch.cat([torch.arange(i0, i1), inter + torch.arange(i0, i1)])
        mlp.gate_up_proj = _linear(gu[rows], None if gu_b is None else gu_b.data[rows])
        d = mlp.down_proj
        mlp.down_proj = RowParallel(
            _linear(d.weight.data[:, i0:i1],
                    d.bias.data if d.bias is not None and plan.rank == 0 else None),
            comm,
        )  # fmt: skip
    first = model.model.layers[0].self_attn  # type: ignore[union-attr,index]
    model.num_kv_heads = first.num_kv_heads  # type: ignore[assignment]
    model.tensor_parallel = plan  # type: ignore[assignment]


def check_supported(model_impl: str, quantization: str | None) -> None:
    if model_impl == "generic":
        raise InvalidConfigError(
            "tensor parallelism splits llmprod's native model; the generic "
            "transformers path is not split (model_impl='native' or 'auto')",
            "tensor_parallel_size",
        )
    if quantization is not None:
        raise InvalidConfigError(
            f"tensor parallelism splits float weights; quantization="
            f"{quantization!r} is not supported with tensor_parallel_size > 1",
            "quantization",
        )


# ---------------------------------------------------------------------- rank 0
@dataclass(slots=True)
class WorkerSpec:
    """What a worker needs to build its shard (picklable, no user objects)."""

    path: str
    dtype: str
    device: str
    linear_backend: str
    attention_backend: str
    fused_ops: str
    num_threads: int
    timeout_s: float


class TensorParallelGroup:
    """Rank 0's side: the workers, the group, and each step's broadcast."""

    def __init__(self, size: int, spec: WorkerSpec, device: torch.device) -> None:
        import torch.multiprocessing as mp

        self.size = size
        self.failure: str | None = None
        self._closed = False
        self._lock = threading.Lock()
        self.store = _store(0, 0, size, spec.timeout_s)
        port = int(self.store.port)
        ctx = mp.get_context("spawn")
        self.procs = [
            ctx.Process(
                target=worker_main,
                args=(r, size, port, spec, os.getpid()),
                name=f"llmprod-tp-{r}",
                daemon=True,
            )
            for r in range(1, size)
        ]
        for p in self.procs:
            p.start()
        try:
            self._wait_for_workers(spec.timeout_s)
            self.pg = _process_group(self.store, 0, size, spec.timeout_s, device)
        except BaseException:
            self.close()
            raise
        self.comm = Comm(self.pg, 0, size, device)
        self._watch = threading.Thread(target=self._watchdog, daemon=True,
                                       name="llmprod-tp-watch")  # fmt: skip
        self._watch.start()

    def _wait_for_workers(self, timeout_s: float) -> None:
        """Wait until every worker has reached the store; a worker that exits
        first (an import error, a script without a ``__main__`` guard) raises
        at once instead of after the timeout."""
        keys = [f"up/{r}" for r in range(1, self.size)]
        deadline = time.monotonic() + timeout_s
        while not self.store.check(keys):
            for p in self.procs:
                if p.exitcode is not None:
                    raise TensorParallelError(
                        f"tensor-parallel worker {p.name} exited with code "
                        f"{p.exitcode} while starting; a script that builds a "
                        "tensor-parallel Engine must do so under "
                        "`if __name__ == '__main__':` (workers are spawned)"
                    )
            if time.monotonic() > deadline:
                raise TensorParallelError(
                    f"tensor-parallel workers did not start within {timeout_s:.0f} s"
                )
            time.sleep(0.05)

    def _watchdog(self) -> None:
        while not self._closed:
            for p in self.procs:
                if p.exitcode is not None and not self._closed:
                    self.failure = (
                        f"tensor-parallel worker {p.name} exited with code {p.exitcode}"
                    )
                    logger.error("%s; the engine stops", self.failure)
                    with contextlib.suppress(Exception):
                        self.pg.abort()  # wake a step blocked in a collective
                    return
            time.sleep(0.2)

    def check(self) -> None:
        if self.failure is not None:
            raise TensorParallelError(self.failure)

    def setup(self, num_blocks: int, block_size: int) -> None:
        """Tell the workers the KV cache's size (they allocate their part)."""
        self.check()
        self.comm.send_object(("setup", (num_blocks, block_size)))

    def step(self, payload: tuple[Any, ...]) -> None:
        """Send a step's inputs; the caller then runs its own shard."""
        self.check()
        self.comm.send_object(("step", payload))

    def error(self, exc: BaseException) -> TensorParallelError:
        """The typed error of a step that failed on rank 0 with tensor
        parallelism: the ranks may be out of step, so the group is done. A
        worker that died is the cause named (a collective with a dead peer
        fails with a connection error first; its exit code may lag a little)."""
        deadline = time.monotonic() + 2.0
        while self.failure is None and time.monotonic() < deadline:
            dead = [p for p in self.procs if p.exitcode is not None]
            if dead:
                self.failure = (
                    f"tensor-parallel worker {dead[0].name} exited with code "
                    f"{dead[0].exitcode}"
                )
                break
            time.sleep(0.05)
        self.failure = self.failure or f"a tensor-parallel step failed: {exc!r}"
        return TensorParallelError(self.failure)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the workers (told to, then terminated, then killed); idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.failure is None and hasattr(self, "comm"):
            with contextlib.suppress(Exception):
                self.comm.send_object(("stop", None))
        else:  # nobody tells the workers to stop: they may wait in a collective
            timeout_s = min(timeout_s, 0.5)
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            p.join(max(deadline - time.monotonic(), 0.1))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(2.0)
        if hasattr(self, "pg"):
            with contextlib.suppress(Exception):
                self.pg.abort()


# ---------------------------------------------------------------------- workers
def _exit_with_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)
        time.sleep(0.5)


def worker_main(
    rank: int, size: int, port: int, spec: WorkerSpec, parent_pid: int
) -> None:
    """A worker's life: join the group, build its shard, run steps until told
    to stop (or until rank 0 is gone)."""
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    try:
        _serve(rank, size, port, spec)
    except Exception as exc:  # rank 0 gone, or aborted: nothing to report to
        logging.getLogger("llmprod").info("tp worker %d ends: %r", rank, exc)
    os._exit(0)


def _serve(rank: int, size: int, port: int, spec: WorkerSpec) -> None:
    from llmprod.exec.runner import zeroed_kv_caches
    from llmprod.layers.attention import get_attention_backend
    from llmprod.layers.cpu import attach_fused_ops
    from llmprod.layers.linear import pack_onednn_linears, use_onednn_linears
    from llmprod.models.loader import build_model, load_config, pick_dtype

    torch.set_num_threads(spec.num_threads)
    device = torch.device(spec.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    store = _store(port, rank, size, spec.timeout_s)
    store.set(f"up/{rank}", "1")
    pg = _process_group(store, rank, size, spec.timeout_s, device)
    comm = Comm(pg, rank, size, device)
    path = Path(spec.path)
    hf_config = load_config(path)
    dtype = pick_dtype(spec.dtype, device)
    model: Any = build_model(hf_config, path, dtype, device, "native")
    shard_llama(model, shard_plan(hf_config, size, rank), comm)
    if spec.linear_backend == "onednn":
        use_onednn_linears(model)
        pack_onednn_linears(model, exclude=(model.lm_head,))
    backend = get_attention_backend(spec.attention_backend, device)
    # Rank 0 has raised already where fused_ops='on' cannot be served.
    mode = "off" if spec.fused_ops == "off" else "auto"
    attach_fused_ops(model, mode, backend.name, device, dtype)
    kind, (num_blocks, block_size) = comm.recv_object()
    assert kind == "setup"
    shape = (2, num_blocks, block_size, int(model.num_kv_heads), int(model.head_dim))
    kv = zeroed_kv_caches(int(model.num_layers), shape, dtype, device)
    with torch.inference_mode():
        while True:
            kind, payload = comm.recv_object()
            if kind == "stop":
                return
            input_ids, positions, meta = payload
            meta = _to_device(meta, device)
            model(input_ids.to(device), positions.to(device), kv, meta, backend)
