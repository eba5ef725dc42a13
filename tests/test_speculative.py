"""Speculative greedy decoding on the real SmolLM2: exactness, acceptance machinery, one compiled loop."""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from redrafter_jax import datastore, rows_matmul
from redrafter_jax import generate as gen
from redrafter_jax.checkpoint import load_drafter
from redrafter_jax.cli import DEFAULT_DRAFTER
from redrafter_jax.config import DrafterConfig, SamplingConfig, SpecConfig
from redrafter_jax.decode import cache_len, prepare_prompts
from redrafter_jax.drafter import Drafter, init_drafter
from redrafter_jax.oracle import OracleDrafter
from redrafter_jax.sampling import Sampling

MAX_NEW = 40


def rows(out):
    return [np.asarray(out.tokens[b, : out.lengths[b]]).tolist() for b in range(out.tokens.shape[0])]


@pytest.fixture(scope="module")
def drafter(smollm):
    """The committed drafter, trained for this model: it drafts tokens that are accepted and tokens that are
    not, so the trees below are walked both ways."""
    return load_drafter(DEFAULT_DRAFTER, smollm.config)


@pytest.fixture(scope="module")
def greedy_reference(smollm, chat_prompts):
    """Autoregressive greedy output of the four chat prompts; some rows end by EOS, some by length."""
    out = rows(gen.generate(smollm.params, smollm.config, chat_prompts, max_new_tokens=MAX_NEW))
    by_eos = [r[-1] in smollm.config.eos_token_ids for r in out]
    assert any(by_eos) and not all(by_eos)
    return out


# None: generate's default for 4 rows (4 x 3 + 1 x 8 in 4 slots, fewer than the lookup beam's length); then
# one beam, many, a budget below the beams' nodes, lookup beams alone, and drafter and lookup beams together
@pytest.mark.parametrize("spec", [None, SpecConfig(1, 2), SpecConfig(16, 3),
                                  SpecConfig(8, 5, tree_budget=12), SpecConfig(0, 5, lookup_beams=1),
                                  SpecConfig(1, 3, lookup_beams=2, lookup_length=6),
                                  SpecConfig(4, 4, lookup_beams=4, tree_budget=12),
                                  SpecConfig(2, 6, lookup_beams=1, lookup_length=8, tree_budget=6),
                                  SpecConfig.parse("3x4+1x6:5")],
                         ids=lambda s: "default" if s is None else s.describe())
def test_output_equals_autoregressive_and_drafts_are_accepted(smollm, chat_prompts, greedy_reference, drafter, spec):
    drafter = drafter if spec is None or spec.beam_width else None  # beam_width 0: lookup beams only
    out = gen.generate(smollm.params, smollm.config, chat_prompts, max_new_tokens=MAX_NEW, drafter=drafter, spec=spec)
    assert rows(out) == greedy_reference
    acc = np.asarray(out.accepted)
    assert acc[acc >= 0].mean() > (0.3 if drafter else 0.1)  # an untrained drafter's beams are almost never accepted
    if spec is not None and spec.lookup_beams == 2:  # lookup history is per row: a row alone decodes as in the batch
        single = gen.generate(smollm.params, smollm.config, chat_prompts[:1], max_new_tokens=MAX_NEW,
                              drafter=drafter, spec=spec)
        assert rows(single) == greedy_reference[:1]


def oracle(smollm, prompts, continuations, wrong=False):
    seqs = np.zeros((len(prompts), 512), np.int32)
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        seqs[i, : len(p) + len(c)] = p + c
    return OracleDrafter(jnp.asarray(seqs), smollm.config.vocab_size, wrong=wrong)


# 4 x 5/8: 17 nodes verified in 24 slots, the last 7 padding
@pytest.mark.parametrize("spec", [SpecConfig(4, 5), SpecConfig(2, 3), SpecConfig(4, 5, slot_multiple=8)],
                         ids=SpecConfig.describe)
def test_oracle_drafter_accepts_everything(smollm, chat_prompts, greedy_reference, spec):
    out = gen.generate(smollm.params, smollm.config, chat_prompts, max_new_tokens=MAX_NEW,
                       drafter=oracle(smollm, chat_prompts, greedy_reference), spec=spec)
    assert rows(out) == greedy_reference
    acc = np.asarray(out.accepted)
    for r in range(len(chat_prompts)):
        steps = acc[r][acc[r] >= 0]
        assert len(steps) >= 1 and (steps[:-1] == spec.beam_length - 1).all(), steps
        # every step emits n + 1 tokens; the first token comes from the prefill
        assert 1 + np.sum(steps + 1) >= len(greedy_reference[r])
    assert int(out.num_steps) == max(len(a[a >= 0]) for a in acc)


def test_always_wrong_drafter_accepts_nothing_and_is_still_exact(smollm, chat_prompts, greedy_reference):
    out = gen.generate(smollm.params, smollm.config, chat_prompts, max_new_tokens=MAX_NEW,
                       drafter=oracle(smollm, chat_prompts, greedy_reference, wrong=True), spec=SpecConfig(4, 4))
    assert rows(out) == greedy_reference
    acc = np.asarray(out.accepted)
    assert (acc[acc >= 0] == 0).all()
    assert int(out.num_steps) == MAX_NEW - 1  # one token per step after the prefill's


def _primitives(jaxpr, out):
    for eqn in jaxpr.eqns:
        out.append(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _primitives(sub, out)
    return out


def test_decode_loop_is_one_compiled_while_loop_without_host_transfers(smollm, chat_prompts, drafter):
    cfg = smollm.config
    block, lengths, limits = prepare_prompts(cfg, chat_prompts, 8)
    spec = SpecConfig(4, 4, lookup_beams=2, datastore_beams=1)  # every proposer inside the one loop
    store = datastore.build([(np.array(p), np.ones(len(p))) for p in chat_prompts], [])
    kwargs = dict(cfg=cfg, sampling=Sampling.of(SamplingConfig()), spec=spec, max_new_tokens=8, stream=None)
    args = jax.device_put((smollm.params, gen.decoding_params(smollm.params, cfg).loop, drafter, store, block,
                           lengths, limits, jax.random.PRNGKey(0)))
    prefill = lambda: gen._prefill_jit(args[0], cfg=cfg, prompts=args[4], prompt_lengths=args[5],  # noqa: E731
                                       max_len=cache_len(block.shape[1], 8, spec.slots))
    cache, *first = jax.eval_shape(prefill)
    prims = _primitives(jax.make_jaxpr(lambda *a: gen._speculative(*a, **kwargs))(cache, first, *args).jaxpr, [])
    assert prims.count("while") == 1
    assert not [p for p in prims if "callback" in p]
    with jax.transfer_guard("disallow"):  # the prefill and the loop
        cache, *first = prefill()
        jax.block_until_ready(gen._speculative_jit(cache, first, *args, **kwargs))


def test_bad_drafter_or_settings_raise(smollm, chat_prompts):
    cfg, params = smollm.config, smollm.params
    for dcfg, match in [(DrafterConfig(hidden_size=64, vocab_size=cfg.vocab_size), "hidden size 64 does not match"),
                        (DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=100), "vocabulary 100 does not match")]:
        bad = Drafter(init_drafter(dcfg, jax.random.PRNGKey(0)), dcfg)
        with pytest.raises(ValueError, match=match):
            gen.generate(params, cfg, chat_prompts[:1], max_new_tokens=4, drafter=bad)


def test_datastore_beams_are_exact_and_accepted(smollm, chat_prompts, greedy_reference):
    """A datastore of the target's own replies to three of the prompts: its beams copy those replies (many
    tokens a step) and change nothing in any output, the fourth prompt's included."""
    seqs = [(np.array(p + r), np.r_[np.zeros(len(p)), np.ones(len(r))]) for p, r in zip(chat_prompts, greedy_reference)]
    store = datastore.build(seqs[1:], seqs[:1])
    out = gen.generate(smollm.params, smollm.config, chat_prompts, max_new_tokens=MAX_NEW,
                       spec=SpecConfig.parse("0x8+1+1x8ds:7"), datastore=store)
    assert rows(out) == greedy_reference
    acc = np.asarray(out.accepted)[1:]
    assert acc[acc >= 0].mean() > 2


def test_bfloat16_weights_on_the_cpu_kernels_decode_exactly(smollm):
    """bfloat16 weights: the CPU kernels widen them to float32 and sum each row in one fixed order, so
    the tree verification agrees with the one-token step. (XLA's bfloat16 products, with
    REDRAFTER_CPU_KERNEL=0, diverge on most of these prompts within 64 tokens.)"""
    if not rows_matmul.available():
        pytest.skip("no C++ compiler for the CPU kernels")
    cfg = dataclasses.replace(smollm.config, dtype="bfloat16")
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), smollm.params)
    packed = jax.tree_util.tree_leaves(gen.decoding_params(params, cfg).loop,
                                       is_leaf=lambda x: isinstance(x, rows_matmul.Packed))
    assert {w.tiles.dtype for w in packed if isinstance(w, rows_matmul.Packed)} == {jnp.dtype(jnp.bfloat16)}
    questions = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
                 "Describe a busy train station at rush hour, using sounds, smells and colours.",
                 "Write a friendly letter inviting a neighbour to a community garden day.",
                 "Explain to a child why the sky is blue, with an everyday comparison."]
    prompts = [smollm.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in questions]
    drafter = load_drafter(DEFAULT_DRAFTER, cfg)
    ar = rows(gen.generate(params, cfg, prompts, max_new_tokens=64))
    out = gen.generate(params, cfg, prompts, max_new_tokens=64, drafter=drafter, spec=SpecConfig.parse("4x3+1x8:7"))
    assert rows(out) == ar
    acc = np.asarray(out.accepted)
    assert acc[acc >= 0].mean() > 0.3
    made = gen._DECODING[id(jax.tree_util.tree_leaves(drafter.params)[0])][1]  # what generate() packed
    # the drafter's matrices in bfloat16 as well
    assert list(made) == [("bfloat16", rows_matmul.pairs_layout(jnp.bfloat16))]
