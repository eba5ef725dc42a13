"""A tiny random Llama-family model for fast tests."""

import dataclasses

import jax
import numpy as np

from redrafter_jax.config import ModelConfig
from redrafter_jax.model import forward_causal, init_params

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=128, rope_theta=10000.0,
                   eos_token_ids=(1,), pad_token_id=0)


def tiny_model(seed: int = 0, scale: float = 0.5, **overrides):
    cfg = dataclasses.replace(TINY, **overrides)
    return cfg, init_params(cfg, jax.random.PRNGKey(seed), scale=scale)


# Logits [B, T, V] of whole sequences [B, T] as one compiled program. Run eagerly, each of the forward's ops
# compiles on its own for every new shape: hundreds of small programs a call, which cost the tests that
# call it many times, or on a mixture of experts, more than compiling the whole does.
causal_logits = jax.jit(lambda params, cfg, tokens: forward_causal(params, cfg, tokens).logits, static_argnums=1)


def exact_next_token_probs(logits, temperature, top_k, top_p, min_p=0.0):
    """NumPy float64 statement of the sampling distribution, written independently of sampling.py."""
    z = np.asarray(logits, np.float64) / temperature
    keep = np.ones_like(z, bool)
    if top_k:
        keep &= z >= np.sort(z)[::-1][top_k - 1]
    p = np.where(keep, np.exp(z - z.max()), 0)
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        keep_sorted = before < top_p
        keep = np.zeros_like(keep)
        keep[order[keep_sorted]] = True
        keep |= p >= p[order[keep_sorted]].min()  # ties at the threshold stay
        p = np.where(keep, p, 0)
        p /= p.sum()
    if min_p > 0:
        p = np.where(p >= min_p * p.max(), p, 0)
        p /= p.sum()
    return p
