"""Generate text from a prompt or a chat message, streaming tokens, and report tokens/s.

    python -m infer.generate --chat "What is the capital of France?"
    python -m infer.generate --hf path/to/llama_dir --prompt "Once upon a time" --temperature 0.8 --seed 1
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from redrafter_jax.generate import generate
from redrafter_jax.loaders import LoadedModel
from redrafter_jax.sampling import SamplingConfig


def add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--gguf", help="a GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    src.add_argument("--hf", help="a Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def load_model(args: argparse.Namespace) -> LoadedModel:
    if args.hf:
        from redrafter_jax.loaders.hf import load_hf

        return load_hf(args.hf, args.dtype)
    if args.gguf:
        from redrafter_jax.loaders.gguf import load_gguf

        return load_gguf(args.gguf, args.dtype)
    from redrafter_jax.loaders.embedded import load_default

    return load_default(args.dtype)


class Streamer:
    """Prints row 0's text as tokens arrive; records when the first and last tokens came."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.text = ""
        self.first_time = self.last_time = None

    def __call__(self, tokens: np.ndarray, counts: np.ndarray) -> None:
        now = time.perf_counter()
        self.first_time = self.first_time or now
        self.last_time = now
        self.ids.extend(int(t) for t in tokens[0, : counts[0]])
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self.out.write(text[len(self.text):])
            self.out.flush()
            self.text = text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="plain text to continue")
    what.add_argument("--chat", help="a user message, wrapped in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    model = load_model(args)
    tok = model.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": args.chat}]) if args.chat else tok.encode(args.prompt)
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    streamer = Streamer(tok)
    start = time.perf_counter()
    out = generate(model.params, model.config, [ids], max_new_tokens=args.max_new_tokens, sampling=sampling,
                   key=jax.random.PRNGKey(args.seed), stream=streamer)
    n = int(jax.device_get(out.lengths)[0])
    end = time.perf_counter()
    print(flush=True)
    decode_s = (streamer.last_time or end) - (streamer.first_time or start)
    rate = (n - 1) / decode_s if n > 1 and decode_s > 0 else float("nan")
    print(f"[{n} tokens; first token after {streamer.first_time - start:.2f}s (compile + prefill); "
          f"decoding {rate:.1f} tokens/s]", file=sys.stderr)


if __name__ == "__main__":
    main()
