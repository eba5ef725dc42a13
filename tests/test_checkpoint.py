"""Drafter checkpoints: round trip, atomic replacement, portability across devices, clear errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from redrafter_jax.checkpoint import load_drafter, save_drafter
from redrafter_jax.config import DrafterConfig
from redrafter_jax.drafter import Drafter, init_drafter
from tests.tiny import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make(seed=0, **kw):
    dcfg = DrafterConfig(hidden_size=TINY.hidden_size, vocab_size=TINY.vocab_size, **kw)
    vmap = np.arange(dcfg.draft_vocab_size, dtype=np.int32) if dcfg.draft_vocab_size else None
    return Drafter(init_drafter(dcfg, jax.random.PRNGKey(seed), vmap), dcfg)


def assert_same_params(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def snapshot(folder) -> dict:
    """Every file under folder (relative path -> bytes)."""
    return {os.path.relpath(os.path.join(p, n), folder): open(os.path.join(p, n), "rb").read()
            for p, _, files in os.walk(folder) for n in files}


@pytest.mark.parametrize("kw", [{}, {"draft_vocab_size": 16, "exit_dim": 24, "rnn": False}])
def test_round_trip(tmp_path, kw):
    d = make(**kw)
    save_drafter(str(tmp_path / "d"), d, extra={"note": "test"})
    back = load_drafter(str(tmp_path / "d"), TINY)
    assert back.config == d.config
    assert_same_params(d, back)


def test_replaces_an_earlier_drafter_whole_and_leaves_no_temporaries(tmp_path):
    save_drafter(str(tmp_path / "d"), make(0))
    save_drafter(str(tmp_path / "d"), make(1))
    assert_same_params(load_drafter(str(tmp_path / "d")), make(1))
    assert os.listdir(tmp_path) == ["d"]


def test_never_replaces_a_folder_that_holds_anything_else(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.md").write_text("results")
    save_drafter(str(work / "d"), make(0))
    (work / "d" / "TRAINING.md").write_text("how it was made")  # a published drafter with its notes
    before = snapshot(tmp_path)
    for target in [work, work / "d", work / "notes.md"]:
        with pytest.raises(FileExistsError, match=str(target)):
            save_drafter(str(target), make(1))
    monkeypatch.chdir(work)
    with pytest.raises(FileExistsError, match="refusing to replace"):
        save_drafter(".", make(1))
    assert snapshot(tmp_path) == before
    save_drafter(str(work / "d"), make(1), overwrite=True)
    assert_same_params(load_drafter(str(work / "d")), make(1))


SAVE_ON_DEVICE = """
import sys, jax
from redrafter_jax.checkpoint import save_drafter
from tests.test_checkpoint import make
d = make(3, draft_vocab_size=16)
save_drafter(sys.argv[1], d.replace(params=jax.device_put(d.params, jax.devices()[int(sys.argv[2])])))
"""
LOAD_ON_DEVICE = """
import sys, jax, numpy as np
from redrafter_jax.checkpoint import load_drafter
device = jax.devices()[int(sys.argv[2])]
d = load_drafter(sys.argv[1], sharding=jax.sharding.SingleDeviceSharding(device))
assert all(x.devices() == {device} for x in jax.tree_util.tree_leaves(d.params))
np.savez(sys.argv[3], *[np.asarray(x) for x in jax.tree_util.tree_leaves(d.params)])
"""


def run_with_devices(script, n_devices, *args):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("save_devices,save_on,load_devices,load_on", [(8, 7, 1, 0), (1, 0, 8, 7)])
def test_loads_on_another_device_count_than_it_was_saved_on(tmp_path, save_devices, save_on, load_devices, load_on):
    run_with_devices(SAVE_ON_DEVICE, save_devices, tmp_path / "d", save_on)
    run_with_devices(LOAD_ON_DEVICE, load_devices, tmp_path / "d", load_on, tmp_path / "params.npz")
    with np.load(tmp_path / "params.npz") as z:
        loaded = [z[f"arr_{i}"] for i in range(len(z.files))]
    expected = [np.asarray(x) for x in jax.tree_util.tree_leaves(make(3, draft_vocab_size=16).params)]
    assert len(loaded) == len(expected)
    for a, b in zip(loaded, expected):
        np.testing.assert_array_equal(a, b)


def test_wrong_target_raises(tmp_path):
    import dataclasses

    save_drafter(str(tmp_path / "d"), make())
    with pytest.raises(ValueError, match="hidden size 32 does not match the target's 64"):
        load_drafter(str(tmp_path / "d"), dataclasses.replace(TINY, hidden_size=64, head_dim=16))
    with pytest.raises(FileNotFoundError, match="not a drafter checkpoint"):
        load_drafter(str(tmp_path / "nothing"))


@pytest.mark.parametrize("edit,match", [
    ({"exit_dim": 16}, r"parameter \['lm_head'\] is stored with shape \(64, 64\), the config needs \(16, 64\)"),
    ({"exit_dim": 80}, r"parameter \['lm_head'\] is stored with shape \(64, 64\), the config needs \(80, 64\)"),
    ({"draft_vocab_size": 16}, r"parameter \['lm_head'\] is stored with shape \(64, 64\), the config needs \(64, 16\)"),
    ({"num_resblocks": 3}, r"parameter \['resblocks'\]\[2\]\['b'\] is stored with shape absent"),
    ({"rnn": False}, r"parameter \['rnn_b'\] is stored with shape \(32,\), the config needs none"),
])
def test_config_that_does_not_match_the_params_raises(tmp_path, edit, match):
    save_drafter(str(tmp_path / "d"), make())
    path = tmp_path / "d" / "drafter_config.json"
    meta = json.loads(path.read_text())
    meta["config"].update(edit)
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match):
        load_drafter(str(tmp_path / "d"))


def largest_param_file(folder):
    files = [os.path.join(p, n) for p, _, fs in os.walk(folder / "params") for n in fs]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage,match", [
    (lambda f: open(f, "r+b").write(bytes(64)), "corrupt: params/.* does not match its recorded sha256"),
    (lambda f: os.truncate(f, os.path.getsize(f) // 2), "corrupt: params/.* does not match its recorded sha256"),
    (os.remove, "incomplete: params/.* is missing"),
])
def test_damaged_parameter_files_raise(tmp_path, damage, match):
    save_drafter(str(tmp_path / "d"), make())
    damage(largest_param_file(tmp_path / "d"))
    with pytest.raises(ValueError, match=match):
        load_drafter(str(tmp_path / "d"))
