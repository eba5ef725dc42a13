"""The MT-Bench benchmark script: its question set, and a whole run on a small prompt file."""

import json
import os

import jax
import jax.numpy as jnp
import pytest

from infer.mtbench import load_prompts, main
from infer.report import BENCHMARKS_MD
from redrafter_jax.checkpoint import save_drafter
from redrafter_jax.config import DrafterConfig
from redrafter_jax.drafter import Drafter, init_drafter

DRAFTER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "drafters", "smollm2-135m")


@pytest.mark.slow  # downloads a data set
def test_mt_bench_has_80_first_turn_questions():
    prompts = load_prompts(None)
    assert len(prompts) == 80 and all(isinstance(p, str) and len(p) > 10 for p in prompts)


def test_run_on_a_prompt_file_compares_drafters_with_identical_outputs(tmp_path, smollm_path, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Name three primary colors."}) + "\n"
                       + json.dumps({"turns": ["What is 2 + 2?", "And 3 + 3?"]}) + "\n")
    # a second drafter of another shape: untrained, projected to 64, a 256-token draft vocabulary
    dcfg = DrafterConfig(hidden_size=576, vocab_size=49152, exit_dim=64, draft_vocab_size=256)
    other = str(tmp_path / "other")
    save_drafter(other, Drafter(init_drafter(dcfg, jax.random.PRNGKey(1), jnp.arange(256) * 7), dcfg))
    published = open(BENCHMARKS_MD, "rb").read()
    monkeypatch.chdir(tmp_path)  # a run without --docs writes to ./runs/benchmarks, never to docs/
    main(["--gguf", smollm_path, "--drafter", DRAFTER, other, "--prompts", str(prompts), "--max-new-tokens", "10",
          "--sweep", "2x3:4", "0x4+2", "--section", "small", "--title", "Small run"])
    assert open(BENCHMARKS_MD, "rb").read() == published
    report = tmp_path / "runs" / "benchmarks" / "benchmarks.md"
    text = report.read_text()
    assert "<!-- small:begin -->" in text and "## Small run" in text and "2 prompts" in text
    rows = [line.split(" | ") for line in text.splitlines()
            if line.startswith((f"| {DRAFTER}", f"| {other}", "| none (lookup only)"))]
    assert [(r[0].strip("| "), r[1], r[2], r[3]) for r in rows] == [
        (d, "2x3", "0", "4") for d in (DRAFTER, other)] + [
        ("none (lookup only)", "0x4", "2", "7")]
    assert all(r[-1].rstrip(" |") == "2/2" for r in rows), rows
    assert (report.parent / "small.png").exists()
