"""Dynamic tree attention with static shapes: beams sharing prefixes packed into N slots.

Node (i, d) is token d of beam i. Its owner is the smallest beam j with the same prefix up to d; the
node is *new* iff j == i. New nodes are numbered in beam-major order, which puts every parent before
its children; slot[i, d] is the packed slot of (i, d)'s owner. With a budget N below the worst case
1 + W(L-1), beams whose nodes do not all fit are dropped, lowest-scored (highest index) first; they
are marked invalid and can never be accepted; so are beams the caller marks invalid (packed as given:
callers make them copies of an earlier beam, which takes no slots). Beams may be shorter than L:
their tokens after the end are ABSENT, nodes that take no slot and can never be accepted (no target
token equals ABSENT). Unused slots are padding that attends only to itself.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

ABSENT = -1  # the token after a beam's end, in beams shorter than the tree's longest


class Tree(NamedTuple):
    tokens: jax.Array  # [..., N] int32 packed tokens (pad_id in unused slots)
    depth: jax.Array  # [..., N] int32 depth of each slot (0 = the init token); 0 for padding
    mask: jax.Array  # [..., N, N] bool: slot p sees slot q iff q is on p's root path (padding: itself)
    slot: jax.Array  # [..., W, L] int32 packed slot of node (i, d); any slot for dropped beams and absent nodes
    beam_valid: jax.Array  # [..., W] bool, False for beams dropped by the budget or marked invalid
    num_nodes: jax.Array  # [...] int32 number of used slots


def _pack_one(beams: jax.Array, valid: jax.Array, budget: int, pad_id: int) -> Tree:
    w, length = beams.shape
    same = jnp.cumprod(beams[:, None, :] == beams[None, :, :], axis=-1).astype(bool)  # [W, W, L]: prefix i == j
    owner = jnp.argmax(same, axis=1)  # [W, L] first j (always <= i)
    present = beams != ABSENT
    is_new = ((owner == jnp.arange(w)[:, None]) & present).reshape(-1)  # beam-major
    own_slot = (jnp.cumsum(is_new) - 1).reshape(w, length)  # slot of each new node
    slot = jnp.take_along_axis(own_slot, owner, axis=0)  # owner's slot at the same depth: [W, L]
    # Slots grow with beam index, so the beams that fit are a prefix.
    fits = jnp.max(jnp.where(present, slot, 0), axis=1) < budget
    num_nodes = jnp.sum(jnp.where(fits[:, None], is_new.reshape(w, length), False)).astype(jnp.int32)
    slot = jnp.minimum(slot, budget - 1)
    # Scatter (dropped beams' and absent nodes' writes are masked off by sending them out of range).
    target = jnp.where(fits[:, None] & present, slot, budget)
    tokens = jnp.full((budget,), pad_id, jnp.int32).at[target].set(beams, mode="drop")
    depth = jnp.zeros((budget,), jnp.int32).at[target].set(
        jnp.broadcast_to(jnp.arange(length), (w, length)), mode="drop")
    on_path = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]  # [d, d']: d' <= d
    rows = jnp.broadcast_to(target[:, :, None], (w, length, length))
    cols = jnp.broadcast_to(target[:, None, :], (w, length, length))
    mask = jnp.eye(budget, dtype=bool).at[rows, cols].max(jnp.broadcast_to(on_path, (w, length, length)),
                                                           mode="drop")
    return Tree(tokens, depth, mask, slot, fits & valid, num_nodes)


def pack_tree(beams: jax.Array, budget: int, pad_id: int = 0, valid: jax.Array | None = None) -> Tree:
    """beams: [B, W, L] (all beams of a row share beams[:, :, 0]) -> Tree with N = budget slots.

    valid: [B, W] bool, beams that may be accepted (default all).
    """
    length = beams.shape[-1]
    if budget < length:
        raise ValueError(f"tree budget {budget} cannot hold one beam of length {length}")
    if valid is None:
        valid = jnp.ones(beams.shape[:2], bool)
    return jax.vmap(lambda b, v: _pack_one(b, v, budget, pad_id))(beams, valid)
