"""The JAX model on the real SmolLM2 GGUF against independent references."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from redrafter_jax import model, rows_matmul
from redrafter_jax.cache import (
    attention_mask,
    commit,
    flush,
    init_cache,
    scatter_rows,
    window_mask,
    with_pending,
    write,
)
from redrafter_jax.config import QueryScaling, RopeScaling, SpecConfig
from redrafter_jax.decode import round_up
from redrafter_jax.generate import generate
from redrafter_jax.model import forward, forward_causal
from redrafter_jax.mxfp4 import EXPERTS_ORDER, Mxfp4
from tests.reference import GGUFReference
from tests.tiny import TINY as TINY_CFG
from tests.tiny import causal_logits, tiny_model

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def fib(n):\n    return n if n < 2 else",
         "Paris is the capital of"]


def logits_of(smollm, ids: list[int]) -> np.ndarray:
    """The default model's logits [T, V] of one sequence, computed on it padded to 32 tokens (causal: what
    follows a token changes nothing of its logits), so that the texts share one compiled forward (~8 s each)."""
    padded = np.zeros(round_up(len(ids), 32), np.int32)
    padded[:len(ids)] = ids
    return np.asarray(causal_logits(smollm.params, smollm.config, jnp.asarray([padded]))[0, :len(ids)])


@pytest.fixture(scope="module")
def reference(smollm_path):
    return GGUFReference(smollm_path)


@pytest.mark.parametrize("text", TEXTS + ["chat"])
def test_logits_match_numpy_float64_reference(smollm, reference, text):
    """Reference: tests/reference.py, a float64 NumPy forward on the raw GGUF tensors."""
    tok = smollm.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": "Hi!"}]) if text == "chat" else tok.encode(text)
    ours = logits_of(smollm, ids)
    ref = reference.logits(ids)
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=0)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.95


def test_logits_match_transformers(smollm, smollm_path):
    """Reference: Hugging Face transformers' LlamaForCausalLM loading the same GGUF (converted by transformers
    once, then kept as its checkpoint in the cache folder)."""
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from infer.benchmark import load_transformers, transformers_copy

    hf = load_transformers("cpu", gguf=smollm_path)
    assert hf.name_or_path == transformers_copy(smollm_path)
    for text in TEXTS:
        ids = smollm.tokenizer.encode(text)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].double().numpy()
        ours = logits_of(smollm, ids)
        np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=0)


def test_cached_decoding_matches_full_forward(smollm):
    """Prefill part of a sequence into the cache, then feed the rest in two chunks with causal masks."""
    cfg, params = smollm.config, smollm.params
    ids = jnp.asarray([smollm.tokenizer.encode(TEXTS[0])])
    t = ids.shape[1]
    full = logits_of(smollm, ids[0].tolist())
    cache = init_cache(cfg, 1, 32)
    outs = []
    for lo, hi in [(0, 5), (5, 6), (6, t)]:
        pos = jnp.arange(lo, hi)[None]
        mask = attention_mask(cache, pos, jnp.tril(jnp.ones((hi - lo, hi - lo), bool)))
        f = forward(params, cfg, ids[:, lo:hi], pos, cache, mask)
        cache = commit(f.cache, jnp.asarray([hi - lo]))
        outs.append(f.logits[0])
    np.testing.assert_allclose(np.concatenate(outs), full, atol=2e-4, rtol=0)  # logits ~20: float32 sums
    with pytest.raises(ValueError, match=f"KV cache overflow: writing would need {t + 30} slots but max_len is 32"):
        forward(params, cfg, jnp.zeros((1, 30), jnp.int32), jnp.arange(t, t + 30)[None], cache,
                attention_mask(cache, jnp.arange(t, t + 30)[None], jnp.tril(jnp.ones((30, 30), bool))))


def test_random_draws_are_jax_randoms_from_a_few_compiled_samplers():
    """`model.random_values` (what init_params and init_drafter draw with) gives jax.random's values for the
    shape, computed as the prefix of a draw of a rounded-up length; shapes of one such length share a sampler."""
    key = jax.random.PRNGKey(4)
    scaled = jax.jit(lambda k, shape: 0.5 * jax.random.normal(k, shape), static_argnums=1)
    for shape in [(1,), (3, 5), (64, 2, 7), (1000,)]:
        np.testing.assert_array_equal(model.random_values(scaled, key, shape), 0.5 * jax.random.normal(key, shape))
    np.testing.assert_array_equal(model.random_values(lambda k, s: jax.random.randint(k, s, 0, 256), key, (6, 9)),
                                  jax.random.randint(key, (6, 9), 0, 256))
    before = scaled._cache_size()
    for shape in [(5, 8), (4, 11), (48,)]:  # 40, 44, 48 values: all drawn as 48
        model.random_values(scaled, key, shape)
    assert scaled._cache_size() == before + 1
    assert [model.half_octave(n) for n in (1, 2, 3, 5, 7, 9, 13, 100, 4096, 4097)] == [
        1, 2, 3, 6, 8, 12, 16, 128, 4096, 6144]


@pytest.mark.parametrize("change, match", [
    (dict(num_kv_heads=3), r"num_heads \(4\) is not a multiple of num_kv_heads \(3\)"),
    (dict(head_dim=7), "head_dim must be even"),
    (dict(sliding_window=0), "sliding_window must be positive"),
    (dict(window_layers=(1,)), "window_layers and window_chunks need a sliding_window"),
    (dict(window_chunks=True), "window_layers and window_chunks need a sliding_window"),
    (dict(qk_norm="l2"), "qk_norm must be None, 'head', 'per_head', 'all' or 'unweighted'"),
    (dict(query_scaling=(0.1, 8)), "query_scaling must be a QueryScaling"),
    (dict(sliding_window=4, window_layers=(1, 0)), r"window_layers must be distinct layer indices in \[0, 2\)"),
    (dict(nope_layers=(2,)), r"nope_layers must be distinct layer indices in \[0, 2\) in order, got \(2,\)"),
    (dict(parallel_block=True, post_norms=True), "parallel_block needs pre_norms and no post_norms"),
    (dict(rotary_dim=5), r"rotary_dim must be even and in \[2, head_dim = 8\], got 5"),
    (dict(rotary_dim=4, rope_scaling=RopeScaling("factors", factors=(1.0, 2.0, 3.0))),
     r"3 RoPE frequency factors for 4 rotated dimensions of a head \(2 frequencies\)"),
    (dict(num_experts=4, experts_per_token=5, expert_size=8), "needs 1 <= experts_per_token <= num_experts"),
    (dict(num_experts=4, experts_per_token=2), "and a positive expert_size"),
    (dict(expert_size=8), "need num_experts > 0"),
    (dict(num_experts=4, experts_per_token=2, expert_size=8, moe_layers=(0, 0)), "moe_layers must be distinct"),
    (dict(routing="sigmoid_bias"), "routing must be 'softmax', 'sigmoid_input' or 'sigmoid'"),
    (dict(num_experts=4, experts_per_token=1, expert_size=8, expert_groups=2), "expert_groups, .* go with sigmoid"),
    (dict(num_experts=6, experts_per_token=1, expert_size=8, routing="sigmoid", expert_groups=4),
     "6 experts in expert_groups 4"),
    (dict(num_experts=4, experts_per_token=1, expert_size=8, routing="sigmoid", expert_groups=4),
     r"each of at least 2 experts"),
    (dict(num_experts=8, experts_per_token=1, expert_size=8, routing="sigmoid", expert_groups=4,
          expert_groups_kept=5), "of which expert_groups_kept 5 are kept"),
    (dict(num_experts=8, experts_per_token=5, expert_size=8, routing="sigmoid", expert_groups=4,
          expert_groups_kept=2), "must hold experts_per_token 5"),
    (dict(num_experts=4, experts_per_token=1, expert_size=8, routing="sigmoid_input", norm_topk=True),
     "norm_topk .* goes with softmax or sigmoid routing"),
    (dict(hidden_act="clamped_swiglu", gated_mlp=False), "clamped_swiglu is a gated MLP's"),
    (dict(hidden_act="xielu"), "xielu is an ungated MLP's"),
    (dict(gated_mlp=False, num_experts=4, experts_per_token=2, expert_size=8), "ungated MLPs .* are dense"),
    (dict(norm_bias=True, post_norms=True), "norm_bias .* goes without post_norms"),
])
def test_model_config_refuses_settings_it_cannot_mean(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY_CFG, **change)


@pytest.mark.parametrize("kwargs", [dict(beta=-0.1, period=4), dict(beta=0.1, period=0),
                                    dict(beta=0.1, period=4.5), dict(beta=0.1, period=4, offset=-1)])
def test_query_scaling_refuses_settings_it_cannot_mean(kwargs):
    with pytest.raises(ValueError, match="query scaling needs beta >= 0, a positive period and an offset >= 0"):
        QueryScaling(**kwargs)


@pytest.mark.parametrize("seed", range(20))
def test_attention_mask_over_cache_and_tree_matches_reference(seed):
    """New tokens sit at slots lengths[b] + j but at their own (tree) positions; a sliding window
    counts positions, not slots."""
    rng = np.random.default_rng(seed)
    b, t, s = 3, int(rng.integers(1, 6)), 16
    lengths = rng.integers(0, s - t + 1, b)
    parent = [-1] + [int(rng.integers(0, j)) for j in range(1, t)]  # a random tree, nodes in depth order
    depth, tree = np.zeros(t, int), np.eye(t, dtype=bool)
    for j in range(1, t):
        depth[j], tree[j] = depth[parent[j]] + 1, tree[parent[j]] | np.eye(t, dtype=bool)[j]
    positions = lengths[:, None] + depth[None]
    window = None if seed % 3 == 0 else int(rng.integers(1, 5))
    cache = init_cache(TINY_CFG, b, s).replace(lengths=jnp.asarray(lengths, jnp.int32))
    pos = jnp.asarray(positions, jnp.int32)
    got = np.asarray(attention_mask(cache, pos, jnp.asarray(tree)))
    if window is not None:
        got = got & np.asarray(window_mask(cache, pos, window))
    want = np.zeros((b, t, s), bool)
    for r, i, slot in np.ndindex(b, t, s):
        j = slot - lengths[r]
        if j < 0:
            key_pos, seen = slot, True
        elif j < t:
            key_pos, seen = positions[r, j], tree[i, j]
        else:
            continue
        want[r, i, slot] = seen and (window is None or positions[r, i] - key_pos < window)
    np.testing.assert_array_equal(got, want)


def test_scatter_rows_puts_each_row_head_and_token_at_its_slot():
    layers, b, heads, s, d, t = 2, 3, 2, 9, 4, 3
    rng = np.random.default_rng(1)
    buf = rng.normal(size=(layers, b, heads, s, d)).astype(np.float32)
    new = rng.normal(size=(layers, b, t, heads, d)).astype(np.float32)
    slots = np.array([[0, 1, 2], [5, 4, 8], [7, 8, 9]])  # any order; slot 9 is past the end: dropped
    want = buf.copy()
    for r, i in np.ndindex(b, t):
        if slots[r, i] < s:
            want[:, r, :, slots[r, i]] = new[:, r, i]
    np.testing.assert_array_equal(np.asarray(scatter_rows(jnp.asarray(buf), jnp.asarray(new), jnp.asarray(slots))),
                                  want)
    one = scatter_rows(jnp.asarray(buf), jnp.asarray(new[1]), jnp.asarray(slots), layer=1)
    np.testing.assert_array_equal(np.asarray(one[1]), want[1])
    np.testing.assert_array_equal(np.asarray(one[0]), buf[0])


def test_cache_never_writes_past_max_len(smollm):
    cfg = smollm.config
    cache = init_cache(cfg, 2, 8, pending=6)
    six = (cfg.num_layers, 2, 6, cfg.num_kv_heads, cfg.head_dim)
    cache = flush(write(cache, jnp.ones(six), jnp.ones(six), jnp.asarray([6, 3])))
    with pytest.raises(ValueError, match="KV cache overflow: writing would need 10 slots but max_len is 8"):
        write(cache, jnp.zeros(six), jnp.zeros(six), jnp.asarray([4, 1]))
    with pytest.raises(ValueError, match="write on a cache with pending entries"):
        write(write(cache, jnp.zeros(six), jnp.zeros(six), jnp.asarray([1, 1])), jnp.zeros(six), jnp.zeros(six),
              jnp.asarray([1, 1]))
    # Under jit (no check possible) the part of a write past the end is dropped, not clamped back onto
    # valid slots as a dynamic_update_slice would; entries past num_new are not written at all.
    after = flush(jax.jit(write)(cache, 2 * jnp.ones(six), 2 * jnp.ones(six), jnp.asarray([3, 1])))
    np.testing.assert_array_equal(np.asarray(after.k[:, 0, :, :6]), 1.0)
    np.testing.assert_array_equal(np.asarray(after.k[:, 0, :, 6:]), 2.0)
    np.testing.assert_array_equal(np.asarray(after.v[:, 1, :, :3]), 1.0)
    np.testing.assert_array_equal(np.asarray(after.v[:, 1, :, 3]), 2.0)
    np.testing.assert_array_equal(np.asarray(after.v[:, 1, :, 4:]), 0.0)
    assert after.lengths.tolist() == [9, 4]


def test_forward_writes_pending_entries_before_attending(smollm):
    """Entries made valid by `write` reach the buffers only with the next forward, which must write
    them before any layer reads: its logits then match a plain causal forward. The buffers' copies
    of those slots are zeroed first, so only the pending entries can supply them."""
    cfg, params = smollm.config, smollm.params
    ids = jnp.asarray([smollm.tokenizer.encode(TEXTS[0])])
    t = ids.shape[1]
    full = forward_causal(params, cfg, ids).logits[0]
    def causal(n):
        return jnp.tril(jnp.ones((n, n), bool))

    cache = init_cache(cfg, 1, 32)  # a prefill's: no room for pending entries, given room after it (as `decode.start`)
    pos = jnp.arange(5)[None]
    cache = commit(forward(params, cfg, ids[:, :5], pos, cache, attention_mask(cache, pos, causal(5))).cache, 5)
    cache = with_pending(cache, 3)
    pos = jnp.arange(5, 8)[None]
    f = forward(params, cfg, ids[:, 5:8], pos, cache, attention_mask(cache, pos, causal(3)))
    cache = write(f.cache.replace(k=f.cache.k.at[:, :, :, 5:].set(0), v=f.cache.v.at[:, :, :, 5:].set(0)),
                  f.k, f.v, jnp.asarray([2]))  # tokens 5 and 6 valid, pending
    pos = jnp.arange(7, t)[None]
    f = forward(params, cfg, ids[:, 7:], pos, cache, attention_mask(cache, pos, causal(t - 7)))
    np.testing.assert_allclose(f.logits[0], full[7:], atol=2e-4, rtol=0)
    assert f.cache.pending_slots.tolist() == [[32, 32, 32]]


def test_a_long_forward_attends_in_query_blocks_as_in_one(monkeypatch):
    """More than QUERY_BLOCK new tokens attend a block at a time (a long prompt's scores were quadratic in
    it): the logits are those of one block of all, and a prompt that long decodes as the uncached forward."""
    cfg, params = tiny_model(max_position_embeddings=4096)
    tokens = jnp.asarray(np.random.default_rng(0).integers(2, cfg.vocab_size, (2, 2 * model.QUERY_BLOCK + 37)))

    def traced_and_run():  # a new function each time (make_jaxpr keeps a function's traces): QUERY_BLOCK is read
        program = jax.make_jaxpr(lambda t: forward_causal(params, cfg, t).logits)(tokens)
        return str(program), forward_causal(params, cfg, tokens).logits

    program, blocked = traced_and_run()
    assert "scan" in program  # the blocks' loop
    monkeypatch.setattr(model, "QUERY_BLOCK", tokens.shape[1])
    program, whole = traced_and_run()
    assert "scan" not in program
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    prompt = np.asarray(tokens[0, :model.QUERY_BLOCK + 100]).tolist()
    out = generate(params, cfg, [prompt], max_new_tokens=6, prompt_bucket=64)
    gen = np.asarray(out.tokens[0, :out.lengths[0]]).tolist()
    want = forward_causal(params, cfg, jnp.asarray([prompt + gen])).logits[0, len(prompt) - 1:-1]
    assert gen == np.asarray(jnp.argmax(want, axis=-1)).tolist()


def experts_reference(x, p, k, renormalise, limit=None, alpha=1.702, on_input=False, groups=None):
    """NumPy float64, token by token: softmax over every expert (router logits plus any bias), the k
    likeliest (renormalised or not), their MLPs' outputs (SwiGLU, or with a `limit` GPT-OSS's clamped
    one; any biases added) summed by those weights; `on_input` (Llama 4's): the k largest logits'
    sigmoids weigh each expert's input instead, the outputs summed as they are; `groups` (DeepSeek-V3's
    (groups, kept, scale)): the k largest sigmoids plus router_correction among the experts of the `kept`
    groups whose two largest sum most, weighted by their sigmoids (renormalised or not) times `scale`."""
    x = np.asarray(x, np.float64)
    p = {name: np.asarray(a, np.float64) for name, a in p.items()}
    e, _, _, f = p["experts_gate_up"].shape
    bias = {name: p.get(name, np.zeros(shape)) for name, shape in (
        ("router_bias", e), ("experts_gate_up_bias", (e, 2, f)), ("experts_down_bias", (e, x.shape[1])))}
    out = np.zeros_like(x)
    for n, row in enumerate(x):
        logits = row @ p["router"] + bias["router_bias"]
        q = np.exp(logits - logits.max())
        q /= q.sum()
        top = np.argsort(-q)[:k]
        w = q[top] / q[top].sum() if renormalise else q[top]
        if on_input:
            w = 1 / (1 + np.exp(-logits[top]))
        if groups is not None:
            n_groups, kept, scale = groups
            sig = 1 / (1 + np.exp(-logits))
            choice = sig + p["router_correction"]
            best = np.sort(choice.reshape(n_groups, -1), axis=1)[:, -2:].sum(1)
            allowed = np.repeat(np.isin(np.arange(n_groups), np.argsort(-best)[:kept]), len(choice) // n_groups)
            top = np.argsort(-np.where(allowed, choice, -np.inf))[:k]
            w = (sig[top] / sig[top].sum() if renormalise else sig[top]) * scale
        for e, we in zip(top, w):
            g, u = np.einsum("h,hcf->cf", we * row if on_input else row, p["experts_gate_up"][e]) \
                + bias["experts_gate_up_bias"][e]
            if limit is None:
                hidden = g / (1 + np.exp(-g)) * u
            else:
                g = np.minimum(g, limit)
                hidden = g / (1 + np.exp(-alpha * g)) * (np.clip(u, -limit, limit) + 1)
            out[n] += (1 if on_input else we) * (hidden @ p["experts_down"][e] + bias["experts_down_bias"][e])
    return out


@pytest.mark.parametrize("way", ["tiles", "XLA", "kernel"])
@pytest.mark.parametrize("renormalise,gpt_oss,llama4,deepseek", [
    (False, False, False, False), (True, False, False, False), (True, True, False, False),
    (False, False, True, False), (True, False, False, True)])
def test_experts_each_way_match_a_token_by_token_reference(renormalise, gpt_oss, llama4, deepseek, way):
    """The CPU's expert tiles (of 1, 2 and 16 rows here, most experts' last tile padded, and with most rows on
    one expert and some experts without any), elsewhere's gathered experts for a few tokens and grouped
    products (`lax.ragged_dot`) for many, or the CPU decode loops' rows kernel on packed experts (and
    router), give each token the reference's mixture, whichever other tokens share the call; with
    GPT-OSS's router and expert biases and clamped SwiGLU too (a limit of 1 clamps many gates and ups),
    with Llama 4's sigmoid weights on the experts' inputs, and with DeepSeek-V3's routing (sigmoids, the
    choice corrected by a bias per expert, in the best 2 of 4 groups, scaled)."""
    e, h, f, k = 8, 16, 12, 3
    rng = np.random.default_rng(0)
    p = {"router": rng.normal(0, 1, (h, e)), "experts_gate_up": rng.normal(0, 0.3, (e, h, 2, f)),
         "experts_down": rng.normal(0, 0.3, (e, f, h))}
    if gpt_oss:
        p.update(router_bias=rng.normal(0, 1, e), experts_gate_up_bias=rng.normal(0, 1, (e, 2, f)),
                 experts_down_bias=rng.normal(0, 1, (e, h)))
    groups = (4, 2, 2.5) if deepseek else None
    if deepseek:
        p["router_correction"] = rng.normal(0, 0.5, e)
    p = {name: jnp.asarray(a, jnp.float32) for name, a in p.items()}
    routing = "sigmoid_input" if llama4 else "sigmoid" if deepseek else "softmax"
    cfg = dataclasses.replace(TINY_CFG, num_experts=e, experts_per_token=k, expert_size=f, norm_topk=renormalise,
                              expert_bias=gpt_oss, swiglu_limit=1.0, routing=routing,
                              hidden_act="clamped_swiglu" if gpt_oss else "silu",
                              **dict(zip(("expert_groups", "expert_groups_kept", "routed_scaling"), groups or ())))
    x = jnp.asarray(rng.normal(0, 1, (7, h)), jnp.float32)
    want = experts_reference(x, p, k, renormalise, 1.0 if gpt_oss else None, on_input=llama4, groups=groups)
    skewed = jnp.asarray(rng.normal(0, 1, (60, h)) + 3 * p["router"][:, 0], jnp.float32)  # most to expert 0
    assert np.bincount(np.argmax(skewed @ p["router"], axis=1), minlength=e)[0] > 40
    if llama4:  # weighing the inputs is not weighing the outputs
        assert not np.allclose(want, experts_reference(x, p, k, renormalise), atol=1e-3)
    if deepseek:  # the groups and the correction matter
        assert not np.allclose(want, experts_reference(x, p, k, renormalise, groups=(1, 1, 2.5)))
        assert not np.allclose(want, experts_reference(x, {**p, "router_correction": 0 * p["router_correction"]},
                                                       k, renormalise, groups=groups))
    if gpt_oss:  # the biases and the clamps matter
        assert not np.allclose(want, experts_reference(x, {n: p[n] for n in ("router", "experts_gate_up",
                                                                                "experts_down")}, k, renormalise))
        assert not np.allclose(want, experts_reference(x, p, k, renormalise, 100.0))

    tiles, used = way == "tiles", p
    if way == "kernel":
        if not rows_matmul.available():
            pytest.skip("no C++ compiler for the CPU rows kernel")
        used = model.pack_layer(p)  # as the decode loops pack them: the router too

    def mixture(rows):
        weights, experts = model.route(rows, used["router"], cfg, p.get("router_bias"), p.get("router_correction"))
        return model.experts_mlp(rows, experts, weights, used, cfg,
                                 model.expert_tiles if tiles else model.ragged_experts)

    for rows in (x[:2], x[:3], x):  # 2 x 3 < 8 pairs (else gathered) and 3 x 3: tiles of 1; 7 x 3: tiles of 2
        np.testing.assert_allclose(np.asarray(mixture(rows)), want[:len(rows)], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(mixture(skewed)),  # 60 x 3 pairs over 8 experts: tiles of 16
                               experts_reference(skewed, p, k, renormalise, 1.0 if gpt_oss else None, on_input=llama4,
                                                 groups=groups),
                               rtol=1e-5, atol=1e-5)
    jaxprs = [str(jax.make_jaxpr(mixture)(rows)) for rows in (x[:2], x)]
    assert all(("scan" in j) == tiles for j in jaxprs)
    assert "ragged_dot" not in jaxprs[0] and ("ragged_dot" in jaxprs[1]) == (way == "XLA")
    assert all((rows_matmul.TARGETS[jnp.dtype(jnp.float32)] in j) == (way == "kernel") for j in jaxprs)


@pytest.mark.parametrize("way", ["tiles", "XLA", "kernel"])
def test_mxfp4_experts_compute_as_their_dequantized_weights(way):
    """Experts kept in MXFP4 give, in the CPU's tiles (one expert dequantized per tile), elsewhere's ways
    (gathered for a few tokens, the layer dequantized for many) or the CPU rows kernel's MXFP4 tiles, the
    mixture of the same weights dequantized (the kernel: bitwise its float32 products)."""
    e, h, f, k = 8, 32, 64, 3
    rng = np.random.default_rng(1)
    quantized = {name: Mxfp4(jnp.asarray(rng.integers(0, 256, (*stored, 16)), jnp.uint8),
                             jnp.asarray(rng.integers(120, 125, stored), jnp.uint8), EXPERTS_ORDER[name])
                 for name, stored in (("experts_gate_up", (e, 2, f, h // 32)), ("experts_down", (e, h, f // 32)))}
    dequantized = {name: w.dequantize(jnp.float32) for name, w in quantized.items()}
    assert dequantized["experts_gate_up"].shape == (e, h, 2, f) and dequantized["experts_down"].shape == (e, f, h)
    cfg = dataclasses.replace(TINY_CFG, num_experts=e, experts_per_token=k, expert_size=f, norm_topk=True)
    router = jnp.asarray(rng.normal(0, 1, (h, e)), jnp.float32)
    x = jnp.asarray(rng.normal(0, 1, (7, h)), jnp.float32)
    grouped = model.expert_tiles if way == "tiles" else model.ragged_experts
    same = np.testing.assert_allclose
    if way == "kernel":
        if not rows_matmul.available():
            pytest.skip("no C++ compiler for the CPU rows kernel")
        quantized, dequantized = model.pack_layer(quantized), model.pack_layer(dequantized)
        same = np.testing.assert_array_equal
    for rows in (x[:2], x):  # (gathered, grouped)
        weights, experts = model.route(rows, router, cfg)
        same(np.asarray(model.experts_mlp(rows, experts, weights, quantized, cfg, grouped)),
             np.asarray(model.experts_mlp(rows, experts, weights, dequantized, cfg, grouped)),
             **({} if way == "kernel" else dict(rtol=1e-6, atol=1e-6)))


def test_moe_model_decodes_as_its_uncached_forward():
    """A tiny mixture of experts (one MoE layer with a shared expert beside a dense layer) decodes greedily
    as the argmax of its uncached forward, and lookup-speculatively as greedily, in batches of two (a
    step's 2 x 2 (token, expert) pairs of 8 experts gathered, a tree's and the forward's grouped)."""
    cfg, params = tiny_model(num_experts=8, experts_per_token=2, expert_size=16, moe_layers=(1,),
                             shared_expert_size=8, norm_topk=True)
    assert "router" in params["layers"][1] and "router" not in params["layers"][0]
    prompts = [[5, 9, 3, 9, 3, 9, 3], [7, 8, 2]]
    ar = generate(params, cfg, prompts, max_new_tokens=8)
    for row, prompt in enumerate(prompts):
        tokens = np.asarray(ar.tokens[row, :ar.lengths[row]]).tolist()
        logits = causal_logits(params, cfg, jnp.asarray([prompt + tokens]))[0]
        assert tokens == np.asarray(jnp.argmax(logits[len(prompt) - 1:-1], axis=-1)).tolist()
    spec = generate(params, cfg, prompts, max_new_tokens=8, spec=SpecConfig.parse("0x4+2"))
    np.testing.assert_array_equal(np.asarray(spec.tokens), np.asarray(ar.tokens))
