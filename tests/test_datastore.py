"""Datastore beams: the build and the lookup against a brute-force reference, the saved file, exact
decoding with them on a tiny model, and the command that builds one from distillation shards."""

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from redrafter_jax import datastore
from redrafter_jax.config import DrafterConfig, SpecConfig
from redrafter_jax.drafter import Drafter, init_drafter
from redrafter_jax.generate import generate
from redrafter_jax.tree import ABSENT
from tests.tiny import tiny_model
from train import data
from train import datastore as build_cli


def random_corpus(rng, n_seqs, vocab, lengths=(5, 40)):
    """(tokens, mask) pairs: a prompt, then a reply (mask 1), sometimes a second prompt and reply; a small
    vocabulary so that n-grams recur with several continuations."""
    seqs = []
    for _ in range(n_seqs):
        parts = rng.integers(lengths[0], lengths[1], size=2 if rng.random() < 0.7 else 4)
        tokens = rng.integers(0, vocab, size=parts.sum()).astype(np.int32)
        mask = np.concatenate([np.full(n, i % 2, np.int8) for i, n in enumerate(parts)])
        seqs.append((tokens, mask))
    return seqs


def reference_table(seqs, n, length):
    """From the definition: every n-gram whose next token is a reply token -> Counter of the (up to
    `length`) reply tokens that followed it, ABSENT-padded at the reply's end."""
    table = collections.defaultdict(collections.Counter)
    for tokens, mask in seqs:
        tokens, mask = list(tokens), list(mask)
        for e in range(n - 1, len(tokens) - 1):
            if not mask[e + 1]:
                continue
            cont = []
            for j in range(e + 1, e + 1 + length):
                if j >= len(tokens) or not mask[j] or (cont and cont[-1] == ABSENT):
                    cont.append(ABSENT)
                else:
                    cont.append(tokens[j])
            table[tuple(tokens[e - n + 1: e + 1])][tuple(cont)] += 1
    return table


def tie_break(cont):
    """Among equally frequent continuations the build keeps the one of the smallest hash (ABSENT hashed as 2**31-1)."""
    return int(datastore.ngram_hash(np.array([2**31 - 1 if t == ABSENT else t for t in cont], np.int64), np))


def test_hash_is_the_same_in_numpy_and_jax():
    grams = np.random.default_rng(0).integers(0, 50000, size=(1000, 5)).astype(np.int32)
    for n in range(1, 6):
        assert np.array_equal(datastore.ngram_hash(grams[:, :n], np), np.asarray(datastore.ngram_hash(grams[:, :n])))
    assert len(np.unique(datastore.ngram_hash(grams, np))) == 1000


@pytest.mark.parametrize("min_ngram,max_ngram,length,beams", [(1, 3, 4, 2), (2, 4, 6, 1), (2, 2, 3, 3), (1, 4, 5, 5)])
def test_lookup_equals_brute_force_reference(min_ngram, max_ngram, length, beams):
    rng = np.random.default_rng(min_ngram * 10 + max_ngram)
    seqs = random_corpus(rng, 60, vocab=6)
    store = datastore.build(seqs, seqs[:10], min_ngram=min_ngram, max_ngram=max_ngram, length=length)
    tables = {n: reference_table(seqs, n, length) for n in range(min_ngram, max_ngram + 1)}
    # histories: random ones (some n-grams never seen: tokens 6, 7), very short ones, ends at 0
    hists = rng.integers(0, 8, size=(40, 12)).astype(np.int32)
    ends = np.concatenate([[0, 1, 2], rng.integers(0, 12, size=37)])
    d = jax.jit(datastore.draft, static_argnums=(3, 4))(store, jnp.asarray(hists), jnp.asarray(ends), beams,
                                                        length + 1)
    got_beams, got_scores = np.asarray(d.beams), np.asarray(d.scores)
    for b, (hist, end) in enumerate(zip(hists, ends)):
        want = []  # longest match first: each match length's most frequent continuation, new ones only
        for n in range(max_ngram, min_ngram - 1, -1):
            counts = tables[n].get(tuple(hist[end - n + 1: end + 1])) if end >= n - 1 else None
            if counts:
                top = max(counts.values())
                chosen = min((c for c, k in counts.items() if k == top), key=tie_break)
                if chosen not in want:
                    want.append(chosen)
        assert (got_beams[b, :, 0] == hist[end]).all()
        for k in range(beams):
            if k < len(want):
                assert tuple(got_beams[b, k, 1:]) == want[k]
                assert np.isfinite(got_scores[b, k]).all() and (np.diff(got_scores[b, k]) <= 0).all()
            else:
                assert got_scores[b, k, 0] == 0 and np.isneginf(got_scores[b, k, 1:]).all()


def test_continuations_stop_at_the_reply_end_and_scores_come_from_held_out_replies():
    # "1 2 3" is always followed by "4 5" and the reply's end: the continuation is ABSENT after 5
    seqs = [(np.array([9, 1, 2, 3, 4, 5, 9, 9]), np.array([0, 0, 0, 0, 1, 1, 0, 0]))] * 3
    # held out: "1 2 3" -> "4 5" twice and "4 6" once, so "2 3 4" -> "5" twice and "6" once
    held_out = [(np.array([9, 1, 2, 3, 4, 5]), np.array([0, 0, 0, 0, 1, 1]))] * 2 + \
        [(np.array([9, 1, 2, 3, 4, 6]), np.array([0, 0, 0, 0, 1, 1]))]
    store = datastore.build(seqs, held_out, min_ngram=3, max_ngram=3, length=4)
    d = datastore.draft(store, jnp.asarray([[1, 2, 3]]), jnp.asarray([2]), 1, 5)
    assert np.asarray(d.beams).tolist() == [[[3, 4, 5, ABSENT, ABSENT]]]
    # first tokens: 3 of 3 after "1 2 3", 2 of 3 after "2 3 4"; second (after "1 2 3" only): 2 of 3
    assert np.asarray(store.acceptance)[0] == pytest.approx([5 / 6, 2 / 3, 0.5, 0.5])  # 0.5: never tried
    assert np.asarray(d.scores)[0, 0, :3] == pytest.approx(np.log([1, 5 / 6, 5 / 9]), rel=1e-5)


def test_saved_file_round_trips_and_bad_files_are_refused(tmp_path):
    seqs = random_corpus(np.random.default_rng(1), 20, vocab=30)
    store = datastore.build(seqs, seqs, min_ngram=1, max_ngram=3, length=5)
    path = tmp_path / "ds.npz"
    datastore.save(store, path)
    assert os.listdir(tmp_path) == ["ds.npz"]  # no temporary file left
    back = datastore.load(path, vocab_size=30)
    for a, b in zip(jax.tree_util.tree_leaves(store), jax.tree_util.tree_leaves(back)):
        assert np.array_equal(a, b)
    assert (back.min_ngram, back.max_ngram, back.length) == (1, 3, 5)
    with pytest.raises(ValueError, match="outside the target's vocabulary of 20"):
        datastore.load(path, vocab_size=20)
    (tmp_path / "bad.npz").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable datastore"):
        datastore.load(tmp_path / "bad.npz")
    z = dict(np.load(path))
    np.savez(tmp_path / "unsorted.npz", **{**z, "keys": z["keys"][::-1].copy()})
    with pytest.raises(ValueError, match="corrupt datastore"):
        datastore.load(tmp_path / "unsorted.npz")
    with pytest.raises(ValueError, match="min_ngram <= max_ngram"):
        datastore.build(seqs, seqs, min_ngram=3, max_ngram=2)
    with pytest.raises(ValueError, match="must be >= 1, got 7 and 0"):
        datastore.build(seqs, seqs, min_count=0)
    with pytest.raises(ValueError, match="no 2..3-token n-gram before a reply token"):
        datastore.build([(t, np.zeros_like(m)) for t, m in seqs], seqs, min_ngram=2, max_ngram=3)
    twice = seqs + seqs[:5]  # the first five sequences' n-grams are followed by the same tokens twice
    full, pruned = (datastore.build(twice, seqs, min_ngram=1, max_ngram=3, length=5, min_count=c) for c in (1, 2))
    kept = np.isin(np.asarray(full.keys), np.asarray(pruned.keys))
    assert 0 < kept.sum() < len(kept) and np.array_equal(np.asarray(full.continuations)[kept], pruned.continuations)


@pytest.fixture(scope="module")
def tiny():
    cfg, params = tiny_model(seed=2, scale=1.0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, cfg.vocab_size, size=n).tolist() for n in (5, 9, 3, 14, 7, 11)]
    ref = generate(params, cfg, prompts, max_new_tokens=30)
    replies = [np.asarray(ref.tokens[i, : ref.lengths[i]]) for i in range(len(prompts))]
    # the target's own replies to the first four prompts; the last two are held out
    seqs = [(np.array(p + r.tolist()), np.r_[np.zeros(len(p)), np.ones(len(r))]) for p, r in zip(prompts, replies)]
    store = datastore.build(seqs[:4], seqs[4:], min_ngram=1, max_ngram=4, length=7)
    return cfg, params, prompts, [r.tolist() for r in replies], store


@pytest.mark.parametrize("spec", ["0x2+2x8ds", "0x4+1+1x6ds:6", "2x3+1x5+2x4ds:7", "3x3+2x8ds"])
def test_greedy_decoding_with_datastore_beams_is_exact(tiny, spec):
    cfg, params, prompts, replies, store = tiny
    spec = SpecConfig.parse(spec)
    drafter = None
    if spec.beam_width:
        dcfg = DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, num_resblocks=1)
        drafter = Drafter(init_drafter(dcfg, jax.random.PRNGKey(1)), dcfg)
    for rows in ([0, 1, 2, 3], [4], range(6)):  # the prompts it was built from, a held-out one, all six
        out = generate(params, cfg, [prompts[i] for i in rows], max_new_tokens=30, drafter=drafter, spec=spec,
                       datastore=store)
        assert [out.tokens[j, : out.lengths[j]].tolist() for j in range(len(rows))] == [replies[i] for i in rows]
    acc = np.asarray(out.accepted)
    assert acc[acc >= 0].mean() > 1  # the datastore's continuations were accepted, several tokens a step
    cont = generate(params, cfg, prompts, max_new_tokens=30, drafter=drafter, spec=spec, datastore=store,
                    batch_size=2)  # continuous batching
    assert [cont.tokens[i, : cont.lengths[i]].tolist() for i in range(len(prompts))] == replies


def test_datastore_settings_are_checked(tiny):
    cfg, params, prompts, _, store = tiny
    run = lambda **kw: generate(params, cfg, prompts[:1], max_new_tokens=4, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="datastore beams need a datastore"):
        run(spec=SpecConfig.parse("0x2+1x4ds"))
    with pytest.raises(ValueError, match="a datastore needs a spec with datastore_beams"):
        run(spec=SpecConfig.parse("0x4+1"), datastore=store)
    with pytest.raises(ValueError, match="a datastore needs a spec with datastore_beams"):
        run(datastore=store)
    with pytest.raises(ValueError, match=r"datastore beams of 9 tokens need 2 <= length <= 8"):
        run(spec=SpecConfig.parse("0x2+1x9ds"), datastore=store)
    with pytest.raises(TypeError, match="datastore must be a Datastore"):
        run(spec=SpecConfig.parse("0x2+1x4ds"), datastore="runs/ds.npz")
    with pytest.raises(ValueError, match="nor do datastore beams"):
        SpecConfig(1, 3, datastore_beams=1, acceptance="apple_biased")
    with pytest.raises(ValueError, match="datastore_length must be >= 2"):
        SpecConfig(1, 3, datastore_beams=1, datastore_length=1)
    with pytest.raises(ValueError, match="at least one beam"):
        SpecConfig(0, 3, datastore_beams=-1, lookup_beams=1)
    for text in ["4x3+1x8+1x8ds:9", "0x2+2x5ds", "1x3+2+1x4ds"]:
        spec = SpecConfig.parse(text)
        assert spec.describe() == text and SpecConfig.parse(spec.describe()) == spec
    assert SpecConfig.parse("4x3+1x8+2x5ds").max_nodes == 1 + 4 * 2 + 7 + 2 * 4


def test_build_command_reads_distillation_shards(tmp_path, capsys, tiny):
    cfg, params, prompts, replies, _ = tiny
    for split, rows in (("train", range(4)), ("eval", range(4, 6))):
        os.makedirs(tmp_path / "distill" / split)
        data.write_shard(str(tmp_path / "distill" / split / "shard_00000.npz"),
                         [prompts[i] + replies[i] for i in rows],
                         [[0] * len(prompts[i]) + [1] * len(replies[i]) for i in rows])
    out = tmp_path / "ds" / "store.npz"
    build_cli.main(["--data", str(tmp_path / "distill"), "--out", str(out), "--ngram", "1", "4", "--length", "7"])
    printed = capsys.readouterr().out
    assert f"from {sum(map(len, replies[:4])):,} reply tokens of 4 sequences" in printed and "n=4:" in printed
    store = datastore.load(out, cfg.vocab_size)
    spec = SpecConfig.parse("0x2+2x8ds")
    out = generate(params, cfg, prompts, max_new_tokens=30, spec=spec, datastore=store)
    assert [out.tokens[i, : out.lengths[i]].tolist() for i in range(len(prompts))] == replies
