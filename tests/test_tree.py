"""Tree packing against a brute-force Python reference, on random beams built to share prefixes."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redrafter_jax.tree import ABSENT, pack_tree

# as the decode loop runs it: compiled whole (op by op, each new shape cost ~2 s of compilations)
pack_jit = jax.jit(pack_tree, static_argnames=("budget", "pad_id", "slots"))


def reference_pack(beams, scores, budget):
    """Straightforward dict-based packing: one node per distinct prefix (a beam ends at its first
    ABSENT token), scored by the best of its beams' prefix scores; the `budget` best-scored nodes,
    ties in beam-major order, keep their parents; kept nodes are numbered beam-major."""
    w, length = beams.shape
    lengths = [list(b).index(ABSENT) if ABSENT in b else length for b in beams]
    node_score = {}
    for i in range(w):
        for d in range(lengths[i]):
            prefix = tuple(beams[i, : d + 1])
            node_score[prefix] = max(node_score.get(prefix, -np.inf), scores[i, d])
    ranked = sorted((p for p in node_score if node_score[p] > -np.inf), key=lambda p: -node_score[p])
    chosen = set(ranked[:budget])  # dicts keep beam-major order, and sorted() is stable
    kept = [p for p in node_score if all(p[: d + 1] in chosen for d in range(len(p)))]
    slot_of = {p: k for k, p in enumerate(kept)}
    in_tree = np.array([[d < lengths[i] and tuple(beams[i, : d + 1]) in slot_of for d in range(length)]
                        for i in range(w)])
    slot = np.array([[slot_of.get(tuple(beams[i, : d + 1]), -1) for d in range(length)] for i in range(w)])
    mask = np.eye(budget, dtype=bool)
    tokens = np.full(budget, -1)
    depth = np.zeros(budget, int)
    for p, k in slot_of.items():
        tokens[k], depth[k] = p[-1], len(p) - 1
        for d in range(len(p)):
            mask[k, slot_of[p[: d + 1]]] = True
    return tokens, depth, mask, np.where(in_tree, beams, ABSENT), slot, len(kept)


@st.composite
def shared_beams(draw):
    w = draw(st.integers(1, 6))
    length = draw(st.integers(2, 5))
    vocab = draw(st.integers(2, 4))  # tiny vocabularies make shared prefixes (and duplicates) common
    beams = np.array(draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=length, max_size=length),
                                   min_size=w, max_size=w)))
    beams[:, 0] = draw(st.integers(0, vocab - 1))  # all beams start with the init token
    # Prefix scores from log-probs in {0, -1, -2} (ties, and children scored like their parents) or
    # -inf for a missing proposal (whole beams, or their tails as past a beam's end).
    steps = np.array(draw(st.lists(st.lists(st.sampled_from([0.0, -1.0, -2.0, -np.inf]), min_size=length - 1,
                                            max_size=length - 1), min_size=w, max_size=w)))
    scores = np.concatenate([np.zeros((w, 1)), np.cumsum(steps, axis=1)], axis=1)
    for i, end in enumerate(draw(st.lists(st.integers(2, length), min_size=w, max_size=w))):
        beams[i, end:] = ABSENT  # beams of several lengths, as drafter and lookup beams may be
        scores[i, end:] = -np.inf
    budget = draw(st.integers(1, 1 + w * (length - 1)))
    return beams, scores, budget


@settings(max_examples=60, deadline=None)
@given(shared_beams())
def test_pack_tree_matches_reference(case):
    beams, scores, budget = case
    tree = pack_jit(beams[None], scores[None].astype(np.float32), budget, -1)
    tokens, depth, mask, kept_beams, slot, n = reference_pack(beams, scores, budget)
    assert int(tree.num_nodes[0]) == n
    np.testing.assert_array_equal(np.asarray(tree.tokens[0]), tokens)
    np.testing.assert_array_equal(np.asarray(tree.depth[0]), depth)
    np.testing.assert_array_equal(np.asarray(tree.mask[0]), mask)
    np.testing.assert_array_equal(np.asarray(tree.beams[0]), kept_beams)
    present = kept_beams != ABSENT
    np.testing.assert_array_equal(np.asarray(tree.slot[0])[present], slot[present])


@settings(max_examples=30, deadline=None)
@given(shared_beams(), st.integers(1, 9))
def test_slots_past_the_budget_are_padding(case, extra):
    """A forward of more slots than the budget (`SpecConfig.slots`) holds the same tree; the slots after
    it hold the pad token at depth 0 and see only themselves."""
    beams, scores, budget = case
    args = beams[None], scores[None].astype(np.float32), budget, 5
    tree, padded = pack_jit(*args), pack_jit(*args, budget + extra)
    for name in ("beams", "slot", "num_nodes"):
        np.testing.assert_array_equal(getattr(padded, name), getattr(tree, name))
    np.testing.assert_array_equal(padded.tokens[0], np.concatenate([tree.tokens[0], np.full(extra, 5)]))
    np.testing.assert_array_equal(padded.depth[0], np.concatenate([tree.depth[0], np.zeros(extra, int)]))
    mask = np.eye(budget + extra, dtype=bool)
    mask[:budget, :budget] = tree.mask[0]
    np.testing.assert_array_equal(padded.mask[0], mask)


def test_budget_keeps_the_best_nodes_at_any_depth():
    beams = np.array([[7, 1, 2, 3], [7, 1, 2, 4], [7, 5, 6, 8], [7, 1, 9, 9]])
    lp = np.log([[0.9, 0.9, 0.5], [0.9, 0.9, 0.4], [0.05, 0.9, 0.9], [0.9, 0.03, 0.9]])
    scores = np.concatenate([np.zeros((4, 1)), np.cumsum(lp, axis=1)], axis=1).astype(np.float32)
    # 10 distinct nodes; by score: root, 7-1, 7-1-2, 7-1-2-3, 7-1-2-4, 7-5, 7-5-6, 7-5-6-8, 7-1-9, 7-1-9-9
    assert pack_tree(beams[None], scores[None], 13).num_nodes[0] == 10
    t = pack_tree(beams[None], scores[None], 5)
    assert np.asarray(t.tokens[0]).tolist() == [7, 1, 2, 3, 4]
    assert np.asarray(t.beams[0]).tolist() == [[7, 1, 2, 3], [7, 1, 2, 4], [7, -1, -1, -1], [7, 1, -1, -1]]
    t = pack_tree(beams[None], scores[None], 3)  # beam 0 cut short: the rest of it is not in the tree
    assert np.asarray(t.beams[0, 0]).tolist() == [7, 1, 2, ABSENT] and int(t.num_nodes[0]) == 3


def test_nodes_scored_minus_inf_take_no_slot():
    beams = np.array([[7, 1, 2], [7, 3, 4]])
    scores = np.array([[0, -1, -2], [0, -np.inf, -np.inf]], np.float32)
    t = pack_tree(beams[None], scores[None], 5, pad_id=0)
    assert int(t.num_nodes[0]) == 3 and np.asarray(t.tokens[0]).tolist() == [7, 1, 2, 0, 0]


def test_bad_budget_or_scores_are_errors():
    with pytest.raises(ValueError, match="cannot hold the init token"):
        pack_tree(np.zeros((1, 2, 4), np.int32), np.zeros((1, 2, 4)), 0)
    with pytest.raises(ValueError, match="3 tree slots cannot hold a budget of 4 nodes"):
        pack_tree(np.zeros((1, 2, 4), np.int32), np.zeros((1, 2, 4)), 4, slots=3)
    with pytest.raises(ValueError, match="must match beams"):
        pack_tree(np.zeros((1, 2, 4), np.int32), np.zeros((1, 2)), 4)
