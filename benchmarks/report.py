"""Write the results of ``benchmarks.e2e.run`` into ``docs/benchmarks.md``.

Each results file becomes one section (one per mode: compare, scale, poisson),
with the date, machine, versions, the exact command and the tables. Re-running
replaces that mode's section and leaves the rest of the document alone. Cells that
the run did not measure are written as "—", never estimated.

Example::

    python -m benchmarks.report benchmarks/results/e2e-compare.json \\
        --note "before the engine optimisations"
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
RESULTS_HEADING = "## Results"
NA = "—"

TITLES = {
    "compare": "End-to-end comparison",
    "scale": "Scale curves",
    "poisson": "Latency under Poisson arrivals",
    "peers": "Against the engines users pick instead",
}
# (ours, theirs, what is compared, target): the targets of the speed issues.
PEER_TARGETS = [
    ("llmprod:fp32", "vllm:fp32", "total_tok_s", 1.2),
    ("llmprod:bf16", "vllm:bf16", "total_tok_s", 1.2),
    ("llmprod:fp32", "llamacpp:f32", "batch1", 1.0),
    ("llmprod:int8", "llamacpp:q8_0", "batch1", 1.0),
    ("llmprod:gguf", "llamacpp:q4_1", "batch1", 1.0),
    ("llmprod:gguf", "llamacpp:q4_1", "total_tok_s", 2.0),
    ("llmprod:gguf", "llmprod:fp32", "batch1", 2.5),
]


def _num(v: Any, spec: str = ".1f") -> str:
    return NA if v is None else format(v, spec)


def _ceiling(r: dict[str, Any]) -> str:
    """Share of the compute ceiling, against torch.mm's GEMM and oneDNN's."""
    mm, dnn = r.get("fraction_of_compute_ceiling"), r.get("fraction_of_onednn_ceiling")
    return _pct(mm) if dnn is None else f"{_pct(mm)} / {_pct(dnn)}"


def _pct(v: Any) -> str:
    return NA if v is None else f"{100 * v:.1f}%"


def _gib(v: Any) -> str:
    return NA if not v else f"{v / 2**30:.2f} GiB"


def _trio(p: dict[str, float] | None) -> str:
    if not p:
        return NA
    return " / ".join(f"{p[k]:.2f}" for k in ("p50", "p95", "p99"))


def _machine_lines(res: dict[str, Any]) -> list[str]:
    m = res.get("machine")
    git = res.get("git") or {}
    commit = git.get("commit") or "unknown"
    state = (
        " with uncommitted engine changes" if git.get("engine_sources_modified") else ""
    )
    lines = [f"- Measured: {res['date']}, commit `{commit}`{state}."]
    if m:
        lines.append(
            f"- Machine: {m['cpu']}, {m['usable_cpus']} usable CPUs, "
            f"{res['threads']} torch threads; Python {m['python']}, torch {m['torch']}, "
            f"transformers {m['transformers']}."
        )
        lines.append(
            f"- Measured limits: fp32 GEMM {m['gemm_gflops']:.0f} GFLOP/s "
            f"({'x'.join(map(str, m['gemm_shape']))}), read bandwidth "
            f"{m['read_gbps']:.1f} GB/s; {res['model']} has "
            f"{m['model_params'] / 1e6:.1f}M parameters "
            f"({m['model_bytes'] / 1e9:.2f} GB in fp32), so the compute ceiling is "
            f"{m['compute_ceiling_tok_s']:.0f} tok/s (GEMM FLOP/s / 2 x params)."
        )
        if m.get("gemm_gflops_onednn"):
            lines.append(
                f"- The same GEMM through oneDNN (llmprod's CPU linear layers): "
                f"{m['gemm_gflops_onednn']:.0f} GFLOP/s, a compute ceiling of "
                f"{m['compute_ceiling_onednn_tok_s']:.0f} tok/s."
            )
    else:
        lines.append(f"- Machine probe not run; {res['threads']} torch threads.")
    lines.append(f"- Command: `{res['command']}`")
    return lines


def _workload_line(w: dict[str, Any]) -> str:
    s = w["spec"]
    arrival = (
        "all submitted at once"
        if s["arrival"] == "burst"
        else f"Poisson arrivals at {s['rate']:.3f} req/s"
    )
    copies = ""
    if s["repeat_fraction"] or s["paraphrase_fraction"]:
        copies = (
            f", {s['repeat_fraction']:.0%} exact repeats and "
            f"{s['paraphrase_fraction']:.0%} paraphrases"
        )
    scale = f" x{s['prompt_scale']:g}" if s["prompt_scale"] != 1 else ""
    return (
        f"{w['num_requests']} chat requests (seed {s['seed']}): user messages of "
        f"{s['prompt_tokens'][0]}-{s['prompt_tokens'][1]} tokens{scale} "
        f"(log-uniform) through the chat template, {s['output_tokens'][0]}-"
        f"{s['output_tokens'][1]} new tokens (uniform), EOS ignored, {arrival}"
        f"{copies}; {w['prompt_tokens']} prompt + {w['output_tokens']} generated tokens."
    )


def _compare(res: dict[str, Any]) -> list[str]:
    runs = res["runs"]
    out = []
    wl = next((r["workload"] for r in runs if "workload" in r), None)
    if wl:
        out += [f"Workload: {_workload_line(wl)}", ""]
    out += [
        "| system | generated tok/s | prompt tok/s | total tok/s | of compute "
        "ceiling (torch.mm GEMM / oneDNN GEMM) | TTFT p50 / p95 / p99 (s) | "
        "e2e p50 / p95 / p99 (s) | peak RSS | padding waste |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for r in runs:
        if "error" in r:
            msg = r["error"].splitlines()[0][:80].replace("|", "/")
            out.append(f"| {r['system']} | failed: {msg} |||||||")
            continue
        out.append(
            f"| {r['system']} | {_num(r['generated_tok_s'])} | "
            f"{_num(r['prompt_tok_s'])} | {_num(r['total_tok_s'])} | "
            f"{_ceiling(r)} | {_trio(r.get('ttft_s'))} | "
            f"{_trio(r.get('e2e_s'))} | {_gib(r.get('peak_rss_bytes'))} | "
            f"{_pct(r.get('padding_waste'))} |"
        )
    ratios = res.get("ratios") or {}
    if ratios:
        out += [
            "",
            "| llmprod / baseline | total tok/s | generated tok/s | e2e p50 "
            "speed-up | e2e p99 speed-up |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, d in ratios.items():
            out.append(
                f"| {name} | {d['total_tok_s']:.2f}x | {d['generated_tok_s']:.2f}x | "
                f"{d['e2e_p50_speedup']:.2f}x | {d['e2e_p99_speedup']:.2f}x |"
            )
    ours = next((r for r in runs if r["system"] == "llmprod" and "llmprod" in r), None)
    if ours:
        k = ours["llmprod"]
        parts = [
            f"{k['kv_num_blocks']} KV blocks x {k['kv_block_size']} tokens "
            f"({_gib(k.get('kv_budget_bytes'))} budget)",
            f"peak KV usage {_pct(k.get('kv_peak_usage'))}",
            f"{k.get('preemptions')} preemptions in {k.get('steps')} steps",
            f"padding waste {_pct(ours.get('padding_waste'))}",
        ]
        if k.get("cached_prompt_tokens") is not None:
            parts.append(
                f"{k['cached_prompt_tokens']} prompt tokens served from the prefix "
                f"cache ({_pct(k.get('kv_prefix_hit_rate'))} hit rate)"
            )
        if k.get("weight_read_gbps") is not None:
            parts.append(f"weights read at {k['weight_read_gbps']:.1f} GB/s")
        over = k.get("rss_over_weights_and_kv_bytes")
        if over is not None:
            parts.append(
                f"peak RSS {'exceeds' if over >= 0 else 'is below'} weights + KV "
                f"budget by {abs(over) / 2**30:.2f} GiB"
            )
        touched = k.get("kv_touched_bytes")
        over_touched = k.get("rss_over_weights_and_touched_kv_bytes")
        if touched is not None and over_touched is not None:
            parts.append(
                f"KV blocks ever used {_gib(touched)} (the part of the budget in "
                f"RAM); peak RSS exceeds weights + those by "
                f"{over_touched / 2**30:.2f} GiB"
            )
        out += ["", "llmprod: " + "; ".join(parts) + "."]
    out += [
        "",
        "TTFT of a static batch is its first token; static batches decode until "
        "their longest request is done, and only the requested tokens count. "
        "Continuous batching (`hf_generate_batch*`) is timed from the moment its "
        "manager is running; building it (and its KV cache) is not counted.",
    ]
    return out


def _scale(res: dict[str, Any]) -> list[str]:
    out = [
        "| run | prompt + generated tokens | wall (s) | generated tok/s | total tok/s "
        "| e2e p99 (s) | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["runs"]:
        name = r.get("label") or r["system"]
        if "error" in r:
            msg = r["error"].splitlines()[0][:80].replace("|", "/")
            out.append(f"| {name} | failed: {msg} ||||||")
            continue
        out.append(
            f"| {name} | {r['prompt_tokens']} + {r['generated_tokens']} | "
            f"{r['wall_s']:.1f} | {_num(r['generated_tok_s'])} | "
            f"{_num(r['total_tok_s'])} | {_num(r['e2e_s']['p99'], '.2f')} | "
            f"{_gib(r.get('peak_rss_bytes'))} |"
        )
    for system, g in (res.get("growth") or {}).items():
        if g:
            out += [
                "",
                f"{system}: " + "; ".join(f"{k} = {v:.2f}" for k, v in g.items()),
            ]
    wl = next((r["workload"] for r in res["runs"] if "workload" in r), None)
    if wl:
        out += ["", f"Workload of the first row: {_workload_line(wl)}"]
    return out


def _poisson(res: dict[str, Any]) -> list[str]:
    cap = res.get("capacity_rps")
    how = "measured in this run" if res.get("capacity_measured") else "given"
    out = [
        f"Capacity: {_num(cap, '.3f')} requests/s ({how}, all requests at once).",
        "",
        "| load | offered req/s | TTFT p50 / p95 / p99 (s) | e2e p50 / p95 / p99 (s) "
        "| generated tok/s | peak RSS |",
        "|---|---:|---|---|---:|---:|",
    ]
    for r in res["runs"]:
        if "error" in r:
            msg = r["error"].splitlines()[0][:80].replace("|", "/")
            out.append(f"| {r.get('label', r['system'])} | failed: {msg} |||||")
            continue
        out.append(
            f"| {r['load']:.0%} | {r['offered_rps']:.3f} | {_trio(r.get('ttft_s'))} | "
            f"{_trio(r.get('e2e_s'))} | {_num(r['generated_tok_s'])} | "
            f"{_gib(r.get('peak_rss_bytes'))} |"
        )
    wl = next((r["workload"] for r in res["runs"] if "workload" in r), None)
    if wl:
        out += ["", f"Workload of the first row: {_workload_line(wl)}"]
    return out


def _peers(res: dict[str, Any]) -> list[str]:
    runs = res["runs"]
    out = [f"Workload: {_workload_line(res['workload'])}", ""]
    b1 = res["batch1"]
    out += [
        f"Batch-1 decode: one chat prompt of {b1['prompt_tokens']} tokens alone, "
        f"(N - 1) / (T(N) - T(1)) with N = {b1['new_tokens']}, so prefill drops out; "
        f"median of {b1['repeats']}. Peak RSS: the process's own, and vLLM's whole "
        "process tree (it serves from a second process).",
        "",
        "| system | total tok/s | batch-1 decode tok/s | TTFT p50 / p99 s "
        "| load s | peak RSS | llmprod:fp32's greedy tokens |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    by = {r["system"]: r for r in runs if "error" not in r}
    for r in runs:
        if "error" in r:
            out.append(
                f"| {r['system']} | error: {r['error'].splitlines()[0]} | | | | |"
            )
            continue
        t = r.get("ttft_s")
        ttft = f"{t['p50']:.2f} / {t['p99']:.2f}" if t else NA
        st = r.get("same_tokens_as_reference")
        same = f"{st[0]} of {st[1]} requests" if st else NA
        out.append(
            f"| {r['system']} | {r['total_tok_s']:.0f} "
            f"| {r['batch1']['decode_tok_s']:.1f} | {ttft} | {r['load_s']:.1f} "
            f"| {_gib(r['peak_rss_bytes'])} | {same} |"
        )
    rows = []
    for ours, theirs, what, target in PEER_TARGETS:
        if ours in by and theirs in by:
            a, b = by[ours], by[theirs]
            if what == "batch1":
                ratio = a["batch1"]["decode_tok_s"] / b["batch1"]["decode_tok_s"]
                label = "batch-1 decode"
            else:
                ratio = a["total_tok_s"] / b["total_tok_s"]
                label = "total tok/s"
            met = "met" if ratio >= target else "not met"
            rows.append(
                f"| {ours} / {theirs} | {label} | {ratio:.2f}x "
                f"| >= {target:g}x ({met}) |"
            )
    if rows:
        out += ["", "| ratio | of | measured | target |", "|---|---|---:|---|", *rows]
    return out


def render_section(res: dict[str, Any], source: str | None, note: str | None) -> str:
    mode = res["mode"]
    lines = [f"### {TITLES[mode]}", ""]
    if note:
        lines += [f"**{note}**", ""]
    if mode == "peers":
        lines += [
            f"- Measured: {res['date']}, commit `{res.get('commit') or 'unknown'}`;"
            f" {res.get('cpu', 'CPU unknown')}, {res['threads']} threads each.",
            f"- Command: `{res['command']}`",
        ]
        if res.get("merged_from"):
            m = res["merged_from"]
            lines.append(f"- The other systems' runs: {m['date']}, `{m['command']}`.")
    else:
        lines += _machine_lines(res)
    if source:
        lines.append(f"- Raw results: `{source}`.")
    lines.append("")
    render = {
        "compare": _compare,
        "scale": _scale,
        "poisson": _poisson,
        "peers": _peers,
    }
    lines += render[mode](res)
    body = "\n".join(lines).rstrip() + "\n"
    return f"<!-- BEGIN e2e-{mode} -->\n{body}<!-- END e2e-{mode} -->\n"


def update_doc(doc: str, section: str, mode: str) -> str:
    """Replace the section of ``mode`` in ``doc``, or add it under Results."""
    pattern = re.compile(
        rf"<!-- BEGIN e2e-{mode} -->\n.*?<!-- END e2e-{mode} -->\n", re.DOTALL
    )
    if pattern.search(doc):
        return pattern.sub(lambda _: section, doc, count=1)
    if RESULTS_HEADING not in doc:
        doc = doc.rstrip() + f"\n\n{RESULTS_HEADING}\n"
    return doc.rstrip() + "\n\n" + section


def main(argv: list[str] | None = None) -> int:
    import json

    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description="Write e2e benchmark results into docs/benchmarks.md.",
    )
    ap.add_argument("results", nargs="+", help="results JSON from benchmarks.e2e.run")
    ap.add_argument("--doc", default=str(DOC))
    ap.add_argument("--note", help="a line shown above the section")
    args = ap.parse_args(argv)
    doc_path = Path(args.doc)
    doc = doc_path.read_text() if doc_path.exists() else "# Benchmarks\n"
    for path in args.results:
        res = json.loads(Path(path).read_text())
        try:
            source = str(Path(path).resolve().relative_to(REPO))
        except ValueError:
            source = None
        doc = update_doc(doc, render_section(res, source, args.note), res["mode"])
        print(f"updated the {res['mode']} section of {doc_path} from {path}")
    doc_path.write_text(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
