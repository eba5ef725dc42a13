"""Drafter and beam search against NumPy references; drafter options; config validation."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from redrafter_jax.beam_search import top_w_of_beams
from redrafter_jax.cli import DEFAULT_DRAFTER
from redrafter_jax.config import DrafterConfig, SpecConfig
from redrafter_jax.drafter import Drafter, init_drafter, untrained_drafter
from redrafter_jax.generate import generate
from redrafter_jax.tree import ABSENT
from tests.tiny import tiny_model


def test_two_stage_top_w_is_exact():
    cand = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (5, 4, 50)))
    val, beam, tok = top_w_of_beams(jnp.asarray(cand), 4)
    for r in range(5):
        flat = cand[r].reshape(-1)
        best = np.argsort(-flat)[:4]
        np.testing.assert_array_equal(np.asarray(beam[r]), best // 50)
        np.testing.assert_array_equal(np.asarray(tok[r]), best % 50)
        np.testing.assert_allclose(np.asarray(val[r]), flat[best])


def silu(x):
    return x / (1 + np.exp(-x))


def np_drafter_logprobs(p, cfg, embed, head, context, state):
    x = np.concatenate([context, state])
    if "proj_w" in p:
        x = x @ p["proj_w"] + p["proj_b"]
    for rb in p["resblocks"]:
        x = x + silu(x @ rb["w"] + rb["b"])
    z = x @ head
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def np_rnn(p, cfg, state, emb):
    return silu(emb @ p["rnn_w"] + state @ p["rnn_u"] + p["rnn_b"]) if cfg.rnn else state + emb


def reference_beam_search(p, cfg, embed, head, vocab_map, context, g0, w, length):
    """Plain-Python beam search (the first step expands beam 0 only): the beams kept after every step,
    as the drafter returns them (the final ones, then each earlier step's, ABSENT-padded), and their
    prefix scores (-inf padded)."""
    beams = [([g0], [0.0], np_rnn(p, cfg, np.zeros_like(context), embed[g0]))]
    kept = []
    for _ in range(length - 1):
        cand = []
        for bi, (toks, scores, state) in enumerate(beams):
            lp = np_drafter_logprobs(p, cfg, embed, head, context, state)
            cand += [(scores[-1] + lp[t], bi, t) for t in range(len(lp))]
        cand.sort(key=lambda c: -c[0])
        beams = [(beams[bi][0] + [int(vocab_map[t])], beams[bi][1] + [s],
                  np_rnn(p, cfg, beams[bi][2], embed[vocab_map[t]])) for s, bi, t in cand[:w]]
        kept = [(toks + [ABSENT] * (length - len(toks)), scores + [-np.inf] * (length - len(toks)))
                for toks, scores, _ in beams] + kept
    return np.array([k[0] for k in kept]), np.array([k[1] for k in kept])


OPTIONS = {
    "apple": dict(),
    "rnn_off": dict(rnn=False),
    "projected": dict(exit_dim=24),
    "shared_head": dict(exit_dim=32, share_lm_head=True),
    "draft_vocab": dict(draft_vocab_size=20, num_resblocks=1),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_beam_search_matches_reference(option):
    cfg, tparams = tiny_model(scale=0.5)
    dcfg = DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, **OPTIONS[option])
    vocab_map = np.sort(np.random.default_rng(0).choice(cfg.vocab_size, 20, replace=False)) \
        if dcfg.draft_vocab_size else None
    dparams = init_drafter(dcfg, jax.random.PRNGKey(1), None if vocab_map is None else jnp.asarray(vocab_map))
    drafter = Drafter(dparams, dcfg)
    context = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (3, cfg.hidden_size)))
    g0 = np.array([4, 9, 33])
    w, length = 4, 4
    draft = jax.jit(drafter.draft, static_argnums=(4, 5))(tparams, jnp.asarray(context), jnp.asarray(g0),
                                                           jnp.zeros(3, jnp.int32), w, length)
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), dparams)
    embed = np.asarray(tparams["embed"], np.float64)
    target_head = np.asarray(tparams["lm_head"], np.float64) if "lm_head" in tparams else embed.T
    head = target_head if dcfg.share_lm_head else p["lm_head"]
    vm = vocab_map if vocab_map is not None else np.arange(cfg.vocab_size)
    for r in range(3):
        beams, scores = reference_beam_search(p, dcfg, embed, head, vm, context[r], g0[r], w, length)
        np.testing.assert_array_equal(np.asarray(draft.beams[r]), beams)
        np.testing.assert_allclose(np.asarray(draft.scores[r]), scores, rtol=1e-4, atol=1e-4)
        # W distinct beams per length, so at most W(L-1) distinct drafted nodes (the tree's room)
        assert len({tuple(b) for b in beams}) == w * (length - 1)
        assert np.isfinite(scores).sum() == w * (length - 1) * (length + 2) // 2  # sum over d of W(d + 1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(beam_width=0), "at least one beam"),
    (dict(beam_width=-1, lookup_beams=2), "beam_width >= 0"),
    (dict(beam_length=1), "beam_length must be >= 2"),
    (dict(beam_width=4, beam_length=4, tree_budget=1), "tree_budget must be in"),
    (dict(beam_width=2, beam_length=3, tree_budget=6), "tree_budget must be in"),
])
def test_bad_spec_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpecConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(share_lm_head=True), "needs exit_dim == hidden_size"),
    (dict(draft_vocab_size=0), "draft_vocab_size must be in"),
    (dict(num_resblocks=-1), "num_resblocks"),
])
def test_bad_drafter_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DrafterConfig(hidden_size=32, vocab_size=64, **kwargs)


def test_reduced_vocabulary_needs_a_map():
    with pytest.raises(ValueError, match="vocab_map"):
        init_drafter(DrafterConfig(hidden_size=32, vocab_size=64, draft_vocab_size=8), jax.random.PRNGKey(0))


def test_untrained_drafter_has_the_shipped_drafters_shape_and_decodes_exactly():
    with open(os.path.join(DEFAULT_DRAFTER, "drafter_config.json")) as f:
        shipped = json.load(f)["config"]
    for cfg, params in (tiny_model(), tiny_model(vocab_size=8192 + 5, hidden_size=48, head_dim=12)):
        d = untrained_drafter(cfg)
        got = dataclasses.asdict(d.config)
        assert got == {**shipped, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
                       "exit_dim": cfg.hidden_size, "apple_warp": False,
                       "draft_vocab_size": min(shipped["draft_vocab_size"], cfg.vocab_size)}
        ids = np.asarray(d.params["vocab_map"])  # distinct target tokens, spread over the vocabulary
        assert len(set(ids.tolist())) == len(ids) and ids.max() < cfg.vocab_size and ids.max() >= cfg.vocab_size // 2
        prompts = [[5, 6, 7], [9, 3]]
        ar = generate(params, cfg, prompts, max_new_tokens=8)
        out = generate(params, cfg, prompts, max_new_tokens=8, drafter=d, spec=SpecConfig(2, 3))
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ar.tokens))
