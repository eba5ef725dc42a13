"""The CPU attention kernel: one layer's attention step (RoPE, the cache writes in place, softmax
attention over the layer) equals the model's XLA ops, and a query's result depends only on the keys it
sees and their order, never on the other queries of the call or where its keys sit (which keeps a
tree's verification bitwise equal to one-token steps)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from redrafter_jax import cache as kv
from redrafter_jax import cpu_attention, rows_matmul
from redrafter_jax.model import _attention, apply_rope, rope_tables

pytestmark = pytest.mark.skipif(not rows_matmul.available(), reason="no C++ compiler for the CPU kernels")

attend = jax.jit(cpu_attention.attention, static_argnums=(9, 10))


def _step_inputs(rng, b, t, h, g, d, s, p=0, layers=3):
    qkv = rng.standard_normal((b, t, h, g + 2, d)).astype(np.float32)
    k, v = rng.standard_normal((2, layers, b, h, s, d)).astype(np.float32)
    pending = rng.standard_normal((2, layers, b, p, h, d)).astype(np.float32)
    positions = jnp.asarray(rng.integers(0, 4 * s, (b, t)), jnp.int32)
    cos, sin = rope_tables(positions, 1e4 ** -(np.arange(0, d, 2) / d))
    return qkv, cos, sin, k, v, pending


@functools.partial(jax.jit, static_argnums=(9, 10))
def _xla_ops(qkv, cos, sin, buffers, pending, new, slots, after, mask, layer, cap, sinks):
    """The model's XLA ops for what the kernel computes, as one program (eager, each op compiled on its own
    for every shape took most of a case's time): the new keys; the (keys, values) buffers after the pending
    entries and `new`, the kernel's new keys and values, are written at `slots`; the attention over `after`,
    the kernel's buffers, and the same without the soft cap and sinks."""
    g = qkv.shape[3] - 2
    written = [kv.scatter_rows(buf, jnp.concatenate([pend[layer], n], axis=1), slots, layer)
               for buf, pend, n in zip(buffers, pending, new)]
    q = apply_rope(qkv[:, :, :, :g], cos, sin)
    k, v = after[0][layer], after[1][layer]
    attended = _attention(q, k, v, mask, cap, sinks), _attention(q, k, v, mask)
    return apply_rope(qkv[:, :, :, g], cos, sin), written, *attended


@pytest.mark.parametrize("t,g,d,p,cap,sink", [(1, 3, 64, 0, None, False), (7, 3, 64, 4, None, False),
                                              (16, 4, 16, 2, None, False), (3, 2, 128, 1, None, False),
                                              (64, 1, 32, 0, None, False), (33, 3, 64, 2, None, False),
                                              (7, 2, 64, 2, 1.5, False), (1, 4, 256, 0, 50.0, False),
                                              (1, 3, 64, 0, None, True), (9, 4, 64, 3, None, True)])
def test_matches_the_models_xla_ops(t, g, d, p, cap, sink):
    """Against apply_rope, cache.scatter_rows and the XLA attention over the sliced layer: the output,
    the new keys and values, and the buffers (pending entries and new tokens at their slots, a slot
    past the cache dropped, everything else untouched); with Gemma 2's soft cap of the scores too (a cap
    of 1.5 changes every score a good deal, its 50 the large ones), or GPT-OSS's sink logits (each head's
    own, some above the scores, some below, one so far above them that its head's output is ~0)."""
    rng = np.random.default_rng(t * d + p)
    b, h, s, layer = 2, 3, 90, 2
    qkv, cos, sin, k, v, (pk, pv) = _step_inputs(rng, b, t, h, g, d, s, p)
    slots = np.stack([rng.permutation(s + 1)[: p + t] for _ in range(b)]).astype(np.int32)  # s: dropped
    mask = rng.random((b, t, s)) < 0.5
    mask[:, :, 7] = True  # every query sees something
    if cap:  # scores large enough for the cap to bite
        qkv[:, :, :, :g] *= 3
    sinks = jnp.asarray(rng.normal(0, 2, (h, g)), jnp.float32).at[0, 0].set(120.0) if sink else None
    out, k_new, v_new, k_after, v_after = attend(qkv, cos, sin, k, v, pk, pv, slots, mask, layer, cap, sinks)
    keys, written, want, plain = _xla_ops(qkv, cos, sin, (k, v), (pk, pv), (k_new, v_new), slots,
                                          (k_after, v_after), mask, layer, cap, sinks)
    np.testing.assert_allclose(np.asarray(k_new), np.asarray(keys), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(v_new), qkv[:, :, :, g + 1])
    for got, buf in zip((k_after, v_after), written):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(buf))
    # (outputs are sums of ~1 values: 2.1e-6 apart near 0 with D = 256 and the cap, in SSE and AVX2 builds
    # on an AVX-512 CPU)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=2e-5, atol=4e-6)
    if cap or sink:  # and the cap or the sinks did change the output
        assert not np.allclose(np.asarray(out), np.asarray(plain), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("sink", [False, True])
def test_a_query_depends_only_on_the_keys_it_sees_in_order(sink):
    """Seven tree queries over a cache with gaps: each one's output is bitwise the output of that query
    alone, with just its keys packed at the front of another cache in the same order (with sink logits
    too)."""
    rng = np.random.default_rng(0)
    t, h, g, d, s = 7, 3, 3, 64, 40
    qkv, cos, sin, k, v, (pk, pv) = _step_inputs(rng, 1, t, h, g, d, s, layers=1)
    mask = rng.random((1, t, s)) < 0.6
    mask[:, :, 0] = True
    nowhere = np.full((1, t), s, np.int32)  # the new keys are not written: the cache alone is attended
    sinks = jnp.asarray(rng.normal(0, 2, (h, g)), jnp.float32) if sink else None
    tree = np.asarray(attend(qkv, cos, sin, k, v, pk, pv, nowhere, mask, 0, None, sinks)[0])
    for i in range(t):
        seen = np.flatnonzero(mask[0, i])
        k1, v1 = rng.standard_normal((2, 1, 1, h, s + 5, d)).astype(np.float32)  # other keys elsewhere
        k1[:, :, :, 3: 3 + len(seen)], v1[:, :, :, 3: 3 + len(seen)] = k[:, :, :, seen], v[:, :, :, seen]
        alone_mask = np.zeros((1, 1, s + 5), bool)
        alone_mask[0, 0, 3: 3 + len(seen)] = True
        alone = attend(qkv[:, i: i + 1], cos[:, i: i + 1], sin[:, i: i + 1], k1, v1, pk, pv,
                       np.full((1, 1), s + 5, np.int32), alone_mask, 0, None, sinks)[0]
        np.testing.assert_array_equal(np.asarray(alone)[:, 0], tree[:, i])


def test_shapes_it_cannot_take_are_refused():
    rng = np.random.default_rng(0)
    # 258 queries per KV head; a head dim not a multiple of 16; one too large
    for t, g, d in [(129, 2, 64), (1, 3, 8), (1, 1, 272)]:
        qkv, cos, sin, k, v, (pk, pv) = _step_inputs(rng, 1, t, 1, g, d, 10)
        assert not cpu_attention.supported(jnp.asarray(qkv))
        with pytest.raises(ValueError, match="CPU attention takes"):
            cpu_attention.attention(qkv, cos, sin, k, v, pk, pv, np.zeros((1, t), np.int32),
                                    np.ones((1, t, 10), bool), 0)
    qkv, cos, sin, k, v, (pk, pv) = _step_inputs(rng, 1, 2, 1, 3, 16, 10)
    with pytest.raises(ValueError, match="slots \\[1, 3\\]"):  # one slot per new token is missing
        cpu_attention.attention(qkv, cos, sin, k, v, pk, pv, np.zeros((1, 3), np.int32), np.ones((1, 2, 10), bool), 0)
