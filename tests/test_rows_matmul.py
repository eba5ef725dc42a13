"""The CPU rows kernel: the products it computes, that a row's result does not depend on how many rows
share the call, and that decoding uses it exactly where it applies and stays exact with and without it."""

import contextlib
import dataclasses
import gc
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from redrafter_jax import generate as gen
from redrafter_jax import model, rows_matmul, sharding
from redrafter_jax.cache import attention_mask, commit, init_cache
from redrafter_jax.config import DrafterConfig, SpecConfig
from redrafter_jax.drafter import Drafter, draft_logits, init_drafter, rnn_step
from redrafter_jax.model import forward_causal, pack_params
from redrafter_jax.oracle import OracleDrafter
from tests.tiny import tiny_model

pytestmark = pytest.mark.skipif(not rows_matmul.available(), reason="no C++ compiler for the CPU rows kernel")
needs_unit = pytest.mark.skipif(not rows_matmul.bf16_unit(), reason="this CPU has no bfloat16 unit (AMX, AVX512-BF16)")
LAYOUTS = [("float32", False), ("bfloat16", False), pytest.param("bfloat16", True, marks=needs_unit)]
LAYOUT_IDS = ["float32", "bfloat16", "bfloat16 k-pairs"]
# every kernel: the k-pairs layout's on each bfloat16 unit this CPU has (AMX's kernel and AVX512-BF16's both,
# on a CPU with AMX)
KERNELS = [pytest.param("float32", None, id="float32"), pytest.param("bfloat16", None, id="bfloat16")] + [
    pytest.param("bfloat16", unit, id=f"bfloat16 on {unit}", marks=pytest.mark.skipif(
        unit not in rows_matmul.bf16_units(), reason=f"this CPU has no {unit}"))
    for unit in rows_matmul.PAIRS_TARGETS]


@pytest.mark.parametrize("dtype,unit", KERNELS)
@pytest.mark.parametrize("k,out", [(5, (7,)), (64, (3, 5, 8)), (300, (96,))])
def test_products_match_float64_and_rows_do_not_depend_on_their_count(k, out, dtype, unit, monkeypatch):
    if unit:  # this unit's kernel multiplies the k-pairs
        monkeypatch.setattr(rows_matmul, "bf16_units", lambda: (unit,))
    pairs = unit is not None
    rng = np.random.default_rng(k)
    w = jnp.asarray(rng.standard_normal((k, *out)), dtype)
    packed = rows_matmul.pack(w, pairs=pairs)
    rows = -(-k // 32) * 16 if pairs else k  # k-pairs of K zero-padded to 32s, or K
    assert packed.tiles.shape == (-(-w[0].size // 32), rows, 64 if pairs else 32) and packed.tiles.dtype == dtype
    assert (packed.k, packed.out, packed.pairs) == (k, out, pairs)
    x = rng.standard_normal((70, k)).astype(np.float32)
    mm = jax.jit(lambda x, w: rows_matmul.matmul(x, w))  # a new function: no trace of another unit's test reused
    target = rows_matmul.PAIRS_TARGETS[unit] if unit else rows_matmul.TARGETS[jnp.dtype(dtype)]
    assert f"@{target}(" in mm.lower(x[:1], packed).as_text()  # this kernel, and no other, multiplies
    single = np.stack([np.asarray(mm(x[i: i + 1], packed))[0] for i in range(26)])
    # bfloat16 weights: x is rounded to bfloat16 too, the products exact, their sums float32
    factor = np.asarray(jnp.asarray(x, dtype), np.float64)
    want = np.tensordot(factor, np.asarray(w, np.float64), 1)
    np.testing.assert_allclose(single, want[:26], rtol=1e-5, atol=1e-5 * np.sqrt(k))
    for m in (2, 3, 12, 13, 16, 17, 24, 26):  # whole and partial passes of 12 (16 on AMX): bitwise the single rows
        np.testing.assert_array_equal(np.asarray(mm(x[:m], packed)), single[:m])
    many = np.asarray(mm(x, packed))  # however many rows (a batch's trees, a prefill)
    np.testing.assert_array_equal(many[:26], single)
    np.testing.assert_allclose(many, want, rtol=1e-5, atol=1e-5 * np.sqrt(k))
    np.testing.assert_array_equal(np.asarray(mm(x[None, :3], packed)), single[None, :3])  # leading axes kept


@pytest.mark.parametrize("dtype,unit", KERNELS)
def test_grouped_products_multiply_each_run_of_rows_by_its_weight_alone(dtype, unit, monkeypatch):
    """A mixture's experts: rows sorted by expert, sizes[g] of them for weight g (some with none), each
    row's result bitwise what it gets alone, by its weight packed on its own."""
    if unit:
        monkeypatch.setattr(rows_matmul, "bf16_units", lambda: (unit,))
    rng, pairs = np.random.default_rng(1), unit is not None
    w = jnp.asarray(rng.standard_normal((5, 40, 2, 24)), dtype)  # 5 experts [K, 2, F]: 48 columns, a padded tile
    grouped = rows_matmul.pack(w, pairs=pairs, grouped=True)
    assert grouped.grouped and grouped.tiles.shape[:2] == (5, 2) and (grouped.k, grouped.out) == (40, (2, 24))
    sizes = np.array([3, 0, 14, 1, 0], np.int32)  # 14: a pass of 12 and a partial one (on AMX one of 16)
    x = rng.standard_normal((18, 40)).astype(np.float32)
    mm = jax.jit(lambda x, w, sizes=None: rows_matmul.matmul(x, w, sizes))
    got = np.asarray(mm(x, grouped, jnp.asarray(sizes)))
    expert = np.repeat(np.arange(5), sizes)
    for i, e in enumerate(expert):
        np.testing.assert_array_equal(got[i], np.asarray(mm(x[i:i + 1], rows_matmul.pack(w[e], pairs=pairs)))[0])
    bad = (ValueError, jax.errors.JaxRuntimeError)  # (as jax raises the kernel's error)
    with pytest.raises(bad, match="sizes must be counts >= 0 that sum to the rows"):
        np.asarray(mm(x, grouped, jnp.asarray([3, 0, 14, 1, 1], jnp.int32)))
    with pytest.raises(ValueError, match="grouped weights need x"):
        mm(x, grouped)


@pytest.mark.parametrize("dtype,pairs", LAYOUTS, ids=LAYOUT_IDS)
def test_packing_copies_tiles_exactly_also_from_a_transposed_weight(dtype, pairs):
    w = np.asarray(jnp.asarray(np.random.default_rng(0).standard_normal((9, 70)), dtype))  # 70 columns: a padded tile
    want = np.pad(w, ((0, 0), (0, 26))).reshape(9, 3, 32).transpose(1, 0, 2)  # [tile, k, column]
    if pairs:  # k zero-padded to 32, then (k, column) at [k // 2, 2 column + k % 2]
        want = np.pad(want, ((0, 0), (0, 23), (0, 0))).reshape(3, 16, 2, 32).transpose(0, 1, 3, 2).reshape(3, 16, 64)
    for packed in (rows_matmul.pack(jnp.asarray(w), pairs=pairs),
                   rows_matmul.pack(jnp.asarray(w.T), transposed=True, pairs=pairs)):
        assert packed.out == (70,) and packed.tiles.dtype == dtype
        np.testing.assert_array_equal(np.asarray(packed.tiles), want)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        rows_matmul.pack(jnp.asarray(w, jnp.float16))
    with pytest.raises(ValueError, match="k-pairs layout needs bfloat16 weights"):
        rows_matmul.pack(jnp.asarray(w, jnp.float32), pairs=True)


def by_layer(packed: model.Params) -> list[dict]:
    """Each layer's packed params, a `model.LayerStack`'s sliced out of it."""
    def at(stack, j):
        return {k: w.replace(tiles=w.tiles[j]) if isinstance(w, rows_matmul.Packed) else w[j]
                for k, w in stack.layers.items()}

    return [layer for _, item in model.layer_items(packed["layers"]) for layer in (
        [at(item, j) for j in range(item.count)] if isinstance(item, model.LayerStack) else [item])]


def test_decoding_params_are_packed_once_and_kept_while_the_params_live():
    cfg, params = tiny_model()
    made = gen.decoding_params(params, cfg)
    assert made.prefill is params and made.config == cfg
    assert isinstance(by_layer(made.loop)[0]["wo"], rows_matmul.Packed)
    assert gen.decoding_params(params, cfg).loop is made.loop  # a second generate() call does not pack again
    other = jax.tree_util.tree_map(lambda x: x + 0, params)
    assert gen.decoding_params(other, cfg).loop is not made.loop
    kept = len(gen._DECODING)
    del other
    gc.collect()
    assert len(gen._DECODING) == kept - 1  # freed with its params
    with rows_matmul.turned_off():
        assert gen.decoding_params(params, cfg) == (params, params, cfg)
    cfg, params = tiny_model(dtype="bfloat16")  # one packing per layout: REDRAFTER_BF16_UNIT=0 gets its own
    with rows_matmul.turned_off(unit_only=True):
        assert not by_layer(gen.decoding_params(params, cfg).loop)[0]["wo"].pairs
    assert by_layer(gen.decoding_params(params, cfg).loop)[0]["wo"].pairs == rows_matmul.pairs_layout(jnp.bfloat16)


def test_a_float32_prefill_takes_the_loops_packed_experts_and_xlas_dense_products():
    """XLA's products are faster for a long prompt's dense matrices, but XLA:CPU computes a mixture's
    experts densely, every expert over every row."""
    cfg, params = tiny_model(num_experts=4, experts_per_token=2, expert_size=16, moe_layers=(1,))
    prefill, loop, _ = gen.decoding_params(params, cfg)
    assert all(prefill["layers"][i][k] is params["layers"][i][k] for i, k in ((0, "w_down"), (1, "wo"), (1, "router")))
    assert all(prefill["layers"][1][k] is loop["layers"][1][k] for k in model.EXPERTS)  # (never stacked)
    tokens = jnp.asarray([[5, 6, 7, 8, 9, 10, 11, 12]])
    np.testing.assert_allclose(np.asarray(forward_causal(prefill, cfg, tokens).logits),
                               np.asarray(forward_causal(params, cfg, tokens).logits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", [None, SpecConfig(0, 4, lookup_beams=1)], ids=["autoregressive", "lookup beams"])
def test_calls_on_the_same_params_decode_by_their_own_config(spec):
    """The loop's packed params are kept per params, not the config: a second call with another EOS id
    stops there."""
    cfg, params = tiny_model()
    prompt = [[5, 6, 7, 5, 6, 7]]
    out = gen.generate(params, cfg, prompt, max_new_tokens=12, spec=spec)
    first = np.asarray(out.tokens[0, :out.lengths[0]]).tolist()
    stop = next(t for t in first[1:-1] if t not in cfg.eos_token_ids)  # ends the reply before its end
    again = gen.generate(params, dataclasses.replace(cfg, eos_token_ids=(stop,)), prompt, max_new_tokens=12, spec=spec)
    n = first.index(stop) + 1
    assert int(again.lengths[0]) == n and np.asarray(again.tokens[0, :n]).tolist() == first[:n]


def _unpacked(packed: rows_matmul.Packed) -> np.ndarray:
    """The weight [K, O] a Packed holds, from either layout."""
    tiles = np.asarray(packed.tiles)
    if packed.pairs:  # [T, Kp / 2, 32, 2] -> [T, Kp, 32]
        tiles = tiles.reshape(len(tiles), -1, 32, 2).transpose(0, 1, 3, 2).reshape(len(tiles), -1, 32)
    return tiles[:, :packed.k].transpose(1, 0, 2).reshape(packed.k, -1)[:, :int(np.prod(packed.out))]


@pytest.mark.parametrize("tied", [True, False])
def test_bfloat16_models_decode_with_bfloat16_products_and_float32_activations(tied, monkeypatch):
    cfg, params = tiny_model(dtype="bfloat16", tie_word_embeddings=tied)
    prefill, loop, dcfg = gen.decoding_params(params, cfg)
    assert prefill is loop and dcfg.dtype == "float32"  # the activations' and the cache's
    for p, q in zip(params["layers"], by_layer(loop)):
        for k in p:
            if isinstance(q[k], rows_matmul.Packed):  # the matrices: their bfloat16 values, tile-packed
                assert q[k].tiles.dtype == jnp.bfloat16 and q[k].pairs == rows_matmul.pairs_layout(jnp.bfloat16)
                np.testing.assert_array_equal(_unpacked(q[k]), np.asarray(p[k]).reshape(p[k].shape[0], -1))
            else:  # norms, biases: widened exactly
                assert q[k].dtype == jnp.float32
                np.testing.assert_array_equal(np.asarray(q[k]), np.asarray(p[k], np.float32))
    assert loop["embed"].dtype == jnp.float32 and loop["lm_head"].tiles.dtype == jnp.bfloat16
    tokens = jnp.asarray([[5, 6, 7, 8]])
    got = np.asarray(forward_causal(loop, dcfg, tokens).logits)
    widened = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
    with jax.default_matmul_precision("highest"):
        unrounded = np.asarray(forward_causal(widened, dcfg, tokens).logits)
        # the reference: every product's activations rounded to bfloat16, summed in float32
        bf16 = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
        monkeypatch.setattr(model, "linear", lambda x, w: jnp.tensordot(bf16(x), w, axes=1))
        monkeypatch.setattr(model, "lm_head", lambda p, h, cfg: bf16(h) @ model.lm_head_weight(p))
        want = np.asarray(forward_causal(widened, dcfg, tokens).logits)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(got - unrounded).max() > 1e-3  # which float32 activations would not give


def _paths(params, keep) -> set[str]:
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, rows_matmul.Packed))[0]
    return {jax.tree_util.keystr(path) for path, x in leaves if keep(x)}


@pytest.mark.parametrize("option", [{}, dict(exit_dim=32, draft_vocab_size=40), dict(share_lm_head=True, exit_dim=32)],
                         ids=["exit 2H", "projected, reduced vocabulary", "target's head"])
def test_drafters_decode_with_packed_matrices_and_draft_the_same_beams(option, monkeypatch):
    cfg, params = tiny_model(head_dim=16)
    dcfg = DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, num_resblocks=2, **option)
    vmap = jnp.arange(40) + 20 if dcfg.draft_vocab_size else None
    drafter = Drafter(init_drafter(dcfg, jax.random.PRNGKey(1), vmap), dcfg)
    packed = gen.decoding_drafter(drafter)
    assert _paths(packed.params, lambda x: isinstance(x, rows_matmul.Packed)) == _paths(drafter.params,
                                                                                        lambda x: x.ndim == 2)
    assert gen.decoding_drafter(drafter).params is packed.params  # kept while the drafter's params live
    # another drafter on the same params (here Apple's warp) drafts with its own config
    warped = drafter.replace(config=dataclasses.replace(dcfg, apple_warp=True))
    assert gen.decoding_drafter(warped).config == warped.config and gen.decoding_drafter(warped).params is packed.params
    loop = gen.decoding_params(params, cfg).loop
    context = jax.random.normal(jax.random.PRNGKey(2), (3, cfg.hidden_size))
    init, lengths = jnp.asarray([3, 9, 27]), jnp.zeros(3, jnp.int32)
    draft = jax.jit(lambda d: d.draft(loop, context, init, lengths, 4, 4))
    want, got = drafter.draft(params, context, init, lengths, 4, 4), draft(packed)
    np.testing.assert_array_equal(np.asarray(got.beams), np.asarray(want.beams))
    np.testing.assert_allclose(np.asarray(got.scores), np.asarray(want.scores), rtol=1e-5, atol=1e-5)
    # With a bfloat16 target its matrices are bfloat16 too, in the target's layout, kept beside the
    # float32 ones; their products round the activations to bfloat16 and sum in float32.
    halved = gen.decoding_drafter(drafter, dtype="bfloat16")
    assert halved.params is not packed.params
    assert gen.decoding_drafter(drafter, dtype="bfloat16").params is halved.params
    matrices = jax.tree_util.tree_leaves(halved.params, is_leaf=lambda x: isinstance(x, rows_matmul.Packed))
    for p, q in zip(jax.tree_util.tree_leaves(drafter.params), matrices):
        if p.ndim == 2:
            assert q.tiles.dtype == jnp.bfloat16 and q.pairs == rows_matmul.pairs_layout(jnp.bfloat16)
            np.testing.assert_array_equal(_unpacked(q), np.asarray(p.astype(jnp.bfloat16)).reshape(p.shape[0], -1))
    state = jax.random.normal(jax.random.PRNGKey(3), (3, 4, cfg.hidden_size))

    def step(d):  # every product of a beam-search step
        return (draft_logits(d.params, dcfg, loop, context[:, None], state),
                rnn_step(d.params, dcfg, state, loop["embed"][init][:, None]))
    products = step(halved)
    bf16 = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
    monkeypatch.setattr(rows_matmul, "matmul", lambda x, w: jnp.tensordot(
        bf16(x) if w.tiles.dtype == jnp.bfloat16 else x, jnp.asarray(_unpacked(w), jnp.float32), axes=1))
    with jax.default_matmul_precision("highest"):
        reference = step(halved)
    for g, r in zip(products, reference):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    assert np.array_equal(np.isfinite(draft(halved).scores), np.isfinite(want.scores))  # it drafts as many beams
    oracle = OracleDrafter(jnp.zeros((1, 8), jnp.int32), cfg.vocab_size)
    assert gen.decoding_drafter(oracle) is oracle and gen.decoding_drafter(None) is None
    with rows_matmul.turned_off():
        assert gen.decoding_drafter(drafter) is drafter


def test_packed_params_give_the_same_forward():
    cfg, params = tiny_model(intermediate_size=72)  # 2 x 72 columns: a padded last tile
    tokens = jnp.asarray([[5, 6, 7, 8], [9, 10, 11, 12]])
    packed = forward_causal(pack_params(params, cfg.layer_kinds), cfg, tokens)
    plain = forward_causal(params, cfg, tokens)
    np.testing.assert_allclose(np.asarray(packed.logits), np.asarray(plain.logits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_stacks_weight_at_one_layer_multiplies_as_that_weight_alone(dtype):
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 64, 2, 40)).astype(dtype)  # three layers' [K, 2, 40]
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 64))
    stack = rows_matmul.pack(w, grouped=True)
    at = jax.jit(lambda x, stack, j: rows_matmul.matmul(x, stack.replace(layer=j)))  # j traced, as in a scan
    for j in range(3):
        alone = rows_matmul.matmul(x, rows_matmul.pack(w[j]))
        np.testing.assert_array_equal(np.asarray(at(x, stack, j)), np.asarray(alone))


def test_packed_layers_are_stacks_of_like_layers_that_compile_one_layer_each():
    """Consecutive dense layers of one kind (windowed, NoPE) are one `LayerStack`, a mixture's layers one
    each; the forward is the unstacked one's, and a stack lowers to one layer's kernel calls."""
    cfg, params = tiny_model(num_layers=7, head_dim=16, sliding_window=3, window_layers=(2, 3), nope_layers=(6,),
                             num_experts=4, experts_per_token=2, expert_size=16, moe_layers=(4,))
    packed = pack_params(params, cfg.layer_kinds)
    assert [item.count if isinstance(item, model.LayerStack) else 1 for item in packed["layers"]] == [2, 2, 1, 1, 1]
    tokens = jnp.asarray([[5, 6, 7, 8, 9, 10], [9, 10, 11, 12, 13, 14]])
    np.testing.assert_allclose(np.asarray(forward_causal(packed, cfg, tokens).logits),
                               np.asarray(forward_causal(params, cfg, tokens).logits), rtol=1e-5, atol=1e-5)
    cfg, params = tiny_model(num_layers=6, head_dim=16)
    packed = pack_params(params, cfg.layer_kinds)
    assert len(packed["layers"]) == 1 and packed["layers"][0].count == 6
    lowered = jax.jit(forward_causal, static_argnums=1).lower(packed, cfg, tokens).as_text()
    assert lowered.count(rows_matmul.TARGETS[jnp.dtype(jnp.float32)]) == 4 + 1  # wqkv, wo, w_gate_up, w_down; LM head
    assert lowered.count(rows_matmul.ATTENTION_TARGET) == 1


def test_decoding_uses_the_kernels_exactly_where_they_apply():
    cfg, params = tiny_model(head_dim=16)
    assert rows_matmul.enabled(params, cfg.dtype, None) and rows_matmul.enabled(params, "bfloat16", None)
    assert not rows_matmul.enabled(params, "float16", None)
    assert not rows_matmul.enabled(params, cfg.dtype, sharding.make_mesh(1, 1))
    with rows_matmul.turned_off():
        assert not rows_matmul.enabled(params, cfg.dtype, None)
    assert rows_matmul.enabled(params, cfg.dtype, None)  # restored

    def lowered():  # the program generate() runs
        return gen.lower(params, cfg, [[5, 6, 7]], max_new_tokens=4, spec=SpecConfig(0, 3, lookup_beams=1)).as_text()
    kernels = lowered()
    with rows_matmul.turned_off():
        plain = lowered()
    target = rows_matmul.TARGETS[jnp.dtype(jnp.float32)]
    assert target in kernels and rows_matmul.ATTENTION_TARGET in kernels
    assert target not in plain and rows_matmul.ATTENTION_TARGET not in plain


# mixtures of experts: softmax routing renormalised over the chosen with biases and a gated shared expert
# beside a dense layer (Qwen2-MoE-like), Llama 4's sigmoid-weighted inputs (two a token) with an ungated
# one, DeepSeek-V3's routing (corrected sigmoids in the best 2 of 4 groups), and experts kept in MXFP4
# (GPT-OSS's)
MIXTURES = {"dense": {}, "experts": dict(num_experts=64, experts_per_token=8, expert_size=40, norm_topk=True,
                                         expert_bias=True, shared_expert_size=24, moe_layers=(1,)),
            "sigmoid experts": dict(num_experts=4, experts_per_token=2, expert_size=40, shared_expert_size=40,
                                    shared_expert_gate=False, routing="sigmoid_input"),
            "grouped experts": dict(num_experts=16, experts_per_token=4, expert_size=40, routing="sigmoid",
                                    norm_topk=True, expert_groups=4, expert_groups_kept=2, routed_scaling=2.5,
                                    shared_expert_size=40, shared_expert_gate=False, moe_layers=(1,)),
            "MXFP4 experts": dict(num_experts=8, experts_per_token=4, expert_size=64, expert_format="mxfp4")}


@pytest.mark.parametrize("mixture", MIXTURES)
@pytest.mark.parametrize("dtype,unit_off", [("float32", False), ("bfloat16", False),
                                             pytest.param("bfloat16", True, marks=needs_unit)],
                         ids=["float32", "bfloat16", "bfloat16 without the CPU's bfloat16 unit"])
def test_a_forward_computes_each_token_bitwise_the_same_whatever_tokens_share_it(dtype, unit_off, mixture):
    """What greedy exactness rests on: verifying a tree of N tokens computes each node's logits and
    hidden state bitwise as a forward of fewer tokens, a one-token step included, and of other rows
    (hidden size 576, the default model's: XLA:CPU reduced its norms in one order for fewer than 8
    rows, another from 8; products of more than 64 rows used to go to XLA's matrix multiply). With
    experts too: a token's routing and its experts' products do not depend on the tokens beside it."""
    cfg, params = tiny_model(seed=4, hidden_size=576, head_dim=16, dtype=dtype, **MIXTURES[mixture])
    with rows_matmul.turned_off(unit_only=True) if unit_off else contextlib.nullcontext():
        _, loop, dcfg = gen.decoding_params(params, cfg)
    layers = by_layer(loop)
    assert layers[0]["wqkv"].pairs == (rows_matmul.pairs_layout(dtype) and not unit_off)
    if mixture != "dense":  # the experts and the router go to the kernel
        assert layers[1]["experts_down"].grouped and isinstance(layers[1]["router"], rows_matmul.Packed)
        assert (layers[1]["experts_down"].scales is not None) == (mixture == "MXFP4 experts")
    tokens = jnp.asarray(np.random.default_rng(0).integers(2, cfg.vocab_size, (6, 24)), jnp.int32)
    fwd = jax.jit(model.forward, static_argnums=1)

    def chain(n: int, rows: int):  # 12 tokens in the cache, then n more in one forward under a causal mask
        cache = init_cache(dcfg, rows, 40)
        for lo, hi in ((0, 12), (12, 12 + n)):
            pos = jnp.broadcast_to(jnp.arange(lo, hi), (rows, hi - lo))
            mask = attention_mask(cache, pos, jnp.tril(jnp.ones((hi - lo, hi - lo), bool)))
            f = fwd(loop, dcfg, tokens[:rows, lo:hi], pos, cache, mask)
            cache = commit(f.cache, jnp.full((rows,), hi - lo))
        return np.asarray(f.logits[0]), np.asarray(f.hidden[0])

    logits, hidden = chain(12, 6)  # 72 rows in each product
    for n in (1, 2, 7, 8, 9):
        got_logits, got_hidden = chain(n, 1)
        np.testing.assert_array_equal(got_logits, logits[:n])
        np.testing.assert_array_equal(got_hidden, hidden[:n])


@pytest.mark.parametrize("norm_topk", [True, False])
def test_a_token_routes_bitwise_alike_whatever_tokens_share_its_forward(norm_topk):
    """Up to 600 tokens (a batch's trees, a prefill): XLA:CPU hands larger reductions to YNNPACK, which
    sums in another order and rounds exp otherwise."""
    cfg, _ = tiny_model(num_experts=64, experts_per_token=8, expert_size=8, norm_topk=norm_topk)
    rng = np.random.default_rng(0)
    router = rows_matmul.pack(jnp.asarray(rng.standard_normal((cfg.hidden_size, 64)), jnp.float32))
    x = rng.standard_normal((600, cfg.hidden_size)).astype(np.float32)
    route = jax.jit(lambda x: model.route(x, router, cfg))
    alone = [np.concatenate([np.asarray(a) for a in route(x[i:i + 1])], axis=1) for i in range(8)]
    for n in (2, 8, 600):
        together = np.concatenate([np.asarray(a) for a in route(x[:n])], axis=1)[:8]
        np.testing.assert_array_equal(together, np.concatenate(alone)[:n])


@pytest.mark.parametrize("kernel,dtype", [(True, "float32"), (False, "float32"), (True, "bfloat16"),
                                          pytest.param("no unit", "bfloat16", marks=needs_unit)],
                         ids=["CPU kernels", "XLA products", "CPU kernels, bfloat16 weights",
                              "bfloat16 without the CPU's bfloat16 unit"])
def test_speculative_output_equals_autoregressive_both_ways(kernel, dtype):
    cfg, params = tiny_model(seed=3, head_dim=16, dtype=dtype)  # a head dim the attention kernel takes
    prompts = [[5, 6, 7, 8, 9, 5, 6, 7], [3, 4], [9, 8, 7, 6, 5]]
    spec = SpecConfig(0, 4, lookup_beams=3)

    def run():
        ar = gen.generate(params, cfg, prompts, max_new_tokens=24)
        sp = gen.generate(params, cfg, prompts, max_new_tokens=24, spec=spec)
        return np.asarray(ar.tokens), np.asarray(sp.tokens), np.asarray(sp.accepted)
    if kernel is True:
        ar, sp, acc = run()
    else:
        with rows_matmul.turned_off(unit_only=kernel == "no unit"):
            ar, sp, acc = run()
    np.testing.assert_array_equal(sp, ar)
    assert (acc > 0).any()  # lookup drafts were accepted: the tree verification really ran


def test_a_missing_compiler_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("REDRAFTER_CACHE", str(tmp_path))
    with pytest.raises(OSError, match="no-such-c"):
        rows_matmul._compile()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the x86-64 builds")
@pytest.mark.parametrize("march", ["x86-64-v2", "x86-64-v3", "x86-64-v4", "sapphirerapids"])
def test_every_build_of_the_kernels_compiles_without_a_warning(march):
    """The library is built with warnings off (users cannot act on them), so the sources are kept free of them
    for each vector unit's code (SSE, AVX2, AVX-512, and AVX512-BF16 with AMX): a warning there once hid an
    AVX-512-only bug, arithmetic on a function pointer that crashed every MXFP4 product. Checked with the
    compiler's front end (templates instantiated), which needs no CPU with the unit."""
    sources = [os.path.join(rows_matmul.CSRC, f) for f in rows_matmul.SOURCES]
    command = [rows_matmul.find_compiler(), "-fsyntax-only", f"-march={march}", "-std=c++17", "-Wall", "-Wextra",
               "-Wpointer-arith", "-Wshadow", "-Werror",
               # std::vector<Vec> drops Vec's aligned(4) (csrc/simd.h): its storage gets the vector's own alignment
               "-Wno-ignored-attributes", "-isystem", jax.ffi.include_dir(), *sources]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(platform.machine() != "x86_64" or not rows_matmul.cpu_flags(), reason="an x86-64 Linux CPU")
@pytest.mark.parametrize("march,flag,lanes", [("x86-64-v2", "sse4_2", 4), ("x86-64-v3", "avx2", 8)])
def test_kernels_built_for_a_narrower_vector_unit_compute_the_same(march, flag, lanes, tmp_path):
    """The kernels' blocking follows the vector unit they are built for (csrc/simd.h: floats per register
    and registers): built for SSE's 4 floats or AVX2's 8 (REDRAFTER_CPU_MARCH) on this CPU, the products
    (float32, bfloat16, grouped, MXFP4) and the attention pass their tests as the native build does (a
    width the native build has is tested by the other tests)."""
    if flag not in rows_matmul.cpu_flags():
        pytest.skip(f"this CPU has no {flag}")
    if rows_matmul.vector_lanes() == lanes:
        pytest.skip(f"the native build has {lanes}-float vectors: the other tests ran them")
    tests = ["tests/test_rows_matmul.py", "tests/test_cpu_attention.py", "tests/test_model.py"]
    names = "products_match_float64 or grouped_products or (mxfp4_experts and kernel) or " \
            "matches_the_models_xla_ops or depends_only_on_the_keys"
    env = {**os.environ, "REDRAFTER_CPU_MARCH": march, "REDRAFTER_CACHE": str(tmp_path)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, "-k", names],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "passed" in proc.stdout
    lanes_of = "from redrafter_jax import rows_matmul; print(rows_matmul.vector_lanes())"
    built = subprocess.run([sys.executable, "-c", lanes_of], cwd=root, env=env, capture_output=True, text=True)
    assert built.stdout.split() == [str(lanes)], built.stderr[-2000:]  # the narrower build ran
    assert len(os.listdir(os.path.join(tmp_path, "kernels"))) == 1  # and only it, not a native one
