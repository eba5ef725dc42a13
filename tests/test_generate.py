"""Autoregressive generation: exactness against uncached recomputation, batching, EOS, limits, errors."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from redrafter_jax.config import RopeScaling, SpecConfig
from redrafter_jax.generate import generate
from redrafter_jax.model import forward_causal
from redrafter_jax.sampling import Sampling, SamplingConfig
from tests.tiny import exact_next_token_probs, tiny_model


def rows(out):
    return [np.asarray(out.tokens[b, : out.lengths[b]]).tolist() for b in range(out.tokens.shape[0])]


def test_greedy_chat_is_coherent_and_matches_uncached_recomputation(smollm, chat_prompts):
    cfg, params, tok = smollm.config, smollm.params, smollm.tokenizer
    prompts = [chat_prompts[0], chat_prompts[1]]
    out = generate(params, cfg, prompts, max_new_tokens=24)
    texts = [tok.decode(r) for r in rows(out)]
    assert "Paris" in texts[0]
    assert "sea" in texts[1].lower() and "wave" in texts[1].lower()
    for prompt, gen in zip(prompts, rows(out)):
        # Each generated token must be the argmax of an uncached causal forward over everything before it.
        seq = jnp.asarray([prompt + gen])
        logits = forward_causal(params, cfg, seq).logits[0]
        expected = np.asarray(jnp.argmax(logits[len(prompt) - 1: len(prompt) + len(gen) - 1], -1))
        assert gen == expected.tolist()


def test_batch_rows_equal_single_prompt_runs(smollm, chat_prompts):
    cfg, params = smollm.config, smollm.params
    assert len({len(p) for p in chat_prompts}) == len(chat_prompts)  # really different lengths
    batched = rows(generate(params, cfg, chat_prompts, max_new_tokens=20))
    for prompt, got in zip(chat_prompts, batched):
        assert got == rows(generate(params, cfg, [prompt], max_new_tokens=20))[0]


def test_rows_end_at_eos_or_their_own_limit(smollm, chat_prompts):
    cfg, params = smollm.config, smollm.params
    out = generate(params, cfg, chat_prompts[:2], max_new_tokens=[40, 7])
    lengths = np.asarray(out.lengths)
    toks = np.asarray(out.tokens)
    assert toks[0, lengths[0] - 1] in cfg.eos_token_ids and lengths[0] < 40  # "The capital ... Paris."
    assert lengths[1] == 7 and not np.isin(toks[1, :7], cfg.eos_token_ids).any()
    assert (toks[0, lengths[0]:] == cfg.pad_token_id).all()


def test_sampling_is_reproducible_per_key_and_topk1_is_greedy():
    cfg, params = tiny_model()
    prompts = [[3, 4, 5], [6, 7]]
    s = SamplingConfig(temperature=1.0)
    a = rows(generate(params, cfg, prompts, max_new_tokens=12, sampling=s, key=jax.random.PRNGKey(1)))
    b = rows(generate(params, cfg, prompts, max_new_tokens=12, sampling=s, key=jax.random.PRNGKey(1)))
    c = rows(generate(params, cfg, prompts, max_new_tokens=12, sampling=s, key=jax.random.PRNGKey(2)))
    assert a == b and a != c
    greedy = rows(generate(params, cfg, prompts, max_new_tokens=12))
    top1 = rows(generate(params, cfg, prompts, max_new_tokens=12,
                         sampling=SamplingConfig(temperature=0.7, top_k=1), key=jax.random.PRNGKey(3)))
    assert top1 == greedy


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(1.0, 0, 1.0, 0.0), (0.6, 0, 1.0, 0.0), (1.5, 5, 1.0, 0.0),
                                                          (1.0, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.3)])
def test_first_sampled_token_follows_target_distribution(temperature, top_k, top_p, min_p):
    from scipy import stats

    cfg, params = tiny_model(vocab_size=12, scale=0.2)  # a spread-out distribution
    prompt = [3, 4, 5]
    n = 6000
    out = generate(params, cfg, [prompt] * n, max_new_tokens=1, key=jax.random.PRNGKey(0),
                   sampling=SamplingConfig(temperature, top_k, top_p, min_p))
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=cfg.vocab_size)
    p = exact_next_token_probs(forward_causal(params, cfg, jnp.asarray([prompt])).logits[0, -1],
                               temperature, top_k, top_p, min_p)
    assert counts[p == 0].sum() == 0  # filtered tokens never appear
    support = p > 0
    filtered = top_k or top_p < 1 or min_p
    assert 3 <= support.sum() and (support.sum() < cfg.vocab_size if filtered else support.sum() >= 11)
    _, pvalue = stats.chisquare(counts[support], n * p[support])
    assert pvalue > 1e-3


@pytest.mark.parametrize("prompts,max_new,match", [
    ([], 4, "no prompts"),
    ([[5, 6], []], 4, "prompt 1 is empty"),
    ([[5] * 120], 20, "exceeds the model's context length of 128"),
    ([[5, 99]], 4, "outside"),
    ([[5, 6]], 0, "max_new_tokens must be >= 1"),
])
def test_bad_generate_inputs_raise_clear_errors(prompts, max_new, match):
    cfg, params = tiny_model()
    with pytest.raises(ValueError, match=match):
        generate(params, cfg, prompts, max_new_tokens=max_new)


def test_yarn_extends_the_context_to_its_original_length_times_its_factor():
    """Qwen's configs keep the unscaled max_position_embeddings when YaRN is added: the context is the
    original one times the factor, and a sequence past max_position_embeddings decodes exactly."""
    cfg, params = tiny_model(max_position_embeddings=32,
                             rope_scaling=RopeScaling("yarn", factor=4.0, original_max_position=16))
    assert cfg.context_length == 64
    prompt = list(range(2, 50))
    gen = rows(generate(params, cfg, [prompt], max_new_tokens=8))[0]
    logits = forward_causal(params, cfg, jnp.asarray([prompt + gen])).logits[0]
    assert gen == np.asarray(jnp.argmax(logits[len(prompt) - 1:-1], axis=-1)).tolist()
    with pytest.raises(ValueError, match="context length of 64"):
        generate(params, cfg, [prompt], max_new_tokens=17)
    linear = dataclasses.replace(cfg, rope_scaling=RopeScaling("linear", factor=4.0))
    with pytest.raises(ValueError, match="context length of 32"):
        generate(params, linear, [prompt], max_new_tokens=8)


def test_sampling_without_key_and_bad_sampling_settings_raise():
    cfg, params = tiny_model()
    with pytest.raises(ValueError, match="explicit PRNG key"):
        generate(params, cfg, [[3]], max_new_tokens=2, sampling=SamplingConfig(temperature=1.0))
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match=r"min_p must be in \[0, 1\], got 1.5"):
        SamplingConfig(temperature=1.0, min_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)


MOE = dict(num_experts=4, experts_per_token=2, expert_size=16)


@pytest.mark.parametrize("dtype,expected,experts", [("float32", "HIGHEST", {}), ("bfloat16", "DEFAULT", {}),
                                                    ("float32", "HIGHEST", MOE)])
def test_float32_models_decode_with_float32_matrix_products(dtype, expected, experts):
    """The prefill and both decode loops, target and drafter, lowered as generate() lowers them: every
    product of a float32 model at HIGHEST precision (no TF32 on GPUs), whatever the global default; a
    mixture of experts' too, gathered (a step's) and grouped (a tree's)."""
    import re

    from redrafter_jax import generate as gen
    from redrafter_jax.config import DrafterConfig, SpecConfig
    from redrafter_jax.decode import prepare_prompts
    from redrafter_jax.drafter import Drafter, init_drafter

    cfg, params = tiny_model(dtype=dtype, **experts)
    dcfg = DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, dtype=dtype)
    drafter = Drafter(init_drafter(dcfg, jax.random.PRNGKey(1)), dcfg)
    block, lengths, limits = prepare_prompts(cfg, [[5, 6, 7]], 4)
    loop_args = (params, params, block, lengths, limits, jax.random.PRNGKey(0))
    common = dict(sampling=Sampling.of(SamplingConfig()), max_new_tokens=4, stream=None)
    with jax.default_matmul_precision("default"):  # the tests' global "highest" must not decide it
        prefill = dict(prompts=block, prompt_lengths=lengths, max_len=64)
        cache, *first = jax.eval_shape(lambda: gen._call(gen._prefill_jit, cfg, params, **prefill))
        texts = [gen._call(gen._prefill_jit.lower, cfg, params, **prefill),
                 gen._call(gen._autoregressive_jit.lower, cfg, cache, first, *loop_args, **common),
                 gen._call(gen._speculative_jit.lower, cfg, cache, first, *loop_args[:2], drafter, None,
                           *loop_args[2:], spec=SpecConfig(2, 3, lookup_beams=1), **common)]
    for text in (t.as_text() for t in texts):
        precisions = re.findall(r"(?:stablehlo.dot_general|chlo.ragged_dot) .*?precision = \[(\w+), (\w+)\]", text)
        assert len(precisions) > 10
        assert set(p for pair in precisions for p in pair) == {expected}


@pytest.mark.parametrize("speculative", [False, True])
def test_streamed_chunks_are_numpy_and_add_up_to_the_output(speculative):
    """Each row's streamed chunks, in order, are its output tokens; a callback gets numpy arrays (slicing
    jax.Arrays there would dispatch, and compile, while the loop waits)."""
    cfg, params = tiny_model()
    prompts = [[3, 4, 5, 3, 4], [6, 7]]
    chunks = [[], []]

    def stream(tokens, counts):
        assert isinstance(tokens, np.ndarray) and isinstance(counts, np.ndarray)
        for b in range(2):
            chunks[b].extend(tokens[b, : counts[b]].tolist())

    spec = dict(spec=SpecConfig(0, 3, lookup_beams=2)) if speculative else {}
    out = generate(params, cfg, prompts, max_new_tokens=[9, 5], stream=stream, **spec)
    assert chunks == rows(out)


@pytest.mark.parametrize("speculative", [False, True])
def test_an_exception_in_the_stream_callback_is_raised_as_it_was(speculative):
    """Not an opaque XLA runtime error: the callback's own exception, once decoding has finished; it is
    not called again after it raised, and the next call decodes as before."""
    cfg, params = tiny_model()
    spec = dict(spec=SpecConfig(0, 3, lookup_beams=2)) if speculative else {}
    calls = []

    class ClientGone(Exception):
        pass

    def stream(tokens, counts):
        calls.append(int(counts[0]))
        if len(calls) == 2:
            raise ClientGone("the client went away")

    with pytest.raises(ClientGone, match="the client went away"):
        generate(params, cfg, [[3, 4, 5, 3, 4]], max_new_tokens=12, stream=stream, **spec)
    assert len(calls) == 2
    out = generate(params, cfg, [[3, 4, 5, 3, 4]], max_new_tokens=12, stream=lambda t, c: calls.append(int(c[0])),
                   **spec)
    assert len(calls) > 3 and sum(calls[2:]) == int(out.lengths[0])


def test_a_new_stream_callback_reuses_the_compiled_loop():
    """The callback is not part of the compiled program: a new one (as a notebook cell makes each
    time) runs the same loop, and gets its own call's tokens."""
    from redrafter_jax import decode
    from redrafter_jax import generate as gen

    cfg, params = tiny_model(seed=5)
    spec = SpecConfig(0, 3, lookup_beams=1)
    seen = []
    generate(params, cfg, [[3, 4, 5]], max_new_tokens=6, spec=spec, stream=lambda t, c: seen.append(("a", c[0])))
    compiled = gen._speculative_jit._cache_size()
    out = generate(params, cfg, [[3, 4, 5]], max_new_tokens=6, spec=spec, stream=lambda t, c: seen.append(("b", c[0])))
    assert gen._speculative_jit._cache_size() == compiled
    assert sum(c for who, c in seen if who == "a") == sum(c for who, c in seen if who == "b") == int(out.lengths[0])
    assert not decode._RECEIVERS  # each call's callback is dropped when it returns


@pytest.mark.parametrize("spec", [None, SpecConfig(0, 3, lookup_beams=1)], ids=["autoregressive", "speculative"])
def test_limits_within_one_cache_share_one_compiled_loop(spec):
    """The loop is compiled for the tokens its cache has room for (slots rounded up to 64), not for the
    limit asked: prompts of up to 32 tokens and 1..~30 new tokens share a cache of 64 slots and one
    program, and each call's output still has the columns (and steps) it asked for."""
    from redrafter_jax import generate as gen

    cfg, params = tiny_model(seed=5)
    loop = gen._autoregressive_jit if spec is None else gen._speculative_jit
    prompts = [[3, 4, 5], [6, 7, 8, 9, 3, 4]]
    longest = generate(params, cfg, prompts, max_new_tokens=24, spec=spec)
    compiled = loop._cache_size()
    for n in (1, 5, [9, 17]):
        out = generate(params, cfg, prompts, max_new_tokens=n, spec=spec)
        assert out.tokens.shape == (2, np.max(n)) and np.asarray(out.lengths).tolist() == np.broadcast_to(n, 2).tolist()
        assert rows(out) == [r[:k] for r, k in zip(rows(longest), np.broadcast_to(n, 2))]
        assert spec is None or out.accepted.shape == (2, np.max(n))
    assert loop._cache_size() == compiled
    generate(params, cfg, prompts, max_new_tokens=60, spec=spec)  # past the 64 slots: a cache of 128, compiled
    assert loop._cache_size() == compiled + 1


def test_the_loops_share_one_prefill_program_and_update_its_cache_in_place():
    """The prefill is compiled once for the autoregressive loop and every speculative setting on the same
    prompt block and cache; each loop takes its cache as a donated input and writes its final cache over
    it (with or without keep_cache), so XLA holds one cache, not two."""
    from redrafter_jax import generate as gen

    cfg, params = tiny_model(seed=5)
    prompts = [[3, 4, 5], [6, 7, 8, 9, 3, 4]]
    spec = SpecConfig(0, 3, lookup_beams=1)
    want = rows(generate(params, cfg, prompts, max_new_tokens=9))
    compiled = gen._prefill_jit._cache_size()
    assert rows(generate(params, cfg, prompts, max_new_tokens=9, spec=spec)) == want  # a cache of 64 slots too
    assert gen._prefill_jit._cache_size() == compiled
    # A cache of 4096 slots: k and v of 2 rows in float32, the largest buffer by far
    long = dataclasses.replace(cfg, max_position_embeddings=8192)
    cache = 2 * cfg.num_layers * 2 * cfg.num_kv_heads * 4096 * cfg.head_dim * 4
    for kw in ({"keep_cache": True}, {"spec": spec}):  # the final cache kept, and not
        memory = gen.lower(params, long, prompts, max_new_tokens=4000, **kw).compile().memory_analysis()
        assert memory.alias_size_in_bytes >= cache > memory.temp_size_in_bytes, kw


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="a process's memory maps are counted on Linux")
def test_compiled_loops_are_dropped_once_a_compilation_passes_half_the_memory_map_limit(monkeypatch):
    """XLA:CPU aborts the process at the kernel's limit of memory maps, and every compiled program holds
    hundreds of them: generate drops its compiled decode loops once a compilation took the process past
    half the limit, and decodes the same as before."""
    from redrafter_jax import generate as gen

    monkeypatch.undo()  # conftest turned the drop off for the other tests
    assert gen._map_limit() == int(open("/proc/sys/vm/max_map_count").read())
    cfg, params = tiny_model(seed=6)
    run = lambda n, **kw: rows(generate(params, cfg, [[3, 4, 5, 3, 4]], max_new_tokens=n, **kw))  # noqa: E731
    monkeypatch.setattr(gen, "_map_limit", lambda: 10**9)
    for loop in gen._DECODE_LOOPS:  # (whatever the tests before compiled)
        loop.clear_cache()
    want = {n: run(n) for n in (7, 40)}  # caches of 64 and 128 slots: two programs
    assert gen._compiled_loops() == 4  # far from the limit: kept (a prefill and a loop per cache size)
    maps = sum(1 for _ in open("/proc/self/maps"))
    monkeypatch.setattr(gen, "_map_limit", lambda: maps)  # now past half of it
    assert run(7) == want[7] and gen._compiled_loops() == 4  # nothing compiled, nothing dropped
    assert run(40, spec=SpecConfig(0, 3, lookup_beams=1)) == want[40]  # a new loop: compiled, then all dropped
    assert gen._compiled_loops() == 0
    assert run(7) == want[7]
