"""The peers benchmark's own measurements (benchmarks/e2e/peers.py): the peak RSS
of a whole process tree (vLLM serves from a second process) and the greedy-token
cross-check between systems. The peers themselves are never installed in CI."""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks.e2e.peers import _tree_rss_bytes, same_tokens, tree_rss_peak

CHILD = (
    "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
    "import time; print('ready', flush=True); time.sleep(30)"
)


def test_tree_rss_counts_the_memory_of_child_processes() -> None:
    import os

    alone = _tree_rss_bytes(os.getpid())
    with tree_rss_peak(interval_s=0.01) as peak:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
            time.sleep(0.1)
            with_child = _tree_rss_bytes(os.getpid())
        finally:
            proc.kill()
            proc.wait()
    # The child touched 300 MiB: the tree holds it, and the sampled peak saw it.
    assert with_child - alone > 250 * 2**20
    assert peak["peak"] >= with_child - 50 * 2**20


def test_same_tokens_counts_the_requests_that_match_the_reference() -> None:
    runs = [
        {"system": "llmprod:fp32", "tokens": {"0": [1, 2], "1": [3, 4]}},
        {"system": "llamacpp:f32", "tokens": {"0": [1, 2], "1": [3, 5]}},
        {"system": "vllm:fp32", "error": "exit 1"},
    ]
    same_tokens(runs)
    assert runs[0]["same_tokens_as_reference"] == [2, 2]
    assert runs[1]["same_tokens_as_reference"] == [1, 2]
    assert "same_tokens_as_reference" not in runs[2]
    assert all("tokens" not in r for r in runs)  # dropped once compared
