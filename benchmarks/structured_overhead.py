"""What a grammar mask costs per token: the same requests with and without a
JSON Schema constraint, at batch 1 and batch 16, on the default model.

    python -m benchmarks.structured_overhead --repeats 3

Per-token time is the mean time per output token after the first
(``Completion.timings.tpot_s``, so prefill is left out): a step's time, as every
request of the batch decodes in every step. Constrained requests stop when their
document is complete, so a batch's wall time would not compare.
"""

from __future__ import annotations

import argparse
import statistics

from llmprod import Engine, SamplingParams
from llmprod.structured import StructuredOutputs

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 40},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 24}},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}


def per_token_ms(eng: Engine, batch: int, structured: bool, seed: int) -> float:
    so = StructuredOutputs(json=SCHEMA) if structured else None
    params = [
        SamplingParams(max_tokens=96, temperature=0.8, seed=seed + i, structured=so)
        for i in range(batch)
    ]
    prompts = [f"Person number {i} described as JSON:" for i in range(batch)]
    outs = eng.generate(prompts, params)
    tpots = [o.timings.tpot_s for o in outs if o.timings.tpot_s is not None]
    return 1000 * statistics.mean(tpots)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    eng = Engine.from_pretrained(args.model, enable_prefix_caching=False)
    eng.generate("warm up", SamplingParams(max_tokens=8, structured=StructuredOutputs(
        json=SCHEMA)))  # fmt: skip
    print(f"{args.model}, vocabulary {eng.vocab_size}, median of {args.repeats}")
    print("| batch | free ms/token | JSON Schema ms/token | overhead |")
    print("|---:|---:|---:|---:|")
    for batch in (1, 16):
        free, constrained = [], []
        for r in range(args.repeats):  # alternate, so drift hits both
            free.append(per_token_ms(eng, batch, False, 100 * r))
            constrained.append(per_token_ms(eng, batch, True, 100 * r))
        f, c = statistics.median(free), statistics.median(constrained)
        print(f"| {batch} | {f:.2f} | {c:.2f} | {100 * (c / f - 1):+.1f}% |")
    eng.close()


if __name__ == "__main__":
    main()
