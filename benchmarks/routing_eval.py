"""Routing evaluation: accuracy against labels, cost saved and quality kept.

Runs every prompt of ``benchmarks/data/routing_prompts.jsonl`` (labelled ``easy``
or ``hard``, split into ``dev`` and ``heldout``) through a :class:`llmprod.Router`
for each policy, as a one-turn chat, greedy, and reports:

- routing accuracy: a request counts as routed right when the engine that
  answered is the large one exactly for the ``hard`` prompts (for a cascade, an
  escalated request was answered by the large engine); over all prompts and over
  the held-out split alone;
- cost, from the Router's stats with the per-1K-token prices given on the command
  line, and the cost saved against sending everything to the large engine;
- quality kept: the mean semantic similarity (MiniLM cosine) of each routed
  answer to the large engine's answer to the same prompt, and the fraction that
  are token-for-token the large engine's answer;
- wall time of the whole batch under each policy (engines run one batch at a
  time; on CPU this is the compute actually spent).

Engines: ``small`` is SmolLM2-135M-Instruct with int8 weights
(``quantization="int8"``) and ``large`` the same model in float32. If the int8
path fails to load, ``small`` falls back to float32 (then the two engines compute
the same thing and only the prices differ); the report says which ran. With
``--pair models``, ``small`` is SmolLM2-135M-Instruct and ``large`` Gemma 3 270M
base, both float32; SmolLM2 gets its chat template and Gemma, which has none, a
plain ``Question: ...\\nAnswer:`` template.

Usage::

    python -m benchmarks.routing_eval --max-tokens 48 \\
        --out benchmarks/results/routing_eval.json
    python -m benchmarks.routing_eval --pair models --max-tokens 48 \\
        --out benchmarks/results/routing_eval_models.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmprod import Engine, SamplingParams
from llmprod.eval.quality import bleu, default_embedder, semantic_similarity
from llmprod.router import (
    CascadePolicy,
    ComplexityPolicy,
    RoutePlan,
    RouteQuery,
    Router,
    RoutingPolicy,
)

DATA = Path(__file__).parent / "data" / "routing_prompts.jsonl"


class Fixed(RoutingPolicy):
    """Every request to one engine (the always-small and always-large baselines)."""

    def __init__(self, route: str) -> None:
        self.route = route

    def __repr__(self) -> str:
        return f"always {self.route}"

    def plan(self, query: RouteQuery, order: Sequence[str]) -> RoutePlan:
        return RoutePlan((self.route,))


def load_prompts(path: Path) -> list[dict[str, str]]:
    """Read the labelled prompts (one JSON object per line)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in rows:
        if r.get("label") not in ("easy", "hard"):
            raise ValueError(f"bad label in {r}")
    return rows


QA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}Question: "
    "{{ m['content'] }}\n{% endif %}{% endfor %}Answer:"
)


def build_engines(kv: str, pair: str = "int8") -> tuple[dict[str, Engine], str]:
    """The small and large engines, and a note on what ran.

    ``pair="int8"``: SmolLM2-135M-Instruct in int8 (small) and float32 (large).
    ``pair="models"``: two models, SmolLM2-135M-Instruct (small) and Gemma 3 270M
    base (large, on the generic path), both float32.
    """
    # No prefix caching: every policy then sees cold engines and computes the
    # same thing for the same prompt (a cache hit changes the shapes of the
    # prefill, which can flip a near-tied greedy token).
    opts: dict[str, Any] = {
        "dtype": "float32",
        "kv_cache_memory": kv,
        "seed": 0,
        "enable_prefix_caching": False,
    }
    if pair == "models":
        small = Engine.from_pretrained("smollm2-135m", **opts)
        large = Engine.from_pretrained("gemma3-270m", **opts)
        # The base model has no chat template; give it a plain question/answer one
        # (the Router renders each conversation with each engine's own template).
        large.tokenizer.chat_template = QA_TEMPLATE
        note = (
            "small = SmolLM2-135M-Instruct float32 (its chat template), large = "
            f"Gemma 3 270M base float32 ({large.model_impl} path, prompts as "
            "'Question: ...\\nAnswer:')"
        )
        return {"small": small, "large": large}, note
    large = Engine.from_pretrained("smollm2-135m", **opts)
    try:
        small = Engine.from_pretrained("smollm2-135m", quantization="int8", **opts)
        note = f"small = SmolLM2-135M-Instruct int8 ({small.quantization}), large = float32"
    except Exception as exc:  # the int8 path is not there: say so and go on
        small = Engine.from_pretrained("smollm2-135m", **opts)
        note = f"int8 unavailable ({exc!r}); small = float32 too, only prices differ"
    return {"small": small, "large": large}, note


def run_policy(
    name: str,
    router: Router,
    convs: list[Any],
    params: SamplingParams,
) -> dict[str, Any]:
    """Answer every conversation (or text prompt) through the router; time the
    whole batch."""
    router.reset_stats()
    t0 = time.perf_counter()
    if convs and isinstance(convs[0], str):
        outs: Any = router.generate(convs, params)
    else:
        outs = router.chat(convs, params)
    wall = time.perf_counter() - t0
    assert isinstance(outs, list)
    return {"name": name, "outs": outs, "wall_s": wall, "stats": router.stats()}


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    rows = load_prompts(Path(args.data))
    if args.limit:
        rows = rows[: args.limit // 2] + rows[-(args.limit - args.limit // 2) :]
    labels = [r["label"] for r in rows]
    heldout = np.array([r.get("split") == "heldout" for r in rows])
    hard = np.array([lab == "hard" for lab in labels])
    convs = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    if args.pair == "models":  # the base model would go on to ask itself more
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=0, stop=["\nQuestion:"]
        )
    prices = {"small": args.price_small, "large": args.price_large}

    if args.threads:
        torch.set_num_threads(args.threads)
    engines, note = build_engines(args.kv_cache_memory, args.pair)
    print(note, flush=True)
    for e in engines.values():  # warm both up before anything is timed
        e.generate("Hello", SamplingParams(max_tokens=4, temperature=0))
    embedder = default_embedder()
    embedder.embed(["warm up"])

    policies: list[tuple[str, RoutingPolicy]] = [
        ("always-large", Fixed("large")),
        ("always-small", Fixed("small")),
        ("complexity (text features, t=0.5)", ComplexityPolicy(0.5)),
        (
            "complexity + exemplar similarity (t=0.5)",
            ComplexityPolicy(0.5, embedder=embedder),
        ),
    ]
    policies += [
        (f"cascade mean_logprob >= {t}", CascadePolicy(t)) for t in args.cascade
    ]

    results = []
    reference: list[str] = []
    reference_ids: list[list[int]] = []
    for name, policy in policies:
        router = Router(engines, policy, order=["small", "large"], prices=prices)
        r = run_policy(name, router, convs, params)
        outs = r["outs"]
        if name == "always-large":
            reference = [o.text for o in outs]
            reference_ids = [list(o.token_ids) for o in outs]
        to_large = np.array([o.flags["route"]["engine"] == "large" for o in outs])
        texts = [o.text for o in outs]
        sims = np.array(semantic_similarity(texts, reference, embedder))
        same = np.array(
            [list(o.token_ids) == ref for o, ref in zip(outs, reference_ids)]
        )
        correct = to_large == hard
        s = r["stats"]
        results.append(
            {
                "policy": name,
                "to_large": float(to_large.mean()),
                "accuracy": float(correct.mean()),
                "accuracy_heldout": float(correct[heldout].mean())
                if heldout.any()
                else None,
                "hard_to_large": float(to_large[hard].mean()),
                "easy_to_small": float((~to_large[~hard]).mean()),
                "escalations": s["escalations"],
                "cost": s["cost"],
                "baseline_cost": s["baseline_cost"],
                "cost_saved": s["cost_saved"],
                "cost_saved_fraction": s["cost_saved_fraction"],
                "similarity_mean": float(sims.mean()),
                "similarity_hard": float(sims[hard].mean()),
                "same_as_large": float(same.mean()),
                "bleu_vs_large": bleu(texts, reference),
                "wall_s": r["wall_s"],
                "completion_tokens": sum(o.usage.completion_tokens for o in outs),
                "stats": s,
                "rows": [
                    {
                        "prompt": row["prompt"],
                        "label": row["label"],
                        "split": row.get("split", "dev"),
                        "engine": o.flags["route"]["engine"],
                        "confidence": o.flags["route"]["confidence"][0],
                        "score": o.flags["route"]["score"],
                        "similarity": float(sim),
                        "text": o.text,
                    }
                    for row, o, sim in zip(rows, outs, sims)
                ],
            }
        )
        print(
            f"{name}: acc {correct.mean():.3f} to_large {to_large.mean():.2f} "
            f"saved {s['cost_saved_fraction']} sim {sims.mean():.3f} "
            f"wall {r['wall_s']:.1f}s",
            flush=True,
        )
    for e in engines.values():
        e.close()
    return {
        "engines": note,
        "max_tokens": args.max_tokens,
        "prices_per_1k_tokens": prices,
        "num_prompts": len(rows),
        "num_hard": int(hard.sum()),
        "num_heldout": int(heldout.sum()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "results": results,
    }


def to_markdown(report: dict[str, Any]) -> str:
    """The summary table of a report (wall times stay in the JSON: on a shared
    machine they measure the neighbours as much as the engines)."""
    lines = [
        "| policy | to large | routing accuracy (all / held-out) | escalations "
        "| cost | cost saved vs always-large | similarity to large (all / hard) "
        "| same tokens as large | BLEU vs large |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        held = (
            "n/a" if r["accuracy_heldout"] is None else f"{r['accuracy_heldout']:.2f}"
        )
        saved = r["cost_saved_fraction"]
        saved_s = "n/a" if saved is None else f"{saved:+.1%}"
        lines.append(
            f"| {r['policy']} | {r['to_large']:.0%} | {r['accuracy']:.2f} / {held} "
            f"| {r['escalations']} | {r['cost']:.3f} | {saved_s} "
            f"| {r['similarity_mean']:.3f} / {r['similarity_hard']:.3f} "
            f"| {r['same_as_large']:.0%} | {r['bleu_vs_large']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--price-small", type=float, default=0.5, help="per 1K tokens")
    parser.add_argument("--price-large", type=float, default=1.0, help="per 1K tokens")
    parser.add_argument(
        "--cascade", type=float, nargs="*", default=[-0.5, -0.7, -0.9],
        help="min_confidence values (mean token log-probability) to evaluate",
    )  # fmt: skip
    parser.add_argument("--kv-cache-memory", default="256MiB")
    parser.add_argument(
        "--pair",
        choices=["int8", "models"],
        default="int8",
        help="int8: SmolLM2 int8 vs float32; models: SmolLM2-135M vs Gemma 3 270M",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: default)"
    )
    parser.add_argument(
        "--limit", type=int, default=0, help="first/last N prompts only"
    )
    parser.add_argument("--out", default="", help="write the full report as JSON here")
    parser.add_argument(
        "--render", default="", help="only print the table of a saved JSON report"
    )
    args = parser.parse_args(argv)
    if args.render:
        print(to_markdown(json.loads(Path(args.render).read_text())))
        return
    report = evaluate(args)
    md = to_markdown(report)
    print()
    print(report["engines"])
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
