"""Generate text from a prompt or a chat message, streaming tokens, and report tokens/s.

    python -m infer.generate --chat "What is the capital of France?"
    python -m infer.generate --hf path/to/llama_dir --prompt "Once upon a time" --temperature 0.8 --seed 1
    python -m infer.generate --chat "Tell me about Rome." --drafter path/to/drafter --beam-width 4 --beam-length 4
    python -m infer.generate --chat "Tell me about Rome." --lookup-beams 2 --beam-length 5   # no drafter needed

With --drafter or --lookup-beams, decoding is speculative (ReDrafter, plus beams looked up in the
row's own history); the same prompt is then also decoded autoregressively, and the speedup of the
first over the second is printed.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from redrafter_jax.config import DrafterConfig, SamplingConfig, SpecConfig
from redrafter_jax.generate import generate
from redrafter_jax.loaders import LoadedModel


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


def add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drafter", help="drafter checkpoint directory for speculative decoding, or 'random' "
                                     "(an untrained drafter: exact output, little acceptance)")
    p.add_argument("--beam-width", type=int, default=None, help="drafter beams W (default 4 with --drafter, else 0)")
    p.add_argument("--beam-length", type=int, default=4, help="tokens per beam, the init token included")
    p.add_argument("--lookup-beams", type=int, default=0,
                   help="K beams copied from the text so far (prompt + generated): where its last tokens occurred before")
    p.add_argument("--lookup-ngram", type=int, nargs=2, default=(1, 3), metavar=("MIN", "MAX"),
                   help="lengths of the suffix looked up, longest first (default 1 3)")
    p.add_argument("--tree-budget", type=int, default=None, help="packed tree slots (default 1 + (W + K)(L-1))")


def load_drafter_arg(args: argparse.Namespace, model: LoadedModel):
    """The drafter named by --drafter (or None) and the SpecConfig from the beam options (None when
    decoding is autoregressive: no drafter and no lookup beams)."""
    if not args.drafter and not args.lookup_beams:
        return None, None
    width = args.beam_width if args.beam_width is not None else (4 if args.drafter else 0)
    spec = SpecConfig(width, args.beam_length, args.tree_budget, lookup_beams=args.lookup_beams,
                      lookup_min_ngram=args.lookup_ngram[0], lookup_max_ngram=args.lookup_ngram[1])
    if not args.drafter:
        return None, spec
    if args.drafter == "random":
        from redrafter_jax.drafter import Drafter, init_drafter

        dcfg = DrafterConfig(hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size)
        return Drafter(init_drafter(dcfg, jax.random.PRNGKey(0)), dcfg), spec
    from redrafter_jax.checkpoint import load_drafter

    return load_drafter(args.drafter, model.config), spec


class Streamer:
    """Prints row 0's text to stdout as tokens arrive (unless quiet); records when the first and last
    tokens came, so the decode rate excludes compilation and prefill."""

    def __init__(self, tokenizer, quiet: bool = False):
        self.tokenizer, self.quiet = tokenizer, quiet
        self.ids: list[int] = []
        self.text = ""
        self.first_time = self.last_time = None

    def __call__(self, tokens: np.ndarray, counts: np.ndarray) -> None:
        now = time.perf_counter()
        self.first_time = self.first_time or now
        self.last_time = now
        self.ids.extend(int(t) for t in tokens[0, : counts[0]])
        if self.quiet:
            return
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(self.text):])  # looked up now, so redirection applies
            sys.stdout.flush()
            self.text = text

    def rate(self) -> float:
        """Tokens/s from the first streamed token to the last."""
        span = (self.last_time or 0) - (self.first_time or 0)
        return (len(self.ids) - 1) / span if len(self.ids) > 1 and span > 0 else float("nan")


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
    add_spec_args(p)
    args = p.parse_args(argv)

    model = load_model(args)
    drafter, spec = load_drafter_arg(args, model)
    tok = model.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": args.chat}]) if args.chat else tok.encode(args.prompt)
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    key = jax.random.PRNGKey(args.seed)

    def run(streamer, **kw):
        start = time.perf_counter()
        out = generate(model.params, model.config, [ids], max_new_tokens=args.max_new_tokens, sampling=sampling,
                       key=key, stream=streamer, **kw)
        jax.block_until_ready(out)
        return out, streamer.first_time - start

    shown = Streamer(tok)
    out, startup = run(shown, drafter=drafter, spec=spec)
    print(flush=True)
    n = int(out.lengths[0])
    print(f"[{n} tokens; first token after {startup:.2f}s (compile + prefill); decoding {shown.rate():.1f} tokens/s]",
          file=sys.stderr)
    if spec is None:
        return
    acc = np.asarray(out.accepted[0])
    acc = acc[acc >= 0]
    baseline = Streamer(tok, quiet=True)
    ar_out, _ = run(baseline)
    if sampling.greedy:
        same = np.array_equal(np.asarray(ar_out.tokens), np.asarray(out.tokens))
        check = f"output {'identical to' if same else 'DIFFERS from'} autoregressive"
    else:  # different random streams: equal in distribution, not token for token
        check = "sampled: same distribution as autoregressive, different draws"
    print(f"[speculative W={spec.beam_width} L={spec.beam_length} K={spec.lookup_beams} tree={spec.budget}: {len(acc)} steps, "
          f"mean accepted drafted tokens/step {acc.mean():.2f} ({acc.mean() + 1:.2f} tokens/step); "
          f"autoregressive {baseline.rate():.1f} tokens/s -> speedup {shown.rate() / baseline.rate():.2f}x; "
          f"{check}]", file=sys.stderr)


if __name__ == "__main__":
    main()
