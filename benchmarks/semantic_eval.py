"""Hit rate and false-hit rate of the semantic cache at several thresholds.

Data: ``benchmarks/data/paraphrases.jsonl``, one labelled pair per line:
``{"id", "a", "b", "label": "paraphrase" | "different", "kind"?}``. The
"different" pairs are near misses on purpose (same topic or same template, another
question), the case where a semantic cache can return a wrong answer.

Two measures per threshold, with the real all-MiniLM-L6-v2:

* **pairs**: cosine(a, b) >= threshold. Hit rate over the paraphrase pairs,
  false-hit rate over the different pairs.
* **cache**: every distinct ``a`` is added to a :class:`SemanticCache` (memory
  backend) with its own answer; then every ``b`` is looked up. A paraphrase
  ``b`` counts as a hit when it gets the answer of its own ``a``; a different
  ``b`` counts as a false hit when it gets any answer. This is what a user sees.

Run::

    python benchmarks/semantic_eval.py [--data PATH] [--thresholds 0.8,0.9]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmprod.answers.embeddings import Embedder
from llmprod.answers.semantic import DEFAULT_THRESHOLD, SemanticCache
from llmprod.outputs import Completion
from llmprod.sampling_params import SamplingParams

DATA = Path(__file__).parent / "data" / "paraphrases.jsonl"
THRESHOLDS = (0.70, 0.75, 0.80, 0.85, 0.88, 0.89, 0.90, 0.92, 0.95)


def load_pairs(path: Path) -> list[dict[str, Any]]:
    """Read the labelled pairs.

    Args:
        path: a JSON-lines file.

    Returns:
        The pairs, in file order.
    """
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            pair = json.loads(line)
            if pair["label"] not in ("paraphrase", "different"):
                raise ValueError(f"{pair['id']}: unknown label {pair['label']!r}")
            pairs.append(pair)
    return pairs


def pair_similarities(embedder: Embedder, pairs: list[dict[str, Any]]) -> np.ndarray:
    """Return cosine(a, b) for each pair.

    Args:
        embedder: the embedding model.
        pairs: the labelled pairs.

    Returns:
        float array, one similarity per pair.
    """
    a = embedder.embed([p["a"] for p in pairs])
    b = embedder.embed([p["b"] for p in pairs])
    return np.einsum("ij,ij->i", a, b)


def cache_rates(
    embedder: Embedder, pairs: list[dict[str, Any]], thresholds: tuple[float, ...]
) -> dict[float, tuple[float, float]]:
    """Hit and false-hit rates through a real :class:`SemanticCache`.

    Args:
        embedder: the embedding model.
        pairs: the labelled pairs.
        thresholds: the thresholds to try.

    Returns:
        threshold -> (hit rate over paraphrases, false-hit rate over differents).
    """
    params = SamplingParams(temperature=0, max_tokens=16)
    cache = SemanticCache(
        "memory://", embedder, "semantic-eval", refresh_interval_s=None
    )
    answers: dict[str, str] = {}
    for p in pairs:
        if p["a"] not in answers:
            answers[p["a"]] = f"answer-{len(answers)}"
            done = Completion(answers[p["a"]], answers[p["a"]], [1], "stop")
            cache.add(p["a"], params, done)
    cache.flush()
    out = {}
    for t in thresholds:
        cache.threshold = t
        hits = false_hits = 0
        for p in pairs:
            found = cache.lookup(p["b"], params)
            text = None if found is None else found[0].text
            if p["label"] == "paraphrase":
                hits += text == answers[p["a"]]
            else:
                false_hits += text is not None
        n_para = sum(p["label"] == "paraphrase" for p in pairs)
        out[t] = (hits / n_para, false_hits / (len(pairs) - n_para))
    cache.close()
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the table (markdown) and the closest calls.

    Args:
        argv: command-line arguments.

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument(
        "--thresholds", default=",".join(f"{t:.2f}" for t in THRESHOLDS)
    )
    args = parser.parse_args(argv)
    thresholds = tuple(float(t) for t in args.thresholds.split(","))
    pairs = load_pairs(args.data)
    t0 = time.perf_counter()
    embedder = Embedder()
    load_s = time.perf_counter() - t0
    sims = pair_similarities(embedder, pairs)
    is_para = np.array([p["label"] == "paraphrase" for p in pairs])
    rates = cache_rates(embedder, pairs, thresholds)
    print(
        f"{len(pairs)} pairs: {int(is_para.sum())} paraphrases, "
        f"{int((~is_para).sum())} near-miss non-paraphrases "
        f"(model load {load_s:.1f} s, default threshold {DEFAULT_THRESHOLD})\n"
    )
    print(
        "| threshold | hit rate (pairs) | false-hit rate (pairs) "
        "| hit rate (cache) | false-hit rate (cache) |"
    )
    print("|---|---|---|---|---|")
    for t in thresholds:
        hit = float((sims[is_para] >= t).mean())
        false_hit = float((sims[~is_para] >= t).mean())
        ch, cf = rates[t]
        mark = " (default)" if abs(t - DEFAULT_THRESHOLD) < 1e-9 else ""
        print(f"| {t:.2f}{mark} | {hit:.0%} | {false_hit:.0%} | {ch:.0%} | {cf:.0%} |")
    print(
        f"\nparaphrase similarity: min {sims[is_para].min():.3f}, "
        f"median {np.median(sims[is_para]):.3f}; near-miss similarity: "
        f"median {np.median(sims[~is_para]):.3f}, max {sims[~is_para].max():.3f}"
    )
    print("\nclosest calls (lowest paraphrases, highest near misses):")
    order_p = np.argsort(sims[is_para])[:5]
    order_n = np.argsort(-sims[~is_para])[:5]
    para = [p for p in pairs if p["label"] == "paraphrase"]
    diff = [p for p in pairs if p["label"] == "different"]
    for i in order_p:
        print(
            f"  {sims[is_para][i]:.3f} paraphrase  {para[i]['a']!r} ~ {para[i]['b']!r}"
        )
    for i in order_n:
        print(
            f"  {sims[~is_para][i]:.3f} different   {diff[i]['a']!r} ~ {diff[i]['b']!r}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
