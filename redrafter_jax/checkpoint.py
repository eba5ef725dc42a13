"""Drafter checkpoints: a directory with drafter_config.json and the params as an orbax checkpoint.

Writes are atomic: everything is written into a temporary sibling directory that is renamed into
place only when complete, so a crash never leaves a half-written drafter under the real name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from redrafter_jax.config import DrafterConfig, ModelConfig
from redrafter_jax.drafter import Drafter, param_shapes

CONFIG_FILE = "drafter_config.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


def _abstract_params(dcfg: DrafterConfig) -> dict:
    tree = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(dcfg.dtype)), param_shapes(dcfg),
                                  is_leaf=lambda x: isinstance(x, tuple))
    if dcfg.draft_vocab_size is not None:
        tree["vocab_map"] = jax.ShapeDtypeStruct((dcfg.draft_vocab_size,), jnp.int32)
    return tree


def save_drafter(directory: str, drafter: Drafter, extra: dict | None = None) -> None:
    """Saves drafter (params + config) to `directory`, replacing any previous content atomically.
    `extra` (JSON-serialisable: training command, data recipe, ...) is stored beside the config."""
    directory = os.path.abspath(directory)
    tmp = f"{directory}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(tmp, PARAMS_DIR), drafter.params)
    ckpt.wait_until_finished()
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
        json.dump({"format_version": FORMAT_VERSION, "config": dataclasses.asdict(drafter.config),
                   "extra": extra or {}}, f, indent=2)
    old = f"{directory}.old-{os.getpid()}"
    if os.path.exists(directory):
        os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def load_drafter_config(directory: str) -> tuple[DrafterConfig, dict]:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"not a drafter checkpoint (no {CONFIG_FILE}): {directory}")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"drafter checkpoint {directory} has format version {meta.get('format_version')}, "
                         f"expected {FORMAT_VERSION}")
    try:
        return DrafterConfig(**meta["config"]), meta.get("extra", {})
    except TypeError as e:
        raise ValueError(f"drafter checkpoint {directory} has an invalid config: {e}") from e


def load_drafter(directory: str, target: ModelConfig | None = None) -> Drafter:
    """Loads a drafter; with `target`, also checks it was built for a target of that shape."""
    dcfg, _ = load_drafter_config(directory)
    if target is not None:
        dcfg.check_target(target)
    try:
        params = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(directory), PARAMS_DIR),
                                                    _abstract_params(dcfg))
    except Exception as e:  # orbax raises assorted errors for missing files and mismatched trees
        raise ValueError(f"drafter checkpoint {directory} is corrupt or does not match its config: "
                         f"{type(e).__name__}: {str(e)[:500]}") from e
    return Drafter(params, dcfg)
