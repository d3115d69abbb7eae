"""Memory of the quickstart by weight format: resident weight bytes (the
engine's ``weights_bytes``), resident memory after loading, and the peak RSS of
the whole quickstart (``examples/quickstart.py``, run as it is but for the
``quantization=`` it passes), each format in its own process.

    python -m benchmarks.quant.footprint
    python -m benchmarks.quant.footprint --only gguf,fp32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.py"
LOAD = 'Engine.from_pretrained("smollm2-135m")'

FORMATS: dict[str, dict[str, str]] = {
    "fp32": {},
    "int8": {"quantization": "int8"},
    "int4": {"quantization": "int4"},
    "gguf": {"quantization": "gguf"},
}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(name: str) -> None:
    """Run the quickstart with this format's options; print one JSON line."""
    import contextlib
    import io

    from llmprod import Engine

    opts = FORMATS[name]
    loaded: dict[str, float] = {}
    original = Engine.from_pretrained

    def from_pretrained(*args: object, **kwargs: object) -> Engine:
        t0 = time.perf_counter()
        eng = original(*args, **{**kwargs, **opts})  # type: ignore[arg-type]
        loaded["load_s"] = time.perf_counter() - t0
        loaded["rss_after_load_kib"] = _status_kib("VmRSS")
        loaded["peak_rss_load_kib"] = _status_kib("VmHWM")
        loaded["weights_bytes"] = sum(eng.weight_bytes.values())
        loaded["by_format"] = dict(eng.weight_bytes)  # type: ignore[assignment]
        return eng

    source = QUICKSTART.read_text()
    if LOAD not in source:
        raise SystemExit(f"{QUICKSTART} no longer calls {LOAD}")
    Engine.from_pretrained = from_pretrained  # type: ignore[method-assign]
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(source, str(QUICKSTART), "exec"), {"__name__": "__main__"})
    loaded["quickstart_s"] = time.perf_counter() - t0
    loaded["peak_rss_kib"] = _status_kib("VmHWM")
    print(json.dumps({"format": name, **loaded}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default=",".join(FORMATS))
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    rows = []
    for name in args.only.split(","):
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.quant.footprint", "--child", name],
            cwd=ROOT, capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r["format"] == "fp32"), None)
    print("| format | weights (MB) | of float32 | RSS after load (MB) | "
          "quickstart peak RSS (MB) | load (s) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['weights_bytes'] / base['weights_bytes']:.3f}x" if base else ""
        print(f"| {r['format']} | {r['weights_bytes'] / 1e6:.1f} | {ratio} | "
              f"{r['rss_after_load_kib'] / 1024:.0f} | {r['peak_rss_kib'] / 1024:.0f} "
              f"| {r['load_s']:.2f} |")  # fmt: skip
    for r in rows:
        print(r["format"], json.dumps(r["by_format"]))


if __name__ == "__main__":
    main()
