"""Drafter checkpoints: a directory with drafter_config.json and the params as an orbax checkpoint.

- Atomic (`files.atomic_folder`): a crash never leaves a half-written drafter under the real name.
- Safe: a folder that holds anything but a drafter checkpoint is never replaced without
  `overwrite=True`.
- Portable: params are saved from host memory, so no device topology is recorded, and restored onto
  the current default device (or a given sharding): a drafter saved on a GPU loads on a CPU and back.
- Apple's format (`redrafter_jax.apple`) is recognised and imported by `load_drafter`.
- Checked: the config records the sha256 of every parameter file and loading verifies them, then
  checks every stored shape against the config before restoring anything.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from redrafter_jax import apple
from redrafter_jax.config import DrafterConfig, ModelConfig
from redrafter_jax.drafter import Drafter, param_shapes
from redrafter_jax.files import atomic_folder
from redrafter_jax.model import is_shape
from redrafter_jax.wheels import sha256

CONFIG_FILE = "drafter_config.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 2  # 2 added "checksums"; version 1 checkpoints load without that check


def _abstract_params(dcfg: DrafterConfig, sharding: jax.sharding.Sharding) -> dict:
    dtype = jnp.dtype(dcfg.dtype)
    tree = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, dtype, sharding=sharding), param_shapes(dcfg),
                                  is_leaf=is_shape)
    if dcfg.draft_vocab_size is not None:
        tree["vocab_map"] = jax.ShapeDtypeStruct((dcfg.draft_vocab_size,), jnp.int32, sharding=sharding)
    return tree


def file_digests(root: str) -> dict[str, str]:
    """sha256 of every file under root, keyed by its path relative to root."""
    out = {}
    for parent, _, files in os.walk(root):
        for name in files:
            path = os.path.join(parent, name)
            out[os.path.relpath(path, root)] = sha256(path)
    return dict(sorted(out.items()))


def is_drafter_checkpoint(directory: str) -> bool:
    """True for a folder holding a drafter checkpoint and nothing else (what save_drafter may replace)."""
    entries = set(os.listdir(directory))
    return CONFIG_FILE in entries and entries <= {CONFIG_FILE, PARAMS_DIR}


def save_drafter(directory: str, drafter: Drafter, extra: dict | None = None, overwrite: bool = False) -> None:
    """Saves drafter (params + config) to `directory`, atomically replacing an earlier drafter checkpoint
    there. A folder holding anything else is refused unless `overwrite`. `extra` (JSON-serialisable:
    training command, data recipe, ...) is stored beside the config."""
    directory = os.path.abspath(directory)
    if os.path.lexists(directory):
        if not os.path.isdir(directory):
            raise FileExistsError(f"cannot save a drafter to {directory}: it is a file")
        if os.listdir(directory) and not is_drafter_checkpoint(directory) and not overwrite:
            raise FileExistsError(f"refusing to replace {directory}: it holds files that are not a drafter "
                                  f"checkpoint; choose an empty or new folder, or pass overwrite=True (--overwrite)")
    with atomic_folder(directory) as tmp:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(os.path.join(tmp, PARAMS_DIR), jax.device_get(drafter.params))  # host arrays: no device recorded
        ckpt.wait_until_finished()
        meta = {"format_version": FORMAT_VERSION, "config": dataclasses.asdict(drafter.config),
                "checksums": file_digests(os.path.join(tmp, PARAMS_DIR)), "extra": extra or {}}
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2)


def _read_meta(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"not a drafter checkpoint (no {CONFIG_FILE}): {directory}")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"drafter checkpoint {directory}: {CONFIG_FILE} is not valid JSON ({e})") from None
    if meta.get("format_version") not in (1, FORMAT_VERSION):
        raise ValueError(f"drafter checkpoint {directory} has format version {meta.get('format_version')}, "
                         f"expected 1 or {FORMAT_VERSION}")
    return meta


def _config(meta: dict, directory: str) -> DrafterConfig:
    try:
        return DrafterConfig(**meta["config"])
    except (TypeError, KeyError) as e:
        raise ValueError(f"drafter checkpoint {directory} has an invalid config: {e}") from None


def load_drafter_config(directory: str) -> tuple[DrafterConfig, dict]:
    """The config and the `extra` record (how it was made) of a drafter checkpoint."""
    meta = _read_meta(directory)
    return _config(meta, directory), meta.get("extra", {})


def _check_files(directory: str, checksums: dict[str, str]) -> None:
    params = os.path.join(directory, PARAMS_DIR)
    found = file_digests(params) if os.path.isdir(params) else {}
    for name, digest in checksums.items():
        if name not in found:
            raise ValueError(f"drafter checkpoint {directory} is incomplete: {PARAMS_DIR}/{name} is missing")
        if found[name] != digest:
            raise ValueError(f"drafter checkpoint {directory} is corrupt: {PARAMS_DIR}/{name} does not match "
                             f"its recorded sha256")


def _check_shapes(directory: str, dcfg: DrafterConfig, expected: dict) -> None:
    """Compares the stored parameter names and shapes with the ones the config needs."""
    try:
        stored = ocp.StandardCheckpointer().metadata(os.path.join(directory, PARAMS_DIR)).item_metadata.tree
    except Exception as e:  # orbax raises assorted errors for unreadable metadata
        raise ValueError(f"drafter checkpoint {directory} is corrupt: its parameter metadata cannot be read "
                         f"({type(e).__name__})") from None

    def flat(t):
        return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}

    have, need = flat(stored), flat(expected)
    for name in sorted(set(have) | set(need)):
        if have.get(name) != need.get(name):
            raise ValueError(f"drafter checkpoint {directory} does not match its config ({dcfg}): parameter "
                             f"{name} is stored with shape {have.get(name, 'absent')}, the config needs "
                             f"{need.get(name, 'none')}")


def load_drafter(directory: str, target: ModelConfig | None = None,
                 sharding: jax.sharding.Sharding | None = None) -> Drafter:
    """Loads a drafter onto `sharding` (default: the current default device), whatever devices it was
    saved from. With `target`, also checks it was built for a target of that shape. A directory in
    Apple's format (config.json + model.safetensors) is imported (`redrafter_jax.apple`)."""
    directory = os.path.abspath(directory)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if not os.path.exists(os.path.join(directory, CONFIG_FILE)) and apple.is_apple_drafter(directory):
        d = apple.load_apple_drafter(directory, target)
        return d.replace(params=jax.device_put(d.params, sharding))
    meta = _read_meta(directory)
    dcfg = _config(meta, directory)
    if target is not None:
        dcfg.check_target(target)
    if meta["format_version"] >= 2:
        if not isinstance(meta.get("checksums"), dict) or not meta["checksums"]:
            raise ValueError(f"drafter checkpoint {directory} has no checksums of its parameter files in {CONFIG_FILE}")
        _check_files(directory, meta["checksums"])
    abstract = _abstract_params(dcfg, sharding)
    _check_shapes(directory, dcfg, abstract)
    try:
        params = ocp.StandardCheckpointer().restore(os.path.join(directory, PARAMS_DIR), abstract)
    except Exception as e:  # orbax raises assorted errors for unreadable files
        raise ValueError(f"drafter checkpoint {directory} is corrupt: {type(e).__name__}: {str(e)[:300]}") from None
    return Drafter(params, dcfg)
