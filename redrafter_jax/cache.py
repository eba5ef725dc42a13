"""Fixed-shape KV cache with per-row lengths.

Rows of a batch hold sequences of different lengths; each row's valid entries are positions
[0, lengths[b]). The cache slot index of a token equals its position id, so a key's position is its
slot index. Nothing is ever written at a slot >= max_len: `write` drops such writes under `jit`, and
callers (`generate`) check capacity on the host before any compiled loop starts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from redrafter_jax.config import ModelConfig


@struct.dataclass
class KVCache:
    k: jax.Array  # [layers, B, max_len, kv_heads, head_dim]
    v: jax.Array  # [layers, B, max_len, kv_heads, head_dim]
    lengths: jax.Array  # [B] int32, number of valid positions per row

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> KVCache:
    if batch_size < 1 or max_len < 0:
        raise ValueError(f"cache needs batch_size >= 1 and max_len >= 0, got {batch_size}, {max_len}")
    shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, cfg.dtype), v=jnp.zeros(shape, cfg.dtype),
                   lengths=jnp.zeros((batch_size,), jnp.int32))


def attention_mask(cache: KVCache, positions: jax.Array, new_mask: jax.Array,
                   sliding_window: int | None = None) -> jax.Array:
    """Mask over (cache slots + new tokens) for new tokens at `positions`.

    positions: [B, T] position ids of the new tokens; new_mask: [B, T, T] or [T, T] bool, which new
    tokens each new token sees (causal for plain decoding, a tree mask for verification).
    Returns [B, T, max_len + T] bool.
    """
    b, t = positions.shape
    slot = jnp.arange(cache.max_len)
    cache_mask = slot[None, None, :] < cache.lengths[:, None, None]  # [B, 1, S]
    if sliding_window is not None:
        cache_mask = cache_mask & (positions[:, :, None] - slot[None, None, :] < sliding_window)
        new_pos_ok = positions[:, :, None] - positions[:, None, :] < sliding_window
        new_mask = new_mask & new_pos_ok
    cache_mask = jnp.broadcast_to(cache_mask, (b, t, cache.max_len))
    new_mask = jnp.broadcast_to(new_mask, (b, t, t))
    return jnp.concatenate([cache_mask, new_mask], axis=-1)


def write(cache: KVCache, k_new: jax.Array, v_new: jax.Array, num_new: jax.Array) -> KVCache:
    """Writes k_new/v_new [layers, B, T, kv_heads, head_dim] at slots lengths[b] .. lengths[b]+T-1.

    All T entries are written (fixed shape); only the first num_new[b] become valid, so the rest are
    scratch that later writes overwrite. Writes past max_len are dropped, never clamped onto valid
    slots. Called eagerly, it raises before such a write.
    """
    t = k_new.shape[2]
    num_new = jnp.asarray(num_new, jnp.int32)
    if not isinstance(cache.lengths, jax.core.Tracer) and not isinstance(num_new, jax.core.Tracer):
        need = int(jnp.max(cache.lengths + num_new))
        if need > cache.max_len:
            raise ValueError(f"KV cache overflow: writing would need {need} slots but max_len is "
                             f"{cache.max_len}")
    rows = jnp.arange(cache.batch_size)[:, None]
    slots = cache.lengths[:, None] + jnp.arange(t)[None, :]  # [B, T]
    k = cache.k.at[:, rows, slots].set(k_new.astype(cache.k.dtype), mode="drop")
    v = cache.v.at[:, rows, slots].set(v_new.astype(cache.v.dtype), mode="drop")
    return KVCache(k=k, v=v, lengths=cache.lengths + num_new)
