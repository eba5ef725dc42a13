"""Model loaders: GGUF files, Hugging Face checkpoint directories, and the embedded default.

Both formats name the same tensors differently; `GLOBAL_TENSORS` and `LAYER_TENSORS` are the one
table mapping our params layout to each, and `assemble_params` builds (and shape-checks) the params from either.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
from tqdm import tqdm

from redrafter_jax.config import ModelConfig
from redrafter_jax.model import Params, fused_splits, param_shapes
from redrafter_jax.tokenizer import Tokenizer


class LoadedModel(NamedTuple):
    config: ModelConfig
    params: Params
    tokenizer: Tokenizer


# Our parameter -> its parts as checkpoints store them, each (Hugging Face name, GGUF name); fused
# parameters list their parts in concatenation order; "{i}" is the layer index.
GLOBAL_TENSORS = {
    "embed": [("model.embed_tokens.weight", "token_embd.weight")],
    "final_norm": [("model.norm.weight", "output_norm.weight")],
    "lm_head": [("lm_head.weight", "output.weight")],
}
LAYER_TENSORS = {
    "attn_norm": [("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight")],
    "wqkv": [("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
             ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
             ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight")],
    "bqkv": [("model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias"),
             ("model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias"),
             ("model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias")],
    "wo": [("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight")],
    "mlp_norm": [("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight")],
    "w_gate_up": [("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
                  ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight")],
    "w_down": [("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight")],
}
HF, GGUF = 0, 1


def assemble_params(cfg: ModelConfig, fmt: int, get: Callable[[str], np.ndarray]) -> Params:
    """Builds params from a checkpoint's tensors.

    get(name) returns the tensor stored under the format's name, in the [out, in] layout both formats
    use for linear weights, or raises KeyError. Each part's shape is checked, parts are concatenated
    along the output axis, and matrices other than the embedding are transposed to [in, out].
    """
    shapes = param_shapes(cfg)
    splits = fused_splits(cfg)

    def load(ours: str, parts: list, layer: int | None, shape: tuple) -> np.ndarray:
        widths = splits.get(ours, (shape[-1] if ours != "embed" else shape[0],))
        arrays = []
        for names, width in zip(parts, widths):
            name = names[fmt].format(i=layer)
            try:
                x = np.asarray(get(name))
            except KeyError:
                raise ValueError(f"checkpoint is missing tensor {name!r}") from None
            stored = (width, shape[0]) if len(shape) == 2 and ours != "embed" else (width,) + shape[1:]
            if x.shape != stored:
                raise ValueError(f"tensor {name!r} has shape {x.shape}, expected {stored} for this config")
            arrays.append(x)
        x = np.concatenate(arrays, axis=0) if len(arrays) > 1 else arrays[0]
        return (x.T if len(shape) == 2 and ours != "embed" else x).astype(cfg.dtype)

    # a bar on a terminal only: dequantising a large model takes a while
    with tqdm(total=len(shapes) - 1 + len(shapes["layers"]), desc="loading weights", unit="layer", disable=None,
              leave=False) as bar:
        params = {k: load(k, GLOBAL_TENSORS[k], None, s) for k, s in shapes.items() if k != "layers"}
        bar.update(len(params))
        params["layers"] = []
        for i, layer in enumerate(shapes["layers"]):
            params["layers"].append({k: load(k, LAYER_TENSORS[k], i, s) for k, s in layer.items()})
            bar.update()
    return params
