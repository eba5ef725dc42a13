"""A CPU kernel for the attention of a decode step's few new queries over one layer of the KV cache.

XLA copied each layer's K and V slices out of the stacked cache before attending, and around its
products transposed the queries and the output whenever a step had more than one new token (a draft
tree). `csrc/attention.cc` reads the layer in place and takes the queries and returns the output in
the model's own [B, T, kv_heads, G, D] layout. Each query's sums run over the slots it sees in slot
order, so its result does not depend on the other queries of the call: a tree's verification and a
one-token step compute bitwise the same attention (tree nodes sit after their ancestors, as in the
sequence).

It runs wherever the CPU rows kernel does (the decode loops' tile-packed params, `rows_matmul`), for
up to MAX_QUERIES new tokens x query heads per KV head and head dims that are a multiple of 16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from redrafter_jax import rows_matmul

MAX_QUERIES = 64  # csrc/attention.cc's kMaxQueries
LANES = 16


def supported(q: jax.Array) -> bool:
    """Whether q [B, T, kv_heads, G, D] fits the kernel: float32, T x G <= MAX_QUERIES, D a multiple of 16."""
    _, t, _, g, d = q.shape
    return q.dtype == jnp.float32 and t * g <= MAX_QUERIES and d % LANES == 0


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, layer: int) -> jax.Array:
    """Softmax attention of q [B, T, kv_heads, G, D] over layer `layer` of the cache buffers k, v
    [layers, B, kv_heads, S, D], slot s visible to query t where mask [B, T, S]; scaled by D^-1/2.
    Returns [B, T, kv_heads, G, D] float32."""
    rows_matmul.check_available("CPU attention")
    if not supported(q) or k.dtype != jnp.float32 or v.shape != k.shape or v.dtype != k.dtype:
        raise ValueError(f"CPU attention takes float32 q [B, T, kv_heads, G, D] with T x G <= {MAX_QUERIES} and D a "
                         f"multiple of {LANES}, and float32 k, v of one shape; got q {q.dtype}{list(q.shape)}, k "
                         f"{k.dtype}{list(k.shape)}, v {v.dtype}{list(v.shape)}")
    return jax.ffi.ffi_call(rows_matmul.ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q, k, v, mask, layer=np.int64(layer))
