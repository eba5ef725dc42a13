"""Benchmarks on the embedded default model; each writes its table to docs/benchmarks.md and a plot.

    python -m infer.benchmark ar      # autoregressive decoding: ours vs Hugging Face transformers
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from infer.report import BENCHMARKS_MD, command, machine, table, write_section
from redrafter_jax.generate import generate
from redrafter_jax.loaders.embedded import default_gguf_path, load_default

PASSAGES = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based inks and a wooden press adapted from wine making. ",
    "Photosynthesis is the process by which green plants, algae and some bacteria convert light energy "
    "into chemical energy stored in glucose, releasing oxygen as a by-product. ",
    "A hash table stores key-value pairs in an array of buckets; a hash function maps each key to a "
    "bucket index, and collisions are resolved by chaining or open addressing. ",
    "The Roman Empire reached its greatest territorial extent under Trajan in 117 AD, stretching from "
    "Britain in the north-west to Mesopotamia in the east. ",
    "Volcanoes form where magma from the Earth's mantle reaches the surface, most often at the boundaries "
    "of tectonic plates or above hot spots such as the one beneath Hawaii. ",
    "In music theory, a chord is a set of pitches sounded together; triads are built from a root, a third "
    "and a fifth, and their quality depends on the size of those intervals. ",
    "The water cycle describes how water evaporates from oceans and lakes, condenses into clouds, falls "
    "as precipitation and flows back through rivers and groundwater. ",
    "Machine learning models are trained by minimising a loss function over data, usually with a variant "
    "of stochastic gradient descent that follows the gradient of the loss. ",
]


def fixed_length_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """n distinct prompts of exactly `length` tokens (passages repeated, then cut)."""
    out = []
    for i in range(n):
        ids = tokenizer.encode(PASSAGES[i % len(PASSAGES)] * 8)
        assert len(ids) >= length
        out.append(ids[:length])
    return out


def timed(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls, after one warm-up call (compilation)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_ar(args) -> None:
    model = load_default()
    cfg = dataclasses.replace(model.config, eos_token_ids=())  # always generate exactly max_new_tokens
    hf = None
    try:
        import torch
        from transformers import AutoModelForCausalLM

        path = default_gguf_path()
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  dtype=torch.float32).eval()
        torch_threads = torch.get_num_threads()
    except ImportError:
        print("transformers/torch not installed: timing ours only")
    rows = []
    for batch in tqdm(args.batch_sizes, desc="batch sizes"):
        prompts = fixed_length_prompts(model.tokenizer, batch, args.prompt_len)

        def ours():
            jax.block_until_ready(generate(model.params, cfg, prompts, max_new_tokens=args.new_tokens).tokens)

        t_ours = timed(ours, args.repeats)
        row = [batch, args.prompt_len, args.new_tokens, batch * args.new_tokens / t_ours]
        if hf is not None:
            ids = torch.tensor(prompts)

            def theirs():
                with torch.no_grad():
                    hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)

            t_hf = timed(theirs, args.repeats)
            row += [batch * args.new_tokens / t_hf, t_hf / t_ours]
        rows.append(row)
    headers = ["batch", "prompt tokens", "new tokens", "ours tokens/s"]
    if hf is not None:
        headers += ["transformers tokens/s", "ours / transformers"]
    md = table(headers, rows)
    print(md)
    note = (f"transformers `generate` (PyTorch {torch.__version__}, {torch_threads} threads, float32, greedy)"
            if hf is not None else "transformers not installed")
    write_section("ar", f"""## Autoregressive decoding: ours vs Hugging Face transformers

SmolLM2-135M-Instruct (embedded GGUF, dequantized to float32), greedy, EOS ignored so every row
generates exactly the new tokens; tokens/s counts generated tokens over the whole call (prefill
included), best of {args.repeats} after a warm-up. Reference: {note}.
Machine: {machine()}.

Command: `{command()}`

{md}
""")
    plot(rows, headers, os.path.join(os.path.dirname(BENCHMARKS_MD), "ar_tokens_per_s.png"))


def plot(rows, headers, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = np.asarray(rows, dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, rows[:, 3], 0.4, label="redrafter-jax")
    if rows.shape[1] > 4:
        ax.bar(x + 0.2, rows[:, 4], 0.4, label="transformers")
    ax.set_xticks(x, [f"batch {int(b)}" for b in rows[:, 0]])
    ax.set_ylabel("generated tokens/s")
    ax.set_title("Autoregressive decoding, SmolLM2-135M, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    ar = sub.add_parser("ar", help="autoregressive decoding vs transformers")
    ar.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ar.add_argument("--prompt-len", type=int, default=100)
    ar.add_argument("--new-tokens", type=int, default=256)
    ar.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    {"ar": bench_ar}[args.what](args)


if __name__ == "__main__":
    main()
