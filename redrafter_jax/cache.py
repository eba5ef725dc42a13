"""Fixed-shape KV cache with per-row lengths.

Rows of a batch hold sequences of different lengths; each row's valid entries are positions
[0, lengths[b]). The cache slot index of a valid token equals its position id. A forward pass writes
its T new tokens' K/V at slots lengths[b] .. lengths[b]+T-1 before attending, without making them
valid: the caller then validates some (`commit`) or has others written over them (`write`). Writing
first, then reading, lets XLA update the loop-carried cache in place; reading the old cache and
writing afterwards costs a copy of the whole cache per step. So `write` only records its entries as
*pending* (valid, not yet in the buffers), and the next forward writes them in the same per-layer
scatter as its own new tokens, before any layer reads the cache: a second pass over the cache per
speculative step made XLA copy the whole cache four times per step. Nothing is ever written at a
slot >= max_len: writes past it are dropped under `jit`, and callers size the cache so that cannot
happen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from redrafter_jax.config import ModelConfig


@struct.dataclass
class KVCache:
    k: jax.Array  # [layers, B, kv_heads, max_len, head_dim]
    v: jax.Array  # [layers, B, kv_heads, max_len, head_dim]
    lengths: jax.Array  # [B] int32, number of valid positions per row
    # Valid entries not yet in k/v (`write`), written by the next forward: slot max_len = none.
    pending_k: jax.Array  # [layers, B, P, kv_heads, head_dim]
    pending_v: jax.Array  # [layers, B, P, kv_heads, head_dim]
    pending_slots: jax.Array  # [B, P] int32

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, pending: int = 0) -> KVCache:
    """An empty cache; `pending`: how many entries one `write` records (0 for a cache never written so)."""
    if batch_size < 1 or max_len < 0 or pending < 0:
        raise ValueError(f"cache needs batch_size >= 1, max_len >= 0 and pending >= 0, got {batch_size}, "
                         f"{max_len}, {pending}")
    shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
    none = jnp.zeros((cfg.num_layers, batch_size, 0, cfg.num_kv_heads, cfg.head_dim), cfg.dtype)
    empty = KVCache(k=jnp.zeros(shape, cfg.dtype), v=jnp.zeros(shape, cfg.dtype),
                    lengths=jnp.zeros((batch_size,), jnp.int32), pending_k=none, pending_v=none,
                    pending_slots=jnp.zeros((batch_size, 0), jnp.int32))
    return with_pending(empty, pending)


def with_pending(cache: KVCache, pending: int) -> KVCache:
    """The cache (nothing pending) with room for the `pending` entries one `write` records."""
    shape = (*cache.pending_k.shape[:2], pending, *cache.pending_k.shape[3:])
    return cache.replace(pending_k=jnp.zeros(shape, cache.k.dtype), pending_v=jnp.zeros(shape, cache.v.dtype),
                         pending_slots=jnp.full((cache.batch_size, pending), cache.max_len, jnp.int32))


def _new_slots(cache: KVCache, t: int) -> tuple[jax.Array, jax.Array]:
    """For T new tokens written at slots lengths[b] .. lengths[b]+T-1: is_new [B, S], whether a slot holds
    one, and new [B, T, S], which one it holds (clipped to [0, T) where it holds none)."""
    j = jnp.arange(cache.max_len)[None, :] - cache.lengths[:, None]  # [B, S]
    return (j >= 0) & (j < t), jnp.broadcast_to(jnp.clip(j, 0, t - 1)[:, None, :], (cache.batch_size, t, cache.max_len))


def attention_mask(cache: KVCache, positions: jax.Array, new_mask: jax.Array) -> jax.Array:
    """Mask over the cache slots for T new tokens written at slots lengths[b] .. lengths[b]+T-1.

    positions: [B, T] position ids of the new tokens; new_mask: [B, T, T] or [T, T] bool, which new
    tokens each new token sees (causal for plain decoding, a tree mask for verification).
    Returns [B, T, max_len] bool: every valid slot, plus the new tokens' slots as new_mask allows.
    """
    b, t = positions.shape
    is_new, new = _new_slots(cache, t)
    sees_new = jnp.take_along_axis(jnp.broadcast_to(new_mask, (b, t, t)), new, axis=-1)
    return (jnp.arange(cache.max_len) < cache.lengths[:, None])[:, None, :] | (is_new[:, None, :] & sees_new)


def window_mask(cache: KVCache, positions: jax.Array, window: int, chunks: bool = False) -> jax.Array:
    """[B, T, max_len] bool: the slots whose keys are fewer than `window` positions behind each of T new
    tokens (at `positions` [B, T], written at slots lengths[b] ..), or with `chunks` in the same chunk of
    `window` positions; AND it with `attention_mask`. A cached key's position is its slot; a new one's
    is in `positions` (a tree's are not its slots')."""
    is_new, new = _new_slots(cache, positions.shape[1])
    key_pos = jnp.where(is_new, jnp.take_along_axis(positions, new[:, 0], axis=1), jnp.arange(cache.max_len))
    if chunks:
        return positions[:, :, None] // window == key_pos[:, None, :] // window
    return positions[:, :, None] - key_pos[:, None, :] < window


def check_room(cache: KVCache, num_new: jax.Array | int) -> None:
    """Raises if writing num_new [B] entries would pass max_len. Only with concrete values: under `jit`
    the callers size the cache so that it cannot happen (`decode.cache_len`)."""
    if isinstance(cache.lengths, jax.core.Tracer) or isinstance(num_new, jax.core.Tracer):
        return
    need = int(jnp.max(cache.lengths + num_new))
    if need > cache.max_len:
        raise ValueError(f"KV cache overflow: writing would need {need} slots but max_len is {cache.max_len}")


def write_slots(cache: KVCache, num_new: int) -> jax.Array:
    """[B, P + num_new] the slots a forward writes: the pending entries', then its new tokens' at
    lengths[b] .. lengths[b]+num_new-1."""
    new = cache.lengths[:, None] + jnp.arange(num_new, dtype=jnp.int32)[None, :]
    return jnp.concatenate([cache.pending_slots, new], axis=1)


def write_layer(cache: KVCache, k: jax.Array, v: jax.Array, k_new: jax.Array, v_new: jax.Array, slots: jax.Array,
                layer: int) -> tuple[jax.Array, jax.Array]:
    """Buffers k, v [layers, B, kv_heads, S, head_dim] with one layer's pending entries and its new
    tokens' k_new, v_new [B, T, kv_heads, head_dim] written at slots [B, P + T] (`write_slots`)."""
    k = scatter_rows(k, jnp.concatenate([cache.pending_k[layer], k_new.astype(k.dtype)], axis=1), slots, layer)
    v = scatter_rows(v, jnp.concatenate([cache.pending_v[layer], v_new.astype(v.dtype)], axis=1), slots, layer)
    return k, v


def written(cache: KVCache, k: jax.Array, v: jax.Array) -> KVCache:
    """The cache with buffers k, v that hold its pending entries: nothing pending any more."""
    return cache.replace(k=k, v=v, pending_slots=jnp.full_like(cache.pending_slots, cache.max_len))


def scatter_rows(buf: jax.Array, new: jax.Array, slots: jax.Array, layer: int | None = None) -> jax.Array:
    """buf [layers, B, kv_heads, S, head_dim] with new [layers, B, T, kv_heads, head_dim] (or, given
    `layer`, new [B, T, kv_heads, head_dim] for that layer) written at slots [B, T] of each row.
    Writes at slots >= S are dropped, never clamped onto valid slots; slots within a row must differ."""
    b, _, heads = new.shape[-4:-1]
    # Index arrays broadcast to [B, T, kv_heads], the order `new` already has: no transpose of it.
    rows = jnp.arange(b)[:, None, None]
    lead = slice(None) if layer is None else layer
    return buf.at[lead, rows, jnp.arange(heads), slots[:, :, None]].set(new.astype(buf.dtype), mode="drop")


def write(cache: KVCache, k_new: jax.Array, v_new: jax.Array, num_new: jax.Array) -> KVCache:
    """Makes the first num_new[b] of k_new/v_new [layers, B, P, kv_heads, head_dim] valid at slots
    lengths[b] .. lengths[b]+num_new[b]-1, as pending entries that the next forward writes (`flush`
    writes them now). The cache must have nothing pending, as after a forward; called eagerly, it
    raises if it has, and before a write past max_len."""
    p = cache.pending_slots.shape[1]
    if k_new.shape[2] != p or v_new.shape != k_new.shape:
        raise ValueError(f"write takes k_new, v_new [layers, B, {p}, kv_heads, head_dim] (the cache's pending "
                         f"size), got {list(k_new.shape)} and {list(v_new.shape)}")
    if not isinstance(cache.pending_slots, jax.core.Tracer) and bool(jnp.any(cache.pending_slots < cache.max_len)):
        raise ValueError("write on a cache with pending entries: run a forward (or flush) first")
    num_new = jnp.asarray(num_new, jnp.int32)
    j = jnp.arange(p, dtype=jnp.int32)[None, :]
    slots = jnp.where(j < num_new[:, None], cache.lengths[:, None] + j, cache.max_len)
    return commit(cache.replace(pending_k=k_new.astype(cache.k.dtype), pending_v=v_new.astype(cache.v.dtype),
                                pending_slots=slots), num_new)


def flush(cache: KVCache) -> KVCache:
    """The cache with its pending entries written into the buffers."""
    return written(cache, scatter_rows(cache.k, cache.pending_k, cache.pending_slots),
                   scatter_rows(cache.v, cache.pending_v, cache.pending_slots))


def commit(cache: KVCache, num_new: jax.Array) -> KVCache:
    """Makes the first num_new[b] entries that the last forward pass wrote valid."""
    num_new = jnp.asarray(num_new, jnp.int32)
    check_room(cache, num_new)
    return cache.replace(lengths=cache.lengths + num_new)


def reuse(cache: KVCache, old: KVCache, lengths: jax.Array) -> KVCache:
    """The empty `cache` holding the first lengths[b] <= old.lengths[b] entries of each row of `old` (a
    cache of the same layers and heads with nothing pending, e.g. an earlier call's), whatever their
    max_len and rows: only the slots below min(max_len) of the rows below min(batch_size) are copied,
    and lengths must stay below those."""
    m, b = min(old.max_len, cache.max_len), min(old.batch_size, cache.batch_size)

    def put(buf, prior):
        return jax.lax.dynamic_update_slice(buf, prior[:, :b, :, :m].astype(buf.dtype), (0,) * buf.ndim)

    return cache.replace(k=put(cache.k, old.k), v=put(cache.v, old.v), lengths=jnp.asarray(lengths, jnp.int32))


def set_row(cache: KVCache, row: jax.Array, one: KVCache) -> KVCache:
    """The cache with its row `row` ([] int32) replaced by the only row of `one` (a cache of one row and
    the same max_len and pending size)."""
    def put(buf, new, axis):
        return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), row, axis)

    return KVCache(k=put(cache.k, one.k, 1), v=put(cache.v, one.v, 1), lengths=put(cache.lengths, one.lengths, 0),
                   pending_k=put(cache.pending_k, one.pending_k, 1), pending_v=put(cache.pending_v, one.pending_v, 1),
                   pending_slots=put(cache.pending_slots, one.pending_slots, 0))
