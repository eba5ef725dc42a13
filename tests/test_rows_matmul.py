"""The CPU rows kernel: the products it computes, that a row's result does not depend on how many rows
share the call, and that decoding uses it exactly where it applies and stays exact with and without it."""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from redrafter_jax import generate as gen
from redrafter_jax import rows_matmul, sharding
from redrafter_jax.config import SamplingConfig, SpecConfig
from redrafter_jax.decode import prepare_prompts
from redrafter_jax.model import forward_causal, pack_params
from tests.tiny import tiny_model

pytestmark = pytest.mark.skipif(not rows_matmul.available(), reason="no C++ compiler for the CPU rows kernel")


@pytest.mark.parametrize("k,out", [(5, (7,)), (64, (3, 5, 8)), (300, (96,))])
def test_products_match_float64_and_rows_do_not_depend_on_their_count(k, out):
    rng = np.random.default_rng(k)
    w = rng.standard_normal((k, *out)).astype(np.float32)
    packed = rows_matmul.pack(jnp.asarray(w))
    assert packed.tiles.shape == (-(-w[0].size // 32), k, 32) and packed.out == out
    x = rng.standard_normal((70, k)).astype(np.float32)
    mm = jax.jit(rows_matmul.matmul)
    single = np.stack([np.asarray(mm(x[i: i + 1], packed))[0] for i in range(26)])
    want = np.tensordot(x.astype(np.float64), w.astype(np.float64), 1)
    np.testing.assert_allclose(single, want[:26], rtol=1e-5, atol=1e-5 * np.sqrt(k))
    for m in (2, 3, 12, 13, 24, 26):  # one pass, a full pass, a partial second, three passes: bitwise the single rows
        np.testing.assert_array_equal(np.asarray(mm(x[:m], packed)), single[:m])
    # more than MAX_ROWS rows go to XLA's matrix multiply, on the same packed weight
    np.testing.assert_allclose(np.asarray(mm(x, packed)), want, rtol=1e-5, atol=1e-5 * np.sqrt(k))
    np.testing.assert_array_equal(np.asarray(mm(x[None, :3], packed)), single[None, :3])  # leading axes kept


def test_packing_copies_tiles_exactly_also_from_a_transposed_weight():
    w = np.random.default_rng(0).standard_normal((9, 70)).astype(np.float32)  # 70 columns: a padded last tile
    want = np.pad(w, ((0, 0), (0, 26))).reshape(9, 3, 32).transpose(1, 0, 2)
    for packed in (rows_matmul.pack(jnp.asarray(w)), rows_matmul.pack(jnp.asarray(w.T), transposed=True)):
        assert packed.out == (70,)
        np.testing.assert_array_equal(np.asarray(packed.tiles), want)
    with pytest.raises(ValueError, match="float32"):
        rows_matmul.pack(jnp.asarray(w, jnp.bfloat16))


def test_decoding_params_are_packed_once_and_kept_while_the_params_live():
    cfg, params = tiny_model()
    packed = gen.decoding_params(params, cfg)
    assert gen.decoding_params(params, cfg) is packed  # a second generate() call does not pack again
    other = jax.tree_util.tree_map(lambda x: x + 0, params)
    assert gen.decoding_params(other, cfg) is not packed
    kept = len(gen._PACKED)
    del other
    gc.collect()
    assert len(gen._PACKED) == kept - 1  # freed with its params
    with rows_matmul.turned_off():
        assert gen.decoding_params(params, cfg) is params


def test_packed_params_give_the_same_forward():
    cfg, params = tiny_model(intermediate_size=72)  # 2 x 72 columns: a padded last tile
    tokens = jnp.asarray([[5, 6, 7, 8], [9, 10, 11, 12]])
    plain, packed = forward_causal(params, cfg, tokens), forward_causal(pack_params(params), cfg, tokens)
    np.testing.assert_allclose(np.asarray(packed.logits), np.asarray(plain.logits), rtol=1e-5, atol=1e-5)


def test_decoding_uses_the_kernels_exactly_where_they_apply():
    cfg, params = tiny_model(head_dim=16)
    assert rows_matmul.enabled(params, cfg.dtype, None)
    assert not rows_matmul.enabled(params, "bfloat16", None)
    assert not rows_matmul.enabled(params, cfg.dtype, sharding.make_mesh(1, 1))
    with rows_matmul.turned_off():
        assert not rows_matmul.enabled(params, cfg.dtype, None)
    assert rows_matmul.enabled(params, cfg.dtype, None)  # restored
    block, lengths, limits = prepare_prompts(cfg, [[5, 6, 7]], 4)
    key = jax.random.PRNGKey(0)

    def lowered(loop_params):
        return gen._call(gen._speculative_jit.lower, cfg, params, loop_params, None, block, lengths, limits, key,
                         sampling=SamplingConfig(), spec=SpecConfig(0, 3, lookup_beams=1), max_new_tokens=4,
                         stream=None).as_text()
    kernels = lowered(gen.decoding_params(params, cfg))
    assert rows_matmul.TARGET in kernels and rows_matmul.ATTENTION_TARGET in kernels
    assert rows_matmul.TARGET not in lowered(params) and rows_matmul.ATTENTION_TARGET not in lowered(params)


@pytest.mark.parametrize("kernel", [True, False], ids=["CPU kernels", "XLA products"])
def test_speculative_output_equals_autoregressive_both_ways(kernel):
    cfg, params = tiny_model(seed=3, head_dim=16)  # a head dim the attention kernel takes
    prompts = [[5, 6, 7, 8, 9, 5, 6, 7], [3, 4], [9, 8, 7, 6, 5]]
    spec = SpecConfig(0, 4, lookup_beams=3)

    def run():
        ar = gen.generate(params, cfg, prompts, max_new_tokens=24)
        sp = gen.generate(params, cfg, prompts, max_new_tokens=24, spec=spec)
        return np.asarray(ar.tokens), np.asarray(sp.tokens), np.asarray(sp.accepted)
    if kernel:
        ar, sp, acc = run()
    else:
        with rows_matmul.turned_off():
            ar, sp, acc = run()
    np.testing.assert_array_equal(sp, ar)
    assert (acc > 0).any()  # lookup drafts were accepted: the tree verification really ran


def test_a_missing_compiler_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("REDRAFTER_CACHE", str(tmp_path))
    with pytest.raises(OSError, match="no-such-c"):
        rows_matmul._compile()
