"""Model loaders: GGUF files, Hugging Face checkpoint directories, and the embedded default.

Both formats name the same tensors differently; `TENSOR_NAMES` is the one table mapping our params
layout to each, and `assemble_params` builds (and shape-checks) the params from either.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from redrafter_jax.config import ModelConfig
from redrafter_jax.model import Params, param_shapes
from redrafter_jax.tokenizer import Tokenizer


class LoadedModel(NamedTuple):
    config: ModelConfig
    params: Params
    tokenizer: Tokenizer


# our name -> (Hugging Face name, GGUF name); "{i}" is the layer index.
TENSOR_NAMES = {
    "embed": ("model.embed_tokens.weight", "token_embd.weight"),
    "final_norm": ("model.norm.weight", "output_norm.weight"),
    "lm_head": ("lm_head.weight", "output.weight"),
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    "wq": ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    "wk": ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    "wv": ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    "wo": ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    "bq": ("model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias"),
    "bk": ("model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias"),
    "bv": ("model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias"),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    "w_gate": ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    "w_up": ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    "w_down": ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
}
HF, GGUF = 0, 1


def assemble_params(cfg: ModelConfig, fmt: int, get: Callable[[str], np.ndarray]) -> Params:
    """Builds params from a checkpoint's tensors.

    get(name) returns the tensor stored under the format's name, in the [out, in] layout both formats
    use for linear weights, or raises KeyError. Linear weights are transposed to [in, out].
    """
    shapes = param_shapes(cfg)

    def load(ours: str, layer: int | None, shape: tuple) -> np.ndarray:
        name = TENSOR_NAMES[ours][fmt].format(i=layer)
        try:
            x = get(name)
        except KeyError:
            raise ValueError(f"checkpoint is missing tensor {name!r}") from None
        x = np.asarray(x)
        transpose = len(shape) == 2 and ours != "embed"
        stored = shape[::-1] if transpose else shape
        if x.shape != stored:
            raise ValueError(f"tensor {name!r} has shape {x.shape}, expected {stored} for this config")
        return (x.T if transpose else x).astype(cfg.dtype)

    params = {k: load(k, None, s) for k, s in shapes.items() if k != "layers"}
    params["layers"] = {
        k: np.stack([load(k, i, s[1:]) for i in range(cfg.num_layers)])
        for k, s in shapes["layers"].items()}
    return params
