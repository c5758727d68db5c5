"""A tiny Llama built from a config (no download), small enough to train on a laptop CPU in seconds."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(vocab_size: int, hidden_size: int = 128, num_layers: int = 2,
                      num_heads: int = 4, max_positions: int = 64) -> LlamaConfig:
    """A real ``LlamaConfig`` (RMSNorm, RoPE, SwiGLU) scaled down to a few hundred thousand parameters."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        use_cache=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def build_model(config: LlamaConfig, seed: int, device: str | torch.device = "cpu") -> LlamaForCausalLM:
    """Randomly initialised ``LlamaForCausalLM``; the seed makes the initial weights reproducible."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.to(device)
