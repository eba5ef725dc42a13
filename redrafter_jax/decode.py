"""Pieces shared by the autoregressive and speculative decode loops: prompt preparation, prefill (or
the rest of a prompt after an earlier call's cache), the output buffer with per-row EOS and limits, and
streaming."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
from typing import Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from redrafter_jax import cache as kv
from redrafter_jax.config import ModelConfig
from redrafter_jax.model import Params, lm_head, transformer
from redrafter_jax.sampling import Sampling, select
from redrafter_jax.sharding import constrain_cache, gathered

# Emitted tokens of one step: (tokens [B, M], counts [B]) -> None, called on the host; with
# `prompts`, (tokens [R, M], counts [R], prompts [R]): also the prompt each row decodes (R: a step's
# B rows, or 1 for a prompt just prefilled into a row, with continuous batching).
StreamFn = Callable[..., None]


@struct.dataclass
class StreamTo:
    """Where a decode loop streams its tokens: the host callback registered under `id` ([] int32, a
    traced argument), so one compiled loop serves every callback. With the callback as a static
    argument, each new one (a new Streamer, a lambda in a notebook cell) compiled the loop again."""

    id: jax.Array
    prompts: bool = struct.field(pytree_node=False, default=False)  # the callback takes each row's prompt too


@dataclasses.dataclass
class _Receiver:
    fn: StreamFn
    rows: int | None  # the rows it gets
    error: Exception | None = None  # what fn raised: it is not called again, and generate raises it


_RECEIVERS: dict[int, _Receiver] = {}  # by StreamTo.id
_IDS = itertools.count()


@contextlib.contextmanager
def streaming_to(fn: StreamFn | None, prompts: bool = False, rows: int | None = None) -> Iterator[StreamTo | None]:
    """A `StreamTo` (None without fn) whose tokens go to fn, with each row's prompt where `prompts`,
    until the context ends; it ends only once every callback of the loops run inside it has run. fn gets
    at most the first `rows` rows (not those that pad a batch for a mesh). A callback that cannot take
    its arguments is refused here, not in the middle of decoding; an exception a callback raises is raised
    here, as it was, once decoding has finished (the loop cannot stop early; it streams nothing more)."""
    if fn is None:
        yield None
        return
    args = ("tokens", "counts", "prompts")[:3 if prompts else 2]
    names = f"({', '.join(args)})"
    if not callable(fn):
        raise TypeError(f"stream must be a callable {names}, got {type(fn).__name__}")
    try:
        inspect.signature(fn).bind(*args)
    except TypeError:
        raise ValueError(f"stream is called as stream{names}" + (" when generate is given a batch_size"
                         if prompts else " (with a batch_size, also each row's prompt)") +
                         f"; {getattr(fn, '__name__', fn)!r} does not take those arguments") from None
    except ValueError:  # no signature to check (some builtins)
        pass
    i = next(_IDS) % 2**31
    _RECEIVERS[i] = receiver = _Receiver(fn, rows)
    try:
        yield StreamTo(jnp.int32(i), prompts)
    finally:
        jax.effects_barrier()
        del _RECEIVERS[i]
    if receiver.error is not None:
        raise receiver.error


def _deliver(i: jax.Array, *arrays: jax.Array) -> None:
    # As numpy arrays: JAX hands callbacks jax.Arrays, and each slice or element a callback takes of
    # one is a dispatch (a compilation for each new slice length), run while the loop waits.
    r = _RECEIVERS[int(i)]
    if r.error is None:
        try:
            r.fn(*(np.asarray(x)[:r.rows] for x in arrays))
        except Exception as e:  # raised into XLA it would become an opaque runtime error, the caller's lost
            r.error = e


@struct.dataclass
class GenerateOutput:
    tokens: jax.Array  # [B, max_new_tokens] int32, pad_token_id after each row's end
    lengths: jax.Array  # [B] int32 number of generated tokens (an ending EOS included)
    num_steps: jax.Array  # [] int32 decode loop iterations (target forward passes after the prefill)
    # Speculative only: [B, max_new_tokens] drafted tokens accepted per row per step (-1: row was done)
    accepted: jax.Array | None = None
    cache: PromptCache | None = None  # with generate(..., keep_cache=True)


@struct.dataclass
class PromptCache:
    """The KV cache a `generate` call ended with and the tokens it holds, for a later call whose prompts
    continue these rows' text (a chat's next turn, `generate(..., cache=...)`): each row's longest common
    prefix with its new prompt is taken from it instead of being prefilled again."""

    kv: kv.KVCache  # nothing pending; after its B rows, any that padded the batch for a mesh
    tokens: jax.Array  # [B, T] int32 each row's prompt, then its output
    lengths: jax.Array  # [B] int32 how many of them the cache holds (the last output token is not in it)

    def take(self, rows: Sequence[int]) -> "PromptCache":
        """The cache of these rows only, in this order (to continue some rows of a batch)."""
        rows = np.asarray(rows, np.int32)
        if rows.ndim != 1 or rows.size == 0 or rows.min() < 0 or rows.max() >= self.tokens.shape[0]:
            raise ValueError(f"rows must be a non-empty list of row indices below {self.tokens.shape[0]}, got {rows}")
        pick = lambda x, axis: jnp.take(x, rows, axis=axis)  # noqa: E731
        c = self.kv
        return PromptCache(kv.KVCache(pick(c.k, 1), pick(c.v, 1), pick(c.lengths, 0), pick(c.pending_k, 1),
                                      pick(c.pending_v, 1), pick(c.pending_slots, 0)),
                           pick(self.tokens, 0), pick(self.lengths, 0))

    def reused(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """[B] how many tokens of each prompt a call given this cache takes from it: the longest common
        prefix with the tokens it holds, but never the prompt's last token (whose logits choose the first
        new token)."""
        tokens, lengths = np.asarray(self.tokens), np.asarray(self.lengths)
        reused = []
        for r, t, n in zip(map(np.asarray, prompts), tokens, lengths):
            m = min(r.size - 1, int(n))
            differ = np.flatnonzero(r[:m] != t[:m])
            reused.append(int(differ[0]) if differ.size else m)
        return np.asarray(reused, np.int32)


def held(cache: kv.KVCache, prompts: jax.Array, prompt_lengths: jax.Array, out: Emitted) -> PromptCache:
    """A finished decode loop's cache as a `PromptCache`: the cache holds each row's prompt [B, P], then
    its output tokens in order, up to cache.lengths (a speculative step may have cached accepted tokens
    after an EOS, which the output does not have: those entries are not counted)."""
    n = out.tokens.shape[1]
    j = jnp.arange(prompts.shape[1] + n)[None, :]
    after = jnp.take_along_axis(out.tokens, jnp.clip(j - prompt_lengths[:, None], 0, n - 1), axis=1)
    tokens = jnp.where(j < prompt_lengths[:, None], jnp.pad(prompts, ((0, 0), (0, n))), after)
    return PromptCache(kv.flush(cache), tokens, jnp.minimum(cache.lengths, prompt_lengths + out.lengths))


@struct.dataclass
class Resume:
    """A prefill that continues a `PromptCache`: row b keeps its first reused[b] entries and prefills the
    rest of its prompt, suffix[b, :suffix_lengths[b]], at positions reused[b] onwards."""

    kv: kv.KVCache
    reused: jax.Array  # [B] int32
    suffix: jax.Array  # [B, S] int32, right-padded
    suffix_lengths: jax.Array  # [B] int32, each >= 1


def suffix_width(n: int, bucket: int) -> int:
    """The block for the rest of prompts continuing a cache, n tokens at most: `bucket` times a power of two."""
    return bucket * 2 ** (-(-int(n) // bucket) - 1).bit_length()


def continuing(cfg: ModelConfig, cache: PromptCache, prompts: Sequence[Sequence[int]], bucket: int) -> Resume:
    """How `prompts` (validated: `prepare_prompts`) continue `cache` (`PromptCache.reused`); the rest of
    each is padded to `suffix_width` (few shapes, whatever the lengths of a chat's messages)."""
    if not isinstance(cache, PromptCache):
        raise TypeError(f"cache must be the PromptCache of an earlier generate(..., keep_cache=True), got "
                        f"{type(cache).__name__}")
    if len(prompts) != cache.tokens.shape[0]:
        raise ValueError(f"cache holds {cache.tokens.shape[0]} rows but {len(prompts)} prompts were given: row b "
                         f"of the cache serves prompt b")
    shape = cache.kv.k.shape
    want, have = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim), (shape[0], shape[2], shape[4])
    if have != want:
        raise ValueError(f"cache was made by another model: (layers, KV heads, head dim) {have}, this model's {want}")
    reused = cache.reused(prompts)
    rests = [np.asarray(p)[u:] for p, u in zip(prompts, reused)]
    suffix, lengths = right_padded(rests, suffix_width(max(r.size for r in rests), bucket), cfg.pad_token_id)
    return Resume(cache.kv, jnp.asarray(reused), suffix, lengths)


def right_padded(rows: Sequence[np.ndarray], width: int, pad_id: int) -> tuple[jax.Array, jax.Array]:
    """Token rows as one block [B, width], padded on the right with pad_id, and their lengths [B]."""
    block = np.full((len(rows), width), pad_id, np.int32)
    for i, r in enumerate(rows):
        block[i, :r.size] = r
    return jnp.asarray(block), jnp.asarray([r.size for r in rows], jnp.int32)


@struct.dataclass
class Emitted:
    """The output side of decode state: the token buffer and which rows are finished."""

    tokens: jax.Array  # [B, N]
    lengths: jax.Array  # [B]
    limits: jax.Array  # [B] per-row max_new_tokens
    done: jax.Array  # [B] bool
    prompt: jax.Array  # [B] int32 the prompt each row decodes (its index among the call's prompts)


def init_emitted(batch: int, max_new_tokens: int, limits: jax.Array, pad_id: int,
                 first_prompt: jax.Array | int = 0) -> Emitted:
    return Emitted(tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
                   lengths=jnp.zeros((batch,), jnp.int32), limits=limits,
                   done=jnp.zeros((batch,), bool), prompt=first_prompt + jnp.arange(batch, dtype=jnp.int32))


def emit(out: Emitted, new: jax.Array, counts: jax.Array, eos_ids: tuple[int, ...]):
    """Appends new[b, :counts[b]] to each unfinished row, cut after the first EOS and at the row's limit.

    new: [B, M] int32; counts: [B]. Returns the updated Emitted and the number appended per row [B].
    """
    m = new.shape[1]
    j = jnp.arange(m)[None, :]
    is_eos = jnp.isin(new, jnp.asarray(eos_ids, jnp.int32)) & (j < counts[:, None])
    first_eos = jnp.min(jnp.where(is_eos, j, m), axis=1)
    n = jnp.minimum(jnp.minimum(counts, first_eos + 1), out.limits - out.lengths)
    n = jnp.where(out.done, 0, n)
    rows = jnp.arange(new.shape[0])[:, None]
    cols = jnp.where(j < n[:, None], out.lengths[:, None] + j, out.tokens.shape[1])  # OOB -> dropped
    tokens = out.tokens.at[rows, cols].set(new, mode="drop")
    lengths = out.lengths + n
    done = out.done | (first_eos < n) | (lengths >= out.limits)
    return out.replace(tokens=tokens, lengths=lengths, done=done), n


def prefill(params: Params, cfg: ModelConfig, cache: kv.KVCache, prompts: jax.Array,
            prompt_lengths: jax.Array):
    """Runs right-padded prompts [B, P] through the model into the cache, after each row's entries (none
    in an empty cache; a prompt's start, when it continues an earlier call's: `Resume`).

    Returns the cache (lengths grown by prompt_lengths), the hidden state [B, H] and logits [B, V] of
    each row's last prompt token.
    """
    p = prompts.shape[1]
    positions = cache.lengths[:, None] + jnp.arange(p, dtype=jnp.int32)[None, :]
    causal = jnp.tril(jnp.ones((p, p), bool))
    mask = kv.attention_mask(cache, positions, causal)
    hidden, cache, _, _ = transformer(params, cfg, prompts, positions, cache, mask)
    cache = kv.commit(cache, prompt_lengths)
    last = jnp.take_along_axis(hidden, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    return cache, last, lm_head(params, last, cfg)


class Prefilled(NamedTuple):
    """A prefill's result (`prefill_prompts`), before the first token is chosen."""

    cache: kv.KVCache  # holding the prompts; no room for pending entries
    hidden: jax.Array  # [B, H] the target's hidden state at each row's last prompt token
    logits: jax.Array  # [B, V] its logits there


def prefill_prompts(params: Params, cfg: ModelConfig, prompts: jax.Array, prompt_lengths: jax.Array, max_len: int,
                    mesh: Mesh | None = None, resume: Resume | None = None) -> Prefilled:
    """Allocates a cache of max_len slots per row (`cache_len`) and prefills the prompts [B, P] into it;
    with `resume`, only the rest of each prompt, after what an earlier call's cache holds of it. On a
    `mesh` the cache is split by row and KV head (`sharding.CACHE`), a layout the decode loop keeps.
    Compiled on its own (`generate`), it serves every decode loop on the same prompt block and cache."""
    cache = kv.init_cache(cfg, prompts.shape[0], max_len)
    if resume is not None:
        cache = kv.reuse(cache, resume.kv, resume.reused)
        prompts, prompt_lengths = resume.suffix, resume.suffix_lengths
    return Prefilled(*prefill(params, cfg, constrain_cache(cache, mesh), prompts, prompt_lengths))


class Started(NamedTuple):
    """Decode state after the prefill, before the first decode step."""

    cache: kv.KVCache  # holding the prompts
    out: Emitted  # holding each row's first token
    first: jax.Array  # [B] the first token, not yet in the cache
    hidden: jax.Array  # [B, H] the target's hidden state that produced it
    key: jax.Array


def start(cfg: ModelConfig, p: Prefilled, limits: jax.Array, key: jax.Array, sampling: Sampling,
          max_new_tokens: int, stream: StreamTo | None, mesh: Mesh | None, pending: int = 0,
          first_prompt: jax.Array | int = 0) -> Started:
    """Emits each row's first token, chosen from its prompt's logits, and gives the prefill's cache room
    for the `pending` entries one decode step's `cache.write` records. first_prompt: the index of the
    first row's prompt among the call's (the rows' `Emitted.prompt`). The cache lives inside the
    compiled loop: as a while-loop carry, XLA updates it in place."""
    b = p.logits.shape[0]
    key, sub = jax.random.split(key)
    first = select(sub, p.logits, sampling)
    out, n = emit(init_emitted(b, max_new_tokens, limits, cfg.pad_token_id, first_prompt), first[:, None],
                  jnp.ones((b,), jnp.int32), cfg.eos_token_ids)
    stream_tokens(stream, out, first[:, None], n, mesh)
    return Started(constrain_cache(kv.with_pending(p.cache, pending), mesh), out, first, p.hidden, key)


def stream_tokens(stream: StreamTo | None, out: Emitted, new: jax.Array, n: jax.Array, mesh: Mesh | None = None):
    """Hands a step's tokens new[b, :n[b]] (just emitted into `out`) to the host, with each row's prompt
    where the callback takes it. JAX orders callbacks on one device only; on a mesh they are
    unordered, which still follows the loop (its iterations run one after another), and get the
    tokens gathered from every row first."""
    if stream is not None:
        arrays = (new, n, out.prompt) if stream.prompts else (new, n)
        jax.debug.callback(_deliver, stream.id, *(gathered(x, mesh) for x in arrays), ordered=mesh is None)


def is_count(x) -> bool:
    """An integer (Python's or numpy's, not a bool) of at least 1."""
    return not isinstance(x, bool) and isinstance(x, (int, np.integer)) and x >= 1


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def cache_len(prompt_block: int, max_new_tokens: int, tokens_per_write: int) -> int:
    """Cache slots for a padded prompt block, max_new_tokens, and `tokens_per_write` slots written per
    step (a write may reach that far past the last valid slot)."""
    return round_up(prompt_block + max_new_tokens + tokens_per_write, 64)


def prepare_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                    bucket: int = 32):
    """Validates prompts and per-row limits; returns right-padded [B, P] prompts, lengths [B], limits [B].

    P is rounded up to `bucket` so that nearby prompt lengths share one compiled program.
    """
    if isinstance(prompts, (str, bytes)) or getattr(prompts, "ndim", 2) < 2 or any(np.ndim(p) == 0 for p in prompts):
        raise ValueError("prompts must be a batch of token-id sequences (a list of lists, or a 2-D array); "
                         "for a single prompt pass [ids]")
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    if not is_count(bucket):
        raise ValueError(f"prompt_bucket must be a positive integer (prompts are padded to a multiple of it), "
                         f"got {bucket!r}")
    limits = np.asarray(max_new_tokens)
    if limits.dtype.kind not in "iu" or limits.ndim > 1:
        raise ValueError(f"max_new_tokens must be an integer or one integer per prompt, got {max_new_tokens!r}")
    if limits.ndim == 1 and limits.size != len(prompts):
        raise ValueError(f"max_new_tokens has {limits.size} values for {len(prompts)} prompts")
    limits = np.broadcast_to(limits.astype(np.int64), (len(prompts),))
    if np.any(limits < 1):
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    rows = [np.asarray(p) for p in prompts]
    for i, (r, lim) in enumerate(zip(rows, limits)):
        if r.ndim != 1:
            raise ValueError(f"prompt {i} must be a 1-D sequence of token ids, got shape {r.shape}")
        if r.size == 0:
            raise ValueError(f"prompt {i} is empty")
        if r.dtype.kind not in "iu":
            raise ValueError(f"prompt {i} has token ids of type {r.dtype}; token ids must be integers")
        if r.min() < 0 or r.max() >= cfg.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {cfg.vocab_size})")
        if r.size + lim > cfg.context_length:
            raise ValueError(f"prompt {i} has {r.size} tokens; with max_new_tokens={lim} that exceeds the "
                             f"model's context length of {cfg.context_length} tokens")
    block, lengths = right_padded(rows, round_up(max(r.size for r in rows), bucket), cfg.pad_token_id)
    return block, lengths, jnp.asarray(limits, jnp.int32)


