"""Speculative sampling preserves the target distribution (statistical tests on a tiny model), and
Apple's rule, run through the same test, is caught being biased."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from redrafter_jax import datastore
from redrafter_jax.config import DrafterConfig, SamplingConfig, SpecConfig
from redrafter_jax.drafter import Drafter, init_drafter
from redrafter_jax.generate import generate
from redrafter_jax.sampling import argmax, draw, select, target_log_probs
from redrafter_jax.tree import ABSENT
from tests.tiny import causal_logits, exact_next_token_probs, tiny_model

V = 8
PROMPT = [3, 4, 5]
N_SAMPLES = 20000
ALPHA = 1e-3  # significance level of each goodness-of-fit test (fixed seeds: deterministic outcome)


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=3, vocab_size=V, scale=0.35, eos_token_ids=())


def random_drafter(cfg):
    dcfg = DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=V, num_resblocks=1)
    params = init_drafter(dcfg, jax.random.PRNGKey(7))
    params["lm_head"] = params["lm_head"] * 4.0  # confident drafts, as a trained drafter makes
    return Drafter(params, dcfg)


def adversarial_drafter(cfg, params):
    """Proposes the target's least likely tokens: its logits are minus the target's at the context."""
    h = cfg.hidden_size
    dcfg = DrafterConfig(hidden_size=h, vocab_size=V, rnn=False, num_resblocks=0, exit_dim=h)
    dparams = {"resblocks": [], "proj_w": jnp.concatenate([jnp.eye(h), jnp.zeros((h, h))]),
               "proj_b": jnp.zeros(h), "lm_head": -params["lm_head"]}
    return Drafter(dparams, dcfg)


def exact_joint(cfg, params, sampling, k=3):
    """P(first k tokens) enumerated from the target with the independent NumPy sampling filter."""
    probs = {}
    for prefix_len in range(k):
        prefixes = list(itertools.product(range(V), repeat=prefix_len))
        seqs = jnp.asarray([PROMPT + list(p) for p in prefixes])
        logits = np.asarray(causal_logits(params, cfg, seqs)[:, -1])
        for p, lg in zip(prefixes, logits):
            probs[p] = exact_next_token_probs(lg, sampling.temperature, sampling.top_k, sampling.top_p,
                                              sampling.min_p)
    joint = np.zeros((V,) * k)
    for seq in itertools.product(range(V), repeat=k):
        joint[seq] = np.prod([probs[seq[:i]][seq[i]] for i in range(k)])
    return joint.reshape(-1)


def goodness_of_fit(counts, expected_p):
    """Chi-square p-value, cells with expected count < 5 pooled; counts outside the support fail at once."""
    n = counts.sum()
    if counts[expected_p == 0].sum() > 0:
        return 0.0
    exp = n * expected_p
    small = exp < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(exp[~small], exp[small].sum())
    keep = exp > 0
    return stats.chisquare(obs[keep], exp[keep]).pvalue


def sample_first_tokens(cfg, params, drafter, sampling, spec, seed=0, k=3, batch_size=None, store=None):
    out = generate(params, cfg, [PROMPT] * N_SAMPLES, max_new_tokens=k, sampling=sampling,
                   key=jax.random.PRNGKey(seed), drafter=drafter, spec=spec, batch_size=batch_size,
                   datastore=store)
    toks = np.asarray(out.tokens)
    assert (np.asarray(out.lengths) == k).all()
    return np.bincount(np.ravel_multi_index(toks.T, (V,) * k), minlength=V ** k), out


SAMPLINGS = [SamplingConfig(0.5), SamplingConfig(1.0), SamplingConfig(1.5), SamplingConfig(1.0, top_p=0.9),
             SamplingConfig(1.0, top_k=3), SamplingConfig(1.0, min_p=0.2)]


# Each drafter kind at two samplings and each sampling with one or two kinds (the full grid adds ~80 s).
# Under top-k many drafted tokens have no probability at all: they must never be accepted.
PAIRS = [("random", SAMPLINGS[0]), ("random", SAMPLINGS[3]), ("adversarial", SAMPLINGS[1]),
         ("adversarial", SAMPLINGS[2]), ("lookup", SAMPLINGS[2]), ("lookup", SAMPLINGS[3]),
         ("random+lookup", SAMPLINGS[0]), ("random+long lookup in 6 slots", SAMPLINGS[1]),
         ("datastore", SAMPLINGS[1]), ("random+lookup+datastore in 6 slots", SAMPLINGS[3]),
         ("random+lookup", SAMPLINGS[4]), ("random+lookup", SAMPLINGS[5])]


@pytest.fixture(scope="module")
def target_datastore(target):
    """A datastore of 300 of the target's own sampled replies to PROMPT (its continuations: the commonest)."""
    cfg, params = target
    out = generate(params, cfg, [PROMPT] * 300, max_new_tokens=6, sampling=SamplingConfig(1.0),
                   key=jax.random.PRNGKey(11))
    seqs = [(np.r_[PROMPT, row], np.r_[np.zeros(len(PROMPT)), np.ones(len(row))]) for row in np.asarray(out.tokens)]
    return datastore.build(seqs, seqs[:50], min_ngram=1, max_ngram=3, length=4)


@pytest.mark.parametrize("which,sampling", PAIRS,
                         ids=[f"{w}-T{s.temperature}-p{s.top_p}-k{s.top_k}" + (f"-m{s.min_p}" if s.min_p else "")
                              for w, s in PAIRS])
def test_tree_walk_preserves_target_distribution(target, target_datastore, sampling, which):
    cfg, params = target
    kind = which.split("+")[0]  # the drafter: "random", "adversarial" or none ("lookup", "datastore")
    drafter = None if kind in ("lookup", "datastore") else adversarial_drafter(cfg, params) \
        if kind == "adversarial" else random_drafter(cfg)
    # "long": lookup beams deeper than the drafter's; "slots": a tree of the 6 best-scored of their nodes
    spec = SpecConfig(0 if drafter is None else 3, 3, lookup_beams=2 if "lookup" in which else 0,
                      lookup_length=5 if "long" in which else None, tree_budget=6 if "slots" in which else None,
                      datastore_beams=2 if "datastore" in which else 0, datastore_length=5)
    store = target_datastore if spec.datastore_beams else None
    counts, out = sample_first_tokens(cfg, params, drafter, sampling, spec, store=store)
    p = exact_joint(cfg, params, sampling)
    assert goodness_of_fit(counts, p) > ALPHA
    if which != "adversarial":  # the test is not vacuous: drafts really were accepted (thousands of times)
        acc = np.asarray(out.accepted)
        assert (acc[acc >= 0] > 0).mean() > 0.05


@pytest.mark.parametrize("which", ["autoregressive", "random+lookup"])
def test_continuous_batching_preserves_target_distribution(target, which):
    """20,000 draws through 500 rows: the prompts prefilled into rows that ended, inside the loop, sample
    their first token and the rest as the others do."""
    cfg, params = target
    sampling = SamplingConfig(1.0)
    drafter, spec = (None, None) if which == "autoregressive" else (random_drafter(cfg),
                                                                    SpecConfig(3, 3, lookup_beams=2))
    counts, out = sample_first_tokens(cfg, params, drafter, sampling, spec, seed=5, batch_size=500)
    assert goodness_of_fit(counts, exact_joint(cfg, params, sampling)) > ALPHA
    assert out.num_steps >= N_SAMPLES // 500  # the rows really were refilled


def test_apple_rule_is_detected_as_biased(target):
    cfg, params = target
    sampling = SamplingConfig(1.0)
    spec = SpecConfig(3, 3, acceptance="apple_biased")
    counts, _ = sample_first_tokens(cfg, params, random_drafter(cfg), sampling, spec)
    assert goodness_of_fit(counts, exact_joint(cfg, params, sampling)) < 1e-6


def test_argmax_is_first_index_of_the_maximum():
    """The greedy choice: jnp.argmax's answer, ties going to the first index, for several shapes."""
    rng = np.random.default_rng(0)
    for shape in [(5,), (3, 7, 49152), (2, 1, 13), (40, 2049)]:  # whole blocks of 1024, and one more token
        logits = rng.integers(-3, 4, shape).astype(np.float32)  # many ties
        logits[..., -1] = 10.0 * (rng.random(shape[:-1]) < 0.3)  # some maxima at the very end
        np.testing.assert_array_equal(np.asarray(argmax(jnp.asarray(logits))), np.argmax(logits, axis=-1))
        assert argmax(jnp.asarray(logits)).dtype == jnp.int32
    with_inf = jnp.asarray([[-jnp.inf, -jnp.inf, 2.0, jnp.inf, jnp.inf]])
    assert int(argmax(with_inf)[0]) == 3
    assert int(argmax(jnp.full((1, 3000), -jnp.inf))[0]) == 0


def many_draws(sample, *args):
    """N_SAMPLES tokens [N_SAMPLES] from sample(key, *args), each with its own key. The arrays are arguments:
    closed over, they were constants, and XLA spent seconds folding the sort of a 49152-long one."""
    keys = jax.random.split(jax.random.PRNGKey(1), N_SAMPLES)
    return np.asarray(jax.jit(jax.vmap(sample, in_axes=(0,) + (None,) * len(args)))(keys, *args))


def test_draw_follows_its_weights():
    """The two-stage inverse-CDF draw against its weights: sizes that fill their blocks and sizes that
    do not, zero weights first, last and in whole blocks (never drawn), a dynamic range of 1e6."""
    rng = np.random.default_rng(0)
    peaked = np.exp(3 * rng.normal(size=49152) / 0.7)  # a sampled step's logits
    gappy = rng.random(1000) * (rng.random(1000) < 0.3)
    gappy[[0, 999]], gappy[64:128] = 0.0, 0.0  # block size 32: two whole blocks of zeros
    ranged = 10.0 ** rng.uniform(-6, 0, size=37)
    for weights in [peaked, gappy, ranged, [1.0, 3.0], [2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 5.0, 1.0]]:
        weights = np.asarray(weights, np.float64)
        counts = np.bincount(many_draws(draw, jnp.asarray(weights, jnp.float32)), minlength=len(weights))
        assert goodness_of_fit(counts, weights / weights.sum()) > ALPHA, len(weights)


def test_inverse_cdf_never_lands_on_a_zero_weight():
    """XLA computes each prefix of a cumulative sum on its own, so over 300 entries a running sum can
    move across a zero weight: uniforms aimed into such gaps must still land on positive weights."""
    from redrafter_jax.sampling import _first_reaching

    rng = np.random.default_rng(1)
    weights = (10.0 ** rng.uniform(-8, 3, size=(512, 300)) * (rng.random((512, 300)) < 0.5)).astype(np.float32)
    cdf = np.asarray(jnp.cumsum(jnp.asarray(weights), axis=-1))
    top = np.max(np.where(weights > 0, cdf, 0), axis=-1)
    rows, us = [], []
    for r, i in zip(*np.nonzero((weights[:, 1:] == 0) & (np.diff(cdf, axis=1) > 0))):
        u0 = np.float32(1 - cdf[r, i + 1] / top[r])  # aims x = (1 - u) top at the gap (cdf[i], cdf[i + 1]]
        for u in u0 + np.arange(-8, 9, dtype=np.float32) * np.spacing(u0):
            if cdf[r, i] < np.float32(1 - u) * top[r] <= cdf[r, i + 1]:
                rows.append(r), us.append(u)
                break
    assert len(rows) > 5, "XLA's running sums no longer move across zero weights"
    index = np.asarray(_first_reaching(jnp.asarray(us), jnp.asarray(weights[rows])))
    assert (weights[rows, index] > 0).all()


def test_draw_batched_rows_and_a_single_token():
    """Leading axes are rows with their own uniforms; a row with one positive weight always draws it."""
    weights = np.zeros((3, 2, 300), np.float32)
    weights[0, 0, 0] = weights[0, 1, 299] = weights[1, 0, 150] = 1e-30
    weights[1, 1, 17] = weights[2, 0, 255] = weights[2, 1, 256] = 7.0
    for seed in range(20):
        np.testing.assert_array_equal(np.asarray(draw(jax.random.PRNGKey(seed), jnp.asarray(weights))),
                                      [[0, 299], [150, 17], [255, 256]])
    uniform = np.asarray(draw(jax.random.PRNGKey(0), jnp.ones((4096, 300))))
    assert len(np.unique(uniform)) > 280  # rows do not share a draw


def test_sampled_select_follows_target_distribution():
    """select at temperature, top-k and top-p on a [V = 49152] row: its draws fit target_log_probs."""
    logits = 3 * jax.random.normal(jax.random.PRNGKey(5), (49152,))
    for cfg in [SamplingConfig(0.7), SamplingConfig(1.0, top_k=40), SamplingConfig(1.3, top_p=0.9)]:
        tokens = many_draws(lambda k, x: select(k, x, cfg), logits)
        p = np.exp(np.asarray(target_log_probs(logits, cfg), np.float64))
        assert goodness_of_fit(np.bincount(tokens, minlength=49152), p / p.sum()) > ALPHA, cfg


def test_greedy_limits_of_sampling(target):
    """Temperature 0 and top-k 1 are greedy; a tiny temperature stays finite and is greedy too."""
    cfg, params = target
    drafter = random_drafter(cfg)
    prompts = [PROMPT, [6, 2]]
    greedy = generate(params, cfg, prompts, max_new_tokens=10)
    for sampling in [SamplingConfig(0.0), SamplingConfig(1.0, top_k=1), SamplingConfig(1e-6)]:
        for spec in [SpecConfig(3, 3), SpecConfig(3, 3, acceptance="apple_biased")]:
            out = generate(params, cfg, prompts, max_new_tokens=10, sampling=sampling, key=jax.random.PRNGKey(1),
                           drafter=drafter, spec=spec)
            np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy.tokens))


def test_another_temperature_top_p_or_min_p_runs_the_compiled_loop(target):
    """Their values are traced: each decode loop compiles once for all four settings, and each value is used
    (a temperature near 0, a top-p near 0 or a min-p of 1 leaves one token: greedy output, which the loose
    setting, the first one, departs from)."""
    from redrafter_jax import generate as gen

    cfg, params = target
    prompts = [PROMPT] * 8
    greedy = np.asarray(generate(params, cfg, prompts, max_new_tokens=6).tokens)
    settings = [SamplingConfig(1.0, top_p=0.95, min_p=0.01), SamplingConfig(1e-6, top_p=0.95, min_p=0.01),
                SamplingConfig(1.0, top_p=1e-6, min_p=0.01), SamplingConfig(1.0, top_p=0.95, min_p=1.0)]
    for loop, kw in [(gen._autoregressive_jit, {}), (gen._speculative_jit, dict(drafter=random_drafter(cfg)))]:
        compiled = []
        for sampling in settings:
            out = generate(params, cfg, prompts, max_new_tokens=6, sampling=sampling, key=jax.random.PRNGKey(2), **kw)
            compiled.append(loop._cache_size())
            same = (np.asarray(out.tokens) == greedy).all(axis=1)
            assert same.all() == (sampling is not settings[0]), (sampling, kw)
        assert compiled == compiled[:1] * 4


def test_apple_residual_without_mass_falls_back_to_target():
    """Where q >= p everywhere the residual max(p - q, 0) is all zero: the token must come from p."""
    from redrafter_jax.acceptance import apple_accept

    logp = jnp.log(jnp.asarray([[[0.0, 0.5, 0.5, 0.0]] * 3]))  # [B=1, N=3, V=4]; token 0 impossible
    beams = jnp.asarray([[[1, 3, 3]]])  # drafted token 3 has p = 0: always rejected at depth 1
    slot = jnp.asarray([[[0, 1, 2]]])
    q = jnp.log(jnp.asarray([[[[0.0, 0.5, 0.5, 0.0], [0.25] * 4]]]))  # q == p at the rejection point
    for seed in range(20):
        acc = apple_accept(jax.random.PRNGKey(seed), beams, slot, logp, q)
        assert int(acc.num_accepted[0]) == 0 and int(acc.tokens[0, 0]) in (1, 2)


def test_apple_rule_treats_a_beams_end_in_the_tree_as_a_leaf():
    """Past what the tree holds of a beam (ABSENT) no token was drafted: the bonus token comes from p,
    not from the residual of a distribution whose token was never proposed (here: always token 2)."""
    from redrafter_jax.acceptance import apple_accept

    logp = jnp.log(jnp.asarray([[[0.0, 0.5, 0.5, 0.0]] * 3]))
    beams = jnp.asarray([[[1, 2, ABSENT]]])  # token 2 has p == q: always accepted; then the beam ends
    slot = jnp.asarray([[[0, 1, 0]]])
    q = jnp.log(jnp.asarray([[[[0.0, 0.5, 0.5, 0.0], [0.0, 0.9, 0.1, 0.0]]]]))
    bonus = set()
    for seed in range(20):
        acc = apple_accept(jax.random.PRNGKey(seed), beams, slot, logp, q)
        assert int(acc.num_accepted[0]) == 1 and int(acc.tokens[0, 0]) == 2
        bonus.add(int(acc.tokens[0, 1]))
    assert bonus == {1, 2}


def test_sampled_speculative_text_on_default_model_is_fluent(smollm, chat_prompts):
    """Sampled at T=0.7 with an untrained drafter: text the target itself finds likely, and reproducible."""
    cfg, params = smollm.config, smollm.params
    dcfg = DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size)
    drafter = Drafter(init_drafter(dcfg, jax.random.PRNGKey(0)), dcfg)
    kw = dict(max_new_tokens=24, sampling=SamplingConfig(0.7), key=jax.random.PRNGKey(5), drafter=drafter)
    out = generate(params, cfg, chat_prompts[1:3], **kw)
    again = generate(params, cfg, chat_prompts[1:3], **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(again.tokens))
    for prompt, toks, n in zip(chat_prompts[1:3], np.asarray(out.tokens), np.asarray(out.lengths)):
        seq = jnp.asarray([prompt + toks[:n].tolist()])
        logp = jax.nn.log_softmax(causal_logits(params, cfg, seq)[0, len(prompt) - 1:-1] / 0.7)
        mean = float(jnp.mean(jnp.take_along_axis(logp, jnp.asarray(toks[:n])[:, None], axis=1)))
        # The target's own samples at 0.7 score -0.35 to -2.15 here (6 keys, autoregressive and speculative
        # alike; the haiku lowest); uniformly random tokens about -10.
        assert mean > -3.0, smollm.tokenizer.decode(toks[:n])
