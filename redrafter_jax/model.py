"""Llama-family decoder as pure functions over a params pytree.

Params layout (matrices are [in, out] so activations multiply on the left; nkv KV heads, each
shared by G = nh / nkv query heads):
    embed [V, H]; final_norm [H]; lm_head [H, V] (absent when tied to embed); lm_head_bias [V] (only with
    lm_head_bias)
    layers: a list with one dict per layer (`pack_params`' packed ones: also `LayerStack`s of like layers):
        attn_norm [H] (only with pre_norms; and attn_norm_bias [H] with norm_bias, as mlp_norm and
        final_norm); wqkv [H, nkv, G + 2, D] (per KV head: its G query heads, then K, then V); bqkv
        [nkv, G + 2, D] (only with attention_bias); q_norm, k_norm [D] (qk_norm "head"; "per_head" and
        "all": [nkv, G, D] and [nkv, 1, D]); sinks [nkv, G] (only with attention_sinks);
        wo [nh D, H] (query heads in order); bo [H] (only with output_bias);
        post_attn_norm [H] (only with post_norms); mlp_norm [H] (pre_norms, but parallel_block);
        w_gate_up [H, 2, I] (gate, up), or w_up [H, I] where not gated_mlp; w_down [I, H]; with mlp_bias
        b_gate_up [2, I] or b_up [I], and b_down [H]; xielu [4] (hidden_act "xielu": its alpha_p, alpha_n,
        beta and eps as stored); post_mlp_norm [H] (post_norms)
        a mixture-of-experts layer has, in place of w_gate_up and w_down: router [H, E];
        experts_gate_up [E, H, 2, F]; experts_down [E, F, H] (with expert_format "mxfp4" both `Mxfp4`s);
        with a shared expert of S units shared_gate_up [H, 2, S], shared_down [S, H] (and shared_gate
        [H, 1] with shared_expert_gate);
        with expert_bias router_bias [E], experts_gate_up_bias [E, 2, F], experts_down_bias [E, H];
        with routing "sigmoid" router_correction [E]
Q/K use the Hugging Face rotary layout (rotate_half: the two halves of each head are the pairs); with
RoPE on part of a head, each Q/K head's dims are reordered so that it does too (`rotary_order`).
Layers are separate arrays in a Python loop, and Q/K/V and gate/up are fused, because at decode
batch sizes every step is a chain of matrix-vector products: fewer, larger ones that read each weight
in place run ~1.5x faster on CPU than a `lax.scan` slicing stacked weights. Grouping Q/K/V by KV head
and keeping gate/up on their own axis give every fused weight one axis (nkv or I) that splits into
self-contained tensor-parallel shards (`sharding.py`). Every product goes through `linear`, so that on
the CPU the decode loops can pass the matrices tile-packed (`pack_params`) to the rows kernel
(`rows_matmul.py`). There, runs of like layers are stacked (`LayerStack`) and scanned: the kernels read
a scanned layer's weights and cache in place, and XLA compiles one layer of the run, not each.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from redrafter_jax import cache as kv
from redrafter_jax import cpu_attention, rows_matmul
from redrafter_jax.cache import KVCache
from redrafter_jax.config import ModelConfig
from redrafter_jax.mxfp4 import EXPERTS_ORDER, GROUP, Mxfp4, dense

Params = dict


class ForwardOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] float32
    hidden: jax.Array  # [B, T, H], last layer after the final norm
    cache: KVCache | None  # holding the new K/V past each row's length (not yet valid)
    k: jax.Array | None  # [layers, B, T, kv_heads, head_dim], the new tokens' keys;
    v: jax.Array | None  # [layers, B, T, kv_heads, head_dim]  these three None from forward_causal


def param_shapes(cfg: ModelConfig) -> dict:
    """The expected shape of every parameter: the single source loaders and init check against."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    qkv = (cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads + 2, cfg.head_dim)
    layer = {"wqkv": (h, *qkv), "wo": (cfg.num_heads * cfg.head_dim, h)}
    dense = {**({"w_gate_up": (h, 2, i)} if cfg.gated_mlp else {"w_up": (h, i)}), "w_down": (i, h)}
    if cfg.mlp_bias:
        dense.update({**({"b_gate_up": (2, i)} if cfg.gated_mlp else {"b_up": (i,)}), "b_down": (h,)})
    if cfg.hidden_act == "xielu":
        dense["xielu"] = (4,)
    e, f, s = cfg.num_experts, cfg.expert_size, cfg.shared_expert_size
    experts = {"router": (h, e), "experts_gate_up": (e, h, 2, f), "experts_down": (e, f, h)}
    if cfg.expert_format == "mxfp4":  # [E, 2, F, H] and [E, H, F] in blocks of 32 inputs
        experts.update({k: Mxfp4((*stored, 16), stored, EXPERTS_ORDER[k]) for k, stored in (
            ("experts_gate_up", (e, 2, f, h // GROUP)), ("experts_down", (e, h, f // GROUP)))})
    if s:
        experts.update(shared_gate_up=(h, 2, s), shared_down=(s, h))
        if cfg.shared_expert_gate:
            experts["shared_gate"] = (h, 1)
    if cfg.expert_bias:
        experts.update(router_bias=(e,), experts_gate_up_bias=(e, 2, f), experts_down_bias=(e, h))
    if cfg.routing == "sigmoid":
        experts["router_correction"] = (e,)
    if cfg.pre_norms:
        layer["attn_norm"] = (h,)
        if not cfg.parallel_block:
            layer["mlp_norm"] = (h,)
    if cfg.norm_bias:
        layer.update({f"{k}_bias": (h,) for k in ("attn_norm", "mlp_norm") if k in layer})
    if cfg.attention_bias:
        layer["bqkv"] = qkv
    if cfg.attention_sinks:
        layer["sinks"] = qkv[:1] + (qkv[1] - 2,)
    if cfg.output_bias:
        layer["bo"] = (h,)
    if cfg.qk_norm == "head":
        layer["q_norm"] = layer["k_norm"] = (cfg.head_dim,)
    elif cfg.qk_norm in ("per_head", "all"):
        layer["q_norm"], layer["k_norm"] = (*qkv[:1], qkv[1] - 2, qkv[2]), (qkv[0], 1, qkv[2])
    if cfg.post_norms:
        layer["post_attn_norm"] = layer["post_mlp_norm"] = (h,)
    shapes = {"embed": (cfg.vocab_size, h), "final_norm": (h,),
              "layers": [{**layer, **(experts if cfg.moe(j) else dense)} for j in range(cfg.num_layers)]}
    if cfg.norm_bias:
        shapes["final_norm_bias"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (h, cfg.vocab_size)
    if cfg.lm_head_bias:
        shapes["lm_head_bias"] = (cfg.vocab_size,)
    return shapes


def is_shape(x) -> bool:
    """Whether x is a leaf of a `param_shapes` tree (a shape: tree functions would otherwise descend into it)."""
    return isinstance(x, tuple)


def check_params(params: Params, cfg: ModelConfig) -> None:
    """Raises ValueError naming the first missing, unexpected or mis-shaped parameter."""
    flat = jax.tree_util.tree_flatten_with_path
    expected = {jax.tree_util.keystr(p): s for p, s in flat(param_shapes(cfg), is_leaf=is_shape)[0]}
    got = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in flat(params)[0]}
    for name, shape in expected.items():
        if name not in got:
            raise ValueError(f"missing parameter {name} (expected shape {shape})")
        if got[name] != shape:
            raise ValueError(f"parameter {name} has shape {got[name]}, expected {shape}")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise ValueError(f"unexpected parameters {extra}")


def random_values(sample: Callable, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """sample(key, shape), for `sample` elementwise in what a jax.random function (normal, randint) draws
    from a key for a shape, computed as the first values of a 1-D draw of `half_octave` length. JAX's
    threefry bits are partitionable by default: the i-th value depends only on the key and i, so the values
    are sample(key, shape)'s. But models of many shapes (the tests' tiny ones) share a few compiled
    samplers, where each new shape compiled its own (~1 s on a CPU)."""
    n = math.prod(shape)
    return sample(key, (half_octave(n),))[:n].reshape(shape)


def random_keys(key: jax.Array, n: int):
    """An iterator whose first n keys are jax.random.split(key, n)'s, split as a `half_octave` number of keys
    (see `random_values`: each number of keys compiled its own split)."""
    return iter(jax.random.split(key, half_octave(n)))


def half_octave(n: int) -> int:
    """n rounded up to 2^k or 1.5 * 2^k."""
    step = 1 << max((n - 1).bit_length() - 2, 0)
    return -(-n // step) * step


# Parameters kept in float32 whatever cfg.dtype, as transformers keeps them: a router's correction bias, whose
# small differences between experts choose them (rounded to bfloat16, near-ties would choose otherwise)
FLOAT32_PARAMS = ("router_correction",)


def init_params(cfg: ModelConfig, key: jax.Array, scale: float = 0.02) -> Params:
    """Random parameters (norm weights 1, their biases 0; xIELU's as transformers starts them; MXFP4 experts
    random codes scaled to about `scale`), for tests and tiny models."""
    shapes = param_shapes(cfg)
    keys = random_keys(key, len(jax.tree_util.tree_leaves(shapes, is_leaf=is_shape)))

    def make(path, shape):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return (jnp.zeros if name.endswith("_bias']") else jnp.ones)(shape, cfg.dtype)
        if name.endswith("['xielu']"):  # softplus(alpha_p) 0.8, beta + softplus(alpha_n) 0.5 + 0.3, eps -1e-6
            return jnp.asarray([np.log(np.expm1(0.8)), np.log(np.expm1(0.3)), 0.5, -1e-6], cfg.dtype)
        if name.endswith(".blocks"):
            return random_values(lambda k, s: jax.random.randint(k, s, 0, 256).astype(jnp.uint8), next(keys), shape)
        if name.endswith(".scales"):  # codes up to 6 times 2^(log2(scale) - 2)
            return jnp.full(shape, 127 + int(np.floor(np.log2(scale))) - 2, jnp.uint8)
        dtype = jnp.float32 if path[-1].key in FLOAT32_PARAMS else cfg.dtype
        return random_values(lambda k, s: (scale * jax.random.normal(k, s)).astype(dtype), next(keys), shape)

    return jax.tree_util.tree_map_with_path(make, shapes, is_leaf=is_shape)


def cast_params(tree, dtype):
    """tree's floating arrays as `dtype` (MXFP4 experts' codes and scales stay bytes)."""
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def linear(x: jax.Array, w: jax.Array | rows_matmul.Packed) -> jax.Array:
    """x [..., K] @ w [K, *out] -> [..., *out]; a `rows_matmul.Packed` weight runs the CPU rows kernel."""
    if isinstance(w, rows_matmul.Packed):
        return rows_matmul.matmul(x, w)
    return jnp.tensordot(x, w, axes=1)


# a layer's weights that go through `linear` (the CPU decode loops tile-pack them), and its experts' (packed
# as groups, one per expert, for `ragged_experts`; MXFP4 ones as MXFP4 tiles)
MATRICES = ("wqkv", "wo", "w_gate_up", "w_up", "w_down", "shared_gate_up", "shared_down", "shared_gate", "router")
EXPERTS = ("experts_gate_up", "experts_down")


def pack_layer(layer: dict, dtype=None, pairs: bool | None = None, stacked: bool = False) -> dict:
    """A layer's matrices (`MATRICES`) tile-packed for the CPU rows kernel (`rows_matmul`) as `dtype`
    (default: their own; `pairs`: `rows_matmul.pack`'s), its experts (`EXPERTS`) as groups, MXFP4 ones
    as MXFP4 tiles; the rest (norms, biases) as it is. `stacked`: the dense layers of a `LayerStack`,
    every leaf with a leading [n] axis, each matrix packed as n groups."""
    def packed(name, w):
        if name in EXPERTS and isinstance(w, Mxfp4):
            return rows_matmul.pack_mxfp4(w)
        if name in EXPERTS or name in MATRICES:
            return rows_matmul.pack(w.astype(dtype or w.dtype), pairs=pairs, grouped=name in EXPERTS or stacked)
        return w

    return {k: packed(k, v) for k, v in layer.items()}


@struct.dataclass
class LayerStack:
    """Consecutive dense layers of one kind (`ModelConfig.layer_kinds`) and parameter shapes, packed for the
    CPU decode loops (`pack_params`): every leaf stacked on a leading [n] axis, each matrix as n groups of
    a `rows_matmul.Packed`. `transformer` runs the n layers as one `lax.scan`, so XLA compiles one layer
    where it compiled n (the default model's autoregressive loop lowers and compiles in 1 s instead of
    2.2, its speculative loop in 2.1 instead of 3.1), while the rows kernel and the CPU attention read
    each layer's weights and cache in place, so a step costs what it did (a scan that slices stacked
    weights copies them)."""

    layers: dict

    @property
    def count(self) -> int:
        return jax.tree_util.tree_leaves(self.layers)[0].shape[0]

    def at(self, j: jax.Array) -> dict:
        """Layer j's params (j traced): its matrices' products read weight j of the stack; norms and biases
        sliced."""
        return {k: w.replace(layer=j) if isinstance(w, rows_matmul.Packed) else w[j] for k, w in self.layers.items()}


def layer_items(layers: list) -> Iterator[tuple[int, dict | LayerStack]]:
    """(its first layer's index, the item) for each item of params["layers"]: a layer's dict or a
    `LayerStack`."""
    first = 0
    for item in layers:
        yield first, item
        first += item.count if isinstance(item, LayerStack) else 1


def pack_params(params: Params, kinds: tuple, dtype=None, pairs: bool | None = None) -> Params:
    """The target's layers packed for the CPU rows kernel (`pack_layer`), each run of consecutive dense
    layers of one kind (kinds: the model's `ModelConfig.layer_kinds`) and the same parameter shapes as
    one `LayerStack` (a mixture's layers one by one: the float32 prefill takes their packed experts,
    `generate.decoding_params`), with the LM head packed on its own when tied (the embedding stays for
    token lookups). For decoding only."""
    def kind(j_p):
        j, p = j_p
        return (j,) if kinds[j][2] else (kinds[j], jax.tree_util.tree_structure(p),
                                         [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(p)])

    layers = []
    for _, run in itertools.groupby(enumerate(params["layers"]), kind):
        run = [p for _, p in run]
        layers.append(pack_layer(run[0], dtype, pairs) if len(run) == 1 else
                      LayerStack(pack_layer(jax.tree_util.tree_map(lambda *ws: jnp.stack(ws), *run), dtype, pairs,
                                            stacked=True)))
    w, transposed = (params["lm_head"], False) if "lm_head" in params else (params["embed"], True)
    head = rows_matmul.pack(w.astype(dtype or w.dtype), transposed, pairs)
    return {**params, "layers": layers, "lm_head": head}


def row_sum(x: jax.Array, op: Callable = jnp.add) -> jax.Array:
    """x [..., D] summed over D (or folded by another `op`, e.g. jnp.maximum) -> [..., 1] in one fixed order
    whatever the leading axes: D padded to a power of two by op's identity (0 or -inf), then halves
    combined pairwise. XLA:CPU reduces fewer than 8 rows in another order than 8 or more, so a one-token
    step and a tree of 8 or more tokens normalised the same hidden state differently (bfloat16 products
    magnified that into different greedy tokens); and from ~64 rows it hands a reduction and what it
    feeds to YNNPACK, whose exp rounds otherwise (a router's softmax)."""
    d = x.shape[-1]
    pad = 0 if op is jnp.add else -jnp.inf
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, (1 << (d - 1).bit_length()) - d)], constant_values=pad)
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = op(x[..., :half], x[..., half:])
    return x


def rms_norm(x: jax.Array, w: jax.Array | None, eps: float, center: bool = False,
             bias: jax.Array | None = None) -> jax.Array:
    """x [..., D] normed over D in float32, times w [D] (or [..., D], broadcast: a weight per head; None:
    unweighted), plus any bias [D]: an RMS norm, or with `center` its mean taken out first (a LayerNorm:
    Cohere's without bias, Nemotron's with)."""
    x32 = x.astype(jnp.float32)
    if center:
        x32 = x32 - row_sum(x32) / x.shape[-1]
    y = x32 * jax.lax.rsqrt(row_sum(x32 * x32) / x.shape[-1] + eps)
    if w is not None:
        y = y * w.astype(jnp.float32)
    return (y if bias is None else y + bias.astype(jnp.float32)).astype(x.dtype)


def optional_norm(x: jax.Array, p: dict, name: str, cfg: ModelConfig) -> jax.Array:
    """x normed by p[name] [H] (and its bias, p[name + "_bias"], where the model has one) as the model
    norms its residual stream, or x as it is where the model has no such norm (`pre_norms`, `post_norms`)."""
    w = p.get(name)
    return x if w is None else rms_norm(x, w, cfg.rms_norm_eps, cfg.layer_norm, p.get(f"{name}_bias"))


def qk_norm(qkv: jax.Array, q_norm: jax.Array | None, k_norm: jax.Array | None, cfg: ModelConfig) -> jax.Array:
    """qkv [B, T, nkv, G + 2, D] with the queries and keys normed as `cfg.qk_norm` says: each head on its own
    (norms [D], None: unweighted; "per_head": [nkv, G, D] and [nkv, 1, D], a weight per head), or all query
    heads together and all key heads together ("all": norms [nkv, G, D] and [nkv, 1, D])."""
    g = qkv.shape[3] - 2

    def norm(x, w):  # x [B, T, nkv, G or 1, D]
        if cfg.qk_norm != "all":
            return rms_norm(x, w, cfg.rms_norm_eps, cfg.layer_norm)
        return rms_norm(x.reshape(*x.shape[:2], -1), w.reshape(-1), cfg.rms_norm_eps,
                        cfg.layer_norm).reshape(x.shape)

    return jnp.concatenate([norm(qkv[:, :, :, :g], q_norm), norm(qkv[:, :, :, g:g + 1], k_norm),
                            qkv[:, :, :, g + 1:]], axis=3)


def xielu(x: jax.Array, params: jax.Array) -> jax.Array:
    """Apertus's xIELU of x with its learned params [4], as checkpoints store them: alpha_p and alpha_n
    (softplus-ed: a_p and beta + a_n), beta, eps. For x > 0, a_p x^2 + beta x; else
    a_n (expm1(min(x, eps)) - x) + beta x."""
    alpha_p, alpha_n, beta, eps = (params[j].astype(x.dtype) for j in range(4))
    a_p, a_n = jax.nn.softplus(alpha_p), beta + jax.nn.softplus(alpha_n)
    return jnp.where(x > 0, a_p * x * x + beta * x, (jnp.expm1(jnp.minimum(x, eps)) - x) * a_n + beta * x)


ACTIVATION = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
              "relu2": lambda x: jnp.square(jax.nn.relu(x))}


def activation(x: jax.Array, cfg: ModelConfig, params: jax.Array | None = None) -> jax.Array:
    """cfg.hidden_act of x, elementwise (xIELU's learned params [4] from its layer)."""
    return xielu(x, params) if cfg.hidden_act == "xielu" else ACTIVATION[cfg.hidden_act](x)


def gated(gu: jax.Array, cfg: ModelConfig) -> jax.Array:
    """A gated MLP's hidden units from gate and up [..., 2, I]: act(gate) * up, act cfg.hidden_act
    (`ModelConfig.ACTIVATIONS`)."""
    gate, up = gu[..., 0, :], gu[..., 1, :]
    if cfg.hidden_act == "clamped_swiglu":  # GPT-OSS's
        limit = cfg.swiglu_limit
        gate = jnp.minimum(gate, limit)
        return gate * jax.nn.sigmoid(gate * cfg.swiglu_alpha) * (jnp.clip(up, -limit, limit) + 1)
    return activation(gate, cfg) * up


def gated_mlp(x: jax.Array, gate_up, down, cfg: ModelConfig) -> jax.Array:
    """x [..., H] through a gated MLP: gate_up [H, 2, I] (gate, up), down [I, H]."""
    return linear(gated(linear(x, gate_up), cfg), down)


def route(x: jax.Array, router: jax.Array, cfg: ModelConfig, bias: jax.Array | None = None,
          correction: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """x [N, H], router [H, E] (and any bias [E]) -> each token's experts_per_token likeliest experts [N, k]
    int32 and their float32 weights [N, k] (`ModelConfig.routing`): softmax probabilities over all E
    experts, renormalised over the k with norm_topk (GPT-OSS's softmax over the k chosen logits is the
    same), the chosen logits' sigmoids, or ("sigmoid") the sigmoids of those chosen by their sigmoids plus
    `correction` [E] in the best groups, renormalised with norm_topk, times routed_scaling."""
    logits = linear(x, router) if isinstance(router, rows_matmul.Packed) else \
        jnp.matmul(x, router, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias
    if cfg.routing == "sigmoid_input":
        chosen, experts = jax.lax.top_k(logits, cfg.experts_per_token)
        return jax.nn.sigmoid(chosen), experts
    if cfg.routing == "sigmoid":
        scores = jax.nn.sigmoid(logits)
        choice = scores + correction
        if cfg.expert_groups > 1:  # only the experts of the groups whose two best score best
            n, groups = choice.shape[0], cfg.expert_groups
            best_two = jax.lax.top_k(choice.reshape(n, groups, -1), 2)[0]
            _, kept = jax.lax.top_k(best_two[..., 0] + best_two[..., 1], cfg.expert_groups_kept)
            in_kept = (kept[:, :, None] == jnp.arange(groups)).any(1)  # [N, groups]
            choice = jnp.where(jnp.repeat(in_kept, cfg.num_experts // groups, axis=1), choice, -jnp.inf)
        experts = jax.lax.top_k(choice, cfg.experts_per_token)[1]
        weights = jnp.take_along_axis(scores, experts, axis=1)
        if cfg.norm_topk:  # (transformers' 1e-20: weights whose sigmoids all underflow stay 0)
            weights = weights / (row_sum(weights) + 1e-20)
        return weights * cfg.routed_scaling, experts
    # by `row_sum`: a token routes alike whatever tokens share its forward (XLA:CPU's reductions do not)
    probs = jnp.exp(logits - row_sum(logits, jnp.maximum))
    weights, experts = jax.lax.top_k(probs / row_sum(probs), cfg.experts_per_token)
    return (weights / row_sum(weights) if cfg.norm_topk else weights), experts


TILE = 16  # rows of the CPU's grouped expert products (`expert_tiles`), at most


def expert_tiles(rows: jax.Array, sizes: jax.Array, p: dict, cfg: ModelConfig) -> jax.Array:
    """rows [P, H], sorted by expert, sizes [E] of them each expert's -> each row through its expert [P, H]
    (gate/up, activation, down and any biases). Each expert's rows go in tiles of T rows (T from the
    mean rows per expert, at most TILE; an expert's last tile padded), one expert's weights per tile,
    so a forward computes about P + E T rows, not XLA:CPU's E P; a scan walks the tiles, skipping those
    past the last."""
    (n, h), e = rows.shape, sizes.shape[0]
    t = int(min(TILE, 2 ** int(np.log2(max(1, n // e)))))
    tiles = (n + min(e, n) * (t - 1)) // t  # at least sum(ceil(sizes / t))
    per = -(-sizes // t)  # [E] each expert's tiles
    used = per.sum()  # the tiles that hold rows: the first `used` of `tiles`
    first_tile, first_row = jnp.cumsum(per) - per, jnp.cumsum(sizes) - sizes
    index = jnp.arange(tiles)
    expert = jnp.minimum(jnp.searchsorted(first_tile + per, index, side="right"), e - 1)  # [tiles]
    start = first_row[expert] + (index - first_tile[expert]) * t  # [tiles] each tile's first sorted row
    padded = jnp.concatenate([rows, jnp.zeros((t, h), rows.dtype)])

    def tile(_, inputs):
        i, j, r = inputs

        def run(_):
            x = jax.lax.dynamic_slice_in_dim(padded, r, t)
            gu = jnp.einsum("th,hcf->tcf", x, dense(p["experts_gate_up"][j], x.dtype))
            if cfg.expert_bias:
                gu = gu + p["experts_gate_up_bias"][j]
            y = gated(gu, cfg) @ dense(p["experts_down"][j], x.dtype)
            return (y + p["experts_down_bias"][j] if cfg.expert_bias else y).astype(rows.dtype)

        return None, jax.lax.cond(i < used, run, lambda _: jnp.zeros((t, h), rows.dtype), None)

    _, out = jax.lax.scan(tile, None, (index, expert, start))  # [tiles, t, H]
    row_expert = jnp.repeat(jnp.arange(e), sizes, total_repeat_length=n)
    offset = jnp.arange(n) - first_row[row_expert]  # each row's place among its expert's
    return out.reshape(-1, h)[(first_tile[row_expert] + offset // t) * t + offset % t]


def experts_mlp(x: jax.Array, experts: jax.Array, weights: jax.Array, p: dict, cfg: ModelConfig,
                grouped: Callable | None = None) -> jax.Array:
    """x [N, H] through its experts [N, k] (of a layer's experts_gate_up [E, H, 2, F], experts_down [E, F, H]
    and any biases), their outputs summed by weights [N, k] (with routing "sigmoid_input", each expert's
    input times its weight and the outputs summed as they are). The (token, expert) pairs, sorted by
    expert, go through `grouped`: `ragged_experts` for experts packed for the CPU rows kernel (the CPU
    decode loops') and on GPUs and TPUs (there, with fewer pairs than experts, a decode step or a small
    tree, each pair's expert is gathered instead), or `expert_tiles` (the CPU's for unpacked experts:
    XLA:CPU's `lax.ragged_dot` computes every expert over every row, and its gathers copy each pair's
    expert weights). Each way reads the experts a forward uses, each once. The k outputs are added in
    slot order, not scattered back with an add or reduced by XLA, so that with packed experts a token's
    result is bitwise the same whatever tokens share the forward."""
    gate_up, down = p["experts_gate_up"], p["experts_down"]  # (MXFP4 ones dequantized where they multiply)
    n, k = experts.shape
    on_input = cfg.routing == "sigmoid_input"
    packed = isinstance(gate_up, rows_matmul.Packed)
    grouped = grouped or (expert_tiles if jax.default_backend() == "cpu" and not packed else ragged_experts)
    if grouped is ragged_experts and not packed and n * k < cfg.num_experts:  # gathered
        w = dense(gate_up[experts], x.dtype)
        gu = (jnp.einsum("nkh,nkhcf->nkcf", x[:, None] * weights[..., None].astype(x.dtype), w) if on_input
              else jnp.einsum("nh,nkhcf->nkcf", x, w))
        if cfg.expert_bias:
            gu = gu + p["experts_gate_up_bias"][experts]
        y = jnp.einsum("nkf,nkfh->nkh", gated(gu, cfg), dense(down[experts], x.dtype))
        if cfg.expert_bias:
            y = y + p["experts_down_bias"][experts]
    else:
        order = jnp.argsort(experts.reshape(-1), stable=True)  # [N k]: pair order grouped by expert
        sizes = jnp.bincount(experts.reshape(-1)[order], length=cfg.num_experts)
        rows = x[order // k]
        if on_input:
            rows = rows * weights.reshape(-1)[order][:, None].astype(x.dtype)
        y = grouped(rows, sizes, p, cfg)[jnp.argsort(order)].reshape(n, k, -1)
    out = y[:, 0] if on_input else y[:, 0] * weights[:, :1].astype(y.dtype)
    for j in range(1, k):
        out = out + (y[:, j] if on_input else y[:, j] * weights[:, j:j + 1].astype(y.dtype))
    return out


def ragged_experts(rows: jax.Array, sizes: jax.Array, p: dict, cfg: ModelConfig) -> jax.Array:
    """`expert_tiles`' result by grouped products: the CPU rows kernel's for packed experts (each row's
    result independent of the rows beside it), else `lax.ragged_dot` (grouped products on GPUs and TPUs)."""
    def product(x, w):  # x [P, in] @ each run's expert w [E, in, *out] -> [P, *out]
        if isinstance(w, rows_matmul.Packed):
            return rows_matmul.matmul(x, w, sizes)
        w = dense(w, x.dtype)
        return jax.lax.ragged_dot(x, w.reshape(*w.shape[:2], -1), sizes).reshape(-1, *w.shape[2:])

    gu = product(rows, p["experts_gate_up"])
    pairs = jnp.repeat(jnp.arange(sizes.shape[0]), sizes, total_repeat_length=rows.shape[0])  # each row's expert
    if cfg.expert_bias:
        gu = gu + p["experts_gate_up_bias"][pairs]
    y = product(gated(gu, cfg), p["experts_down"])
    return y + p["experts_down_bias"][pairs] if cfg.expert_bias else y


def dense_mlp(p: dict, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """x [..., H] through a layer's dense MLP: gate and up (w_gate_up) or, ungated, up (w_up; xIELU's
    params), then down (w_down), each with its bias where cfg.mlp_bias says."""
    u = linear(x, p["w_gate_up" if cfg.gated_mlp else "w_up"])
    if cfg.mlp_bias:
        u = u + p["b_gate_up" if cfg.gated_mlp else "b_up"]
    y = linear(gated(u, cfg) if cfg.gated_mlp else activation(u, cfg, p.get("xielu")), p["w_down"])
    return y + p["b_down"] if cfg.mlp_bias else y


def mlp(p: dict, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """A layer's MLP over x [B, T, H]: dense (`dense_mlp`), or a mixture of experts (router, experts_*, and
    any shared expert)."""
    if "router" not in p:
        return dense_mlp(p, x, cfg)
    rows = x.reshape(-1, x.shape[-1])
    weights, experts = route(rows, p["router"], cfg, p.get("router_bias"), p.get("router_correction"))
    out = experts_mlp(rows, experts, weights, p, cfg)
    if "shared_down" in p:
        shared = gated_mlp(rows, p["shared_gate_up"], p["shared_down"], cfg)
        out = out + (jax.nn.sigmoid(linear(rows, p["shared_gate"])) * shared if "shared_gate" in p else shared)
    return out.reshape(x.shape)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray, scale: float | np.ndarray = 1.0,
                long: tuple[np.ndarray, int] | None = None) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, D/2] float32 of positions [B, T], times `scale` (YaRN's and LongRoPE's, one or one per
    frequency; it scales queries and keys alike): computed once per forward, shared by the layers. long:
    LongRoPE's (inverse frequencies, first position) for positions from there on. Chosen by each token's
    own position, a key is rotated alike whichever forward writes it, so a tree verifies exactly what
    one-token steps would (transformers switches a whole forward by its last position, which agrees
    with this for one-token steps from a prompt within the original context)."""
    positions = positions[..., None]
    if long is not None:
        inv_freq = jnp.where(positions >= long[1], long[0], inv_freq)
    angles = positions.astype(jnp.float32) * inv_freq
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale  # times 1.0 is exact


def rotary_order(head_dim: int, rotary_dim: int) -> np.ndarray:
    """Our order of a query or key head's dims [D], as indices into a checkpoint's that rotates its first
    rotary_dim R (rotate_half over them: pairs (i, i + R/2)): the rotated pairs at (i, i + D/2), as RoPE
    over the whole head pairs dims, and the other dims in the remaining pairs, whose frequency is 0
    (`ModelConfig.rope_inv_freq`). Queries and keys reordered alike keep their dot products, so RoPE on
    part of a head costs nothing beyond the loader's reordering."""
    rest = (head_dim - rotary_dim) // 2
    return np.concatenate([np.arange(rotary_dim // 2), np.arange(rotary_dim, rotary_dim + rest),
                           np.arange(rotary_dim // 2, rotary_dim), np.arange(rotary_dim + rest, head_dim)])


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, ..., D] (any head axes); cos, sin: [B, T, D/2] (`rope_tables`). rotate_half layout."""
    heads = (1,) * (x.ndim - 3)
    cos = cos.reshape(*cos.shape[:2], *heads, -1)
    sin = sin.reshape(*sin.shape[:2], *heads, -1)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


QUERY_BLOCK = 1024  # a long forward's (a prefill's) new tokens attend in blocks of this many


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap tanh(x / cap), Gemma 2's soft cap of attention scores and logits (x itself without a cap)."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def _attention(q, k_cache, v_cache, mask, cap=None, sinks=None):
    """Grouped-query attention of new queries over the cache (which already holds the new keys).

    q: [B, T, nkv, G, D]; k_cache/v_cache: [B, nkv, S, D]; mask: [B, T, S] bool; cap: the scores' soft
    cap (`softcap`); sinks [nkv, G]: each query head's sink logit, which joins its softmax as a key
    with no value would (GPT-OSS's). Returns [B, T, nkv, G, D].
    Each KV head's G x T queries form one block of rows, so both products are one batched matrix
    product per KV head over the cache in place. More than QUERY_BLOCK new tokens attend a block at a
    time (each row's softmax is its own), so that a long prompt's scores take [B, nkv, G x QUERY_BLOCK, S]
    at once, not [B, nkv, G x T, S]: quadratic in the prompt, they were what ran out of memory first.
    """
    b, t, nkv, g, d = q.shape
    if t > QUERY_BLOCK:
        blocks = -(-t // QUERY_BLOCK)
        pad = ((0, 0), (0, blocks * QUERY_BLOCK - t))  # padding rows see no key; they are dropped below
        qs = jnp.pad(q, pad + ((0, 0),) * 3).reshape(b, blocks, QUERY_BLOCK, nkv, g, d).swapaxes(0, 1)
        masks = jnp.pad(mask, pad + ((0, 0),)).reshape(b, blocks, QUERY_BLOCK, -1).swapaxes(0, 1)
        out = jax.lax.map(lambda qm: _attention(qm[0], k_cache, v_cache, qm[1], cap, sinks), (qs, masks))
        return out.swapaxes(0, 1).reshape(b, blocks * QUERY_BLOCK, nkv, g, d)[:, :t]
    q = (q * d ** -0.5).transpose(0, 2, 3, 1, 4).reshape(b, nkv, g * t, d)
    scores = softcap(jnp.einsum("bkqd,bksd->bkqs", q, k_cache, preferred_element_type=jnp.float32), cap)
    scores = jnp.where(jnp.tile(mask, (1, g, 1))[:, None], scores, jnp.finfo(jnp.float32).min)
    if sinks is None:
        probs = jax.nn.softmax(scores, axis=-1)
    else:  # the sinks' column (row g T + t is query head g of token t) joins the softmax, then goes
        sink = jnp.broadcast_to(jnp.repeat(sinks.astype(jnp.float32), t, axis=1)[None, ..., None], (b, nkv, g * t, 1))
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
    probs = probs.astype(q.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v_cache)
    return out.reshape(b, nkv, g, t, d).transpose(0, 3, 1, 2, 4)


def transformer(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
                cache: KVCache, mask: jax.Array):
    """The decoder stack without the LM head.

    tokens, positions: [B, T] int32; mask: [B, T, max_len] bool (see cache.attention_mask; layers with a
    sliding window narrow it to theirs here). Each layer writes the cache's pending entries and the new
    tokens' K/V (at slots lengths[b] .. lengths[b]+T-1) into the cache, then attends. Returns hidden
    [B, T, H] after the final norm, the cache holding the new K/V (lengths unchanged: nothing is made
    valid) and nothing pending, and the new k, v [layers, B, T, kv_heads, head_dim] (rotated, but in
    NoPE layers).
    """
    b, t = tokens.shape
    g = cfg.num_heads // cfg.num_kv_heads
    kv.check_room(cache, t)
    long = cfg.long_rope_from()
    rope = rope_tables(positions, cfg.rope_inv_freq(), cfg.rope_cos_sin_scale(),
                       None if long is None else (cfg.rope_inv_freq(long=True), long))
    local_rope = rope if cfg.local_rope_theta is None else rope_tables(positions, cfg.rope_inv_freq(local=True))
    no_rope = jnp.ones_like(rope[0]), jnp.zeros_like(rope[1])  # NoPE layers: the identity rotation, exact
    if (qs := cfg.query_scaling) is not None:  # [B, T, 1, 1, 1]: each token's queries' factor
        query_scale = 1 + qs.beta * jnp.log(1 + ((positions + qs.offset) // qs.period).astype(jnp.float32))
        query_scale = query_scale[:, :, None, None, None]
    windowed = mask if cfg.sliding_window is None else \
        mask & kv.window_mask(cache, positions, cfg.sliding_window, cfg.window_chunks)
    x = params["embed"][tokens]
    if cfg.embedding_multiplier != 1:
        x = x * jnp.asarray(cfg.embedding_multiplier, x.dtype)
    slots = kv.write_slots(cache, t)

    def layer(p, kind, i, x, ck, cv):  # layer i (an int, or traced in a stack) of layer kind `kind`
        windowed_layer, nope, _ = kind
        layer_mask, cos, sin = (windowed, *local_rope) if windowed_layer else (mask, *rope)
        if nope:
            cos, sin = no_rope
        h = optional_norm(x, p, "attn_norm", cfg)
        qkv = linear(h, p["wqkv"])  # [B, T, nkv, G + 2, D]
        if cfg.attention_bias:
            qkv = qkv + p["bqkv"]
        if cfg.qk_norm and not (cfg.qk_norm == "unweighted" and nope):  # before RoPE
            qkv = qk_norm(qkv, p.get("q_norm"), p.get("k_norm"), cfg)
        if qs is not None and (nope or not qs.nope_only):  # (before RoPE too, which it commutes with)
            qkv = jnp.concatenate([qkv[:, :, :, :g] * query_scale.astype(qkv.dtype), qkv[:, :, :, g:]], axis=3)
        if isinstance(p["wqkv"], rows_matmul.Packed) and cpu_attention.supported(qkv):  # the CPU decode loops
            attn, k, v, ck, cv = cpu_attention.attention(qkv, cos, sin, ck, cv, cache.pending_k, cache.pending_v,
                                                         slots, layer_mask, i, cfg.attn_softcap, p.get("sinks"))
        else:
            k, v = apply_rope(qkv[:, :, :, g], cos, sin), qkv[:, :, :, g + 1]
            ck, cv = kv.write_layer(cache, ck, cv, k, v, slots, i)
            attn = _attention(apply_rope(qkv[:, :, :, :g], cos, sin), ck[i], cv[i], layer_mask, cfg.attn_softcap,
                              p.get("sinks"))
        attn = linear(attn.reshape(b, t, -1), p["wo"])
        if cfg.output_bias:
            attn = attn + p["bo"]
        attn = optional_norm(attn, p, "post_attn_norm", cfg)
        if cfg.parallel_block:  # the MLP reads the norm attention read
            x = x + attn + mlp(p, h, cfg)
        else:
            x = x + attn
            h = optional_norm(x, p, "mlp_norm", cfg)
            x = x + optional_norm(mlp(p, h, cfg), p, "post_mlp_norm", cfg)
        return x, ck, cv, k, v

    ck, cv, ks, vs, kinds = cache.k, cache.v, [], [], cfg.layer_kinds
    for first, item in layer_items(params["layers"]):
        kind = kinds[first]
        if isinstance(item, LayerStack):
            def step(carry, j, item=item, kind=kind, first=first):
                x, ck, cv, k, v = layer(item.at(j), kind, first + j, *carry)
                return (x, ck, cv), (k, v)

            (x, ck, cv), (k, v) = jax.lax.scan(step, (x, ck, cv), jnp.arange(item.count, dtype=jnp.int32))
        else:
            x, ck, cv, k, v = layer(item, kind, first, x, ck, cv)
            k, v = k[None], v[None]
        ks.append(k)
        vs.append(v)
    hidden = optional_norm(x, params, "final_norm", cfg)
    return hidden, kv.written(cache, ck, cv), jnp.concatenate(ks), jnp.concatenate(vs)


def lm_head_weight(params: Params):
    """The LM head [H, V]: its own, or the embedding's transpose when the two are tied."""
    return params["lm_head"] if "lm_head" in params else params["embed"].T


def finish_logits(logits: jax.Array, cfg: ModelConfig | None) -> jax.Array:
    """The LM head's float32 logits as the model `cfg` finishes them: divided by its logits_scaling
    (Granite's), then soft-capped (Gemma 2's); as they are without a model (a drafter's)."""
    if cfg is None:
        return logits
    return softcap(logits if cfg.logits_scaling == 1 else logits / cfg.logits_scaling, cfg.final_softcap)


def lm_head(params: Params, hidden: jax.Array, cfg: ModelConfig | None = None) -> jax.Array:
    """hidden [..., H] -> float32 logits [..., V] (tied to the embedding when there is no lm_head; plus
    lm_head_bias where there is one), finished as the target `cfg`'s (`finish_logits`; a drafter sharing the
    head passes none)."""
    w = lm_head_weight(params)
    if isinstance(w, rows_matmul.Packed):
        logits = linear(hidden, w)
    else:
        logits = jnp.matmul(hidden, w, preferred_element_type=jnp.float32)
    if "lm_head_bias" in params:
        logits = logits + params["lm_head_bias"].astype(jnp.float32)
    return finish_logits(logits, cfg)


def forward(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
            cache: KVCache, mask: jax.Array) -> ForwardOutput:
    """Full forward: logits and hidden states for every new token, the cache holding their K/V, and
    their K/V."""
    hidden, cache, k, v = transformer(params, cfg, tokens, positions, cache, mask)
    return ForwardOutput(lm_head(params, hidden, cfg), hidden, cache, k, v)


def transformer_causal(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Hidden states [B, T, H] of whole sequences [B, T] from position 0: plain causal, no cache kept."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    scratch = kv.init_cache(cfg, b, t)
    mask = kv.attention_mask(scratch, positions, jnp.tril(jnp.ones((t, t), bool)))
    return transformer(params, cfg, tokens, positions, scratch, mask)[0]


def forward_causal(params: Params, cfg: ModelConfig, tokens: jax.Array) -> ForwardOutput:
    """Logits and hidden states of whole sequences [B, T] (no cache; it and k, v are not returned)."""
    hidden = transformer_causal(params, cfg, tokens)
    return ForwardOutput(lm_head(params, hidden, cfg), hidden, None, None, None)
