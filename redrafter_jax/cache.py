"""Fixed-shape KV cache with per-row lengths.

Rows of a batch hold sequences of different lengths; each row's valid entries are positions
[0, lengths[b]). The cache slot index of a valid token equals its position id. A forward pass writes
its T new tokens' K/V at slots lengths[b] .. lengths[b]+T-1 before attending, without making them
valid: the caller then validates some (`commit`) or writes others over them (`write`). Writing first,
then reading, lets XLA update the loop-carried cache in place; reading the old cache and writing
afterwards costs a copy of the whole cache per step. Nothing is ever written at a slot >= max_len:
writes past it are dropped under `jit`, and callers size the cache so that cannot happen.
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

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> KVCache:
    if batch_size < 1 or max_len < 0:
        raise ValueError(f"cache needs batch_size >= 1 and max_len >= 0, got {batch_size}, {max_len}")
    shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, cfg.dtype), v=jnp.zeros(shape, cfg.dtype),
                   lengths=jnp.zeros((batch_size,), jnp.int32))


def attention_mask(cache: KVCache, positions: jax.Array, new_mask: jax.Array,
                   sliding_window: int | None = None) -> jax.Array:
    """Mask over the cache slots for T new tokens written at slots lengths[b] .. lengths[b]+T-1.

    positions: [B, T] position ids of the new tokens; new_mask: [B, T, T] or [T, T] bool, which new
    tokens each new token sees (causal for plain decoding, a tree mask for verification).
    Returns [B, T, max_len] bool: every valid slot, plus the new tokens' slots as new_mask allows.
    """
    b, t = positions.shape
    slot = jnp.arange(cache.max_len)[None, :]  # [1, S]
    j = slot - cache.lengths[:, None]  # [B, S] which new token a slot holds, if 0 <= j < T
    is_new = (j >= 0) & (j < t)
    jc = jnp.broadcast_to(jnp.clip(j, 0, t - 1)[:, None, :], (b, t, cache.max_len))
    sees_new = jnp.take_along_axis(jnp.broadcast_to(new_mask, (b, t, t)), jc, axis=-1)
    mask = (j < 0)[:, None, :] | (is_new[:, None, :] & sees_new)
    if sliding_window is not None:  # a cached key's position is its slot; a new one's is in `positions`
        key_pos = jnp.where(is_new, jnp.take_along_axis(positions, jc[:, 0], axis=1), slot)
        mask = mask & (positions[:, :, None] - key_pos[:, None, :] < sliding_window)
    return mask


def check_room(cache: KVCache, num_new: jax.Array | int) -> None:
    """Raises if writing num_new [B] entries would pass max_len. Only with concrete values: under `jit`
    the callers size the cache so that it cannot happen (`decode.cache_len`)."""
    if isinstance(cache.lengths, jax.core.Tracer) or isinstance(num_new, jax.core.Tracer):
        return
    need = int(jnp.max(cache.lengths + num_new))
    if need > cache.max_len:
        raise ValueError(f"KV cache overflow: writing would need {need} slots but max_len is {cache.max_len}")


def scatter_rows(buf: jax.Array, new: jax.Array, lengths: jax.Array, layer: int | None = None) -> jax.Array:
    """buf [layers, B, kv_heads, S, head_dim] with new [layers, B, T, kv_heads, head_dim] (or, given
    `layer`, new [B, T, kv_heads, head_dim] for that layer) written at slots lengths[b] ..
    lengths[b]+T-1 of each row. Writes past S are dropped, never clamped onto valid slots."""
    b, t, heads = new.shape[-4:-1]
    # Index arrays broadcast to [B, T, kv_heads], the order `new` already has: no transpose of it.
    rows = jnp.arange(b)[:, None, None]
    slots = (lengths[:, None] + jnp.arange(t)[None, :])[:, :, None]  # [B, T, 1]
    lead = slice(None) if layer is None else layer
    return buf.at[lead, rows, jnp.arange(heads), slots].set(new.astype(buf.dtype), mode="drop")


def write(cache: KVCache, k_new: jax.Array, v_new: jax.Array, num_new: jax.Array) -> KVCache:
    """Writes k_new/v_new [layers, B, T, kv_heads, head_dim] at slots lengths[b] .. lengths[b]+T-1 and
    makes the first num_new[b] of them valid; the rest are scratch that later writes overwrite.
    Called eagerly, it raises before a write past max_len."""
    return commit(cache.replace(k=scatter_rows(cache.k, k_new, cache.lengths),
                                v=scatter_rows(cache.v, v_new, cache.lengths)), num_new)


def commit(cache: KVCache, num_new: jax.Array) -> KVCache:
    """Makes the first num_new[b] entries that the last forward pass wrote valid."""
    num_new = jnp.asarray(num_new, jnp.int32)
    check_room(cache, num_new)
    return cache.replace(lengths=cache.lengths + num_new)
