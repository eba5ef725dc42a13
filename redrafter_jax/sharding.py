"""Device meshes, and how the target's parameters, the KV cache and the batch lie on them.

A mesh has two axes. "data" splits the batch: prompt rows, their KV cache and all decode state.
"model" splits the target tensor-parallel (Megatron style), along axes the params layout keeps whole
per shard (`model.py`): wqkv/bqkv/sinks by KV head (each shard holds its KV heads' query heads too),
w_gate_up (or w_up) by the MLP hidden unit (every expert's too, so the router and each token's experts
need no communication), the embedding and LM head by vocabulary entry; wo and w_down are split along
their input, so each shard's partial products are summed by one all-reduce per layer.
The KV cache is split by KV head like wqkv, so attention needs no communication at all. Norms, the
drafter and the tree are small and replicated. XLA's SPMD partitioner inserts the collectives: the
model code is the same on one device and on a mesh.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from redrafter_jax.cache import KVCache
from redrafter_jax.config import ModelConfig
from redrafter_jax.model import Params, param_shapes
from redrafter_jax.mxfp4 import EXPERTS_ORDER, GROUP, Mxfp4

DATA, MODEL = "data", "model"
CACHE = P(None, DATA, MODEL, None, None)  # [layers, B, kv_heads, max_len, head_dim]
PENDING = P(None, DATA, None, MODEL, None)  # the cache's pending entries [layers, B, P, kv_heads, head_dim]
BATCH = P(DATA)  # any array whose leading axis is the batch


def make_mesh(data: int = 1, model: int = 1, devices=None) -> Mesh:
    """A data x model mesh over `devices` (default: every visible device, which must be data * model)."""
    devices = jax.devices() if devices is None else list(devices)
    if data < 1 or model < 1:
        raise ValueError(f"mesh axes must be >= 1, got data={data}, model={model}")
    if data * model != len(devices):
        raise ValueError(f"a {data}x{model} mesh needs {data * model} devices, {len(devices)} given "
                         f"(jax.devices() lists {jax.device_count()})")
    return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


def parse_mesh(text: str) -> Mesh:
    """"DxM" (data x model, e.g. "2x4") over every visible device."""
    m = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if m is None:
        raise ValueError(f"bad mesh {text!r}: expected DATAxMODEL, e.g. 1x8 or 2x4")
    return make_mesh(int(m.group(1)), int(m.group(2)))


def axis_size(mesh: Mesh | None, axis: str) -> int:
    return 1 if mesh is None else mesh.shape[axis]


def check_model(cfg: ModelConfig, mesh: Mesh) -> None:
    """Raises ValueError naming each dimension of cfg that the mesh's model axis does not divide."""
    m = axis_size(mesh, MODEL)
    split = {"num_kv_heads": cfg.num_kv_heads, "intermediate_size": cfg.intermediate_size,
             "expert_size": cfg.expert_size, "shared_expert_size": cfg.shared_expert_size,
             "vocab_size": cfg.vocab_size}
    if all(cfg.moe(i) for i in range(cfg.num_layers)):  # no dense MLP
        del split["intermediate_size"]
    if cfg.expert_format == "mxfp4":  # each shard's experts' inputs to the down projection whole blocks of 32
        split["expert_size / 32"] = cfg.expert_size // GROUP
    split = {name: n for name, n in split.items() if n}  # (sizes of MLPs the model does not have are 0)
    bad = [f"{name} {n}" for name, n in split.items() if n % m]
    if bad:
        raise ValueError(f"the mesh's model axis ({m} devices) must divide the model's {', '.join(bad)}: "
                         f"choose a model axis that divides {', '.join(split)}")


def param_specs(cfg: ModelConfig) -> Params:
    """The PartitionSpec of every parameter, in the layout of `model.param_shapes(cfg)`."""
    layer = {"attn_norm": P(), "wqkv": P(None, MODEL), "bqkv": P(MODEL), "q_norm": P(), "k_norm": P(),
             "wo": P(MODEL), "post_attn_norm": P(), "mlp_norm": P(), "post_mlp_norm": P(),
             "w_gate_up": P(None, None, MODEL), "w_up": P(None, MODEL), "w_down": P(MODEL), "router": P(),
             "experts_gate_up": P(None, None, None, MODEL), "experts_down": P(None, MODEL),
             "shared_gate_up": P(None, None, MODEL), "shared_down": P(MODEL), "shared_gate": P(),
             "sinks": P(MODEL), "bo": P(), "router_bias": P(), "router_correction": P(),
             "experts_gate_up_bias": P(None, None, MODEL), "experts_down_bias": P(), "xielu": P(),
             "attn_norm_bias": P(), "mlp_norm_bias": P(),
             "b_gate_up": P(None, MODEL), "b_up": P(MODEL), "b_down": P()}
    # MXFP4 experts (`mxfp4.Mxfp4`), [E, 2, F, H / 32, 16] and [E, H, F / 32, 16]: both split by F too
    layer.update({k: Mxfp4(P(None, None, MODEL), P(None, None, MODEL), order) for k, order in EXPERTS_ORDER.items()}
                 if cfg.expert_format == "mxfp4" else {})
    top = {"embed": P(MODEL), "final_norm": P(), "final_norm_bias": P(), "lm_head": P(None, MODEL),
           "lm_head_bias": P(MODEL)}
    shapes = param_shapes(cfg)
    return {**{k: top[k] for k in shapes if k != "layers"},
            "layers": [{k: layer[k] for k in s} for s in shapes["layers"]]}


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Params:
    check_model(cfg, mesh)
    return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), param_specs(cfg),
                                  is_leaf=lambda x: isinstance(x, P))


def shard_params(params: Params, cfg: ModelConfig, mesh: Mesh) -> Params:
    """params placed on the mesh (a no-op for params already placed so, e.g. by a loader given the mesh)."""
    return jax.device_put(params, param_shardings(cfg, mesh))


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def constrain(x, mesh: Mesh | None, spec: P):
    """x laid out as `spec` on the mesh inside a jitted function; x itself without a mesh."""
    return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def gathered(tree, mesh: Mesh | None):
    """tree replicated on every device of the mesh (a decode loop's small outputs: every process of a
    multi-host job can then read them)."""
    return jax.tree_util.tree_map(lambda x: constrain(x, mesh, P()), tree)


def local_rows(mesh: Mesh, batch_size: int) -> np.ndarray:
    """Which rows of a [batch_size, ...] batch split over the mesh's data axis this process's devices
    hold: all of them in a single-process job, its share in a multi-host one."""
    held = NamedSharding(mesh, BATCH).addressable_devices_indices_map((batch_size,)).values()
    return np.unique(np.concatenate([np.arange(batch_size)[index] for index in held]))


def global_batch(mesh: Mesh, local: np.ndarray, batch_size: int) -> jax.Array:
    """The [batch_size, ...] array split over the data axis, from this process's rows (`local_rows`)."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, BATCH), local,
                                                  (batch_size, *local.shape[1:]))


def start_processes(coordinator: str, num_processes: int | None = None, process_id: int | None = None) -> None:
    """Joins a multi-host job (`jax.distributed`) before anything touches a device: coordinator
    "HOST:PORT" with the job's process count and this process's id, or "auto" to read them from the
    cluster (SLURM, Open MPI, Kubernetes, Cloud TPU). Every process then runs the same program on
    the same inputs, over a mesh of all processes' devices."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only setting: lets tests run it
    if coordinator == "auto":
        jax.distributed.initialize()
    else:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs --num-processes and --process-id")
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def constrain_cache(cache: KVCache, mesh: Mesh | None) -> KVCache:
    return cache.replace(k=constrain(cache.k, mesh, CACHE), v=constrain(cache.v, mesh, CACHE),
                         lengths=constrain(cache.lengths, mesh, BATCH),
                         pending_k=constrain(cache.pending_k, mesh, PENDING),
                         pending_v=constrain(cache.pending_v, mesh, PENDING),
                         pending_slots=constrain(cache.pending_slots, mesh, BATCH))
