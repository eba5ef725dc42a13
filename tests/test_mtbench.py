"""The MT-Bench benchmark script: its question set, and a whole run on a small prompt file."""

import json
import os

from infer.mtbench import load_prompts, main, parse_spec

DRAFTER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "drafters", "smollm2-135m")


def test_mt_bench_has_80_first_turn_questions():
    prompts = load_prompts(None)
    assert len(prompts) == 80 and all(isinstance(p, str) and len(p) > 10 for p in prompts)


def test_sweep_settings_parse_with_and_without_budget():
    assert (parse_spec("4x5:12").beam_width, parse_spec("4x5:12").beam_length, parse_spec("4x5:12").budget) == (4, 5, 12)
    assert parse_spec("2x3").budget == 1 + 2 * 2


def test_run_on_a_prompt_file_reports_identical_outputs(tmp_path, smollm_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Name three primary colors."}) + "\n"
                       + json.dumps({"turns": ["What is 2 + 2?", "And 3 + 3?"]}) + "\n")
    report = tmp_path / "bench.md"
    main(["--gguf", smollm_path, "--drafter", DRAFTER, "--prompts", str(prompts), "--max-new-tokens", "10",
          "--sweep", "1x3", "2x3:4", "--section", "small", "--report", str(report)])
    text = report.read_text()
    assert "<!-- small:begin -->" in text and "2 prompts" in text
    rows = [line for line in text.splitlines() if line.startswith("| 1x3") or line.startswith("| 2x3")]
    assert len(rows) == 2 and all(line.rstrip(" |").endswith("2/2") for line in rows), rows
    assert (tmp_path / "small.png").exists()
