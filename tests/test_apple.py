"""Apple interop against drafters saved by Apple's own code (tests/data/apple-drafter-golden, see its
README): import reproduces Apple's beam search, export writes Apple's exact format, bad files get
named errors."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from redrafter_jax.apple import load_apple_drafter, save_apple_drafter
from redrafter_jax.checkpoint import load_drafter
from redrafter_jax.config import DrafterConfig, ModelConfig
from redrafter_jax.drafter import Drafter, init_drafter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "data", "apple-drafter-golden")
CASES = ["case0", "case1", "case2"]


def apple_beams(drafter, io, dtype):
    out = drafter.draft({"embed": jnp.asarray(io["embedding"], dtype)}, jnp.asarray(io["context"], dtype),
                        jnp.asarray(io["init_token"], jnp.int32), None, int(io["beam_width"]), int(io["beam_length"]),
                        with_log_probs=True)
    return np.asarray(out.beams), np.asarray(out.log_probs)


@pytest.mark.parametrize("case", CASES)
def test_imported_drafter_gives_apples_beams_in_float32(case):
    io = np.load(os.path.join(GOLDEN, case, "io.npz"))
    drafter = load_drafter(os.path.join(GOLDEN, case))  # recognised as Apple's format
    assert drafter.config.apple_warp
    beams, log_probs = apple_beams(drafter, io, jnp.float32)
    np.testing.assert_array_equal(beams, io["beams_float32"])
    np.testing.assert_allclose(log_probs, io["log_probs_float32"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_imported_drafter_gives_apples_beams_in_float64(case):
    io = np.load(os.path.join(GOLDEN, case, "io.npz"))
    with jax.enable_x64(True):
        drafter = load_apple_drafter(os.path.join(GOLDEN, case), dtype="float64")
        beams, log_probs = apple_beams(drafter, io, jnp.float64)
    assert log_probs.dtype == np.float64
    np.testing.assert_array_equal(beams, io["beams_float64"])
    np.testing.assert_allclose(log_probs, io["log_probs_float64"], rtol=1e-9, atol=1e-9)


def our_drafter(case, vocab_map=None, **kw):
    conf = json.load(open(os.path.join(GOLDEN, case, "config.json")))
    h = conf["hidden_size"]
    dcfg = DrafterConfig(hidden_size=h, vocab_size=conf["vocab_size"], num_resblocks=conf["num_draft_layers"],
                         rnn=conf["rnn"], exit_dim=conf["exit_dim"], **kw)
    return Drafter(init_drafter(dcfg, jax.random.PRNGKey(7), vocab_map), dcfg)


@pytest.mark.parametrize("case", CASES)
def test_export_matches_apples_files_and_round_trips_bit_for_bit(tmp_path, case):
    ours = our_drafter(case)
    save_apple_drafter(str(tmp_path / "apple"), ours)
    golden = os.path.join(GOLDEN, case)
    assert sorted(os.listdir(tmp_path / "apple")) == ["config.json", "model.safetensors"]
    assert json.load(open(tmp_path / "apple" / "config.json")) == json.load(open(os.path.join(golden, "config.json")))
    mine = load_file(tmp_path / "apple" / "model.safetensors")
    theirs = load_file(os.path.join(golden, "model.safetensors"))
    assert {k: (v.shape, v.dtype) for k, v in mine.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    with safe_open(tmp_path / "apple" / "model.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt"}
    back = load_drafter(str(tmp_path / "apple"))
    assert back.config == dataclasses.replace(ours.config, apple_warp=True, exit_dim=back.config.exit_dim)
    assert back.config.exit == ours.config.exit
    for a, b in zip(jax.tree_util.tree_leaves(ours.params), jax.tree_util.tree_leaves(back.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_drafters_without_an_apple_equivalent_are_refused(tmp_path):
    with pytest.raises(ValueError, match="reduced draft vocabulary .* full vocabulary"):
        save_apple_drafter(str(tmp_path / "a"), our_drafter("case0", jnp.arange(16), draft_vocab_size=16))
    dcfg = DrafterConfig(hidden_size=16, vocab_size=300, exit_dim=16, share_lm_head=True)
    with pytest.raises(ValueError, match="target's LM head"):
        save_apple_drafter(str(tmp_path / "b"), Drafter(init_drafter(dcfg, jax.random.PRNGKey(0)), dcfg))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def edited_copy(tmp_path, config=None, tensors=None):
    """case1 (with input_proj) copied and edited: config keys updated, tensors edited by a function."""
    path = tmp_path / "edited"
    shutil.copytree(os.path.join(GOLDEN, "case1"), path)
    if config:
        conf = json.load(open(path / "config.json"))
        (path / "config.json").write_text(json.dumps(conf | config))
    if tensors:
        t = load_file(path / "model.safetensors")
        tensors(t)
        save_file(t, path / "model.safetensors", metadata={"format": "pt"})
    return str(path)


TARGET = ModelConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                     num_kv_heads=2, head_dim=8, max_position_embeddings=64)


@pytest.mark.parametrize("config,tensors,target,match", [
    (None, lambda t: t.pop("input_proj.bias"), None, "missing input_proj.bias"),
    (None, lambda t: t.update(extra=np.zeros(3, np.float32)), None, "unexpected extra"),
    (None, lambda t: t.update({"lm_head.0.linear.weight": np.zeros((24, 23), np.float32)}), None,
     r"tensor lm_head.0.linear.weight has shape \(24, 23\), expected \(24, 24\)"),
    ({"model_type": "medusa"}, None, None, "model_type 'medusa' is not an Apple ReDrafter drafter"),
    ({"rnn": True}, None, None, "missing rnn_u.bias, rnn_u.weight, rnn_w.weight"),
    (None, None, dataclasses.replace(TARGET, hidden_size=32, head_dim=16),
     "hidden size 16 does not match the target's 32"),
    (None, None, dataclasses.replace(TARGET, vocab_size=301), "vocabulary 300 does not match the target's 301"),
])
def test_bad_apple_checkpoints_raise_naming_the_problem(tmp_path, config, tensors, target, match):
    with pytest.raises(ValueError, match=match):
        load_drafter(edited_copy(tmp_path, config, tensors), target)


def test_an_apple_checkpoint_cut_short_is_named(tmp_path):
    path = edited_copy(tmp_path, None, None)
    os.truncate(os.path.join(path, "model.safetensors"), 1000)  # an interrupted copy
    with pytest.raises(ValueError, match=r"cannot read safetensors file .*model.safetensors \(cut short"):
        load_drafter(path, TARGET)


def test_convert_command_round_trips_apples_files(tmp_path):
    def convert(*args):
        proc = subprocess.run([sys.executable, "-m", "infer.convert", *map(str, args)], cwd=ROOT, capture_output=True,
                              text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert proc.returncode == 0, proc.stderr
    convert("apple-to-orbax", os.path.join(GOLDEN, "case0"), tmp_path / "ours")
    convert("orbax-to-apple", tmp_path / "ours", tmp_path / "back")
    golden = os.path.join(GOLDEN, "case0")
    a, b = load_file(os.path.join(golden, "model.safetensors")), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.load(open(tmp_path / "back" / "config.json")) == json.load(open(os.path.join(golden, "config.json")))
