"""Context-lookup beams against a brute-force reference, their merge with drafter beams, and exact
decoding with them on a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from redrafter_jax import lookup
from redrafter_jax.beam_search import Draft
from redrafter_jax.config import DrafterConfig, SpecConfig
from redrafter_jax.drafter import Drafter, init_drafter
from redrafter_jax.generate import generate
from redrafter_jax.tree import ABSENT, pack_tree
from tests.tiny import tiny_model


def reference(hist, end, k, length, n_min, n_max):
    """Written from the definition: for n = n_max .. n_min, the earlier occurrences of the last n
    tokens, most recent first (each position once, at its longest n); the first 4k of those are the
    candidates; each continues with the tokens after it, read as if the history from there on loops;
    the first k distinct continuations win."""
    seq = list(hist[: end + 1])
    positions = []
    for n in range(n_max, n_min - 1, -1):
        if n > len(seq):
            continue
        suffix = seq[-n:]
        for e in range(end - 1, n - 2, -1):
            if seq[e - n + 1: e + 1] == suffix and e not in positions:
                positions.append(e)
    beams = []
    for e in positions[: 4 * k]:
        extended = list(seq)
        while len(extended) < e + length:  # the occurrence's continuation, looping over the tail
            extended.append(extended[len(extended) - (end - e)])
        cont = extended[e + 1: e + length]
        if cont not in beams:
            beams.append(cont)
    return beams[:k]


def run_lookup(hists, ends, k, length, n_min, n_max):
    d = jax.jit(lookup.lookup_draft, static_argnums=(2, 3, 4, 5))(
        jnp.asarray(hists, jnp.int32), jnp.asarray(ends, jnp.int32), k, length, n_min, n_max)
    return np.asarray(d.beams), np.asarray(d.scores)


@pytest.mark.parametrize("k,length,n_min,n_max", [(1, 3, 1, 3), (1, 5, 1, 3), (4, 5, 1, 3), (3, 4, 2, 4),
                                                  (2, 8, 1, 1)])
def test_lookup_equals_reference_on_random_histories(k, length, n_min, n_max):
    rng = np.random.default_rng(k * 100 + length * 10 + n_max)
    t, rows = 40, 64
    hists = rng.integers(0, 4, (rows, t))  # a small alphabet: many matches, many repeats
    hists[::7] = rng.integers(0, 1000, (len(hists[::7]), t))  # and rows with almost none
    ends = rng.integers(0, t, rows)
    ends[:4] = [0, 1, t - 1, 2]  # one-token history (never a match), short ones, a full one
    beams, scores = run_lookup(hists, ends, k, length, n_min, n_max)
    matched = 0
    for r in range(rows):
        want = reference(hists[r], ends[r], k, length, n_min, n_max)
        valid = np.isfinite(scores[r, :, 1])
        assert valid.sum() == len(want), (r, want, beams[r])
        assert (beams[r, :, 0] == hists[r, ends[r]]).all()
        assert beams[r, valid, 1:].tolist() == want
        assert (scores[r, ~valid, 1:] == -np.inf).all()
        matched += len(want)
    assert matched > rows // 2


def test_lookup_edge_cases():
    #          0  1  2  3  4  5  6  7
    hist = [[5, 6, 7, 5, 6, 0, 0, 0],  # "5 6" occurred at the very start: continue 7 5 6, then loop
            [9, 9, 9, 9, 0, 0, 0, 0],  # period 1 at the end: 9 9 9 ...
            [1, 2, 3, 4, 0, 0, 0, 0],  # no earlier occurrence
            [8, 0, 0, 0, 0, 0, 0, 0]]  # one token: nothing to match
    beams, scores = run_lookup(hist, [4, 3, 3, 0], 1, 5, 1, 3)
    # scored by match length: "5 6" (2 tokens) in row 0, "9 9 9" (3) in row 1
    assert beams[0, 0].tolist() == [6, 7, 5, 6, 7] and np.allclose(scores[0, 0], lookup.match_scores(2, 5))
    assert beams[1, 0].tolist() == [9, 9, 9, 9, 9] and np.allclose(scores[1, 0], lookup.match_scores(3, 5))
    assert (scores[2:, 0, 0] == 0).all() and np.isneginf(scores[2:, 0, 1:]).all()
    # The longest suffix wins over a more recent shorter one: "3 1" matches at 1, a lone "1" at 3.
    beams, _ = run_lookup([[3, 1, 4, 1, 5, 3, 1]], [6], 1, 3, 1, 3)
    assert beams[0, 0].tolist() == [1, 4, 1]
    # More beams than the history has positions: the extra ones are invalid.
    beams, scores = run_lookup([[2, 2, 2]], [2], 6, 3, 1, 3)
    assert np.isfinite(scores[0, :, 1]).sum() == 1 and beams[0, 0].tolist() == [2, 2, 2]


def test_history_is_prompt_then_generated():
    prompts = jnp.asarray([[1, 2, 3, 0], [4, 0, 0, 0]])
    generated = jnp.asarray([[7, 8, 0], [9, 10, 11]])
    h = lookup.history(prompts, jnp.asarray([3, 1]), generated)
    assert np.asarray(h)[0, :6].tolist() == [1, 2, 3, 7, 8, 0]
    assert np.asarray(h)[1, :4].tolist() == [4, 9, 10, 11]


def test_match_scores_follow_the_measured_acceptance():
    s = np.asarray(lookup.match_scores(jnp.asarray([1, 2, 3, 5]), 10))
    assert (s[:, 0] == 0).all() and (np.diff(s, axis=1) < 0).all()  # each token may be wrong
    assert (s[0, 1:] < s[1, 1:]).all() and (s[1, 1:] < s[2, 1:]).all() and (s[3] == s[2]).all()  # longer: likelier
    np.testing.assert_allclose(np.exp(s[2, 1]), lookup.MATCH_ACCEPTANCE[2, 0], rtol=1e-6)


def test_combine_pads_shorter_beams_and_packing_weighs_nodes_by_score():
    """Lookup beams longer than the drafter's: the drafter's end in ABSENT, which packing skips;
    nodes compete by score across proposers, and a lookup without a match takes no slot."""
    drafter = Draft(jnp.asarray([[[1, 2, 3], [1, 4, 5]]]), jnp.log(jnp.asarray([[[1, 0.6, 0.5], [1, 0.3, 0.2]]])))
    looked = Draft(jnp.asarray([[[1, 2, 3, 6, 6], [1, 7, 7, 7, 7]]]),
                   jnp.asarray([lookup.match_scores(jnp.asarray([3, 1]), 5)]).at[:, 1, 1:].set(-jnp.inf))
    d = lookup.combine([drafter, looked])
    assert np.asarray(d.beams)[0].tolist() == [[1, 2, 3, ABSENT, ABSENT], [1, 4, 5, ABSENT, ABSENT],
                                               [1, 2, 3, 6, 6], [1, 7, 7, 7, 7]]
    assert np.isneginf(np.asarray(d.scores)[0, :2, 3:]).all()
    tree = pack_tree(d.beams, d.scores, 7, pad_id=0)
    assert int(tree.num_nodes[0]) == 7  # slots in beam order: the drafter's two beams, then the lookup's tail
    assert np.asarray(tree.tokens)[0].tolist() == [1, 2, 3, 4, 5, 6, 6]
    assert np.asarray(tree.depth)[0].tolist() == [0, 1, 2, 1, 2, 3, 4]
    # 5 slots: the shared "1 2 3" prefix is scored by the lookup (3-token match: 0.90, 0.93), whose
    # next tokens (0.95, 0.96) beat the drafter's "4" (0.3)
    assert np.asarray(pack_tree(d.beams, d.scores, 5).tokens)[0].tolist() == [1, 2, 3, 6, 6]
    with pytest.raises(ValueError, match="log-probs"):
        lookup.combine([drafter._replace(log_probs=jnp.zeros((1, 2, 2, 8))), looked])


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(vocab_size=16, eos_token_ids=(1,))


# Repetitive prompts of different lengths, so that lookups find matches and rows end at EOS or limit.
PROMPTS = [[3, 4, 5, 3, 4, 5, 3, 4], [2, 7, 9, 11, 2, 7], [5] * 10, [6, 8]]


@pytest.mark.parametrize("spec", [SpecConfig(0, 4, lookup_beams=1), SpecConfig(0, 5, lookup_beams=3),
                                  SpecConfig(2, 3, lookup_beams=2), SpecConfig(3, 5, lookup_beams=4, tree_budget=9),
                                  SpecConfig(1, 4, lookup_beams=2, lookup_min_ngram=2, lookup_max_ngram=4),
                                  SpecConfig(2, 3, lookup_beams=2, lookup_length=7),
                                  SpecConfig(3, 5, lookup_beams=1, lookup_length=3, tree_budget=9),
                                  SpecConfig(0, 3, lookup_beams=2, lookup_length=6),
                                  SpecConfig(3, 4, lookup_beams=1, lookup_length=7, tree_budget=5)],
                         ids=SpecConfig.describe)
def test_lookup_decoding_equals_autoregressive_on_tiny_model(tiny, spec):
    cfg, params = tiny
    drafter = None
    if spec.beam_width:
        dcfg = DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, num_resblocks=1)
        drafter = Drafter(init_drafter(dcfg, jax.random.PRNGKey(1)), dcfg)
    ar = generate(params, cfg, PROMPTS, max_new_tokens=[30, 12, 30, 25])
    sp = generate(params, cfg, PROMPTS, max_new_tokens=[30, 12, 30, 25], drafter=drafter, spec=spec)
    assert np.array_equal(np.asarray(ar.tokens), np.asarray(sp.tokens))
    assert np.array_equal(np.asarray(ar.lengths), np.asarray(sp.lengths))
    assert int(sp.num_steps) < int(ar.num_steps)  # the lookups were accepted somewhere


def test_bad_lookup_settings_raise(tiny):
    cfg, params = tiny
    for kwargs, match in [(dict(beam_width=0), "at least one beam"),
                          (dict(lookup_beams=-1), "lookup_beams >= 0"),
                          (dict(lookup_beams=1, lookup_min_ngram=0), "lookup n-gram"),
                          (dict(lookup_beams=1, lookup_min_ngram=3, lookup_max_ngram=2), "lookup n-gram"),
                          (dict(lookup_beams=1.5), "must be an integer"),
                          (dict(lookup_beams=2, acceptance="apple_biased"), "lookup beams have none"),
                          (dict(lookup_beams=1, lookup_length=1), "lookup_length must be >= 2"),
                          (dict(lookup_length=6), "needs lookup_beams > 0"),
                          (dict(lookup_beams=1, lookup_length=4.0), "lookup_length must be an integer"),
                          (dict(beam_length=3, lookup_beams=1, lookup_length=8, tree_budget=17), r"\[2, 16\]")]:
        with pytest.raises(ValueError, match=match):
            SpecConfig(**kwargs)
    with pytest.raises(ValueError, match="needs a drafter"):
        generate(params, cfg, PROMPTS, max_new_tokens=4, spec=SpecConfig(2, 3, lookup_beams=1))
    dcfg = DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size)
    with pytest.raises(ValueError, match="would not use it"):
        generate(params, cfg, PROMPTS, max_new_tokens=4, spec=SpecConfig(0, 3, lookup_beams=1),
                 drafter=Drafter(init_drafter(dcfg, jax.random.PRNGKey(0)), dcfg))
    for text in ["4x", "x4", "4x4+", "4x4:a", "-1x4", "2x4+x8", "2x4+1x"]:
        with pytest.raises(ValueError, match="bad speculative setting"):
            SpecConfig.parse(text)
    assert SpecConfig.parse("1x5+2:9") == SpecConfig(1, 5, 9, lookup_beams=2)
    mixed = SpecConfig.parse("2x4+1x8:11")
    assert mixed == SpecConfig(2, 4, 11, lookup_beams=1, lookup_length=8) and mixed.describe() == "2x4+1x8:11"
    assert (mixed.depth, mixed.max_nodes, SpecConfig.parse("0x4+2x6").depth) == (8, 14, 6)
    # "/M": the slots of a verification forward padded to a multiple of M
    for text, (budget, slots) in {"8x5/16": (33, 48), "4x3+1x8:7/4": (7, 8), "8x5/1": (33, 33), "2x4:6/3": (6, 6),
                                  "4x3+1x8+1x8ds:9/32": (9, 32)}.items():
        spec = SpecConfig.parse(text)
        assert (spec.budget, spec.slots) == (budget, slots), text
        assert SpecConfig.parse(spec.describe()) == spec
    assert SpecConfig.parse("8x5/16").describe() == "8x5/16" and SpecConfig.parse("8x5/1").describe() == "8x5"
    for text in ["8x5/", "8x5/16:33", "8x5/-2"]:
        with pytest.raises(ValueError, match="bad speculative setting"):
            SpecConfig.parse(text)
    for bad in [0, 2.0, True]:
        with pytest.raises(ValueError, match="slot_multiple must be"):
            SpecConfig(8, 5, slot_multiple=bad)
    # the default tree: 7 slots for one row, 12 tree tokens a step for 2 and 3 rows, 16-21 for 4-7, then 2 slots
    assert [SpecConfig.default(b).budget for b in range(1, 10)] + [SpecConfig.default(64).budget] == \
        [7, 6, 4, 4, 4, 3, 3, 2, 2, 2]
    assert SpecConfig.default(lookup_max_ngram=5) == SpecConfig.parse("4x3+1x8:7", lookup_max_ngram=5)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        SpecConfig.default(0)
