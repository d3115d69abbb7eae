"""lm-eval's ``hf`` backend and llmprod's (``llmprod.integrations.lm_eval``) side
by side on the local tasks of tests/data/lm_eval, on the same SmolLM2-135M
weights in float32: wall time of each ``simple_evaluate`` run, their ratio, and
whether the two scored alike (largest loglikelihood difference, generations
that differ, accuracies).

    python -m benchmarks.lm_eval_speed                 # the whole tasks
    python -m benchmarks.lm_eval_speed --limit 20 --hf-batch-size 1

Run from the repository root (the task files name their data relative to it).
Each backend gets one warm-up run on two documents first, so neither pays for
first-call set-up (oneDNN weight packing, lm-eval's dataset cache) in the timing.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import lm_eval
import torch
import transformers
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from llmprod.integrations.lm_eval import LLMProdLM

TASK_DIR = Path(__file__).resolve().parents[1] / "tests" / "data" / "lm_eval"
TASKS = ["llmprod_mc", "llmprod_gen"]
METRICS = {"llmprod_mc": "acc,none", "llmprod_gen": "exact_match,strip"}


def run(lm: Any, tasks: TaskManager, limit: int | None) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=TASKS,
        task_manager=tasks,
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
    )
    return time.perf_counter() - start, out


def compare(hf: dict[str, Any], ours: dict[str, Any]) -> tuple[float, int, int]:
    """Largest |loglikelihood difference|, generations that differ, generations."""
    max_diff, num_differ, num_gen = 0.0, 0, 0
    for task in TASKS:
        hs = sorted(hf["samples"][task], key=lambda s: s["doc_id"])
        os_ = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        for h, o in zip(hs, os_):
            if task == "llmprod_mc":
                for rh, ro in zip(h["resps"], o["resps"]):
                    max_diff = max(max_diff, abs(rh[0][0] - ro[0][0]))
            else:
                num_gen += 1
                num_differ += h["resps"] != o["resps"]
    return max_diff, num_differ, num_gen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="documents per task")
    ap.add_argument("--hf-batch-size", type=int, default=8)
    ap.add_argument("--llmprod-batch-size", type=int, default=256)
    args = ap.parse_args()

    # The engine the backend builds for itself (its scoring block size).
    our_lm = LLMProdLM(
        pretrained="smollm2-135m",
        batch_size=args.llmprod_batch_size,
        dtype="float32",
        seed=0,
    )
    engine = our_lm.engine
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(engine.model_path, dtype=torch.float32)
    model.eval()
    hf_lm = HFLM(
        pretrained=model, tokenizer=engine.tokenizer, batch_size=args.hf_batch_size
    )
    tasks = TaskManager(include_path=str(TASK_DIR))  # indexing it is not timed
    for lm in (hf_lm, our_lm):
        run(lm, tasks, 2)  # warm-up
    hf_s, hf = run(hf_lm, tasks, args.limit)
    our_s, ours = run(our_lm, tasks, args.limit)
    max_diff, num_differ, num_gen = compare(hf, ours)

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"lm-eval {lm_eval.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"tasks {', '.join(TASKS)}, limit {args.limit}")
    print(f"{'backend':<24}{'seconds':>10}  " + "  ".join(METRICS.values()))
    for name, secs, res in (
        (f"hf (batch {args.hf_batch_size})", hf_s, hf),
        (f"llmprod (batch {args.llmprod_batch_size})", our_s, ours),
    ):
        scores = "  ".join(
            f"{res['results'][t][m]:.4f}".rjust(len(m)) for t, m in METRICS.items()
        )
        print(f"{name:<24}{secs:>10.1f}  {scores}")
    print(f"speed-up (hf / llmprod): {hf_s / our_s:.2f}x")
    print(
        f"max |loglikelihood difference| {max_diff:.2e}; "
        f"generations that differ: {num_differ} of {num_gen}"
    )
    our_lm.close()


if __name__ == "__main__":
    main()
