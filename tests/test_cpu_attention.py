"""The CPU attention kernel: it computes softmax attention over a layer of the cache in place, and a
query's result depends only on the keys it sees and their order, never on the other queries of the call
or where its keys sit (which keeps a tree's verification bitwise equal to one-token steps)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from redrafter_jax import cpu_attention, rows_matmul
from redrafter_jax.model import _attention

pytestmark = pytest.mark.skipif(not rows_matmul.available(), reason="no C++ compiler for the CPU kernels")

attend = jax.jit(cpu_attention.attention, static_argnums=4)


def _inputs(rng, b, t, h, g, d, s, layers=3):
    q = rng.standard_normal((b, t, h, g, d)).astype(np.float32)
    k, v = rng.standard_normal((2, layers, b, h, s, d)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("t,g,d", [(1, 3, 64), (7, 3, 64), (16, 4, 16), (3, 2, 128), (64, 1, 32)])
def test_matches_attention_over_the_sliced_layer(t, g, d):
    rng = np.random.default_rng(t * d)
    b, h, s = 2, 3, 50
    q, k, v = _inputs(rng, b, t, h, g, d, s)
    mask = rng.random((b, t, s)) < 0.5
    mask[:, :, 7] = True  # every query sees something
    got = np.asarray(attend(q, k, v, mask, 2))
    want = np.asarray(_attention(jnp.asarray(q), jnp.asarray(k[2]), jnp.asarray(v[2]), jnp.asarray(mask)))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_a_query_depends_only_on_the_keys_it_sees_in_order():
    """Seven tree queries over a cache with gaps: each one's output is bitwise the output of that query
    alone, with just its keys packed at the front of another cache in the same order."""
    rng = np.random.default_rng(0)
    t, h, g, d, s = 7, 3, 3, 64, 40
    q, k, v = _inputs(rng, 1, t, h, g, d, s, layers=1)
    mask = rng.random((1, t, s)) < 0.6
    mask[:, :, 0] = True
    tree = np.asarray(attend(q, k, v, mask, 0))
    for i in range(t):
        seen = np.flatnonzero(mask[0, i])
        k1, v1 = rng.standard_normal((2, 1, 1, h, s + 5, d)).astype(np.float32)  # other keys elsewhere
        k1[:, :, :, 3: 3 + len(seen)], v1[:, :, :, 3: 3 + len(seen)] = k[:, :, :, seen], v[:, :, :, seen]
        alone_mask = np.zeros((1, 1, s + 5), bool)
        alone_mask[0, 0, 3: 3 + len(seen)] = True
        alone = np.asarray(attend(q[:, i: i + 1], k1, v1, alone_mask, 0))
        np.testing.assert_array_equal(alone[:, 0], tree[:, i])


def test_shapes_it_cannot_take_are_refused():
    rng = np.random.default_rng(0)
    for t, g, d in [(33, 2, 64), (1, 3, 8)]:  # 66 queries per KV head; a head dim not a multiple of 16
        q, k, v = _inputs(rng, 1, t, 1, g, d, 10)
        assert not cpu_attention.supported(jnp.asarray(q))
        with pytest.raises(ValueError, match="CPU attention takes"):
            cpu_attention.attention(q, k, v, np.ones((1, t, 10), bool), 0)
