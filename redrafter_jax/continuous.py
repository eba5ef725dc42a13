"""Continuous batching inside the decode loop: more prompts than rows, and when a row's prompt ends,
the next waiting prompt is prefilled into that row, so a batch no longer idles until its slowest row
ends (the rows of a speculative batch accept at different rates).

The decode state keeps its fixed [B] rows, each knowing the prompt it decodes (`Emitted.prompt`); a
`Queue` beside it records the next one waiting and keeps every prompt's output once its row moves on.
Each iteration first seats waiting prompts in finished rows (a prefill of one prompt each, inside the
loop: no host round trip; its first token streamed as the prompt's), then runs one decode step over
all rows. Rows never interact, so a prompt's output is the one it gets decoded alone. A waiting prompt
is prefilled in the smallest of a few blocks that holds it (the prompts' block, about a half and a
quarter of it): on a CPU a prefill costs its block's tokens, and padding does not change a row's result.
"""

from __future__ import annotations

from typing import Callable, Protocol

import jax
import jax.numpy as jnp
from flax import struct

from redrafter_jax import cache as kv
from redrafter_jax.decode import Emitted, Started, round_up


class RowState(Protocol):
    """What a decode loop's state provides for continuous batching (the cache, output and key are
    handled here; the rest of a row by the state itself)."""

    cache: kv.KVCache
    out: Emitted
    key: jax.Array

    def seated(self, row: jax.Array, p: Started) -> "RowState":
        """The state with its own fields of `row` set for a prompt just prefilled (p: one row)."""

    def outputs(self):
        """A pytree of [B, ...] arrays: what is kept of each row when its prompt ends."""


@struct.dataclass
class Queue:
    next: jax.Array  # [] int32 the first prompt not yet seated (which prompt each row decodes: `Emitted.prompt`)
    outputs: object  # every prompt's `RowState.outputs` rows [N, ...], kept once its row moves on


def run(step: Callable, init: RowState, prompts: jax.Array, prompt_lengths: jax.Array, limits: jax.Array,
        start_one: Callable[..., Started]) -> tuple[RowState, Queue]:
    """Decodes all N prompts [N, P] in the B rows of `init` (which holds prompts 0..B-1, prefilled).

    step(prompts [B, P], prompt_lengths [B], s) -> s: one decode step of all rows, given each row's
    prompt. start_one(prompt [1, P'], length [1], limit [1], key, index=i) -> Started: the prefill of
    prompt i (in a block of P' <= P tokens, into a cache sized as init's) and its first token. Returns
    the final state and the queue, whose `outputs` hold every prompt's rows.
    """
    (n, width), b = prompts.shape, init.out.done.shape[0]
    blocks = sorted({min(width, round_up(-(-width // 2 ** k), 32)) for k in range(3)})  # e.g. 416: 128, 224, 416
    prefills = [lambda prompt, length, limit, key, index, size=size: start_one(prompt[:, :size], length, limit, key,
                                                                              index=index) for size in blocks]
    empty = jax.tree_util.tree_map(lambda x: jnp.zeros((n, *x.shape[1:]), x.dtype), init.outputs())
    queue = Queue(next=jnp.int32(b), outputs=empty)

    def keep(q: Queue, s: RowState, rows: jax.Array) -> Queue:
        """q with the outputs of `rows` [R] kept as those of the prompts they hold."""
        return q.replace(outputs=jax.tree_util.tree_map(lambda o, x: o.at[s.out.prompt[rows]].set(x[rows]),
                                                        q.outputs, s.outputs()))

    def seat_next(carry):
        s, q = carry
        row = jnp.argmax(s.out.done).astype(jnp.int32)  # a finished row
        q = keep(q, s, row[None])
        key, sub = jax.random.split(s.key)
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, q.next, 1)  # noqa: E731
        size = jnp.searchsorted(jnp.asarray(blocks), prompt_lengths[q.next])  # the smallest block that holds it
        p = jax.lax.switch(size, prefills, take(prompts), take(prompt_lengths), take(limits), sub, q.next)
        out = jax.tree_util.tree_map(lambda all_, one: jax.lax.dynamic_update_slice_in_dim(all_, one, row, 0),
                                     s.out, p.out)
        s = s.replace(cache=kv.set_row(s.cache, row, p.cache), out=out, key=key).seated(row, p)
        return s, q.replace(next=q.next + 1)

    def body(carry):
        s, q = jax.lax.while_loop(lambda c: jnp.any(c[0].out.done) & (c[1].next < n), seat_next, carry)
        return step(prompts[s.out.prompt], prompt_lengths[s.out.prompt], s), q

    s, q = jax.lax.while_loop(lambda c: ~(jnp.all(c[0].out.done) & (c[1].next >= n)), body, (init, queue))
    return s, keep(q, s, jnp.arange(b))
