"""Generation, training and loading over device meshes: 8 simulated CPU devices in one process
(on_eight_devices.py), and one 2x4 mesh spanning two processes joined by jax.distributed
(two_processes.py), each compared with one device."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from redrafter_jax import datastore, sharding
from redrafter_jax import generate as gen
from redrafter_jax.model import param_shapes
from tests.mesh_cases import CFG, PARAMS, PROMPTS, TRAIN, proposers, train_steps
from tests.test_loaders import hf_tensors, write_checkpoint
from tests.test_speculative import rows
from tests.tiny import tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices: int, *xla_flags: str) -> dict:
    flags = " ".join((f"--xla_force_host_platform_device_count={devices}", *xla_flags))
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}


def _xla_cpu_flag(name: str, value: bool) -> tuple[str, ...]:
    """`--name=value` where this XLA has the option, else nothing (XLA aborts a process whose XLA_FLAGS
    name an option it does not have)."""
    try:
        jax.jit(lambda: 0, compiler_options={name: value}).lower().compile()
    except jax.errors.JaxRuntimeError:
        return ()
    return (f"--{name}={str(value).lower()}",)


@pytest.fixture(scope="module")
def eight():
    """The findings of every check in on_eight_devices.py (one subprocess: JAX fixes its device count).
    Its programs are compiled without LLVM's optimizations and by XLA:CPU's older fusion emitters, which
    compile the same ops faster: they run for milliseconds and took most of its minutes to compile (141 s
    with LLVM's optimizations off alone, 75 s with both, on the 2-core AMD EPYC). Its checks compare each
    mesh with one device in the same process, and XLA's own passes, the partitioning among them, run as
    ever."""
    proc = subprocess.run([sys.executable, "-m", "tests.on_eight_devices"], cwd=ROOT,
                          env=_env(8, "--xla_backend_optimization_level=0",
                                   *_xla_cpu_flag("xla_cpu_use_fusion_emitters", False)),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_generation_on_every_mesh_equals_one_device(eight):
    # {AR, spec} x (greedy 1 on 1x8 and 8x1, greedy and sampled 4 on 2x4, 4 prompts in 2 rows on 1x8, and
    # the streamed tokens of greedy 1 and 4 prompts in 2 rows on one device)
    assert len(eight["generation"]) == 14
    assert [case for case, same in eight["generation"].items() if not same] == []


def test_a_turn_continued_from_its_cache_on_a_mesh_equals_one_device(eight):
    found = eight["continued"]
    # on the mesh that made the cache, then one padded row on one device and one of 2x4's rows on 8x1
    assert found == {f"{loop}/{case}": True for loop in ("autoregressive", "speculative")
                     for case in ("1/8x1", "4/2x4", "1/8x1/moved", "4/2x4/moved")}


def test_decode_loop_on_a_mesh_is_one_while_loop_without_host_transfers(eight):
    loop = eight["compiled_loop"]
    assert loop["while_loops"] == 1 and loop["callbacks"] == [] and loop["host_ops"] == []
    assert loop["ran_without_transfers"]
    assert loop["wqkv_spec"] == "P(None, 'model')"
    assert loop["all_reduces"] > 0  # tensor-parallel: row-parallel products are summed across "model"


def test_model_or_mesh_that_do_not_fit_are_refused(eight):
    assert "model axis (8 devices) must divide the model's num_kv_heads 2" in eight["errors"]["1x8"]
    assert "a 3x1 mesh needs 3 devices, 8 given" in eight["errors"]["3x1"]
    assert "a mesh with a data axis of 1" in eight["errors"]["8x1"]
    assert eight["errors"]["experts/2x4"] == ("the mesh's model axis (4 devices) must divide the model's expert_size "
                                              "10: choose a model axis that divides num_kv_heads, expert_size, "
                                              "vocab_size")


def test_training_steps_on_every_mesh_equal_one_device(eight):
    assert set(eight["training"]) == {"1x8", "2x4", "8x1"}
    assert max(eight["training"].values()) < 1e-5


def test_bf16_checkpoint_loads_onto_its_shards_without_staging_the_model(eight):
    load = eight["loading"]
    assert load["same_params"] and load["placed_as_specs"] and load["dtype"] == "bfloat16"
    # the host holds one shard of one tensor at a time: far below the model's size
    assert load["peak_host_bytes"] < load["model_bytes"] / 2, load


def test_mixtures_of_experts_load_and_decode_on_a_mesh_as_on_one_device(eight):
    found = eight["experts"]
    assert all(found.pop(f"{name}same_params") for name in ("", "gpt_oss_", "gpt_oss_dequantized_"))
    assert found.pop("gpt_oss_blocks_shards") == [[4, 64, 1, 16]] * 8  # each device's 32 of 128 units' codes
    assert found.pop("experts_shards") == [[4, 32, 2, 16]] * 8  # each expert's 64 hidden units over 4 devices
    assert found == {f"{name}/{loop}/{mesh}": True for loop in ("autoregressive", "speculative")
                     for name, meshes in (("mixtral", ("2x4",)), ("shared", ("2x4", "1x8")), ("gpt_oss", ("2x4",)))
                     for mesh in meshes}


def test_generate_command_runs_on_a_mesh(eight):
    assert "output identical to autoregressive" in eight["command_line"]["report"]


def test_gguf_loads_onto_a_mesh_tensor_by_tensor(eight):
    gguf = eight["gguf_loading"]
    assert gguf["same_params"]
    assert gguf["wqkv_shards"] == [[576, 1, 5, 64]] * 3  # one KV head (its 3 query heads, K, V) per device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_over_one_mesh_equal_one_device(tmp_path):
    port = _free_port()
    logs = [(tmp_path / f"out{i}", tmp_path / f"err{i}") for i in range(2)]
    # output to files, not pipes: a process blocked on a full pipe would stall the other in a collective
    procs = [subprocess.Popen([sys.executable, "-m", "tests.two_processes", str(i), str(port)], cwd=ROOT,
                              env=_env(4), stdout=open(out, "w"), stderr=open(err, "w"))
             for i, (out, err) in enumerate(logs)]
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0, 0], "".join(err.read_text()[-2000:] for _, err in logs)
    found = [json.loads(out.read_text().strip().splitlines()[-1]) for out, _ in logs]

    want = {"autoregressive": rows(gen.generate(PARAMS, CFG, PROMPTS, max_new_tokens=16)),
            "speculative": rows(gen.generate(PARAMS, CFG, PROMPTS, max_new_tokens=16, **proposers()))}
    params, loss = train_steps(sharding.make_mesh(1, 1, jax.devices()[:1]))
    for f in found:
        assert f["autoregressive"] == want["autoregressive"] and f["speculative"] == want["speculative"]
        for a, b in zip(f["train_params"], jax.tree_util.tree_leaves(params)):
            np.testing.assert_allclose(a, b, atol=1e-5)
        np.testing.assert_allclose(f["train_loss"], loss, atol=1e-5)
    # process-local loading: each process fed half of the batch, together all of it
    halves = [set(f["train_rows"]) for f in found]
    assert not halves[0] & halves[1] and halves[0] | halves[1] == set(range(TRAIN.batch_size))


def test_a_command_joins_its_multi_host_job_before_anything_touches_a_device(tmp_path):
    """--coordinator: the job is joined as the arguments are read, before the datastore's arrays are put on
    a device (jax.distributed refuses to start after that). A job of one process, on one host."""
    model, ds = tmp_path / "model", tmp_path / "ds.npz"
    write_checkpoint(model, "llama", hf_tensors("llama", np.random.default_rng(0)), max_position_embeddings=1024)
    tokens = np.random.default_rng(1).integers(5, 64, size=(4, 40))
    datastore.save(datastore.build([(t, np.ones(40)) for t in tokens], [(tokens[0], np.ones(40))]), ds)
    job = ["--coordinator", f"localhost:{_free_port()}", "--num-processes", "1", "--process-id", "0"]
    proc = subprocess.run([sys.executable, "-m", "infer.generate", "--hf", str(model), "--datastore", str(ds),
                           "--prompt", "w5 w6 w7", "--max-new-tokens", "8", *job], cwd=ROOT, env=_env(1),
                          capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert b"output identical to autoregressive" in proc.stderr


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
                                       {"qk_norm": "head"}, {"qk_norm": "per_head", "layer_norm": True},
                                       {"lm_head_bias": True},
                                       {"qk_norm": "all", "pre_norms": False, "post_norms": True},
                                       {"num_experts": 4, "experts_per_token": 2, "expert_size": 16,
                                        "shared_expert_size": 8, "moe_layers": (1,)},
                                       {"num_experts": 4, "experts_per_token": 2, "expert_size": 32,
                                        "expert_bias": True, "attention_sinks": True, "output_bias": True,
                                        "hidden_size": 64, "expert_format": "mxfp4"},
                                       {"num_experts": 4, "experts_per_token": 1, "expert_size": 16,  # Llama 4's
                                        "shared_expert_size": 16, "shared_expert_gate": False, "moe_layers": (1,),
                                        "routing": "sigmoid_input", "qk_norm": "unweighted"},
                                       {"num_experts": 8, "experts_per_token": 2, "expert_size": 16,  # GLM-4.5's
                                        "shared_expert_size": 16, "shared_expert_gate": False, "moe_layers": (1,),
                                        "routing": "sigmoid", "expert_groups": 4, "expert_groups_kept": 2},
                                       {"gated_mlp": False, "hidden_act": "xielu", "mlp_bias": True,  # Apertus's MLP
                                        "layer_norm": True, "norm_bias": True}])  # (biased), Nemotron's norms
def test_every_parameter_has_a_spec_that_fits_its_shape(overrides):
    cfg, _ = tiny_model(**overrides)
    specs = sharding.param_specs(cfg)
    shapes = param_shapes(cfg)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    is_shape = lambda x: isinstance(x, tuple) and not is_spec(x)  # noqa: E731
    assert jax.tree_util.tree_structure(specs, is_leaf=is_spec) == jax.tree_util.tree_structure(shapes,
                                                                                                 is_leaf=is_shape)
    for spec, shape in zip(jax.tree_util.tree_leaves(specs, is_leaf=is_spec),
                           jax.tree_util.tree_leaves(shapes, is_leaf=is_shape)):
        assert len(spec) <= len(shape)


def test_bad_mesh_arguments_are_named():
    with pytest.raises(ValueError, match="bad mesh '2by4'"):
        sharding.parse_mesh("2by4")
    with pytest.raises(ValueError, match="mesh axes must be >= 1"):
        sharding.make_mesh(0, 1)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        gen.generate(PARAMS, CFG, PROMPTS, max_new_tokens=2, mesh="2x4")
