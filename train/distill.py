"""Distillation data: the target's own greedy replies to ShareGPT prompts, as resumable shards.

    python -m train.distill --out data/distill --num-prompts 2000 --max-new-tokens 256
    python -m train.distill --out data/mine --conversations my_chats.jsonl   # prompts of your own

The prompts are the conversations' openings (system prompt and first user turn), from ShareGPT or from
--conversations (JSON or JSONL of message lists, ShareGPT's or {"messages": [{"role", "content"}]}, or of
{"prompt": ...}: `datasets.read_chats`). With --turns N, each of a conversation's first N asked user
turns (the first, and each after a reply: `Chat.asked`) is a prompt, in its context: the conversation up
to that turn, its earlier replies as the file has them (for chats logged from the target itself, the
target's own). Later turns make longer prompts: raise --max-prompt-tokens, and train with a --seq-len
that holds a prompt and its reply.

Writes <out>/train/shard_NNNNN.npz and <out>/eval/shard_NNNNN.npz (prompt + reply tokens, loss mask
on the reply) and each split's prompts as messages, <out>/{train,eval}/prompts.jsonl. Shards are written
atomically and skipped when complete, so an interrupted run continues where it stopped; shard s
always holds prompts s * shard_size .. (s + 1) * shard_size - 1, so a shard left short by an earlier,
smaller --num-prompts is redone whole. <out>/distill.json records the settings that fix which prompts
a shard holds and how they were answered; a rerun with other settings is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

from redrafter_jax.cli import add_model_args, at_least, fraction, open_model, parse_args, run
from redrafter_jax.files import write_json
from redrafter_jax.generate import generate
from train import data


def check_settings(out_dir: str, settings: dict) -> None:
    """Records the distillation settings in out_dir/distill.json, or raises if they differ from the
    recorded ones. A folder of shards from before this record gets it if shard 0 fits shard_size."""
    path = os.path.join(out_dir, "distill.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        diff = data.differences(saved, settings)
        if diff:
            raise ValueError(f"{out_dir} was distilled with other settings ({', '.join(diff)}): rerun with the "
                             f"recorded settings or choose another folder")
        return
    shard0 = os.path.join(out_dir, "train", "shard_00000.npz")
    if os.path.exists(os.path.join(out_dir, "train", "shard_00001.npz")):
        rows = shard_rows(shard0)
        if rows != settings["shard_size"]:
            raise ValueError(f"{out_dir} holds shards of {rows} prompts, not --shard-size {settings['shard_size']}")
    os.makedirs(out_dir, exist_ok=True)
    write_json(path, settings)


def shard_rows(path: str) -> int:
    """Sequences in a shard (0 when it does not exist, or cannot be read: then it is redone)."""
    if not os.path.exists(path):
        return 0
    try:
        return len(data.read_shard(path))
    except ValueError as e:
        print(f"redoing it: {e}", file=sys.stderr)
        return 0


def write_distill_shards(model, prompts: list[list[int]], out_dir: str, shard_size: int, batch_size: int,
                         max_new_tokens: int, prompt_block: int = 32, desc: str = "distilling",
                         deadline: float | None = None) -> None:
    """Distils the prompts into out_dir's shards (complete ones are skipped) until done or until a shard,
    taking as long as the last one did, would end past the time.time() `deadline`. Every batch is padded
    to batch_size prompts and its prompts to a multiple of prompt_block tokens: a run compiles one program
    for each padded prompt length its batches reach (one in all where prompt_block holds the longest
    prompt, as `train.pipeline` pads)."""
    os.makedirs(out_dir, exist_ok=True)
    num_shards = -(-len(prompts) // shard_size)
    last = 0.0  # seconds the last shard took (on a GPU a shard of 1024 prompts takes ~20 s)
    for s in tqdm(range(num_shards), desc=desc):  # shown in logs too, as training shows its steps
        path = os.path.join(out_dir, f"shard_{s:05d}.npz")
        chunk = prompts[s * shard_size:(s + 1) * shard_size]
        if shard_rows(path) == len(chunk):
            continue
        if deadline is not None and time.time() + last > deadline:
            break
        start = time.time()
        toks, masks = [], []
        for i in range(0, len(chunk), batch_size):
            batch = chunk[i:i + batch_size]
            padded = batch + [batch[-1]] * (batch_size - len(batch))
            out = jax.device_get(generate(model.params, model.config, padded, max_new_tokens=max_new_tokens,
                                          prompt_bucket=prompt_block, mesh=model.mesh))
            for p, row, n in zip(batch, out.tokens, out.lengths):
                toks.append(np.asarray(list(p) + row[:n].tolist(), np.int32))
                masks.append(np.r_[np.zeros(len(p), np.int8), np.ones(int(n), np.int8)])
        data.write_shard(path, toks, masks)
        last = time.time() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--conversations", metavar="FILE", help="your own conversations (JSON or JSONL) instead of ShareGPT")
    p.add_argument("--num-prompts", type=at_least(0), default=2000)
    p.add_argument("--num-eval-prompts", type=at_least(0), default=64)
    data.add_turns_arg(p)
    p.add_argument("--max-prompt-tokens", type=at_least(1), default=256)
    p.add_argument("--max-new-tokens", type=at_least(1), default=256)
    p.add_argument("--batch-size", type=at_least(1), default=16)
    p.add_argument("--shard-size", type=at_least(1), default=64)
    p.add_argument("--eval-fraction", type=fraction, default=0.02)
    args = parse_args(p, argv)

    model = open_model(args).load()
    prompts = data.split_prompts(model.tokenizer, data.load_chats(args.conversations), args.max_prompt_tokens,
                                 args.eval_fraction, {"train": args.num_prompts, "eval": args.num_eval_prompts},
                                 args.turns)
    check_settings(args.out, {"shard_size": args.shard_size, "max_prompt_tokens": args.max_prompt_tokens,
                              "max_new_tokens": args.max_new_tokens, "eval_fraction": args.eval_fraction,
                              **data.chats_setting(args.conversations), **data.turns_setting(args.turns)})
    for name in ("eval", "train"):
        kept = prompts[name]
        split_dir = os.path.join(args.out, name)
        os.makedirs(split_dir, exist_ok=True)
        # the prompts' messages too, so the held-out ones can be benchmarked (`infer.mtbench --prompts`)
        data.write_prompts(os.path.join(split_dir, "prompts.jsonl"), [messages for messages, _ in kept])
        write_distill_shards(model, [ids for _, ids in kept], split_dir, args.shard_size, args.batch_size,
                             args.max_new_tokens, desc=f"distilling {name}")
        seqs = data.read_shards(split_dir)
        later = sum(any(m["role"] == "assistant" for m in messages) for messages, _ in kept)
        turns = f" ({later} of them to later turns)" if args.turns > 1 else ""
        print(f"{name}: {len(seqs)} replies{turns}, {sum(int(m.sum()) for m in seqs.masks)} tokens, in {split_dir}",
              file=sys.stderr)


if __name__ == "__main__":
    run(main)
