"""Train a drafter for a frozen target model.

    python -m train.train --recipe dataset --out runs/apple --steps 2000
    python -m train.distill --out data/distill && python -m train.train --recipe distill --data data/distill --out runs/distill

Data parallel over every visible device by default (`jax.sharding`, batch split on a "data" mesh axis;
works on one device); --mesh DxM instead splits the batch D ways and the frozen target tensor-parallel
M ways (`redrafter_jax.sharding`), the drafter staying replicated; --coordinator joins a multi-host job,
each process loading only its rows of each batch. AdamW with warm-up + cosine decay and gradient
clipping (optax); optional gradient accumulation and bfloat16 compute. Against overfitting:
--weight-decay, --dropout (the drafter's ResBlock input and branches), and --keep-best (early
stopping: keep the drafter of the best held-out evaluation, every --eval-every steps). --soft-labels W
trains each head on the target's own next-token distribution (weight W) beside the data's tokens;
--add-conversations N adds the assistant turns of N conversations to the distilled replies, the target's
distribution alone their labels (whatever W): more data for the cost of a forward, not a generation. Orbax
checkpoints every --save-every steps (atomic, the last --keep kept); rerunning the same command
resumes exactly where the last checkpoint left off, since the data order and the dropout masks are
pure functions of (seed, step).
<out>/run.json records the settings and a fingerprint of the data: a rerun with other ones is
refused, naming what differs, and a folder that holds training outputs without that record is
never written into. --init DRAFTER fine-tunes a drafter (its shape and draft vocabulary kept; evaluated
at step 0, so that --keep-best keeps it unless training beats it). --cache-hidden computes the frozen
target's hidden states once instead of at every step. Metrics go to <out>/metrics.jsonl and
<out>/training.png; the drafter (params + config + how it was trained) to <out>/drafter.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from redrafter_jax.checkpoint import load_drafter, save_drafter
from redrafter_jax.cli import add_model_args, at_least, fraction, open_model, parse_args, run
from redrafter_jax.config import DrafterConfig, ModelConfig
from redrafter_jax.drafter import Drafter, init_drafter
from redrafter_jax.files import write_json, write_text
from redrafter_jax.model import Params, cast_params, transformer_causal
from redrafter_jax.sharding import DATA, global_batch, local_rows, make_mesh, param_shardings, shard_params
from train.data import Sequences, batch_at, batch_indices, differences, fingerprint, pad_rows
from train.loss import drafter_loss


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 8  # global, split over devices
    seq_len: int = 512
    num_heads: int = 4  # K: head k predicts the token k+2 ahead of the context position
    lr: float = 1e-3
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    dropout: float = 0.0  # on the drafter's ResBlock input and branches (`drafter.draft_logits`)
    # Weight of the target's own next-token distribution in each head's loss, against the data's
    # token (`train.loss`): 0 learns the replies' tokens only, 1 the target's whole distribution.
    soft_labels: float = 0.0
    clip_norm: float = 1.0
    grad_accum: int = 1
    compute_dtype: str = "float32"
    seed: int = 0
    save_every: int = 100
    keep: int = 3
    eval_every: int = 100
    eval_batches: int = 4
    # Compute the frozen target's hidden states of all training sequences once (host memory
    # n x seq_len x H in compute_dtype) instead of at every step: same training, far cheaper epochs.
    cache_hidden: bool = False
    # Early stopping: the drafter kept is the one of the held-out evaluation (every eval_every steps)
    # with the best mean top-1 accuracy over heads, not the last one.
    keep_best: bool = False

    def __post_init__(self):
        """Refuses a setting that would fail later (a zero period, no checkpoint kept) or train wrongly
        (a negative learning rate ascends the loss), naming the field (the command line's flag)."""
        for name, low in (("steps", 1), ("batch_size", 1), ("seq_len", 3), ("num_heads", 1), ("grad_accum", 1),
                          ("save_every", 1), ("keep", 1), ("eval_every", 1), ("eval_batches", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be at least {low}, got {getattr(self, name)}")
        for name, ok, want in (("lr", self.lr >= 0, ">= 0"), ("weight_decay", self.weight_decay >= 0, ">= 0"),
                               ("clip_norm", self.clip_norm > 0, "> 0"),
                               ("warmup_fraction", 0 <= self.warmup_fraction <= 1, "in [0, 1]"),
                               ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
                               ("soft_labels", 0 <= self.soft_labels <= 1, "in [0, 1]")):
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name)}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be float32 or bfloat16, got {self.compute_dtype!r}")


def token_counts(seqs: Sequences, vocab_size: int) -> np.ndarray:
    """[V] how often each token is a loss-masked target."""
    counts = np.zeros(vocab_size, np.int64)
    for t, m in zip(seqs.tokens, seqs.masks):
        counts += np.bincount(t[m.astype(bool)], minlength=vocab_size)
    return counts


def vocab_coverage(seqs: Sequences, vocab_map: np.ndarray, vocab_size: int) -> float:
    """Fraction of the loss-masked targets inside the draft vocabulary: the ceiling on its heads' accuracy,
    and so what a full-vocabulary head could gain at most."""
    counts = token_counts(seqs, vocab_size)
    return float(counts[vocab_map].sum() / max(counts.sum(), 1))


def most_frequent_tokens(seqs: Sequences, vocab_size: int, n: int, always: tuple[int, ...] = ()) -> np.ndarray:
    """The n most frequent target tokens (loss-masked positions) as a sorted draft vocabulary."""
    counts = token_counts(seqs, vocab_size)
    counts[list(always)] = np.iinfo(np.int64).max
    return np.sort(np.argsort(-counts, kind="stable")[:n]).astype(np.int32)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    updates = max(tc.steps // tc.grad_accum, 1)
    warmup = max(int(tc.warmup_fraction * updates), 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.lr, warmup, updates + 1)

    def lr(count):  # shifted by one, so no update gets the zero at the start (a one-update run still trains)
        return schedule(count + 1)

    opt = optax.chain(optax.clip_by_global_norm(tc.clip_norm), optax.adamw(lr, weight_decay=tc.weight_decay))
    return optax.MultiSteps(opt, every_k_schedule=tc.grad_accum) if tc.grad_accum > 1 else opt


def params_fingerprint(params: Params) -> str:
    """A sha256 of a drafter's parameters (names and values): which drafter a fine-tune started from."""
    h = hashlib.sha256()
    for path, x in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()[:16]


def split_frozen(dparams: Params) -> tuple[Params, Params]:
    """(trainable, frozen): the draft vocabulary map is data, not a weight."""
    frozen = {k: v for k, v in dparams.items() if k == "vocab_map"}
    return {k: v for k, v in dparams.items() if k != "vocab_map"}, frozen


def make_steps(tc: TrainConfig, dcfg: DrafterConfig, target_cfg: ModelConfig, mesh: Mesh, marked: bool = False):
    """Jitted (train_step, eval_step, target_hidden); the batch is sharded over the mesh's "data" axis,
    the target as `sharding.param_specs` (tensor-parallel over a "model" axis, if the mesh has one), the
    drafter and its optimizer state replicated. The steps take the target's hidden states [B, T, H], or
    None to compute them. marked: the masks may mark positions for soft labels alone (`train.loss`)."""
    dtype = jnp.dtype(tc.compute_dtype)
    opt = make_optimizer(tc)
    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA))
    target = param_shardings(target_cfg, mesh)
    cast = functools.partial(cast_params, dtype=dtype)

    def target_hidden(target_params, tokens):
        return jax.lax.stop_gradient(transformer_causal(cast(target_params), target_cfg, tokens))

    def loss_fn(trainable, frozen, target_params, tokens, mask, hidden, key=None):
        if hidden is None:
            hidden = target_hidden(target_params, tokens)
        return drafter_loss({**cast(trainable), **frozen}, dcfg, cast(target_params), hidden, tokens, mask,
                            tc.num_heads, tc.dropout if key is not None else 0.0, key, tc.soft_labels, marked,
                            target_cfg)

    def train_step(state, frozen, target_params, tokens, mask, hidden):
        # dropout masks are a pure function of (seed, step), like the data order: a resumed run repeats them
        key = jax.random.fold_in(jax.random.PRNGKey(tc.seed), state["step"]) if tc.dropout else None
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], frozen, target_params, tokens, mask, hidden, key)
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    def eval_step(params, frozen, target_params, tokens, mask):
        return loss_fn(params, frozen, target_params, tokens, mask, None)[1]

    train = jax.jit(train_step, in_shardings=(rep, rep, target, data, data, data), out_shardings=(rep, rep),
                    donate_argnums=(0,))
    evaluate = jax.jit(eval_step, in_shardings=(rep, rep, target, data, data), out_shardings=rep)
    hidden = jax.jit(target_hidden, in_shardings=(target, data), out_shardings=data)
    return opt, train, evaluate, hidden


def training_mesh(tc: TrainConfig, mesh: Mesh | None) -> Mesh:
    """mesh, or by default every visible device on its data axis; checks that it splits the batch."""
    mesh = mesh or make_mesh(jax.device_count(), 1)
    if tc.batch_size % mesh.shape[DATA]:
        raise ValueError(f"batch_size {tc.batch_size} is not divisible by the mesh's {mesh.shape[DATA]}-device "
                         f"data axis")
    return mesh


def cache_hidden_states(target_hidden, target_params, seqs: Sequences, tc: TrainConfig, pad_id: int,
                        progress: bool = True) -> np.ndarray:
    """The target's hidden states [n, seq_len, H] of every sequence, padded as in training batches."""
    n = len(seqs)
    out = None
    for i in tqdm(range(0, n, tc.batch_size), desc="target hidden states", disable=not progress):
        idx = np.arange(i, i + tc.batch_size) % n  # full batches keep one compiled shape
        h = np.asarray(target_hidden(target_params, pad_rows(seqs, idx, tc.seq_len, pad_id)[0]))
        if out is None:
            out = np.empty((n,) + h.shape[1:], h.dtype)
        keep = min(tc.batch_size, n - i)
        out[i:i + keep] = h[:keep]
    return out


def init_state(opt, dparams: Params, mesh: Mesh) -> dict:
    """The training state, replicated over the mesh as `make_steps`' train step returns it: a state
    placed otherwise would compile the step a second time at the second step."""
    trainable, _ = split_frozen(dparams)
    state = {"params": trainable, "opt_state": opt.init(trainable), "step": jnp.zeros((), jnp.int32)}
    return jax.device_put(state, NamedSharding(mesh, P()))


def _to_host(metrics) -> dict:
    return {k: np.asarray(v).tolist() for k, v in metrics.items()}


def local_batch(mesh: Mesh, arrays: tuple[np.ndarray, ...], batch_size: int) -> tuple[jax.Array, ...]:
    """This process's rows of a batch (`sharding.local_rows`) as arrays split over the data axis."""
    return tuple(global_batch(mesh, x, batch_size) for x in arrays)


def evaluate_split(evaluate, params, frozen, target_params, seqs: Sequences, tc: TrainConfig, pad_id: int,
                   mesh: Mesh) -> dict:
    """Per-head loss and top-1 accuracy over the first eval_batches batches of held-out data, target-count weighted."""
    tot = {"loss": 0.0, "accuracy": 0.0, "count": 0.0}
    rows = local_rows(mesh, tc.batch_size)
    for i in range(tc.eval_batches):
        tokens, mask = local_batch(mesh, [x[rows] for x in batch_at(seqs, i, tc.batch_size, tc.seq_len, tc.seed,
                                                                    pad_id)], tc.batch_size)
        m = {k: np.asarray(v) for k, v in evaluate(params, frozen, target_params, tokens, mask).items()}
        for k in ("loss", "accuracy"):
            tot[k] = tot[k] + m[k] * m["count"]
        tot["count"] = tot["count"] + m["count"]
    n = np.maximum(tot["count"], 1)
    return {"loss": (tot["loss"] / n).tolist(), "accuracy": (tot["accuracy"] / n).tolist()}


def held_out_score(metrics: dict) -> float:
    """What keep_best maximises: the mean over heads of the held-out top-1 accuracy."""
    return float(np.mean(metrics["accuracy"]))


def plot_metrics(path_jsonl: str, path_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(path_jsonl)]
    train = [r for r in rows if r["split"] == "train"]
    held = [r for r in rows if r["split"] == "eval"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot([r["step"] for r in train], [np.mean(r["loss"]) for r in train], label="train", alpha=0.6)
    if held:
        a.plot([r["step"] for r in held], [np.mean(r["loss"]) for r in held], "o-", label="held-out")
        for k in range(len(held[0]["accuracy"])):
            b.plot([r["step"] for r in held], [r["accuracy"][k] for r in held], "o-", label=f"head {k}")
    a.set_xlabel("step")
    a.set_ylabel("mean cross-entropy over heads")
    a.legend()
    b.set_xlabel("step")
    b.set_ylabel("held-out top-1 accuracy")
    if held:
        b.legend()
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    plt.close(fig)


RUN_FILE = "run.json"
OUTPUTS = ("checkpoints", "metrics.jsonl", "training.png", "drafter")  # what train() writes into out_dir


def claim_run_dir(out_dir: str, record: dict, command: str | None) -> list[str]:
    """Starts or resumes the training run in out_dir: writes its record (settings and data
    fingerprint), or checks it against the one there. Refuses a folder holding training outputs
    without a record. Returns the commands of every run of it so far, this one last."""
    path = os.path.join(out_dir, RUN_FILE)
    commands = [command] if command else []
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        for key, cls in (("train_config", TrainConfig), ("drafter_config", DrafterConfig)):
            if isinstance(saved.get(key), dict):  # a field added since that run trained at its default
                saved[key] = {f.name: f.default for f in dataclasses.fields(cls)
                              if f.default is not dataclasses.MISSING} | saved[key]
        diff = differences({k: v for k, v in saved.items() if k != "commands"}, record)
        if diff:
            raise ValueError(f"{out_dir} holds a training run with other settings or data ({'; '.join(diff)}): "
                             f"rerun with the same ones to resume, or use another --out")
        commands = saved.get("commands", []) + commands
    else:
        clash = [n for n in OUTPUTS if os.path.exists(os.path.join(out_dir, n))]
        if clash:
            raise FileExistsError(f"{out_dir} already holds {', '.join(clash)} but no {RUN_FILE}: it is not a "
                                  f"training run of this program, so nothing is written there; use another --out")
    os.makedirs(out_dir, exist_ok=True)
    write_json(path, record | {"commands": commands})
    return commands


def _keep_metrics_until(path: str, step: int) -> None:
    """Drops the metric rows logged after `step` (the checkpoint a resumed run restarts from)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    write_text(path, "".join(rows))


def train(tc: TrainConfig, dcfg: DrafterConfig, target_cfg: ModelConfig, target_params: Params,
          train_seqs: Sequences, eval_seqs: Sequences | None, out_dir: str, vocab_map: np.ndarray | None = None,
          extra: dict | None = None, on_step: Callable[[int], None] | None = None, progress: bool = True,
          mesh: Mesh | None = None, init: Drafter | None = None) -> Drafter:
    """Trains (or resumes training of) a drafter into out_dir; returns the trained drafter (with
    tc.keep_best, the one of the best held-out evaluation: its step is `kept_step` in its metadata).

    init: a drafter of shape dcfg to start from (fine-tuning), its own draft vocabulary kept (vocab_map
    must be None); it is evaluated at step 0, so keep_best returns it if no later evaluation beats it.
    mesh (`sharding.make_mesh`): default, data parallel over every visible device. A resumed run may
    use another mesh: checkpoints do not depend on it."""
    dcfg.check_target(target_cfg)
    if not len(train_seqs):
        raise ValueError("no training sequences")
    if eval_seqs is not None and not len(eval_seqs):  # (None: no evaluation)
        raise ValueError("no held-out sequences to evaluate on: too few conversations for the --eval-fraction?")
    if init is not None and (init.config != dcfg or vocab_map is not None):
        with_map = ", with a vocab_map" if vocab_map is not None else ""
        raise ValueError(f"a fine-tune keeps the shape and draft vocabulary of the drafter it starts from: "
                         f"{init.config} given, {dcfg} asked for{with_map}")
    if tc.keep_best and eval_seqs is None:
        raise ValueError("keep_best chooses the drafter by held-out accuracy: it needs held-out data")
    for name, seqs in (("training", train_seqs), ("held-out", eval_seqs)):
        prompts = [int(np.argmax(m[1:] != 0)) + 1 for m in (seqs.masks if seqs else []) if not m[1:tc.seq_len].any()]
        if prompts:  # (a prompt as long as seq_len leaves its reply out of every batch)
            raise ValueError(f"{len(prompts)} of {len(seqs)} {name} sequences have no reply token within seq_len "
                             f"{tc.seq_len} (their prompts: up to {max(prompts)} tokens): train with a longer seq_len")
    mesh = training_mesh(tc, mesh)
    marked = any((m == 2).any() for m in train_seqs.masks)  # (`data.read_by_target`)
    opt, train_step, evaluate, target_hidden = make_steps(tc, dcfg, target_cfg, mesh, marked)
    target_params = shard_params(target_params, target_cfg, mesh)
    if init is not None:
        dparams = jax.tree_util.tree_map(jnp.asarray, init.params)
    else:
        dparams = init_drafter(dcfg, jax.random.PRNGKey(tc.seed), None if vocab_map is None else jnp.asarray(vocab_map))
    state = init_state(opt, dparams, mesh)
    _, frozen = split_frozen(dparams)
    meta = {"train_config": dataclasses.asdict(tc), "drafter_config": dataclasses.asdict(dcfg),
            **({"init": params_fingerprint(init.params)} if init is not None else {})}
    # In a multi-host job every process trains (and checkpoints, through orbax); process 0 alone writes files.
    lead = jax.process_index() == 0
    if tc.cache_hidden and jax.process_count() > 1:
        raise ValueError("cache_hidden keeps every sequence's hidden states on one host: not for multi-host jobs")
    record = {**meta, "train_data": fingerprint(train_seqs),
              "held_out_data": None if eval_seqs is None else fingerprint(eval_seqs)}
    commands = claim_run_dir(out_dir, record, (extra or {}).get("command")) if lead else []
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(out_dir, "checkpoints")),
                                    options=ocp.CheckpointManagerOptions(max_to_keep=tc.keep, create=True))
    # keep_best: the params of the best held-out evaluation so far, checkpointed with the state
    best = {"params": jax.device_get(state["params"]), "score": None, "step": 0} if tc.keep_best else None
    if manager.latest_step() is not None:
        shapes = lambda tree: jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)  # noqa: E731
        items = {"state": ocp.args.StandardRestore(shapes(state)), "meta": ocp.args.JsonRestore()}
        if best is not None:
            items["best"] = ocp.args.StandardRestore(shapes(state["params"]))
        restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(**items))
        state = restored["state"]  # replicated over the mesh, as its template `state` is
        frozen = {k: jnp.asarray(v, jnp.int32) for k, v in restored["meta"].get("frozen", {}).items()}
        if best is not None:
            best = {"params": jax.device_get(restored["best"]), **restored["meta"]["best"]}

    start = int(state["step"])
    pad = target_cfg.pad_token_id
    cached = (cache_hidden_states(target_hidden, target_params, train_seqs, tc, pad, progress)
              if tc.cache_hidden and start < tc.steps else None)
    log_path = os.path.join(out_dir, "metrics.jsonl")
    if lead:
        _keep_metrics_until(log_path, start if start else -1)  # (a run from step 0 redoes a step-0 evaluation)
    bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, desc="training", disable=not progress)
    rows = local_rows(mesh, tc.batch_size)
    # line-buffered: the metrics of a long run can be followed (and plotted) as it goes
    with open(log_path if lead else os.devnull, "a", buffering=1) as log:
        if init is not None and eval_seqs is not None and start == 0:  # a fine-tune's baseline: where it starts
            e = evaluate_split(evaluate, state["params"], frozen, target_params, eval_seqs, tc, pad, mesh)
            log.write(json.dumps({"step": 0, "split": "eval", **e}) + "\n")
            if best is not None:
                best["score"] = held_out_score(e)
        for step in bar:
            idx = batch_indices(len(train_seqs), step, tc.batch_size, tc.seed)
            idx = idx[rows]  # this process's share of the batch (all of it in a single-process job)
            tokens, mask = local_batch(mesh, pad_rows(train_seqs, idx, tc.seq_len, pad), tc.batch_size)
            state, metrics = train_step(state, frozen, target_params, tokens, mask,
                                        None if cached is None else global_batch(mesh, cached[idx], tc.batch_size))
            done = step + 1
            if done % 10 == 0 or done == tc.steps:
                m = _to_host(metrics)
                log.write(json.dumps({"step": done, "split": "train", **m}) + "\n")
                bar.set_postfix(loss=f"{np.mean(m['loss']):.3f}", acc0=f"{m['accuracy'][0]:.3f}")
            if eval_seqs is not None and (done % tc.eval_every == 0 or done == tc.steps):
                e = evaluate_split(evaluate, state["params"], frozen, target_params, eval_seqs, tc, pad, mesh)
                log.write(json.dumps({"step": done, "split": "eval", **e}) + "\n")
                if best is not None and (best["score"] is None or held_out_score(e) > best["score"]):
                    best = {"params": jax.device_get(state["params"]), "score": held_out_score(e), "step": done}
            if done % tc.save_every == 0 or done == tc.steps:
                items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave({
                    **meta, "data_position": done * tc.batch_size,
                    "frozen": {k: np.asarray(v).tolist() for k, v in frozen.items()},
                    **({"best": {"score": best["score"], "step": best["step"]}} if best is not None else {})})}
                if best is not None:
                    items["best"] = ocp.args.StandardSave(best["params"])
                manager.save(done, args=ocp.args.Composite(**items))
                manager.wait_until_finished()
            if on_step is not None:
                on_step(done)
    manager.close()
    params, kept = (best["params"], {"kept_step": best["step"]}) if best is not None else (state["params"], {})
    drafter = Drafter({**jax.device_get(params), **frozen}, dcfg)
    if lead:
        plot_metrics(log_path, os.path.join(out_dir, "training.png"))
        save_drafter(os.path.join(out_dir, "drafter"), drafter,
                     extra={**meta, **(extra or {}), **kept, "commands": commands})
    return drafter


SHAPE_FLAGS = ("resblocks", "no_rnn", "exit_dim", "share_lm_head", "draft_vocab")  # the drafter's shape


def add_train_args(p: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """Flags for every TrainConfig field (but `exclude`), for the drafter's shape, and --init."""
    for f in dataclasses.fields(TrainConfig):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.default is dataclasses.MISSING:
            p.add_argument(flag, type=int, required=True)
        elif isinstance(f.default, bool):
            p.add_argument(flag, action="store_true")
        else:
            p.add_argument(flag, type=type(f.default), default=f.default)
    p.add_argument("--resblocks", type=at_least(0), default=2)
    p.add_argument("--no-rnn", action="store_true")
    p.add_argument("--exit-dim", type=at_least(1), default=None)
    p.add_argument("--share-lm-head", action="store_true")
    p.add_argument("--draft-vocab", type=at_least(1), default=None,
                   help="reduced draft vocabulary: the N most frequent tokens")
    p.add_argument("--init", metavar="DRAFTER",
                   help="fine-tune: start from this drafter's weights, keeping its shape and draft vocabulary (shape "
                        "flags, if given, must describe it); evaluated at step 0, so --keep-best keeps it unless "
                        "training beats it")


def train_config(args: argparse.Namespace, **overrides) -> TrainConfig:
    """The TrainConfig of the flags (fields given in overrides aside); a bad value raises, naming it, so the
    scripts build it before the model loads."""
    return TrainConfig(**{f.name: overrides[f.name] if f.name in overrides else getattr(args, f.name)
                          for f in dataclasses.fields(TrainConfig)})


def shape_from_args(args: argparse.Namespace, target_cfg: ModelConfig, init: Drafter | None = None) -> DrafterConfig:
    """The drafter shape the flags describe (a fine-tune's: its init drafter's)."""
    if init is not None:
        return init.config
    return DrafterConfig(hidden_size=target_cfg.hidden_size, vocab_size=target_cfg.vocab_size,
                         num_resblocks=args.resblocks, rnn=not args.no_rnn, exit_dim=args.exit_dim,
                         share_lm_head=args.share_lm_head, draft_vocab_size=args.draft_vocab)


def draft_vocabulary(dcfg: DrafterConfig, target_cfg: ModelConfig, train_seqs: Sequences, eval_seqs: Sequences,
                     extra: dict, init: Drafter | None = None) -> np.ndarray | None:
    """train()'s vocab_map: the training data's most frequent targets, or None for a full vocabulary or a
    fine-tune (which keeps its drafter's). The held-out coverage of the one used goes into `extra`."""
    if dcfg.draft_vocab_size is None:
        return None
    vocab_map = (np.asarray(init.params["vocab_map"]) if init is not None else
                 most_frequent_tokens(train_seqs, dcfg.vocab_size, dcfg.draft_vocab_size, target_cfg.eos_token_ids))
    extra["held_out_vocab_coverage"] = vocab_coverage(eval_seqs, vocab_map, dcfg.vocab_size)
    print(f"the {dcfg.draft_vocab_size}-token draft vocabulary covers {extra['held_out_vocab_coverage']:.1%} "
          f"of the held-out targets", file=sys.stderr)
    return vocab_map if init is None else None


def drafter_to_fine_tune(args: argparse.Namespace, p: argparse.ArgumentParser, target_cfg: ModelConfig) -> Drafter:
    """--init's drafter, checked against the target; shape flags given (not left at their defaults) must
    describe it, since a fine-tune keeps its shape."""
    init = load_drafter(args.init, target_cfg)
    asked = shape_from_args(args, target_cfg)
    default = shape_from_args(argparse.Namespace(**{d: p.get_default(d) for d in SHAPE_FLAGS}), target_cfg)
    for f in dataclasses.fields(DrafterConfig):
        value, have = getattr(asked, f.name), getattr(init.config, f.name)
        if value != getattr(default, f.name) and value != have:
            raise SystemExit(f"--init {args.init} is a drafter with {f.name} {have}, not {value}: a fine-tune keeps "
                             f"its shape (leave the flag out)")
    return init


def drafter_to_train(args: argparse.Namespace, p: argparse.ArgumentParser,
                     target_cfg: ModelConfig) -> tuple[Drafter | None, DrafterConfig]:
    """--init's drafter (None without it) and the shape to train, both checked against the target's config:
    the commands call it before the target's weights load."""
    init = drafter_to_fine_tune(args, p, target_cfg) if args.init else None
    return init, shape_from_args(args, target_cfg, init)


def check_added_conversations(args: argparse.Namespace) -> None:
    """--add-conversations distils the target on other text: the conversations held out must be those the
    distillation held out (its recorded --eval-fraction)."""
    if args.recipe != "distill":
        raise SystemExit("--add-conversations is for --recipe distill (--recipe dataset trains on conversations "
                         "alone)")
    recorded = os.path.join(args.data or "", "distill.json")
    held = None
    if os.path.isfile(recorded):
        with open(recorded) as f:
            held = json.load(f).get("eval_fraction")
    if held is not None and held != args.eval_fraction:
        raise SystemExit(f"--eval-fraction {args.eval_fraction}, but {args.data} was distilled with {held}: "
                         f"the same conversations must be held out")


def main(argv=None) -> None:
    from train import data

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--recipe", choices=["dataset", "distill"], required=True)
    p.add_argument("--data", help="distillation shards directory (recipe distill)")
    p.add_argument("--out", required=True)
    p.add_argument("--conversations", metavar="FILE",
                   help="recipe dataset, --add-conversations: your own conversations (JSON or JSONL) instead of "
                        "ShareGPT")
    p.add_argument("--max-conversations", type=at_least(1), default=None, help="conversations to read")
    p.add_argument("--eval-fraction", type=fraction, default=0.02)
    p.add_argument("--add-conversations", type=at_least(0), default=0, metavar="N",
                   help="recipe distill: also train on the assistant turns of the first N training conversations "
                        "with a reply, as the target reads them (its distribution there is the label, not their "
                        "words, whatever --soft-labels)")
    add_train_args(p)
    args = parse_args(p, argv)

    if args.conversations and args.recipe != "dataset" and not args.add_conversations:
        raise SystemExit("--conversations is for --recipe dataset or --add-conversations; to distil them: "
                         "python -m train.distill --conversations ...")
    if args.recipe == "distill" and not args.data:
        raise SystemExit("--recipe distill needs --data (made by python -m train.distill)")
    if args.add_conversations:
        check_added_conversations(args)
    tc = train_config(args)  # (refused before the model loads)
    target = open_model(args)
    init, dcfg = drafter_to_train(args, p, target.config)
    model = target.load()

    def conversations() -> tuple[list, list]:  # (training, held-out)
        return data.split(data.load_chats(args.conversations, limit=args.max_conversations), args.eval_fraction)

    if args.recipe == "dataset":
        train_seqs, eval_seqs = (data.dataset_sequences(model.tokenizer, c, tc.seq_len) for c in conversations())
    else:
        train_seqs = data.read_shards(os.path.join(args.data, "train"))
        eval_seqs = data.read_shards(os.path.join(args.data, "eval"))
        if args.add_conversations:
            more = data.read_by_target(data.dataset_sequences(model.tokenizer, conversations()[0], tc.seq_len,
                                                              args.add_conversations))
            print(f"{len(train_seqs)} distilled replies and {len(more)} conversations", file=sys.stderr)
            train_seqs = data.Sequences(train_seqs.tokens + more.tokens, train_seqs.masks + more.masks)
    print(f"{len(train_seqs)} training and {len(eval_seqs)} held-out sequences", file=sys.stderr)
    extra = {"command": "python -m train.train " + " ".join(sys.argv[1:] if argv is None else argv),
             "recipe": args.recipe}
    vocab_map = draft_vocabulary(dcfg, model.config, train_seqs, eval_seqs, extra, init)
    train(tc, dcfg, model.config, model.params, train_seqs, eval_seqs, args.out, vocab_map, extra=extra,
          mesh=model.mesh, init=init)


if __name__ == "__main__":
    run(main)
