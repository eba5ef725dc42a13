"""A datastore of the target's own replies, for datastore beams (`redrafter_jax.datastore`).

    python -m train.datastore --data ../shared/data/smollm2-135m-distill --out runs/datastore.npz

Reads the distillation shards `train.distill` writes (<data>/train: the n-grams and what followed them;
<data>/eval: the held-out replies on which each match length's acceptance is measured, which scores
the beams) and writes one .npz file, atomically. Needs no model: the shards hold token ids.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from redrafter_jax import datastore
from redrafter_jax.cli import at_least, run
from train import data


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a train.distill folder (train/ and eval/ shards)")
    p.add_argument("--out", required=True, help="the datastore file to write (.npz)")
    p.add_argument("--ngram", type=at_least(1), nargs=2, default=(2, 6), metavar=("MIN", "MAX"),
                   help="n-gram lengths stored and looked up (default 2 6)")
    p.add_argument("--length", type=at_least(1), default=7, help="continuation tokens stored per n-gram (default 7)")
    p.add_argument("--min-count", type=at_least(1), default=1,
                   help="keep an n-gram only if its commonest continuation followed it this often (default 1: "
                        "all; 2: a third of the file, drafts a little worse)")
    args = p.parse_args(argv)

    splits = {name: data.read_shards(os.path.join(args.data, name)) for name in ("train", "eval")}
    train, held_out = (list(zip(s.tokens, s.masks)) for s in splits.values())
    store = datastore.build(train, held_out, min_ngram=args.ngram[0], max_ngram=args.ngram[1], length=args.length,
                            min_count=args.min_count, progress=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    datastore.save(store, args.out)
    replies = sum(int(np.sum(m)) for m in splits["train"].masks)
    print(f"{args.out}: {store.keys.shape[0]:,} n-grams from {replies:,} reply tokens of {len(train):,} sequences, "
          f"{os.path.getsize(args.out) / 2**20:.1f} MiB")
    print("held-out P(token d right | the tokens before it right), per match length:")
    for n, row in zip(range(store.min_ngram, store.max_ngram + 1), np.asarray(store.acceptance)):
        print(f"  n={n}: " + " ".join(f"{x:.3f}" for x in row))


if __name__ == "__main__":
    run(main)
