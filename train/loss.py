"""The drafter's K-step training loss (docs/design.md, "The drafter and its training").

For every position t at once: the context is the target's hidden state h_t; the RNN consumes
x_{t+1}, x_{t+2}, ... (x_{t+1} plays the init token g0); head k (k = 0..K-1) predicts x_{t+2+k}.
Targets past the sequence end, on padding or outside the loss mask never count. The K cross-entropies
are equally weighted. With a soft-label weight w, each head's cross-entropy is against a mix of the
data's token (1 - w) and the target's own distribution for that token (w; over the draft vocabulary,
renormalised): the target's LM head on its hidden state at t+1+k, which training computed anyway, so
learning its whole distribution (as EAGLE's drafters do), not just the token it chose, costs one
small product per head. Positions marked 2 in the mask (text that is not the target's own, e.g.
conversations it only read) learn its distribution alone (w = 1, whatever the run's w) and are left out
of the accuracy, whose data token is no label there. With a dropout rate, each head draws its own
dropout masks (`drafter.dropout`) from the step's key. Each head's logits [B, T, V] are rematerialised
in the backward pass instead of being kept, so memory stays at one head's logits (and with soft labels
the target's beside them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from redrafter_jax.config import DrafterConfig, ModelConfig
from redrafter_jax.drafter import draft_logits, rnn_step
from redrafter_jax.model import Params, finish_logits, lm_head, lm_head_weight


def shift_left(x: jax.Array, k: int, fill=0) -> jax.Array:
    """y[:, t] = x[:, t + k], `fill` past the end. x: [B, T, ...]."""
    pad = jnp.full((x.shape[0], k) + x.shape[2:], fill, x.dtype)
    return jnp.concatenate([x[:, k:], pad], axis=1)


def target_logits(target_params: Params, hidden: jax.Array, vocab_map: jax.Array | None,
                  target_cfg: ModelConfig | None = None) -> jax.Array:
    """The target's float32 logits [..., Vd] over the draft vocabulary (all of it without a vocab_map), as
    its config finishes them (`model.finish_logits`)."""
    if vocab_map is None:
        return lm_head(target_params, hidden, target_cfg)
    w = lm_head_weight(target_params)[:, vocab_map]
    return finish_logits(jnp.matmul(hidden, w, preferred_element_type=jnp.float32), target_cfg)


def drafter_loss(dparams: Params, dcfg: DrafterConfig, target_params: Params, hidden: jax.Array,
                 tokens: jax.Array, mask: jax.Array, num_heads: int, dropout_rate: float = 0.0,
                 key: jax.Array | None = None, soft_labels: float = 0.0, marked: bool = False,
                 target_cfg: ModelConfig | None = None):
    """hidden [B, T, H] the frozen target's (model.transformer_causal); tokens [B, T]; mask [B, T]
    (1 = may be a target, 2 = a target learnt from the target's distribution alone); key: needed with a
    dropout rate; soft_labels: the weight w above; marked: whether the mask may hold 2s (the target's
    distribution is then computed even at w = 0); target_cfg: the target's config, which finishes its
    logits (`model.finish_logits`: Granite's scaling, Gemma 2's soft cap). Returns (loss, metrics) with
    per-head loss and top-1 accuracy [K] and the per-head counts of the targets the accuracy is of [K]."""
    target_params = jax.lax.stop_gradient(target_params)
    emb = target_params["embed"][tokens].astype(hidden.dtype)
    to_draft = None
    if "vocab_map" in dparams:  # target id -> draft id, -1 outside the draft vocabulary
        to_draft = jnp.full((dcfg.vocab_size,), -1, jnp.int32).at[dparams["vocab_map"]].set(
            jnp.arange(dcfg.head_vocab, dtype=jnp.int32))

    @jax.checkpoint
    def head_stats(dparams, state, target, mask, key, teacher_hidden):
        logits = draft_logits(dparams, dcfg, target_params, hidden, state, dropout_rate, key)  # [B, T, Vd] float32
        in_vocab = target >= 0
        safe = jnp.maximum(target, 0)
        soft_only, labelled = mask == 2, mask == 1
        label = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
        if teacher_hidden is not None:  # E_p[logit] under the target's distribution, mixed with the data's token
            p = jax.nn.softmax(target_logits(target_params, teacher_hidden, dparams.get("vocab_map"), target_cfg),
                               axis=-1)
            w = jnp.where(soft_only, 1.0, soft_labels)
            label = (1 - w) * label + w * jnp.sum(p * logits, axis=-1)
        ce = jax.nn.logsumexp(logits, axis=-1) - label
        right = jnp.argmax(logits, axis=-1) == safe
        # out-of-vocabulary tokens cannot be learned, but count as misses; the distribution always can
        w_ce = (labelled & in_vocab) | soft_only
        return (jnp.sum(jnp.where(w_ce, ce, 0.0)), jnp.sum(w_ce), jnp.sum(labelled & right & in_vocab),
                jnp.sum(labelled))

    state = jnp.zeros_like(hidden)
    losses, accs, counts = [], [], []
    for k in range(num_heads):
        state = rnn_step(dparams, dcfg, state, shift_left(emb, 1 + k))
        target = shift_left(tokens, 2 + k)
        if to_draft is not None:
            target = to_draft[target]
        ce_sum, ce_n, right, n = head_stats(dparams, state, target, shift_left(mask, 2 + k),
                                             None if key is None else jax.random.fold_in(key, k),
                                             shift_left(hidden, 1 + k) if soft_labels or marked else None)
        losses.append(ce_sum / jnp.maximum(ce_n, 1))
        accs.append(right / jnp.maximum(n, 1))
        counts.append(n)
    loss = jnp.mean(jnp.stack(losses))
    return loss, {"loss": jnp.stack(losses), "accuracy": jnp.stack(accs), "count": jnp.stack(counts)}
