"""Linear layers at 1 to 256 token rows: PyTorch's default float32 path
(``F.linear``, MKL in the x86 wheels) against oneDNN (``linear_backend="onednn"``),
for a forward's worth of SmolLM2-135M's layers (30 x qkv, o, gate_up, down,
distinct matrices that stream from memory as in a real step) and its 49152 x 576
lm_head, with 1 and 2 threads. The layers also run on oneDNN with their weights
packed in its blocked layout (``pack_onednn_linears``, what the engine does on the
native path).

    python -m benchmarks.e2e.linear_backends
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.e2e.harness import time_per_call
from llmprod.layers.linear import (
    PACK_ROWS_HINT,
    onednn_available,
    onednn_linear,
    packing_available,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,4,16,64,256")
    args = ap.parse_args()
    if not onednn_available():
        raise SystemExit("this PyTorch has no oneDNN linear")
    from llmprod import Engine

    eng = Engine.from_pretrained(
        "smollm2-135m", kv_cache_memory="64MiB", linear_backend="torch"
    )
    layers = [
        m.weight.detach().clone()
        for m in eng.model.modules()
        if isinstance(m, torch.nn.Linear) and m.out_features != eng.vocab_size
    ]
    head = eng.model.lm_head.weight.detach().clone()
    eng.close()
    shapes = sorted({tuple(w.shape) for w in layers})
    print(f"{len(layers)} layer matrices {shapes}, lm_head {tuple(head.shape)}")
    packed = (
        [torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT) for w in layers]
        if packing_available()
        else None
    )
    print(
        "| threads | rows (M) | layers, torch | layers, oneDNN | speed-up | "
        "layers, oneDNN packed | speed-up | "
        "lm_head, torch | lm_head, oneDNN | speed-up |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for m in (int(r) for r in args.rows.split(",")):
            print(_row(layers, packed, head, threads, m))


def _row(
    layers: list[torch.Tensor],
    packed: list[torch.Tensor] | None,
    head: torch.Tensor,
    threads: int,
    m: int,
) -> str:
    xs = {w.shape[1]: torch.randn(m, w.shape[1]) for w in layers}
    xh = torch.randn(m, head.shape[1])
    n = max(3, 60 // m)
    with torch.inference_mode():
        lt = time_per_call(lambda: [F.linear(xs[w.shape[1]], w) for w in layers], n)
        lo = time_per_call(
            lambda: [onednn_linear(xs[w.shape[1]], w) for w in layers], n
        )
        lp = float("nan")
        if packed is not None:
            lp = time_per_call(
                lambda: [onednn_linear(xs[w.shape[1]], w) for w in packed], n
            )
        ht = time_per_call(lambda: F.linear(xh, head), n)
        ho = time_per_call(lambda: onednn_linear(xh, head), n)
    return (
        f"| {threads} | {m} | {lt * 1e3:.2f} ms | {lo * 1e3:.2f} ms | "
        f"{lt / lo:.2f}x | {lp * 1e3:.2f} ms | {lt / lp:.2f}x | "
        f"{ht * 1e3:.2f} ms | {ho * 1e3:.2f} ms | {ht / ho:.2f}x |"
    )


if __name__ == "__main__":
    main()
