"""The generate command end to end on the default model (the README's main job, shortened)."""

from infer.generate import main


def test_speculative_cli_streams_text_and_reports_speedup(capsys, smollm_path):
    main(["--gguf", smollm_path, "--chat", "What is the capital of France?", "--max-new-tokens", "12", "--drafter"])
    out, err = capsys.readouterr()
    assert "Paris" in out
    assert "W=2 L=4 K=1 tree=7" in err  # the bare flag: the default drafter at the default shape
    assert "tokens/s" in err and "speedup" in err and "output identical to autoregressive" in err
