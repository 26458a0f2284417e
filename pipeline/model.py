"""The Llama model of every stage, built from the config with transformers."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.config import Config
from stores.tokens import TokenStore


def llama_config(config: Config, tokens: TokenStore) -> LlamaConfig:
    """A LlamaConfig for this run: sizes from ``model.*``, vocab and special ids from the token store."""
    m = config.model
    return LlamaConfig(
        vocab_size=tokens.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        max_position_embeddings=m.max_position_embeddings or tokens.seq_len,
        rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_embeddings,
        bos_token_id=tokens.attrs["bos_id"],
        eos_token_id=tokens.attrs["eod_id"],
        pad_token_id=tokens.attrs["pad_id"],
        attention_dropout=0.0,
    )


def build_model(config: Config, tokens: TokenStore, seed: int) -> LlamaForCausalLM:
    """A freshly initialised Llama; the seed fixes the initial weights."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(config, tokens))


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
