"""The Python steps of scripts/gpu-check.sh (run it, not this, on a GPU machine).

    python scripts/gpu_check.py machine   # versions and the device
    python scripts/gpu_check.py engine    # real model: Triton vs torch attention
    python scripts/gpu_check.py bnb       # int8-bnb engine, NF4/FP4 4-bit layers
    python scripts/gpu_check.py --dry-run # imports and option names only (CPU)

Each step prints what it measured as JSON lines and exits non-zero on a failed
check.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Write a haiku about the sea.",
    "Explain what a paged KV cache is in two sentences.",
]


def report(**fields: Any) -> None:
    print(json.dumps(fields, default=str), flush=True)


def machine() -> int:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    for mod in ("triton", "bitsandbytes", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:  # report whatever is missing
            info[mod] = f"unavailable: {exc!r}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    report(step="machine", **info)
    return 0 if torch.cuda.is_available() else 1


def _decode_speed(eng: Any, new_tokens: int = 128) -> float:
    from llmprod import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    eng.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))
    t = time.perf_counter()
    eng.generate(["Tell me a story about a lighthouse."], params)
    return new_tokens / (time.perf_counter() - t)


def engine() -> int:
    from llmprod import Engine, SamplingParams

    params = SamplingParams(max_tokens=32, temperature=0)
    tokens: dict[str, list[list[int]]] = {}
    for backend in ("torch", "triton"):
        eng = Engine.from_pretrained(
            "smollm2-135m", device="cuda", attention_backend=backend
        )
        tokens[backend] = [o.token_ids for o in eng.generate(PROMPTS, params)]
        report(step="engine", backend=eng.backend.name, device=str(eng.device),
               dtype=str(eng.dtype), batch1_tok_s=round(_decode_speed(eng), 1))  # fmt: skip
        eng.close()
    same = [a == b for a, b in zip(tokens["torch"], tokens["triton"])]
    report(step="engine", greedy_identical=sum(same), prompts=len(same))
    return 0 if all(same) else 1


def bnb() -> int:
    import torch

    from llmprod import Engine, SamplingParams

    failed = 0
    eng = Engine.from_pretrained("smollm2-135m", device="cuda", quantization="int8")
    ref = Engine.from_pretrained("smollm2-135m", device="cuda")
    params = SamplingParams(max_tokens=24, temperature=0)
    a = [o.token_ids for o in ref.generate(PROMPTS, params)]
    b = [o.token_ids for o in eng.generate(PROMPTS, params)]
    report(step="bnb", method=eng.quantization, greedy_identical_to_fp=sum(
        x == y for x, y in zip(a, b)), prompts=len(PROMPTS),
        int8_batch1_tok_s=round(_decode_speed(eng), 1),
        fp_batch1_tok_s=round(_decode_speed(ref), 1))  # fmt: skip
    if eng.quantization != "int8-bnb":
        failed += 1
    eng.close()
    ref.close()

    import bitsandbytes as bnb_lib

    torch.manual_seed(0)
    base = torch.nn.Linear(1024, 1024, bias=False, dtype=torch.float16)
    x = torch.randn(8, 1024, dtype=torch.float16, device="cuda")
    want = x @ base.weight.cuda().t()
    for quant_type in ("nf4", "fp4"):
        layer = bnb_lib.nn.Linear4bit(
            1024, 1024, bias=False, compute_dtype=torch.float16, quant_type=quant_type
        )
        layer.weight = bnb_lib.nn.Params4bit(
            base.weight.data.clone(), requires_grad=False, quant_type=quant_type
        )
        layer = layer.cuda()
        got = layer(x)
        rel = float((got - want).float().norm() / want.float().norm())
        report(step="bnb", layer=quant_type, relative_error=round(rel, 4))
        if not rel < 0.15:
            failed += 1
    return failed


def dry_run() -> int:
    """On any machine: the names the steps use still exist."""
    import inspect

    from llmprod import Engine
    from llmprod.config import EngineConfig

    fields = set(inspect.signature(EngineConfig).parameters)
    for name in ("device", "attention_backend", "quantization"):
        if name not in fields:
            print(f"EngineConfig has no {name!r}", file=sys.stderr)
            return 1
    for attr in ("generate", "close", "from_pretrained"):
        if not hasattr(Engine, attr):
            print(f"Engine has no {attr!r}", file=sys.stderr)
            return 1
    report(step="dry-run", ok=True)
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("step", nargs="?", choices=["machine", "engine", "bnb"])
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    if args.dry_run:
        sys.exit(dry_run())
    steps = {"machine": machine, "engine": engine, "bnb": bnb}
    if args.step is None:
        ap.error("name a step, or --dry-run")
    sys.exit(steps[args.step]())


if __name__ == "__main__":
    main()
