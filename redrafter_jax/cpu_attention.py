"""A CPU kernel for the attention of a decode step's few new queries over one layer of the KV cache.

XLA copied each layer's K and V slices out of the stacked cache before attending, and around its
products transposed the queries and the output whenever a step had more than one new token (a draft
tree). `csrc/attention.cc` reads the layer in place and takes the queries and returns the output in
the model's own layout. The same call applies RoPE and writes the new keys and values (and the
cache's pending entries) into the layer in place: as XLA ops around it, that was seven small ops per
layer and about 2 ms of a 27 ms speculative step. Each query's sums run over the slots it sees in slot
order, so its result does not depend on the other queries of the call: a tree's verification and a
one-token step compute bitwise the same attention (tree nodes sit after their ancestors, as in the
sequence).

It runs wherever the CPU rows kernel does (the decode loops' tile-packed params, `rows_matmul`), for
up to MAX_QUERIES new tokens x query heads per KV head and head dims that are a multiple of 16, up to
MAX_HEAD_DIM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from redrafter_jax import rows_matmul

# csrc/attention.cc's kMaxQueries: trees of up to 85 slots at 3 query heads per KV head (measured faster
# than XLA's attention up to 291 queries); beyond, e.g. a long bfloat16 prefill, a head's scores
# (T x G x S floats) would grow large, and XLA attends.
MAX_QUERIES = 256
MAX_HEAD_DIM = 256  # csrc/attention.cc's kMaxHeadDim
LANES = 16


def supported(qkv: jax.Array) -> bool:
    """Whether qkv [B, T, kv_heads, G + 2, D] fits the kernel: float32, T x G <= MAX_QUERIES, D a multiple
    of 16 up to MAX_HEAD_DIM."""
    _, t, _, g2, d = qkv.shape
    return (qkv.dtype == jnp.float32 and g2 >= 3 and t * (g2 - 2) <= MAX_QUERIES and d % LANES == 0
            and d <= MAX_HEAD_DIM)


def attention(qkv: jax.Array, cos: jax.Array, sin: jax.Array, k: jax.Array, v: jax.Array, pending_k: jax.Array,
              pending_v: jax.Array, slots: jax.Array, mask: jax.Array, layer: int | jax.Array,
              softcap: float | None = None, sinks: jax.Array | None = None):
    """One layer's attention step for T new tokens, as `model.transformer` does it with XLA ops.

    qkv [B, T, kv_heads, G + 2, D]: per KV head its G queries, the key and the value, before RoPE
    (tables cos, sin [B, T, D / 2], `model.rope_tables`). The cache buffers k, v [layers, B, kv_heads,
    S, D] get, in place, the layer's pending entries from pending_k, pending_v [layers, B, P, kv_heads,
    D] (the cache's own, read in place like k, v) and then the new keys and values at slots [B, P + T]
    (slots >= S dropped, `cache.write_slots`); then the queries attend over layer `layer` (an int, or
    traced: a scan over the layers' counter), slot s visible to query t where mask [B, T, S], scaled by
    D^-1/2 (and soft-capped, cap tanh(score / cap), given a `softcap`: Gemma 2's), with each query head's
    logit from sinks [kv_heads, G] joining its softmax (GPT-OSS's; None: no sinks).
    Returns (out [B, T, kv_heads, G, D], the new keys (rotated) and values [B, T, kv_heads, D], k, v).
    """
    rows_matmul.check_available("CPU attention")
    b, t, h, g2, d = qkv.shape
    f32 = [x.dtype == jnp.float32 for x in (qkv, cos, sin, k, v, pending_k, pending_v)]
    if (not supported(qkv) or not all(f32) or k.shape != v.shape or k.shape[1:3] + k.shape[4:] != (b, h, d)
            or cos.shape != (b, t, d // 2) or sin.shape != cos.shape or pending_k.shape != pending_v.shape
            or pending_k.shape[:2] != k.shape[:2] or pending_k.shape[3:] != (h, d)
            or slots.shape != (b, pending_k.shape[2] + t) or mask.shape != (b, t, k.shape[3])
            or (sinks is not None and sinks.shape != (h, g2 - 2))):
        raise ValueError(f"CPU attention takes float32 qkv [B, T, kv_heads, G + 2, D] with T x G <= {MAX_QUERIES} and "
                         f"D a multiple of {LANES} up to {MAX_HEAD_DIM}, cos and sin [B, T, D / 2], k and v "
                         f"[layers, B, kv_heads, S, D], pending_k and pending_v [layers, B, P, kv_heads, D], "
                         f"slots [B, P + T], mask [B, T, S] and sinks [kv_heads, G]; "
                         f"got qkv {qkv.dtype}{list(qkv.shape)}, cos {list(cos.shape)}, k {k.dtype}{list(k.shape)}, v "
                         f"{list(v.shape)}, pending_k {list(pending_k.shape)}, slots {list(slots.shape)}, mask "
                         f"{list(mask.shape)}, sinks {None if sinks is None else list(sinks.shape)}")
    new = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)
    shapes = (jax.ShapeDtypeStruct((b, t, h, g2 - 2, d), jnp.float32), new, new, k, v)
    sinks = jnp.full((h, g2 - 2), -jnp.inf, jnp.float32) if sinks is None else sinks.astype(jnp.float32)
    return jax.ffi.ffi_call(rows_matmul.ATTENTION_TARGET, shapes, input_output_aliases={3: 3, 4: 4})(
        qkv, cos, sin, k, v, pending_k, pending_v, slots.astype(jnp.int32), mask, sinks, jnp.asarray(layer, jnp.int32),
        softcap=np.float32(softcap or 0))
