"""The device check (what a GPU user runs as is) at a tiny size on the CPU, on a checkpoint written here."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import device_check
from redrafter_jax import rows_matmul
from redrafter_jax.checkpoint import save_drafter
from redrafter_jax.config import DrafterConfig
from redrafter_jax.drafter import Drafter, init_drafter
from tests.test_loaders import hf_tensors, write_checkpoint
from tests.tiny import causal_logits


def test_device_check_runs_every_part_and_writes_its_report(tmp_path):
    model = tmp_path / "model"
    write_checkpoint(model, "llama", hf_tensors("llama", np.random.default_rng(0)), max_position_embeddings=1024)
    drafter = str(tmp_path / "drafter")  # untrained, for the checkpoint's hidden size and vocabulary
    dcfg = DrafterConfig(hidden_size=32, vocab_size=64, num_resblocks=1)
    save_drafter(drafter, Drafter(init_drafter(dcfg, jax.random.PRNGKey(0)), dcfg))
    report = tmp_path / "bench.md"
    device_check.main(["--tiny", "--hf", str(model), "--drafter", drafter, "--minutes", "20", "--report", str(report)])
    found = json.loads((tmp_path / "device_check.json").read_text())
    assert found["device"] and found["skipped"] == [] and found["failed"] == [] and "stopped_during" not in found
    # batch, prompt, new tokens, ours, ours with XLA's products (where the CPU rows kernel runs), transformers, ratio
    columns = 7 if rows_matmul.available() else 6
    assert [r[0] for r in found["autoregressive"]] == [1] and len(found["autoregressive"][0]) == columns
    assert [r[0] for r in found["verification"]] == [1, 4] and found["verification"][0][2] == 1
    parts = {tuple(r[:3]): r[3:] for r in found["step_parts"]}  # weights, decoding, part: ms, ops per step, cost
    for dtype in ("float32", "bfloat16"):
        assert [p for w, d, p in parts if (w, d) == (dtype, "1x3+1")] == [
            "propose", "pack", "verify", "accept", "commit", "the rest", "whole step"]
        assert all(parts[dtype, "1x3+1", p][0] > 0 and parts[dtype, "1x3+1", p][1] >= 1
                   for p in ("propose", "verify", "accept"))
        assert parts[dtype, "autoregressive", "whole step"][2] == 1
    # oracle and drafter rows in both dtypes, in a batch of 2, then the drafter with continuous batching (2
    # prompts in 1 row; the oracle follows rows, not prompts); greedy outputs identical everywhere
    assert [tuple(r[:3]) for r in found["mtbench"]] == [
        ("float32", "1", "oracle"), ("float32", "1", drafter), ("bfloat16", "1", "oracle"),
        ("bfloat16", "1", drafter), ("float32", "2", "oracle"), ("float32", "2", drafter),
        ("float32", "2/1", drafter)]
    for dtype, batch, name, spec, tokens_per_step, busy, _, _, same in found["mtbench"]:
        assert same == "2/2", (dtype, batch, name, spec, same)
        if name == "oracle":  # everything accepted: L tokens per step up to the reply's end
            assert 2.5 < tokens_per_step <= 3, (dtype, spec, tokens_per_step)
        assert busy == 1 if batch in ("1", "2/1") else 0.5 <= busy <= 1
    # all the oracle's drafts accepted, its 33 nodes verified in 33 and 48 slots: 4 tokens after the root a
    # step (8 x 5), then the bonus, up to 12 tokens
    assert [r[:3] + r[5:] for r in found["paper_scale"]["oracle"]] == [["8x5", 33, 4, "yes"], ["8x5/16", 48, 4, "yes"]]
    # ours and transformers' generate on the same prompts, each against transformers' autoregressive decoding
    cross = {r[0]: r[1:] for r in found["transformers"]}
    assert list(cross) == ["ours, autoregressive", "ours, 4x3+1x8:7", "transformers, autoregressive",
                           "transformers, prompt lookup of 10"]
    assert cross["transformers, autoregressive"][:1] + cross["transformers, autoregressive"][2:] == [
        1, 1, "(the reference)"]
    assert all(r[1] > 0 and r[3].startswith(("2/2", "1/2", "0/2")) for name, r in cross.items()
               if name != "transformers, autoregressive")
    # once the budget is spent, the comparison stops after the prompt it decoded (here without a drafter)
    from infer.benchmark import load_transformers
    from redrafter_jax.loaders.hf import load_hf

    rows, n = device_check.transformers_rows(load_hf(str(model)), load_transformers("cpu", str(model)),
                                             device_check.TINY, None, budget=lambda: 0)
    assert n == 1 and [r[0] for r in rows][1] == "ours, 0x8+1" and rows[2][-1] == "(the reference)"
    assert all(r[-1].split(" ")[0].endswith("/1") for r in rows[:2] + rows[3:])  # identical outputs of 1 prompt
    text = report.read_text()
    assert "## Device check: cpu" in text and "Paper scale" in text and (tmp_path / "device_check.png").exists()
    assert "Stopped during" not in text


def test_a_run_killed_midway_keeps_the_finished_parts_and_rows(tmp_path, monkeypatch):
    """A rented machine's time limit kills the process (no exception it could catch): the report, written
    before each part and after each of a long part's rows, keeps what finished and names the part that
    was running."""
    model = tmp_path / "model"
    write_checkpoint(model, "llama", hf_tensors("llama", np.random.default_rng(0)), max_position_embeddings=1024)
    step_parts, profiled = device_check.step_parts, []

    def killed_in_bfloat16(*args):  # step parts: float32 profiled, then killed during bfloat16
        if profiled:
            raise KeyboardInterrupt  # a BaseException, which part() does not catch: the run ends here, as if killed
        profiled.append(step_parts(*args))
        return profiled[0]

    monkeypatch.setattr(device_check, "step_parts", killed_in_bfloat16)
    with pytest.raises(KeyboardInterrupt):
        device_check.main(["--tiny", "--hf", str(model), "--minutes", "20", "--report", str(tmp_path / "bench.md")])
    found = json.loads((tmp_path / "device_check.json").read_text())
    assert found["stopped_during"] == ["step parts"] and found["failed"] == []
    assert [r[0] for r in found["verification"]] == [1, 4]
    assert found["step_parts"] == profiled[0] and {r[0] for r in profiled[0]} == {"float32"}
    text = (tmp_path / "bench.md").read_text()
    assert "Verification: one forward" in text and "Decode steps part by part" in text
    assert "Stopped during the part 'step parts': its run was killed there (its rows above are those it" in text
    # the next call redoes that part alone and keeps the parts the killed run finished
    monkeypatch.undo()
    device_check.main(["--tiny", "--hf", str(model), "--parts", "3", "--report", str(tmp_path / "bench.md")])
    again = json.loads((tmp_path / "device_check.json").read_text())
    assert again["verification"] == found["verification"] and again["autoregressive"] == found["autoregressive"]
    assert again["step_parts"] and "stopped_during" not in again
    text = (tmp_path / "bench.md").read_text()
    assert "Stopped during" not in text and "Decode steps part by part" in text
    assert "Not run yet (`--parts`): 4. MT-Bench end to end, 5. paper scale, 6. MT-Bench in batches, 7." in text


def test_a_check_split_over_several_runs_keeps_each_runs_parts(tmp_path):
    """--parts: each run redoes its parts and keeps the others from the JSON of the same check (device,
    model, size); the report names the command behind each part."""
    model = tmp_path / "model"
    write_checkpoint(model, "llama", hf_tensors("llama", np.random.default_rng(0)), max_position_embeddings=1024)
    report, found = tmp_path / "bench.md", lambda: json.loads((tmp_path / "device_check.json").read_text())

    def check(*args, hf=model):
        device_check.main(["--tiny", "--hf", str(hf), "--report", str(report), *args])
        return found(), report.read_text()

    first, text = check("--parts", "2")
    assert [r[0] for r in first["verification"]] == [1, 4] and "paper_scale" not in first
    assert "Command: `python -m infer.device_check --tiny" in text
    assert "Not run yet (`--parts`): 1. autoregressive vs transformers, 3. step parts, 4." in text
    both, text = check("--parts", "5", "--minutes", "7")
    assert both["verification"] == first["verification"] and both["paper_scale"]["oracle"][0][5] == "yes"
    assert [(e["part"], e["status"]) for e in both["parts"]] == [(2, "done"), (5, "done")]
    assert "Machine: CPU" in text and "--parts 2` (budget 8 minutes, compilation included; part 2)" in text
    assert "--parts 5 --minutes 7` (budget 7 minutes, compilation included; part 5)" in text
    assert text.index("Verification: one forward") < text.index("Paper scale")
    # a part redone but skipped for time loses its earlier result; the others stay
    late, text = check("--parts", "2", "--minutes", "1e-9")
    assert late["skipped"] == ["verification cost"] and "verification" not in late and late["paper_scale"]
    assert "Skipped for the time budget: verification cost." in text
    # another model's check starts afresh
    (tmp_path / "other").symlink_to(model, target_is_directory=True)
    other, _ = check("--parts", "2", "--minutes", "1e-9", hf=tmp_path / "other")
    assert [e["part"] for e in other["parts"]] == [2] and "paper_scale" not in other
    # a file that is not the check's JSON is named, not overwritten
    (tmp_path / "device_check.json").write_text("{not json")
    with pytest.raises(ValueError, match="device_check.json is not a device check's JSON"):
        check("--parts", "2")
    assert (tmp_path / "device_check.json").read_text() == "{not json"


@pytest.mark.parametrize("parts", ["0", "8", "x", "3-1", "1,", "2-9"])
def test_device_check_refuses_unknown_parts(tmp_path, parts):
    with pytest.raises(ValueError, match="--parts: expected part numbers 1-7"):
        device_check.main(["--tiny", "--parts", parts, "--report", str(tmp_path / "b.md")])


def test_parts_past_the_budget_are_skipped_and_named(tmp_path):
    model = tmp_path / "model"
    write_checkpoint(model, "llama", hf_tensors("llama", np.random.default_rng(0)), max_position_embeddings=1024)
    device_check.main(["--tiny", "--hf", str(model), "--minutes", "1e-9", "--report", str(tmp_path / "bench.md")])
    found = json.loads((tmp_path / "device_check.json").read_text())
    assert found["skipped"] == ["autoregressive vs transformers", "verification cost", "step parts",
                                "MT-Bench end to end", "paper scale", "MT-Bench in batches of 2",
                                "MT-Bench in batches of 2/1", "MT-Bench against transformers"]
    assert "Skipped for the time budget: autoregressive vs transformers" in (tmp_path / "bench.md").read_text()


def test_a_bad_drafter_is_refused_before_any_part_runs(tmp_path):
    model = tmp_path / "model"  # its weights unreadable: the drafters are checked before they load
    write_checkpoint(model, "llama", hf_tensors("llama", np.random.default_rng(0)), sharded=True,
                     max_position_embeddings=1024)
    (model / "model-00002-of-00002.safetensors").unlink()
    other = str(tmp_path / "drafter")  # a drafter for another target (hidden size 48, not 32)
    dcfg = DrafterConfig(hidden_size=48, vocab_size=64, num_resblocks=1)
    save_drafter(other, Drafter(init_drafter(dcfg, jax.random.PRNGKey(0)), dcfg))
    for drafter, match in [(other, "drafter hidden size 48 does not match the target's 32"),
                           (str(tmp_path / "none"), "not a drafter checkpoint")]:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            device_check.main(["--tiny", "--hf", str(model), "--drafter", drafter, "--report", str(tmp_path / "b.md")])
    assert not (tmp_path / "device_check.json").exists()  # no part ran


def test_device_check_refuses_a_bad_budget(tmp_path):
    with pytest.raises(ValueError, match="--minutes must be positive"):
        device_check.main(["--tiny", "--minutes", "0", "--report", str(tmp_path / "b.md")])


def test_the_synthetic_target_is_decisive():
    """At a Llama-7B-like width, its greedy next token follows from the current token alone, by a margin that
    bfloat16 rounding cannot flip: the embedding outweighs what the layers add to the residual stream."""
    cfg = dataclasses.replace(device_check.LLAMA_7B, hidden_size=1024, intermediate_size=2752, num_layers=4,
                              num_heads=8, num_kv_heads=8)
    params = device_check.decisive_params(cfg, jax.random.PRNGKey(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 64))
    logits = np.asarray(causal_logits(params, cfg, jnp.asarray(tokens))[0], np.float32)
    best = np.argsort(logits, axis=-1)[:, -2:]
    head, embed = np.asarray(params["lm_head"], np.float32), np.asarray(params["embed"], np.float32)
    np.testing.assert_allclose(head[:, best[:, 1]].T * 1e4, embed[tokens[0]], rtol=1e-2)  # its successor
    gaps = np.take_along_axis(logits, best[:, 1:], -1) - np.take_along_axis(logits, best[:, :1], -1)
    assert gaps.min() > 0.5 * logits.max(-1).min()


def test_the_machine_line_names_the_xla_flags(monkeypatch):
    """Flags change the compiled programs (e.g. CUDA graphs of the decode loop on a GPU): a report names them."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=WHILE")
    assert device_check.machine().endswith(", XLA_FLAGS `--xla_gpu_enable_command_buffer=WHILE`")
    monkeypatch.setenv("XLA_FLAGS", " ")
    assert "XLA_FLAGS" not in device_check.machine()
