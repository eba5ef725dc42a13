"""Prompt caches (`generate(..., keep_cache=True)`, then `generate(..., cache=out.cache)`): a chat's next
turn prefills only what follows the text its row's cache holds, and decodes as with a full prefill."""

import os

import jax
import numpy as np
import pytest

from redrafter_jax.checkpoint import load_drafter
from redrafter_jax.config import DrafterConfig, SamplingConfig, SpecConfig
from redrafter_jax.drafter import Drafter, init_drafter
from redrafter_jax.generate import generate
from tests.test_speculative import rows
from tests.tiny import tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1, scale=0.8, max_position_embeddings=256)


@pytest.fixture(scope="module")
def decoders(model):
    """generate()'s keywords per decoder: autoregressive, lookup beams alone, drafter and lookup beams."""
    cfg, _ = model
    dcfg = DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, num_resblocks=1)
    drafter = Drafter(init_drafter(dcfg, jax.random.PRNGKey(2)), dcfg)
    return {"autoregressive": {}, "lookup": {"spec": SpecConfig.parse("0x4+2")},
            "drafter": {"drafter": drafter, "spec": SpecConfig.parse("2x3+1x5:6")}}


def first_turn(model, **kw):
    """Four prompts of 9-34 tokens and limits of 20-30 tokens (three rows end by EOS, one at its limit),
    decoded with keep_cache."""
    cfg, params = model
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, 64, n).tolist() for n in (34, 5, 22, 38, 11, 40, 9)][::2]
    out = generate(params, cfg, prompts, max_new_tokens=[30, 20, 30, 25], keep_cache=True, **kw)
    return prompts, out


def next_turn(prompts, out, seed=1):
    """Each row's text so far (prompt, then reply) and a new message of 3-9 tokens."""
    rng = np.random.default_rng(seed)
    return [p + r + rng.integers(2, 64, rng.integers(3, 10)).tolist() for p, r in zip(prompts, rows(out))]


@pytest.mark.parametrize("first", ["autoregressive", "drafter"])
def test_the_cache_holds_each_prompt_and_its_output_up_to_the_last_token(model, decoders, first):
    cfg, _ = model
    prompts, out = first_turn(model, **decoders[first])
    c = out.cache
    assert [r[-1] in cfg.eos_token_ids for r in rows(out)] == [False, True, True, True]
    for b, (p, r) in enumerate(zip(prompts, rows(out))):
        n = int(c.lengths[b])
        # The last output token is the next step's input, in the cache only when a speculative step accepted
        # tokens after an EOS (they are not counted)
        assert n == len(p) + len(r) - 1 or (first != "autoregressive" and n == len(p) + len(r))
        assert np.asarray(c.tokens[b, :n]).tolist() == (p + r)[:n]
    assert c.kv.batch_size == len(prompts) and (np.asarray(c.kv.pending_slots) == c.kv.max_len).all()


def test_reused_tokens_are_the_longest_common_prefix_short_of_the_last(model):
    prompts, out = first_turn(model)
    held = [np.asarray(out.cache.tokens[b, :out.cache.lengths[b]]).tolist() for b in range(len(prompts))]
    cont = next_turn(prompts, out)
    changed = list(cont[2])
    changed[3] = 1 if changed[3] != 1 else 2
    asked = [cont[0], held[1], changed, [63] + held[3]]  # continued, exactly the cached text, edited, shifted

    def common(a, b):
        n = 0
        while n < min(len(a) - 1, len(b)) and a[n] == b[n]:
            n += 1
        return n

    want = [common(a, h) for a, h in zip(asked, held)]
    assert want == [len(held[0]), len(held[1]) - 1, 3, 0]
    assert out.cache.reused(asked).tolist() == want


@pytest.mark.parametrize("first", ["autoregressive", "lookup", "drafter"])
def test_a_continued_turn_decodes_as_with_a_full_prefill(model, decoders, first):
    """Whatever decoded the first turn, every decoder's next turn from its cache equals the next turn
    decoded from scratch (greedy, and sampled with the same key), and a third turn from the second's cache too."""
    cfg, params = model
    prompts, out = first_turn(model, **decoders[first])
    cont = next_turn(prompts, out)
    assert (out.cache.reused(cont) > np.asarray([len(p) for p in prompts])).all()
    hot = dict(sampling=SamplingConfig(temperature=1.0), key=jax.random.PRNGKey(5))
    for sampling in ({}, hot):
        want = rows(generate(params, cfg, cont, max_new_tokens=12, **sampling))
        for name, kw in decoders.items():
            if sampling and name != "autoregressive":  # sampled speculative: other draws, same distribution
                continue
            second = generate(params, cfg, cont, max_new_tokens=12, cache=out.cache, keep_cache=True, **kw, **sampling)
            assert rows(second) == want, name
    third = next_turn(cont, second, seed=2)
    want = rows(generate(params, cfg, third, max_new_tokens=12))
    for name, kw in decoders.items():
        assert rows(generate(params, cfg, third, max_new_tokens=12, cache=second.cache, **kw)) == want, name


def test_some_rows_of_a_cache_continue_alone(model, decoders):
    cfg, params = model
    prompts, out = first_turn(model, **decoders["drafter"])
    cont = next_turn(prompts, out)
    picked = out.cache.take([3, 1])
    assert picked.reused([cont[3], cont[1]]).tolist() == out.cache.reused(cont)[[3, 1]].tolist()
    want = rows(generate(params, cfg, [cont[3], cont[1]], max_new_tokens=12))
    for name, kw in decoders.items():
        assert rows(generate(params, cfg, [cont[3], cont[1]], max_new_tokens=12, cache=picked, **kw)) == want, name
    for bad in ([], [4], [[0]], [-1]):
        with pytest.raises(ValueError, match="rows must be a non-empty list of row indices below 4"):
            out.cache.take(bad)


def test_a_shared_prefix_is_prefilled_once_for_a_batch(model, decoders):
    """A system prompt every request starts with: its cache (one row, one new token) taken once per row."""
    cfg, params = model
    rng = np.random.default_rng(3)
    system = rng.integers(2, 64, 40).tolist()
    asked = [system + rng.integers(2, 64, n).tolist() for n in (3, 9, 1)]
    shared = generate(params, cfg, [system], max_new_tokens=1, keep_cache=True).cache.take([0, 0, 0])
    assert shared.reused(asked).tolist() == [40, 40, 40]
    want = rows(generate(params, cfg, asked, max_new_tokens=10))
    for name, kw in decoders.items():
        assert rows(generate(params, cfg, asked, max_new_tokens=10, cache=shared, **kw)) == want, name


@pytest.mark.parametrize("name", ["autoregressive", "drafter"])
def test_a_chat_with_a_fixed_max_len_compiles_its_loop_once_and_nothing_after_the_second_turn(model, decoders,
                                                                                              name):
    """Five turns, each continuing the last one's cache with max_len fixed: the same outputs as full
    prefills without it, one decode loop for all, and no new prefill after the second turn's (the first
    has no cache to continue)."""
    from redrafter_jax import generate as gen

    cfg, params = model
    loop = gen._speculative_jit if name == "drafter" else gen._autoregressive_jit
    rng = np.random.default_rng(4)
    ids, cache, compiled = rng.integers(2, 64, 30).tolist(), None, []
    for turn in range(5):
        before = loop._cache_size(), gen._prefill_jit._cache_size()
        out = generate(params, cfg, [ids], max_new_tokens=12, cache=cache, keep_cache=True, max_len=256,
                       **decoders[name])
        compiled.append((loop._cache_size() - before[0], gen._prefill_jit._cache_size() - before[1]))
        assert rows(out) == rows(generate(params, cfg, [ids], max_new_tokens=12)), turn
        ids, cache = ids + rows(out)[0] + rng.integers(2, 64, rng.integers(3, 20)).tolist(), out.cache
        assert cache.kv.max_len == 256
    assert [c for c, _ in compiled[1:]] == [0] * 4 and [c for _, c in compiled[2:]] == [0] * 3
    assert len(ids) > 100  # prompts of 30 to 100+ tokens
    with pytest.raises(ValueError, match=r"max_len 128 is too small: the prompt block of 160 tokens, max_new_tokens "
                                         r"12 and a step's 1 writes need 192 cache slots"):
        generate(params, cfg, [ids[:150]], max_new_tokens=12, max_len=128)
    with pytest.raises(ValueError, match="max_len must be a positive integer"):
        generate(params, cfg, [ids], max_new_tokens=12, max_len=0)


def test_prompt_cache_misuse_is_named(model, decoders):
    cfg, params = model
    prompts, out = first_turn(model)
    cont = next_turn(prompts, out)
    other_cfg, other_params = tiny_model(num_layers=3)
    cases = [
        (dict(cache=out.cache), cont[:2], ValueError, "cache holds 4 rows but 2 prompts were given"),
        (dict(cache=out.cache), cont, None, None),
        (dict(cache=out.cache, batch_size=2), cont, ValueError, "not with continuous batching"),
        (dict(keep_cache=True, batch_size=2), cont, ValueError, "not with continuous batching"),
        (dict(keep_cache="yes"), cont, TypeError, "keep_cache must be True or False"),
        (dict(cache=out.tokens), cont, TypeError, "cache must be the PromptCache of an earlier generate"),
    ]
    for kw, asked, error, match in cases:
        if error is None:
            generate(params, cfg, asked, max_new_tokens=4, **kw)
            continue
        with pytest.raises(error, match=match):
            generate(params, cfg, asked, max_new_tokens=4, **kw)
    with pytest.raises(ValueError, match=r"cache was made by another model: \(layers, KV heads, head dim\) "
                                         r"\(2, 2, 8\), this model's \(3, 2, 8\)"):
        generate(other_params, other_cfg, cont, max_new_tokens=4, cache=out.cache)


def test_smollm_second_turn_reuses_the_first_and_stays_exact(smollm, chat_prompts):
    """The real model's two-turn chat, the second prompt made from the first reply's text as the chat
    template renders it: nearly all of it comes from the cache, and speculative decoding from that cache
    equals autoregressive decoding from it and from a full prefill."""
    cfg, params, tok = smollm.config, smollm.params, smollm.tokenizer
    drafter = load_drafter(os.path.join(ROOT, "drafters", "smollm2-135m"), cfg)
    questions = ["What is the capital of France?", "Write a haiku about the sea."]
    chats = [[{"role": "user", "content": q}] for q in questions]
    first = generate(params, cfg, chat_prompts[:2], max_new_tokens=48, drafter=drafter, keep_cache=True)
    follow = [tok.encode_chat([*chat, {"role": "assistant", "content": tok.decode(r)},
                               {"role": "user", "content": "Say that again in fewer words."}])
              for chat, r in zip(chats, rows(first))]
    reused = first.cache.reused(follow)
    assert (reused >= np.asarray(first.cache.lengths) - 2).all()  # all but the reply's end, as re-encoded
    assert (np.asarray([len(f) for f in follow]) - reused < 24).all()  # the new message is what is prefilled
    want = rows(generate(params, cfg, follow, max_new_tokens=32))
    assert rows(generate(params, cfg, follow, max_new_tokens=32, cache=first.cache)) == want
    assert rows(generate(params, cfg, follow, max_new_tokens=32, cache=first.cache, drafter=drafter)) == want
