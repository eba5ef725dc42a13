"""Model loaders: GGUF files, Hugging Face checkpoint directories, and the embedded default.

Both formats name the same tensors differently; `GLOBAL_TENSORS` and `LAYER_TENSORS` are the one
table mapping our params layout to each. `assemble_params` builds every parameter straight onto its
devices (one device, or its shards on a mesh): each device's block is read from the checkpoint on its
own, so the host never holds more than a few tensors at a time. Where a model stores its tensors
otherwise, a `Source` wrapped around the checkpoint's reads them as the table expects: `Scaled` folds
in constants the model applies to a weight's product, `Unfused` splits fused tensors (Phi-3's, GLM's),
`Renamed` reads tensors stored under other names or one per expert, `RopeOrdered` reorders query and
key heads' dims where RoPE pairs them otherwise than we do (on part of a head, or adjacent dims).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple, Protocol

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from redrafter_jax.config import ModelConfig
from redrafter_jax.model import FLOAT32_PARAMS, Params, is_shape, param_shapes, rotary_order
from redrafter_jax.mxfp4 import Mxfp4
from redrafter_jax.sharding import param_shardings
from redrafter_jax.tokenizer import Tokenizer


class LoadedModel(NamedTuple):
    config: ModelConfig
    params: Params
    tokenizer: Tokenizer
    mesh: Mesh | None = None  # the devices params are split over (pass it on to `generate`), None: one device


# Our parameter -> its parts as checkpoints store them, each (Hugging Face name, GGUF name); "{i}"
# is the layer index. Both formats store linear weights as [out, in].
GLOBAL_TENSORS = {
    "embed": [("model.embed_tokens.weight", "token_embd.weight")],
    "final_norm": [("model.norm.weight", "output_norm.weight")],
    "final_norm_bias": [("model.norm.bias", "output_norm.bias")],
    "lm_head": [("lm_head.weight", "output.weight")],
    "lm_head_bias": [("lm_head.bias", "output.bias")],
}
LAYER_TENSORS = {
    "attn_norm": [("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight")],
    "attn_norm_bias": [("model.layers.{i}.input_layernorm.bias", "blk.{i}.attn_norm.bias")],
    "wqkv": [("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
             ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
             ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight")],
    "bqkv": [("model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias"),
             ("model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias"),
             ("model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias")],
    "q_norm": [("model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight")],
    "k_norm": [("model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight")],
    "sinks": [("model.layers.{i}.self_attn.sinks", "blk.{i}.attn_sinks.weight")],
    "wo": [("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight")],
    "bo": [("model.layers.{i}.self_attn.o_proj.bias", "blk.{i}.attn_output.bias")],
    "post_attn_norm": [("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.post_attention_norm.weight")],
    "mlp_norm": [("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight")],
    "mlp_norm_bias": [("model.layers.{i}.post_attention_layernorm.bias", "blk.{i}.ffn_norm.bias")],
    "w_gate_up": [("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
                  ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight")],
    "w_up": [("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight")],
    "w_down": [("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight")],
    "b_gate_up": [("model.layers.{i}.mlp.gate_proj.bias", "blk.{i}.ffn_gate.bias"),
                  ("model.layers.{i}.mlp.up_proj.bias", "blk.{i}.ffn_up.bias")],
    "b_up": [("model.layers.{i}.mlp.up_proj.bias", "blk.{i}.ffn_up.bias")],
    "b_down": [("model.layers.{i}.mlp.down_proj.bias", "blk.{i}.ffn_down.bias")],
    # xIELU's learned scalars (a GGUF file keeps them in its metadata: the GGUF loader reads them under these names)
    "xielu": [(f"model.layers.{{i}}.mlp.act_fn.{n}", f"blk.{{i}}.xielu.{n}")
              for n in ("alpha_p", "alpha_n", "beta", "eps")],
    "post_mlp_norm": [("model.layers.{i}.post_feedforward_layernorm.weight", "blk.{i}.post_ffw_norm.weight")],
    # mixtures of experts; Hugging Face checkpoints store each expert on its own (`Renamed` stacks them)
    "router": [("model.layers.{i}.mlp.gate.weight", "blk.{i}.ffn_gate_inp.weight")],
    "router_bias": [("model.layers.{i}.mlp.gate.bias", "blk.{i}.ffn_gate_inp.bias")],
    "router_correction": [("model.layers.{i}.mlp.gate.e_score_correction_bias", "blk.{i}.exp_probs_b.bias")],
    "experts_gate_up": [("model.layers.{i}.mlp.experts.gate_proj.weight", "blk.{i}.ffn_gate_exps.weight"),
                        ("model.layers.{i}.mlp.experts.up_proj.weight", "blk.{i}.ffn_up_exps.weight")],
    "experts_gate_up_bias": [("model.layers.{i}.mlp.experts.gate_proj.bias", "blk.{i}.ffn_gate_exps.bias"),
                             ("model.layers.{i}.mlp.experts.up_proj.bias", "blk.{i}.ffn_up_exps.bias")],
    "experts_down": [("model.layers.{i}.mlp.experts.down_proj.weight", "blk.{i}.ffn_down_exps.weight")],
    "experts_down_bias": [("model.layers.{i}.mlp.experts.down_proj.bias", "blk.{i}.ffn_down_exps.bias")],
    "shared_gate_up": [("model.layers.{i}.mlp.shared_expert.gate_proj.weight", "blk.{i}.ffn_gate_shexp.weight"),
                       ("model.layers.{i}.mlp.shared_expert.up_proj.weight", "blk.{i}.ffn_up_shexp.weight")],
    "shared_down": [("model.layers.{i}.mlp.shared_expert.down_proj.weight", "blk.{i}.ffn_down_shexp.weight")],
    "shared_gate": [("model.layers.{i}.mlp.shared_expert_gate.weight", "blk.{i}.ffn_gate_inp_shexp.weight")],
}
HF, GGUF = 0, 1
# Gemma's Hugging Face checkpoints call the norm before the MLP so, and the one after attention by the
# name Llama gives the norm before the MLP
PRE_MLP_NORM = "model.layers.{i}.pre_feedforward_layernorm.weight"
# Phi-3's fused tensors: Q, K and V in one, gate and up in one (GLM's too), along the output rows
FUSED_QKV = "model.layers.{i}.self_attn.qkv_proj.weight"
FUSED_GATE_UP = "model.layers.{i}.mlp.gate_up_proj.weight"
# ours [in, out] = stored [out, in] transposed
TRANSPOSED = ("lm_head", "wo", "w_up", "w_down", "router", "shared_down", "shared_gate")
GATE_UP = ("w_gate_up", "shared_gate_up")  # ours [H, 2, I] from gate and up, each stored [I, H]
ROPE_FACTORS = "rope_freqs.weight"  # GGUF: per-frequency RoPE divisors, which the loader puts in the config
# Stored but not parameters: the RoPE frequencies older transformers versions saved; GGUF's RoPE factors
IGNORED = (".rotary_emb.inv_freq", ROPE_FACTORS)


def stored_names(cfg: ModelConfig, ours: str, fmt: int) -> list[str]:
    """The names ("{i}": the layer's index) of the parts our parameter `ours` has in a checkpoint; of an
    MXFP4 weight's codes and scales ("experts_down.blocks", ".scales"), its parts' names with "_blocks" or
    "_scales" appended."""
    if ours.endswith((".blocks", ".scales")):
        weight, part = ours.split(".")
        return [f"{name}_{part}" for name in stored_names(cfg, weight, fmt)]
    if ours == "mlp_norm" and cfg.post_norms and fmt == HF:
        return [PRE_MLP_NORM]
    return [names[fmt] for names in {**GLOBAL_TENSORS, **LAYER_TENSORS}[ours]]


class Source(Protocol):
    """A checkpoint's tensors, by the format's names, in the stored layout."""

    def names(self) -> list[str]:
        """Every tensor the checkpoint holds."""

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape; KeyError if the checkpoint has no such tensor."""

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """The block tensor[index] (formats that can, read only that block)."""


def _patterns(cfg: ModelConfig, ours: str, fmt: int) -> list[re.Pattern]:
    """Patterns matching the stored names of our parameter `ours` in every layer, or of "wq", "wk", "bq",
    "bk" (wqkv's and bqkv's query and key parts)."""
    part = {"wq": ("wqkv", 0), "wk": ("wqkv", 1), "bq": ("bqkv", 0), "bk": ("bqkv", 1)}.get(ours)
    names = stored_names(cfg, ours, fmt) if part is None else stored_names(cfg, part[0], fmt)[part[1]:part[1] + 1]
    return [re.compile(re.escape(name).replace(r"\{i\}", r"\d+") + "$") for name in names]


class _Rewritten:
    """A `Source` that reads the tensors `rules` match, [(pattern, rewrite)], through the first rule's
    rewrite (names and shapes as they are)."""

    def __init__(self, source: Source, rules: list[tuple[re.Pattern, Callable[[np.ndarray], np.ndarray]]]):
        self.source, self.rules = source, rules

    def names(self) -> list[str]:
        return self.source.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(name)

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        x = self.source.read(name, index)
        for pattern, rewrite in self.rules:
            if pattern.match(name):
                return rewrite(x)
        return x


class Scaled(_Rewritten):
    """A `Source` whose tensors read as (x + shift) x factor: `adjust` maps our parameter, or "wq" and "bq"
    (wqkv's and bqkv's query parts), to (shift, factor). Constants a model applies to what a weight
    gives, folded into that weight: Granite's residual and attention multipliers, Gemma's norm weights w
    that scale by 1 + w and its query scale. (A model applies those a drafter sees itself: Granite's
    embedding multiplier and logits scaling.)"""

    def __init__(self, source: Source, cfg: ModelConfig, fmt: int, adjust: dict[str, tuple[float, float]]):
        def fold(shift, factor):  # in float32 (1 + w and the products of Gemma's and Granite's own), cast once
            return lambda x: (x.astype(np.float32) + np.float32(shift)) * np.float32(factor)

        super().__init__(source, [(pattern, fold(shift, factor)) for ours, (shift, factor) in adjust.items()
                                  if (shift, factor) != (0, 1) for pattern in _patterns(cfg, ours, fmt)])


class RopeOrdered(_Rewritten):
    """A `Source` whose query and key heads (weights, biases, norms) read with their dims in our RoPE order
    (`model.rotary_order`: the rotated pairs at (j, j + D/2), any unrotated dims paired at frequency 0),
    from a checkpoint whose heads rotate the halves of their first rotary_dim (rotate_half's pairs, with
    RoPE on part of a head: Phi-4-mini's) or, `interleaved`, its adjacent dims (2j, 2j + 1) (GLM's, ERNIE's,
    Cohere's). A read takes whole heads (as `_block` reads them)."""

    def __init__(self, source: Source, cfg: ModelConfig, fmt: int, interleaved: bool):
        r, d = cfg.rotary, cfg.head_dim
        halves = np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2), np.arange(r, d)]) if interleaved else \
            np.arange(d)  # the stored dim each dim of rotate_half's layout holds
        order = halves[rotary_order(d, r)]

        def weights(x):  # [heads D, H]: each head's dims in `order`
            return x.reshape(-1, d, x.shape[1])[:, order].reshape(x.shape)

        def vectors(x):  # biases and norms, [(heads) D] or [heads, D]
            return x.reshape(-1, d)[:, order].reshape(x.shape)

        super().__init__(source, [(pattern, weights if ours in ("wq", "wk") else vectors)
                                  for ours in ("wq", "wk", "bq", "bk", "q_norm", "k_norm")
                                  for pattern in _patterns(cfg, ours, fmt)])


class Unfused:
    """A `Source` whose fused tensors read as the parts the name table expects: `parts` maps a part's name
    to (its fused tensor's name, its first row, its rows); rows along the outputs, the first axis, or of a
    stack of experts' [E, out, in] the second."""

    def __init__(self, source: Source, parts: dict[str, tuple[str, int, int]]):
        self.source, self.parts = source, parts
        fused = {name for name, _, _ in parts.values()}
        self._names = [n for n in source.names() if n not in fused] + list(parts)

    def names(self) -> list[str]:
        return self._names

    @staticmethod
    def _axis(shape: tuple[int, ...]) -> int:  # the rows' axis: a stack of experts' second, else the first
        return int(len(shape) == 3)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.parts:
            return self.source.shape(name)
        fused, _, rows = self.parts[name]
        shape = tuple(self.source.shape(fused))
        axis = self._axis(shape)
        return (*shape[:axis], rows, *shape[axis + 1:])

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        if name not in self.parts:
            return self.source.read(name, index)
        fused, first, rows = self.parts[name]
        axis = self._axis(self.source.shape(fused))
        start, stop, _ = index[axis].indices(rows)
        return self.source.read(fused, (*index[:axis], slice(first + start, first + stop), *index[axis + 1:]))


class Hidden:
    """A `Source` without the tensors whose names start with `prefixes` (GLM-4.5's multi-token prediction
    layers, which transformers and llama.cpp's generation leave unread too)."""

    def __init__(self, source: Source, prefixes: tuple[str, ...]):
        self.source, self._names = source, [n for n in source.names() if not n.startswith(prefixes)]
        self.shape, self.read = source.shape, source.read

    def names(self) -> list[str]:
        return self._names


class Renamed:
    """A `Source` reading tensors under the names the table expects: `origins` maps such a name to the
    stored tensor it renames (a str), or to the stored tensors it stacks along a new first axis (a list:
    a mixture of experts' stored one per expert)."""

    def __init__(self, source: Source, origins: dict[str, list[str] | str]):
        self.source, self.origins = source, origins
        stored = {n for parts in origins.values() for n in ([parts] if isinstance(parts, str) else parts)}
        self._names = [n for n in source.names() if n not in stored] + list(origins)

    def names(self) -> list[str]:
        return self._names

    def shape(self, name: str) -> tuple[int, ...]:
        parts = self.origins.get(name, name)
        if isinstance(parts, str):
            return self.source.shape(parts)
        shapes = []
        for part in parts:
            try:
                shapes.append(tuple(self.source.shape(part)))
            except KeyError:
                raise ValueError(f"checkpoint is missing tensor {part!r}") from None
            if shapes[-1] != shapes[0]:
                raise ValueError(f"tensor {part!r} has shape {shapes[-1]}, unlike {parts[0]!r}'s {shapes[0]}")
        return (len(parts), *shapes[0])

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        parts = self.origins.get(name, name)
        if isinstance(parts, str):
            return self.source.read(parts, index)
        return np.stack([self.source.read(part, index[1:]) for part in parts[index[0]]])


def expert_stacks(cfg: ModelConfig, router: str, gate: str, up: str, down: str) -> dict[str, list[str] | str]:
    """`Renamed`'s origins for a Hugging Face checkpoint whose MoE layers store the router and each expert's
    gate, up and down projections under these names ("{i}": the layer, "{e}": the expert)."""
    stacks = {}
    for layer in (i for i in range(cfg.num_layers) if cfg.moe(i)):
        for ours, stored in (("router", [router]), ("experts_gate_up", [gate, up]), ("experts_down", [down])):
            for name, part in zip(stored_names(cfg, ours, HF), stored):
                part = part.replace("{i}", str(layer))
                stacks[name.format(i=layer)] = part if ours == "router" else [
                    part.format(e=e) for e in range(cfg.num_experts)]
    return stacks


def fused_parts(cfg: ModelConfig, fmt: int, fused: dict[str, str]) -> dict[str, tuple[str, int, int]]:
    """`Unfused`'s parts for checkpoints that fuse the parts of our parameters along their output rows:
    `fused` maps wqkv or bqkv ([q; k; v]) or w_gate_up, shared_gate_up or experts_gate_up ([gate; up]) to its
    fused tensor's name ("{i}": the layer), e.g. Hugging Face's `FUSED_QKV` and `FUSED_GATE_UP` (Phi-3's)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    qkv = [(0, q), (q, kv), (q + kv, kv)]
    spans = {"wqkv": qkv, "bqkv": qkv, **{ours: [(0, n), (n, n)] for ours, n in (
        ("w_gate_up", cfg.intermediate_size), ("shared_gate_up", cfg.shared_expert_size),
        ("experts_gate_up", cfg.expert_size))}}
    return {name.format(i=layer): (whole.format(i=layer), first, n)
            for ours, whole in fused.items() for name, (first, n) in zip(stored_names(cfg, ours, fmt), spans[ours])
            for layer in range(cfg.num_layers)}


def granite_adjustments(cfg: ModelConfig, residual: float, attention: float) -> dict[str, tuple[float, float]]:
    """`Scaled`'s adjustments for Granite's residual multiplier (both branches: folded into the norms after
    attention and the MLP where the model has them, HyperCLOVA X's, else into the output projections, biases,
    experts' and shared experts' too) and attention multiplier (the scores' scale, which replaces
    head_dim^-1/2)."""
    if not all(isinstance(v, (int, float)) and v > 0 for v in (residual, attention)):
        raise ValueError(f"Granite's residual and attention multipliers must be positive numbers, got "
                         f"{residual} and {attention}")
    query = attention * cfg.head_dim ** 0.5
    branches = ("post_attn_norm", "post_mlp_norm") if cfg.post_norms else (
        "wo", "bo", "w_down", "b_down", "experts_down", "shared_down")
    return {**dict.fromkeys(branches, (0, residual)), "wq": (0, query), "bq": (0, query)}


def norm_shifts(shift: float = 1) -> dict[str, tuple[float, float]]:
    """`Scaled`'s adjustments for norm weights w that scale by `shift` + w (Gemma's, Nemotron's LayerNorm1P)."""
    return {k: (shift, 1) for k in ("attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm", "final_norm")}


def gemma_adjustments(cfg: ModelConfig, query_pre_attn_scalar: float,
                      norm_shift: float = 1) -> dict[str, tuple[float, float]]:
    """`Scaled`'s adjustments for Gemma: every RMS norm scales by 1 + w (`norm_shift`: 0 where the
    checkpoint stores 1 + w, as llama.cpp's converter does), and the scores by query_pre_attn_scalar^-1/2
    instead of head_dim^-1/2 (folded into the query norm, which comes last; or without one, Gemma 2's,
    into the query projection)."""
    if not (isinstance(query_pre_attn_scalar, (int, float)) and query_pre_attn_scalar > 0):
        raise ValueError(f"Gemma's query_pre_attn_scalar must be a positive number, got {query_pre_attn_scalar}")
    query = (cfg.head_dim / query_pre_attn_scalar) ** 0.5
    adjust = norm_shifts(norm_shift)
    if cfg.qk_norm:
        adjust.update(q_norm=(norm_shift, query), k_norm=(norm_shift, 1))
    else:
        adjust.update(wq=(0, query), bq=(0, query))
    return adjust


def _stored_shapes(cfg: ModelConfig, ours: str, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The shapes the parts of our parameter `ours` (of shape `shape`) have in a checkpoint."""
    d = cfg.head_dim
    if ours in ("q_norm", "k_norm") and cfg.qk_norm == "all" or ours == "sinks":  # stored [heads (D)]
        return [(int(np.prod(shape)),)]
    if ours in ("q_norm", "k_norm") and cfg.qk_norm == "per_head":  # stored [heads, D]
        return [(int(np.prod(shape[:2])), d)]
    if ours == "xielu":  # (transformers saves beta and eps as scalars, which the check takes for [1])
        return [(1,)] * 4
    lead = shape[:1] if ours == "wqkv" else ()  # the weight's input axis H; the bias has none
    if ours in ("wqkv", "bqkv"):
        return [(cfg.num_heads * d, *lead), (cfg.num_kv_heads * d, *lead), (cfg.num_kv_heads * d, *lead)]
    if ours in GATE_UP:
        return [(shape[2], shape[0])] * 2
    if ours == "experts_gate_up":  # [E, H, 2, F] from gate and up, each stored [E, F, H]
        return [(shape[0], shape[3], shape[1])] * 2
    if ours.startswith("experts_gate_up."):  # MXFP4 [E, 2, F, ...] from gate's and up's [E, F, ...]
        return [(shape[0], *shape[2:])] * 2
    if ours == "experts_gate_up_bias":  # [E, 2, F] from gate's and up's, each [E, F]
        return [(shape[0], shape[2])] * 2
    if ours == "b_gate_up":  # [2, I] from gate's and up's, each [I]
        return [shape[1:]] * 2
    if ours == "experts_down":  # [E, F, H], stored [E, H, F]
        return [(shape[0], shape[2], shape[1])]
    return [shape[::-1] if ours in TRANSPOSED else shape]


def _block(cfg: ModelConfig, ours: str, parts: list[str], index: tuple[slice, ...], source: Source) -> np.ndarray:
    """Our parameter's block at `index` (one slice per axis of our layout), read from its stored parts."""
    if ours in ("wqkv", "bqkv"):  # q [nh D, (H)], k and v [nkv D, (H)] -> [(H), nkv, G + 2, D]
        *lead, heads, j, d = index
        k0, k1, _ = heads.indices(cfg.num_kv_heads)
        groups = []
        for name, per_kv in zip(parts, (cfg.num_heads // cfg.num_kv_heads, 1, 1)):
            rows = slice(k0 * per_kv * cfg.head_dim, k1 * per_kv * cfg.head_dim)
            x = source.read(name, (rows, *lead))
            groups.append(x.reshape(k1 - k0, per_kv, cfg.head_dim, *x.shape[1:]))
        x = np.moveaxis(np.concatenate(groups, axis=1), (0, 1, 2), (-3, -2, -1))
        return x[(slice(None),) * len(lead) + (slice(None), j, d)]
    if ours in ("q_norm", "k_norm") and cfg.qk_norm in ("per_head", "all"):  # [heads (D)] -> [nkv, G or 1, D]
        x = source.read(parts[0], (slice(None),) * (1 + (cfg.qk_norm == "per_head")))
        return x.reshape(cfg.num_kv_heads, -1, cfg.head_dim)[index]
    if ours == "sinks":  # [heads] -> [nkv, G]
        return source.read(parts[0], (slice(None),)).reshape(cfg.num_kv_heads, -1)[index]
    if ours == "xielu":  # four scalars, each stored [1] or [] -> [4]
        return np.concatenate([np.reshape(source.read(name, ()), -1) for name in parts])[index]
    if ours in GATE_UP:  # gate, up [I, H] -> [H, 2, I]
        h, c, i = index
        return np.stack([source.read(name, (i, h)) for name in parts]).transpose(2, 0, 1)[:, c]
    if ours == "b_gate_up":  # gate's and up's [I] -> [2, I]
        c, i = index
        return np.stack([source.read(name, (i,)) for name in parts])[c]
    if ours == "experts_gate_up":  # gate, up [E, F, H] -> [E, H, 2, F]
        e, h, c, f = index
        return np.stack([source.read(name, (e, f, h)) for name in parts]).transpose(1, 3, 0, 2)[:, :, c]
    # gate's and up's [E, F, ...] -> [E, 2, F, ...] (biases, MXFP4 codes and scales)
    if ours == "experts_gate_up_bias" or ours.startswith("experts_gate_up."):
        e, c, *rest = index
        return np.stack([source.read(name, (e, *rest)) for name in parts], axis=1)[:, c]
    if ours == "experts_down":  # [E, H, F] -> [E, F, H]
        e, f, h = index
        return source.read(parts[0], (e, h, f)).transpose(0, 2, 1)
    if ours in TRANSPOSED:
        return source.read(parts[0], index[::-1]).T
    return source.read(parts[0], index)


def _place(shape: tuple[int, ...], sharding: jax.sharding.Sharding, block) -> jax.Array:
    """The array of `shape` laid out as `sharding`, each of this process's devices given block(index) of
    its own. One block at a time is read, moved to its device and dropped, so the host holds one
    shard of one parameter, not the parameter (as `jax.make_array_from_callback` would)."""
    shards = [jax.device_put(block(index), device).block_until_ready()
              for device, index in sharding.addressable_devices_indices_map(shape).items()]
    return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def assemble_params(cfg: ModelConfig, fmt: int, source: Source, shardings=None) -> Params:
    """Builds params (dtype cfg.dtype, but `model.FLOAT32_PARAMS`) from a checkpoint, each placed directly on
    its devices.

    shardings: a pytree like `param_shapes(cfg)` of `jax.sharding.Sharding` (e.g.
    `sharding.param_shardings`), or None for this process's first device. Every stored part's shape is
    checked before anything is read.
    """
    shapes = param_shapes(cfg)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, shapes, is_leaf=is_shape)

    def arrays(k, s, where):  # (ours, shape, sharding) of each array: an MXFP4 weight's codes and scales apart
        if not isinstance(s, Mxfp4):
            return [(k, s, where)]
        return [(f"{k}.{part}", getattr(s, part), getattr(where, part)) for part in ("blocks", "scales")]

    # (ours, its layer, its stored parts, shape, sharding)
    plan = [(k, None, stored_names(cfg, k, fmt), s, shardings[k]) for k, s in shapes.items() if k != "layers"]
    for i, (layer, where) in enumerate(zip(shapes["layers"], shardings["layers"])):
        plan += [(k, i, [n.format(i=i) for n in stored_names(cfg, k, fmt)], s, w)
                 for name, shape in layer.items() for k, s, w in arrays(name, shape, where[name])]
    for ours, _, parts, shape, _ in plan:
        for name, stored in zip(parts, _stored_shapes(cfg, ours, shape)):
            try:
                got = tuple(source.shape(name))
            except KeyError:
                raise ValueError(f"checkpoint is missing tensor {name!r}") from None
            if got != stored and not (got == () and stored == (1,)):
                raise ValueError(f"tensor {name!r} has shape {got}, expected {stored} for this config")
    used = {name for _, _, parts, _, _ in plan for name in parts}
    if cfg.tie_word_embeddings:
        used.add(GLOBAL_TENSORS["lm_head"][0][fmt])
    unused = sorted(n for n in source.names() if n not in used and not n.endswith(IGNORED))
    if unused:  # e.g. biases or layers the config does not declare: the model would run without them
        raise ValueError(f"checkpoint has {len(unused)} tensors this config does not use, e.g. {unused[:3]}: "
                         "the checkpoint does not match its config, or holds weights this loader does not support")

    # a bar on a terminal only: dequantising a large model takes a while
    params = {"layers": [{} for _ in shapes["layers"]]}
    with tqdm(total=len(plan), desc="loading weights", unit="tensor", disable=None, leave=False) as bar:
        for ours, layer, parts, shape, sharding in plan:
            # MXFP4's bytes as stored; `model.FLOAT32_PARAMS` in float32; the others in the model's dtype
            dtype = np.uint8 if ours.endswith((".blocks", ".scales")) else np.float32 if ours in FLOAT32_PARAMS \
                else cfg.dtype
            x = _place(shape, sharding, lambda index: np.asarray(_block(cfg, ours, parts, index, source), dtype))
            (params if layer is None else params["layers"][layer])[ours] = x
            bar.update()
    for p, layer in zip(params["layers"], shapes["layers"]):  # an MXFP4 weight from its codes and scales
        for k, s in layer.items():
            if isinstance(s, Mxfp4):
                p[k] = Mxfp4(p.pop(f"{k}.blocks"), p.pop(f"{k}.scales"), s.order)
    return params


class OpenedModel(NamedTuple):
    """A checkpoint whose config and tokenizer are read, its weights not yet: what needs only the config
    (a drafter's shape, a datastore's tokens) is checked before a large model's minutes of loading."""

    config: ModelConfig
    tokenizer: Tokenizer
    fmt: int  # HF or GGUF: which names `source` holds
    source: Source
    mesh: Mesh | None = None

    def load(self) -> LoadedModel:
        """Reads the weights onto their devices (each parameter's shards on `mesh`, if given)."""
        shardings = None if self.mesh is None else param_shardings(self.config, self.mesh)
        return LoadedModel(self.config, assemble_params(self.config, self.fmt, self.source, shardings),
                           self.tokenizer, self.mesh)
