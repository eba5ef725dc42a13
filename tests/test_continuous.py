"""Continuous batching (`generate(..., batch_size=B)` with more prompts than B): every prompt's output
is the one it gets decoded alone, whatever row it takes and when; bad settings are named."""

import jax
import numpy as np
import pytest

from redrafter_jax.config import DrafterConfig, SamplingConfig, SpecConfig
from redrafter_jax.drafter import Drafter, init_drafter
from redrafter_jax.generate import generate
from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1, scale=0.8, max_position_embeddings=256)


@pytest.fixture(scope="module")
def prompts():
    """Seven prompts of 5-40 tokens and limits of 1-30 tokens: rows end at different steps, some by EOS;
    waiting prompts are prefilled in blocks of 32 or 64 tokens (the whole block's)."""
    rng = np.random.default_rng(0)
    texts = [rng.integers(2, 64, n).tolist() for n in (34, 5, 22, 38, 11, 40, 9)]  # from the 4th, they wait
    return texts, rng.integers(1, 30, 7).tolist()


def alone(params, cfg, prompts, limits, **kw):
    return [generate(params, cfg, [p], max_new_tokens=[n], **kw) for p, n in zip(prompts, limits)]


@pytest.mark.parametrize("decoding", ["autoregressive", "lookup", "drafter"])
def test_every_prompt_decodes_as_alone(model, prompts, decoding):
    cfg, params = model
    texts, limits = prompts
    kw = {}
    if decoding == "lookup":
        kw["spec"] = SpecConfig.parse("0x4+2")
    elif decoding == "drafter":
        dcfg = DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, num_resblocks=1)
        kw = {"drafter": Drafter(init_drafter(dcfg, jax.random.PRNGKey(2)), dcfg), "spec": SpecConfig.parse("2x3+1:4")}
    refs = alone(params, cfg, texts, limits, **kw)
    assert any(int(r.tokens[0, r.lengths[0] - 1]) in cfg.eos_token_ids for r in refs)  # some rows end by EOS
    for batch_size in (1, 3):
        streamed = [[] for _ in texts]

        def stream(tokens, counts, prompts):
            assert tokens.shape[0] == counts.shape[0] == prompts.shape[0] in (batch_size, 1)  # a step's rows, a seat
            for t, c, p in zip(tokens, counts, prompts):
                streamed[p].extend(t[:c].tolist())

        out = generate(params, cfg, texts, max_new_tokens=limits, batch_size=batch_size, stream=stream, **kw)
        for i, r in enumerate(refs):
            n = int(r.lengths[0])
            assert int(out.lengths[i]) == n
            np.testing.assert_array_equal(out.tokens[i, :n], r.tokens[0, :n])
            assert streamed[i] == r.tokens[0, :n].tolist()  # each prompt's tokens streamed in order, as its own
            assert (np.asarray(out.tokens[i, n:]) == cfg.pad_token_id).all()
            if decoding != "autoregressive":  # per-step acceptances follow the prompt, not its row
                got, want = np.asarray(out.accepted[i]), np.asarray(r.accepted[0])
                np.testing.assert_array_equal(got[:len(want)], want)
                assert (got[len(want):] == -1).all()
        # B rows in turn: at least the steps of the longest prompt, at most those of all prompts one by one
        steps = [int(r.num_steps) for r in refs]
        assert max(steps) <= out.num_steps <= sum(steps) + len(texts)


def test_sampled_rows_are_reproducible_per_key(model, prompts):
    cfg, params = model
    texts, limits = prompts
    run = lambda seed: generate(params, cfg, texts, max_new_tokens=limits, batch_size=3,  # noqa: E731
                                sampling=SamplingConfig(1.0), key=jax.random.PRNGKey(seed))
    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


@pytest.mark.parametrize("batch_size, match", [
    (0, "batch_size must be a positive integer"), (-2, "batch_size must be a positive integer"),
    (1.5, "batch_size must be a positive integer"), (True, "batch_size must be a positive integer")])
def test_bad_batch_sizes_are_named(model, batch_size, match):
    cfg, params = model
    with pytest.raises(ValueError, match=match):
        generate(params, cfg, [[2, 3], [4, 5]], max_new_tokens=2, batch_size=batch_size)


def test_a_stream_gets_each_rows_prompt_with_a_batch_size_and_a_callback_without_it_is_named(model):
    cfg, params = model
    prompts = [[2, 3], [4, 5]]
    with pytest.raises(ValueError, match=r"stream\(tokens, counts, prompts\) when generate is given a batch_size"):
        generate(params, cfg, prompts, max_new_tokens=2, batch_size=1, stream=lambda tokens, counts: None)
    with pytest.raises(ValueError, match=r"stream\(tokens, counts\) \(with a batch_size"):
        generate(params, cfg, prompts, max_new_tokens=2, stream=lambda tokens, counts, prompts: None)
    with pytest.raises(TypeError, match="stream must be a callable"):
        generate(params, cfg, prompts, max_new_tokens=2, stream=[])
    got = []  # a batch_size that seats every prompt at once: the same contract, rows in prompt order
    out = generate(params, cfg, prompts, max_new_tokens=2, batch_size=2, stream=lambda t, n, p: got.append(p.tolist()))
    assert got == [[0, 1]] * int(out.num_steps + 1)
