"""Choosing what to keep from a verified draft tree."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Accepted(NamedTuple):
    beam: jax.Array  # [B] int32 the chosen beam i*
    num_accepted: jax.Array  # [B] int32 drafted tokens accepted, n in [0, L-1]
    tokens: jax.Array  # [B, L] int32: tokens[:, :n+1] are emitted (n accepted + the target's bonus token)


def greedy_accept(beams: jax.Array, slot: jax.Array, beam_valid: jax.Array, target_next: jax.Array) -> Accepted:
    """Longest prefix of drafted tokens matching the target's argmax, over all beams.

    beams: [B, W, L]; slot: [B, W, L] packed slot of each node; beam_valid: [B, W];
    target_next: [B, N] the target's argmax after each packed slot.
    Drafted token (i, d+1) is accepted iff it equals the target's choice after (i, d) and every
    earlier one was. The emitted tokens are the target's choices along beam i*, so the bonus token
    is tokens[n], and tokens[:n] equals beams[i*, 1:n+1].
    """
    pred = jnp.take_along_axis(target_next[:, None, :], slot.reshape(slot.shape[0], 1, -1), axis=2)
    pred = pred.reshape(slot.shape)  # [B, W, L] target's choice after node (i, d)
    match = beams[:, :, 1:] == pred[:, :, :-1]
    n = jnp.sum(jnp.cumprod(match, axis=-1), axis=-1)  # [B, W]
    n = jnp.where(beam_valid, n, -1)
    best = jnp.argmax(n, axis=-1).astype(jnp.int32)  # first on ties: the higher-scored beam
    take = lambda x: jnp.take_along_axis(x, best[:, None, None], axis=1)[:, 0]  # noqa: E731
    return Accepted(best, jnp.take_along_axis(n, best[:, None], axis=1)[:, 0].astype(jnp.int32), take(pred))
