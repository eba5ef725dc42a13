"""The MT-Bench benchmark script: its question set, and a whole run on a small prompt file."""

import argparse
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer.mtbench import (
    Batching,
    Decoded,
    joined,
    load_conversations,
    load_prompts,
    main,
    rate_after,
    second_turn_prompts,
)
from infer.report import BENCHMARKS_MD
from redrafter_jax import datastore
from redrafter_jax.checkpoint import load_drafter, save_drafter
from redrafter_jax.cli import DEFAULT_DRAFTER
from redrafter_jax.config import DrafterConfig
from redrafter_jax.datasets import Chat
from redrafter_jax.drafter import Drafter, init_drafter
from redrafter_jax.generate import generate


@pytest.mark.slow  # downloads a data set
def test_mt_bench_has_80_questions_of_two_turns():
    conversations = load_conversations(None)
    assert len(conversations) == 80 and all(len(c.messages) == len(c.user_turns()) == 2 for c in conversations)
    assert all(isinstance(t, str) and len(t) > 10 for c in conversations for t in c.user_turns())
    assert load_prompts(None) == [[{"role": "user", "content": c.user_turns()[0]}] for c in conversations]


def user(*turns):
    return [{"role": "user", "content": t} for t in turns]


def test_second_turns_follow_the_targets_own_greedy_first_reply(smollm):
    system = [{"role": "system", "content": "You are a poet."}]  # kept before each turn
    conversations = [Chat("1", user("Name three primary colors.", "Now name three more.")),
                     Chat("2", system + user("Write a haiku about the sea.",
                                             "Rewrite it, starting every line with the letter A."))]
    tok = smollm.tokenizer
    want = []  # each conversation's second prompt after the target's autoregressive greedy reply
    for c, opening in zip(conversations, [[], system]):
        first, second = c.user_turns()
        chat = opening + [{"role": "user", "content": first}]
        out = generate(smollm.params, smollm.config, [tok.encode_chat(chat)], max_new_tokens=24)
        reply = tok.decode(out.tokens[0, :out.lengths[0]])
        assert len(reply) > 20
        want.append(tok.encode_chat([*chat, {"role": "assistant", "content": reply},
                                     {"role": "user", "content": second}]))
    for drafter in [None, DEFAULT_DRAFTER]:  # the first replies decoded with lookup beams alone, or the drafter
        proposer = drafter and load_drafter(drafter, smollm.config)
        prompts, caches = second_turn_prompts(smollm, conversations, 24, proposer)
        assert caches is None  # kept only when asked for
        assert prompts == want


def test_rows_busy_is_the_share_of_the_rows_steps_spent_on_a_prompt():
    steps = lambda *n: [np.zeros(k, np.int32) for k in n]  # noqa: E731  prompts' accepted tokens per own step
    assert Decoded([], 0.0, steps(5), 5).rows_busy == 1  # one row is always busy
    # batch 2 takes 3 steps (4 of 6 row steps), then batch 1 takes 2 (2 of 2)
    assert joined([Decoded([], 0.0, steps(3, 1), 2 * 3), Decoded([], 0.0, steps(2), 2)]).rows_busy == 6 / 8


def test_rate_after_prefill_leaves_out_the_prefill_and_its_token():
    d = Decoded([[1] * 11, [2] * 6], 2.5, [], 0)  # 17 tokens in 2.5 s, of which 0.5 s prefilled the 2 prompts
    assert rate_after(d, 0.5) == 15 / 2.0
    assert np.isnan(rate_after(d, 2.5))  # nothing left to decode in: no rate


def test_batched_run_on_a_prompt_file_compares_drafters_with_identical_outputs(tmp_path, smollm_path, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Name three primary colors."}) + "\n"
                       + json.dumps({"turns": ["What is 2 + 2?", "And 3 + 3?"]}) + "\n")
    # a second drafter of another shape: untrained, projected to 64, a 256-token draft vocabulary
    dcfg = DrafterConfig(hidden_size=576, vocab_size=49152, exit_dim=64, draft_vocab_size=256)
    other = str(tmp_path / "other")
    save_drafter(other, Drafter(init_drafter(dcfg, jax.random.PRNGKey(1), jnp.arange(256) * 7), dcfg))
    published = open(BENCHMARKS_MD, "rb").read()
    monkeypatch.chdir(tmp_path)  # a run without --docs writes to ./runs/benchmarks, never to docs/
    main(["--gguf", smollm_path, "--drafter", DEFAULT_DRAFTER, other, "--prompts", str(prompts),
          "--max-new-tokens", "10", "--sweep", "2x3:4", "0x4+2/4", "--batch-sizes", "2", "--section", "small",
          "--title", "Small run"])
    assert open(BENCHMARKS_MD, "rb").read() == published
    report = tmp_path / "runs" / "benchmarks" / "benchmarks.md"
    text = report.read_text()
    assert "<!-- small:begin -->" in text and "## Small run" in text and "2 prompts" in text and "batch 2," in text
    assert f"Command: `python -m infer.mtbench --gguf {smollm_path} --drafter" in text  # the arguments given
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| 2 | ")]
    assert [tuple(r[1:5]) for r in rows] == [
        (d, "2x3", "0", "4") for d in (DEFAULT_DRAFTER, other)] + [
        ("none", "0x4", "2", "7 in 8")]  # 0x4+2/4: its 7 nodes in a forward of 8 tokens
    assert "N in M: N nodes verified in a forward of M tokens" in text
    assert all(r[-1].rstrip(" |") == "2/2" for r in rows), rows
    assert all(0.5 <= float(r[6]) <= 1 for r in rows), rows  # rows busy: each of 2 rows decodes to its own end
    assert (report.parent / "small.png").exists()


def test_sampled_run_has_its_own_reference_per_temperature(tmp_path, smollm_path, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    later = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."},
             {"role": "user", "content": "Repeat: red, green, blue, red, green, blue."}]  # (decoded as it stands)
    prompts.write_text(json.dumps({"prompt": "Count from one to ten."}) + "\n" + json.dumps({"messages": later}) + "\n")
    monkeypatch.chdir(tmp_path)
    main(["--gguf", smollm_path, "--prompts", str(prompts), "--max-new-tokens", "12", "--sweep", "0x4+2",
          "--temperatures", "0", "0.8", "--section", "sampled"])
    text = (tmp_path / "runs" / "benchmarks" / "benchmarks.md").read_text()
    assert f"2 prompts ({prompts} user turns, 1 of them later turns in context)" in text
    assert "sampling at temperature 0 (greedy), 0.8" in text
    rows = [[c.strip() for c in line.strip("| ").split(" | ")] for line in text.splitlines()
            if line.startswith(("| 0 |", "| 0.8 |"))]
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [("0", "none", "0x4", "2"),
                                                       ("0.8", "none", "0x4", "2")]
    assert rows[0][-1] == "2/2" and rows[1][-1] == "sampled"
    for r in rows:  # tokens/step at least the bonus token, and a rate and speedup measured
        assert float(r[5]) >= 1 and float(r[6]) > 0 and float(r[7]) > 0 and float(r[8]) > 0


def test_datastore_run_has_its_column_and_needs_its_file(tmp_path, smollm, smollm_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.jsonl"
    questions = ["Count from one to ten.", "Name three primary colors."]
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    chats = [smollm.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in questions]
    out = generate(smollm.params, smollm.config, chats, max_new_tokens=12)
    seqs = [(np.r_[c, out.tokens[i, : out.lengths[i]]], np.r_[np.zeros(len(c)), np.ones(int(out.lengths[i]))])
            for i, c in enumerate(chats)]  # the target's own replies: the datastore beams copy them
    datastore.save(datastore.build(seqs, seqs), tmp_path / "ds.npz")
    monkeypatch.chdir(tmp_path)
    run = ["--gguf", smollm_path, "--prompts", str(prompts), "--max-new-tokens", "12", "--sweep", "0x8+1+1x8ds:7",
           "--section", "datastore"]
    main(run + ["--datastore", str(tmp_path / "ds.npz")])
    text = (tmp_path / "runs" / "benchmarks" / "benchmarks.md").read_text()
    assert "| lookup beams | datastore beams | tree slots |" in text
    assert f"last 2..6 tokens (longest match first) in the datastore {tmp_path / 'ds.npz'} (" in text
    row = [[c.strip() for c in line.strip("| ").split(" | ")] for line in text.splitlines()
           if line.startswith("| none |")][0]
    assert row[1:5] == ["0x8", "1", "1x8", "7"] and float(row[5]) > 3 and row[-1] == "2/2", row
    with pytest.raises(SystemExit):
        main(run)
    assert "settings with datastore beams (+DxL''ds) need --datastore" in capsys.readouterr().err


def test_transformers_reference_decodes_in_turn_with_ours(tmp_path, smollm_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in
                               ["Repeat exactly: red, green, blue, red, green, blue, red, green, blue.",
                                "Count from one to ten."]))
    monkeypatch.chdir(tmp_path)
    run = ["--gguf", smollm_path, "--prompts", str(prompts), "--max-new-tokens", "24", "--sweep", "0x8+1",
           "--section", "transformers"]
    main(run + ["--transformers", "4"])
    text = (tmp_path / "runs" / "benchmarks" / "benchmarks.md").read_text()
    assert "Against transformers: transformers " in text and "(`prompt_lookup_num_tokens=N`" in text
    rows = {r[0]: r[1:] for r in ([c.strip() for c in line.strip("| ").split(" | ")] for line in text.splitlines()
                                  if line.startswith(("| ours, ", "| transformers, ")))}
    assert list(rows) == ["ours, autoregressive", "ours, 0x8+1:8", "transformers, autoregressive",
                          "transformers, prompt lookup of 4"]
    # the same model in both: the same greedy outputs, whoever decodes them and however
    assert [r[-1] for r in rows.values()] == ["2/2", "2/2", "(the reference)", "2/2"]
    assert float(rows["transformers, autoregressive"][0]) == 1  # one token per forward, the prefill's included
    assert float(rows["transformers, prompt lookup of 4"][0]) > 1.2  # the repeated colours are copied
    assert float(rows["ours, 0x8+1:8"][0]) > 1.2
    assert float(rows["transformers, autoregressive"][2]) == 1 and float(rows["ours, autoregressive"][2]) > 0
    for bad, why in ((["--transformers", "0"], "argument --transformers: must be at least 1, got 0"),
                     (["--transformers", "--temperatures", "0.8"], "greedy")):
        with pytest.raises(SystemExit):
            main(run + bad)
        assert why in capsys.readouterr().err


@pytest.mark.parametrize("text", ["0", "4/4", "4/0", "8x2", "3/"])
def test_bad_batch_sizes_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected B or N/R"):
        Batching.parse(text)


def test_bad_settings_are_refused_before_the_model_loads(tmp_path, capsys):
    absent = ["--gguf", str(tmp_path / "absent.gguf"), "--limit", "1"]  # loading it would fail: these come first
    for bad, message in [(["--sweep", "4x3"], "settings with W > 0 need --drafter"),
                         (["--sweep", "0x8+1+1x8ds"], "settings with datastore beams (+DxL''ds) need --datastore"),
                         (["--reuse-cache", "--turn", "2", "--batch-sizes", "2"],
                          "--reuse-cache decodes one prompt at a time")]:
        with pytest.raises(SystemExit):
            main(absent + bad)
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="bad speculative setting '4x'"):
        main(absent + ["--sweep", "4x"])
    with pytest.raises(ValueError, match="temperature must be 0"):
        main(absent + ["--sweep", "0x8+1", "--temperatures", "0", "-0.5"])


def test_continuous_batching_run_reports_identical_outputs_and_busy_rows(tmp_path, smollm_path, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in
                               ["Name three primary colors.", "What is 2 + 2?", "Say hello in French."]))
    monkeypatch.chdir(tmp_path)
    main(["--gguf", smollm_path, "--prompts", str(prompts), "--max-new-tokens", "8", "--sweep", "0x4+2",
          "--batch-sizes", "3/2", "--section", "continuous"])
    text = (tmp_path / "runs" / "benchmarks" / "benchmarks.md").read_text()
    assert "N/R: continuous batching, N prompts a call decoded R rows at a time" in text
    rows = [[c.strip() for c in line.strip("| ").split(" | ")] for line in text.splitlines()
            if line.startswith("| 3/2 |")]
    assert len(rows) == 1 and rows[0][-1] == "3/3", rows
    assert 0.5 <= float(rows[0][6]) <= 1  # rows busy: 3 prompts in 2 rows, the last one alone at the end


def test_second_turn_run_reports_identical_outputs_and_needs_two_turns(tmp_path, smollm_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"turns": ["Count from one to five.", "Now count back down."]}) + "\n"
                       + json.dumps({"turns": ["Say hello.", "Say it in French."]}) + "\n")
    monkeypatch.chdir(tmp_path)
    run = ["--gguf", smollm_path, "--prompts", str(prompts), "--max-new-tokens", "8", "--sweep", "0x4+2",
           "--turn", "2", "--first-reply-tokens", "16", "--prompt-bucket", "64", "--section", "turn2"]
    main(run)
    text = (tmp_path / "runs" / "benchmarks" / "benchmarks.md").read_text()
    assert "second turns, each after the target's own greedy reply to the first, up to 16 tokens" in text
    assert "| speedup | speedup after prefill | identical outputs |" in text
    rows = [[c.strip() for c in line.strip("| ").split(" | ")] for line in text.splitlines()
            if line.startswith("| none |")]
    assert len(rows) == 1 and rows[0][-1] == "2/2", rows
    # every decoder continuing the first turn's cache: the same outputs, only the second message prefilled
    main(run + ["--reuse-cache", "--section", "turn2cached"])
    text = (tmp_path / "runs" / "benchmarks" / "benchmarks.md").read_text().split("## ")[-1]
    rest, whole = map(int, re.search(r"prefills only the rest of the prompt, (\d+) of its (\d+) tokens", text).groups())
    assert rest < 20 < whole - 16
    cont, full = map(int, re.search(r"(\d+) ms a prompt for the prefill and its token, against (\d+) ms from scratch",
                                    text).groups())
    assert 0 < cont < full  # the full prefill timed in turn, for the speedup against it
    assert re.search(r"against autoregressive decoding from scratch \(its time with the full prefill instead\): "
                     r"\d+\.\d\dx\)", text)
    rows = [line.split(" | ")[-1].strip("| ") for line in text.splitlines() if line.startswith("| none |")]
    assert rows == ["2/2"]
    for bad, message in [(["--batch-sizes", "2"], "--reuse-cache decodes one prompt at a time"),
                         (["--turn", "1"], "--reuse-cache continues the first turn's cache: it needs --turn 2")]:
        with pytest.raises(SystemExit):
            main(run + ["--reuse-cache"] + bad)
        assert message in capsys.readouterr().err
    prompts.write_text(prompts.read_text() + json.dumps({"prompt": "One turn only."}) + "\n")
    with pytest.raises(SystemExit):
        main(run)
    err = capsys.readouterr().err
    assert "--turn 2 needs a second user turn in every prompt (prompts with one turn: 1 of 3)" in err
