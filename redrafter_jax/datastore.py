"""Datastore beams: drafts retrieved from a corpus of the target's own replies (as in REST, He et al. 2023).

The context-lookup beams (`lookup.py`) copy from the row's own history, the recurrent drafter predicts
from the target's hidden state; neither knows the phrases the target writes in every reply ("Here are
some ...", "I hope this helps!", the list formats it likes). A datastore does: for every n-gram
(`min_ngram`..`max_ngram` tokens) that precedes a reply token in a corpus of the target's own replies
(the distillation data, `train.distill`), the continuation that most often followed it. Each step, the
history's last n tokens are looked up for each n; the longest matches propose the beams.

Static shapes: the n-grams are hashed to uint32 keys kept sorted, so a lookup is a binary search
(`jnp.searchsorted`) per row and n inside the decode loop. A hash collision can only propose a wrong
draft, which verification rejects: the output does not depend on the datastore. Beam scores are the
log-probabilities that each continuation token is right given the earlier ones were, per match
length, measured on held-out replies when the datastore is built, so the tree packing weighs the
datastore's nodes against the other proposers' node by node.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from tqdm import tqdm

from redrafter_jax.beam_search import Draft
from redrafter_jax.files import UNREADABLE_NPZ
from redrafter_jax.lookup import first_distinct
from redrafter_jax.tree import ABSENT

_MULT = 1000003  # the polynomial hash's multiplier (odd: invertible modulo 2**32)
FORMAT = 1  # version of the saved file


@struct.dataclass
class Datastore:
    keys: jax.Array  # [N] uint32, ascending: `ngram_hash` of each stored n-gram
    continuations: jax.Array  # [N, C] int32: the C tokens that most often followed it (ABSENT past a reply's end)
    acceptance: jax.Array  # [max_ngram - min_ngram + 1, C] float32: P(token d right | tokens before it right)
    min_ngram: int = struct.field(pytree_node=False)
    max_ngram: int = struct.field(pytree_node=False)

    @property
    def length(self) -> int:
        """Tokens in a continuation (a beam holds the init token and at most this many)."""
        return self.continuations.shape[1]

    def one_beam(self) -> dict:
        """SpecConfig's fields for one datastore beam of up to 8 tokens, what measured best on MT-Bench."""
        return dict(datastore_beams=1, datastore_length=min(8, self.length + 1))

    def check(self, length: int) -> None:
        """Raises unless beams of `length` tokens (the init token included) fit the continuations."""
        if not 2 <= length <= self.length + 1:
            raise ValueError(f"datastore beams of {length} tokens need 2 <= length <= {self.length + 1} (the init "
                             f"token and at most the datastore's {self.length}-token continuations)")

    def check_vocab(self, vocab_size: int, name: str = "the datastore") -> None:
        """Raises unless its tokens are inside the target's vocabulary (ABSENT marks a reply's end)."""
        conts = self.continuations  # reduced where it lives: a GPU copies back two numbers, not the array
        if conts.size and (int(conts.max()) >= vocab_size or int(conts.min()) < ABSENT):
            raise ValueError(f"{name} holds tokens outside the target's vocabulary of {vocab_size}")


def _mix(h, xp):
    """murmur3's finaliser: spreads the polynomial hash's bits (uint32 in, uint32 out; numpy or jnp)."""
    h = h ^ (h >> 16)
    h = h * xp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * xp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def ngram_hash(grams, xp=jnp):
    """uint32 hash [...] of n-grams [..., n] (int tokens >= 0); n is part of the hash."""
    with np.errstate(over="ignore"):  # uint32 arithmetic wraps around, as intended
        h = xp.full(grams.shape[:-1], grams.shape[-1], xp.uint32)
        for k in range(grams.shape[-1]):
            h = h * xp.uint32(_MULT) + grams[..., k].astype(xp.uint32) + xp.uint32(1)
        return _mix(h, xp)


def _windows(tokens: np.ndarray, ends: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """tokens[ends[i] + offsets[j]] [len(ends), len(offsets)], ABSENT outside the array."""
    idx = ends[:, None] + offsets[None, :]
    inside = (idx >= 0) & (idx < len(tokens))
    return np.where(inside, tokens[np.clip(idx, 0, len(tokens) - 1)], ABSENT)


def _positions(sequences: Sequence[tuple[np.ndarray, np.ndarray]], n: int, length: int):
    """Every n-gram followed by a reply token, and the reply tokens after it (up to `length`, ABSENT past
    the reply's end): (grams [M, n], continuations [M, length]) over sequences of (tokens [T], mask [T],
    1 on reply tokens)."""
    grams, conts = [], [np.zeros((0, length), np.int32)]
    for tokens, mask in sequences:
        tokens, mask = np.asarray(tokens), np.asarray(mask).astype(bool)
        ends = np.flatnonzero(mask[1:])
        ends = ends[ends >= n - 1]
        grams.append(_windows(tokens, ends, np.arange(1 - n, 1)))
        following = _windows(np.where(mask, tokens, ABSENT), ends, np.arange(1, length + 1))
        conts.append(np.where(np.cumprod(following != ABSENT, axis=1), following, ABSENT))
    return np.concatenate([np.zeros((0, n), np.int32), *grams]), np.concatenate(conts)


def _most_frequent(keys: np.ndarray, conts: np.ndarray, min_count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct key, the continuation that followed it most often (ties: the smallest hash), where that
    happened at least min_count times."""
    if not len(keys):
        return keys, conts
    ch = ngram_hash(np.maximum(conts, 0) + (conts < 0) * np.int64(2 ** 31 - 1), np)  # ABSENT hashes apart
    order = np.lexsort((ch, keys))
    keys, ch, conts = keys[order], ch[order], conts[order]
    run = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]) | (ch[1:] != ch[:-1])])
    count = np.diff(np.r_[run, len(keys)])
    best = np.lexsort((-count, keys[run]))  # per key, its most frequent run first
    first = np.r_[True, keys[run][best][1:] != keys[run][best][:-1]]
    pick = run[best[first]][count[best[first]] >= min_count]
    return keys[pick], conts[pick]


def _acceptance(keys: np.ndarray, table: np.ndarray, grams: np.ndarray, conts: np.ndarray) -> np.ndarray:
    """[C]: P(continuation token d is right | tokens before it were) over held-out n-grams found in
    (keys, table); 0.5 where nothing was measured."""
    if not len(keys):
        return np.full(table.shape[1], 0.5)
    h = ngram_hash(grams, np)
    i = np.clip(np.searchsorted(keys, h), 0, len(keys) - 1)
    found = keys[i] == h
    exists = conts[found] != ABSENT  # the held-out reply goes on
    right = np.cumprod((table[i][found] == conts[found]) & exists, axis=1)  # [M, C]: right up to token d
    tried = (np.concatenate([np.ones((len(right), 1), bool), right[:, :-1]], axis=1) & exists).sum(0)
    return np.where(tried > 0, right.sum(0) / np.maximum(tried, 1), 0.5).clip(1e-3, 1 - 1e-3)


def build(train: Iterable[tuple[np.ndarray, np.ndarray]], held_out: Iterable[tuple[np.ndarray, np.ndarray]], *,
          min_ngram: int = 2, max_ngram: int = 6, length: int = 7, min_count: int = 1,
          progress: bool = False) -> Datastore:
    """A datastore of the replies in `train` (pairs of tokens [T] and mask [T], 1 on the target's reply
    tokens: `train.distill`'s shards), whose beam scores are measured on `held_out` (pairs of the same kind).
    An n-gram is kept if its commonest continuation followed it at least `min_count` times (on the default
    model's 2.1M distilled reply tokens, 2 keeps 29% of them: a 9.7 MB file instead of 32 MB, which drafts
    a little worse)."""
    if not 1 <= min_ngram <= max_ngram:
        raise ValueError(f"datastore n-gram lengths must satisfy 1 <= min_ngram <= max_ngram, got {min_ngram}, "
                         f"{max_ngram}")
    if length < 1 or min_count < 1:
        raise ValueError(f"continuation length and min_count must be >= 1, got {length} and {min_count}")
    train, held_out = list(train), list(held_out)
    keys, conts, acceptance = [], [], []
    for n in tqdm(range(min_ngram, max_ngram + 1), desc="n-gram lengths", disable=not progress):
        grams, following = _positions(train, n, length)
        k, c = _most_frequent(ngram_hash(grams, np), following, min_count)
        acceptance.append(_acceptance(k, c, *_positions(held_out, n, length)))
        keys.append(k)
        conts.append(c)
    keys, conts = np.concatenate(keys), np.concatenate(conts)
    if not len(keys):
        raise ValueError(f"no {min_ngram}..{max_ngram}-token n-gram before a reply token (mask 1) to build a "
                         f"datastore from (min_count {min_count})")
    order = np.argsort(keys, kind="stable")
    return Datastore(jnp.asarray(keys[order]), jnp.asarray(conts[order], jnp.int32),
                     jnp.asarray(np.stack(acceptance), jnp.float32), min_ngram, max_ngram)


def draft(ds: Datastore, hist: jax.Array, end: jax.Array, num_beams: int, length: int) -> Draft:
    """Up to `num_beams` beams of `length` tokens: the stored continuations of the history's last n tokens
    for the longest n in [min_ngram, max_ngram] found, distinct ones only (a shorter match whose
    continuation a longer one already proposes is skipped).

    hist: [B, T] token history; end: [B] index of its newest token (the init token, beams[:, :, 0]).
    Beam k is scored by its match length's acceptance, -inf past the init token where fewer than
    k + 1 distinct matches exist.
    """
    ns = np.arange(ds.max_ngram, ds.min_ngram - 1, -1)  # longest first
    last = jnp.take_along_axis(hist, jnp.maximum(end[:, None] - np.arange(ds.max_ngram - 1, -1, -1), 0), axis=1)
    found, cont = [], []
    for n in ns:
        h = ngram_hash(last[:, ds.max_ngram - n:])  # [B]
        i = jnp.clip(jnp.searchsorted(ds.keys, h), 0, ds.keys.shape[0] - 1)
        found.append((ds.keys[i] == h) & (end >= n - 1))
        cont.append(ds.continuations[i, : length - 1])
    log_acc = jnp.log(ds.acceptance[::-1, : length - 1])  # rows in `ns` order
    scores = jnp.concatenate([jnp.zeros((len(ns), 1)), jnp.cumsum(log_acc, axis=-1)], axis=-1)  # [G, length]
    return first_distinct(hist, end, jnp.stack(cont, 1), jnp.stack(found, 1),
                          jnp.broadcast_to(scores, (hist.shape[0],) + scores.shape), num_beams)


def save(ds: Datastore, path: str | os.PathLike) -> None:
    """Writes ds to one .npz file, atomically."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, format=FORMAT, keys=np.asarray(ds.keys), continuations=np.asarray(ds.continuations),
                                acceptance=np.asarray(ds.acceptance), ngram=np.array([ds.min_ngram, ds.max_ngram]))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path: str | os.PathLike, vocab_size: int | None = None) -> Datastore:
    """Reads a datastore `save` wrote; with vocab_size, checks its tokens are the target's."""
    try:
        with np.load(path) as z:
            if int(z["format"]) != FORMAT:
                raise ValueError(f"format {int(z['format'])}, expected {FORMAT}")
            keys, conts, acceptance, (lo, hi) = z["keys"], z["continuations"], z["acceptance"], z["ngram"]
    except UNREADABLE_NPZ as e:
        raise ValueError(f"{path} is not a readable datastore: {e}") from e
    if keys.dtype != np.uint32 or not len(keys) or conts.ndim != 2 or len(conts) != len(keys) or \
            acceptance.shape != (hi - lo + 1, conts.shape[1]) or np.any(keys[1:] < keys[:-1]):
        raise ValueError(f"{path} is a corrupt datastore (keys {keys.shape} {keys.dtype}, continuations "
                         f"{conts.shape}, acceptance {acceptance.shape}, n-grams {lo}..{hi})")
    store = Datastore(jnp.asarray(keys), jnp.asarray(conts), jnp.asarray(acceptance), int(lo), int(hi))
    if vocab_size is not None:
        store.check_vocab(vocab_size, str(path))
    return store
