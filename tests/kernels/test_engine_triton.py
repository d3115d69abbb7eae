"""The Engine on the Triton backend (interpreter on CPU) gives the same greedy
tokens as on the torch backend, on a tiny random-weight Llama."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmprod import Engine, SamplingParams
from llmprod.errors import InvalidConfigError

triton = pytest.importorskip("triton", reason="Triton is not installed")


def test_triton_backend_matches_torch_backend(
    tmp_path: Path, engine: Engine, make_engine: Any
) -> None:
    from tests.factories import save_tiny

    path = save_tiny("llama", tmp_path, engine.model_path)
    opts = dict(num_kv_blocks=32, block_size=16, max_num_batched_tokens=64)
    ref = make_engine(str(path), attention_backend="torch", **opts)
    tri = make_engine(str(path), attention_backend="triton", **opts)
    assert tri.backend.name == "triton"
    # ragged prompts: a single token, one on a block boundary, one that is chunked
    prompts = [[7], [5, 17, 300, 42] * 4, [9, 8, 7] * 30]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in ref.generate(prompts, params)]
    assert [o.token_ids for o in tri.generate(prompts, params)] == expected


def test_triton_backend_on_the_generic_path(
    tmp_path: Path, engine: Engine, make_engine: Any
) -> None:
    """Gemma 2 through transformers' code: the kernel applies the sliding window,
    the score soft-capping and the scale the model hands to attention, and gives
    transformers' own greedy tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.factories import save_tiny, tiny_config
    from tests.helpers import first_divergence, hf_greedy

    path = save_tiny("gemma2", tmp_path, engine.model_path, tiny_config("gemma2"))
    tri = make_engine(
        str(path),
        model_impl="generic",
        attention_backend="triton",
        num_kv_blocks=32,
        max_num_batched_tokens=32,
        max_num_seqs=4,
    )
    assert (tri.model_impl, tri.backend.name) == ("generic", "triton")
    prompts = [[7, 8, 9] * 4, [5, 17, 300, 42] * 10]  # past the window of 8
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for p, o in zip(prompts, tri.generate(prompts, params)):
        ref, scores = hf_greedy(hf, p, 5)
        assert first_divergence(o.token_ids[: len(ref)], ref, scores) is None


def test_triton_without_gpu_or_interpreter_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from llmprod.layers.attention import get_attention_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(InvalidConfigError, match="needs a CUDA device"):
        get_attention_backend("triton", torch.device("cpu"))
    assert get_attention_backend("auto", torch.device("cpu")).name == "torch"
