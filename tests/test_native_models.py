"""The native Llama-family path on tiny random-weight models of each supported
architecture, against transformers (no downloads: configs are built here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from llmprod import Engine, SamplingParams
from llmprod.errors import UnsupportedModelError
from tests.factories import COMMON, VOCAB, save_tiny
from tests.helpers import first_divergence, hf_greedy


@pytest.mark.parametrize(
    "arch", ["llama", "llama-bias-rope-scaled", "qwen2", "mistral"]
)
def test_tiny_model_greedy_equals_transformers(
    arch: str, tmp_path: Path, engine: Engine, make_engine: Any
) -> None:
    from transformers import AutoModelForCausalLM

    path = save_tiny(arch, tmp_path, engine.model_path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tiny = make_engine(str(path), num_kv_blocks=64, block_size=16)
    prompts = [[5, 17, 300, 42] * k for k in (1, 5, 9)] + [[7]]
    outs = tiny.generate(
        prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    )
    for p, o in zip(prompts, outs):
        ref, scores = hf_greedy(hf, p, 12)
        hf_len = len(ref)  # transformers stops at EOS; compare that prefix
        assert first_divergence(o.token_ids[:hf_len], ref, scores) is None


def test_unsupported_architecture_is_named(tmp_path: Path, engine: Engine) -> None:
    import transformers as tf

    cfg = tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB)
    path = save_tiny("gpt2", tmp_path, engine.model_path, config=cfg)
    with pytest.raises(UnsupportedModelError, match=r"GPT2LMHeadModel.*gpt2"):
        Engine.from_pretrained(str(path), model_impl="native")


@pytest.mark.parametrize(
    "rope_scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
        {"rope_type": "dynamic", "factor": 2.0},
    ],
    ids=lambda s: (s or {}).get("rope_type", "default"),
)
def test_rotary_tables_equal_transformers(rope_scaling: dict | None) -> None:
    # The native model's cos/sin, bit for bit against transformers' own module at
    # positions past the original context (where scaled types differ most).
    import transformers as tf
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from llmprod.models.llama import _rotary_module

    config = tf.LlamaConfig(**COMMON, rope_theta=100000.0, rope_scaling=rope_scaling)
    ours = _rotary_module(config)
    theirs = LlamaRotaryEmbedding(config=config)
    x = torch.zeros(1, 3, 8)
    positions = torch.arange(0, 1024, 7).unsqueeze(0)
    for got, want in zip(ours(x, positions), theirs(x, positions)):
        assert got.dtype == want.dtype == torch.float32
        assert torch.equal(got, want)


def test_building_a_native_model_imports_no_dynamo() -> None:
    # Building on the meta device must not run initializers (or factories) through
    # torch's reference ops, whose first use imports TorchDynamo: ~100 MB resident.
    import subprocess
    import sys

    code = (
        "import sys, transformers as tf\n"
        "from llmprod.models.loader import meta_construction, materialize_native\n"
        "from llmprod.models.llama import LlamaForCausalLM\n"
        "import torch\n"
        f"cfg = tf.LlamaConfig(**{COMMON!r})\n"
        "if 'torch._dynamo' in sys.modules:\n"
        "    sys.exit(3)  # imported by the libraries themselves: inconclusive\n"
        "with meta_construction():\n"
        "    m = LlamaForCausalLM(cfg)\n"
        "m = materialize_native(m, cfg, torch.float32, torch.device('cpu'))\n"
        "assert 'torch._dynamo' not in sys.modules, 'dynamo imported'\n"
        "assert torch.nn.init.normal_.__name__ == 'normal_'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    if result.returncode == 3:
        pytest.skip("torch or transformers import TorchDynamo themselves here")
    assert result.returncode == 0, result.stderr[-2000:]
