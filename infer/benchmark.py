"""Benchmarks on the embedded default model (but `experts`: real mixtures' layer shapes, random weights); each
writes its table and a plot (see infer.report; --docs publishes them in docs/).

    python -m infer.benchmark ar      # autoregressive decoding: ours vs Hugging Face transformers
    python -m infer.benchmark spec    # speculative step costs; random and oracle drafters vs autoregressive
    python -m infer.benchmark experts # a mixture of experts' layer on the CPU: rows kernel, tiles, XLA's ways
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from infer import profile
from infer.report import add_report_args, beside, command, machine, table, write_section
from redrafter_jax import cache as kv
from redrafter_jax import generate as gen
from redrafter_jax import rows_matmul
from redrafter_jax.cli import at_least, run
from redrafter_jax.config import DrafterConfig, ModelConfig, SpecConfig
from redrafter_jax.drafter import Drafter, init_drafter, untrained_drafter
from redrafter_jax.generate import generate, matmul_precision
from redrafter_jax.loaders.embedded import default_gguf_path, load_default
from redrafter_jax.model import TILE, expert_tiles, experts_mlp, forward, pack_layer, ragged_experts, route
from redrafter_jax.mxfp4 import EXPERTS_ORDER, Mxfp4
from redrafter_jax.oracle import OracleDrafter
from redrafter_jax.wheels import sha256, writable_cache

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


def timed(fns: dict, repeats: int, desc: str) -> dict:
    """Best wall time of each function over `repeats` rounds, after one warm-up call each (compilation).

    Each round calls every function once, so a slow spell of a shared machine hits all of them
    instead of deciding the ratio between two compared functions.
    """
    for fn in fns.values():
        jax.block_until_ready(fn())
    best = dict.fromkeys(fns, float("inf"))
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    """n chat prompts asking about the passages (different lengths)."""
    asks = [f"Explain this in simple words: {PASSAGES[i % len(PASSAGES)]}" for i in range(n)]
    return [tokenizer.encode_chat([{"role": "user", "content": ask}]) for ask in asks]


def load_transformers(device: str, hf_dir: str | None = None, gguf: str | None = None, dtype: str = "float32"):
    """The model in transformers, in `dtype`, on `device`: a Hugging Face checkpoint directory, or the
    model of a GGUF file (default: the embedded one) as transformers converts it (`transformers_copy`).
    None without torch."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    hf_dir = hf_dir or transformers_copy(gguf or default_gguf_path())
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).to(device).eval()


def transformers_copy(gguf: str) -> str:
    """A Hugging Face checkpoint folder of a GGUF file's model as transformers converts it
    (`from_pretrained(gguf_file=...)`, float32), made once in the cache folder, under the file's sha256 and
    transformers' version. Converting the default model takes ~30 s on a CPU, most of it transformers
    reading the file's tokenizer metadata; loading the copy takes ~1 s (it holds 0.5 GB)."""
    import safetensors.torch
    import torch
    import transformers

    path = os.path.abspath(gguf)
    folder = os.path.join(writable_cache(), "transformers", f"{sha256(path)[:16]}-{transformers.__version__}")
    if not os.path.exists(folder):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
        tmp = f"{folder}.tmp-{os.getpid()}"
        config = copy.deepcopy(model.config)  # a plain float32 checkpoint: not marked as a GGUF file's
        vars(config).pop("quantization_config", None)
        try:  # (transformers' save_pretrained refuses a model loaded from GGUF)
            os.makedirs(tmp, exist_ok=True)  # (one a killed process left is overwritten)
            config.save_pretrained(tmp)
            safetensors.torch.save_model(model, os.path.join(tmp, "model.safetensors"))
            os.rename(tmp, folder)  # whole or not at all; where another process got there first, its copy stays
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.isdir(folder):
                raise
    return folder


def ar_rows(model, hf, batch_sizes, prompt_len: int, new_tokens: int, repeats: int) -> tuple[list[str], list[list]]:
    """(headers, rows): generated tokens/s of our autoregressive decoding, and of transformers `generate`
    (hf, on its own device; None: ours only) on the same prompts, EOS ignored, best of `repeats`."""
    cfg = dataclasses.replace(model.config, eos_token_ids=())  # always generate exactly new_tokens
    kernel = rows_matmul.enabled(model.params, cfg.dtype, None)  # then XLA's products are timed beside it
    rows = []
    for batch in tqdm(batch_sizes, desc="batch sizes"):
        prompts = fixed_length_prompts(model.tokenizer, batch, prompt_len)

        def ours():
            return generate(model.params, cfg, prompts, max_new_tokens=new_tokens).tokens

        def ours_xla():
            with rows_matmul.turned_off():
                return ours()

        fns = {"ours": ours}
        if kernel:
            fns["ours, XLA products"] = ours_xla
        if hf is not None:
            import torch

            ids = torch.tensor(prompts, device=hf.device)

            def theirs():
                with torch.no_grad():  # .cpu() waits for the device
                    return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0).cpu()

            fns["transformers"] = theirs
        t = timed(fns, repeats, f"batch {batch}")
        row = [batch, prompt_len, new_tokens, batch * new_tokens / t["ours"]]
        if kernel:
            row.append(batch * new_tokens / t["ours, XLA products"])
        if hf is not None:
            row += [batch * new_tokens / t["transformers"], t["transformers"] / t["ours"]]
        rows.append(row)
    headers = ["batch", "prompt tokens", "new tokens", "ours tokens/s"] + ["ours, XLA products tokens/s"] * kernel
    if hf is not None:
        headers += ["transformers tokens/s", "ours / transformers"]
    return headers, rows


def bench_ar(args) -> None:
    model = load_default()
    hf = load_transformers("cpu")
    if hf is None:
        print("transformers/torch not installed: timing ours only")
    headers, rows = ar_rows(model, hf, args.batch_sizes, args.prompt_len, args.new_tokens, args.repeats)
    md = table(headers, rows)
    print(md)
    if hf is not None:
        import torch

        note = (f"transformers `generate` (PyTorch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
                f"greedy)")
    else:
        note = "transformers not installed"
    write_section("ar", path=args.report, body=f"""## Autoregressive decoding: ours vs Hugging Face transformers

SmolLM2-135M-Instruct (embedded GGUF, dequantized to float32), greedy, EOS ignored so every row
generates exactly the new tokens; tokens/s counts generated tokens over the whole call (prefill
included), best of {args.repeats} after a warm-up. "ours" is what generate() runs (on the CPU in float32,
the CPU kernels for decode steps' products and attention); "ours, XLA products" the same decoding
with XLA's matrix products and attention.
Reference: {note}. Machine: {machine()}.

Command: `{args.command}`

{md}
""")
    plot(rows, headers, beside(args.report, "ar_tokens_per_s.png"))


DRAFTER_OPTIONS = {
    "own head, exit 2H (Apple)": dict(),
    "own head, exit H (projected)": dict(exit_dim=576),
    "target's head, exit H": dict(exit_dim=576, share_lm_head=True),
    "own head, exit 2H, 8192-token vocab": dict(draft_vocab_size=8192),
    "own head, exit H, 4096-token vocab": dict(exit_dim=576, draft_vocab_size=4096),
}


def bench_spec(args) -> None:
    model = load_default()
    cfg, params = model.config, model.params
    h, v = cfg.hidden_size, cfg.vocab_size

    # 1. Verification: one forward of N tree tokens, with XLA's products and attention and (where they run)
    # the CPU kernels.
    variants = {"XLA": gen.DecodingParams(params, params, cfg)}
    if rows_matmul.enabled(params, cfg.dtype, None):  # as generate() decodes
        def bf16():  # a copy each call: decoding params are made once per params
            return jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)

        bf16_cfg = dataclasses.replace(cfg, dtype="bfloat16")
        unit = rows_matmul.bf16_unit()
        if unit:  # the bfloat16 products both ways
            with rows_matmul.turned_off(unit_only=True):
                variants[f"CPU kernels, bfloat16 weights without {unit}"] = gen.decoding_params(bf16(), bf16_cfg)
        variants["CPU kernels, bfloat16 weights" + f" ({unit})" * bool(unit)] = gen.decoding_params(bf16(), bf16_cfg)
        variants["CPU kernels"] = gen.decoding_params(params, cfg)
    verify_rows = verification_rows(variants, args.tree_sizes, args.context, args.repeats * 3)
    decoding = variants[list(variants)[-1]].loop  # the target params as generate() decodes with them
    ar_step = verify_rows[0][-2] / 1000

    # 2. Drafter: one beam-search draft (W x (L-1) drafter steps), per option.
    w, length = args.beam_width, args.beam_length
    ctx = jax.random.normal(jax.random.PRNGKey(0), (1, h))
    g0 = jnp.zeros((1,), jnp.int32)
    draft = jax.jit(lambda p, dd: dd.draft(p, ctx, g0, jnp.zeros((1,), jnp.int32), w, length).beams)
    drafters, n_params = {}, {}
    for name, opts in DRAFTER_OPTIONS.items():
        dcfg = DrafterConfig(hidden_size=h, vocab_size=v, **opts)
        vmap = jnp.arange(dcfg.draft_vocab_size) if dcfg.draft_vocab_size else None
        plain = Drafter(init_drafter(dcfg, jax.random.PRNGKey(1), vmap), dcfg)
        n_params[name] = sum(x.size for x in jax.tree_util.tree_leaves(plain.params) if x.dtype != jnp.int32)
        drafters[name] = gen.decoding_drafter(plain)  # as generate() drafts
    t = timed({name: functools.partial(draft, decoding, d) for name, d in drafters.items()}, args.repeats * 3,
              "drafter cost")
    drafter_rows = [[name, f"{n_params[name] / 1e6:.1f}M", 1000 * t[name] / (length - 1),
                     t[name] / (length - 1) / ar_step] for name in drafters]

    # 3. The decode steps part by part (a profile of generate(); the shipped drafter's shape, a real prefix).
    prompt = fixed_length_prompts(model.tokenizer, 1, args.context)[0]
    part_rows = step_parts(cfg, params, prompt, args.profile_specs)

    # 4. End to end: random and oracle drafters vs autoregressive, same prompts, same run.
    spec = SpecConfig(w, length)
    e2e_rows = []
    for batch in tqdm(args.batch_sizes, desc="end to end"):
        prompts = chat_prompts(model.tokenizer, batch)
        decode = lambda **kw: generate(params, cfg, prompts, max_new_tokens=args.new_tokens, **kw)  # noqa: E731
        ar = decode()
        n_tokens = int(ar.lengths.sum())
        seqs = np.zeros((batch, max(len(p) for p in prompts) + args.new_tokens + length), np.int32)
        for i, p in enumerate(prompts):
            seqs[i, : len(p) + int(ar.lengths[i])] = p + np.asarray(ar.tokens[i, : ar.lengths[i]]).tolist()
        drafters = {"random (untrained)": untrained_drafter(cfg), "oracle": OracleDrafter(jnp.asarray(seqs), v)}
        tokens_per_step = {}
        for name, d in drafters.items():
            out = decode(drafter=d, spec=spec)
            assert np.array_equal(np.asarray(out.tokens), np.asarray(ar.tokens)), "speculative output differs"
            acc = np.asarray(out.accepted)
            tokens_per_step[name] = 1 + acc[acc >= 0].mean()
        speculative = {name: functools.partial(decode, drafter=d, spec=spec) for name, d in drafters.items()}
        t = timed({"AR": decode, **speculative}, args.repeats, f"batch {batch}")
        e2e_rows += [[batch, name, f"{w}x{length} ({spec.budget} slots)", n_tokens / t["AR"], n_tokens / t[name],
                      tokens_per_step[name], t["AR"] / t[name]] for name in drafters]

    md1 = table(["tree tokens N", *[f"{name}: {col}" for name in variants
                                    for col in ("ms per forward", "cost / one AR step")]], verify_rows)
    md2 = table(["drafter", "params", "ms per draft step", "cost / one AR step"], drafter_rows)
    md3 = table(["batch", "drafter", "W x L", "AR tokens/s", "spec tokens/s", "tokens/step", "speedup"], e2e_rows)
    md4 = table(STEP_PART_HEADERS, part_rows)
    print(md1, md2, md4, md3, sep="\n\n")
    write_section("spec", path=args.report, body=f"""## Speculative decoding: step costs and end-to-end bounds

SmolLM2-135M-Instruct, float32, batch 1 unless stated. Machine: {machine()}.

Command: `{args.command}`

Verification: one target forward of N tree tokens against a cache of {args.context} tokens, relative to
one autoregressive step (N = 1) computed the same way, and timed in alternation: XLA's matrix products
and attention, and the CPU kernels that generate() uses on the CPU (products:
`redrafter_jax/rows_matmul.py`; attention over the cache in place: `redrafter_jax/cpu_attention.py`),
with the weights in float32 and rounded to bfloat16 (`--dtype bfloat16`: half the bytes to stream; the
activations rounded to bfloat16 for the products, which are summed in float32; on a CPU with a
bfloat16 unit, AMX or AVX512-BF16, that unit computes them, and the same products without it are timed
beside).
The drafter, step-part and end-to-end tables below use what generate() uses.

{md1}

Drafter: one beam-search step over W = {w} beams (a draft is L - 1 = {length - 1} such steps), per
LM-head option, relative to one autoregressive target step.

{md2}

One decode step part by part, batch 1, after a {args.context}-token prompt, with float32 weights and
rounded to bfloat16: generate() profiled (`infer/profile.py`: the time of the decode loop's ops, as
the loop runs them, summed by the step's named parts), the speculative steps with an untrained
drafter of the shipped drafter's shape (exit H, 4096-token draft vocabulary). "the rest": the loop's
ops outside the parts (its condition, copies); cost relative to the autoregressive step in the same
dtype.

{md4}

End to end, greedy, {args.new_tokens} new tokens per chat prompt: the untrained (random) drafter shows
the cost of a speculative step when nothing is accepted; the oracle drafter (beam 0 is the true
continuation) shows the ceiling for this W x L. Output identical to autoregressive in every run.

{md3}
""")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for j, name in enumerate(variants):
        ax.plot([r[0] for r in verify_rows], [r[2 + 2 * j] for r in verify_rows], "o-", label=name)
    ax.legend()
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tree tokens verified in one forward (N)")
    ax.set_ylabel("cost / one autoregressive step")
    ax.set_title("Verification cost, SmolLM2-135M")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(beside(args.report, "verification_cost.png"), dpi=120)


def verification_rows(variants: dict, tree_sizes, context: int, repeats: int) -> list[list]:
    """[N, then ms and cost / one autoregressive step of each variant] of one target forward of N tree
    tokens against a cache of `context` tokens (tree_sizes must start with 1: the autoregressive step).
    variants: name -> `generate.DecodingParams` (e.g. plain, and packed for the CPU kernels), whose loop
    params run, timed in alternation. Each variant's cache is donated, as the decode loop updates it in
    place."""
    caches = {name: kv.init_cache(v.config, 1, context + max(tree_sizes) + 64).replace(
        lengths=jnp.full((1,), context, jnp.int32)) for name, v in variants.items()}

    @functools.partial(jax.jit, donate_argnums=1, static_argnums=5)
    def verify(p, c, toks, pos, mask, cfg):
        f = forward(p, cfg, toks, pos, c, mask)
        return f.logits, f.cache

    def verify_n(name, n):
        params, cfg = variants[name].loop, variants[name].config
        toks = jnp.zeros((1, n), jnp.int32)
        pos = context + jnp.arange(n)[None]
        mask = kv.attention_mask(caches[name], pos, jnp.tril(jnp.ones((n, n), bool)))

        def once():
            with matmul_precision(cfg):  # as generate() runs it
                logits, caches[name] = verify(params, caches[name], toks, pos, mask, cfg)
            return logits
        return once

    t = timed({(name, n): verify_n(name, n) for n in tree_sizes for name in variants}, repeats, "verification cost")
    return [[n, *[x for name in variants for x in (1000 * t[name, n], t[name, n] / t[name, 1])]] for n in tree_sizes]


STEP_PART_HEADERS = ["weights", *(h for h in profile.HEADERS if h != "op")]


def step_parts(cfg, params, prompt: list[int], spec_texts: list[str], dtypes=("float32", "bfloat16"),
               new_tokens: int = 64) -> list[list]:
    """Rows of STEP_PART_HEADERS: the autoregressive step and the speculative step of each setting part
    by part, from a profile of generate() at batch 1 after `prompt` (`infer.profile`), the speculative
    ones with `drafter.untrained_drafter`, with the float32 params cast to each of `dtypes`."""
    drafter = untrained_drafter(cfg)
    speculative = {s: dict(drafter=drafter, spec=SpecConfig.parse(s)) for s in spec_texts}
    out = []
    for dtype in dtypes:
        cast = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
        found = profile.decodings(cast, dataclasses.replace(cfg, dtype=dtype), prompt, speculative, new_tokens,
                                  f"step profiles, {dtype}")
        out += [[dtype, *r[:2], *r[3:]] for r in profile.rows(found)]  # without the op column
    return out


# Real mixtures' expert layers: hidden size, expert size, experts, experts per token
EXPERT_SHAPES = {"OLMoE-1B-7B": (2048, 1024, 64, 8), "Qwen3-30B-A3B": (2048, 768, 128, 8),
                 "gpt-oss-20b": (2880, 2880, 32, 4)}


def bench_experts(args) -> None:
    """One mixture-of-experts layer's experts (random MXFP4 weights of real models' shapes, and them
    dequantized to float32) over N tokens, timed in alternation: the rows kernel on experts packed as
    decoding packs them (`model.ragged_experts` on `pack_layer`'s experts: the CPU decode loops' way), on
    the float32 weights and on the MXFP4 ones, `model.expert_tiles` (the CPU's way where the kernel is
    off) and XLA's ways (`model.ragged_experts` on arrays: each pair's expert gathered where
    there are fewer pairs than experts, else `lax.ragged_dot`, which XLA:CPU computes densely)."""
    rows = []
    for name in args.shapes:
        h, f, e, k = EXPERT_SHAPES[name]
        cfg = ModelConfig(vocab_size=2, hidden_size=h, intermediate_size=f, num_layers=1, num_heads=1, num_kv_heads=1,
                          head_dim=2, max_position_embeddings=2, num_experts=e, experts_per_token=k, expert_size=f)
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        rng = np.random.default_rng(0)  # MXFP4 weights (random codes, scales 2^-8..2^-5), and them dequantized
        mxfp4 = {w: Mxfp4(jnp.asarray(rng.integers(0, 256, (*stored, 16)), jnp.uint8),
                          jnp.asarray(rng.integers(119, 123, stored), jnp.uint8), EXPERTS_ORDER[w])
                 for w, stored in (("experts_gate_up", (e, 2, f, h // 32)), ("experts_down", (e, h, f // 32)))}
        p = {"router": jax.random.normal(keys[0], (h, e)), **{w: q.dequantize(jnp.float32) for w, q in mxfp4.items()}}
        packed, packed_mxfp4 = pack_layer(p), pack_layer({**p, **mxfp4})  # as the CPU decode loops pack them
        for n in args.tokens:
            x = jax.random.normal(keys[3], (n, h))
            weights, experts = route(x, p["router"], cfg)
            ways = {way: functools.partial(jax.jit(functools.partial(experts_mlp, grouped=fn, cfg=cfg)), x, experts,
                                           weights, params)
                    for way, fn, params in (("kernel", ragged_experts, packed), ("MXFP4", ragged_experts, packed_mxfp4),
                                            ("tiles", expert_tiles, p), ("XLA", ragged_experts, p))}
            out = {way: np.asarray(fn()) for way, fn in ways.items()}
            t = timed(ways, args.repeats, f"{name}, {n} tokens")
            rows.append([name, f"{h} / {f} / {e} / {k}", n, n * k, 1000 * t["kernel"], 1000 * t["MXFP4"],
                         1000 * t["tiles"], "gathered" if n * k < e else "ragged_dot", 1000 * t["XLA"],
                         t["kernel"] / t["MXFP4"], t["tiles"] / t["kernel"], t["XLA"] / t["kernel"],
                         float(max(np.abs(out[w] - out["kernel"]).max() for w in out))])
    md = table(["model", "hidden / expert size / experts / per token", "tokens", "pairs", "kernel ms", "MXFP4 ms",
                "tiles ms", "XLA's way", "its ms", "MXFP4 vs float32", "kernel vs tiles", "kernel vs XLA",
                "max abs difference"], rows)
    print(md)
    write_section("experts", path=args.report, body=f"""## Mixtures of experts on the CPU: rows kernel, tiles, XLA's ways

One layer's experts (random weights of each model's shapes) over N tokens: a decode step (N =
1), a tree, a prefill; the weights are random MXFP4 ones and those dequantized. Each way sorts the
(token, expert) pairs by expert. The rows kernel (the CPU decode loops' way: `model.ragged_experts` on
experts packed by `pack_layer`) multiplies each expert's run of rows in one call per product,
streaming only the experts with rows, each row's result independent of the rows beside it: on
float32 weights (kernel), or on the MXFP4 ones as stored (4.25 bits a weight, decoded as they stream;
the same products bitwise); `model.expert_tiles` (the CPU's way where the kernel is off) walks tiles of
up to {TILE} rows of one expert each; XLA's ways (`model.ragged_experts` on
arrays, the default elsewhere) gather each pair's expert weights where there are fewer pairs than
experts (on the CPU a copy of each), else go through `lax.ragged_dot`, which XLA:CPU computes densely,
every expert over every row. Timed in alternation, best of {args.repeats}. Machine: {machine()}.

Command: `{args.command}`

{md}
""")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in args.shapes:
        mine = [r for r in rows if r[0] == name]
        ax.plot([r[2] for r in mine], [r[10] for r in mine], "o-", label=f"{name}: tiles")
        ax.plot([r[2] for r in mine], [r[11] for r in mine], "s--", label=f"{name}: XLA's way")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens (N)")
    ax.set_ylabel("time / the rows kernel's")
    ax.set_title("MoE layer on the CPU: the rows kernel's speedup")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(beside(args.report, "experts_cpu.png"), dpi=120)


def plot(rows, headers, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = np.asarray(rows, dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = np.arange(len(rows))
    bars = [i for i, h in enumerate(headers) if h.endswith("tokens/s")]
    for j, i in enumerate(bars):
        width = 0.8 / len(bars)
        ax.bar(x + (j - (len(bars) - 1) / 2) * width, rows[:, i], width, label=headers[i].removesuffix(" tokens/s"))
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
    ar.add_argument("--batch-sizes", type=at_least(1), nargs="+", default=[1, 8])
    ar.add_argument("--prompt-len", type=at_least(1), default=100)
    ar.add_argument("--new-tokens", type=at_least(1), default=256)
    ar.add_argument("--repeats", type=at_least(1), default=2)
    sp = sub.add_parser("spec", help="speculative step costs and random/oracle drafters")
    sp.add_argument("--tree-sizes", type=at_least(1), nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    sp.add_argument("--context", type=at_least(1), default=256)
    sp.add_argument("--beam-width", type=at_least(1), default=4)
    sp.add_argument("--beam-length", type=at_least(2), default=4)
    sp.add_argument("--batch-sizes", type=at_least(1), nargs="+", default=[1, 4])
    sp.add_argument("--new-tokens", type=at_least(1), default=128)
    sp.add_argument("--repeats", type=at_least(1), default=2)
    sp.add_argument("--profile-specs", nargs="+", default=["1x4+1", "4x3+1x8:7", "4x4", "8x5"],
                    help="WxL[+K[xL']][:N] settings whose step is profiled part by part")
    ex = sub.add_parser("experts", help="a mixture of experts' layer on the CPU: rows kernel, tiles, XLA's ways")
    ex.add_argument("--shapes", nargs="+", choices=list(EXPERT_SHAPES), default=list(EXPERT_SHAPES))
    ex.add_argument("--tokens", type=at_least(1), nargs="+", default=[1, 4, 16, 64, 128])
    ex.add_argument("--repeats", type=at_least(1), default=3)
    for sub_parser in (ar, sp, ex):
        add_report_args(sub_parser)
    args = p.parse_args(argv)
    args.command = command(__spec__.name, argv)
    {"ar": bench_ar, "spec": bench_spec, "experts": bench_experts}[args.what](args)


if __name__ == "__main__":
    run(main)
