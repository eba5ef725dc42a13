"""infer.profile: a decode step's time by part, from a profile of the real decode loop."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import profile
from redrafter_jax import generate as gen
from redrafter_jax import rows_matmul
from redrafter_jax.config import SpecConfig
from tests.test_loaders import hf_tensors, write_checkpoint
from tests.tiny import tiny_model


def test_ops_are_found_inside_the_decode_loop_and_named_by_their_part():
    def f(x):
        y = jnp.sin(x) * 3  # before the loop, as a prefill

        def body(c):
            with jax.named_scope("propose"):
                c = c + jax.lax.fori_loop(0, 3, lambda i, z: jnp.cos(z) * 2, c)  # a loop inside the part
            with jax.named_scope("verify"):
                c = jnp.exp(c) * 0.5
            return c
        with jax.named_scope(gen.LOOP_SCOPE):
            return jax.lax.while_loop(lambda c: c.sum() < 1e3, body, y)

    _, ops = profile._instructions(jax.jit(f).lower(jnp.ones(8)).compile().as_text())
    parts = collections.defaultdict(set)
    for op in ops.values():
        parts[profile.part_of(op.op_name, ("propose", "verify")) if op.in_loop else None].add(op.op_name.split("/")[-1])
    assert {"cos", "add"} <= parts["propose"] and {"exp", "mul"} <= parts["verify"] and "lt" in parts[profile.REST]
    assert "sin" in parts[None] and "sin" not in parts["propose"] | parts["verify"] | parts[profile.REST]


def test_step_profile_times_every_part_of_both_decode_steps():
    cfg, params = tiny_model()
    spec = profile.step_profile(params, cfg, [[5, 6, 7], [8, 9]], profile.SPECULATIVE_PARTS, max_new_tokens=12,
                                spec=SpecConfig(0, 3, lookup_beams=1))
    ar = profile.step_profile(params, cfg, [[5, 6, 7], [8, 9]], profile.AUTOREGRESSIVE_PARTS, max_new_tokens=12)
    assert ar.steps == 11 and 1 <= spec.steps <= 11
    assert list(spec.parts) == [*profile.SPECULATIVE_PARTS, profile.REST]
    assert list(ar.parts) == [*profile.AUTOREGRESSIVE_PARTS, profile.REST]
    for found in (spec, ar):
        assert all(ms > 0 and ops >= 1 for part, (ms, ops) in found.parts.items() if part != profile.REST), found
        for part, (ms, _) in found.parts.items():  # each part's time, op kind by op kind
            assert sum(t for (p, _), t in found.kinds.items() if p == part) == pytest.approx(ms)
    # the tree's forward is the autoregressive step's forward, with the tree mask's few ops more; the
    # products run in the CPU rows kernel (where it builds) in both, a custom call named by its target
    assert ar.parts["forward"][1] <= spec.parts["verify"][1] < 1.5 * ar.parts["forward"][1]
    if rows_matmul.available():
        target = rows_matmul.TARGETS[jnp.dtype(jnp.float32)]
        assert spec.kinds["verify", target] > 0 and ar.kinds["forward", target] > 0


def test_profile_command_prints_both_decodings_part_by_part(tmp_path, capsys):
    model = tmp_path / "model"
    write_checkpoint(model, "llama", hf_tensors("llama", np.random.default_rng(0)), max_position_embeddings=256)
    args = ["--hf", str(model), "--chat", "hello there", "--max-new-tokens", "8", "--ops", "2"]
    profile.main([*args, "--drafter", "random", "--beam-width", "2", "--beam-length", "3"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    parts = [(r[0].strip("| "), r[1]) for r in rows if r[2] == ""]
    assert parts == [("autoregressive", p) for p in (*profile.AUTOREGRESSIVE_PARTS, "the rest", "whole step")] + [
        ("speculative 2x3+1", p) for p in (*profile.SPECULATIVE_PARTS, "the rest", "whole step")]
    kinds = [r for r in rows if r[2] != ""]  # at most 2 per part, none for the whole step
    assert kinds and all(r[1] != "whole step" for r in kinds)
    assert max(collections.Counter((r[0], r[1]) for r in kinds).values()) <= 2
    with pytest.raises(ValueError, match="nothing speculative to profile"):
        profile.main(args)
    with pytest.raises(ValueError, match="one device's decode loop"):
        profile.main([*args, "--drafter", "random", "--mesh", "1x1"])
