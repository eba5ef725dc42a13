"""infer.profile: a decode step's time by part, from a profile of the real decode loop."""

import collections

import jax
import jax.numpy as jnp

from infer import profile
from redrafter_jax import generate as gen
from redrafter_jax.config import SpecConfig
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
    for _, op_name, in_loop in ops.values():
        parts[profile.part_of(op_name, ("propose", "verify")) if in_loop else None].add(op_name.split("/")[-1])
    assert {"cos", "add"} <= parts["propose"] and {"exp", "mul"} <= parts["verify"] and "lt" in parts[profile.REST]
    assert "sin" in parts[None] and "sin" not in parts["propose"] | parts["verify"] | parts[profile.REST]


def test_step_profile_times_every_part_of_both_decode_steps():
    cfg, params = tiny_model()
    spec, steps = profile.step_profile(params, cfg, [[5, 6, 7], [8, 9]], profile.SPECULATIVE_PARTS, max_new_tokens=12,
                                       spec=SpecConfig(0, 3, lookup_beams=1))
    ar, ar_steps = profile.step_profile(params, cfg, [[5, 6, 7], [8, 9]], profile.AUTOREGRESSIVE_PARTS,
                                        max_new_tokens=12)
    assert ar_steps == 11 and 1 <= steps <= 11
    assert list(spec) == [*profile.SPECULATIVE_PARTS, profile.REST] and list(ar) == [*profile.AUTOREGRESSIVE_PARTS,
                                                                                     profile.REST]
    for found in (spec, ar):
        assert all(ms > 0 and ops >= 1 for part, (ms, ops) in found.items() if part != profile.REST), found
    # the tree's forward is the autoregressive step's forward, with the tree mask's few ops more
    assert ar["forward"][1] <= spec["verify"][1] < 1.5 * ar["forward"][1]
