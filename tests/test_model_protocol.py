"""Both model paths satisfy ``PagedCausalLM``, what the model runner needs."""

from __future__ import annotations

import torch

from llmprod.models.protocol import PagedCausalLM

SMALL = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def test_native_model_is_paged_causal_lm() -> None:
    import transformers as tf

    from llmprod.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM(tf.LlamaConfig(**SMALL))
    assert isinstance(model, PagedCausalLM)
    assert (model.impl, model.num_layers, model.num_kv_heads, model.head_dim) == (
        "native",
        2,
        2,
        4,
    )


def test_generic_model_is_paged_causal_lm() -> None:
    import transformers as tf

    from llmprod.models.generic import GenericForCausalLM

    torch.manual_seed(0)
    hf_model = tf.AutoModelForCausalLM.from_config(tf.Qwen2Config(**SMALL))
    model = GenericForCausalLM(hf_model)
    assert isinstance(model, PagedCausalLM)
    assert (model.impl, model.num_layers, model.num_kv_heads, model.head_dim) == (
        "generic",
        2,
        2,
        4,
    )


def test_a_module_without_the_seam_is_not() -> None:
    assert not isinstance(torch.nn.Linear(2, 2), PagedCausalLM)
