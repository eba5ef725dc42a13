"""Drafters that know the answer: for testing the acceptance machinery and bounding the speedup.

Given the true continuation of every row (e.g. from autoregressive greedy decoding), the oracle's
beam 0 is exactly what the target will say; its other beams branch off it at different depths.
With `wrong=True` every drafted token is wrong instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from redrafter_jax.beam_search import Draft
from redrafter_jax.config import ModelConfig, SpecConfig
from redrafter_jax.model import Params


@struct.dataclass
class OracleDrafter:
    """A `Proposer` whose beam 0 is the true continuation (or, with `wrong`, never right)."""

    sequences: jax.Array  # [B, T] each row's prompt followed by its true continuation
    vocab_size: int = struct.field(pytree_node=False)
    wrong: bool = struct.field(pytree_node=False, default=False)

    def check(self, target: ModelConfig, spec: SpecConfig) -> None:
        if self.vocab_size != target.vocab_size:
            raise ValueError(f"oracle vocabulary {self.vocab_size} does not match the target's {target.vocab_size}")

    def draft(self, target_params: Params, context: jax.Array, init_token: jax.Array, lengths: jax.Array,
              width: int, length: int, with_log_probs: bool = False) -> Draft:
        if with_log_probs:
            raise ValueError("the oracle drafter has no draft distribution (needed by Apple's acceptance rule)")
        del target_params, context
        if self.sequences.shape[0] != lengths.shape[0]:  # shapes are static: raised while tracing
            raise ValueError(f"the oracle holds {self.sequences.shape[0]} rows' continuations but decoding has "
                             f"{lengths.shape[0]} rows: it needs one per prompt, in order (so not with continuous "
                             f"batching, nor a batch padded to a mesh's data axis)")
        t = self.sequences.shape[1]
        pos = jnp.minimum(lengths[:, None] + jnp.arange(length), t - 1)  # init token sits at `lengths`
        truth = jnp.take_along_axis(self.sequences, pos, axis=1)  # [B, L]
        beams = jnp.broadcast_to(truth[:, None, :], (truth.shape[0], width, length))
        w = jnp.arange(width)[:, None]
        d = jnp.arange(length)[None, :]
        # beam w > 0 departs from the truth at depth 1 + (w - 1) % (L - 1); `wrong`: all drafted tokens differ
        off = (d >= 1) if self.wrong else (w > 0) & (d == 1 + (w - 1) % (length - 1))
        beams = jnp.where(off, (beams + 1 + w) % self.vocab_size, beams)
        beams = beams.at[:, :, 0].set(init_token[:, None])
        # beam 0 is certain; beam w's own nodes rank w-th, so a budget keeps the truth first
        scores = jnp.where(d == 0, 0.0, -w.astype(jnp.float32))
        return Draft(beams.astype(jnp.int32), jnp.broadcast_to(scores, beams.shape))
