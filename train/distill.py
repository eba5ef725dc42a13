"""Distillation data: the target's own greedy replies to ShareGPT prompts, as resumable shards.

    python -m train.distill --out data/distill --num-prompts 2000 --max-new-tokens 256

Writes <out>/train/shard_NNNNN.npz and <out>/eval/shard_NNNNN.npz (prompt + reply tokens, loss mask
on the reply) and each split's prompt texts, <out>/{train,eval}/prompts.jsonl. Shards are written
atomically and skipped when present, so an interrupted run continues where it stopped; a given shard
index always holds the same prompts.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np
from tqdm import tqdm

from redrafter_jax.generate import generate
from train import data


def write_distill_shards(model, prompts: list[list[int]], out_dir: str, shard_size: int, batch_size: int,
                         max_new_tokens: int, desc: str = "distilling") -> None:
    os.makedirs(out_dir, exist_ok=True)
    num_shards = -(-len(prompts) // shard_size)
    for s in tqdm(range(num_shards), desc=desc):
        path = os.path.join(out_dir, f"shard_{s:05d}.npz")
        if os.path.exists(path):
            continue
        chunk = prompts[s * shard_size:(s + 1) * shard_size]
        toks, masks = [], []
        for i in range(0, len(chunk), batch_size):
            batch = chunk[i:i + batch_size]
            out = jax.device_get(generate(model.params, model.config, batch, max_new_tokens=max_new_tokens))
            for p, row, n in zip(batch, out.tokens, out.lengths):
                toks.append(np.asarray(list(p) + row[:n].tolist(), np.int32))
                masks.append(np.r_[np.zeros(len(p), np.int8), np.ones(int(n), np.int8)])
        data.write_shard(path, toks, masks)


def main(argv=None) -> None:
    from infer.generate import add_model_args, load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--num-prompts", type=int, default=2000)
    p.add_argument("--num-eval-prompts", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--eval-fraction", type=float, default=0.02)
    args = p.parse_args(argv)

    model = load_model(args)
    train_convs, eval_convs = data.split(data.load_sharegpt(), args.eval_fraction)
    for name, convs, n in [("eval", eval_convs, args.num_eval_prompts), ("train", train_convs, args.num_prompts)]:
        kept = data.first_prompts(model.tokenizer, convs, args.max_prompt_tokens, limit=n)
        split_dir = os.path.join(args.out, name)
        os.makedirs(split_dir, exist_ok=True)
        # the prompt texts too, so the held-out ones can be benchmarked (`infer.mtbench --prompts`)
        data.write_prompts(os.path.join(split_dir, "prompts.jsonl"), [text for text, _ in kept])
        write_distill_shards(model, [ids for _, ids in kept], split_dir, args.shard_size, args.batch_size,
                             args.max_new_tokens, desc=f"distilling {name}")


if __name__ == "__main__":
    main()
