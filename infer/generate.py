"""Generate text from a prompt or a chat message, streaming tokens, and report tokens/s.

    python -m infer.generate --chat "What is the capital of France?"
    python -m infer.generate --hf path/to/llama_dir --prompt "Once upon a time" --temperature 0.8 --seed 1
    python -m infer.generate --chat "Tell me about Rome." --drafter path/to/drafter --beam-width 4 --beam-length 4
    python -m infer.generate --chat "Tell me about Rome." --lookup-beams 2 --beam-length 5   # no drafter needed
    python -m infer.generate --chat "Write a poem about the sea." "Now make it rhyme." --drafter  # two turns
    python -m infer.generate --system "You are a pirate." --chat "Where is the treasure?" --drafter
    python -m infer.generate --chat "Tell me about Rome." --datastore runs/datastore.npz  # python -m train.datastore

With --drafter, --lookup-beams or --datastore, decoding is speculative (ReDrafter, plus beams looked up
in the row's own history and in a datastore of the target's replies); each reply is then also decoded
autoregressively, and the speedup of the first over the second is printed. In a conversation, each turn
continues the last turn's KV cache (`generate(..., cache=...)`): only the new message is prefilled, and
with one cache size for the whole conversation (`max_len`) turns after the second compile nothing.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from redrafter_jax.cli import (
    add_model_args,
    add_spec_args,
    at_least,
    load_drafter_for,
    open_model,
    parse_args,
    run,
    tree_setting,
)
from redrafter_jax.config import SamplingConfig, SpecConfig
from redrafter_jax.datastore import Datastore
from redrafter_jax.drafter import Drafter
from redrafter_jax.generate import generate
from redrafter_jax.tokenizer import Tokenizer


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
    what.add_argument("--chat", nargs="+", metavar="MESSAGE",
                      help="a user message, wrapped in the model's chat template; several: a conversation, each "
                           "answered in turn with the replies so far as its context")
    p.add_argument("--system", metavar="TEXT", help="a system prompt that opens the --chat conversation")
    p.add_argument("--max-new-tokens", type=at_least(1), default=256, help="a chat reply usually ends before (EOS)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0, help="keep the tokens at least this many times as likely as "
                   "the likeliest one (after --top-k and --top-p)")
    p.add_argument("--seed", type=int, default=0)
    add_spec_args(p)
    args = parse_args(p, argv)

    flag, texts = ("--chat", args.chat) if args.chat is not None else ("--prompt", [args.prompt])
    if args.system is not None and flag != "--chat":
        p.error("--system opens a chat: use it with --chat")
    named = [(flag, t) for t in texts] + [("--system", args.system)] * (args.system is not None)
    for f, text in named:  # before the model loads: fail fast
        if not Tokenizer.check_text(text, f).strip():
            raise ValueError(f"{f} is empty")
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.min_p)
    spec, store = tree_setting(args)
    target = open_model(args)
    drafter = load_drafter_for(args, target.config, store)
    model = target.load()
    tok = model.tokenizer
    key = jax.random.PRNGKey(args.seed)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    caches = {}
    # One cache size for the whole conversation (its messages, and replies of up to max_new_tokens with a
    # margin for re-encoding them): each turn continues the last one's cache in the same shapes, so turns
    # after the second compile nothing
    chat = messages + [m for t in texts for m in ({"role": "user", "content": t}, {"role": "assistant", "content": ""})]
    max_len = (len(tok.encode_chat(chat)) + len(texts) * (args.max_new_tokens + 32) + args.max_new_tokens + 96
               if flag == "--chat" and len(texts) > 1 else None)
    for turn, text in enumerate(texts):
        if turn:
            print(flush=True)  # a blank line between replies
        if len(texts) > 1:
            print(f"[user, turn {turn + 1}: {text}]", file=sys.stderr, flush=True)
        messages.append({"role": "user", "content": text})
        ids = tok.encode_chat(messages) if flag == "--chat" else tok.encode(text)
        reply = answer(model, ids, args.max_new_tokens, sampling, key, drafter, spec, store, caches,
                       keep_cache=max_len is not None, max_len=max_len)  # (the last turn too: same program)
        messages.append({"role": "assistant", "content": tok.decode(reply)})


def answer(model, ids: list[int], max_new_tokens: int, sampling: SamplingConfig, key: jax.Array,
           drafter: Drafter | None, spec: SpecConfig | None, store: Datastore | None, caches: dict | None = None,
           keep_cache: bool = False, max_len: int | None = None) -> list[int]:
    """Decodes and streams the reply to `ids`; when speculative, decodes it autoregressively too and reports
    the speedup. Returns the reply's tokens. caches: each decoder's `PromptCache` from the last turn, whose
    text `ids` continues (only the rest is prefilled); with keep_cache, this turn's replace them. max_len:
    the KV cache's size (`generate`)."""
    caches = {} if caches is None else caches

    def decode(streamer, name, **kw):
        start = time.perf_counter()
        out = generate(model.params, model.config, [ids], max_new_tokens=max_new_tokens, sampling=sampling,
                       key=key, stream=streamer, mesh=model.mesh, cache=caches.get(name), keep_cache=keep_cache,
                       max_len=max_len, **kw)
        jax.block_until_ready(out)
        caches[name] = out.cache
        return out, streamer.first_time - start

    if last := caches.get("shown"):
        print(f"[prefilling {len(ids) - int(last.reused([ids])[0])} of the prompt's {len(ids)} tokens: the rest is in "
              f"the last turn's cache]", file=sys.stderr, flush=True)
    print("[prefilling, and compiling the decode loop where its shapes are new (a setting, a prompt-length "
          "bucket)]", file=sys.stderr, flush=True)
    shown = Streamer(model.tokenizer)
    out, startup = decode(shown, "shown", drafter=drafter, spec=spec, datastore=store)
    print(flush=True)
    n = int(out.lengths[0])
    print(f"[{n} tokens; first token after {startup:.2f}s (compile + prefill); decoding {shown.rate():.1f} tokens/s]",
          file=sys.stderr)
    if spec is None:
        return shown.ids
    acc = np.asarray(out.accepted[0])
    acc = acc[acc >= 0]
    baseline = Streamer(model.tokenizer, quiet=True)
    ar_out, _ = decode(baseline, "baseline")
    if sampling.greedy:
        same = np.array_equal(np.asarray(ar_out.tokens), np.asarray(out.tokens))
        check = f"output {'identical to' if same else 'DIFFERS from'} autoregressive"
    else:  # different random streams: equal in distribution, not token for token
        check = "sampled: same distribution as autoregressive, different draws"
    lookup = f"K={spec.lookup_beams}" + (f" L'={spec.lookup_length}" if spec.lookup_length else "")
    lookup += f" D={spec.datastore_beams} L''={spec.datastore_length}" if spec.datastore_beams else ""
    print(f"[speculative W={spec.beam_width} L={spec.beam_length} {lookup} tree={spec.describe_slots()}: "
          f"{len(acc)} steps, mean accepted drafted tokens/step {acc.mean():.2f} ({acc.mean() + 1:.2f} tokens/step); "
          f"autoregressive {baseline.rate():.1f} tokens/s -> speedup {shown.rate() / baseline.rate():.2f}x; "
          f"{check}]", file=sys.stderr)
    if shown.rate() < baseline.rate() and jax.default_backend() == "cpu":
        print("[on a CPU a speculative step costs more than a single-token step (its tree's forward 1.1-1.5 "
              "steps for 8 tokens, plus drafting), so it pays only where enough drafts are accepted; on a GPU "
              "the forward costs about one step: see the README's 'What you just saw']", file=sys.stderr)
    return shown.ids


def cli() -> None:
    """The `redrafter-generate` console script."""
    run(main)


if __name__ == "__main__":
    cli()
