"""The generate command end to end on the default model (the README's main job, shortened)."""

import os

from infer.generate import main

DRAFTER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "drafters", "smollm2-135m")


def test_speculative_cli_streams_text_and_reports_speedup(capsys, smollm_path):
    main(["--gguf", smollm_path, "--chat", "What is the capital of France?", "--max-new-tokens", "12",
          "--drafter", DRAFTER, "--beam-width", "1", "--beam-length", "4", "--lookup-beams", "1"])
    out, err = capsys.readouterr()
    assert "Paris" in out
    assert "tokens/s" in err and "speedup" in err and "output identical to autoregressive" in err
