"""From prompts to a trained drafter in one command, within a time budget (sized for a short GPU rental).

    python -m train.pipeline --minutes 8 --out runs/pipeline --data runs/distill --prompts prompts.npz

1. Prompts: the openings (system prompt and first user turn) of ShareGPT's conversations, or of
   --conversations (your own file, as for `train.distill`; --turns N: each of the first N user turns
   in its context, as there), under the chat template (`train.data`),
   split into training and held-out prompts and saved to --prompts; an existing --prompts file is
   read instead, so a machine without network needs only that file (make it where the network is).
2. Distil the prompts not yet distilled into --data (`train.distill`'s resumable shards; every prompt
   padded to one block and every batch to one size, so one program is compiled), until all are done
   or the next shard would end past --distill-share of the budget. Held-out prompts first.
3. Train on every distilled reply with a learning-rate schedule fitted to the time left: a few steps
   and two held-out evaluations are timed first, then the number of steps is set so that warm-up and
   cosine decay end on time, the evaluations along the way included.
   The distilled replies also make a datastore (`train.datastore`, seconds): <out>/datastore.npz.
4. Evaluate: held-out top-1 accuracy per head, and tokens per step of speculative decoding on
   held-out prompts (--eval-spec, and with a datastore beam of 8 added; as many prompts as the
   budget's rest allows, at least one). The drafter goes to
   <out>/drafter, the log to <out>/pipeline.json.
   With --keep-best (early stopping) the drafter kept is that of the best of ten held-out
   evaluations along the way; --dropout and --weight-decay regularise. --init DRAFTER fine-tunes a
   trained drafter (e.g. the shipped one, on the replies to your prompts) instead of starting afresh.

Rerunning the same command resumes: complete shards are kept, and training continues from its last
checkpoint with the plan recorded in pipeline.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np
from jax.sharding import Mesh

from redrafter_jax import datastore
from redrafter_jax.checkpoint import load_drafter_config
from redrafter_jax.cli import add_model_args, at_least, fraction, open_model, parse_args, run
from redrafter_jax.config import SpecConfig
from redrafter_jax.decode import round_up
from redrafter_jax.drafter import init_drafter
from redrafter_jax.files import UNREADABLE_NPZ, write_json
from redrafter_jax.generate import generate
from train import data
from train.distill import check_settings, write_distill_shards
from train.train import (
    add_train_args,
    draft_vocabulary,
    drafter_to_train,
    evaluate_split,
    init_state,
    make_steps,
    split_frozen,
    train,
    train_config,
    training_mesh,
)


def _pack(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([np.asarray(r, np.int32) for r in rows]), np.asarray([len(r) for r in rows], np.int64)


def _unpack(tokens: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    return [r.tolist() for r in np.split(tokens, np.cumsum(lengths)[:-1])]


def write_prompt_file(path: str, settings: dict, prompts: dict) -> None:
    """Saves {"train": [ids], "eval": [ids], "eval_openings": [messages]} made with `settings`, atomically."""
    as_bytes = lambda x: np.frombuffer(json.dumps(x).encode(), np.uint8)  # noqa: E731
    arrays = {}
    for name in ("train", "eval"):
        arrays[f"{name}_tokens"], arrays[f"{name}_lengths"] = _pack(prompts[name])
    tmp = path + ".tmp.npz"
    np.savez(tmp, settings=as_bytes(settings), eval_openings=as_bytes(prompts["eval_openings"]), **arrays)
    os.replace(tmp, path)


def read_prompt_file(path: str) -> tuple[dict, dict]:
    """(settings, prompts) of a file `write_prompt_file` made; one that cannot be read is named."""
    try:
        with np.load(path) as z:
            prompts = {"train": _unpack(z["train_tokens"], z["train_lengths"]),
                       "eval": _unpack(z["eval_tokens"], z["eval_lengths"])}
            if "eval_openings" in z.files:
                prompts["eval_openings"] = json.loads(z["eval_openings"].tobytes())
            else:  # a file made before system prompts were kept: the held-out first user turns' texts
                texts = json.loads(z["eval_texts"].tobytes())
                prompts["eval_openings"] = [[{"role": "user", "content": t}] for t in texts]
            return json.loads(z["settings"].tobytes()), prompts
    except UNREADABLE_NPZ as e:
        raise ValueError(f"cannot read prompt file {path} (cut short? delete it to make it again): {e}") from e


def load_or_build_prompts(path: str, tokenizer, max_prompt_tokens: int, eval_fraction: float,
                          conversations: str | None = None, turns: int = 1) -> dict:
    """{"train": [ids], "eval": [ids], "eval_openings": [messages], "source": {...}} from the prompt file at
    `path`, which is made from ShareGPT or `conversations` when it does not exist ("source": what it was
    made from, `data.chats_setting`; "eval_openings": the held-out prompts' messages, whole turns with
    `turns` > 1). Raises if the file was made with other settings, or from other conversations than the
    ones given; without `conversations` the file is the source, whatever made it (and with turns at its
    default of 1, whatever turns it was made with)."""
    base = {"max_prompt_tokens": max_prompt_tokens, "eval_fraction": eval_fraction, **data.turns_setting(turns)}
    source = data.chats_setting(conversations)
    if os.path.exists(path):
        saved, prompts = read_prompt_file(path)
        if conversations is None:  # the file is the source, whatever made it
            source = {k: v for k, v in saved.items() if k not in base}
        if saved != base | source:
            raise ValueError(f"prompt file {path} was made with other settings "
                             f"({', '.join(data.differences(saved, base | source))})")
    else:
        kept = data.split_prompts(tokenizer, data.load_chats(conversations), max_prompt_tokens, eval_fraction,
                                  turns=turns)
        prompts = {"train": [ids for _, ids in kept["train"]], "eval": [ids for _, ids in kept["eval"]],
                   "eval_openings": [messages for messages, _ in kept["eval"]]}
        write_prompt_file(path, base | source, prompts)
    return prompts | {"source": source}


def time_train_steps(tc, dcfg, target_cfg, target_params, seqs: data.Sequences, mesh: Mesh | None,
                     n: int = 3) -> dict:
    """Seconds of the first training step (compilation included) and of a later one, and of the first
    held-out evaluation (`train.train.evaluate_split`: tc.eval_batches batches) and of a later one."""
    tmesh = training_mesh(tc, mesh)
    opt, train_step, evaluate, _ = make_steps(tc, dcfg, target_cfg, tmesh)
    vocab_map = np.zeros(dcfg.draft_vocab_size, np.int32) if dcfg.draft_vocab_size else None
    dparams = init_drafter(dcfg, jax.random.PRNGKey(0), vocab_map)
    state, frozen = init_state(opt, dparams, tmesh), split_frozen(dparams)[1]
    steps, evals = [], []
    for step in range(n + 1):
        tokens, mask = data.batch_at(seqs, step, tc.batch_size, tc.seq_len, tc.seed, target_cfg.pad_token_id)
        start = time.perf_counter()
        state, metrics = train_step(state, frozen, target_params, tokens, mask, None)
        jax.block_until_ready(metrics)
        steps.append(time.perf_counter() - start)
    for _ in range(2):  # (evaluate_split returns host values: no wait needed)
        start = time.perf_counter()
        evaluate_split(evaluate, state["params"], frozen, target_params, seqs, tc, target_cfg.pad_token_id, tmesh)
        evals.append(time.perf_counter() - start)
    return {"first_step_seconds": steps[0], "seconds_per_step": float(np.median(steps[1:])),
            "first_eval_seconds": evals[0], "seconds_per_eval": evals[1]}


def plan_steps(seconds_left: float, timing: dict, evaluations: int, max_steps: int | None) -> int:
    """Training steps that fit after the compilations (the first step's and first evaluation's excess
    over a later one) and the held-out evaluations; `timing` as `time_train_steps` gives it."""
    fixed = (timing["first_step_seconds"] - timing["seconds_per_step"] + timing["first_eval_seconds"]
             + (evaluations - 1) * timing["seconds_per_eval"])
    steps = int((seconds_left - fixed) / timing["seconds_per_step"])
    return max(1, min(steps, max_steps or steps))


def tokens_per_step(model, drafter, prompts: list[list[int]], spec: SpecConfig, max_new_tokens: int,
                    store: datastore.Datastore | None = None, deadline: float | None = None) -> tuple[float, int]:
    """Mean tokens per speculative step (the bonus token included) over the prompts, decoded one by one
    until done or until the time.time() `deadline` passes (one prompt at least), and how many were decoded."""
    accepted = []
    for p in prompts:
        if accepted and deadline is not None and time.time() > deadline:
            break
        out = jax.device_get(generate(model.params, model.config, [p], max_new_tokens=max_new_tokens,
                                      drafter=drafter, spec=spec, datastore=store, mesh=model.mesh))
        accepted.append(out.accepted[0][out.accepted[0] >= 0])
    return 1 + float(np.concatenate(accepted).mean()), len(accepted)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--out", required=True, help="the run's folder: drafter, checkpoints, metrics, pipeline.json")
    p.add_argument("--data", default=None, help="distillation shards (default <out>/data); may hold earlier shards")
    p.add_argument("--prompts", default=None, help="prompt file (.npz; default <out>/prompts.npz), made if absent")
    p.add_argument("--conversations", metavar="FILE",
                   help="your own conversations (JSON or JSONL) the prompt file is made from instead of ShareGPT")
    p.add_argument("--minutes", type=float, required=True, help="time budget of the whole run")
    p.add_argument("--distill-share", type=float, default=0.5, help="at most this share of the budget distils")
    p.add_argument("--eval-share", type=float, default=0.1, help="share of the budget kept for the evaluation")
    p.add_argument("--num-prompts", type=at_least(0), default=None, help="distil at most this many training prompts")
    p.add_argument("--num-eval-prompts", type=at_least(0), default=None,
                   help="distil at most this many held-out prompts")
    data.add_turns_arg(p)
    p.add_argument("--max-prompt-tokens", type=at_least(1), default=384)
    p.add_argument("--max-new-tokens", type=at_least(1), default=384)
    p.add_argument("--eval-fraction", type=fraction, default=0.02)
    p.add_argument("--distill-batch", type=at_least(1), default=512)
    p.add_argument("--shard-size", type=at_least(1), default=1024)
    p.add_argument("--max-steps", type=at_least(1), default=None, help="train at most this many steps")
    p.add_argument("--eval-prompts", type=at_least(0), default=16,
                   help="held-out prompts decoded to measure tokens/step (0: none)")
    p.add_argument("--eval-spec", default="1x5+2", help="setting (WxL+K) the tokens/step are measured at")
    p.add_argument("--eval-new-tokens", type=at_least(1), default=128)
    add_train_args(p, exclude=("steps",))
    p.set_defaults(batch_size=32, seq_len=768, lr=2e-3, warmup_fraction=0.05, exit_dim=576, draft_vocab=4096,
                   eval_batches=8)
    args = parse_args(p, argv)
    if not args.minutes > 0:
        p.error(f"--minutes must be positive, got {args.minutes}")
    if not 0 < args.distill_share < 1 or not 0 <= args.eval_share < 1 - args.distill_share:
        p.error("need 0 < --distill-share < 1 and 0 <= --eval-share < 1 - --distill-share")
    eval_spec = SpecConfig.parse(args.eval_spec)
    train_config(args, steps=1)  # a bad training flag is refused now, not after the distillation
    target = open_model(args)
    init, dcfg = drafter_to_train(args, p, target.config)  # refused now, not after minutes of loading the weights

    t0 = time.time()
    budget = 60 * args.minutes
    os.makedirs(args.out, exist_ok=True)
    data_dir = args.data or os.path.join(args.out, "data")
    log_path = os.path.join(args.out, "pipeline.json")
    log = {}
    if os.path.exists(log_path):
        with open(log_path) as f:
            log = json.load(f)
    log.update(command="python -m train.pipeline " + " ".join(sys.argv[1:] if argv is None else argv),
               devices=[str(d) for d in jax.devices()])
    stage = {}

    model = target.load()
    prompts = load_or_build_prompts(args.prompts or os.path.join(args.out, "prompts.npz"), model.tokenizer,
                                    args.max_prompt_tokens, args.eval_fraction, args.conversations, args.turns)
    stage["load"] = time.time() - t0
    longest = max(map(len, prompts["train"][:args.num_prompts] + prompts["eval"][:args.num_eval_prompts]), default=0)
    if args.seq_len <= longest:  # (training would refuse its reply, after the distillation)
        raise ValueError(f"--seq-len {args.seq_len} leaves out the reply of the longest prompt ({longest} tokens): "
                         f"make it at least {longest + args.max_new_tokens} (that prompt + --max-new-tokens)")

    # 2. Distillation: held-out prompts first (they are few), then training prompts until the deadline.
    check_settings(data_dir, {"shard_size": args.shard_size, "max_prompt_tokens": args.max_prompt_tokens,
                              "max_new_tokens": args.max_new_tokens, "eval_fraction": args.eval_fraction,
                              **data.turns_setting(args.turns), **prompts["source"]})
    block = round_up(args.max_prompt_tokens, 32)
    deadline = t0 + args.distill_share * budget
    for name, limit in (("eval", args.num_eval_prompts), ("train", args.num_prompts)):
        split_dir = os.path.join(data_dir, name)
        os.makedirs(split_dir, exist_ok=True)
        if name == "eval":
            data.write_prompts(os.path.join(split_dir, "prompts.jsonl"), prompts["eval_openings"][:limit])
        write_distill_shards(model, prompts[name][:limit], split_dir, args.shard_size, args.distill_batch,
                             args.max_new_tokens, block, desc=f"distilling {name}", deadline=deadline)
    stage["distill"] = time.time() - t0 - stage["load"]
    train_seqs = data.read_shards(os.path.join(data_dir, "train"))
    eval_seqs = data.read_shards(os.path.join(data_dir, "eval"))
    log["distilled_prompts"] = {"train": len(train_seqs), "eval": len(eval_seqs),
                                "train_available": len(prompts["train"])}
    print(f"{len(train_seqs)} training and {len(eval_seqs)} held-out replies", file=sys.stderr)
    store = datastore.build(zip(train_seqs.tokens, train_seqs.masks), zip(eval_seqs.tokens, eval_seqs.masks))
    datastore.save(store, os.path.join(args.out, "datastore.npz"))
    log["datastore_ngrams"] = int(store.keys.shape[0])

    # 3. Training, its length fitted to the time left (a resumed run keeps its recorded plan).
    if "plan" in log and os.path.isdir(os.path.join(args.out, "checkpoints")):
        plan = log["plan"]
    else:
        timing = time_train_steps(train_config(args, steps=1000), dcfg, model.config, model.params, train_seqs,
                                  model.mesh)
        left = t0 + (1 - args.eval_share) * budget - time.time()
        # held-out evaluations: the ten of --keep-best (eleven where the steps are no multiple of ten), or
        # the last alone; and where a drafter is fine-tuned, its own first
        evaluations = (11 if args.keep_best else 1) + (init is not None)
        steps = plan_steps(left, timing, evaluations, args.max_steps)
        plan = {"steps": steps, **timing, "evaluations": evaluations, "seconds_left": left,
                "sequences": len(train_seqs)}
    log["plan"] = plan
    write_json(log_path, log)
    # held-out evaluations: at the end, or ten along the way for --keep-best to choose from
    tc = train_config(args, steps=plan["steps"], save_every=max(plan["steps"] // 4, 1),
                      eval_every=max(plan["steps"] // 10, 1) if args.keep_best else plan["steps"])
    extra = {"command": log["command"], "recipe": "distill", "pipeline_minutes": args.minutes}
    vocab_map = draft_vocabulary(dcfg, model.config, train_seqs, eval_seqs, extra, init)
    t_train = time.time()
    drafter = train(tc, dcfg, model.config, model.params, train_seqs, eval_seqs, args.out, vocab_map, extra=extra,
                    mesh=model.mesh, init=init)
    stage["train"] = time.time() - t_train

    # 4. Evaluation.
    t_eval = time.time()
    held = [json.loads(line) for line in open(os.path.join(args.out, "metrics.jsonl"))]
    kept = load_drafter_config(os.path.join(args.out, "drafter"))[1].get("kept_step", plan["steps"])
    log["held_out"] = next(r for r in reversed(held) if r["split"] == "eval" and r["step"] == kept)
    eval_prompts = prompts["eval"][: args.eval_prompts]
    if eval_prompts:
        specs = (eval_spec, dataclasses.replace(eval_spec, **store.one_beam()))
        log["tokens_per_step"], log["tokens_per_step_prompts"] = {}, {}
        for i, spec in enumerate(specs):  # each setting its share of the budget's rest
            deadline = time.time() + (t0 + budget - time.time()) / (len(specs) - i)
            name = spec.describe()
            log["tokens_per_step"][name], log["tokens_per_step_prompts"][name] = tokens_per_step(
                model, drafter if spec.beam_width else None, eval_prompts, spec, args.eval_new_tokens,
                store if spec.datastore_beams else None, deadline)
    stage["evaluate"] = time.time() - t_eval
    log["stage_seconds"] = stage
    log["total_seconds"] = time.time() - t0
    write_json(log_path, log)
    print(json.dumps({k: log[k] for k in ("distilled_prompts", "plan", "held_out", "stage_seconds", "total_seconds")
                      if k in log} | {"tokens_per_step": log.get("tokens_per_step")}, indent=1))


if __name__ == "__main__":
    run(main)
