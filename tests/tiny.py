"""The tiny random Llama used across unit tests (a few seconds to build, answers that vary)."""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    initializer_range=0.3,  # the default 0.02 makes greedy decoding repeat one token
)


def tiny_llama_config(tokenizer: Any, **overrides: Any) -> LlamaConfig:
    """A 2-layer Llama config sized to `tokenizer`'s vocabulary and special ids."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **{**TINY_LLAMA, **overrides},
    )
