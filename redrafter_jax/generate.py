"""Batched generation as two jitted programs: the prefill, then a single `lax.while_loop` of decode steps.

Autoregressive: one target step per token. Speculative (ReDrafter): each step the drafter proposes W
beams of L tokens, the beams are packed into a tree, the target verifies the whole tree in one
forward pass, and the longest accepted prefix plus the target's own next token are kept. Prompts of
different lengths are right-padded into one [B, P] block and every row keeps its own cache length,
so rows never need re-aligning. Decode state is a pytree carried through the loop; the host sees
nothing until the loop ends (except an optional streaming callback).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from redrafter_jax import cache as kv
from redrafter_jax import continuous, datastore, lookup, rows_matmul, sharding
from redrafter_jax.acceptance import Accepted, accept_longest_prefix, apple_accept
from redrafter_jax.beam_search import Draft, Proposer
from redrafter_jax.config import ModelConfig, SamplingConfig, SpecConfig
from redrafter_jax.datastore import Datastore
from redrafter_jax.decode import (
    Emitted,
    GenerateOutput,
    Prefilled,
    PromptCache,
    Resume,
    Started,
    StreamFn,
    StreamTo,
    cache_len,
    continuing,
    emit,
    held,
    is_count,
    prefill_prompts,
    prepare_prompts,
    round_up,
    start,
    stream_tokens,
    streaming_to,
)
from redrafter_jax.drafter import Drafter
from redrafter_jax.model import EXPERTS, MATRICES, ForwardOutput, Params, cast_params, forward, layer_items, pack_params
from redrafter_jax.sampling import Sampling, select, target_log_probs
from redrafter_jax.tree import Tree, pack_tree

# The decode loops run under this named scope and each step's parts under their own (autoregressive_step:
# forward, select, commit; speculative_step: propose, pack, verify, accept, commit), which every op of
# the compiled program keeps: a profile sums the ops' times by them (infer/profile.py).
LOOP_SCOPE = "decode_loop"


@struct.dataclass
class ARState:
    cache: kv.KVCache
    out: Emitted
    last: jax.Array  # [B] the newest token, not yet in the cache
    key: jax.Array
    step: jax.Array  # [] int32

    def seated(self, row: jax.Array, p: Started) -> "ARState":  # `continuous.RowState`
        return self.replace(last=self.last.at[row].set(p.first[0]))

    def outputs(self) -> Emitted:
        return self.out


def autoregressive_step(params: Params, s: ARState, *, cfg: ModelConfig, sampling: Sampling,
                        stream: StreamTo | None, mesh: Mesh | None = None) -> ARState:
    """One target forward of each row's newest token; appends the next token."""
    positions = s.cache.lengths[:, None]
    key, sub = jax.random.split(s.key)
    with jax.named_scope("forward"):
        mask = kv.attention_mask(s.cache, positions, jnp.ones((1, 1), bool))
        f = forward(params, cfg, s.last[:, None], positions, s.cache, mask)
    with jax.named_scope("select"):
        nxt = select(sub, f.logits[:, 0], sampling)
    with jax.named_scope("commit"):
        cache = kv.commit(f.cache, (~s.out.done).astype(jnp.int32))
        out, n = emit(s.out, nxt[:, None], jnp.ones_like(nxt), cfg.eos_token_ids)
        stream_tokens(stream, out, nxt[:, None], n, mesh)
    return ARState(cache, out, jnp.where(n > 0, nxt, s.last), key, s.step + 1)


def _run(step, init, params, prompts, prompt_lengths, limits, *, cfg: ModelConfig, sampling: Sampling,
         max_new_tokens: int, stream: StreamTo | None, mesh: Mesh | None = None):
    """The decode loop: step(prompts, prompt_lengths, s) until every row is done, from init (its rows
    holding the first prompts); with more prompts than rows, continuous batching (`continuous.run`, each
    waiting prompt prefilled on params into a cache like init's, its first token streamed). Returns the
    final state and every prompt's `outputs()` rows."""
    with jax.named_scope(LOOP_SCOPE):
        if prompts.shape[0] == init.out.done.shape[0]:
            s = jax.lax.while_loop(lambda s: ~jnp.all(s.out.done), functools.partial(step, prompts, prompt_lengths),
                                   init)
            return s, s.outputs()

        def start_one(prompt, length, limit, key, index):
            p = prefill_prompts(params, cfg, prompt, length, init.cache.max_len, mesh)
            return start(cfg, p, limit, key, sampling, max_new_tokens, stream, mesh, init.cache.pending_slots.shape[1],
                         first_prompt=index)

        s, queue = continuous.run(step, init, prompts, prompt_lengths, limits, start_one)
        return s, queue.outputs


def _outputs(s, out: Emitted, accepted: jax.Array | None, prompts: jax.Array, prompt_lengths: jax.Array,
             mesh: Mesh | None, keep_cache: bool) -> tuple[GenerateOutput, kv.KVCache | None]:
    """A decode loop's results, replicated on a mesh, with keep_cache its final cache (as it lies), and
    otherwise that cache beside them: returned all the same, so that XLA writes it over the donated
    prefill cache instead of holding a second cache while the loop runs."""
    o = sharding.gathered(GenerateOutput(out.tokens, out.lengths, s.step, accepted), mesh)
    if not keep_cache:
        return o, s.cache
    c = held(s.cache, prompts, prompt_lengths, out)
    tokens, lengths = sharding.gathered((c.tokens, c.lengths), mesh)
    return o.replace(cache=c.replace(tokens=tokens, lengths=lengths)), None


def _autoregressive(cache, first, params, loop_params, prompts, prompt_lengths, limits, key, *, cfg: ModelConfig,
                    sampling: Sampling, max_new_tokens: int, stream: StreamTo | None,
                    mesh: Mesh | None = None, batch_size: int | None = None,
                    keep_cache: bool = False) -> tuple[GenerateOutput, kv.KVCache | None]:
    """cache, first: the prefill of the first rows' prompts (`Prefilled`: its cache, donated, and the
    hidden states and logits of the prompts' last tokens). loop_params: the target params the decode loop
    runs on (`decoding_params`); continuous batching's prefills run on params. batch_size: decode that
    many prompts at a time (continuous batching), default all. keep_cache: return the final cache
    (`PromptCache`). Returns the output and the spent cache (`_outputs`)."""
    b = batch_size or prompts.shape[0]
    p = start(cfg, Prefilled(cache, *first), limits[:b], key, sampling, max_new_tokens, stream, mesh)
    step = functools.partial(autoregressive_step, loop_params, cfg=cfg, sampling=sampling, stream=stream, mesh=mesh)
    s, out = _run(lambda _, __, s: step(s), ARState(p.cache, p.out, p.first, p.key, jnp.int32(0)), params, prompts,
                  prompt_lengths, limits, cfg=cfg, sampling=sampling, max_new_tokens=max_new_tokens, stream=stream,
                  mesh=mesh)
    return _outputs(s, out, None, prompts, prompt_lengths, mesh, keep_cache)


@struct.dataclass
class SpecState:
    cache: kv.KVCache
    out: Emitted
    init_token: jax.Array  # [B] the target's latest token (root of the next tree), not yet in the cache
    context: jax.Array  # [B, H] the target's hidden state that produced init_token
    key: jax.Array
    step: jax.Array  # [] int32
    accepted: jax.Array  # [B, max_new_tokens] accepted drafted tokens per step of the row's own, -1 after
    row_steps: jax.Array  # [B] int32 steps the row has decoded

    def seated(self, row: jax.Array, p: Started) -> "SpecState":  # `continuous.RowState`
        return self.replace(init_token=self.init_token.at[row].set(p.first[0]),
                            context=self.context.at[row].set(p.hidden[0]),
                            accepted=self.accepted.at[row].set(-1), row_steps=self.row_steps.at[row].set(0))

    def outputs(self) -> tuple[Emitted, jax.Array]:
        return self.out, self.accepted


def _take_rows(x: jax.Array, idx: jax.Array, axis: int) -> jax.Array:
    """x[b, ..., idx[b, j], ...] along `axis` (batch first): gathers per-row indices idx [B, J]."""
    shape = [1] * x.ndim
    shape[0], shape[axis] = idx.shape
    return jnp.take_along_axis(x, idx.reshape(shape), axis=axis)


def propose(params: Params, drafter: Proposer | None, store: Datastore | None, prompts: jax.Array,
            prompt_lengths: jax.Array, s: SpecState, spec: SpecConfig, with_log_probs: bool) -> Draft:
    """The drafter's W beams, the K context-lookup beams and the D datastore beams: [B, W + K + D, spec.depth]."""
    drafts = []
    if spec.beam_width:
        drafts.append(drafter.draft(params, s.context, s.init_token, s.cache.lengths, spec.beam_width,
                                    spec.beam_length, with_log_probs=with_log_probs))
    if spec.lookup_beams or spec.datastore_beams:
        hist = lookup.history(prompts, prompt_lengths, s.out.tokens)
        end = prompt_lengths + s.out.lengths - 1
    if spec.lookup_beams:
        drafts.append(lookup.lookup_draft(hist, end, spec.lookup_beams, spec.lookup_len, spec.lookup_min_ngram,
                                          spec.lookup_max_ngram))
    if spec.datastore_beams:
        drafts.append(datastore.draft(store, hist, end, spec.datastore_beams, spec.datastore_length))
    return lookup.combine(drafts)


def verify(params: Params, cfg: ModelConfig, s: SpecState, tree: Tree) -> ForwardOutput:
    """One target forward of the packed tree [B, N] at positions length + depth, under the tree mask."""
    positions = s.cache.lengths[:, None] + tree.depth
    mask = kv.attention_mask(s.cache, positions, tree.mask)
    return forward(params, cfg, tree.tokens, positions, s.cache, mask)


def _apple_rule(spec: SpecConfig, sampling: Sampling) -> bool:
    return spec.acceptance == "apple_biased" and not sampling.greedy


def accept(key: jax.Array, draft: Draft, tree: Tree, f: ForwardOutput, sampling: Sampling,
           spec: SpecConfig) -> Accepted:
    """The longest drafted prefix the target agrees with (its argmax, or one sample per tree node:
    the exact tree walk), or Apple's biased rule when asked for."""
    if _apple_rule(spec, sampling):
        return apple_accept(key, tree.beams, tree.slot, target_log_probs(f.logits, sampling), draft.log_probs)
    return accept_longest_prefix(tree.beams, tree.slot, select(key, f.logits, sampling))


def commit(s: SpecState, f: ForwardOutput, tree: Tree, acc: Accepted, key: jax.Array, *, cfg: ModelConfig,
           stream: StreamTo | None, mesh: Mesh | None = None) -> SpecState:
    """Moves the K/V of the root and the accepted nodes from the tree's slots to each row's own
    offset (over the scratch slots; the next forward writes them there), emits the tokens, and sets up
    the next step's root."""
    path = _take_rows(tree.slot, acc.beam[:, None], axis=1)[:, 0]  # [B, L] slots of the chosen beam
    k = jnp.moveaxis(_take_rows(jnp.moveaxis(f.k, 0, 1), path, axis=2), 1, 0)
    v = jnp.moveaxis(_take_rows(jnp.moveaxis(f.v, 0, 1), path, axis=2), 1, 0)
    keep = acc.num_accepted + 1
    cache = kv.write(f.cache, k, v, jnp.where(s.out.done, 0, keep))
    out, n = emit(s.out, acc.tokens, keep, cfg.eos_token_ids)
    stream_tokens(stream, out, acc.tokens, n, mesh)
    last = _take_rows(path, acc.num_accepted[:, None], axis=1)[:, 0]  # slot of the bonus token's parent
    active = ~s.out.done
    return SpecState(
        cache, out,
        init_token=jnp.where(active, _take_rows(acc.tokens, acc.num_accepted[:, None], axis=1)[:, 0], s.init_token),
        context=jnp.where(active[:, None], _take_rows(f.hidden, last[:, None], axis=1)[:, 0], s.context),
        key=key, step=s.step + 1,
        accepted=s.accepted.at[jnp.arange(len(active)), jnp.where(active, s.row_steps, s.accepted.shape[1])].set(
            acc.num_accepted, mode="drop"),
        row_steps=s.row_steps + active)


def speculative_step(params: Params, drafter: Proposer | None, store: Datastore | None,
                     prompts: jax.Array, prompt_lengths: jax.Array, s: SpecState, *, cfg: ModelConfig,
                     sampling: Sampling, spec: SpecConfig, stream: StreamTo | None,
                     mesh: Mesh | None = None) -> SpecState:
    """Propose, pack the tree, verify it in one target forward, accept the longest prefix and commit
    it (plus the target's own next token) to each row's cache and output."""
    key, sub = jax.random.split(s.key)
    with jax.named_scope("propose"):
        draft = propose(params, drafter, store, prompts, prompt_lengths, s, spec,
                        with_log_probs=_apple_rule(spec, sampling))
    with jax.named_scope("pack"):
        tree = pack_tree(draft.beams, draft.scores, spec.budget, cfg.pad_token_id, spec.slots)
    with jax.named_scope("verify"):
        f = verify(params, cfg, s, tree)
    with jax.named_scope("accept"):
        acc = accept(sub, draft, tree, f, sampling, spec)
    with jax.named_scope("commit"):
        return commit(s, f, tree, acc, key, cfg=cfg, stream=stream, mesh=mesh)


def _speculative(cache, first, params, loop_params, drafter, store, prompts, prompt_lengths, limits, key, *,
                 cfg: ModelConfig, sampling: Sampling, spec: SpecConfig, max_new_tokens: int,
                 stream: StreamTo | None, mesh: Mesh | None = None, batch_size: int | None = None,
                 keep_cache: bool = False) -> tuple[GenerateOutput, kv.KVCache | None]:
    """As `_autoregressive`, decoding speculatively: the cache has room for a tree's writes (spec.slots)
    and for one step's accepted entries pending (spec.depth)."""
    b = batch_size or prompts.shape[0]
    p = start(cfg, Prefilled(cache, *first), limits[:b], key, sampling, max_new_tokens, stream, mesh,
              pending=spec.depth)
    init = SpecState(p.cache, p.out, p.first, p.hidden, p.key, step=jnp.int32(0),
                     accepted=jnp.full((b, max_new_tokens), -1, jnp.int32), row_steps=jnp.zeros((b,), jnp.int32))
    step = functools.partial(speculative_step, loop_params, drafter, store, cfg=cfg, sampling=sampling, spec=spec,
                             stream=stream, mesh=mesh)
    s, (out, accepted) = _run(step, init, params, prompts, prompt_lengths, limits, cfg=cfg, sampling=sampling,
                              max_new_tokens=max_new_tokens, stream=stream, mesh=mesh)
    return _outputs(s, out, accepted, prompts, prompt_lengths, mesh, keep_cache)


def _check_types(**named) -> None:
    for name, (value, kind) in named.items():
        if value is not None and not isinstance(value, kind):
            raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")


def _is_prng_key(key) -> bool:
    if not isinstance(key, jax.Array):
        return False
    return jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) or (key.dtype == jnp.uint32 and key.shape == (2,))


def matmul_precision(cfg: ModelConfig):
    """The matrix-product precision decoding runs at: full float32 for float32 parameters (GPUs would
    otherwise use TF32, and a one-token step and an N-token verification would round differently,
    flipping near-ties between greedy outputs), the backend's default for lower-precision ones."""
    return jax.default_matmul_precision("highest" if jnp.dtype(cfg.dtype) == jnp.float32 else "default")


def _call(fn, cfg: ModelConfig, *args, **kwargs):
    """fn (a jitted decode loop, or its `.lower`) traced at the model's matrix-product precision."""
    with matmul_precision(cfg):
        return fn(*args, cfg=cfg, **kwargs)


# The prefill is a program of its own: the autoregressive loop and every speculative setting on the same
# prompt block and cache share it (it was half of each loop's compilation), and it has no host callback,
# so a persistent compilation cache (JAX_COMPILATION_CACHE_DIR) can keep it. Its cache is donated to the
# loop, which updates it in place.
_prefill_jit = jax.jit(prefill_prompts, static_argnames=("cfg", "max_len", "mesh"))
# `stream` is a traced argument (a `StreamTo` or None): a new callback does not compile the loop again.
# `sampling` is traced too (a `Sampling`): a new temperature, top-p or min-p does not compile the loop again.
_autoregressive_jit = jax.jit(_autoregressive, static_argnames=("cfg", "max_new_tokens", "mesh", "batch_size",
                                                                "keep_cache"), donate_argnums=0)
_speculative_jit = jax.jit(_speculative, static_argnames=("cfg", "spec", "max_new_tokens", "mesh", "batch_size",
                                                          "keep_cache"), donate_argnums=0)
_DECODE_LOOPS = (_prefill_jit, _autoregressive_jit, _speculative_jit)  # (what `_bound_compiled_loops` drops)


def _compiled_loops() -> int:
    return sum(loop._cache_size() for loop in _DECODE_LOOPS)


def _map_limit() -> int | None:
    """The kernel's limit on a process's memory maps (Linux's vm.max_map_count; None elsewhere)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _bound_compiled_loops(compiled_before: int) -> None:
    """Drops the compiled decode loops and prefills once a compilation has taken the process past half its
    limit of memory maps. XLA:CPU keeps each program's machine code in maps of its own (the default
    model's prefill and autoregressive loop: ~590 together, a speculative loop ~475) and aborts the
    process inside a compilation at the limit (65,530 by default): a long-lived process that met many
    shapes (prompt-length buckets, settings) would get there. Programs used again compile again."""
    limit = _map_limit()
    if limit is None or _compiled_loops() <= compiled_before:
        return
    with open("/proc/self/maps", "rb") as f:
        if f.read().count(b"\n") > limit // 2:
            for loop in _DECODE_LOOPS:
                loop.clear_cache()


class DecodingParams(NamedTuple):
    """What the decode loops run on (`decoding_params`)."""

    prefill: Params  # the prompt's forward
    loop: Params  # the decode loop's steps
    config: ModelConfig  # its dtype is the activations' and the cache's


# id(first leaf) -> (weak references to all the plain params' leaves, {how: what was made of them})
_DECODING: dict[int, tuple[list, dict]] = {}


def _kept(params, how: tuple, make):
    """make(), made once per params and `how` (what it depends on besides them: dtype, layout) and kept
    as long as params' leaves live (packing the default model's 537 MB, mostly page faults on the
    fresh copy, cost ~0.5 s per generate() call)."""
    leaves = jax.tree_util.tree_leaves(params)
    kept = _DECODING.get(id(leaves[0]))
    if kept is None or len(kept[0]) != len(leaves) or any(r() is not x for r, x in zip(kept[0], leaves)):
        if kept is None:  # else this first leaf already has its finalizer (other params that share it)
            weakref.finalize(leaves[0], _DECODING.pop, id(leaves[0]), None)
        kept = _DECODING[id(leaves[0])] = ([weakref.ref(x) for x in leaves], {})
    if how not in kept[1]:
        kept[1][how] = make()
    return kept[1][how]


def decoding_params(params: Params, cfg: ModelConfig, mesh: Mesh | None = None) -> DecodingParams:
    """The target params as the decode loops use them. Where `rows_matmul.enabled`, the loop's matrices
    are tile-packed for the CPU rows kernel in the parameters' dtype, and everything else (embedding,
    norms, biases, activations, cache) is float32, as the CPU kernels compute: bfloat16 weights stream
    half the bytes (their products round the activations to bfloat16; as k-pairs where
    `rows_matmul.bf16_unit()`), and a row's logits do not depend on the tree around it in either dtype. A
    float32 prefill keeps XLA's products on params (faster for long prompts), but for a mixture's
    experts, which XLA:CPU computes densely: it takes the loop's packed ones; a bfloat16 prefill runs on
    the loop's params. Elsewhere params and cfg are used unchanged. The loop's params are made once per
    params, dtype and layout (`_kept`); the config is cfg's (calls on the same params may differ in it,
    e.g. in their EOS ids)."""
    if not rows_matmul.enabled(params, cfg.dtype, mesh):
        return DecodingParams(params, params, cfg)
    pairs = rows_matmul.pairs_layout(cfg.dtype)
    kinds, dtype = cfg.layer_kinds, jnp.dtype(cfg.dtype).name  # (the loop's layer stacks follow the kinds)
    loop = _kept(params, (dtype, pairs, kinds), lambda: _loop_params(params, kinds, dtype, pairs))
    if dtype != "float32":
        prefill = loop
    elif cfg.num_experts:  # (the loop keeps a mixture's layers one by one)
        packed = dict(layer_items(loop["layers"]))
        prefill = {**params, "layers": [{**p, **{k: packed[i][k] for k in EXPERTS if k in p}}
                                        for i, p in enumerate(params["layers"])]}
    else:
        prefill = params
    return DecodingParams(prefill, loop, dataclasses.replace(cfg, dtype="float32"))


def decoding_drafter(drafter: Proposer | None, mesh: Mesh | None = None, dtype="float32") -> Proposer | None:
    """A float32 `Drafter` as the decode loops run it: where `rows_matmul.enabled`, its matrices
    tile-packed for the CPU rows kernel (XLA ran its W-row beam steps through a general matrix multiply
    at half the memory speed, and the target evicts its weights from the caches every step), in float32,
    or with bfloat16 target weights (`dtype`, the target's) in bfloat16 as the target's are (half the
    bytes; as k-pairs where `rows_matmul.bf16_unit()`). In float32 it drafts the same beams. Other
    proposers, and elsewhere, unchanged. The packed matrices are made once per drafter params and dtype
    (`_kept`); the drafter around them is this one (its class and config, which drafters sharing params
    may not share)."""
    if not isinstance(drafter, Drafter) or jnp.dtype(drafter.config.dtype) != jnp.float32 or \
            not rows_matmul.enabled(drafter.params, drafter.config.dtype, mesh):
        return drafter
    dtype = "bfloat16" if jnp.dtype(dtype) == jnp.bfloat16 else "float32"
    pairs = rows_matmul.pairs_layout(dtype)
    return drafter.replace(params=_kept(drafter.params, (dtype, pairs),
                                        lambda: _packed_matrices(drafter.params, dtype, pairs)))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _packed_matrices(dparams: Params, dtype: str, pairs: bool) -> Params:
    return jax.tree_util.tree_map(lambda w: rows_matmul.pack(w.astype(dtype), pairs=pairs) if w.ndim == 2 else w,
                                  dparams)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _loop_params(params: Params, kinds: tuple, dtype: str, pairs: bool) -> Params:
    """The matrices (the layers', their experts' and the LM head) tile-packed as `dtype` (with `pairs`, as
    k-pairs), everything else float32 (but MXFP4 experts' codes and scales, bytes); layers stacked by
    `pack_params`."""
    def widen(d: dict, keep: tuple[str, ...]) -> dict:
        return {k: v if k in keep else cast_params(v, jnp.float32) for k, v in d.items()}

    layers = [widen(p, MATRICES + EXPERTS) for p in params["layers"]]
    widened = {**widen(params, ("layers", "lm_head")), "layers": layers}
    return pack_params(widened, kinds, dtype, pairs)


def _place_on_mesh(mesh: Mesh, cfg: ModelConfig, params: Params, drafter: Proposer | None,
                   store: Datastore | None, block: jax.Array, lengths: jax.Array, limits: jax.Array,
                   resume: Resume | None):
    """Puts the target tensor-parallel, the drafter and the datastore replicated and the rows split over
    the mesh's data axis, after padding the batch with one-token rows (limit 1) to a multiple of that axis
    (rows that reuse nothing of an earlier call's cache)."""
    b, rows = block.shape[0], round_up(block.shape[0], sharding.axis_size(mesh, sharding.DATA))
    batch = jax.sharding.NamedSharding(mesh, sharding.BATCH)

    def padded(x, fill):
        return jax.device_put(np.concatenate([np.asarray(x), np.full((rows - b, *x.shape[1:]), fill, x.dtype)]), batch)

    block, lengths, limits = padded(block, cfg.pad_token_id), padded(lengths, 1), padded(limits, 1)
    if resume is not None:
        resume = resume.replace(reused=padded(resume.reused, 0), suffix=padded(resume.suffix, cfg.pad_token_id),
                                suffix_lengths=padded(resume.suffix_lengths, 1))
    replicated = lambda x: None if x is None else sharding.replicate(x, mesh)  # noqa: E731
    return (sharding.shard_params(params, cfg, mesh), replicated(drafter), replicated(store), block, lengths, limits,
            resume)


def generate(params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int | Sequence[int], sampling: SamplingConfig = SamplingConfig(),
             key: jax.Array | None = None, drafter: Proposer | None = None, spec: SpecConfig | None = None,
             datastore: Datastore | None = None, stream: StreamFn | None = None, prompt_bucket: int = 32,
             mesh: Mesh | None = None, batch_size: int | None = None, cache: PromptCache | None = None,
             keep_cache: bool = False, max_len: int | None = None) -> GenerateOutput:
    """Generates up to max_new_tokens (an int, or one per prompt) after each prompt.

    Rows end at their first EOS (cfg.eos_token_ids, included in the output) or their limit. With a
    `drafter` (a `Drafter`, or another `Proposer`) or a `spec`, decoding is speculative
    with the beam/tree shape `spec` (default `SpecConfig.default` for the rows each device decodes: the
    tree measured best on a CPU, smaller the larger the batch); `spec.beam_width == 0` with lookup beams
    needs no drafter; `spec.datastore_beams` need a `datastore` (`datastore.load`). Greedy output is
    then identical to autoregressive greedy output, and sampled output follows exactly the
    autoregressive sampling distribution. `key` is required when sampling. `stream`, if given,
    receives each step's tokens on the host as stream(tokens [B, M], counts [B]) (row b's new tokens
    are tokens[b, :counts[b]]), with a `batch_size` as stream(tokens, counts, prompts) (the prompt each
    row decodes, its index in `prompts`; the rows of a step, or the one row a waiting prompt was just
    prefilled into, with its first token), and generate returns once decoding has finished; any
    callback shares the compiled program. An exception stream raises ends its calls and is raised by
    generate, once decoding has finished. Prompts are padded to a multiple of `prompt_bucket` tokens, and
    the KV cache's slots (prompt block, max_new_tokens and a step's writes) to a multiple of 64: calls whose
    prompt lengths and max_new_tokens land in the same prompt block and cache share one compiled program, at
    any temperature, top-p and min-p (`Sampling`: top-k's k and which filters apply are part of it).

    `mesh` (`sharding.make_mesh`): the target runs tensor-parallel over its "model" axis and the rows
    are split over its "data" axis (the batch padded to a multiple of it); outputs are as on one device.

    `batch_size` (fewer than the prompts): continuous batching. Only that many prompts are decoded at a
    time, and when one ends the next waiting prompt takes its row inside the decode loop (`continuous`);
    outputs are as without it. Not with a mesh's "data" axis.

    `keep_cache=True`: the output's `cache` (a `PromptCache`) holds the KV cache decoding ended with and
    the tokens in it; given as `cache` to a later call whose prompt b continues row b's text (a chat's
    next turn: the conversation so far, the reply included, and the new message), only what follows each
    row's longest common prefix with those tokens is prefilled. (The reused entries were computed by
    the decode steps, not a prefill: outputs equal a full prefill's up to rounding.) Neither with
    continuous batching.

    `max_len`: the KV cache's slots per row, rounded up to a multiple of 64 (default: what the prompt
    block, max_new_tokens and a step's writes need). The prompt block is then padded to what fits, so
    every call with the same max_len and max_new_tokens has the same shapes: a chat that continues its
    cache turn after turn compiles its decode loop once, and its prefill for its first two turns only (a
    new program per prompt-length bucket and cache length otherwise). The prefill is a program of its
    own, shared by every decode loop on the same prompt block and cache length.
    """
    loop, (b, n) = _decode_loop(params, cfg, prompts, max_new_tokens=max_new_tokens, sampling=sampling, key=key,
                                drafter=drafter, spec=spec, datastore=datastore, prompt_bucket=prompt_bucket,
                                mesh=mesh, batch_size=batch_size, cache=cache, keep_cache=keep_cache, max_len=max_len)
    compiled = _compiled_loops()
    with streaming_to(stream, prompts=batch_size is not None, rows=b) as to:
        out, _ = loop(stream=to)
        if to is not None:
            jax.block_until_ready(out)
    _bound_compiled_loops(compiled)
    return _asked(out, b, n)


def lower(params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], **kwargs) -> jax.stages.Lowered:
    """The decode loop `generate` runs on these arguments (its keywords, but `stream`), lowered, not run
    (nor its prefill, a program of its own; on a mesh, the prefill's layouts are left to the compiler):
    e.g. `.compile().as_text()`, the optimised program whose ops a profile names (infer/profile.py)."""
    loop, _ = _decode_loop(params, cfg, prompts, **kwargs)
    return loop(stream=None, lowered=True)


def _decode_loop(params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *,
                 max_new_tokens: int | Sequence[int], sampling: SamplingConfig = SamplingConfig(),
                 key: jax.Array | None = None, drafter: Proposer | None = None, spec: SpecConfig | None = None,
                 datastore: Datastore | None = None, prompt_bucket: int = 32, mesh: Mesh | None = None,
                 batch_size: int | None = None, cache: PromptCache | None = None, keep_cache: bool = False,
                 max_len: int | None = None):
    """generate()'s arguments checked and prepared: (loop(stream, lowered=False), which runs the prefill
    and the jitted decode loop on it, or lowers the loop, and the rows and tokens asked for)."""
    _check_types(cfg=(cfg, ModelConfig), sampling=(sampling, SamplingConfig), spec=(spec, SpecConfig),
                 datastore=(datastore, Datastore))
    store = datastore  # (the argument shadows the module of that name here)
    block, lengths, limits = prepare_prompts(cfg, prompts, max_new_tokens, prompt_bucket)
    n = int(limits.max())
    if batch_size is not None and not is_count(batch_size):
        raise ValueError(f"batch_size must be a positive integer (the rows decoded at a time), got {batch_size!r}")
    if batch_size is not None and batch_size >= block.shape[0]:
        batch_size = None  # every prompt has a row from the start
    if batch_size is not None and sharding.axis_size(mesh, sharding.DATA) > 1:
        raise ValueError("continuous batching (batch_size below the number of prompts) runs the rows on one "
                         "device or a mesh with a data axis of 1")
    if not isinstance(keep_cache, bool):
        raise TypeError(f"keep_cache must be True or False, got {keep_cache!r}")
    if batch_size is not None and (keep_cache or cache is not None):
        raise ValueError("a prompt cache (cache=, keep_cache=True) holds one prompt per row: not with continuous "
                         "batching (batch_size below the number of prompts)")
    resume = None if cache is None else continuing(cfg, cache, prompts, prompt_bucket)
    if key is not None and not _is_prng_key(key):
        raise TypeError(f"key must be a PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)), got {key!r}")
    if drafter is not None and not isinstance(drafter, Proposer):
        raise TypeError(f"drafter must be a Drafter (e.g. checkpoint.load_drafter(path)) or another Proposer, got "
                        f"{type(drafter).__name__}")
    if key is None:
        if not sampling.greedy:
            raise ValueError("sampling needs an explicit PRNG key")
        key = jax.random.PRNGKey(0)
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. sharding.make_mesh(data, model)), got {mesh!r}")
    speculative = drafter is not None or spec is not None
    if speculative:
        if spec is None:
            rows = batch_size or len(prompts)
            spec = SpecConfig.default(-(-rows // sharding.axis_size(mesh, sharding.DATA)))  # rows per device
        spec.check_proposers(drafter is not None, store)
        if drafter is not None:
            drafter.check(cfg, spec)
    elif store is not None:
        raise ValueError("a datastore needs a spec with datastore_beams > 0; got a datastore and no spec")
    write = spec.slots if speculative else 1
    if max_len is not None:
        block = _block_for(block, max_len, n, write, cfg.pad_token_id)
    # The loop is compiled for as many tokens as the cache has room for (its slots are rounded up to 64), not
    # for n: the rows stop at their limits, and calls whose limits fit that room share one program.
    slots = cache_len(block.shape[1], n, write)
    room = slots - block.shape[1] - write
    b = block.shape[0]
    if mesh is not None:
        params, drafter, store, block, lengths, limits, resume = _place_on_mesh(mesh, cfg, params, drafter, store,
                                                                                block, lengths, limits, resume)
    drafter = decoding_drafter(drafter, mesh, cfg.dtype)
    params, loop_params, cfg = decoding_params(params, cfg, mesh)

    def loop(stream: StreamTo | None, lowered: bool = False):
        rows = batch_size or block.shape[0]  # the prompts the loop starts with
        prefill = functools.partial(_call, _prefill_jit, cfg, params, prompts=block[:rows],
                                    prompt_lengths=lengths[:rows], max_len=slots, mesh=mesh, resume=resume)
        cache, *first = jax.eval_shape(prefill) if lowered else prefill()
        if speculative:
            fn, args, kw = _speculative_jit, (drafter, store), dict(spec=spec)
        else:
            fn, args, kw = _autoregressive_jit, (), {}
        return _call(fn.lower if lowered else fn, cfg, cache, first, params, loop_params, *args, block, lengths,
                     limits, key, sampling=Sampling.of(sampling), max_new_tokens=room, stream=stream, mesh=mesh,
                     batch_size=batch_size, keep_cache=keep_cache, **kw)
    return loop, (b, n)


def _block_for(block: jax.Array, max_len: int, max_new_tokens: int, write_len: int, pad_id: int) -> jax.Array:
    """The prompt block [B, P] padded to the width whose cache (`decode.cache_len`) has max_len slots,
    rounded up to 64; raises if the prompts do not fit."""
    if not is_count(max_len):
        raise ValueError(f"max_len must be a positive integer (KV cache slots per row), got {max_len!r}")
    width = round_up(max_len, 64) - max_new_tokens - write_len
    if width < block.shape[1]:
        raise ValueError(f"max_len {max_len} is too small: the prompt block of {block.shape[1]} tokens, "
                         f"max_new_tokens {max_new_tokens} and a step's {write_len} writes need "
                         f"{cache_len(block.shape[1], max_new_tokens, write_len)} cache slots")
    return jnp.pad(block, ((0, 0), (0, width - block.shape[1])), constant_values=pad_id)


def _asked(out: GenerateOutput, b: int, n: int) -> GenerateOutput:
    """out's first b rows (dropping the rows that padded the batch for a mesh; its cache's KV keeps them)
    and the n tokens (and steps) asked for, of the loop's room (`_decode_loop`)."""
    if out.tokens.shape == (b, n):
        return out
    cache = None if out.cache is None else out.cache.replace(tokens=out.cache.tokens[:b], lengths=out.cache.lengths[:b])
    return out.replace(tokens=out.tokens[:b, :n], lengths=out.lengths[:b],
                       accepted=None if out.accepted is None else out.accepted[:b, :n], cache=cache)
