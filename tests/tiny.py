"""A tiny random Llama-family model for fast tests."""

import dataclasses

import jax

from redrafter_jax.config import ModelConfig
from redrafter_jax.model import init_params

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=128, rope_theta=10000.0,
                   eos_token_ids=(1,), pad_token_id=0)


def tiny_model(seed: int = 0, scale: float = 0.5, **overrides):
    cfg = dataclasses.replace(TINY, **overrides)
    return cfg, init_params(cfg, jax.random.PRNGKey(seed), scale=scale)
