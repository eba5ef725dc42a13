"""The model, prompts and training batch that the multi-device checks share (on_eight_devices.py,
two_processes.py), so that test_sharding.py can compute their one-device references itself."""

import jax
import numpy as np

from redrafter_jax import datastore, sharding
from redrafter_jax.config import DrafterConfig, SpecConfig
from redrafter_jax.drafter import Drafter, init_drafter
from tests.test_train import TC, toy_sequences
from tests.tiny import tiny_model
from train.data import batch_at
from train.train import TrainConfig, init_state, local_batch, make_steps, split_frozen

# 16 query heads over 8 KV heads, MLP 64, vocabulary 64: the model axis of every mesh tried divides them;
# one layer keeps the ~30 compiled programs cheap
CFG, PARAMS = tiny_model(num_heads=16, num_kv_heads=8, num_layers=1)
DRAFTER_CFG = DrafterConfig(hidden_size=CFG.hidden_size, vocab_size=CFG.vocab_size)
PROMPTS = [np.random.default_rng(0).integers(2, CFG.vocab_size, n).tolist() for n in (5, 9, 3, 12)]
SPEC = SpecConfig(2, 3, lookup_beams=1, datastore_beams=1, datastore_length=4)
TRAIN = TrainConfig(steps=10, soft_labels=0.5, **TC)  # the target's logits too, split over "model"


def drafter() -> Drafter:
    return Drafter(init_drafter(DRAFTER_CFG, jax.random.PRNGKey(1)), DRAFTER_CFG)


def store() -> datastore.Datastore:
    """A datastore of random replies: every proposer of SPEC runs on the mesh."""
    replies = np.random.default_rng(1).integers(2, CFG.vocab_size, (8, 40))
    return datastore.build([(r, np.ones(len(r))) for r in replies], [], max_ngram=3, length=3)


def proposers() -> dict:
    """generate()'s keywords for speculative decoding with SPEC."""
    return dict(drafter=drafter(), spec=SPEC, datastore=store())


def train_steps(mesh):
    """Drafter params and loss after two training steps on the mesh (target tensor-parallel over
    "model"), each process feeding only its own rows of the batch."""
    opt, step, _, _ = make_steps(TRAIN, DRAFTER_CFG, CFG, mesh)
    dparams = init_drafter(DRAFTER_CFG, jax.random.PRNGKey(0))
    state, frozen = init_state(opt, dparams, mesh), split_frozen(dparams)[1]
    target = sharding.shard_params(PARAMS, CFG, mesh)
    rows = sharding.local_rows(mesh, TRAIN.batch_size)
    tokens, mask = batch_at(toy_sequences(), 0, TRAIN.batch_size, TRAIN.seq_len, 0, 0)
    tokens, mask = local_batch(mesh, (tokens[rows], mask[rows]), TRAIN.batch_size)
    for _ in range(2):
        state, metrics = step(state, frozen, target, tokens, mask, None)
    return jax.device_get(state["params"]), jax.device_get(metrics["loss"])
