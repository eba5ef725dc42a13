"""Checks that need 8 simulated devices, run in a subprocess by test_sharding.py (JAX fixes the device
count at start-up). Prints one JSON object: each check's name -> its finding."""

import json
import os
import re
import sys
import tempfile
import tracemalloc

import jax
import numpy as np

from redrafter_jax import generate as gen
from redrafter_jax import sharding
from redrafter_jax.config import SamplingConfig
from redrafter_jax.decode import cache_len, prepare_prompts
from redrafter_jax.loaders.hf import load_hf
from redrafter_jax.sampling import Sampling
from tests.mesh_cases import CFG, PARAMS, PROMPTS, SPEC, drafter, proposers, store, train_steps
from tests.test_loaders import MXFP4, gpt_oss_mxfp4_tensors, hf_tensors, write_checkpoint
from tests.test_speculative import _primitives, rows
from tests.tiny import tiny_model

MESHES = ("1x8", "2x4", "8x1")
# One row on a pure model axis and padded onto a pure data axis; four rows split both ways; four prompts
# through two rows (continuous batching) on a model axis.
GENERATION_MESHES = {"greedy/1": ("1x8", "8x1"), "greedy/4": ("2x4",), "sampled/4": ("2x4",),
                     "continuous/4": ("1x8",)}
STREAMED = ("greedy/1", "continuous/4")  # the batch padded for the 8x1 mesh; rows changing prompts


def generation() -> dict:
    """Outputs on each mesh against one device: greedy at batch 1 and 4 (prompts of different lengths),
    sampled with the same key at batch 4, greedy with 4 prompts in 2 rows; autoregressive and
    speculative (drafter, lookup and datastore beams). The `STREAMED` cases stream too: each prompt's
    tokens are its output."""
    spec = proposers()
    hot = dict(sampling=SamplingConfig(temperature=1.0), key=jax.random.PRNGKey(3))
    cases = {"greedy/1": (1, {}), "greedy/4": (4, {}), "sampled/4": (4, hot), "continuous/4": (4, {"batch_size": 2})}
    found = {}
    for name, (batch, kw) in cases.items():
        for loop, extra in (("autoregressive", {}), ("speculative", spec)):
            def run(mesh):
                """The rows, and where streamed each prompt's streamed tokens (a row that pads the batch
                for a mesh would have no prompt here)."""
                streamed = [[] for _ in range(batch)]

                def stream(tokens, counts, prompts=None):
                    for b, (t, c) in enumerate(zip(tokens, counts)):
                        streamed[b if prompts is None else prompts[b]].extend(t[:c].tolist())
                out = rows(gen.generate(PARAMS, CFG, PROMPTS[:batch], max_new_tokens=16, mesh=mesh, **kw, **extra,
                                        stream=stream if name in STREAMED else None))
                return out, streamed if name in STREAMED else out
            want = run(None)
            if name in STREAMED:
                found[f"{loop}/{name}/streamed"] = want[1] == want[0]
            for m in GENERATION_MESHES[name]:
                found[f"{loop}/{name}/{m}"] = run(sharding.parse_mesh(m)) == want
    return found


def continued() -> dict:
    """A next turn on a mesh from the cache its first turn left there (`keep_cache`, then `cache`), against
    one device's full prefill: one prompt padded onto 8x1, four split over 2x4; then the cache moved:
    8x1's padded row continued on one device, 2x4's third row alone on 8x1."""
    found = {}
    meshes = {m: sharding.parse_mesh(m) for m in ("8x1", "2x4")}
    for loop, extra in (("autoregressive", {}), ("speculative", proposers())):
        for batch, m, other, pick in ((1, "8x1", None, [0]), (4, "2x4", meshes["8x1"], [2])):
            first = gen.generate(PARAMS, CFG, PROMPTS[:batch], max_new_tokens=8, mesh=meshes[m], keep_cache=True,
                                 **extra)
            follow = [p + r + [5, 6, 7] for p, r in zip(PROMPTS, rows(first))]
            want = rows(gen.generate(PARAMS, CFG, follow, max_new_tokens=8, **extra))
            found[f"{loop}/{batch}/{m}"] = rows(gen.generate(PARAMS, CFG, follow, max_new_tokens=8, mesh=meshes[m],
                                                             cache=first.cache, **extra)) == want
            moved = gen.generate(PARAMS, CFG, [follow[i] for i in pick], max_new_tokens=8, mesh=other,
                                 cache=first.cache.take(pick), **extra)
            found[f"{loop}/{batch}/{m}/moved"] = rows(moved) == [want[i] for i in pick]
    return found


def compiled_loop() -> dict:
    """The speculative loop on a 2x4 mesh (after its prefill): its while loops, host transfers and collectives."""
    mesh = sharding.parse_mesh("2x4")
    block, lengths, limits = prepare_prompts(CFG, PROMPTS[:2], 8)
    params, *args = gen._place_on_mesh(mesh, CFG, PARAMS, drafter(), store(), block, lengths, limits, None)[:-1]
    key, sampling = jax.device_put((jax.random.PRNGKey(0), Sampling.of(SamplingConfig())),
                                   jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    args = (params, params, *args, key)  # the decode loop's params: the same, as no CPU kernel runs on a mesh
    kw = dict(sampling=sampling, spec=SPEC, max_new_tokens=8, stream=None, mesh=mesh)
    prefill = lambda: gen._call(gen._prefill_jit, CFG, params, prompts=args[4], prompt_lengths=args[5],  # noqa: E731
                                max_len=cache_len(block.shape[1], 8, SPEC.slots), mesh=mesh)
    cache, *first = jax.eval_shape(prefill)
    jaxpr = jax.make_jaxpr(lambda *a: gen._speculative(*a, cfg=CFG, **kw))(cache, first, *args).jaxpr
    prims = _primitives(jaxpr, [])
    text = gen._call(gen._speculative_jit.lower, CFG, cache, first, *args, **kw).compile().as_text()
    with jax.transfer_guard("disallow"):
        cache, *first = prefill()
        jax.block_until_ready(gen._call(gen._speculative_jit, CFG, cache, first, *args, **kw))
    spec = params["layers"][0]["wqkv"].sharding.spec
    return {"while_loops": prims.count("while"), "callbacks": [p for p in prims if "callback" in p],
            "host_ops": sorted(set(re.findall(r"\b(outfeed|infeed|send|recv|host-compute)\(", text))),
            "all_reduces": len(re.findall(r"all-reduce(?:-start)?\(", text)), "wqkv_spec": str(spec),
            "ran_without_transfers": True}


def errors() -> dict:
    cfg, params = tiny_model()  # 2 KV heads
    found = {}
    for m, kw in (("1x8", {}), ("3x1", {}), ("8x1", {"batch_size": 1})):
        try:
            gen.generate(params, cfg, [[3, 4], [5]], max_new_tokens=2, mesh=sharding.parse_mesh(m), **kw)
            found[m] = "no error"
        except ValueError as e:
            found[m] = str(e)
    # a mixture of experts in every layer: its experts' size is split, its unused dense size not
    cfg, params = tiny_model(num_kv_heads=4, intermediate_size=10, num_experts=4, experts_per_token=2, expert_size=10)
    try:
        gen.generate(params, cfg, [[3, 4]], max_new_tokens=2, mesh=sharding.parse_mesh("2x4"))
        found["experts/2x4"] = "no error"
    except ValueError as e:
        found["experts/2x4"] = str(e)
    return found


def training() -> dict:
    """Largest difference from one device, in drafter params and loss, after two training steps on each mesh."""
    params1, loss1 = train_steps(sharding.make_mesh(1, 1, jax.devices()[:1]))
    found = {}
    for m in MESHES:
        params, loss = train_steps(sharding.parse_mesh(m))
        diffs = [np.max(np.abs(a - b)) for a, b in zip(jax.tree_util.tree_leaves(params1),
                                                       jax.tree_util.tree_leaves(params))]
        found[m] = float(max(*diffs, np.max(np.abs(loss1 - loss))))
    return found


def loading() -> dict:
    """A random Llama in bfloat16, saved as two safetensors files, loaded straight onto a 2x4 mesh:
    the host's peak allocation while loading, against the model's size."""
    kw = dict(layers=4, hidden=256, inter=512, heads=8, kv=4, head_dim=32, vocab=4096)
    tensors = hf_tensors("llama", np.random.default_rng(0), **kw)
    with tempfile.TemporaryDirectory() as d:
        write_checkpoint(d, "llama", tensors, sharded=True, stored="bfloat16", num_hidden_layers=4, vocab_size=4096,
                         hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4,
                         head_dim=32)
        mesh = sharding.parse_mesh("2x4")
        tracemalloc.start()
        m = load_hf(d, "bfloat16", mesh)
        jax.block_until_ready(m.params)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        one = load_hf(d, "bfloat16")
        same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree_util.tree_leaves(m.params),
                                                                                 jax.tree_util.tree_leaves(one.params)))
        specs = jax.tree_util.tree_leaves(sharding.param_specs(m.config),
                                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        placed = all(x.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, s), x.ndim)
                     for x, s in zip(jax.tree_util.tree_leaves(m.params), specs))
    return {"model_bytes": sum(v.nbytes for v in tensors.values()), "peak_host_bytes": peak, "same_params": same,
            "placed_as_specs": placed, "dtype": str(m.params["embed"].dtype)}


def experts() -> dict:
    """Mixtures of experts split by every expert's hidden units: a Mixtral checkpoint and a GPT-OSS one in
    MXFP4 loaded onto a 2x4 mesh (against a one-device load), and them and a model with a shared expert
    beside a dense layer on 2x4 (and 1x8) meshes, greedy, autoregressive and lookup-speculative, against
    one device."""
    from redrafter_jax.config import SpecConfig

    found = {}
    with tempfile.TemporaryDirectory() as d:
        kw = dict(heads=8, kv=4, inter=64)
        write_checkpoint(d, "mixtral", hf_tensors("mixtral", np.random.default_rng(4), **kw), num_attention_heads=8,
                         num_key_value_heads=4, intermediate_size=64)
        mesh = sharding.parse_mesh("2x4")
        m, one = load_hf(d, mesh=mesh), load_hf(d)
        leaves = jax.tree_util.tree_leaves(m.params)
        found["same_params"] = all(np.array_equal(np.asarray(a), np.asarray(b))
                                   for a, b in zip(leaves, jax.tree_util.tree_leaves(one.params)))
        shards = m.params["layers"][0]["experts_gate_up"].addressable_shards
        found["experts_shards"] = [list(s.data.shape) for s in shards]
    with tempfile.TemporaryDirectory() as d:  # kept in MXFP4: each device's 32 of 128 hidden units, one block
        write_checkpoint(d, "gpt_oss", gpt_oss_mxfp4_tensors(np.random.default_rng(5), inter=128, heads=8, kv=4),
                         num_attention_heads=8, num_key_value_heads=4, hidden_size=64, intermediate_size=128,
                         quantization_config=MXFP4)
        gpt_oss = load_hf(d)
        split = load_hf(d, mesh=mesh).params
        found["gpt_oss_same_params"] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
            jax.tree_util.tree_leaves(split), jax.tree_util.tree_leaves(gpt_oss.params)))
        found["gpt_oss_blocks_shards"] = [list(s.data.shape) for s in
                                          split["layers"][0]["experts_down"].blocks.addressable_shards]
    with tempfile.TemporaryDirectory() as d:  # dequantized as read: each device's 16 of 64 units, half a block
        write_checkpoint(d, "gpt_oss", gpt_oss_mxfp4_tensors(np.random.default_rng(6), heads=8, kv=4),
                         num_attention_heads=8, num_key_value_heads=4, hidden_size=64, intermediate_size=64,
                         quantization_config=MXFP4)
        found["gpt_oss_dequantized_same_params"] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
            jax.tree_util.tree_leaves(load_hf(d, mesh=mesh, dequantize_experts=True).params),
            jax.tree_util.tree_leaves(load_hf(d, dequantize_experts=True).params)))
    shared = tiny_model(num_heads=16, num_kv_heads=8, num_experts=4, experts_per_token=2, expert_size=16,
                        shared_expert_size=8, moe_layers=(1,))
    prompts = [[5, 9, 3, 9, 3, 9, 3], [7, 8, 2], [11, 12, 13, 11, 12], [4]]
    for name, (cfg, params), meshes in (("mixtral", (one.config, one.params), ("2x4",)),
                                        ("shared", shared, ("2x4", "1x8")),
                                        ("gpt_oss", (gpt_oss.config, gpt_oss.params), ("2x4",))):
        for loop, spec in (("autoregressive", None), ("speculative", SpecConfig.parse("0x4+2"))):
            want = rows(gen.generate(params, cfg, prompts, max_new_tokens=10, spec=spec))
            for mesh in meshes:
                got = rows(gen.generate(params, cfg, prompts, max_new_tokens=10, spec=spec,
                                        mesh=sharding.parse_mesh(mesh)))
                found[f"{name}/{loop}/{mesh}"] = got == want
    return found


def command_line() -> dict:
    """`python -m infer.generate --mesh 2x4` on a small checkpoint: the flag reaches loading and decoding."""
    import contextlib
    import io

    from infer import generate as cli

    with tempfile.TemporaryDirectory() as d:
        kw = dict(heads=8, kv=4, inter=64, vocab=64)
        write_checkpoint(d, "llama", hf_tensors("llama", np.random.default_rng(1), **kw), num_attention_heads=8,
                         num_key_value_heads=4, intermediate_size=64, max_position_embeddings=256)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cli.main(["--hf", d, "--mesh", "2x4", "--prompt", "w1 w2 w3 w1 w2", "--max-new-tokens", "12",
                      "--drafter", "random", "--lookup-beams", "1"])
    return {"report": next(line for line in err.getvalue().splitlines() if line.startswith("[speculative"))}


def gguf_loading() -> dict:
    """The embedded SmolLM2 GGUF (9 heads over 3 KV heads) dequantised straight onto a 1x3 mesh, against
    a one-device load."""
    from redrafter_jax.loaders.embedded import default_gguf_path
    from redrafter_jax.loaders.gguf import load_gguf

    mesh = sharding.make_mesh(1, 3, jax.devices()[:3])
    on_mesh, one = load_gguf(default_gguf_path(), mesh=mesh), load_gguf(default_gguf_path())
    leaves = jax.tree_util.tree_leaves(on_mesh.params)
    return {"same_params": all(np.array_equal(np.asarray(a), np.asarray(b))
                               for a, b in zip(leaves, jax.tree_util.tree_leaves(one.params))),
            "wqkv_shards": [list(s.data.shape) for s in on_mesh.params["layers"][0]["wqkv"].addressable_shards]}


if __name__ == "__main__":
    assert jax.device_count() == 8, os.environ.get("XLA_FLAGS")
    jax.config.update("jax_default_matmul_precision", "highest")
    checks = {f.__name__: f for f in (generation, continued, compiled_loop, errors, training, loading, experts,
                                      command_line, gguf_loading)}
    names = sys.argv[1:] or list(checks)
    print(json.dumps({n: checks[n]() for n in names}))
