"""Drafter checkpoints: round trip, atomic replacement, clear errors."""

import json
import os

import jax
import numpy as np
import pytest

from redrafter_jax.checkpoint import load_drafter, save_drafter
from redrafter_jax.config import DrafterConfig
from redrafter_jax.drafter import Drafter, init_drafter
from tests.tiny import TINY


def make(seed=0, **kw):
    dcfg = DrafterConfig(hidden_size=TINY.hidden_size, vocab_size=TINY.vocab_size, **kw)
    vmap = np.arange(dcfg.draft_vocab_size, dtype=np.int32) if dcfg.draft_vocab_size else None
    return Drafter(init_drafter(dcfg, jax.random.PRNGKey(seed), vmap), dcfg)


@pytest.mark.parametrize("kw", [{}, {"draft_vocab_size": 16, "exit_dim": 24, "rnn": False}])
def test_round_trip(tmp_path, kw):
    d = make(**kw)
    save_drafter(str(tmp_path / "d"), d, extra={"note": "test"})
    back = load_drafter(str(tmp_path / "d"), TINY)
    assert back.config == d.config
    for a, b in zip(jax.tree_util.tree_leaves(d.params), jax.tree_util.tree_leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_overwrite_replaces_whole_and_leaves_no_temporaries(tmp_path):
    save_drafter(str(tmp_path / "d"), make(0))
    save_drafter(str(tmp_path / "d"), make(1))
    np.testing.assert_array_equal(np.asarray(load_drafter(str(tmp_path / "d")).params["rnn_w"]),
                                  np.asarray(make(1).params["rnn_w"]))
    assert os.listdir(tmp_path) == ["d"]


def test_wrong_target_and_corrupt_checkpoints_raise(tmp_path):
    import dataclasses

    save_drafter(str(tmp_path / "d"), make())
    with pytest.raises(ValueError, match="hidden size 32 does not match the target's 64"):
        load_drafter(str(tmp_path / "d"), dataclasses.replace(TINY, hidden_size=64, head_dim=16))
    cfg_path = tmp_path / "d" / "drafter_config.json"
    meta = json.loads(cfg_path.read_text())
    meta["config"]["num_resblocks"] = 3  # config no longer matches the stored params
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="corrupt or does not match its config"):
        load_drafter(str(tmp_path / "d"))
    with pytest.raises(FileNotFoundError, match="not a drafter checkpoint"):
        load_drafter(str(tmp_path / "nothing"))
