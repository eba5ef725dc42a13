"""The time-budgeted GPU pipeline, end to end at a tiny size on the CPU: distil, train, evaluate, resume."""

import json
import os

import numpy as np
import pytest

from redrafter_jax import datastore
from redrafter_jax.checkpoint import load_drafter, load_drafter_config
from train import pipeline
from train.data import is_held_out
from train.pipeline import load_or_build_prompts, main, plan_steps, tokens_per_step, write_prompt_file
from train.train import make_steps, params_fingerprint

pytestmark = pytest.mark.slow

QUESTIONS = ["Name three primary colors.", "What is 2 + 2?", "Write a haiku about rain.", "Who wrote Hamlet?",
             "Give me a word that rhymes with cat.", "What is the boiling point of water?", "Say hello.",
             "List two fruits.", "What day comes after Monday?"]


def user(text):
    return {"role": "user", "content": text}


def test_plan_fits_steps_and_evaluations_into_the_time_left():
    timing = {"first_step_seconds": 12.0, "seconds_per_step": 2.0, "first_eval_seconds": 5.0, "seconds_per_eval": 1.0}
    assert plan_steps(100.0, timing, evaluations=1, max_steps=None) == 42  # (100 - 10 - 5) / 2
    assert plan_steps(100.0, timing, evaluations=11, max_steps=None) == 37  # (100 - 10 - 5 - 10) / 2
    assert plan_steps(100.0, timing, evaluations=1, max_steps=7) == 7
    assert plan_steps(5.0, timing, evaluations=1, max_steps=None) == 1  # never zero steps


def test_tokens_per_step_stops_at_the_deadline_after_one_prompt():
    from redrafter_jax.config import SpecConfig
    from redrafter_jax.loaders import LoadedModel
    from tests.tiny import tiny_model

    cfg, params = tiny_model()
    model, spec = LoadedModel(cfg, params, None), SpecConfig.parse("0x3+1")
    prompts = [[5, 9, 12, 5, 9], [7, 8, 7, 8, 7], [3, 4, 5]]
    assert tokens_per_step(model, None, prompts, spec, 8)[1] == 3
    mean, decoded = tokens_per_step(model, None, prompts, spec, 8, deadline=0.0)  # long past
    assert decoded == 1 and mean == tokens_per_step(model, None, prompts[:1], spec, 8)[0] >= 1


def test_pipeline_runs_end_to_end_and_resumes(tmp_path, smollm, smollm_path, monkeypatch):
    enc = [smollm.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    prompts = str(tmp_path / "prompts.npz")
    write_prompt_file(prompts, {"max_prompt_tokens": 64, "eval_fraction": 0.02},
                      {"train": enc[:7], "eval": enc[7:], "eval_openings": [[user(q)] for q in QUESTIONS[7:]]})
    out, data_dir = tmp_path / "run", tmp_path / "data"
    args = ["--gguf", smollm_path, "--out", str(out), "--data", str(data_dir), "--prompts", prompts,
            "--minutes", "4", "--max-prompt-tokens", "64", "--max-new-tokens", "10", "--distill-batch", "4",
            "--shard-size", "4", "--batch-size", "2", "--seq-len", "64", "--max-steps", "3", "--eval-batches", "1",
            "--draft-vocab", "64", "--eval-prompts", "1", "--eval-new-tokens", "8", "--eval-spec", "1x3+1"]
    steps = []  # each make_steps' (optimizer, train step, evaluation, hidden states)
    monkeypatch.setattr(pipeline, "make_steps", lambda *a: steps.append(make_steps(*a)) or steps[-1])
    main(args + ["--num-prompts", "6"])
    log = json.loads((out / "pipeline.json").read_text())
    # the steps timed for the plan compiled once each: a later step's time is no compilation
    assert steps[0][1]._cache_size() == steps[0][2]._cache_size() == 1
    assert log["distilled_prompts"] == {"train": 6, "eval": 2, "train_available": 7}
    assert 1 <= log["plan"]["steps"] <= 3 and log["plan"]["seconds_per_step"] > 0
    assert log["plan"]["seconds_per_eval"] > 0 and log["plan"]["evaluations"] == 1
    assert len(log["held_out"]["accuracy"]) == 4
    assert log["tokens_per_step"]["1x3+1"] >= 1 and log["tokens_per_step"]["1x3+1+1x8ds"] >= 1
    assert log["tokens_per_step_prompts"] == {"1x3+1": 1, "1x3+1+1x8ds": 1}
    store = datastore.load(out / "datastore.npz", smollm.config.vocab_size)  # of the distilled replies
    assert store.keys.shape[0] == log["datastore_ngrams"] > 0
    assert set(log["stage_seconds"]) == {"load", "distill", "train", "evaluate"}
    drafter = load_drafter(str(out / "drafter"), smollm.config)
    assert drafter.config.draft_vocab_size == 64
    assert json.loads((data_dir / "distill.json").read_text())["shard_size"] == 4

    # Rerun: complete shards are kept, the short one (2 of 4 prompts) is redone with the 7th prompt,
    # and the finished training is not repeated (a new --out would be needed for the new data).
    shard0 = data_dir / "train" / "shard_00000.npz"
    before = os.stat(shard0).st_mtime_ns
    with pytest.raises(ValueError, match=r"train_data.sequences: 6 there, 7 now"):
        main(args)
    assert os.stat(shard0).st_mtime_ns == before
    # a fine-tune of the first run's drafter on all 7 replies, with early stopping
    main(args[:3] + [str(tmp_path / "run2")] + args[4:] + ["--keep-best", "--dropout", "0.1",
                                                           "--init", str(out / "drafter")])
    log2 = json.loads((tmp_path / "run2" / "pipeline.json").read_text())
    assert log2["distilled_prompts"]["train"] == 7 and log2["plan"]["evaluations"] == 12
    assert json.loads((tmp_path / "run2" / "run.json").read_text())["init"] == params_fingerprint(drafter.params)
    # held-out evaluations from the start drafter on, the log reports the kept one
    evals = [json.loads(line)["step"] for line in open(tmp_path / "run2" / "metrics.jsonl")
             if json.loads(line)["split"] == "eval"]
    kept = load_drafter_config(str(tmp_path / "run2" / "drafter"))[1]["kept_step"]
    assert evals == list(range(log2["plan"]["steps"] + 1)) and log2["held_out"]["step"] == kept

    # Other distillation settings on the same data are refused, naming what differs.
    with pytest.raises(ValueError, match="shard_size: 4 there, 8 now"):
        main(args[:-2] + ["--shard-size", "8"] + args[-2:])


def test_prompt_file_made_from_own_conversations_keeps_their_source(tmp_path, smollm):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"id": str(i), "messages": [{"role": "user", "content": q}]}) + "\n"
                             for i, q in enumerate(QUESTIONS)))
    path = str(tmp_path / "prompts.npz")
    made = load_or_build_prompts(path, smollm.tokenizer, 64, 0.25, str(chats))
    held = [q for i, q in enumerate(QUESTIONS) if is_held_out(str(i), 0.25)]
    assert 0 < len(held) < len(QUESTIONS) and made["eval_openings"] == [[user(q)] for q in held]
    encode = lambda qs: [smollm.tokenizer.encode_chat([user(q)]) for q in qs]  # noqa: E731
    assert made["eval"] == encode(held) and made["train"] == encode(q for q in QUESTIONS if q not in held)
    assert list(made["source"]) == ["conversations_sha256"]
    # read back on a machine without the chat file: the prompt file is the source, and says so
    again = load_or_build_prompts(path, smollm.tokenizer, 64, 0.25)
    assert again == made
    chats.write_text(json.dumps({"prompt": "Something else."}) + "\n")
    with pytest.raises(ValueError, match="conversations_sha256: [0-9a-f]+ there, [0-9a-f]+ now"):
        load_or_build_prompts(path, smollm.tokenizer, 64, 0.25, str(chats))
    # a file made before system prompts were kept, with the held-out texts alone, reads as their openings
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != "eval_openings"}
    np.savez(path, eval_texts=np.frombuffer(json.dumps(held).encode(), np.uint8), **arrays)
    assert load_or_build_prompts(path, smollm.tokenizer, 64, 0.25) == made
    os.truncate(path, 100)  # copied in part
    with pytest.raises(ValueError, match=f"cannot read prompt file {path} \\(cut short"):
        load_or_build_prompts(path, smollm.tokenizer, 64, 0.25)


def test_prompt_file_of_later_turns_records_them(tmp_path, smollm, smollm_path, capsys):
    reply = {"role": "assistant", "content": "Sure."}
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"id": str(i), "messages": [user(q), reply, user("Say more.")]}) + "\n"
                             for i, q in enumerate(QUESTIONS)))
    path = str(tmp_path / "prompts.npz")
    made = load_or_build_prompts(path, smollm.tokenizer, 96, 0.25, str(chats), turns=2)
    held = [q for i, q in enumerate(QUESTIONS) if is_held_out(str(i), 0.25)]
    assert made["eval_openings"] == [m for q in held for m in ([user(q)], [user(q), reply, user("Say more.")])]
    assert made["eval"] == [smollm.tokenizer.encode_chat(m) for m in made["eval_openings"]]
    assert len(made["train"]) == 2 * (len(QUESTIONS) - len(held))
    # without the chat file and --turns the file is the source; another --turns is refused, as is the
    # default with the chat file given (whose prompts would be its openings)
    again = load_or_build_prompts(path, smollm.tokenizer, 96, 0.25)
    assert again == made | {"source": made["source"] | {"turns": 2}}
    with pytest.raises(ValueError, match="turns: 2 there, 3 now"):
        load_or_build_prompts(path, smollm.tokenizer, 96, 0.25, turns=3)
    with pytest.raises(ValueError, match="turns: 2 there, None now"):
        load_or_build_prompts(path, smollm.tokenizer, 96, 0.25, str(chats))
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "run"), "--minutes", "1", "--turns", "0"])
    assert "argument --turns: must be at least 1, got 0" in capsys.readouterr().err
    longest = max(map(len, made["train"] + made["eval"]))
    with pytest.raises(ValueError, match=f"--seq-len {longest} leaves out the reply of the longest prompt "
                                         rf"\({longest} tokens\): make it at least {longest + 10} \(that prompt"):
        main(["--gguf", smollm_path, "--out", str(tmp_path / "run"), "--prompts", path, "--minutes", "1",
              "--turns", "2", "--max-prompt-tokens", "96", "--eval-fraction", "0.25", "--max-new-tokens", "10",
              "--seq-len", str(longest)])
    assert not (tmp_path / "run" / "data").exists()  # before anything is distilled
