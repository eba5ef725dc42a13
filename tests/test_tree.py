"""Tree packing against a brute-force Python reference, on random beams built to share prefixes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redrafter_jax.tree import ABSENT, pack_tree


def reference_pack(beams, budget):
    """Straightforward dict-based packing: one node per distinct prefix, numbered beam-major; a beam
    ends at its first ABSENT token (slot -1 from there on)."""
    w, length = beams.shape
    lengths = [list(b).index(ABSENT) if ABSENT in b else length for b in beams]
    node_of_prefix = {}
    order = []  # (prefix, owner beam)
    for i in range(w):
        for d in range(lengths[i]):
            prefix = tuple(beams[i, : d + 1])
            if prefix not in node_of_prefix:
                node_of_prefix[prefix] = len(order)
                order.append(prefix)
    slot = np.array([[node_of_prefix[tuple(beams[i, : d + 1])] if d < lengths[i] else -1 for d in range(length)]
                     for i in range(w)])
    valid = slot.max(axis=1) < budget
    # keep only nodes on valid beams' paths, numbering unchanged (valid beams are a prefix)
    used = sorted({slot[i, d] for i in range(w) if valid[i] for d in range(lengths[i])})
    mask = np.eye(budget, dtype=bool)
    tokens = np.full(budget, -1)
    depth = np.zeros(budget, int)
    for p in used:
        prefix = order[p]
        tokens[p], depth[p] = prefix[-1], len(prefix) - 1
        for d in range(len(prefix)):
            mask[p, node_of_prefix[prefix[: d + 1]]] = True
    return tokens, depth, mask, slot, valid, len(used)


@st.composite
def shared_beams(draw):
    w = draw(st.integers(1, 6))
    length = draw(st.integers(2, 5))
    vocab = draw(st.integers(2, 4))  # tiny vocabularies make shared prefixes (and duplicates) common
    beams = np.array(draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=length, max_size=length),
                                   min_size=w, max_size=w)))
    beams[:, 0] = draw(st.integers(0, vocab - 1))  # all beams start with the init token
    for i, end in enumerate(draw(st.lists(st.integers(2, length), min_size=w, max_size=w))):
        beams[i, end:] = ABSENT  # beams of several lengths, as drafter and lookup beams may be
    budget = draw(st.integers(length, 1 + w * (length - 1)))
    return beams, budget


@settings(max_examples=30, deadline=None)
@given(shared_beams())
def test_pack_tree_matches_reference(case):
    beams, budget = case
    tree = pack_tree(beams[None], budget, pad_id=-1)
    tokens, depth, mask, slot, valid, n = reference_pack(beams, budget)
    np.testing.assert_array_equal(np.asarray(tree.beam_valid[0]), valid)
    assert int(tree.num_nodes[0]) == n
    np.testing.assert_array_equal(np.asarray(tree.tokens[0]), tokens)
    np.testing.assert_array_equal(np.asarray(tree.depth[0]), depth)
    np.testing.assert_array_equal(np.asarray(tree.mask[0]), mask)
    present = valid[:, None] & (slot >= 0)
    np.testing.assert_array_equal(np.asarray(tree.slot[0])[present], slot[present])


def test_budget_drops_lowest_scored_beams_first():
    beams = np.array([[7, 1, 2, 3], [7, 1, 2, 4], [7, 5, 6, 8], [7, 1, 9, 9]])
    # worst case 13; beam 0 takes 4 slots, beam 1 adds 1, beam 2 adds 3, beam 3 adds 2
    assert pack_tree(beams[None], 13).num_nodes[0] == 10
    t = pack_tree(beams[None], 8)
    assert t.beam_valid[0].tolist() == [True, True, True, False] and int(t.num_nodes[0]) == 8
    t = pack_tree(beams[None], 7)
    assert t.beam_valid[0].tolist() == [True, True, False, False] and int(t.num_nodes[0]) == 5


def test_budget_smaller_than_one_beam_is_an_error():
    with pytest.raises(ValueError, match="cannot hold one beam"):
        pack_tree(np.zeros((1, 2, 4), np.int32), 3)
