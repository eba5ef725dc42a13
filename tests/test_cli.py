"""The generate command end to end on the default model (the README's main job, shortened), and its beam options."""

import argparse

import pytest

from infer.generate import main
from redrafter_jax.cli import add_spec_args, load_drafter_arg
from redrafter_jax.config import SamplingConfig


def test_speculative_cli_streams_text_and_reports_speedup(capsys, smollm_path):
    main(["--gguf", smollm_path, "--chat", "What is the capital of France?", "--max-new-tokens", "12", "--drafter"])
    out, err = capsys.readouterr()
    assert "Paris" in out
    assert "W=2 L=4 K=1 tree=7" in err  # the bare flag: the default drafter at the default shape
    assert "tokens/s" in err and "speedup" in err and "output identical to autoregressive" in err


def test_beam_options_default_to_the_measured_best_setting(smollm):
    """A bare --drafter takes 2 x 4 + 1 in 7 slots when greedy and 4 x 2 when sampling; any beam option
    given switches to the plain defaults (W 2, L 4, K 1, every beam in the tree)."""
    p = argparse.ArgumentParser()
    add_spec_args(p)
    greedy, sampled = SamplingConfig(0.0), SamplingConfig(0.8)
    for argv, sampling, shape in [(["--drafter"], greedy, (2, 4, 1, 7)), (["--drafter"], sampled, (4, 2, 0, 5)),
                                  (["--drafter", "--beam-length", "5"], sampled, (2, 5, 1, 13)),
                                  (["--drafter", "--tree-budget", "5"], greedy, (2, 4, 1, 5)),
                                  (["--lookup-beams", "2"], sampled, (0, 4, 2, 7)),
                                  (["--drafter", "--lookup-length", "8"], greedy, (2, 4, 1, 14))]:
        drafter, spec = load_drafter_arg(p.parse_args(argv), smollm, sampling)
        assert (spec.beam_width, spec.beam_length, spec.lookup_beams, spec.budget) == shape, argv
        assert (drafter is None) == ("--drafter" not in argv)
    with pytest.raises(ValueError, match="beam_length must be >= 2"):
        load_drafter_arg(p.parse_args(["--drafter", "--beam-length", "0"]), smollm, sampled)
