"""Dynamic tree attention with static shapes: the best `budget` nodes of the beams' prefix tree in N slots.

Node (i, d) is token d of beam i, i.e. the prefix beams[i, :d+1]. Its owner is the smallest beam j with
the same prefix; the node is *new* iff j == i, and its score is the best of the sharing beams' prefix
scores (log-probs that the prefix is what the target says). With a budget below the number of distinct
nodes, that many best-scored nodes are kept (ties: beam-major order), so the tree grows where the
proposers are confident, at any depth, as in EAGLE-2; prefix scores never rise along a beam, so a kept
node's parent is kept too (enforced regardless). Kept nodes are numbered in beam-major order, which puts
every parent before its children. A beam's nodes past the kept ones, its tokens after its own end
(`ABSENT`, in beams shorter than the longest) and nodes scored -inf (proposals that do not exist, e.g. a
lookup without a match) take no slot and can never be accepted: `Tree.beams` has ABSENT there, which no
target token equals. Unused slots are padding that attends only to itself; the slots may outnumber the
budget (a forward of a round token count can be faster, `SpecConfig.slots`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

ABSENT = -1  # a token not in the tree: after a beam's end, or cut by the budget


class Tree(NamedTuple):
    tokens: jax.Array  # [..., N] int32 packed tokens (pad_id in unused slots)
    depth: jax.Array  # [..., N] int32 depth of each slot (0 = the init token); 0 for padding
    mask: jax.Array  # [..., N, N] bool: slot p sees slot q iff q is on p's root path (padding: itself)
    beams: jax.Array  # [..., W, L] int32 the beams as far as the tree holds them, ABSENT after
    slot: jax.Array  # [..., W, L] int32 packed slot of node (i, d) where beams[i, d] is not ABSENT
    num_nodes: jax.Array  # [...] int32 number of used slots


def _pack_one(beams: jax.Array, scores: jax.Array, budget: int, slots: int, pad_id: int) -> Tree:
    w, length = beams.shape
    same = jnp.cumprod(beams[:, None, :] == beams[None, :, :], axis=-1).astype(bool)  # [W, W, L]: prefix i == j
    owner = jnp.argmax(same, axis=1)  # [W, L] first j (always <= i)
    node_score = jnp.max(jnp.where(same, scores[None, :, :], -jnp.inf), axis=1)  # [W, L] best sharer's
    is_new = (owner == jnp.arange(w)[:, None]) & (beams != ABSENT)
    key = jnp.where(is_new, node_score, -jnp.inf).reshape(-1)  # -inf: not a candidate
    best = jnp.argsort(-key, stable=True)[:budget]  # ties in beam-major order: parents first
    kept = jnp.zeros(w * length, bool).at[best].set(key[best] > -jnp.inf).reshape(w, length)
    # A node is in the tree iff its owner's node was kept and so was its parent.
    in_tree = jnp.cumprod(jnp.take_along_axis(kept, owner, axis=0), axis=1).astype(bool)
    new_in_tree = (is_new & in_tree).reshape(-1)
    own_slot = (jnp.cumsum(new_in_tree) - 1).reshape(w, length)  # slot of each kept new node
    slot = jnp.where(in_tree, jnp.take_along_axis(own_slot, owner, axis=0), 0)  # owner's slot: [W, L]
    # Scatter (writes of nodes not in the tree are dropped by sending them out of range).
    target = jnp.where(in_tree, slot, slots)
    tokens = jnp.full((slots,), pad_id, jnp.int32).at[target].set(beams, mode="drop")
    depth = jnp.zeros((slots,), jnp.int32).at[target].set(
        jnp.broadcast_to(jnp.arange(length), (w, length)), mode="drop")
    on_path = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]  # [d, d']: d' <= d
    rows = jnp.broadcast_to(target[:, :, None], (w, length, length))
    cols = jnp.broadcast_to(target[:, None, :], (w, length, length))
    mask = jnp.eye(slots, dtype=bool).at[rows, cols].max(jnp.broadcast_to(on_path, (w, length, length)),
                                                          mode="drop")
    return Tree(tokens, depth, mask, jnp.where(in_tree, beams, ABSENT), slot,
                jnp.sum(new_in_tree).astype(jnp.int32))


def pack_tree(beams: jax.Array, scores: jax.Array, budget: int, pad_id: int = 0, slots: int | None = None) -> Tree:
    """beams: [B, W, L] (all beams of a row share beams[:, :, 0]); scores: [B, W, L] each beam's prefix
    log-probs (0 at the init token, -inf where there is no proposal) -> Tree of at most `budget` nodes in
    N = slots slots (None: budget)."""
    slots = budget if slots is None else slots
    if budget < 1:
        raise ValueError(f"tree budget {budget} cannot hold the init token")
    if slots < budget:
        raise ValueError(f"{slots} tree slots cannot hold a budget of {budget} nodes")
    if scores.shape != beams.shape:
        raise ValueError(f"scores {scores.shape} must match beams {beams.shape}")
    return jax.vmap(lambda b, s: _pack_one(b, s, budget, slots, pad_id))(beams, scores)
