"""The drafter's K-step training loss (docs/design.md, "The drafter and its training").

For every position t at once: the context is the target's hidden state h_t; the RNN consumes
x_{t+1}, x_{t+2}, ... (x_{t+1} plays the init token g0); head k (k = 0..K-1) predicts x_{t+2+k}.
Targets past the sequence end, on padding or outside the loss mask never count. The K cross-entropies
are equally weighted. With a dropout rate, each head draws its own dropout masks (`drafter.dropout`)
from the step's key. Each head's logits [B, T, V] are rematerialised in the backward pass instead
of being kept, so memory stays at one head's logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from redrafter_jax.config import DrafterConfig
from redrafter_jax.drafter import draft_logits, rnn_step
from redrafter_jax.model import Params


def shift_left(x: jax.Array, k: int, fill=0) -> jax.Array:
    """y[:, t] = x[:, t + k], `fill` past the end. x: [B, T, ...]."""
    pad = jnp.full((x.shape[0], k) + x.shape[2:], fill, x.dtype)
    return jnp.concatenate([x[:, k:], pad], axis=1)


def drafter_loss(dparams: Params, dcfg: DrafterConfig, target_params: Params, hidden: jax.Array,
                 tokens: jax.Array, mask: jax.Array, num_heads: int, dropout_rate: float = 0.0,
                 key: jax.Array | None = None):
    """hidden [B, T, H] the frozen target's (model.transformer_causal); tokens [B, T]; mask [B, T]
    (1 = may be a target); key: needed with a dropout rate. Returns (loss, metrics)
    with per-head loss and top-1 accuracy [K] and the per-head target counts [K]."""
    target_params = jax.lax.stop_gradient(target_params)
    emb = target_params["embed"][tokens].astype(hidden.dtype)
    to_draft = None
    if "vocab_map" in dparams:  # target id -> draft id, -1 outside the draft vocabulary
        to_draft = jnp.full((dcfg.vocab_size,), -1, jnp.int32).at[dparams["vocab_map"]].set(
            jnp.arange(dcfg.head_vocab, dtype=jnp.int32))

    @jax.checkpoint
    def head_stats(dparams, state, target, valid, key):
        logits = draft_logits(dparams, dcfg, target_params, hidden, state, dropout_rate, key)  # [B, T, Vd] float32
        in_vocab = target >= 0
        safe = jnp.maximum(target, 0)
        ce = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
        right = jnp.argmax(logits, axis=-1) == safe
        w_ce = valid & in_vocab  # out-of-vocabulary targets cannot be learned, but count as misses
        return jnp.sum(jnp.where(w_ce, ce, 0.0)), jnp.sum(w_ce), jnp.sum(valid & right & in_vocab), jnp.sum(valid)

    state = jnp.zeros_like(hidden)
    losses, accs, counts = [], [], []
    for k in range(num_heads):
        state = rnn_step(dparams, dcfg, state, shift_left(emb, 1 + k))
        target = shift_left(tokens, 2 + k)
        if to_draft is not None:
            target = to_draft[target]
        valid = shift_left(mask, 2 + k).astype(bool)
        ce_sum, ce_n, right, n = head_stats(dparams, state, target, valid,
                                             None if key is None else jax.random.fold_in(key, k))
        losses.append(ce_sum / jnp.maximum(ce_n, 1))
        accs.append(right / jnp.maximum(n, 1))
        counts.append(n)
    loss = jnp.mean(jnp.stack(losses))
    return loss, {"loss": jnp.stack(losses), "accuracy": jnp.stack(accs), "count": jnp.stack(counts)}
