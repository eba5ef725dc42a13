"""Drafter training: loss masks, learning, exact kill-and-resume, data parallelism, data preparation."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from redrafter_jax.checkpoint import load_drafter
from redrafter_jax.config import DrafterConfig
from redrafter_jax.datasets import Chat, read_chats
from redrafter_jax.drafter import draft_logits, init_drafter, rnn_step
from tests.tiny import tiny_model
from train.data import Sequences, batch_at, read_by_target, tokenize_chat, turn_prompts
from train.loss import drafter_loss
from train.train import TrainConfig, make_optimizer, most_frequent_tokens, train, vocab_coverage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_loss_counts_only_masked_targets_inside_the_sequence():
    """Hand-computed: T = 6, last token padding; head k's target for context t is x_{t+2+k}."""
    cfg, tparams = tiny_model()
    dcfg = DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, num_resblocks=1)
    dparams = init_drafter(dcfg, jax.random.PRNGKey(1))
    tokens = jnp.asarray([[5, 9, 12, 7, 30, 0]])
    mask = jnp.asarray([[0, 0, 1, 1, 1, 0]])  # a prompt (0, 0), three reply tokens, then padding
    hidden = jax.random.normal(jax.random.PRNGKey(2), (1, 6, cfg.hidden_size))
    loss, m = drafter_loss(dparams, dcfg, tparams, hidden, tokens, mask, num_heads=2)
    # head 0: contexts t = 0, 1, 2 predict x2, x3, x4 (t = 3 would predict padding x5)
    # head 1: contexts t = 0, 1 predict x3, x4
    assert m["count"].tolist() == [3, 2]
    emb = tparams["embed"]
    expected = []
    for k, pairs in enumerate([[(0, 2), (1, 3), (2, 4)], [(0, 3), (1, 4)]]):
        ces = []
        for t, target in pairs:
            state = jnp.zeros(cfg.hidden_size)
            for j in range(k + 1):  # the RNN has consumed x_{t+1} .. x_{t+1+k}
                state = rnn_step(dparams, dcfg, state, emb[tokens[0, t + 1 + j]])
            logits = draft_logits(dparams, dcfg, tparams, hidden[0, t], state)
            ces.append(jax.nn.logsumexp(logits) - logits[tokens[0, target]])
        expected.append(np.mean(ces))
    np.testing.assert_allclose(np.asarray(m["loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(loss), np.mean(expected), rtol=1e-5)


@pytest.mark.parametrize("w, tied, mask, scaling", [
    (0.3, False, [0, 1, 1, 1, 1, 1, 1], 1.0), (1.0, True, [0, 1, 1, 1, 1, 1, 1], 2.5),
    (0.0, False, [0, 1, 2, 2, 1, 2, 2], 2.5), (0.5, True, [0, 2, 1, 1, 2, 2, 1], 1.0)])
def test_soft_labels_mix_in_the_targets_distribution_at_the_predicted_position(w, tied, mask, scaling):
    """Hand-computed, with a draft vocabulary: head k at context t learns x_{t+2+k} with weight 1 - w and the
    target's distribution there (its LM head on h_{t+1+k}, its logits divided by the target's logits
    scaling, renormalised over the draft vocabulary) with w; where the mask is 2 (text the target only
    read), its distribution alone, and no accuracy is counted."""
    cfg, tparams = tiny_model()
    if tied:  # the LM head is the embedding's transpose (SmolLM2's)
        tparams = {k: v for k, v in tparams.items() if k != "lm_head"}
    head = tparams["embed"].T if tied else tparams["lm_head"]
    vmap = jnp.asarray([0, 5, 7, 9, 12, 21, 30, 44], jnp.int32)
    dcfg = DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, draft_vocab_size=len(vmap))
    dparams = init_drafter(dcfg, jax.random.PRNGKey(1), vmap)
    tokens = jnp.asarray([[5, 9, 12, 7, 30, 3, 21]])  # x5 = 3 is outside the draft vocabulary
    hidden = jax.random.normal(jax.random.PRNGKey(2), (1, 7, cfg.hidden_size))
    _, m = drafter_loss(dparams, dcfg, tparams, hidden, tokens, jnp.asarray([mask], jnp.int8), num_heads=2,
                        soft_labels=w, marked=2 in mask, target_cfg=dataclasses.replace(cfg, logits_scaling=scaling))
    emb, draft_id = tparams["embed"], {int(v): i for i, v in enumerate(vmap)}
    for k in range(2):
        ces, right = [], []
        for t in range(7 - 2 - k):
            label, soft_only = int(tokens[0, t + 2 + k]), mask[t + 2 + k] == 2
            if label not in draft_id and not soft_only:  # a token outside the draft vocabulary cannot be learnt
                right.append(False)
                continue
            state = jnp.zeros(cfg.hidden_size)
            for j in range(k + 1):
                state = rnn_step(dparams, dcfg, state, emb[tokens[0, t + 1 + j]])
            logits = draft_logits(dparams, dcfg, tparams, hidden[0, t], state)
            p = jax.nn.softmax((hidden[0, t + 1 + k] @ head)[vmap] / scaling)
            v = 1.0 if soft_only else w
            ces.append(jax.nn.logsumexp(logits) - (1 - v) * logits[draft_id.get(label, 0)] - v * p @ logits)
            if not soft_only:
                right.append(int(jnp.argmax(logits)) == draft_id[label])
        np.testing.assert_allclose(float(m["loss"][k]), np.mean(ces), rtol=1e-5)
        assert int(m["count"][k]) == len(right) and float(m["accuracy"][k]) == pytest.approx(np.mean(right))
    with pytest.raises(ValueError, match="soft_labels must be in"):
        TrainConfig(steps=1, soft_labels=1.5)


def test_soft_labels_teach_the_targets_choices_where_the_data_says_nothing(tmp_path):
    """Random tokens as data, and a target whose layers add nothing to the residual stream, so its next token
    is a function of the current one: trained on the tokens alone (w = 0) a drafter cannot know the target's
    choices; trained on the target's distribution (w = 1) it learns them, as it does at w = 0 from sequences
    marked as read by the target (`read_by_target`: its distribution alone is their label)."""
    from redrafter_jax.model import lm_head, transformer_causal

    cfg, tparams = tiny_model()
    tparams = {**tparams, "layers": [{**layer, "wo": 0 * layer["wo"], "w_down": 0 * layer["w_down"]}
                                     for layer in tparams["layers"]]}
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 60, (80, 24)).astype(np.int32)
    seqs = Sequences(list(tokens[:64]), [np.r_[np.zeros(4, np.int8), np.ones(20, np.int8)]] * 64)
    held = jnp.asarray(tokens[64:])
    hidden = transformer_causal(tparams, cfg, held)
    choice = jnp.argmax(lm_head(tparams, hidden), -1)[:, 1:-1]  # the target's x_{t+2}, for contexts t = 0 .. T-3
    dcfg = DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, exit_dim=32)
    agree = []
    for w, data in ((0.0, seqs), (1.0, seqs), (0.0, read_by_target(seqs))):
        tc = TrainConfig(steps=40, **{**TC, "num_heads": 2, "save_every": 40, "soft_labels": w})
        d = train(tc, dcfg, cfg, tparams, data, None, str(tmp_path / str(len(agree))), progress=False)
        state = rnn_step(d.params, dcfg, jnp.zeros_like(hidden[:, :-2]), tparams["embed"][held[:, 1:-1]])
        head0 = jnp.argmax(draft_logits(d.params, dcfg, tparams, hidden[:, :-2], state), -1)
        agree.append(float(jnp.mean(head0 == choice)))
    assert agree[0] < 0.1 and agree[1] > 0.5 and agree[2] > 0.5, agree


def toy_sequences(n=64, length=24, seed=0):
    """Sequences with a learnable rule (each token is the previous plus 3, mod 60, plus some noise)."""
    rng = np.random.default_rng(seed)
    toks, masks = [], []
    for _ in range(n):
        x = [int(rng.integers(2, 60))]
        for _ in range(length - 1):
            x.append((x[-1] + 3) % 60 + 2 if rng.random() > 0.1 else int(rng.integers(2, 60)))
        toks.append(np.asarray(x, np.int32))
        masks.append(np.r_[np.zeros(4, np.int8), np.ones(length - 4, np.int8)])
    return Sequences(toks, masks)


TC = dict(batch_size=8, seq_len=24, num_heads=3, lr=1e-2, warmup_fraction=0.1, save_every=4, keep=2,
          eval_every=10, eval_batches=1)


def test_training_reduces_loss(tmp_path):
    cfg, tparams = tiny_model()
    dcfg = DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, exit_dim=32)
    seqs = toy_sequences()
    tc = TrainConfig(steps=50, **{**TC, "save_every": 50})
    lines = {}  # metrics lines on disk after each step: a long run can be followed as it goes, between checkpoints
    train(tc, dcfg, cfg, tparams, seqs, toy_sequences(16, seed=1), str(tmp_path), progress=False,
          on_step=lambda step: lines.update({step: (tmp_path / "metrics.jsonl").read_text().count("\n")}))
    assert [lines[s] for s in (9, 10, 19, 20)] == [0, 2, 2, 4]  # a training and a held-out line every 10 steps
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    held = [r for r in rows if r["split"] == "eval"]
    assert np.mean(held[-1]["loss"]) < 0.6 * np.mean(held[0]["loss"])
    assert min(held[-1]["accuracy"]) > 0.7  # every head learned the rule (chance: 1/60)
    assert (tmp_path / "training.png").exists() and (tmp_path / "drafter" / "drafter_config.json").exists()


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_a_drafter_trains_against_a_target_with_mxfp4_experts(tmp_path, compute_dtype):
    """A GPT-OSS-like target (experts kept in MXFP4, sinks, biases): its hidden states and soft labels feed
    training in either compute dtype (the experts' codes and scales are not cast), and the loss falls."""
    cfg, tparams = tiny_model(num_experts=4, experts_per_token=2, expert_size=32, hidden_size=64, expert_bias=True,
                              expert_format="mxfp4", hidden_act="clamped_swiglu", attention_sinks=True,
                              output_bias=True)
    dcfg = DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, exit_dim=32)
    tc = TrainConfig(steps=20, soft_labels=0.5, compute_dtype=compute_dtype, **{**TC, "save_every": 20})
    train(tc, dcfg, cfg, tparams, toy_sequences(), toy_sequences(16, seed=1), str(tmp_path), progress=False)
    held = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if r["split"] == "eval"]
    assert np.isfinite(held[-1]["loss"]).all() and np.mean(held[-1]["loss"]) < np.mean(held[0]["loss"])


def test_keep_best_keeps_the_drafter_of_the_best_held_out_evaluation(tmp_path):
    from redrafter_jax.checkpoint import load_drafter_config
    from train.train import evaluate_split, held_out_score, make_steps, split_frozen, training_mesh

    cfg, tparams = tiny_model()
    dcfg = DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, draft_vocab_size=40)
    held = toy_sequences(16, seed=1)
    # the learning rate rises through the whole run (warm-up to the end) to one far too high: held-out accuracy
    # rises, then falls by a wide margin (a constant 1.0 left it at chance, where noise decided which was best)
    tc = TrainConfig(steps=24, **{**TC, "eval_every": 6, "lr": 1.0, "warmup_fraction": 1.0, "keep_best": True,
                                  "dropout": 0.3})
    drafter = train(tc, dcfg, cfg, tparams, toy_sequences(), held, str(tmp_path), np.arange(2, 42, dtype=np.int32),
                    progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    scores = {r["step"]: held_out_score(r) for r in rows if r["split"] == "eval"}
    kept = load_drafter_config(str(tmp_path / "drafter"))[1]["kept_step"]
    assert list(scores) == [6, 12, 18, 24] and kept == max(scores, key=scores.get) and kept != 24, scores
    _, _, evaluate, _ = make_steps(tc, dcfg, cfg, training_mesh(tc, None))
    again = evaluate_split(evaluate, *split_frozen(drafter.params), tparams, held, tc, cfg.pad_token_id,
                           training_mesh(tc, None))
    assert held_out_score(again) == pytest.approx(scores[kept], abs=1e-6)  # no dropout when evaluating
    with pytest.raises(ValueError, match="keep_best .* needs held-out data"):
        train(tc, dcfg, cfg, tparams, toy_sequences(), None, str(tmp_path / "none"), np.arange(2, 42, dtype=np.int32),
              progress=False)
    assert not (tmp_path / "none").exists()  # refused before anything is written
    with pytest.raises(ValueError, match="dropout must be in"):
        TrainConfig(steps=1, dropout=1.0)


@pytest.mark.parametrize("field, value, message", [
    ("save_every", 0, r"save_every must be at least 1, got 0"), ("keep", 0, "keep must be at least 1"),
    ("eval_batches", 0, "eval_batches must be at least 1"), ("lr", -1e-3, r"lr must be >= 0, got -0.001"),
    ("lr", float("nan"), "lr must be >= 0, got nan"), ("clip_norm", 0.0, "clip_norm must be > 0"),
    ("warmup_fraction", 1.5, r"warmup_fraction must be in \[0, 1\]"),
    ("compute_dtype", "float16", "compute_dtype must be float32 or bfloat16, got 'float16'")])
def test_training_settings_that_would_fail_later_or_train_wrongly_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(steps=1, **{field: value})


def test_training_commands_refuse_a_bad_setting_before_the_model_loads(tmp_path, capsys):
    from train import distill, pipeline
    from train import train as train_cli

    absent = ["--gguf", str(tmp_path / "absent.gguf")]  # loading it would fail: the setting's error comes first
    with pytest.raises(ValueError, match="save_every must be at least 1, got 0"):
        train_cli.main(absent + ["--recipe", "distill", "--data", str(tmp_path), "--out", str(tmp_path / "t"),
                                 "--steps", "4", "--save-every", "0"])
    with pytest.raises(SystemExit, match="--recipe distill needs --data"):
        train_cli.main(absent + ["--recipe", "distill", "--out", str(tmp_path / "t"), "--steps", "4"])
    with pytest.raises(ValueError, match="lr must be >= 0, got -0.01"):  # not after the distillation
        pipeline.main(absent + ["--out", str(tmp_path / "p"), "--minutes", "1", "--lr", "-0.01"])
    # a share outside [0, 1] held out everything or nothing, to fail (or train on no held-out data) later
    for command, share in ((train_cli.main, "1.5"), (distill.main, "-0.1"), (pipeline.main, "nan")):
        with pytest.raises(SystemExit):
            command(absent + ["--out", str(tmp_path / "p"), "--eval-fraction", share])
        assert f"argument --eval-fraction: must be between 0 and 1, got {share}" in capsys.readouterr().err
    assert not (tmp_path / "p").exists() and not (tmp_path / "t").exists()


def test_fine_tuning_starts_from_the_drafter_and_keeps_it_unless_training_beats_it(tmp_path):
    from redrafter_jax.checkpoint import load_drafter_config
    from train.train import held_out_score, params_fingerprint

    cfg, tparams = tiny_model()
    dcfg = DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, draft_vocab_size=40)
    held = toy_sequences(16, seed=1)
    start = train(TrainConfig(steps=20, **TC), dcfg, cfg, tparams, toy_sequences(), held, str(tmp_path / "start"),
                  np.arange(2, 42, dtype=np.int32), progress=False)
    scores = lambda d: {r["step"]: held_out_score(r) for r in map(json.loads, open(d / "metrics.jsonl"))  # noqa: E731
                        if r["split"] == "eval"}
    assert_same = lambda a, b: jax.tree_util.tree_map(np.testing.assert_array_equal, a.params, b.params)  # noqa: E731

    # a learning rate of zero: the fine-tune returns the drafter it started from, evaluated first as it was
    still = train(TrainConfig(steps=4, **{**TC, "lr": 0.0, "eval_every": 2}), dcfg, cfg, tparams,
                  toy_sequences(seed=2), held, str(tmp_path / "still"), progress=False, init=start)
    assert_same(still, start)
    assert scores(tmp_path / "still") == pytest.approx({s: scores(tmp_path / "start")[20] for s in (0, 2, 4)})
    assert json.load(open(tmp_path / "still" / "run.json"))["init"] == params_fingerprint(start.params)
    # a learning rate that rises to one far too high: every later evaluation is worse, so keep_best keeps the start
    tc = TrainConfig(steps=12, **{**TC, "lr": 3.0, "warmup_fraction": 1.0, "eval_every": 4, "keep_best": True})
    kept = train(tc, dcfg, cfg, tparams, toy_sequences(seed=2), held, str(tmp_path / "worse"), progress=False,
                 init=start)
    assert list(scores(tmp_path / "worse")) == [0, 4, 8, 12]
    assert max(scores(tmp_path / "worse"), key=scores(tmp_path / "worse").get) == 0, scores(tmp_path / "worse")
    assert load_drafter_config(str(tmp_path / "worse" / "drafter"))[1]["kept_step"] == 0
    assert_same(kept, start)
    # its shape and draft vocabulary are the start's; a rerun from another drafter is refused
    with pytest.raises(ValueError, match="keeps the shape and draft vocabulary of the drafter it starts from"):
        train(tc, dataclasses.replace(dcfg, exit_dim=16), cfg, tparams, toy_sequences(), held, str(tmp_path / "x"),
              progress=False, init=start)
    with pytest.raises(ValueError, match="with a vocab_map"):
        train(tc, dcfg, cfg, tparams, toy_sequences(), held, str(tmp_path / "x"), np.arange(40, dtype=np.int32),
              progress=False, init=start)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match=r"init: \w+ there, \w+ now"):
        train(tc, dcfg, cfg, tparams, toy_sequences(seed=2), held, str(tmp_path / "worse"), progress=False,
              init=still.replace(params={**still.params, "rnn_b": still.params["rnn_b"] + 1}))


def test_dropout_zeroes_a_share_of_the_features_and_keeps_their_mean():
    from redrafter_jax.drafter import dropout

    x = jnp.ones((400, 500))
    y = np.asarray(dropout(x, 0.25, jax.random.PRNGKey(0)))
    assert abs(np.mean(y == 0) - 0.25) < 0.01 and set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}
    assert abs(y.mean() - 1) < 0.01
    assert dropout(x, 0.0, None) is x
    # in the loss: a key draws masks (the same for the same key), no key means none
    cfg, tparams = tiny_model()
    dcfg = DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, num_resblocks=2)
    dparams = init_drafter(dcfg, jax.random.PRNGKey(1))
    tokens = jnp.asarray([[5, 9, 12, 7, 30, 4]])
    hidden = jax.random.normal(jax.random.PRNGKey(2), (1, 6, cfg.hidden_size))

    def loss(*a):
        return float(drafter_loss(dparams, dcfg, tparams, hidden, tokens, jnp.ones_like(tokens), 2, *a)[0])

    k = jax.random.PRNGKey(3)
    assert loss(0.5, k) == loss(0.5, k) != loss(0.5, jax.random.PRNGKey(4))
    assert loss(0.5, k) != loss() == loss(0.0, k)


def test_a_run_of_one_optimizer_update_trains():
    # 2 steps accumulated in pairs is a single update: warm-up and cosine decay must still fit
    opt = make_optimizer(TrainConfig(steps=2, grad_accum=2, lr=0.1))
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    for _ in range(2):
        updates, state = opt.update({"w": jnp.ones(3)}, state, params)
        params = jax.tree.map(jnp.add, params, updates)
    assert np.all(np.asarray(params["w"]) < 1.0)


def test_cached_target_hidden_states_train_the_same_drafter(tmp_path):
    cfg, tparams = tiny_model()
    dcfg = DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size)
    runs = [train(TrainConfig(steps=6, cache_hidden=cache, **TC), dcfg, cfg, tparams, toy_sequences(), None,
                  str(tmp_path / str(cache)), progress=False) for cache in (False, True)]
    leaves = [jax.tree_util.tree_leaves(r.params) for r in runs]
    start = jax.tree_util.tree_leaves(init_drafter(dcfg, jax.random.PRNGKey(0)))  # train() seeds with tc.seed = 0
    assert all(not np.allclose(a, b) for a, b in zip(leaves[1], start))  # every weight moved
    for a, b in zip(*leaves):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


TRAIN_SCRIPT = textwrap.dedent("""
    import os, sys
    import jax, numpy as np
    import orbax.checkpoint as ocp
    from redrafter_jax.config import DrafterConfig
    from tests.tiny import tiny_model
    from tests.test_train import TC, toy_sequences
    from train.train import TrainConfig, train
    out, kill_at, during_save, regularised = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "save", sys.argv[4] == "1"
    cfg, tparams = tiny_model()
    dcfg = DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, draft_vocab_size=40)
    def on_step(step):
        if step == kill_at and not during_save:
            os.kill(os.getpid(), 9)  # no cleanup, as when a machine is preempted
    save = ocp.CheckpointManager.save
    def save_then_die(self, step, *a, **k):  # killed while the checkpoint is still being written
        result = save(self, step, *a, **k)
        if step == kill_at and during_save:
            os.kill(os.getpid(), 9)
        return result
    ocp.CheckpointManager.save = save_then_die
    # regularised: dropout masks and the best held-out drafter so far must survive the kill too
    extra = dict(dropout=0.3, keep_best=True, eval_every=3, lr=0.5) if regularised else {}
    train(TrainConfig(steps=12, **{**TC, "save_every": 2, **extra}), dcfg, cfg, tparams, toy_sequences(),
          toy_sequences(16, seed=1) if regularised else None, out, vocab_map=np.arange(2, 42, dtype=np.int32),
          on_step=on_step, progress=False, extra={"command": f"run {kill_at}"})
""")


def run_training(out, kill_at, when="step", regularised=False):
    return subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, str(out), str(kill_at), when, str(int(regularised))],
                          cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("regularised", [False, True], ids=["plain", "dropout_keep_best"])
def test_kill_and_resume_gives_the_same_parameters(tmp_path, regularised):
    from redrafter_jax.checkpoint import load_drafter

    full = run_training(tmp_path / "full", -1, regularised=regularised)
    assert full.returncode == 0, full.stderr
    killed = run_training(tmp_path / "resumed", 7, regularised=regularised)  # killed after step 7; saved 2, 4, 6
    assert killed.returncode == -9
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["4", "6"]  # keep = 2
    killed = run_training(tmp_path / "resumed", 8, "save", regularised)  # resumed at 6, killed while saving 8
    assert killed.returncode == -9
    resumed = run_training(tmp_path / "resumed", -1, regularised=regularised)
    assert resumed.returncode == 0, resumed.stderr
    a = load_drafter(str(tmp_path / "full" / "drafter"))
    b = load_drafter(str(tmp_path / "resumed" / "drafter"))
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # each logged step once, as in the uninterrupted run; the drafter knows every command that made it
    assert (tmp_path / "resumed" / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()
    assert b.config == a.config
    from redrafter_jax.checkpoint import load_drafter_config
    meta = load_drafter_config(str(tmp_path / "resumed" / "drafter"))[1]
    assert meta["commands"] == ["run 7", "run 8", "run -1"]
    assert meta.get("kept_step") == load_drafter_config(str(tmp_path / "full" / "drafter"))[1].get("kept_step")


DISTILL_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np
    from redrafter_jax.loaders import LoadedModel
    from tests.tiny import tiny_model
    from train import data
    from train.distill import write_distill_shards
    out, kill_in_shard = sys.argv[1], int(sys.argv[2])
    cfg, params = tiny_model()
    savez, written = np.savez, []
    def savez_then_die(*a, **k):  # killed with the shard's temporary file written, not yet renamed
        savez(*a, **k)
        written.append(1)
        if len(written) == kill_in_shard + 1:
            os.kill(os.getpid(), 9)
    np.savez = savez_then_die
    prompts = [[5 + i, 9, 12 + i % 3] for i in range(10)]
    write_distill_shards(LoadedModel(cfg, params, None), prompts, out, shard_size=4, batch_size=2, max_new_tokens=6)
""")


def test_distillation_starts_no_shard_that_would_end_past_the_deadline(tmp_path, monkeypatch):
    import types

    from redrafter_jax.loaders import LoadedModel
    from tests.tiny import tiny_model
    from train import data, distill

    clock, write = [0.0], data.write_shard
    monkeypatch.setattr(distill, "time", types.SimpleNamespace(time=lambda: clock[0]))

    def write_in_ten_seconds(*a):
        write(*a)
        clock[0] += 10

    monkeypatch.setattr(data, "write_shard", write_in_ten_seconds)
    cfg, params = tiny_model()
    prompts = [[5 + i, 9, 12 + i % 3] for i in range(10)]
    # at 10 s, before the deadline at 15 s, the second shard is not started: it would end at 20 s
    distill.write_distill_shards(LoadedModel(cfg, params, None), prompts, str(tmp_path), shard_size=4, batch_size=2,
                                 max_new_tokens=6, deadline=15.0)
    assert sorted(os.listdir(tmp_path)) == ["shard_00000.npz"] and clock[0] == 10


def test_distillation_killed_mid_shard_resumes_to_the_same_data(tmp_path):
    from train.data import read_shards

    def run(out, kill):
        return subprocess.run([sys.executable, "-c", DISTILL_SCRIPT, str(out), str(kill)], cwd=ROOT,
                              capture_output=True, text=True)
    assert run(tmp_path / "full", -1).returncode == 0
    assert run(tmp_path / "resumed", 1).returncode == -9
    assert sorted(os.listdir(tmp_path / "resumed")) == ["shard_00000.npz", "shard_00001.npz.tmp"]
    done = run(tmp_path / "resumed", -1)
    assert done.returncode == 0, done.stderr
    full = read_shards(str(tmp_path / "full"))

    def assert_resumed_equals_full():
        resumed = read_shards(str(tmp_path / "resumed"))
        assert len(full) == len(resumed) == 10
        for x, y in zip(full.tokens + full.masks, resumed.tokens + resumed.masks):
            np.testing.assert_array_equal(x, y)

    assert_resumed_equals_full()
    # a shard copied only in part is named where it is read, and redone by a rerun
    cut = tmp_path / "resumed" / "shard_00001.npz"
    os.truncate(cut, os.path.getsize(cut) // 2)
    with pytest.raises(ValueError, match=f"cannot read distillation shard {cut} \\(cut short"):
        read_shards(str(tmp_path / "resumed"))
    redo = run(tmp_path / "resumed", -1)
    assert redo.returncode == 0 and f"redoing it: cannot read distillation shard {cut}" in redo.stderr
    assert_resumed_equals_full()


def test_training_never_writes_into_a_folder_it_does_not_own(tmp_path):
    from redrafter_jax.checkpoint import save_drafter
    from tests.test_checkpoint import make, snapshot

    cfg, tparams = tiny_model()
    dcfg = DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size)
    published = tmp_path / "published"
    save_drafter(str(published / "drafter"), make())
    (published / "metrics.jsonl").write_text('{"step": 10, "split": "train"}\n')
    before = snapshot(published)
    with pytest.raises(FileExistsError, match="holds metrics.jsonl, drafter but no run.json"):
        train(TrainConfig(steps=2, **TC), dcfg, cfg, tparams, toy_sequences(), None, str(published), progress=False)
    assert snapshot(published) == before


def test_resuming_with_other_data_or_settings_is_refused_naming_the_difference(tmp_path):
    from tests.test_checkpoint import snapshot

    cfg, tparams = tiny_model()
    dcfg = DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size)
    def run(seqs, **kw):
        return train(TrainConfig(**{**TC, "steps": 4, **kw}), dcfg, cfg, tparams, seqs, None, str(tmp_path),
                     progress=False)
    run(toy_sequences(n=40))
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"train_data.sequences: 40 there, 200 now"):
        run(toy_sequences(n=200))
    with pytest.raises(ValueError, match=r"train_data.sha256: \w+ there, \w+ now"):
        run(toy_sequences(n=40, seed=3))
    with pytest.raises(ValueError, match=r"train_config.lr: 0.01 there, 0.02 now"):
        run(toy_sequences(n=40), lr=0.02)
    assert snapshot(tmp_path) == before
    # a run recorded before a setting existed trained at its default: it resumes, and refuses another value
    record = json.loads((tmp_path / "run.json").read_text())
    del record["train_config"]["soft_labels"], record["drafter_config"]["apple_warp"]
    (tmp_path / "run.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"train_config.soft_labels: 0.0 there, 0.5 now"):
        run(toy_sequences(n=40), soft_labels=0.5)
    run(toy_sequences(n=40))
    assert json.loads((tmp_path / "run.json").read_text())["train_config"]["soft_labels"] == 0.0


def test_batches_are_a_pure_function_of_step_and_seed():
    seqs = toy_sequences(n=10)
    a = batch_at(seqs, 3, 4, 30, seed=5, pad_id=0)
    b = batch_at(seqs, 3, 4, 30, seed=5, pad_id=0)
    np.testing.assert_array_equal(a[0], b[0])
    assert (a[0][:, 24:] == 0).all() and (a[1][:, 24:] == 0).all()  # padding is masked
    epoch = np.concatenate([batch_at(seqs, s, 5, 24, 5, 0)[0][:, 0] for s in range(2)])
    assert sorted(epoch.tolist()) == sorted(t[0] for t in seqs.tokens)  # an epoch visits each sequence once


def test_draft_vocabulary_keeps_the_most_frequent_targets_and_counts_its_coverage():
    # targets (mask 1): 5 x3, 7 x2, 9 x1, 4 x1; token 1 only ever in the prompt, 3 forced in (EOS)
    seqs = Sequences([np.asarray([1, 5, 5, 7, 9], np.int32), np.asarray([1, 1, 5, 7, 4], np.int32)],
                     [np.asarray([0, 1, 1, 1, 1], np.int8), np.asarray([0, 0, 1, 1, 1], np.int8)])
    vocab = most_frequent_tokens(seqs, 12, 3, always=(3,))
    assert vocab.tolist() == [3, 5, 7]
    assert vocab_coverage(seqs, vocab, 12) == 5 / 7
    assert vocab_coverage(seqs, np.arange(12), 12) == 1.0


def test_distillation_prompts_are_written_as_benchmark_prompts(tmp_path, smollm):
    from infer.mtbench import load_prompts
    from train.data import write_prompts

    hi, why = {"role": "user", "content": "Hi there"}, {"role": "user", "content": "Why?"}
    system = {"role": "system", "content": "Be brief."}
    chats = [Chat("a", [hi, {"role": "assistant", "content": "Hello"}]),
             Chat("b", [{"role": "assistant", "content": "I speak first"}, {"role": "user", "content": "x " * 400}]),
             Chat("c", [system, {"role": "assistant", "content": "I speak first"}, why, system])]
    kept = turn_prompts(smollm.tokenizer, chats, max_prompt_len=64)
    # the openings: the system prompt and first user turn (an over-long one skipped)
    assert [opening for opening, _ in kept] == [[hi], [system, why]]
    assert [ids for _, ids in kept] == [smollm.tokenizer.encode_chat(o) for o in ([hi], [system, why])]
    write_prompts(str(tmp_path / "prompts.jsonl"), [opening for opening, _ in kept])
    assert load_prompts(str(tmp_path / "prompts.jsonl")) == [[hi], [system, why]]
    assert os.listdir(tmp_path) == ["prompts.jsonl"]  # no temporary file left

    # later turns: each in its context, an over-long one skipped alone, the limit counting prompts
    ok, long = {"role": "assistant", "content": "Fine."}, {"role": "assistant", "content": "y " * 400}
    more = [Chat("d", [system, hi, ok, why, long, hi, ok, why]), Chat("e", [why, ok, hi, ok])]
    kept = turn_prompts(smollm.tokenizer, more, max_prompt_len=64, turns=3)
    assert [m for m, _ in kept] == [[system, hi], [system, hi, ok, why], [why], [why, ok, hi]]
    assert [m for m, _ in turn_prompts(smollm.tokenizer, more, 64, limit=3, turns=3)] == [m for m, _ in kept[:3]]
    assert [m for m, _ in turn_prompts(smollm.tokenizer, more, 64, turns=1)] == [[system, hi], [why]]
    write_prompts(str(tmp_path / "turns.jsonl"), [m for m, _ in kept])
    assert load_prompts(str(tmp_path / "turns.jsonl")) == [m for m, _ in kept]


def test_what_a_reply_answers_at_each_turn():
    s, u1, a1, u2, a2, u3 = ({"role": r, "content": f"{r} {i}"}
                             for i, r in enumerate(["system", "user", "assistant", "user", "assistant", "user"]))
    chat = Chat("x", [a1, s, u1, a1, u2, u3, a2, s, u3])  # a greeting before the first user turn is not asked
    assert chat.asked() == [2, 4, 8]  # u3 straight after u2 continues it; a system message between is aside
    assert chat.prompts() == [[s, u1], [s, u1, a1, u2], [s, u1, a1, u2, u3, a2, s, u3]] == chat.prompts(5)
    assert chat.prompts(1) == [chat.opening()] == [[s, u1]]
    assert Chat("y", [a1]).prompts() == [] and Chat("y", [a1]).opening() == []
    # a benchmark asks the last user turn in its context when the record stops there after a reply ...
    assert chat.prompt() == chat.prompts()[-1]
    # ... else the opening: a finished conversation, MT-Bench's turns (the second is --turn 2's)
    assert Chat("done", [s, u1, a1, u2, a2]).prompt() == [s, u1] and Chat("mt", [u1, u2]).prompt() == [u1]


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
SHAREGPT_CHAT = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                 for m in CHAT]


def write_lines(path, records, array=False):
    with open(path, "w") as f:
        f.write(json.dumps(records, indent=1) if array else "".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("array", [False, True], ids=["jsonl", "json"])
def test_chat_files_of_every_format_read_as_the_same_messages(tmp_path, array):
    records = [{"id": "x1", "conversations": SHAREGPT_CHAT},
               {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]},
               {"messages": CHAT},
               {"question_id": 81, "turns": ["Hi", "Bye"], "category": "writing"},
               {"prompt": "Hi"},
               {"conversation_id": "c9", "model": "vicuna-13b", "conversation": CHAT, "turn": 2},  # LMSYS-Chat-1M
               {"conversations": CHAT}]  # role/content under ShareGPT's key, as some data sets write it
    chats = read_chats(write_lines(tmp_path / "chats", records, array))
    assert [c.messages for c in chats] == [CHAT, CHAT[1:2], CHAT, [CHAT[1], CHAT[3]], CHAT[1:2], CHAT, CHAT]
    assert chats[0].id == "x1" and chats[3].id == "81" and chats[5].id == "c9" and chats[6].id == chats[2].id
    # without an id, the messages' hash: the same chat gets the same id, so a held-out split keeps duplicates together
    assert chats[1].id == chats[4].id and chats[2].id not in ("x1", chats[1].id)
    assert read_chats(str(tmp_path / "chats"), limit=2) == chats[:2]
    with_bom = tmp_path / "bom"
    with_bom.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "chats").read_bytes())
    assert read_chats(str(with_bom)) == chats


@pytest.mark.parametrize("text, match", [
    ('{"messages": [{"role": "user", "content": "Hi"}]}\n{"messages": [{"role": "us', r"record 2 \(line 2\): not JSON"),
    ('[{"prompt": "Hi"}, {"prompt": "Bye"', r"record 2 .*not JSON.*cut off"),
    ('{"messages": [{"role": "tool", "content": "42"}]}', 'record 1: unknown role "tool"'),
    ('{"conversations": [{"from": "bard", "value": "Hi"}]}', 'unknown speaker "bard"'),
    ('{"messages": [{"role": "assistant", "content": null, "tool_calls": []}]}',
     "the content of assistant message 1 is not text"),
    ('{"text": "Hi"}', r"expected a message list .*; it has \['text'\]"),
    ('["Hi"]', "expected an object"),
    ('{"messages": "Hi"}', '"messages" must be a list of objects'),
    ('{"turns": "Hi"}', '"turns" must be a list of texts'),
    ("\n", "holds no conversations"),
    (b"PAR1\x15\x04\x15\xa0\x01", "is not UTF-8 text: expected JSON or JSONL"),
])
def test_bad_chat_files_are_refused_naming_the_problem(tmp_path, text, match):
    (tmp_path / "chats.jsonl").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=match):
        read_chats(str(tmp_path / "chats.jsonl"))


@pytest.mark.slow  # three commands, each loading the model
def test_own_conversations_distil_and_train_a_drafter_through_the_commands(tmp_path, capsys):
    """The user's path to a drafter for their own model and data: train.distill and train.train on a
    checkpoint and a chat file of their own (a tiny Llama and a word-level vocabulary)."""
    from infer.mtbench import load_prompts
    from redrafter_jax.loaders.hf import load_hf
    from tests.test_loaders import hf_tensors, write_checkpoint
    from train import distill
    from train import train as train_cli
    from train.data import dataset_sequences, fingerprint, read_by_target, read_shards, split
    from train.train import params_fingerprint

    model = str(tmp_path / "model")
    write_checkpoint(model, "llama", hf_tensors("llama", np.random.default_rng(0)))
    words = lambda i, n: " ".join(f"w{(i * 7 + k) % 50}" for k in range(n))  # noqa: E731
    second = lambda i: [{"role": "user", "content": words(i + 2, 2)},  # noqa: E731
                        {"role": "assistant", "content": words(i, 4)}]
    chats = write_lines(tmp_path / "chats.jsonl", [{"messages": [
        {"role": "system", "content": "w0"}, {"role": "user", "content": words(i, 3)},
        {"role": "assistant", "content": words(i + 1, 6)}] + (second(i) if i % 2 else [])} for i in range(30)])
    out = str(tmp_path / "distill")
    args = ["--hf", model, "--out", out, "--conversations", chats, "--num-prompts", "20", "--num-eval-prompts", "4",
            "--max-prompt-tokens", "16", "--max-new-tokens", "6", "--batch-size", "8", "--shard-size", "8",
            "--eval-fraction", "0.2"]
    distill.main(args)
    assert re.search(r"train: 20 replies, \d+ tokens, in .*train", capsys.readouterr().err)

    target = load_hf(model)
    tok = target.tokenizer
    train_chats, eval_chats = split(read_chats(chats), 0.2)
    for name, expected in [("train", train_chats[:20]), ("eval", eval_chats[:4])]:
        openings = [c.messages for c in read_chats(os.path.join(out, name, "prompts.jsonl"))]
        assert openings == [c.messages[:2] for c in expected]  # the system prompt and the first user turn
        seqs = read_shards(os.path.join(out, name))
        assert len(seqs) == len(expected)
        for ids, mask, opening in zip(seqs.tokens, seqs.masks, openings):
            prompt = tok.encode_chat(opening)
            assert ids[:len(prompt)].tolist() == prompt
            assert mask.tolist() == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    recorded = json.load(open(os.path.join(out, "distill.json")))["conversations_sha256"]
    other = write_lines(tmp_path / "other.jsonl", [{"prompt": words(i, 3)} for i in range(30)])
    with pytest.raises(ValueError, match=f"conversations_sha256: {recorded} there, [0-9a-f]+ now"):
        distill.main([other if a == chats else a for a in args])  # the same folder from another file
    # a split left without prompts is named before anything is distilled or recorded
    with pytest.raises(ValueError, match=r"no eval prompts: 0 of the 30 conversations are held out \(--eval-fraction"):
        distill.main(args[:-2] + ["--eval-fraction", "0.001", "--out", out + "2"])
    assert not os.path.exists(out + "2")
    assert "turns" not in json.load(open(os.path.join(out, "distill.json")))  # (as recorded before --turns)

    # --turns 2: the second user turns too, each in its context (the file's first reply), as prompts
    turns = str(tmp_path / "turns")
    distill.main([turns if a == out else "32" if a == "16" else a for a in args] + ["--turns", "2"])
    said = re.search(r"train: 20 replies \((\d+) of them to later turns\)", capsys.readouterr().err)
    for name, part, n in [("train", train_chats, 20), ("eval", eval_chats, 4)]:
        expected = [m for c in part for m in c.prompts(2) if len(tok.encode_chat(m)) <= 32][:n]
        assert sum(len(m) == 4 for m in expected) >= n // 4  # (some second turns among them)
        if name == "train":
            assert int(said.group(1)) == sum(len(m) == 4 for m in expected)
        written = os.path.join(turns, name, "prompts.jsonl")
        assert [c.messages for c in read_chats(written)] == load_prompts(written) == expected
        seqs = read_shards(os.path.join(turns, name))
        assert len(seqs) == n
        for ids, messages in zip(seqs.tokens, expected):
            assert ids[:len(tok.encode_chat(messages))].tolist() == tok.encode_chat(messages)
    assert json.load(open(os.path.join(turns, "distill.json")))["turns"] == 2
    with pytest.raises(ValueError, match="turns: 2 there, None now"):
        distill.main([turns if a == out else "32" if a == "16" else a for a in args])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        distill.main(args + ["--turns", "0"])
    assert "argument --turns: must be at least 1, got 0" in capsys.readouterr().err

    common = ["--hf", model, "--steps", "2", "--batch-size", "4", "--seq-len", "32", "--eval-every", "2",
              "--eval-batches", "1", "--save-every", "2"]
    with pytest.raises(ValueError, match=r"sequences have no reply token within seq_len 16 \(their prompts: up to "
                                         r"\d+ tokens\): train with a longer seq_len"):  # a second turn's prompt
        train_cli.main([a if a != "32" else "16" for a in common] + ["--recipe", "distill", "--data", turns,
                                                                       "--out", str(tmp_path / "short")])
    train_cli.main(common + ["--recipe", "distill", "--data", out, "--out", str(tmp_path / "distilled")])
    train_cli.main(common + ["--recipe", "dataset", "--conversations", chats, "--eval-fraction", "0.2",
                             "--out", str(tmp_path / "dataset")])
    for run in ("distilled", "dataset"):
        drafter = load_drafter(str(tmp_path / run / "drafter"), target.config)  # checked against the target
        assert drafter.config.hidden_size == 32
    run_json = json.load(open(tmp_path / "dataset" / "run.json"))
    assert run_json["train_data"]["sequences"] == len(train_chats)  # every chat has a reply to learn
    # --init: the distilled drafter fine-tuned on the conversations; a shape flag that is not its shape is refused
    start = str(tmp_path / "distilled" / "drafter")
    train_cli.main(common + ["--recipe", "dataset", "--conversations", chats, "--eval-fraction", "0.2",
                             "--init", start, "--resblocks", "2", "--out", str(tmp_path / "tuned")])
    assert json.load(open(tmp_path / "tuned" / "run.json"))["init"] == params_fingerprint(load_drafter(start).params)
    with pytest.raises(SystemExit, match=f"--init {start} is a drafter with exit_dim None, not 16: a fine-tune keeps"):
        train_cli.main(common + ["--recipe", "dataset", "--conversations", chats, "--eval-fraction", "0.2",
                                 "--init", start, "--exit-dim", "16", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="no held-out sequences"):  # before any folder is made
        train_cli.main(common + ["--recipe", "dataset", "--conversations", chats, "--eval-fraction", "0.001",
                                 "--out", str(tmp_path / "y")])
    assert not (tmp_path / "y").exists()
    with pytest.raises(SystemExit, match="--conversations is for --recipe dataset"):
        train_cli.main(common + ["--recipe", "distill", "--data", out, "--conversations", chats,
                                 "--out", str(tmp_path / "x")])

    # the distilled replies with their tokens as labels, and conversations' assistant turns marked to learn the
    # target's distribution alone
    added = common + ["--recipe", "distill", "--data", out, "--conversations", chats, "--eval-fraction", "0.2"]
    train_cli.main(added + ["--add-conversations", "6", "--out", str(tmp_path / "added")])
    more = read_by_target(dataset_sequences(tok, train_chats, 32, limit=6))
    assert {int(v) for m in more.masks for v in m} == {0, 2}
    both = zip(read_shards(os.path.join(out, "train")), more)
    trained = json.load(open(tmp_path / "added" / "run.json"))["train_data"]
    assert trained == fingerprint(Sequences(*(a + b for a, b in both)))
    with pytest.raises(SystemExit, match="--eval-fraction 0.1, but .* was distilled with 0.2: the same "
                                         "conversations must be held out"):  # before the model is loaded
        train_cli.main(added + ["--add-conversations", "6", "--eval-fraction", "0.1", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        train_cli.main(added + ["--add-conversations", "-1", "--out", str(tmp_path / "x")])
    assert "argument --add-conversations: must be at least 0, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--add-conversations is for --recipe distill"):
        train_cli.main(common + ["--recipe", "dataset", "--add-conversations", "6", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_a_conversation_the_chat_template_refuses_is_named(smollm):
    from redrafter_jax.tokenizer import Tokenizer
    from train.data import dataset_sequences

    no_system = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                 "{% endif %}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    tok = Tokenizer(smollm.tokenizer.tok, no_system, None, smollm.tokenizer.eos_token_ids)
    chats = [Chat("fine", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]),
             Chat("rec-7", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello."}])]
    assert len(turn_prompts(tok, chats[:1], 64)) == len(dataset_sequences(tok, chats[:1], 64)) == 1
    for make in (lambda: turn_prompts(tok, chats, 64), lambda: dataset_sequences(tok, chats, 64)):
        with pytest.raises(ValueError, match="conversation 'rec-7': the model's chat template refuses it: System "
                                             "role not supported"):
            make()


def test_assistant_mask_covers_exactly_the_replies(smollm):
    tok = smollm.tokenizer
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Say 12."}, {"role": "assistant", "content": "12"}]
    ids, mask = tokenize_chat(tok, messages, 512)
    masked = tok.decode(ids[mask.astype(bool)], skip_special_tokens=False)
    assert masked == "Hello! How can I help?<|im_end|>\n12<|im_end|>\n"
    ids_cut, mask_cut = tokenize_chat(tok, messages, 20)
    assert len(ids_cut) == 20 and (mask_cut == mask[:20]).all()


@pytest.mark.slow  # downloads a data set
def test_sharegpt_loads_despite_the_truncated_file():
    from train.data import load_sharegpt, split

    convs = load_sharegpt(limit=300)
    assert len(convs) == 300
    msgs = convs[0].messages
    assert msgs[0]["role"] == "user" and msgs[1]["role"] == "assistant"
    train_part, held = split(convs, 0.1)
    assert 10 < len(held) < 60 and len(train_part) + len(held) == 300
    assert split(convs, 0.1)[1] == held  # stable


def test_training_code_does_not_import_the_inference_front_end():
    code = ("import sys, train.train, train.distill, train.pipeline\n"
            "print(sorted(m for m in sys.modules if m == 'infer' or m.startswith('infer.')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
