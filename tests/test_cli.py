"""The generate command end to end on the default model (the README's main job, shortened), its beam options,
and the compiled programs the scripts keep between runs."""

import argparse
import dataclasses
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from infer.generate import main
from redrafter_jax import datastore
from redrafter_jax import generate as gen
from redrafter_jax.cli import add_spec_args, load_drafter_for, tree_setting
from redrafter_jax.generate import generate


def test_speculative_cli_streams_text_and_reports_speedup(capsys, smollm_path):
    main(["--gguf", smollm_path, "--chat", "What is the capital of France?", "--max-new-tokens", "12", "--drafter"])
    out, err = capsys.readouterr()
    assert "Paris" in out
    assert "W=4 L=3 K=1 L'=8 tree=7" in err  # the bare flag: the default drafter at the default shape
    assert "tokens/s" in err and "speedup" in err and "output identical to autoregressive" in err


def test_several_chat_messages_are_a_conversation_each_answered_in_turn(capsys, smollm_path, smollm):
    messages = ["What is the capital of France?", "And of Italy?", "And of Spain?"]
    programs = gen._speculative_jit._cache_size()
    system = "Answer in a few words."
    main(["--gguf", smollm_path, "--system", system, "--chat", *messages, "--max-new-tokens", "10",
          "--lookup-beams", "1"])
    out, err = capsys.readouterr()
    assert all(f"[user, turn {i + 1}: {m}]" in err for i, m in enumerate(messages))
    assert err.count("output identical to autoregressive") == 3  # each turn checked against its own reference
    # each later turn continues the last one's cache: only its own message (in the chat template) is
    # prefilled, and in one cache size for the conversation the decode loop compiles once
    for prefilled, whole in re.findall(r"\[prefilling (\d+) of the prompt's (\d+) tokens: the rest is in the last "
                                       r"turn's cache\]", err):
        assert int(prefilled) < 16 < int(whole) - 10
    assert len(re.findall("prefilling [0-9]", err)) == 2 and gen._speculative_jit._cache_size() - programs <= 1
    replies = out.strip().split("\n\n")
    assert len(replies) == 3 and "Paris" in replies[0]
    # each turn's context is the system prompt, the turns before and their replies, as the chat template renders them
    tok, chat = smollm.tokenizer, [{"role": "system", "content": system}]
    for message, reply in zip(messages, replies):
        chat.append({"role": "user", "content": message})
        ref = generate(smollm.params, smollm.config, [tok.encode_chat(chat)], max_new_tokens=10)
        assert reply == tok.decode(ref.tokens[0, :ref.lengths[0]])
        chat.append({"role": "assistant", "content": reply})


def test_chat_template_kwargs_reach_the_tokenizer_of_the_model_the_command_loads(tmp_path, capsys):
    """--chat-template-kwargs (every command with the model flags): the template sees them in every chat it
    renders; what is no JSON object is refused as the arguments are read."""
    import json

    from redrafter_jax.cli import add_model_args, open_model, parse_args
    from tests.test_loaders import HUB_TEMPLATE, hf_tensors, write_checkpoint

    write_checkpoint(tmp_path, "llama", hf_tensors("llama", np.random.default_rng(0)))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": HUB_TEMPLATE}))
    p = argparse.ArgumentParser()
    add_model_args(p)
    chat = [{"role": "user", "content": "w5"}]
    plain = open_model(parse_args(p, ["--hf", str(tmp_path)])).tokenizer.apply_chat_template(chat)
    opened = open_model(parse_args(p, ["--hf", str(tmp_path), "--chat-template-kwargs", '{"date_string": "w3"}']))
    dated = opened.tokenizer.apply_chat_template(chat)
    assert "<|system|> w3 " in dated and "<|system|> w3 " not in plain and dated.endswith(plain[-20:])
    assert opened.load().tokenizer.template_vars == {"date_string": "w3"}
    for bad, match in [("[1]", "must be a JSON object"), ("{w3", "not valid JSON")]:
        with pytest.raises(SystemExit):
            parse_args(p, ["--chat-template-kwargs", bad])
        assert match in capsys.readouterr().err
    with pytest.raises(ValueError, match="set by apply_chat_template itself"):
        open_model(parse_args(p, ["--hf", str(tmp_path), "--chat-template-kwargs", '{"bos_token": ""}']))


def test_beam_options_default_to_the_measured_best_setting(smollm, tmp_path):
    """A bare --drafter takes 4 x 3 + 1 x 8 in 7 slots, greedy or sampling; any beam option given
    switches to the plain defaults (W 2, L 4, K 1 of length L, every beam in the tree); --spec gives the
    whole tree in the benchmarks' notation; --datastore adds a datastore beam of 8 (unless --spec). The
    setting is read and checked before the model loads; the drafter and the datastore's tokens after."""
    p = argparse.ArgumentParser()
    add_spec_args(p)
    tokens = np.random.default_rng(0).integers(0, smollm.config.vocab_size, size=(4, 50))
    ds = str(tmp_path / "ds.npz")
    datastore.save(datastore.build([(t, np.ones(50)) for t in tokens], [(tokens[0], np.ones(50))]), ds)
    for argv, label, budget in [(["--drafter"], "4x3+1x8:7", 7), (["--drafter", "--beam-length", "5"], "2x5+1", 13),
                                (["--drafter", "--tree-budget", "5"], "2x4+1:5", 5),
                                (["--lookup-beams", "2"], "0x4+2", 7),
                                (["--drafter", "--lookup-length", "8"], "2x4+1x8", 14),
                                (["--drafter", "--spec", "4x3+1x16:12"], "4x3+1x16:12", 12),
                                (["--spec", "0x8+1"], "0x8+1", 8), (["--spec", "0x8+1/4"], "0x8+1/4", 8),
                                (["--drafter", "--datastore", ds], "4x3+1x8+1x8ds:7", 7),
                                (["--datastore", ds], "0x8+1+1x8ds:7", 7),
                                (["--lookup-beams", "2", "--datastore", ds], "0x4+2+1x8ds", 14),
                                (["--spec", "0x8+1+2x5ds", "--datastore", ds], "0x8+1+2x5ds", 16)]:
        spec, store = tree_setting(p.parse_args(argv))
        assert (spec.describe(), spec.budget) == (label, budget), argv
        assert (store is None) == ("--datastore" not in argv)
        assert (load_drafter_for(p.parse_args(argv), smollm.config, store) is None) == ("--drafter" not in argv)
    assert tree_setting(p.parse_args([])) == (None, None)  # autoregressive
    for argv, match in [(["--drafter", "--beam-length", "0"], "beam_length must be >= 2"),
                        (["--drafter", "--spec", "4x3", "--tree-budget", "5"], "--spec gives the whole tree"),
                        (["--drafter", "--spec", "4x"], "bad speculative setting '4x'"),
                        (["--spec", "4x3+1"], "beam_width 4 needs a drafter"),
                        (["--beam-width", "2"], "beam_width 2 needs a drafter"),
                        (["--beam-length", "5"], "with at least one beam in all"),
                        (["--drafter", "--spec", "0x8+1"], "a drafter was given with beam_width 0"),
                        (["--spec", "0x8+1+1x8ds"], "datastore beams need a datastore"),
                        (["--spec", "0x8+1", "--datastore", ds], "a datastore needs a spec with datastore_beams"),
                        (["--spec", "0x8+1x9ds", "--datastore", ds], "datastore beams of 9 tokens need")]:
        with pytest.raises(ValueError, match=match):
            tree_setting(p.parse_args(argv))
    args = p.parse_args(["--datastore", ds])
    other = dataclasses.replace(smollm.config, vocab_size=100)  # another model's tokens
    with pytest.raises(ValueError, match=f"{ds} holds tokens outside the target's vocabulary of 100"):
        load_drafter_for(args, other, tree_setting(args)[1])


# A script's start (`cli.run`), then a program compiled: prints the compilation cache's folder and whether the
# program was loaded from it (JAX's cache-hit event) rather than compiled.
SCRIPT = """import jax, jax.numpy as jnp
from redrafter_jax.cli import keep_compiled_programs
events = []
jax.monitoring.register_event_listener(lambda event, **_: events.append(event))
print(keep_compiled_programs())
jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((8, 8))).block_until_ready()
print("/jax/compilation_cache/cache_hits" in events)"""


def test_a_script_run_again_loads_what_the_last_run_compiled(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # not the suite's own cache
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # keep even this small program
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def start(**more) -> list[str]:
        done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env={**env, **more}, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.split()

    cache = tmp_path / "cache"
    folder, loaded = start(REDRAFTER_CACHE=str(cache))
    assert os.path.dirname(folder) == str(cache / "xla") and os.path.basename(folder).startswith("cpu-")
    assert loaded == "False" and os.listdir(folder)  # compiled, and kept
    assert start(REDRAFTER_CACHE=str(cache)) == [folder, "True"]  # the next run loads it
    mine = str(tmp_path / "mine")
    assert start(REDRAFTER_CACHE=str(cache), JAX_COMPILATION_CACHE_DIR=mine) == [mine, "False"]  # the user's folder
    assert start(REDRAFTER_CACHE=str(cache), JAX_ENABLE_COMPILATION_CACHE="false") == ["None", "False"]  # off
    (tmp_path / "a_file").write_text("")
    assert start(REDRAFTER_CACHE=str(tmp_path / "a_file")) == ["None", "False"]  # no cache folder: compiles
