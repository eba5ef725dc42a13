"""Apple's ReDrafter drafter format (ml-recurrent-drafter's `save_pretrained`; TensorRT-LLM's converter
reads the same files): import into our `Drafter` and export back.

A directory with `config.json` (model_type "recurrent_drafting_drafter", vocab_size, hidden_size,
exit_dim, num_draft_layers, rnn) and `model.safetensors` holding PyTorch [out, in] weights:

    rnn_w.weight [H, H]                      -> rnn_w  [H, H] (transposed; Apple's has no bias)
    rnn_u.weight [H, H], rnn_u.bias [H]      -> rnn_u  [H, H] (transposed), rnn_b
    input_proj.weight [E, 2H], .bias [E]     -> proj_w [2H, E], proj_b   (only when exit_dim != 2H)
    lm_head.{i}.linear.weight [E, E], .bias  -> resblocks[i].w [E, E], .b (i < num_draft_layers)
    lm_head.{N}.weight [V, E]                -> lm_head [E, V]            (N = num_draft_layers)

Imported drafters run with `apple_warp` (Apple's logit warp and dead-beam score), which reproduces
Apple's beam search exactly. Drafters with a reduced draft vocabulary or the target's shared LM head
have no equivalent there and are not exported.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from redrafter_jax.config import DrafterConfig, ModelConfig
from redrafter_jax.drafter import Drafter, param_shapes
from redrafter_jax.files import atomic_folder
from redrafter_jax.loaders.hf import open_safetensors
from redrafter_jax.model import is_shape

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPE = "recurrent_drafting_drafter"
TRANSFORMERS_VERSION = "4.57.6"  # what Apple's save_pretrained recorded in the files this format matches


def is_apple_drafter(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, CONFIG_FILE)) and os.path.isfile(
        os.path.join(directory, WEIGHTS_FILE))


def _names(dcfg: DrafterConfig) -> dict[str, str]:
    """Apple tensor name -> our parameter path (keystr of the params tree)."""
    n = dcfg.num_resblocks
    names = {f"lm_head.{i}.linear.{w}": f"['resblocks'][{i}]['{o}']"
             for i in range(n) for w, o in (("weight", "w"), ("bias", "b"))}
    names[f"lm_head.{n}.weight"] = "['lm_head']"
    if dcfg.rnn:
        names.update({"rnn_w.weight": "['rnn_w']", "rnn_u.weight": "['rnn_u']", "rnn_u.bias": "['rnn_b']"})
    if dcfg.exit != 2 * dcfg.hidden_size:
        names.update({"input_proj.weight": "['proj_w']", "input_proj.bias": "['proj_b']"})
    return names


def load_apple_drafter(directory: str, target: ModelConfig | None = None, dtype: str | None = None) -> Drafter:
    """Our Drafter from Apple's format; every tensor is checked (none missing, none extra, each of the
    shape the config implies) and, with `target`, the sizes against the target's. `dtype` overrides
    the stored one (e.g. "float64" for a parity check)."""
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        conf = json.load(f)
    if conf.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{directory}: model_type {conf.get('model_type')!r} is not an Apple ReDrafter drafter "
                         f"({MODEL_TYPE!r})")
    try:
        h, v, e = int(conf["hidden_size"]), int(conf["vocab_size"]), int(conf["exit_dim"])
        dcfg = DrafterConfig(hidden_size=h, vocab_size=v, num_resblocks=int(conf["num_draft_layers"]),
                             rnn=bool(conf["rnn"]), exit_dim=None if e == 2 * h else e,
                             dtype=dtype or conf.get("dtype") or conf.get("torch_dtype") or "float32", apple_warp=True)
    except KeyError as k:
        raise ValueError(f"{directory}: {CONFIG_FILE} has no {k.args[0]!r}") from None
    if target is not None:
        dcfg.check_target(target)
    with open_safetensors(os.path.join(directory, WEIGHTS_FILE)) as weights:
        tensors = {k: weights.get_tensor(k) for k in weights.keys()}
    names = _names(dcfg)
    missing, extra = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
    if missing or extra:
        raise ValueError(f"{directory}: {WEIGHTS_FILE} does not match its config"
                         + (f"; missing {', '.join(missing)}" if missing else "")
                         + (f"; unexpected {', '.join(extra)}" if extra else ""))
    shapes = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        param_shapes(dcfg), is_leaf=is_shape)[0]}

    def ours(name: str) -> np.ndarray:
        x = tensors[name]
        x = x.T if x.ndim == 2 else x
        if x.shape != shapes[names[name]]:
            raise ValueError(f"{directory}: tensor {name} has shape {tensors[name].shape}, expected "
                             f"{shapes[names[name]][::-1]} for this config")
        return jnp.asarray(x, dcfg.dtype)

    flat = {names[n]: ours(n) for n in names}
    params = jax.tree_util.tree_map_with_path(lambda p, _: flat[jax.tree_util.keystr(p)], param_shapes(dcfg),
                                              is_leaf=is_shape)
    return Drafter(params, dcfg)


def save_apple_drafter(directory: str, drafter: Drafter, overwrite: bool = False) -> None:
    """Writes drafter in Apple's format (atomically; an existing non-empty folder only with overwrite)."""
    c = drafter.config
    if c.draft_vocab_size is not None:
        raise ValueError(f"cannot export a drafter with a reduced draft vocabulary ({c.draft_vocab_size} of "
                         f"{c.vocab_size} tokens): Apple's format has a head over the full vocabulary")
    if c.share_lm_head:
        raise ValueError("cannot export a drafter that uses the target's LM head: Apple's format stores the "
                         "drafter's own head")
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and os.listdir(directory) and not overwrite:
        raise FileExistsError(f"refusing to replace {directory}: it is not empty (pass overwrite=True / --overwrite)")
    flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(drafter.params)[0]}
    tensors = {name: np.ascontiguousarray(flat[path].T if flat[path].ndim == 2 else flat[path])
               for name, path in sorted(_names(c).items())}
    conf = {"architectures": ["Drafter"], "dtype": c.dtype, "exit_dim": c.exit, "hidden_size": c.hidden_size,
            "model_type": MODEL_TYPE, "num_draft_layers": c.num_resblocks, "num_lookback_tokens": -1,
            "rnn": c.rnn, "transformers_version": TRANSFORMERS_VERSION, "vocab_size": c.vocab_size}
    with atomic_folder(directory) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(conf, f, indent=2, sort_keys=True)
