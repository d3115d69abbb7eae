"""Tiny random-weight models for the tests: configs built here, no downloads.

Each model is saved with the SmolLM2 tokenizer copied next to it, so the Engine
loads it like any checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

VOCAB = 49152  # the SmolLM2 tokenizer is copied next to each tiny model
COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
WINDOW = 8  # tiny sliding windows, far shorter than the tests' prompts


def tiny_config(arch: str) -> Any:
    """The transformers config of a tiny model of ``arch``."""
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**COMMON, tie_word_embeddings=True)
    if arch == "llama-bias-rope-scaled":
        return tf.LlamaConfig(  # type: ignore[call-arg]  # rope_scaling: a kwarg
            **COMMON,
            attention_bias=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128,
            },
        )
    if arch == "qwen2":
        return tf.Qwen2Config(**COMMON, tie_word_embeddings=False)
    if arch == "mistral":
        return tf.MistralConfig(**COMMON, sliding_window=None)
    if arch == "mistral-sliding":
        return tf.MistralConfig(**COMMON, sliding_window=WINDOW)
    if arch == "phi3":
        return tf.Phi3Config(**COMMON, pad_token_id=0)
    if arch == "gpt2":
        return tf.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512
        )
    if arch == "opt":
        return tf.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            word_embed_proj_dim=64,
            pad_token_id=1,
        )
    if arch == "gemma2":
        # Score and final-logit soft-capping, interleaved sliding layers and an
        # attention scale other than 1/sqrt(head_dim); MQA.
        return tf.Gemma2Config(
            **{**COMMON, "num_key_value_heads": 1},
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        )
    if arch == "gemma3":
        return tf.Gemma3TextConfig(
            **{**COMMON, "num_hidden_layers": 3},
            head_dim=16,
            query_pre_attn_scalar=32,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
    raise AssertionError(arch)


def save_tiny(arch: str, root: Path, tokenizer_dir: Path, config: Any = None) -> Path:
    """Save a seeded random-weight model of ``arch`` (or of ``config``) under
    ``root / arch`` with the tokenizer files of ``tokenizer_dir``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = config if config is not None else tiny_config(arch)
    model = AutoModelForCausalLM.from_config(cfg)
    # Larger weights than the default init make the logits decisive (no ties).
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    out = root / arch
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (tokenizer_dir / f).exists():
            shutil.copy(tokenizer_dir / f, out / f)
    return out
