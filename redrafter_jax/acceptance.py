"""Choosing what to keep from a verified draft tree.

`accept_longest_prefix` is both exact rules: given the target's choice after every tree node -- its
argmax (greedy) or one independent sample from its sampling distribution per node (sampling) -- it
keeps the longest drafted prefix that agrees. With samples this is the tree walk of docs/design.md
("Exact sampling"): at a node, draw x from the target; if x is a child of the node, move there, else
emit x and stop (at a leaf, the draw is the bonus token). Each node is visited at most
once, so drawing every node's sample up front changes nothing, and every emitted token is an exact
sample from the target whatever the drafter proposed. Tree children are distinct tokens, so the
walk's path is unique: it is the path of any beam achieving the longest agreement.

`apple_accept` is Apple's rule (accept drafted token x with probability min(1, p(x)/q(x)), keep the
beam with the longest run, resample from max(p - q, 0)). It is NOT exact for beam-search drafts,
which are not samples from q; it is here only so the bias can be measured.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from redrafter_jax.sampling import draw
from redrafter_jax.tree import ABSENT


class Accepted(NamedTuple):
    beam: jax.Array  # [B] int32 the chosen beam i*
    num_accepted: jax.Array  # [B] int32 drafted tokens accepted, n in [0, L-1]
    tokens: jax.Array  # [B, L] int32: tokens[:, :n+1] are emitted (n accepted + the target's bonus token)


def _gather_nodes(per_slot: jax.Array, slot: jax.Array) -> jax.Array:
    """per_slot [B, N, ...] -> per node [B, W, L, ...] through slot [B, W, L]."""
    b, w, length = slot.shape
    idx = slot.reshape(b, w * length).reshape((b, w * length) + (1,) * (per_slot.ndim - 2))
    return jnp.take_along_axis(per_slot, idx, axis=1).reshape((b, w, length) + per_slot.shape[2:])


def _choose(n: jax.Array):
    """Best beam (longest run; first on ties) and its n. A beam the tree holds nothing of accepts
    nothing: the root is always kept, and every beam's path starts at the root's slot."""
    best = jnp.argmax(n, axis=-1).astype(jnp.int32)
    return best, jnp.take_along_axis(n, best[:, None], axis=1)[:, 0].astype(jnp.int32)


def accept_longest_prefix(beams: jax.Array, slot: jax.Array, target_next: jax.Array) -> Accepted:
    """beams, slot: [B, W, L] (`Tree.beams`, `Tree.slot`); target_next: [B, N] the target's token after each slot.

    Drafted token (i, d+1) is accepted iff it equals the target's token after (i, d) and every
    earlier one was (never where it is `tree.ABSENT`, not in the tree). The emitted
    tokens are the target's tokens along beam i*: tokens[:n] equals beams[i*, 1:n+1] and tokens[n]
    is the bonus token.
    """
    pred = _gather_nodes(target_next, slot)  # [B, W, L] target's token after node (i, d)
    run = jnp.cumprod(beams[:, :, 1:] == pred[:, :, :-1], axis=-1)
    best, n = _choose(jnp.sum(run, axis=-1))
    return Accepted(best, n, jnp.take_along_axis(pred, best[:, None, None], axis=1)[:, 0])


def apple_accept(key: jax.Array, beams: jax.Array, slot: jax.Array, target_log_probs: jax.Array,
                 draft_log_probs: jax.Array) -> Accepted:
    """Apple's (biased) rule. beams, slot: as for `accept_longest_prefix`; target_log_probs: [B, N, V];
    draft_log_probs: [B, W, L-1, V]. A beam's end in the tree counts as a leaf."""
    b, w, length = beams.shape
    k_accept, k_resample = jax.random.split(key)
    p_node = _gather_nodes(target_log_probs, slot)  # [B, W, L, V]
    in_tree = beams[:, :, 1:] != ABSENT
    # q is -inf past a beam's end in the tree, as at a leaf: no drafted token was rejected there.
    draft_log_probs = jnp.where(in_tree[..., None], draft_log_probs, -jnp.inf)
    drafted = jnp.maximum(beams[:, :, 1:, None], 0)
    log_p = jnp.take_along_axis(p_node[:, :, :-1], drafted, axis=-1)[..., 0]
    log_q = jnp.take_along_axis(draft_log_probs, drafted, axis=-1)[..., 0]
    ok = in_tree & (jax.random.uniform(k_accept, (b, w, length - 1)) < jnp.exp(jnp.minimum(log_p - log_q, 0.0)))
    best, n = _choose(jnp.sum(jnp.cumprod(ok, axis=-1), axis=-1))
    row = lambda x: jnp.take_along_axis(x, best.reshape((b, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]  # noqa: E731
    p_at = jnp.take_along_axis(row(p_node), n[:, None, None], axis=1)[:, 0]  # [B, V] target at the stop node
    q_next = jnp.concatenate([row(draft_log_probs), jnp.full((b, 1, p_at.shape[-1]), -jnp.inf)], axis=1)
    q_at = jnp.take_along_axis(q_next, n[:, None, None], axis=1)[:, 0]  # q of the rejected token (-inf at a leaf)
    residual = jnp.maximum(jnp.exp(p_at) - jnp.exp(q_at), 0.0)
    # Where p <= q everywhere the residual has no mass: draw from p, never a silent token 0.
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, jnp.exp(p_at))
    final = draw(k_resample, residual)
    j = jnp.arange(length)[None, :]
    drafted_row = jnp.concatenate([row(beams)[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
    return Accepted(best, n, jnp.where(j < n[:, None], drafted_row, final[:, None]))
