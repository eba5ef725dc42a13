"""Loaders: Hugging Face checkpoint directories written by the tests, the GGUF tokenizer, bad files."""

import copy
import dataclasses
import datetime
import inspect
import itertools
import json
import math
import os
import re

import gguf
import jax
import jax.numpy as jnp
import jinja2
import numpy as np
import pytest
import regex
import tokenizers
from safetensors import safe_open
from safetensors.numpy import save_file

from redrafter_jax.config import QueryScaling, RopeScaling, SpecConfig
from redrafter_jax.generate import generate
from redrafter_jax.loaders import GLOBAL_TENSORS, LAYER_TENSORS
from redrafter_jax.loaders.gguf import _open, _xielu_values, gguf_tokenizer, load_gguf, open_gguf, unpermute_rope
from redrafter_jax.loaders.hf import SUPPORTED_ARCHITECTURES, config_from_hf, load_hf, open_hf
from redrafter_jax.model import forward_causal
from redrafter_jax.mxfp4 import Mxfp4
from redrafter_jax.tokenizer import _DEEPSEEK_LETTERS
from redrafter_jax.wheels import WheelFile, fetch
from tests.tiny import TINY

VOCAB = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"] + [f"w{i}" for i in range(59)]
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}<|assistant|>"

ARCHS = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # layer 0 windowed with RoPE, layer 1 global without; norms after attention and the MLP only
    "exaone4": dict(architectures=["Exaone4ForCausalLM"], model_type="exaone4", tie_word_embeddings=True,
                    sliding_window=5, sliding_window_pattern=2, pad_token_id=2),
    # Gemma 1: norms scaling by 1 + w, GeGLU under the legacy name its releases give it, embeddings scaled
    "gemma": dict(architectures=["GemmaForCausalLM"], model_type="gemma", tie_word_embeddings=True, hidden_act="gelu"),
    # layer 0 windowed, layer 1 not; the scores' scale not head_dim^-1/2; soft caps low enough to bite
    "gemma2": dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", tie_word_embeddings=True,
                   sliding_window=5, query_pre_attn_scalar=32, hidden_activation="gelu_pytorch_tanh",
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    # VaultGemma: Gemma 2 without the norms after attention and the MLP
    "vaultgemma": dict(architectures=["VaultGemmaForCausalLM"], model_type="vaultgemma", tie_word_embeddings=True,
                       sliding_window=5, query_pre_attn_scalar=32, attn_logit_softcapping=2.0,
                       final_logit_softcapping=3.0),
    # layer 0 windowed with its own RoPE base, layer 1 not; the scores' scale not head_dim^-1/2
    "gemma3": dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", tie_word_embeddings=True,
                   sliding_window=5, sliding_window_pattern=2, rope_local_base_freq=100.0, query_pre_attn_scalar=32,
                   hidden_activation="gelu_pytorch_tanh"),
    # one LayerNorm (without bias) before attention and the MLP side by side, RoPE over adjacent dimensions,
    # logits scaled; Cohere 2's layer 0 windowed with RoPE, layer 1 global without
    "cohere": dict(architectures=["CohereForCausalLM"], model_type="cohere", tie_word_embeddings=True,
                   logit_scale=0.25, layer_norm_eps=1e-5),
    "cohere2": dict(architectures=["Cohere2ForCausalLM"], model_type="cohere2", tie_word_embeddings=True,
                    logit_scale=0.25, layer_norm_eps=1e-5, sliding_window=5, sliding_window_pattern=2),
    # RoPE's pairs adjacent dimensions of each head; Helium's Q/K/V biased too
    "helium": dict(architectures=["HeliumForCausalLM"], model_type="helium", tie_word_embeddings=False,
                   attention_bias=True),
    # Apertus: query and key norms, an ungated MLP of learned xIELU activations, its norms named otherwise,
    # Llama 3's RoPE scaling by default
    "apertus": dict(architectures=["ApertusForCausalLM"], model_type="apertus", tie_word_embeddings=False),
    # StableLM: LayerNorms with biases, RoPE on a quarter of each head, Q/K/V biases
    # Phi-2: StableLM's parallel layer with biases everywhere, the LM head's too, RoPE on half of each head
    "phi": dict(architectures=["PhiForCausalLM"], model_type="phi", tie_word_embeddings=False),
    "stablelm": dict(architectures=["StableLmForCausalLM"], model_type="stablelm", tie_word_embeddings=False,
                     use_qkv_bias=True),
    # StarCoder2: LayerNorms with biases, an ungated MLP of GELUs stored as c_fc and c_proj, biases on attention's
    # and the MLP's projections (use_bias), a window in every layer
    "starcoder2": dict(architectures=["Starcoder2ForCausalLM"], model_type="starcoder2", tie_word_embeddings=True,
                       sliding_window=5, norm_epsilon=1e-5),
    # Arcee's AFM: an ungated MLP of squared ReLUs
    "arcee": dict(architectures=["ArceeForCausalLM"], model_type="arcee", tie_word_embeddings=False),
    # Nemotron: LayerNorms with biases, their weights w scaling by 1 + w; an ungated MLP of squared ReLUs; RoPE
    # on half of each head
    "nemotron": dict(architectures=["NemotronForCausalLM"], model_type="nemotron", tie_word_embeddings=False),
    "ernie4_5": dict(architectures=["Ernie4_5ForCausalLM"], model_type="ernie4_5", tie_word_embeddings=True),
    # Q/K/V biases
    "seed_oss": dict(architectures=["SeedOssForCausalLM"], model_type="seed_oss", tie_word_embeddings=False),
    # RoPE on half of each head, its pairs adjacent dimensions; Q/K/V biases; gate and up fused; GLM-4's
    # norms after attention and the MLP too
    "glm": dict(architectures=["GlmForCausalLM"], model_type="glm", tie_word_embeddings=False, pad_token_id=2),
    "glm4": dict(architectures=["Glm4ForCausalLM"], model_type="glm4", tie_word_embeddings=False, pad_token_id=2),
    # the scores' scale far from head_dim^-1/2
    "granite": dict(architectures=["GraniteForCausalLM"], model_type="granite", tie_word_embeddings=True,
                    embedding_multiplier=12.0, residual_multiplier=0.25, attention_multiplier=1 / 128,
                    logits_scaling=8.0),
    # HyperCLOVA X: Granite's multipliers (its logits multiplied), norms after attention and the MLP, the
    # residual multiplier after them
    "hyperclovax": dict(architectures=["HyperCLOVAXForCausalLM"], model_type="hyperclovax", tie_word_embeddings=False,
                        embedding_multiplier=12.0, residual_multiplier=0.25, attention_multiplier=1 / 128,
                        logits_scaling=0.125, use_post_norm=True),
    # Granite 4's attention-only model: Granite's multipliers, its MLP stored fused as shared_mlp
    "granite4": dict(architectures=["GraniteMoeHybridForCausalLM"], model_type="granitemoehybrid",
                     tie_word_embeddings=True, embedding_multiplier=12.0, residual_multiplier=0.25,
                     attention_multiplier=1 / 128, logits_scaling=8.0, layer_types=["attention"] * 2,
                     num_local_experts=0, shared_intermediate_size=48, position_embedding_type="rope",
                     mamba_n_heads=8),  # (unused without Mamba layers, but transformers checks it)
    # Granite's mixtures of experts (their MLPs stored fused, gate's rows first) and multipliers: Granite 3's,
    # with a shared expert (GraniteMoeShared's; Granite 4's attention-only model's, its shared_mlp); Granite
    # SWA's attention sinks, layer 0 windowed and rotated at its own base, layer 1 global at another (the MoE
    # model's, its experts under transformers 5's names) or without RoPE (the dense model's)
    "granitemoe": dict(architectures=["GraniteMoeForCausalLM"], model_type="granitemoe", tie_word_embeddings=True,
                       embedding_multiplier=12.0, residual_multiplier=0.25, attention_multiplier=1 / 128,
                       logits_scaling=8.0, num_local_experts=4, num_experts_per_tok=2),
    "granitemoeshared": dict(architectures=["GraniteMoeSharedForCausalLM"], model_type="granitemoeshared",
                             tie_word_embeddings=False, embedding_multiplier=12.0, residual_multiplier=0.25,
                             attention_multiplier=1 / 128, logits_scaling=8.0, num_local_experts=4,
                             num_experts_per_tok=2, shared_intermediate_size=24),
    "granite4_moe": dict(architectures=["GraniteMoeHybridForCausalLM"], model_type="granitemoehybrid",
                         tie_word_embeddings=True, embedding_multiplier=12.0, residual_multiplier=0.25,
                         attention_multiplier=1 / 128, logits_scaling=8.0, layer_types=["attention"] * 2,
                         num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=24,
                         position_embedding_type="rope", mamba_n_heads=8),
    "granite_swa": dict(architectures=["GraniteSWAForCausalLM"], model_type="granite_swa", tie_word_embeddings=True,
                        embedding_multiplier=12.0, residual_multiplier=0.25, attention_multiplier=1 / 128,
                        logits_scaling=8.0, sliding_window=5, layer_types=["sliding_attention", "full_attention"],
                        layer_rope_theta=[100.0, 0]),
    "granitemoe_swa": dict(architectures=["GraniteMoeSWAForCausalLM"], model_type="granitemoe_swa",
                           tie_word_embeddings=False, embedding_multiplier=12.0, residual_multiplier=0.25,
                           attention_multiplier=1 / 128, logits_scaling=8.0, num_local_experts=4,
                           num_experts_per_tok=2, shared_intermediate_size=24, sliding_window=5,
                           layer_types=["sliding_attention", "full_attention"], layer_rope_theta=[100.0, 10000.0]),
    # layer 0 global, layer 1 windowed (CWM's default: all but every fourth from the first), Llama 3's RoPE
    # scaling by default
    "cwm": dict(architectures=["CwmForCausalLM"], model_type="cwm", sliding_window=5, tie_word_embeddings=False),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=5,
                    tie_word_embeddings=False),
    "ministral": dict(architectures=["MinistralForCausalLM"], model_type="ministral", sliding_window=5,
                      layer_types=["full_attention", "sliding_attention"], tie_word_embeddings=False),
    "olmo2": dict(architectures=["Olmo2ForCausalLM"], model_type="olmo2", tie_word_embeddings=False, pad_token_id=2),
    # layer 0 windowed, its RoPE without the YaRN scaling of layer 1's; OLMo 3's base 500000, which
    # transformers gives the windowed layers of a config with rope_theta whatever rope_theta says
    "olmo3": dict(architectures=["Olmo3ForCausalLM"], model_type="olmo3", tie_word_embeddings=False, pad_token_id=2,
                  sliding_window=5, layer_types=["sliding_attention", "full_attention"], rope_theta=500000.0,
                  rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "phi3": dict(architectures=["Phi3ForCausalLM"], model_type="phi3", sliding_window=5, tie_word_embeddings=False,
                 pad_token_id=2),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", tie_word_embeddings=True),
    # mixtures of experts: Mixtral's windowed, its chosen experts' weights renormalised; OLMoE's query and
    # key norms over all heads; Qwen2-MoE's shared expert, its layer 1 dense; Qwen3-MoE's layer 0 dense
    # YaRN, and queries scaled up with their position from position 8 on
    "ministral3": dict(architectures=["Ministral3ForCausalLM"], model_type="ministral3", tie_word_embeddings=True,
                       rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0, beta_fast=32.0, beta_slow=1.0,
                                            original_max_position_embeddings=8, mscale=1.0, mscale_all_dim=1.0,
                                            llama_4_scaling_beta=0.5)),
    "mixtral": dict(architectures=["MixtralForCausalLM"], model_type="mixtral", tie_word_embeddings=False,
                    sliding_window=5, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(architectures=["OlmoeForCausalLM"], model_type="olmoe", tie_word_embeddings=False, pad_token_id=2,
                  num_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", tie_word_embeddings=True,
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24, mlp_only_layers=[1]),
    # GPT-OSS: attention sinks, biases on Q/K/V, the output, the router and the experts, clamped SwiGLU
    # (its limit low enough to bite), its default YaRN (without rounding its ramp), layer 0 windowed, layer 1
    # global
    "gpt_oss": dict(architectures=["GptOssForCausalLM"], model_type="gpt_oss", tie_word_embeddings=False,
                    sliding_window=5, num_local_experts=4, num_experts_per_tok=2, swiglu_limit=1.5, pad_token_id=2),
    "qwen3_moe": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", tie_word_embeddings=True,
                      num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, norm_topk_prob=True,
                      decoder_sparse_step=2),
    # Llama 4: layer 0 chunked (chunks of 5), RoPE over its adjacent dimensions, query and key norms without
    # weights, a dense MLP of its own size; layer 1 global, NoPE, its queries scaled up from position 3 on, a
    # mixture of 4 experts, one per token, whose inputs its sigmoid weights, beside an ungated shared expert
    "llama4": dict(architectures=["Llama4ForCausalLM"], model_type="llama4_text", tie_word_embeddings=False,
                   intermediate_size=16, intermediate_size_mlp=48, num_local_experts=4, num_experts_per_tok=1,
                   interleave_moe_layer_step=2, no_rope_layers=[1, 0], attention_chunk_size=5, floor_scale=4,
                   attn_scale=0.5),
    # GLM-4.5: Q/K/V biases, query and key norms, RoPE on half of each head; layer 0 dense, layer 1 a mixture
    # of 8 experts in 4 groups (the best 2 kept), 3 a token, their weights renormalised and scaled, beside an
    # ungated shared expert; a multi-token prediction layer after the others (unused)
    "glm4_moe": dict(architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe", tie_word_embeddings=False,
                     n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, n_shared_experts=1,
                     first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                     use_qk_norm=True, attention_bias=True, partial_rotary_factor=0.5, num_nextn_predict_layers=1),
    # dots.llm1: Qwen3's query and key norms; layer 0 dense, layer 1 a mixture of 8 experts in 2 groups (the
    # better kept), 2 a token, their weights scaled, not renormalised (its default), beside 2 ungated shared
    # experts, and windowed (from max_window_layers on)
    "dots1": dict(architectures=["Dots1ForCausalLM"], model_type="dots1", tie_word_embeddings=False,
                  n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=2,
                  first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.0, sliding_window=5,
                  max_window_layers=1),
    # MiniMax-M2: Mixtral's mixtures of experts (4, 2 a token), routed as DeepSeek-V3's without groups; query and
    # key norms over all heads, RoPE on half of each head (rotary_dim, as its released configs give it)
    "minimax_m2": dict(architectures=["MiniMaxM2ForCausalLM"], model_type="minimax_m2", tie_word_embeddings=False,
                       num_local_experts=4, num_experts_per_tok=2, rotary_dim=4),
    # layer 1 without RoPE and, being a NoPE layer, windowed
    "smollm3": dict(architectures=["SmolLM3ForCausalLM"], model_type="smollm3", tie_word_embeddings=True,
                    no_rope_layers=[1, 0], use_sliding_window=True, sliding_window=5, pad_token_id=2),
}


MOE_LAYERS = {"dots1": (1,), "glm4_moe": (1,), "gpt_oss": (0, 1), "llama4": (1, 3), "minimax_m2": (0, 1),
              "mixtral": (0, 1), "olmoe": (0, 1), "qwen2_moe": (0,), "qwen3_moe": (1,),
              **dict.fromkeys(("granitemoe", "granitemoeshared", "granite4_moe", "granitemoe_swa"), (0, 1))}


def expert_tensors(arch, rng, hidden, inter):
    """A mixture of experts' tensors, by their names after "model.layers.{i}.": the router's spread wide
    enough that no two experts tie for a token."""
    c = ARCHS[arch]
    e = c.get("num_experts") or c.get("n_routed_experts") or c["num_local_experts"]
    f = c.get("moe_intermediate_size", inter)
    if arch == "llama4":  # stacked as they multiply, [in, out], gate's outputs first; the shared expert's [out, in]
        f = c["intermediate_size"]
        return {"feed_forward.router.weight": rng.normal(0, 1.0, (e, hidden)),
                "feed_forward.experts.gate_up_proj": rng.normal(0, 0.3, (e, hidden, 2 * f)),
                "feed_forward.experts.down_proj": rng.normal(0, 0.3, (e, f, hidden)),
                **{f"feed_forward.shared_expert.{n}_proj.weight": rng.normal(0, 0.3, s)
                   for n, s in (("gate", (f, hidden)), ("up", (f, hidden)), ("down", (hidden, f)))}}
    if arch.startswith("granite"):  # stacked as stored, [out, in], gate's outputs first; as released, or under
        # transformers 5's names (Granite SWA's); the shared expert: shared_mlp, gate and up fused
        new = arch == "granitemoe_swa"
        t = {"block_sparse_moe.router." + ("weight" if new else "layer.weight"): rng.normal(0, 1.0, (e, hidden)),
             "block_sparse_moe." + ("experts.gate_up_proj" if new else "input_linear.weight"):
                 rng.normal(0, 0.3, (e, 2 * f, hidden)),
             "block_sparse_moe." + ("experts.down_proj" if new else "output_linear.weight"):
                 rng.normal(0, 0.3, (e, hidden, f))}
        if s := c.get("shared_intermediate_size"):
            t.update({"shared_mlp.input_linear.weight": rng.normal(0, 0.3, (2 * s, hidden)),
                      "shared_mlp.output_linear.weight": rng.normal(0, 0.3, (hidden, s))})
        return t
    if arch == "gpt_oss":  # stacked as they multiply, [in, out], gate and up interleaved
        return {"mlp.router.weight": rng.normal(0, 1.0, (e, hidden)), "mlp.router.bias": rng.normal(0, 1.0, e),
                "mlp.experts.gate_up_proj": rng.normal(0, 0.3, (e, hidden, 2 * f)),
                "mlp.experts.gate_up_proj_bias": rng.normal(0, 0.5, (e, 2 * f)),
                "mlp.experts.down_proj": rng.normal(0, 0.3, (e, f, hidden)),
                "mlp.experts.down_proj_bias": rng.normal(0, 0.5, (e, hidden))}
    prefix, gate, up, down = ("block_sparse_moe.", "w1", "w3", "w2") if arch in ("mixtral", "minimax_m2") else (
        "mlp.", "gate_proj", "up_proj", "down_proj")
    t = {prefix + "gate.weight": rng.normal(0, 1.0, (e, hidden))}
    for x in range(e):
        t.update({f"{prefix}experts.{x}.{n}.weight": rng.normal(0, 0.3, s)
                  for n, s in ((gate, (f, hidden)), (up, (f, hidden)), (down, (hidden, f)))})
    if arch == "minimax_m2":  # the router's correction bias (wide enough to change choices)
        t["block_sparse_moe.e_score_correction_bias"] = rng.normal(0, 0.5, e)
    if arch in ("dots1", "glm4_moe"):  # the router's correction bias (wide enough to change choices); ungated
        t["mlp.gate.e_score_correction_bias"] = rng.normal(0, 0.5, e)  # shared experts, stored as one MLP
        s = f * c["n_shared_experts"]
        t.update({f"mlp.shared_experts.{n}_proj.weight": rng.normal(0, 0.3, shape)
                  for n, shape in (("gate", (s, hidden)), ("up", (s, hidden)), ("down", (hidden, s)))})
    if "shared_expert_intermediate_size" in c:
        s = c["shared_expert_intermediate_size"]
        t.update({"mlp.shared_expert.gate_proj.weight": rng.normal(0, 0.3, (s, hidden)),
                  "mlp.shared_expert.up_proj.weight": rng.normal(0, 0.3, (s, hidden)),
                  "mlp.shared_expert.down_proj.weight": rng.normal(0, 0.3, (hidden, s)),
                  "mlp.shared_expert_gate.weight": rng.normal(0, 1.0, (1, hidden))})
    return t


def hf_tensors(arch, rng, layers=2, hidden=32, inter=48, heads=4, kv=2, head_dim=8, vocab=64):
    """Random tensors under Hugging Face names, [out, in] layout."""
    t = {"model.embed_tokens.weight": rng.normal(0, 0.5, (vocab, hidden)),
         "model.norm.weight": rng.uniform(0.5, 1.5, hidden)}
    if not ARCHS[arch]["tie_word_embeddings"]:
        t["lm_head.weight"] = rng.normal(0, 0.5, (vocab, hidden))
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj.weight": (heads * head_dim, hidden),
                  "self_attn.k_proj.weight": (kv * head_dim, hidden),
                  "self_attn.v_proj.weight": (kv * head_dim, hidden),
                  "self_attn.o_proj.weight": (hidden, heads * head_dim),
                  "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
                  "mlp.down_proj.weight": (hidden, inter)}
        if i in MOE_LAYERS.get(arch, ()):
            shapes = {k: v for k, v in shapes.items() if not k.startswith("mlp.")}
        if arch in ("apertus", "arcee", "nemotron", "phi", "starcoder2"):  # ungated MLPs
            del shapes["mlp.gate_proj.weight"]
        if arch in ("phi", "starcoder2"):  # biases on every projection
            shapes.update({n.replace(".weight", ".bias"): s[:1] for n, s in list(shapes.items())})
        if arch in ("qwen2", "qwen2_moe", "glm", "glm4", "glm4_moe", "seed_oss", "gpt_oss", "helium", "stablelm"):
            shapes.update({"self_attn.q_proj.bias": (heads * head_dim,), "self_attn.k_proj.bias": (kv * head_dim,),
                           "self_attn.v_proj.bias": (kv * head_dim,)})
        if arch == "gpt_oss":
            shapes.update({"self_attn.o_proj.bias": (hidden,), "self_attn.sinks": (heads,)})
        if arch in ("granite_swa", "granitemoe_swa"):
            shapes["self_attn.sinks"] = (heads,)
        t.update({p + k: rng.normal(0, 0.3, s) for k, s in shapes.items()})
        if i in MOE_LAYERS.get(arch, ()):
            t.update({p + k: x for k, x in expert_tensors(arch, rng, hidden, inter).items()})
        if arch == "apertus":  # xIELU's learned parameters as transformers saves them ([1], [1], [], [])
            t.update({p + f"mlp.act_fn.{n}": rng.uniform(-1, 1, s) for n, s in (
                ("alpha_p", 1), ("alpha_n", 1), ("beta", ()), ("eps", ()))})
        if arch in ("nemotron", "phi", "stablelm", "starcoder2"):  # LayerNorms' biases (Phi's one norm's)
            t.update({p + f"{n}_layernorm.bias": rng.normal(0, 0.5, hidden)
                      for n in ("input",) + ("post_attention",) * (arch != "phi")})
        if arch in ("qwen3", "qwen3_moe", "gemma3", "exaone4", "apertus", "glm4_moe", "dots1"):
            t.update({p + f"self_attn.{n}_norm.weight": rng.uniform(0.5, 1.5, head_dim) for n in "qk"})
        if arch in ("gemma2", "gemma3"):  # (their post_attention_layernorm follows attention)
            t.update({p + f"{n}_feedforward_layernorm.weight": rng.uniform(0.5, 1.5, hidden) for n in ("pre", "post")})
        if arch in ("olmo2", "olmo3", "olmoe", "minimax_m2"):  # query and key norms over all heads
            t.update({p + "self_attn.q_norm.weight": rng.uniform(0.5, 1.5, heads * head_dim),
                      p + "self_attn.k_norm.weight": rng.uniform(0.5, 1.5, kv * head_dim)})
        if arch in ("olmo2", "olmo3", "exaone4"):  # norms after attention and the MLP only
            t[p + "post_feedforward_layernorm.weight"] = rng.uniform(0.5, 1.5, hidden)
        if arch == "hyperclovax":  # its norms after attention and the MLP
            t.update({p + f"post_norm{n}.weight": rng.uniform(0.5, 1.5, hidden) for n in (1, 2)})
        if arch == "vaultgemma":  # its norm before the MLP under Gemma 2's name, none after attention
            t[p + "pre_feedforward_layernorm.weight"] = rng.uniform(0.5, 1.5, hidden)
        if arch in ("phi3", "glm", "glm4"):  # gate and up in one tensor; Phi-3's Q, K and V in one too
            fusions = (("mlp.gate_up", ("mlp.gate", "mlp.up")),) + (
                (("self_attn.qkv", ("self_attn.q", "self_attn.k", "self_attn.v")),) if arch == "phi3" else ())
            for fused, parts in fusions:
                t[p + f"{fused}_proj.weight"] = np.concatenate([t.pop(p + f"{n}_proj.weight") for n in parts])
        if arch == "granite4":  # its MLP: [gate; up] and down as shared_mlp's input and output
            t[p + "shared_mlp.input_linear.weight"] = np.concatenate([t.pop(p + f"mlp.{n}_proj.weight")
                                                                     for n in ("gate", "up")])
            t[p + "shared_mlp.output_linear.weight"] = t.pop(p + "mlp.down_proj.weight")
        if arch == "llama4":  # its MLPs' tensors under feed_forward.
            t.update({p + "feed_forward." + k[len(p) + 4:]: t.pop(k) for k in list(t) if k.startswith(p + "mlp.")})
        if arch == "glm4":
            t.update({p + f"post_{n}_layernorm.weight": rng.uniform(0.5, 1.5, hidden) for n in ("self_attn", "mlp")})
        if arch not in ("olmo2", "olmo3", "exaone4"):
            t[p + "input_layernorm.weight"] = rng.uniform(0.5, 1.5, hidden)
        if arch not in ("cohere", "cohere2", "phi", "vaultgemma"):  # (Cohere's MLP reads the norm attention reads)
            t[p + "post_attention_layernorm.weight"] = rng.uniform(0.5, 1.5, hidden)
        if arch == "apertus":
            t.update({p + f"{theirs}_layernorm.weight": t.pop(p + f"{ours}_layernorm.weight") for ours, theirs in (
                ("input", "attention"), ("post_attention", "feedforward"))})
        if arch == "starcoder2":
            t.update({p + f"mlp.c_{theirs}.{kind}": t.pop(p + f"mlp.{ours}_proj.{kind}") for ours, theirs in (
                ("up", "fc"), ("down", "proj")) for kind in ("weight", "bias")})
        if arch == "phi":
            t.update({p + theirs + kind: t.pop(p + ours + kind) for ours, theirs in (
                ("self_attn.o_proj", "self_attn.dense"), ("mlp.up_proj", "mlp.fc1"), ("mlp.down_proj", "mlp.fc2"))
                for kind in (".weight", ".bias")})
    if arch in ("nemotron", "phi", "stablelm", "starcoder2"):
        t["model.norm.bias"] = rng.normal(0, 0.5, hidden)
    if arch == "glm4_moe":  # its multi-token prediction layer's own tensors (and a decoder layer's, one here)
        t.update({f"model.layers.{layers}.{n}": rng.normal(0, 0.3, s) for n, s in (
            ("eh_proj.weight", (hidden, 2 * hidden)), ("enorm.weight", (hidden,)), ("hnorm.weight", (hidden,)),
            ("self_attn.q_proj.weight", (heads * head_dim, hidden)))})
    if arch == "phi":
        t.update({f"model.final_layernorm.{kind}": t.pop(f"model.norm.{kind}") for kind in ("weight", "bias")})
        t["lm_head.bias"] = rng.normal(0, 0.5, vocab)
    return {k: np.asarray(v, np.float32) for k, v in t.items()}


def write_checkpoint(directory, arch, tensors, sharded=False, stored="float32", **config_overrides):
    """A checkpoint directory of `tensors`, stored as `stored` (float32, bfloat16 or float16)."""
    os.makedirs(directory, exist_ok=True)
    config = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                  rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, torch_dtype=stored)
    config.update(ARCHS[arch], **config_overrides)
    tensors = {k: v.astype(jnp.dtype(stored)) if v.dtype.kind == "f" else v for k, v in tensors.items()}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    if sharded:
        names = sorted(tensors)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for file, keys in shards.items():
            save_file({k: tensors[k] for k in keys}, os.path.join(directory, file), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f)
    else:
        save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(directory)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": TEMPLATE}, f)


def write_tokenizer(directory):
    """tokenizer.json of the word-level VOCAB."""
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(VOCAB[1:5])
    tok.save(os.path.join(directory, "tokenizer.json"))


def params_from_hf_arrays(t, cfg):
    """Our params layout built directly from HF arrays: [in, out] matrices, Q/K/V grouped by KV head,
    gate/up stacked."""
    g, d = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim

    def qkv(i, kind):
        q, k, v = (t[f"model.layers.{i}.self_attn.{n}_proj.{kind}"] for n in "qkv")
        per_kv = lambda x, n: x.reshape(cfg.num_kv_heads, n, d, *x.shape[1:])  # noqa: E731
        x = np.concatenate([per_kv(q, g), per_kv(k, 1), per_kv(v, 1)], axis=1)  # [nkv, G + 2, D, (H)]
        return jnp.asarray(np.moveaxis(x, 3, 0) if x.ndim == 4 else x)

    def layer(i):
        w = lambda n: t[f"model.layers.{i}.{n}"]  # noqa: E731
        p = {"attn_norm": jnp.asarray(w("input_layernorm.weight")),
             "mlp_norm": jnp.asarray(w("post_attention_layernorm.weight")), "wqkv": qkv(i, "weight"),
             "wo": jnp.asarray(w("self_attn.o_proj.weight").T), "w_down": jnp.asarray(w("mlp.down_proj.weight").T),
             "w_gate_up": jnp.asarray(np.stack([w("mlp.gate_proj.weight").T, w("mlp.up_proj.weight").T], axis=1))}
        if f"model.layers.{i}.self_attn.q_proj.bias" in t:
            p["bqkv"] = qkv(i, "bias")
        if f"model.layers.{i}.self_attn.q_norm.weight" in t:
            p.update({f"{n}_norm": jnp.asarray(w(f"self_attn.{n}_norm.weight")) for n in "qk"})
        return p

    p = {"embed": jnp.asarray(t["model.embed_tokens.weight"]), "final_norm": jnp.asarray(t["model.norm.weight"]),
         "layers": [layer(i) for i in range(cfg.num_layers)]}
    if "lm_head.weight" in t:
        p["lm_head"] = jnp.asarray(t["lm_head.weight"].T)
    return p


TOKENS = [1, 7, 9, 11, 30, 5, 6, 40, 41, 42, 63, 2, 17]


# (params_from_hf_arrays builds neither the tensors the loader adjusts nor the norms of Gemma, OLMo, EXAONE, GLM-4,
# Cohere, nor the experts or ungated MLPs, nor reorders RoPE's pairs)
@pytest.mark.parametrize("arch", sorted(set(ARCHS) - {"apertus", "arcee", "cohere", "cohere2", "ernie4_5", "exaone4",
                                                       "gemma", "gemma2", "gemma3", "glm", "glm4", "granite",
                                                       "granite4", "granite_swa", "helium", "hyperclovax",
                                                       "nemotron", "olmo2", "olmo3", "phi", "phi3", "stablelm",
                                                       "starcoder2", "vaultgemma",
                                                       *MOE_LAYERS}))
@pytest.mark.parametrize("sharded", [False, True])
def test_hf_checkpoint_round_trip(tmp_path, arch, sharded):
    tensors = hf_tensors(arch, np.random.default_rng(0))
    # stored, but not parameters: RoPE frequencies (older transformers), a head tied to the embedding
    extras = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}
    if ARCHS[arch]["tie_word_embeddings"]:
        extras["lm_head.weight"] = np.ones((64, 32), np.float32)
    write_checkpoint(tmp_path, arch, {**tensors, **extras}, sharded=sharded)
    m = load_hf(str(tmp_path))
    assert m.config.attention_bias == (arch in ("qwen2", "seed_oss"))
    assert m.config.qk_norm == ("head" if arch == "qwen3" else None)
    assert m.config.sliding_window == (5 if arch in ("cwm", "mistral", "ministral", "smollm3") else None)
    assert m.config.window_layers == ((1,) if arch in ("cwm", "ministral", "smollm3") else None)
    assert m.config.nope_layers == ((1,) if arch == "smollm3" else ())
    ids = jnp.asarray([TOKENS])
    got = forward_causal(m.params, m.config, ids).logits
    want = forward_causal(params_from_hf_arrays(tensors, m.config), m.config, ids).logits
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def assert_logits_match_transformers(m, hf=None, directory=None):
    """Our forward of TOKENS gives the logits of transformers' own model `hf` (or the one it loads from
    `directory`, in float32), up to float32 rounding."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if hf is None:
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                               attn_implementation="eager")
    with torch.no_grad():
        ref = hf(torch.tensor([TOKENS])).logits[0].numpy()
    ours = np.asarray(forward_causal(m.params, m.config, jnp.asarray([TOKENS])).logits[0])
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_hf_checkpoint_matches_transformers(tmp_path, arch):
    """Reference: transformers' own module for each architecture (`ARCHS`) on the same directory: RoPE layout,
    llama3 rope scaling, EXAONE 4's windowed layer with RoPE beside a global one without, Gemma's norms, GeGLU and
    scaled embeddings (Gemma 1's GELU under its legacy name; Gemma 2's query scale without a query norm, with soft
    caps, VaultGemma's without the norms after attention and the MLP; Gemma 3's windowed layer with its own RoPE
    base), CWM's windowed layer and default Llama 3 RoPE scaling, Granite's multipliers, Qwen2 biases, Mistral's
    sliding window, Ministral's in one layer of two, OLMo 2's norms after attention and the MLP only and over all
    query and key heads (OLMo 3's too, its windowed layer without the YaRN scaling of the other), Phi-3's fused
    tensors and window, Qwen3 query and key norms, SmolLM3's NoPE layer with a window of its own; the mixtures of
    experts (Mixtral's, OLMoE's, Qwen2-MoE's and Qwen3-MoE's); GLM's RoPE on half of each head's adjacent
    dimensions, its fused gate and up and Q/K/V biases, GLM-4's norms after attention and the MLP; GLM-4.5's
    experts routed as DeepSeek-V3's (corrected sigmoids in groups, scaled) after a dense layer, beside a shared
    expert, its RoPE on half of each head and a multi-token prediction layer left unread; dots.llm1's likewise
    routed beside two shared experts, with Qwen3's query and key norms and a window from max_window_layers on;
    MiniMax-M2's likewise routed without groups, its query and key norms over all heads, RoPE on half of each;
    ERNIE 4.5's and Helium's RoPE over adjacent dimensions (Helium's Q/K/V biased); Seed-OSS's Q/K/V biases;
    Granite 4's attention-only model, its MLP stored fused; Granite's mixtures of experts, stored fused (as
    released, and under transformers 5's names), beside a shared expert (GraniteMoeShared's, Granite 4's), Granite
    SWA's sinks, windows and RoPE bases per layer (none in one); Cohere's LayerNorms, its attention and MLP side
    by side and its logit scale (Cohere 2's windowed layer with RoPE beside a global one without); Apertus's
    ungated MLP of xIELU activations (their learned parameters drawn, beta and eps stored as scalars) and query
    and key norms; Nemotron's biased LayerNorms scaling by 1 + w, its ungated MLP of squared ReLUs and RoPE on
    half of each head; Arcee's ungated MLP; StarCoder2's LayerNorms, its ungated MLP of GELUs (stored as c_fc and
    c_proj), biases on every projection and window in every layer; StableLM's LayerNorms with biases, RoPE on a
    quarter of each head and Q/K/V biases."""
    write_checkpoint(tmp_path, arch, hf_tensors(arch, np.random.default_rng(1)))
    assert_logits_match_transformers(load_hf(str(tmp_path)), directory=tmp_path)


MXFP4 = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                               "model.embed_tokens", "lm_head"]}


def gpt_oss_mxfp4_tensors(rng, experts=4, hidden=64, inter=64, **kw):
    """A GPT-OSS checkpoint's tensors as OpenAI released it: the experts' projections in MXFP4 ([out, in]:
    random 4-bit codes, each 32 of them scaled by a power of two, 2^-6 to 2^-2)."""
    t = hf_tensors("gpt_oss", rng, hidden=hidden, inter=inter, **kw)
    for i in range(2):
        p = f"model.layers.{i}.mlp.experts."
        del t[p + "gate_up_proj"], t[p + "down_proj"]
        for name, (out, inputs) in (("gate_up_proj", (2 * inter, hidden)), ("down_proj", (hidden, inter))):
            t[p + name + "_blocks"] = rng.integers(0, 256, (experts, out, inputs // 32, 16)).astype(np.uint8)
            t[p + name + "_scales"] = rng.integers(121, 126, (experts, out, inputs // 32)).astype(np.uint8)
    return t


def dequantized(blocks, scales):
    """MXFP4 codes [..., G, 16] and scales [..., G] as float32 values [..., G x 32]."""
    return np.asarray(Mxfp4(jnp.asarray(blocks), jnp.asarray(scales), (0,)).dequantize(jnp.float32))


def test_mxfp4_dequantizes_as_transformers_does():
    """Our MXFP4 weights ([E, out, in] codes and scales, as GPT-OSS stores them) dequantize, gathered or not,
    to transformers' values ([E, in, out]), scales from 2^-118 to 2^8 (below float32's normal range, which
    no checkpoint reaches, XLA flushes values to zero)."""
    torch = pytest.importorskip("torch")
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 8, 2, 16)).astype(np.uint8)
    scales = rng.integers(9, 136, (3, 8, 2)).astype(np.uint8)
    want = convert_moe_packed_tensors(torch.tensor(blocks), torch.tensor(scales), dtype=torch.float32).numpy()
    w = Mxfp4(jnp.asarray(blocks), jnp.asarray(scales), (1, 0))
    assert w.shape == want.shape == (3, 64, 8)
    np.testing.assert_array_equal(np.asarray(w.dequantize(jnp.float32)), want)
    np.testing.assert_array_equal(np.asarray(w[jnp.asarray([[2, 0]])].dequantize(jnp.float32)), want[[[2, 0]]])


def test_gpt_oss_mxfp4_checkpoint_loads_as_transformers_dequantizes_it(tmp_path):
    """GPT-OSS as released, its experts in MXFP4: ours, kept in MXFP4 (a quarter of bfloat16's bytes) and
    dequantized as they multiply, give the logits of transformers' model dequantising the same checkpoint."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    write_checkpoint(tmp_path, "gpt_oss", gpt_oss_mxfp4_tensors(np.random.default_rng(3)), hidden_size=64,
                     intermediate_size=64, quantization_config=MXFP4)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32, attn_implementation="eager",
        quantization_config=transformers.Mxfp4Config(dequantize=True))
    m = load_hf(str(tmp_path))
    experts = m.params["layers"][0]["experts_gate_up"]
    assert m.config.expert_format == "mxfp4" and experts.blocks.dtype == np.uint8 and experts.shape == (4, 64, 2, 64)
    assert_logits_match_transformers(m, hf)
    # or dequantized as they load (--dequantize-experts), each read's blocks only: the same model
    dense = load_hf(str(tmp_path), dequantize_experts=True)
    assert dense.config.expert_format == "dense"
    assert dense.params["layers"][0]["experts_gate_up"].shape == (4, 64, 2, 64)
    ids = jnp.asarray([TOKENS])
    np.testing.assert_array_equal(np.asarray(forward_causal(dense.params, dense.config, ids).logits),
                                  np.asarray(forward_causal(m.params, m.config, ids).logits))


@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
def test_half_precision_checkpoint_loads_as_transformers_reads_it(tmp_path, stored):
    """Most published checkpoints store bfloat16 (some float16), which NumPy alone cannot read: loaded in
    float32 they are the stored values exactly, as transformers loads them; in bfloat16, bfloat16's own."""
    tensors = hf_tensors("llama", np.random.default_rng(3))
    write_checkpoint(tmp_path, "llama", tensors, stored=stored)
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {{"bfloat16": "BF16", "float16": "F16"}[stored]}
    m = load_hf(str(tmp_path))
    held = {k: v.astype(jnp.dtype(stored)).astype(np.float32) for k, v in tensors.items()}
    want = params_from_hf_arrays(held, m.config)
    leaves = jax.tree_util.tree_leaves
    assert all(np.array_equal(a, b) for a, b in zip(leaves(m.params), leaves(want)))
    assert_logits_match_transformers(m, directory=tmp_path)
    if stored == "bfloat16":
        b = load_hf(str(tmp_path), dtype="bfloat16").params["embed"]
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(b), tensors["model.embed_tokens.weight"].astype(jnp.bfloat16))


def test_checkpoint_saved_by_transformers_5_loads_with_its_rope(tmp_path):
    """transformers >= 5 saves the RoPE base and scaling as `rope_parameters` (no `rope_theta` key): a
    Llama 3 style model saved by transformers itself gives transformers' logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=500000.0, initializer_range=0.3,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(str(tmp_path))
    write_tokenizer(tmp_path)
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    assert "rope_theta" not in saved and "rope_scaling" not in saved  # what this test is about
    m = load_hf(str(tmp_path))
    assert m.config.rope_theta == 500000.0 and m.config.rope_scaling.factor == 8.0
    assert m.config.rope_scaling == config_from_hf({**saved, "rope_parameters": None, "rope_theta": 500000.0,
                                                    "rope_scaling": config.rope_parameters}).rope_scaling
    assert_logits_match_transformers(m, hf)


def transformers_model(arch, **overrides):
    """transformers' own model of `arch` (`ARCHS`, the tests' sizes, `overrides`), its weights drawn by
    transformers (seed 0, wider than its default so that every part of the model shows in the logits)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    c = {**dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64), **ARCHS[arch], **overrides}
    config = transformers.AutoConfig.for_model(c.pop("model_type"), initializer_range=0.3, **c)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    return hf.eval()


def saved_with_biases_and_norms_drawn(hf, directory):
    """transformers' model `hf` with its biases, norm weights and activations' parameters drawn (transformers
    starts them at constants), saved by transformers into `directory` with the tests' tokenizer, and loaded by
    us."""
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        for name, w in [*hf.named_parameters(), *hf.named_buffers()]:
            if name.endswith("bias") or "norm" in name or ".act_fn." in name:
                w.uniform_(-0.5, 1.5 if "norm" in name and not name.endswith("bias") else 0.5)
    hf.save_pretrained(str(directory))
    write_tokenizer(directory)
    return load_hf(str(directory))


@pytest.mark.parametrize("arch, saved", [
    ("granite4", {"layer_types": ["full_attention"] * 2}),  # not the "attention" of IBM's checkpoints
    ("qwen3_moe", {"num_local_experts": 4}),  # not num_experts, as Qwen's checkpoints name it
])
def test_checkpoint_saved_by_transformers_5_loads_under_its_new_names(tmp_path, arch, saved):
    """transformers >= 5 saves some settings under new names (`saved`: what this test is about): Granite 4's
    layer kinds, Qwen3-MoE's expert count. A model saved by transformers itself gives its logits."""
    hf = transformers_model(arch, **{"qwen3_moe": dict(num_experts=4, num_experts_per_tok=2)}.get(arch, {}))
    hf.save_pretrained(str(tmp_path))
    write_tokenizer(tmp_path)
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert {k: written.get(k) for k in saved} == saved and "num_experts" not in written
    assert_logits_match_transformers(load_hf(str(tmp_path)), hf)


@pytest.mark.parametrize("arch", ["llama", "granite", "gemma2", "cohere", "olmo2", "llama4", "glm", "seed_oss",
                                  "mistral", "dots1", "minimax_m2"])
def test_attention_biases_are_read_as_transformers_reads_them(tmp_path, arch):
    """attention_bias biases Q, K, V and the output projection in most of transformers' models (Granite's
    output bias scaled by its residual multiplier, Cohere's and Llama 4's queries and keys reordered for
    RoPE), Q, K and V only in GLM's and Seed-OSS's (whose attention_out_bias biases the output), and
    nothing in Mistral's and MiniMax-M2's: a model saved by transformers itself, its biases drawn (dots.llm1's
    and MiniMax-M2's routers' correction biases too), gives its logits."""
    hf = transformers_model(arch, attention_bias=True, attention_out_bias=arch == "seed_oss")
    m = saved_with_biases_and_norms_drawn(hf, tmp_path)
    unbiased = arch in ("mistral", "minimax_m2")
    assert (m.config.attention_bias, m.config.output_bias) == (not unbiased, not unbiased and arch != "glm")
    assert_logits_match_transformers(m, hf)


@pytest.mark.parametrize("arch", ["apertus", "arcee", "nemotron"])
def test_ungated_mlps_saved_by_transformers_give_its_logits(tmp_path, arch):
    """Apertus's xIELU, its learned parameters drawn (beta and eps saved as scalars), and Arcee's and
    Nemotron's squared ReLU in ungated MLPs, Nemotron's LayerNorms with biases, their weights w scaling by
    1 + w: a model saved by transformers itself (its config.json as transformers writes it: Nemotron's
    partial RoPE in its RoPE parameters), with attention biases, gives its logits."""
    hf = transformers_model(arch, attention_bias=True)
    m = saved_with_biases_and_norms_drawn(hf, tmp_path)
    assert (m.config.gated_mlp, m.config.norm_bias, m.config.output_bias) == (False, arch == "nemotron", True)
    assert_logits_match_transformers(m, hf)


def test_phi_saved_by_transformers_gives_its_logits(tmp_path):
    """Phi-2's layer: one LayerNorm (with a bias) read by attention and the MLP side by side, biases on Q, K,
    V, the output projection, the ungated MLP of GELUs and the LM head, RoPE on half of each head: a model
    saved by transformers itself, its biases and norms drawn, gives its logits."""
    m = saved_with_biases_and_norms_drawn(hf := transformers_model("phi"), tmp_path)
    c = m.config
    assert (c.parallel_block, c.lm_head_bias, c.mlp_bias, c.output_bias, c.gated_mlp, c.rotary_dim) == (
        True, True, True, True, False, 4)
    assert_logits_match_transformers(m, hf)


@pytest.mark.parametrize("arch", ["llama", "granite", "smollm3", "nemotron", "arcee", "ernie4_5", "starcoder2",
                                  "mistral"])
def test_mlp_biases_are_read_as_transformers_reads_them(tmp_path, arch):
    """mlp_bias biases the dense MLP's projections in Llama's, Granite's (its down projection's bias scaled by
    the residual multiplier, as its weight), SmolLM3's, Nemotron's and Arcee's models (ungated: up and down),
    use_bias ERNIE 4.5's and StarCoder2's with attention's (StarCoder2's MLP ungated, of GELUs, beside
    LayerNorms with biases), and Mistral's ignores it: a model saved by transformers itself, its biases drawn,
    gives its logits."""
    hf = transformers_model(arch, **{"use_bias" if arch in ("ernie4_5", "starcoder2") else "mlp_bias": True})
    m = saved_with_biases_and_norms_drawn(hf, tmp_path)
    assert m.config.mlp_bias == (arch != "mistral")
    assert_logits_match_transformers(m, hf)


@pytest.mark.parametrize("parallel", [False, True])
def test_stablelm_attention_and_mlp_in_turn_or_side_by_side_give_transformers_logits(tmp_path, parallel):
    """StableLM's LayerNorms with biases, RoPE on a quarter of each head and Q/K/V biases, its attention and MLP
    in turn or side by side (use_parallel_residual: one norm, as Cohere's): a model saved by transformers
    itself, its biases and norms drawn, gives its logits either way."""
    hf = transformers_model("stablelm", use_parallel_residual=parallel)
    m = saved_with_biases_and_norms_drawn(hf, tmp_path)
    assert (m.config.parallel_block, m.config.attention_bias, m.config.output_bias, m.config.rotary_dim) == (
        parallel, True, False, 2)
    assert_logits_match_transformers(m, hf)


# Command R+'s and StableLM 2 12B's query and key LayerNorms with weights per head, by the settings that turn them on
PER_HEAD_QK_NORMS = [("cohere", dict(use_qk_norm=True)),
                     ("stablelm", dict(qk_layernorm=True, use_parallel_residual=True))]


@pytest.mark.parametrize("arch, setting", PER_HEAD_QK_NORMS)
def test_per_head_query_and_key_layernorms_give_transformers_logits(tmp_path, arch, setting):
    """Command R+'s and StableLM 2 12B's LayerNorms of each query and key head, each head with weights of its
    own (Cohere's stored [heads, head_dim], its dims reordered for its RoPE over adjacent ones; StableLM's
    one tensor per head, on a quarter of each head's RoPE): a model saved by transformers itself, its norms
    drawn, gives its logits."""
    hf = transformers_model(arch, **setting)
    m = saved_with_biases_and_norms_drawn(hf, tmp_path)
    assert (m.config.qk_norm, m.config.layer_norm) == ("per_head", True)
    assert_logits_match_transformers(m, hf)


@pytest.mark.parametrize("post_norm", [True, False])
def test_hyperclovax_residual_multiplier_scales_its_post_norms_or_its_projections(tmp_path, post_norm):
    """HyperCLOVA X's residual multiplier scales a branch after its norm where use_post_norm says (folded into
    that norm), else its output projection, bias included (folded into them): a model saved by transformers
    itself, its norms and biases drawn, gives its logits either way."""
    hf = transformers_model("hyperclovax", use_post_norm=post_norm, attention_bias=True)
    m = saved_with_biases_and_norms_drawn(hf, tmp_path)
    assert (m.config.post_norms, m.config.output_bias) == (post_norm, True)
    assert_logits_match_transformers(m, hf)


def randomize_gemma_norms(hf):
    """transformers' Gemma model `hf` with its norm weights w, which scale by 1 + w, drawn away from 0."""
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        for name, w in hf.named_parameters():
            if "norm" in name:
                w.uniform_(-0.5, 0.5)
    return hf


def test_gemma3_saved_by_transformers_5_loads_with_its_rope_per_layer_kind(tmp_path):
    """transformers 5 saves Gemma 3's two RoPE bases as a set per layer kind (`rope_parameters`), the global
    one with its linear scaling (Gemma 3 4B's): a model saved by transformers itself gives its logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=4, sliding_window_pattern=3,
        query_pre_attn_scalar=24, initializer_range=0.3, rope_theta=1e4, rope_local_base_freq=50.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0})
    torch.manual_seed(0)
    hf = randomize_gemma_norms(transformers.Gemma3ForCausalLM(config).eval())
    hf.save_pretrained(str(tmp_path))
    write_tokenizer(tmp_path)
    with open(tmp_path / "config.json") as f:
        assert set(json.load(f)["rope_parameters"]) == {"full_attention", "sliding_attention"}  # what this is about
    m = load_hf(str(tmp_path))
    assert (m.config.rope_theta, m.config.rope_scaling.factor, m.config.local_rope_theta) == (1e4, 8.0, 50.0)
    assert m.config.window_layers == (0, 1) and m.config.sliding_window == 4
    assert_logits_match_transformers(m, hf)


@pytest.mark.parametrize("layout", ["saved", "transformers 5"])
def test_gemma3_multimodal_checkpoint_loads_its_text_model(tmp_path, layout):
    """Gemma 3 4B-27B are multimodal checkpoints: the text model (its config's text_config, its tensors
    under language_model.model. as transformers saves them, or model.language_model. as it names them)
    loads alone, the vision tower left out, with the processor's chat template; it gives the logits of
    transformers' multimodal model on text."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    text = transformers.Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4, sliding_window_pattern=2,
        initializer_range=0.3)
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=63, boi_token_index=61, eoi_token_index=62)
    torch.manual_seed(0)
    hf = randomize_gemma_norms(transformers.Gemma3ForConditionalGeneration(config).eval())
    hf.save_pretrained(str(tmp_path))
    if layout == "transformers 5":
        with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
            tensors = {k.replace("language_model.model.", "model.language_model."): f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(tmp_path)
    with open(tmp_path / "chat_template.json", "w") as f:
        json.dump({"chat_template": TEMPLATE}, f)
    m = load_hf(str(tmp_path))
    assert m.config.post_norms and m.config.window_layers == (0,)
    assert m.tokenizer.apply_chat_template([{"role": "user", "content": "w1"}]) == "<|user|> w1 <|assistant|>"
    assert_logits_match_transformers(m, hf)


@pytest.mark.parametrize("layout, text_model", [("saved", "mistral"), ("transformers 5", "mistral"),
                                                ("saved", "ministral3")])
def test_mistral3_multimodal_checkpoint_loads_its_text_model(tmp_path, layout, text_model):
    """Mistral Small 3.1 and 3.2 and Ministral 3 are multimodal checkpoints (Mistral3ForConditionalGeneration):
    the text model, a Mistral or a Ministral 3 (YaRN, and its queries scaled up with their position, here
    from position 4 on), loads alone, the vision tower and projector left out, and gives the logits of
    transformers' multimodal model on text; a text model of a kind the loader lacks is refused by name."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    size = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=None,
                initializer_range=0.3)
    text = transformers.MistralConfig(**size) if text_model == "mistral" else transformers.Ministral3Config(
        **size, rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=4,
                                     beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                                     llama_4_scaling_beta=0.5))
    vision = transformers.PixtralVisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=28, patch_size=14, head_dim=8)
    config = transformers.Mistral3Config(text_config=text, vision_config=vision, image_token_index=63,
                                         tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.Mistral3ForConditionalGeneration(config).eval()
    hf.save_pretrained(str(tmp_path))
    if layout == "transformers 5":
        with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
            tensors = {k.replace("language_model.model.", "model.language_model.").replace(
                "language_model.lm_head.", "lm_head."): f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(tmp_path)
    m = load_hf(str(tmp_path))
    assert m.config.sliding_window is None and not m.config.tie_word_embeddings and "lm_head" in m.params
    assert m.config.query_scaling == (QueryScaling(0.5, 4) if text_model == "ministral3" else None)
    assert_logits_match_transformers(m, hf)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["text_config"]["model_type"] = "mistral4"
    with pytest.raises(ValueError, match="unsupported text model 'mistral4' of Mistral3ForConditionalGeneration"):
        config_from_hf(saved)


def test_llama4_multimodal_checkpoint_loads_its_text_model(tmp_path):
    """Llama 4 Scout and Maverick are released as Llama4ForConditionalGeneration: the text model (chunked
    attention in layer 0, a NoPE layer 1 with scaled queries and a mixture of experts) loads alone, the
    vision tower and projector left out, and gives the logits of transformers' multimodal model on text."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    text = transformers.Llama4TextConfig(**{k: v for k, v in ARCHS["llama4"].items() if k != "architectures"},
                                         vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                                         initializer_range=0.3)
    vision = transformers.Llama4VisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14, vision_output_dim=16,
                                             projector_input_dim=16, projector_output_dim=32, pixel_shuffle_ratio=0.5)
    config = transformers.Llama4Config(text_config=text, vision_config=vision, image_token_index=63,
                                       boi_token_index=61, eoi_token_index=62)
    torch.manual_seed(0)
    hf = transformers.Llama4ForConditionalGeneration(config).eval()
    hf.save_pretrained(str(tmp_path))
    write_tokenizer(tmp_path)
    m = load_hf(str(tmp_path))
    assert m.config.window_chunks and m.config.nope_layers == (1,) and m.config.routing == "sigmoid_input"
    assert_logits_match_transformers(m, hf)


@pytest.mark.parametrize("arch, layout", [("qwen2_5_vl", "saved"), ("qwen2_5_vl", "transformers 4"),
                                          ("qwen3_vl", "saved")])
def test_qwen_vl_checkpoint_loads_its_text_model(tmp_path, arch, layout):
    """Qwen2.5-VL and Qwen3-VL checkpoints load their text models (Qwen2's with biases and here a tied LM head,
    Qwen3's with query and key norms), the vision tower left out, and give the logits of transformers'
    multimodal model on text, whose multimodal RoPE (its sections here uneven) is then the text model's;
    Qwen2.5-VL's tensors as its releases store them (the text model's beside `visual.`), its config also
    as transformers 4 wrote it (the text model's settings at the top level, RoPE "mrope")."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64, initializer_range=0.3,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                                 **({"mrope_interleaved": True} if arch == "qwen3_vl" else {"type": "mrope"})})
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                  **({"deepstack_visual_indexes": [0]} if arch == "qwen3_vl" else {"fullatt_block_indexes": [0]}))
    name = {"qwen2_5_vl": "Qwen2_5_VL", "qwen3_vl": "Qwen3VL"}[arch]
    # Qwen2.5-VL's LM head tied to its embedding (3B's), as its config's top level says
    config = getattr(transformers, f"{name}Config")(text_config=text, vision_config=vision,
                                                    tie_word_embeddings=arch == "qwen2_5_vl")
    torch.manual_seed(0)
    hf = getattr(transformers, f"{name}ForConditionalGeneration")(config).eval()
    hf.save_pretrained(str(tmp_path))
    write_tokenizer(tmp_path)
    if layout == "transformers 4":
        saved = json.loads((tmp_path / "config.json").read_text())
        top = {**saved.pop("text_config"), **saved, "model_type": "qwen2_5_vl"}
        top.pop("rope_parameters")
        top["rope_scaling"], top["rope_theta"] = {"type": "mrope", "mrope_section": [1, 1, 2]}, 10000.0
        (tmp_path / "config.json").write_text(json.dumps(top))
    m = load_hf(str(tmp_path))
    assert m.config.attention_bias == (arch == "qwen2_5_vl") and m.config.rope_scaling is None
    assert m.config.qk_norm == ("head" if arch == "qwen3_vl" else None)
    assert m.config.tie_word_embeddings == ("lm_head" not in m.params) == (arch == "qwen2_5_vl")
    assert_logits_match_transformers(m, hf)


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("arch, rope", [
    ("qwen2", YARN),  # Qwen2.5's long-context setting, as its model cards add it
    ("llama", {**YARN, "beta_fast": 8, "beta_slow": 2, "truncate": False, "attention_factor": 1.3}),
    ("llama", {**YARN, "factor": None, "mscale": 1.0, "mscale_all_dim": 0.5}),  # factor None: 64 / 16, as DeepSeek-V3
])
def test_yarn_checkpoint_matches_transformers(tmp_path, arch, rope):
    """YaRN: frequencies between interpolated and kept, cos and sin scaled by the attention factor (from the
    factor, from mscale / mscale_all_dim, or given), as transformers computes them."""
    write_checkpoint(tmp_path, arch, hf_tensors(arch, np.random.default_rng(4)), rope_scaling=rope)
    m = load_hf(str(tmp_path))
    assert m.config.rope_scaling.kind == "yarn" and m.config.rope_cos_sin_scale() > 1
    assert_logits_match_transformers(m, directory=tmp_path)


def phi_longrope(head_dim, partial=0.5):
    """Phi-4-mini's kind of RoPE at a tiny size: on part of each head (`partial`), LongRoPE's factors from
    position 8 on differing from those before it."""
    n = int(head_dim * partial) // 2
    return dict(partial_rotary_factor=partial, original_max_position_embeddings=8, sliding_window=None,
                rope_scaling={"type": "longrope", "short_factor": [1.0 + i / n for i in range(n)],
                              "long_factor": [2.0 + 3 * i for i in range(n)]})


@pytest.mark.parametrize("partial", [0.5, 1.0])
def test_phi3_longrope_matches_transformers_decoding_token_by_token(tmp_path, partial):
    """Phi-3.5's and Phi-4-mini's LongRoPE (and Phi-4-mini's RoPE on part of each head): transformers'
    logits while it decodes a token at a time from a prompt within the original context (8 positions) past
    it, where each key keeps the factors of its own position, are our forward's of the whole sequence."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    write_checkpoint(tmp_path, "phi3", hf_tensors("phi3", np.random.default_rng(5)), **phi_longrope(8, partial))
    m = load_hf(str(tmp_path))
    assert m.config.rotary_dim == (4 if partial < 1 else None) and m.config.long_rope_from() == 8
    assert m.config.rope_scaling.cos_sin_scale() == pytest.approx((1 + math.log(8) / math.log(8)) ** 0.5)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                           attn_implementation="eager")
    # the KV cache, which each forward extends in place, under the name this transformers version gives it
    cache = {"cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values":
             transformers.DynamicCache()}
    with torch.no_grad():
        logits = [hf(torch.tensor([ids]), use_cache=True, **cache).logits[0] for ids in [TOKENS[:5]] + [
            [t] for t in TOKENS[5:]]]
    ours = np.asarray(forward_causal(m.params, m.config, jnp.asarray([TOKENS])).logits[0])
    np.testing.assert_allclose(ours, torch.cat(logits).numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config", [
    {"rope_scaling": {**YARN, "original_max_position_embeddings": 32768}, "max_position_embeddings": 131072,
     "rope_theta": 1e6, "head_dim": 128},  # Qwen3's model card
    {"rope_scaling": {**YARN, "beta_fast": 8, "beta_slow": 2, "truncate": False}},
    {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}},  # the original context: max_position_embeddings
    {"rope_scaling": {**YARN, "factor": None, "mscale": 0.7, "mscale_all_dim": 1.0}},
    {"rope_scaling": YARN, "original_max_position_embeddings": 8},  # a top-level one comes first
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
])
def test_rope_scaling_is_read_as_transformers_computes_it(config):
    """The frequencies and the cos/sin scale of transformers' own RoPE functions, keys left out included."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    c = {"vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4, "head_dim": 8, "max_position_embeddings": 64,
         "rope_theta": 1e4, **config}
    ours = config_from_hf({"architectures": ["LlamaForCausalLM"], **c})
    theirs = transformers.LlamaConfig(**copy.deepcopy(c))  # which fills in the keys left out, in place
    inv_freq, scale = ROPE_INIT_FUNCTIONS[theirs.rope_parameters["rope_type"]](theirs, "cpu")
    np.testing.assert_allclose(ours.rope_inv_freq(), inv_freq.numpy(), rtol=1e-6)
    assert ours.rope_cos_sin_scale() == pytest.approx(scale, rel=1e-12)


@pytest.mark.parametrize("arch, config, window", [
    ("MistralForCausalLM", {"sliding_window": 5}, (5, None)),
    ("MistralForCausalLM", {"sliding_window": None}, (None, None)),
    ("MistralForCausalLM", {}, (4096, None)),  # transformers' default when config.json leaves it out
    ("LlamaForCausalLM", {"sliding_window": 5}, (None, None)),  # transformers' Llama has no window
    ("Qwen2ForCausalLM", {"sliding_window": 5}, (None, None)),  # without use_sliding_window
    ("Qwen3ForCausalLM", {"sliding_window": 5, "use_sliding_window": True, "max_window_layers": 0}, (5, None)),
    ("Qwen3ForCausalLM", {"sliding_window": 5, "use_sliding_window": True, "max_window_layers": 2}, (None, None)),
    ("Qwen2ForCausalLM", {"sliding_window": 5, "use_sliding_window": True, "max_window_layers": 1}, (5, (1,))),
    ("Qwen2ForCausalLM", {"sliding_window": 5, "use_sliding_window": True,
                          "layer_types": ["sliding_attention", "full_attention"]}, (5, (0,))),
    ("SmolLM3ForCausalLM", {"sliding_window": 5, "use_sliding_window": True, "no_rope_layers": [1, 0]}, (5, (1,))),
    ("SmolLM3ForCausalLM", {"sliding_window": 5, "no_rope_layers": [1, 0]}, (None, None)),
    ("MinistralForCausalLM", {}, (4096, None)),
    ("MinistralForCausalLM", {"sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"]},
     (5, (0,))),
    ("MistralForCausalLM", {"sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"]},
     "unsupported layer_types"),  # transformers' Mistral would ignore them
    ("Qwen2ForCausalLM", {"sliding_window": 5, "use_sliding_window": True, "layer_types": ["chunked_attention"] * 2},
     "unsupported layer_types"),
])
def test_sliding_window_is_read_as_transformers_reads_it(arch, config, window):
    """The window and the layers it applies to: Qwen2/Qwen3 window the layers from max_window_layers on
    (or as layer_types says), SmolLM3 its NoPE layers, both only with use_sliding_window; Ministral the
    layers layer_types says (by default all), Mistral every layer, Llama none."""
    c = {"architectures": [arch], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, **config}
    if isinstance(window, str):
        with pytest.raises(ValueError, match=window):
            config_from_hf(c)
    else:
        ours = config_from_hf(c)
        assert (ours.sliding_window, ours.window_layers) == window


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_missing_config_keys_read_as_transformers_reads_them(arch):
    """A config.json that leaves keys out (written by hand, or saved without its model, so without
    `architectures`) loads with what transformers' config classes assume, not with guesses of ours."""
    transformers = pytest.importorskip("transformers")
    if arch == "GraniteMoeHybridForCausalLM":  # whose defaults are a Mamba hybrid, which is refused
        with pytest.raises(ValueError, match="not its Mamba layers"):
            config_from_hf({"architectures": [arch]})
        return
    llama4, deepseek, given = arch == "Llama4ForCausalLM", arch in ("Glm4MoeForCausalLM", "Dots1ForCausalLM"), {}
    if arch == "Glm4MoeForCausalLM":  # its default heads, 4096 / 96 = 42 wide, would rotate an odd 21 dimensions
        with pytest.raises(ValueError, match="RoPE on 21 of a head's 42 dimensions"):
            config_from_hf({"architectures": [arch]})
        given = {"head_dim": 128}  # (GLM-4.5's)
    if arch == "Dots1ForCausalLM":  # whose experts have no defaults (transformers' model needs them): dots.llm1's
        given = {"n_routed_experts": 128, "num_experts_per_tok": 6, "n_shared_experts": 2}
    text_configs = {"Gemma3ForCausalLM": "Gemma3TextConfig", "Llama4ForCausalLM": "Llama4TextConfig"}
    theirs = getattr(transformers, text_configs.get(arch, arch.replace("ForCausalLM", "Config")))(**given)
    ours = config_from_hf({"architectures": [arch], **given})
    assert config_from_hf({"model_type": theirs.model_type, **given}) == ours
    rope = getattr(theirs, "rope_parameters", None) or {}
    local = rope.get("sliding_attention", {}).get("rope_theta")  # Gemma 3: a set for each layer kind
    rope_theta = rope.get("full_attention", rope).get("rope_theta", getattr(theirs, "rope_theta", None))
    kinds = getattr(theirs, "layer_types", None) or ["sliding_attention"] * ours.num_layers  # Mistral: all
    sliding = tuple(i for i, kind in enumerate(kinds) if kind in ("sliding_attention", "chunked_attention"))
    window = getattr(theirs, "attention_chunk_size" if llama4 else "sliding_window", None) if sliding else None
    window_layers = None if len(sliding) == ours.num_layers or not window else sliding
    nope = [i for i, rope in enumerate(getattr(theirs, "no_rope_layers", None) or [1] * ours.num_layers) if not rope]
    if arch == "Exaone4ForCausalLM" and window_layers or arch == "Cohere2ForCausalLM":  # RoPE where windowed
        nope = [i for i, kind in enumerate(kinds) if kind == "full_attention"]
    assert (ours.nope_layers, ours.window_layers, ours.local_rope_theta) == (tuple(nope), window_layers, local)
    head_dim = getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads
    assert (ours.vocab_size, ours.hidden_size, ours.intermediate_size, ours.num_layers, ours.num_heads,
            ours.num_kv_heads, ours.head_dim, ours.max_position_embeddings, ours.rope_theta, ours.rms_norm_eps,
            ours.tie_word_embeddings, ours.sliding_window, ours.bos_token_id, ours.eos_token_ids) == (
        theirs.vocab_size, theirs.hidden_size, theirs.intermediate_size_mlp if llama4 else theirs.intermediate_size,
        theirs.num_hidden_layers,
        theirs.num_attention_heads, theirs.num_key_value_heads or theirs.num_attention_heads,  # (Nemotron's: None)
        head_dim, theirs.max_position_embeddings,
        rope_theta, next(getattr(theirs, key) for key in ("rms_norm_eps", "norm_eps", "norm_epsilon", "layer_norm_eps")
                         if getattr(theirs, key, None) is not None),
        theirs.tie_word_embeddings,
        window, theirs.bos_token_id,
        () if theirs.eos_token_id is None else tuple(np.atleast_1d(theirs.eos_token_id).tolist()))
    partial = rope.get("partial_rotary_factor", getattr(theirs, "partial_rotary_factor", 1.0))
    assert ours.rotary == int(head_dim * partial)
    scaling = rope.get("full_attention", rope)  # GPT-OSS's default: YaRN
    assert ours.query_scaling == (  # Ministral 3's; Llama 4's in its NoPE layers
        QueryScaling(scaling["llama_4_scaling_beta"], scaling["original_max_position_embeddings"])
        if "llama_4_scaling_beta" in scaling else
        QueryScaling(theirs.attn_scale, theirs.floor_scale, offset=1, nope_only=True) if llama4 else None)
    s = ours.rope_scaling
    assert (s and (s.kind, s.factor, s.original_max_position, s.truncate)) == (
        None if scaling.get("rope_type", "default") == "default" else (
            scaling["rope_type"], scaling["factor"], scaling["original_max_position_embeddings"],
            scaling.get("truncate", True)))
    experts = getattr(theirs, "num_experts", None) or getattr(theirs, "num_local_experts", 0)
    assert (ours.num_experts, ours.experts_per_token, ours.expert_size, ours.norm_topk, ours.shared_expert_size) == (
        experts, getattr(theirs, "num_experts_per_tok", 0) if experts else 0,
        getattr(theirs, "moe_intermediate_size", theirs.intermediate_size) if experts else 0,
        getattr(theirs, "norm_topk_prob", bool(experts) and not llama4),  # (Llama 4: sigmoids, not renormalised)
        theirs.intermediate_size if llama4 else theirs.moe_intermediate_size * theirs.n_shared_experts if deepseek
        else getattr(theirs, "shared_expert_intermediate_size", 0))
    assert (ours.qk_norm, ours.window_chunks, ours.moe_layers) == (
        ("unweighted", True, None) if llama4 else (ours.qk_norm, False, ours.moe_layers))
    if arch == "MiniMaxM2ForCausalLM":  # DeepSeek-V3's router without groups, in every layer
        assert (ours.routing, ours.expert_groups, ours.routed_scaling, ours.qk_norm) == ("sigmoid", 1, 1.0, "all")
    if deepseek:  # DeepSeek-V3's router, after any dense layers (GLM-4.5's query and key norms off by default)
        first = theirs.first_k_dense_replace
        assert (ours.routing, ours.expert_groups, ours.expert_groups_kept, ours.routed_scaling, ours.moe_layers,
                ours.shared_expert_gate, ours.qk_norm) == (
            "sigmoid", theirs.n_group, theirs.topk_group, theirs.routed_scaling_factor,
            tuple(range(first, theirs.num_hidden_layers)) if first else None, False,
            "head" if arch == "Dots1ForCausalLM" else None)


def test_a_routers_correction_bias_stays_float32_in_a_bfloat16_model(tmp_path):
    """GLM-4.5's e_score_correction_bias chooses experts by its small differences: it loads as float32 whatever
    the model's dtype, as transformers keeps it (`model.FLOAT32_PARAMS`)."""
    tensors = hf_tensors("glm4_moe", np.random.default_rng(0))
    write_checkpoint(tmp_path, "glm4_moe", tensors)
    layer = load_hf(str(tmp_path), "bfloat16").params["layers"][1]
    assert layer["router_correction"].dtype == jnp.float32 and layer["router"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(layer["router_correction"]),
                                  tensors["model.layers.1.mlp.gate.e_score_correction_bias"])


@pytest.mark.parametrize("arch, setting", [("qwen3", {"rope_scaling": YARN}), ("mistral", {"sliding_window": 5}),
                                           ("smollm3", {}), ("granite", {}), ("gemma2", {}), ("gemma3", {}),
                                           ("olmo2", {}), ("olmo3", {}), ("exaone4", {}),
                                           ("mixtral", {}), ("qwen2_moe", {}), ("phi3", phi_longrope(16)),
                                           ("glm4", {}), ("cohere2", {}), ("gpt_oss", {}), ("ministral3", {}),
                                           ("llama4", {}), ("cwm", {"num_hidden_layers": 5}),
                                           ("hyperclovax", {"num_hidden_layers": 3}), ("helium", {}),
                                           ("apertus", {"num_hidden_layers": 3}),
                                           ("nemotron", {"num_hidden_layers": 3}),
                                           ("starcoder2", {"num_hidden_layers": 3}),
                                           ("stablelm", {"num_hidden_layers": 3, "hidden_size": 64,
                                                         "qk_layernorm": True}), ("phi", {}),
                                           ("granitemoe_swa", {}), ("glm4_moe", {})])
def test_checkpoint_decodes_exactly_speculative_and_autoregressive(tmp_path, arch, setting):
    """Qwen3's query and key norms and YaRN's scaled cos and sin (its long-context setting), Mistral's sliding
    window (crossed by the prompt and by the tree's deeper nodes), SmolLM3's NoPE layer windowed beside a
    rotated layer that is not, Granite's multipliers, Gemma 2's soft caps (through the attention kernel's),
    Gemma 3's windowed layer with its own RoPE base beside a global one, its post-norms and GeGLU, OLMo 2's
    norms, OLMo 3's windowed layer without the YaRN scaling of its other, EXAONE 4's windowed layer with RoPE
    beside a global one without, Mixtral's experts (windowed) and Qwen2-MoE's beside a shared one and a dense
    layer (a decode step's few tokens take their experts' weights one by one, a forward's many the experts'
    grouped products), Phi-4-mini's RoPE on half of each head with LongRoPE's factors changing at position 8
    (crossed by the prompt), GLM-4's on half of each head, Cohere 2's LayerNorms and attention beside the MLP,
    GPT-OSS's sinks (through the attention kernel's), biases and experts, Ministral 3's queries scaled from
    position 8 on (crossed by the prompt), Llama 4's chunked layer (the prompt and the tree crossing chunks)
    beside a NoPE layer with scaled queries and experts fed their sigmoid-weighted inputs, CWM's run of three
    windowed layers between global ones (one scanned stack on the CPU), HyperCLOVA X's norms after attention and
    the MLP in a stack of three, Helium's biased queries rotating adjacent dims, Apertus's xIELU parameters and
    Nemotron's norm biases and RoPE on half of each head in stacks of three, StarCoder2's biases and window in a
    stack of three, StableLM's RoPE on a quarter of each head and its query and key LayerNorms with weights per
    head, Phi-2's biases, its LM head's too, Granite SWA's sinks, its windowed layer's RoPE base beside the
    global one's and its experts beside a shared one, GLM-4.5's experts routed by corrected sigmoids in groups
    beside a shared one, in the decode loops (on the CPU, the attention kernel): greedy decoding equals the argmax
    of an uncached forward at every step, and lookup-only speculative decoding equals it."""
    # head_dim 16: the CPU attention kernel's smallest
    rng, layers = np.random.default_rng(2), setting.get("num_hidden_layers", 2)
    tensors = hf_tensors(arch, rng, layers=layers, head_dim=16, hidden=setting.get("hidden_size", 32))
    if setting.get("qk_layernorm"):  # StableLM's, one tensor per head
        tensors.update({f"model.layers.{i}.self_attn.{n}_layernorm.norms.{h}.weight": rng.uniform(0.5, 1.5, 16)
                        for i in range(layers) for n, heads in (("q", 4), ("k", 2)) for h in range(heads)})
    write_checkpoint(tmp_path, arch, tensors, head_dim=16, **setting)
    m = load_hf(str(tmp_path))
    assert {"qwen3": m.config.rope_cos_sin_scale() > 1, "mistral": m.config.sliding_window == 5,
            "smollm3": m.config.nope_layers == m.config.window_layers == (1,),
            "granite": m.config.embedding_multiplier == 12 and m.config.logits_scaling == 8,
            "gemma2": m.config.attn_softcap == 2 and m.config.final_softcap == 3,
            "gemma3": m.config.window_layers == (0,) and m.config.local_rope_theta == 100,
            "olmo2": m.config.qk_norm == "all" and not m.config.pre_norms,
            "olmo3": m.config.window_layers == (0,) and m.config.rope_cos_sin_scale() > 1,  # YaRN's
            "exaone4": m.config.window_layers == (0,) and m.config.nope_layers == (1,),
            "mixtral": m.config.norm_topk and m.config.sliding_window == 5,
            "qwen2_moe": m.config.shared_expert_size == 24 and m.config.moe_layers == (0,),
            "phi3": m.config.rotary_dim == 8 and m.config.long_rope_from() == 8,
            "glm4": m.config.rotary_dim == 8 and m.config.post_norms and m.config.attention_bias,
            "cohere2": m.config.parallel_block and m.config.layer_norm and m.config.nope_layers == (1,),
            "gpt_oss": m.config.attention_sinks and m.config.expert_bias and m.config.window_layers == (0,),
            "ministral3": m.config.query_scaling == QueryScaling(0.5, 8),
            "llama4": m.config.window_chunks and m.config.query_scaling.nope_only and m.config.moe_layers == (1,),
            "cwm": m.config.window_layers == (1, 2, 3), "helium": m.config.attention_bias,
            "hyperclovax": m.config.post_norms and m.config.logits_scaling == 8,
            "apertus": m.config.hidden_act == "xielu" and not m.config.gated_mlp,
            "nemotron": m.config.norm_bias and m.config.rotary_dim == 8 and m.config.hidden_act == "relu2",
            "starcoder2": m.config.mlp_bias and m.config.output_bias and m.config.sliding_window == 5,
            "stablelm": m.config.norm_bias and m.config.rotary_dim == 4 and m.config.attention_bias and
            m.config.qk_norm == "per_head", "phi": m.config.lm_head_bias and m.config.rotary_dim == 8,
            "granitemoe_swa": m.config.attention_sinks and m.config.shared_expert_size == 24 and
            m.config.window_layers == (0,) and (m.config.rope_theta, m.config.local_rope_theta) == (1e4, 100),
            "glm4_moe": m.config.routing == "sigmoid" and m.config.expert_groups == 4 and m.config.rotary_dim == 8
            and m.config.moe_layers == (1,)}[arch]
    prompt = TOKENS[:6] * 2
    ar = generate(m.params, m.config, [prompt], max_new_tokens=10)
    tokens = np.asarray(ar.tokens[0, :ar.lengths[0]]).tolist()
    logits = forward_causal(m.params, m.config, jnp.asarray([prompt + tokens])).logits[0]
    assert tokens == np.asarray(jnp.argmax(logits[len(prompt) - 1:-1], axis=-1)).tolist()
    spec = generate(m.params, m.config, [prompt], max_new_tokens=10, spec=SpecConfig.parse("0x4+2"))
    np.testing.assert_array_equal(np.asarray(spec.tokens), np.asarray(ar.tokens))


def test_hf_tokenizer_and_chat_template(tmp_path):
    write_checkpoint(tmp_path, "llama", hf_tensors("llama", np.random.default_rng(0)))
    tok = load_hf(str(tmp_path)).tokenizer
    assert tok.encode("w3 w4") == [8, 9]
    ids = tok.encode_chat([{"role": "user", "content": "w1 w2"}])
    assert ids == [3, 6, 7, 4]
    assert tok.decode(ids, skip_special_tokens=True) == "w1 w2"


# What published templates use beyond plain Jinja: loop controls, tojson, strftime_now (Llama 3 dates its
# system header; "%Y", so that only a new year falling between two renderings could tell them apart),
# raise_exception.
HUB_TEMPLATE = """{{ bos_token }}{% if not date_string is defined %}{% set date_string = strftime_now("%Y") %}{% endif %}
<|system|> {{ date_string }} {{ {"w1": "<w2> \u00e9"} | tojson }}
{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}
{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}
<|{{ m['role'] }}|> {{ m['content'] }}{% if loop.index == 4 %}{% break %}{% endif %}
{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"""


def test_chat_template_renders_as_transformers_renders_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_checkpoint(tmp_path, "llama", hf_tensors("llama", np.random.default_rng(0)))
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump({"chat_template": HUB_TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"}, f)
    ours = load_hf(str(tmp_path)).tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    chat = [{"role": "system", "content": "w5"}] + [{"role": r, "content": f"w{i}"}
                                                     for i, r in zip(range(6, 11), ["user", "assistant"] * 3)]
    text = ours.apply_chat_template(chat)
    assert text == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert f"<|system|> {datetime.date.today().year} " in text and "w9" not in text  # dated; the loop broke
    assert ours.encode_chat(chat) == list(hf.apply_chat_template(chat, add_generation_prompt=True,
                                                                 tokenize=True)["input_ids"])
    with pytest.raises(jinja2.TemplateError, match="unknown role tool"):
        ours.apply_chat_template(chat[:2] + [{"role": "tool", "content": "w1"}])
    # more template variables (Llama 3's date_string; Qwen3's enable_thinking), per call or for every chat
    dated = ours.apply_chat_template(chat, date_string="w3")
    assert dated == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, date_string="w3")
    assert "<|system|> w3 " in dated and ours.with_template_vars(date_string="w3").apply_chat_template(chat) == dated
    assert ours.with_template_vars(date_string="w3").encode_chat(chat) == list(hf.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, date_string="w3")["input_ids"])
    with pytest.raises(ValueError, match=r"chat template variables \['bos_token'\] are set by apply_chat_template"):
        ours.apply_chat_template(chat, bos_token="")
    # saved by transformers (recent versions): the template in chat_template.jinja, not in tokenizer_config.json
    hf.save_pretrained(str(tmp_path))
    with open(tmp_path / "tokenizer_config.json") as f:
        assert "chat_template" not in json.load(f) and (tmp_path / "chat_template.jinja").is_file()
    assert load_hf(str(tmp_path)).tokenizer.apply_chat_template(chat) == text


@pytest.mark.parametrize("case,match", [
    ("architecture", "unsupported architecture 'GPTNeoXForCausalLM'"),
    ("model_type", "unsupported architecture model_type 'gpt_neox' without architectures"),
    ("missing", "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
    ("shape", r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape \(48, 32\), expected \(40, 32\)"),
    ("untied", "missing tensor 'lm_head.weight'"),
    ("no_weights", "no model.safetensors"),
    ("cut_short", r"cannot read safetensors file .*model.safetensors \(cut short"),
    ("sentencepiece", r"missing tokenizer.json in .* \(a SentencePiece tokenizer.model is not read"),
    # what the model does not implement is refused, never ignored
    ("hidden_act", "unsupported hidden_act 'gelu'"),
    ("quantized", r"unsupported quantized checkpoint \(quantization_config: fp8\)"),
    ("mlp_bias", "checkpoint is missing tensor 'model.layers.0.mlp.gate_proj.bias'"),
    ("attention_bias", "checkpoint is missing tensor 'model.layers.0.self_attn.q_proj.bias'"),
    ("rope_per_layer", "unsupported rope_parameters"),
    ("rope_dynamic", "unsupported rope scaling type 'dynamic'"),
    ("partial_rope", "unsupported partial_rotary_factor 0.5"),
    ("nulls", "config.json sets max_position_embeddings, rms_norm_eps to null: they need a value"),
    ("null_rope", "config.json sets rope_theta to null"),
    ("extra_layer", r"3 tensors this config does not use, e.g. \['model.layers.2.input_layernorm.weight'"),
    ("o_proj_bias", r"2 tensors this config does not use, e.g. \['model.layers.0.self_attn.o_proj.bias'"),
    ("granite_scale", "embedding_multiplier and logits_scaling must be positive, got 1.0 and 0"),
    ("gemma_activation", "unsupported hidden_activation 'gelu' \\(supported: silu, swish, gelu_pytorch_tanh, "
                         "gelu_new, relu2, xielu\\)"),
    ("bidirectional", "unsupported use_bidirectional_attention: True"),  # EmbeddingGemma's
    ("local_rope_scaling", "unsupported RoPE scaling of the windowed layers"),
    ("phi3_longrope", "LongRoPE scaling needs lists short_factor and long_factor"),  # Phi-3's "su" or "yarn"
    ("partial_rope_odd", r"unsupported partial_rotary_factor 0.375 for Phi3ForCausalLM \(RoPE on 3 of a head's 8"),
    ("granite_residual", "Granite's residual and attention multipliers must be positive numbers, got None and 1.0"),
    ("expert_missing", "checkpoint is missing tensor 'model.layers.1.block_sparse_moe.experts.3.w2.weight'"),
    ("expert_shape", r"tensor 'model.layers.0.block_sparse_moe.experts.2.w1.weight' has shape \(40, 32\), unlike "
                     r"'model.layers.0.block_sparse_moe.experts.0.w1.weight''s \(48, 32\)"),
    ("moe_window", "unsupported use_sliding_window: true for Qwen3MoeForCausalLM"),
    ("clip_qkv", r"unsupported clip_qkv: 8.0 \(queries, keys and values clipped\)"),
    ("sparse_step", "decoder_sparse_step must be a positive integer, got 0"),
    ("granite4_mamba", r"unsupported GraniteMoeHybridForCausalLM with layers \['attention', 'mamba'\] \(only"),
    ("granite_experts", "checkpoint is missing tensor 'model.layers.1.block_sparse_moe.output_linear.weight'"),
    ("granite_bases", r"layer_rope_theta must list a RoPE base >= 0 \(0: none\) for each of the 2 layers, got "
                      r"\[100.0, 10000.0, 10000.0\]"),
    ("granite_scaled_bases", r"unsupported layer_rope_theta \[100.0, 10000.0\]: one RoPE base for every layer"),
    ("granite_no_rope", r"no_rope_layers \[1, 0\] and layer_rope_theta \[100.0, 10000.0\] disagree"),
    ("use_bias", "checkpoint is missing tensor 'model.layers.0.self_attn.q_proj.bias'"),  # (ERNIE's: all biased)
    # (StableLM's query and key norms, stored one per head)
    ("qk_layernorm", "checkpoint is missing tensor 'model.layers.0.self_attn.q_layernorm.norms.0.weight'"),
    ("attention_out_bias", "checkpoint is missing tensor 'model.layers.0.self_attn.o_proj.bias'"),
    # GLM-4.5's multi-token prediction layer where its config counts none; its experts in groups of unequal size
    ("glm4_moe_nextn", r"4 tensors this config does not use, e.g. \['model.layers.2.eh_proj.weight'"),
    ("glm4_moe_groups", "8 experts in expert_groups 3"),
    ("dots1_top_k", "config.json's num_experts_per_tok must be a number for Dots1ForCausalLM, got null"),
    ("mxfp4_scales", "checkpoint is missing tensor 'model.layers.1.mlp.experts.down_proj_scales'"),
    ("mxfp4_shape", r"tensor 'model.layers.0.mlp.experts.gate_proj.weight_scales' has shape \(4, 64, 4\), "
                    r"expected \(4, 64, 2\)"),
])
def test_bad_hf_checkpoints_raise_clear_errors(tmp_path, case, match):
    arch = {"expert_missing": "mixtral", "expert_shape": "mixtral", "moe_window": "qwen3_moe", "clip_qkv": "olmoe",
            "sparse_step": "qwen2_moe", "use_bias": "ernie4_5", "granite4_mamba": "granite4",
            "granite_experts": "granitemoe", "attention_out_bias": "seed_oss",
            **dict.fromkeys(("granite_bases", "granite_scaled_bases", "granite_no_rope"), "granitemoe_swa"),
            "qk_layernorm": "stablelm", "glm4_moe_nextn": "glm4_moe", "glm4_moe_groups": "glm4_moe",
            "dots1_top_k": "dots1"}.get(case, "llama")
    tensors = hf_tensors(arch, np.random.default_rng(0))
    overrides = {}
    if case.startswith("mxfp4"):
        arch, tensors = "gpt_oss", gpt_oss_mxfp4_tensors(np.random.default_rng(0))
        overrides.update(hidden_size=64, intermediate_size=64, quantization_config=MXFP4)
    if case == "mxfp4_scales":
        del tensors["model.layers.1.mlp.experts.down_proj_scales"]
    elif case == "mxfp4_shape":
        tensors["model.layers.0.mlp.experts.gate_up_proj_scales"] = np.zeros((4, 128, 4), np.uint8)
    elif case == "architecture":
        overrides["architectures"] = ["GPTNeoXForCausalLM"]
    elif case == "model_type":
        overrides.update(architectures=None, model_type="gpt_neox")
    elif case == "missing":
        del tensors["model.layers.1.mlp.up_proj.weight"]
    elif case == "shape":
        overrides["intermediate_size"] = 40
    elif case == "untied":
        del tensors["lm_head.weight"]
    elif case == "hidden_act":
        overrides["hidden_act"] = "gelu"
    elif case == "quantized":  # as Qwen3-0.6B-FP8's config has it
        overrides["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    elif case in ("mlp_bias", "attention_bias"):
        overrides[case] = True
    elif case == "rope_per_layer":
        overrides["rope_parameters"] = {kind: {"rope_type": "default", "rope_theta": 1e4}
                                        for kind in ("full_attention", "sliding_attention")}
    elif case == "partial_rope":
        overrides["partial_rotary_factor"] = 0.5
    elif case == "nulls":  # (null num_key_value_heads means as many as the query heads, as in transformers)
        overrides.update(rms_norm_eps=None, max_position_embeddings=None, num_key_value_heads=None)
    elif case == "null_rope":
        overrides["rope_parameters"] = {"rope_type": "default", "rope_theta": None}
    elif case == "rope_dynamic":  # dynamic NTK scaling: its frequencies change with the sequence's length
        overrides["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}
    elif case == "extra_layer":
        tensors.update({f"model.layers.2.{n}.weight": np.ones(32, np.float32)
                        for n in ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm")})
    elif case == "granite_scale":
        overrides.update(architectures=["GraniteForCausalLM"], logits_scaling=0)
    elif case in ("gemma_activation", "bidirectional", "local_rope_scaling"):
        overrides.update(architectures=["Gemma3ForCausalLM"], **{
            "gemma_activation": {"hidden_activation": "gelu"}, "bidirectional": {"use_bidirectional_attention": True},
            "local_rope_scaling": {"rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}}}[case])
    elif case == "phi3_longrope":
        overrides.update(architectures=["Phi3ForCausalLM"], rope_scaling={"type": "su", "short_factor": [1.0] * 4})
    elif case == "partial_rope_odd":
        overrides.update(architectures=["Phi3ForCausalLM"], partial_rotary_factor=0.375)
    elif case == "granite_residual":
        overrides.update(architectures=["GraniteForCausalLM"], residual_multiplier=None)
    elif case == "o_proj_bias":
        tensors.update({f"model.layers.{i}.self_attn.o_proj.bias": np.zeros(32, np.float32) for i in range(2)})
    elif case == "expert_missing":
        del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    elif case == "expert_shape":
        tensors["model.layers.0.block_sparse_moe.experts.2.w1.weight"] = np.ones((40, 32), np.float32)
    elif case == "granite4_mamba":
        overrides["layer_types"] = ["mamba", "attention"]
    elif case == "granite_experts":
        del tensors["model.layers.1.block_sparse_moe.output_linear.weight"]
    elif case in ("granite_bases", "granite_scaled_bases", "granite_no_rope"):  # (its bases [100, 10000])
        overrides.update({"granite_bases": dict(layer_rope_theta=[100.0, 10000.0, 10000.0]),
                          "granite_scaled_bases": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
                          "granite_no_rope": dict(no_rope_layers=[1, 0])}[case])
    elif case in ("use_bias", "attention_out_bias", "qk_layernorm"):
        overrides[case] = True
    elif case in ("glm4_moe_nextn", "glm4_moe_groups", "dots1_top_k"):
        overrides.update({"glm4_moe_nextn": dict(num_nextn_predict_layers=0), "glm4_moe_groups": dict(n_group=3),
                          "dots1_top_k": dict(num_experts_per_tok=None)}[case])
    elif case in ("moe_window", "clip_qkv", "sparse_step"):
        overrides.update({"moe_window": dict(use_sliding_window=True, sliding_window=4), "clip_qkv": dict(clip_qkv=8.0),
                          "sparse_step": dict(decoder_sparse_step=0)}[case])
    write_checkpoint(tmp_path, arch, tensors, **overrides)
    if case == "no_weights":
        os.remove(tmp_path / "model.safetensors")
    elif case == "cut_short":  # an interrupted download
        os.truncate(tmp_path / "model.safetensors", os.path.getsize(tmp_path / "model.safetensors") // 2)
    elif case == "sentencepiece":
        os.rename(tmp_path / "tokenizer.json", tmp_path / "tokenizer.model")
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_hf(str(tmp_path))


def permute_rope(w, n_head):
    """llama.cpp's converter, restated: rows of each head go from [half A; half B] to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(3 * 8 * 5).reshape(24, 5)
    np.testing.assert_array_equal(unpermute_rope(permute_rope(w, 3), 3), w)
    b = np.arange(24)
    np.testing.assert_array_equal(unpermute_rope(permute_rope(b, 3), 3), b)


def stacked_experts(tensors):
    """A checkpoint's per-expert tensors (Mixtral's names or the others') stacked, as llama.cpp's converter
    stores them, under the name table's names."""
    out, stacks = {}, {}
    for name, x in tensors.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.(?:experts\.(\d+)\.(\w+)|gate)\.weight",
                         name)
        if m is None:
            out[name] = x
        elif m[2] is None:
            out[f"model.layers.{m[1]}.mlp.gate.weight"] = x
        else:
            kind = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}.get(m[3], m[3])
            stacks.setdefault(f"model.layers.{m[1]}.mlp.experts.{kind}.weight", {})[int(m[2])] = x
    return {**out, **{name: np.stack([x[e] for e in sorted(x)]) for name, x in stacks.items()}}


def write_gguf(path, arch, tensors, layers=2, heads=4, kv=2, head_dim=8, scaling=None, extras=None, eot=None,
               metadata=None, sentencepiece=None, rename=None, quantized=(), pre=None):
    """The tensors of a checkpoint written by `write_checkpoint` as llama.cpp's converter writes them
    (float32; Q/K rows permuted for the architectures in `PERMUTED`), with its config and a byte-level
    BPE vocabulary (or the vocabulary of a `sentencepiece.SentencePieceProcessor`); `scaling`: (RoPE
    scaling type, factor[, original context length]); `extras`: more tensors, by their GGUF names; `eot`:
    an end-of-turn id; `metadata`: more numbers (float32 or uint32) or lists, by key under the architecture's;
    `rename`: other texts for some of the byte-level vocabulary's tokens, by id; `quantized`: the GGUF names of
    tensors stored in MXFP4 (their values must be exact in it); `pre`: the byte-level BPE's pre-tokenizer."""
    w = gguf.GGUFWriter(str(path), arch)
    tensors = dict(tensors)
    if arch == "apertus":  # xIELU's parameters as metadata arrays, one value per layer, as its converter writes them
        for part in ("alpha_p", "alpha_n", "beta", "eps"):
            getattr(w, f"add_xielu_{part}")([float(tensors.pop(f"model.layers.{i}.mlp.act_fn.{part}").reshape(-1)[0])
                                             for i in range(layers)])
    if eot is not None:
        w.add_eot_token_id(eot)
    if scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType(scaling[0]))
        w.add_rope_scaling_factor(scaling[1])
        if scaling[2:]:
            w.add_rope_scaling_orig_ctx_len(scaling[2])
    for key, value in {"attention.value_length": head_dim, "rope.freq_base": 10000.0, **(metadata or {})}.items():
        add = w.add_array if isinstance(value, list) else w.add_bool if isinstance(value, bool) else \
            w.add_float32 if isinstance(value, float) else w.add_uint32
        add(f"{arch}.{key}", value)
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(tensors["model.embed_tokens.weight"].shape[1])
    stacked = stacked_experts(tensors)
    # a dense layer's MLP size, or where all are experts theirs (Mixtral's in llama.cpp's reading)
    sizes = {k.split(".")[-3]: x.shape[-2] for k, x in stacked.items()
             if k.endswith((".up_proj.weight", ".c_fc.weight", ".fc1.weight"))}  # (StarCoder2's up: c_fc, Phi's: fc1)
    sizes.update({"mlp": x.shape[0] // 2 for k, x in stacked.items() if k.endswith(".gate_up_proj.weight")})  # (GLM's)
    if "feed_forward_length" not in (metadata or {}):  # (else metadata's: where the experts' gate and up are fused)
        w.add_feed_forward_length(sizes.get("mlp", sizes.get("experts")))
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    if sentencepiece is None:
        w.add_tokenizer_model("gpt2")
        if pre:
            w.add_tokenizer_pre(pre)
        w.add_token_list([(rename or {}).get(i, t) for i, t in enumerate(["a", "b", "ab"] + VOCAB[3:])])  # one merge
        w.add_token_types([3 if 3 <= i <= 4 else 1 for i in range(len(VOCAB))])
        w.add_token_merges(["a b"])
    else:  # as llama.cpp's converter writes a SentencePiece model (its _create_vocab_sentencepiece)
        sp, ids = sentencepiece, range(sentencepiece.get_piece_size())
        w.add_tokenizer_model("llama")
        w.add_token_list([sp.id_to_piece(i) for i in ids])
        w.add_token_scores([sp.get_score(i) for i in ids])
        w.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else
                           5 if sp.is_unused(i) else 1 for i in ids])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    # the converter's names (gguf's own map of them; a tensor without a suffix gets ".weight", as GPT-OSS's
    # sinks do), or where it knows none the table's
    kind = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch)  # (None: newer than this gguf)
    converter = kind and gguf.get_tensor_name_map(kind, layers)
    names = {hf.format(i=i): gg.format(i=i) for table in (GLOBAL_TENSORS, LAYER_TENSORS)
             for parts in table.values() for hf, gg in parts for i in range(layers)}
    for name in stacked:
        as_mapped = name.replace("e_score_correction_bias", "e_score_correction.bias")  # (the converter's first step)
        if converter and (gg := converter.get_name(as_mapped, try_suffixes=(".weight", ".bias"))):
            names[name] = gg if gg.endswith((".weight", ".bias")) else gg + ".weight"
    for name, x in stacked.items():
        if arch in PERMUTED and ".q_proj." in name:
            x = permute_rope(x, heads)
        elif arch in PERMUTED and ".k_proj." in name:
            x = permute_rope(x, kv)
        if names[name] in quantized:
            mx = gguf.GGMLQuantizationType.MXFP4
            w.add_tensor(names[name], gguf.quants.quantize(np.asarray(x, np.float32), mx), raw_dtype=mx)
        else:
            w.add_tensor(names[name], np.ascontiguousarray(x, np.float32))
    for name, x in (extras or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GGUF_ARCH = {"cohere": "command-r", "gpt_oss": "gpt-oss", "ministral3": "mistral3", "mixtral": "llama",
             "olmo3": "olmo2", "phi": "phi2", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
             "granite4": "granite", "granitemoeshared": "granitemoe", "granitemoe_swa": "granite_swa",
             "glm4_moe": "glm4moe", "minimax_m2": "minimax-m2"}  # by HF's
# whose Q/K rows llama.cpp's converter permutes
PERMUTED = ("llama", "arcee", "granite", "granitemoe", "granite_swa", "mistral3", "smollm3")


def gpt_oss_as_converted(t, layers=2):
    """A GPT-OSS checkpoint's tensors (`gpt_oss_mxfp4_tensors`) as llama.cpp's converter stores them, under the
    name table's Hugging Face names: the experts' gate and up (their weights and biases) de-interleaved, the
    MXFP4 weights as [E, out, in] values (exact in MXFP4, which `write_gguf` stores them in)."""
    t = dict(t)
    for i in range(layers):
        p = f"model.layers.{i}.mlp."
        t[p + "gate.weight"], t[p + "gate.bias"] = t.pop(p + "router.weight"), t.pop(p + "router.bias")
        gate_up = dequantized(t.pop(p + "experts.gate_up_proj_blocks"), t.pop(p + "experts.gate_up_proj_scales"))
        bias = t.pop(p + "experts.gate_up_proj_bias")
        for half, part in enumerate(("gate", "up")):
            t[p + f"experts.{part}_proj.weight"], t[p + f"experts.{part}_proj.bias"] = (gate_up[:, half::2],
                                                                                        bias[:, half::2])
        t[p + "experts.down_proj.weight"] = dequantized(t.pop(p + "experts.down_proj_blocks"),
                                                        t.pop(p + "experts.down_proj_scales"))
        t[p + "experts.down_proj.bias"] = t.pop(p + "experts.down_proj_bias")
    return t


def granite_as_converted(t, layers, fused=False):
    """A Granite model's tensors (`hf_tensors`) as llama.cpp's converter stores them, under the name table's
    Hugging Face names: its experts' and shared_mlp's (a shared expert beside experts, else Granite 4's MLP)
    [gate; up] split, or (Granite SWA's) `fused`, kept so under their GGUF names, returned apart."""
    t, kept = dict(t), {}
    for i in range(layers):
        moe, mlp, shared = (f"model.layers.{i}.{part}." for part in ("block_sparse_moe", "mlp", "shared_mlp"))
        parts = {}  # the table's names' prefix -> [gate; up]
        if moe + "router.weight" in t or moe + "router.layer.weight" in t:
            new = moe + "router.weight" in t  # (transformers 5's names)
            t[mlp + "gate.weight"] = t.pop(moe + ("router.weight" if new else "router.layer.weight"))
            t[mlp + "experts.down_proj.weight"] = t.pop(moe + ("experts.down_proj" if new else "output_linear.weight"))
            parts[mlp + "experts."] = t.pop(moe + ("experts.gate_up_proj" if new else "input_linear.weight"))
        if shared + "input_linear.weight" in t:
            own = mlp + ("shared_expert." if parts else "")
            parts[own] = t.pop(shared + "input_linear.weight")
            t[own + "down_proj.weight"] = t.pop(shared + "output_linear.weight")
        for prefix, x in parts.items():
            if fused:
                kept[f"blk.{i}.ffn_{'gate_up_exps' if prefix.endswith('experts.') else 'up_shexp'}.weight"] = x
            else:
                t[prefix + "gate_proj.weight"], t[prefix + "up_proj.weight"] = np.split(x, 2, axis=-2)
    return t, kept


def llama4_as_converted(t, layers):
    """A Llama 4 checkpoint's tensors (`hf_tensors`) as llama.cpp's converter stores them, under the name table's
    Hugging Face names: the experts' gate_up [E, H, 2F] split into gate and up, they and down [E, out, in]."""
    t = {k.replace(".feed_forward.router.", ".mlp.gate.").replace(".feed_forward.", ".mlp."): v for k, v in t.items()}
    for p in (f"model.layers.{i}.mlp.experts." for i in range(layers)):
        if p + "gate_up_proj" in t:
            gate, up = np.split(t.pop(p + "gate_up_proj").transpose(0, 2, 1), 2, axis=1)
            t.update({p + "gate_proj.weight": gate, p + "up_proj.weight": up,
                      p + "down_proj.weight": t.pop(p + "down_proj").transpose(0, 2, 1)})
    return t


@pytest.mark.parametrize("arch", ["llama", "gemma", "gemma2", "gemma3", "granite", "ministral3", "olmo2", "olmo3",
                                  "qwen2", "qwen3", "smollm3", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe",
                                  "gpt_oss", "cohere", "cohere2", "ernie4_5", "glm4", "seed_oss", "llama4",
                                  "nemotron", "apertus", "arcee", "starcoder2", "stablelm", "exaone4", "phi",
                                  "granite4", "granitemoe", "granitemoeshared", "granite_swa", "granitemoe_swa",
                                  "glm4_moe", "dots1", "minimax_m2"])
def test_gguf_file_loads_as_its_hugging_face_checkpoint(tmp_path, arch):
    """The same tensors as GGUF (llama's Q/K rows permuted and linear RoPE scaling, Gemma's norms stored as 1 + w
    and its end-of-turn token found by its text, Gemma 2's soft caps and window in every other layer, Gemma 3's
    window in all but every sixth layer, Granite's multipliers under llama.cpp's names and its attention biases,
    Granite 4's layers without RoPE where the file's switch for it says, Granite 3's mixtures' experts split from
    their fused tensors, renormalised, the shared expert ungated, Granite SWA's windows, sinks, layers without
    RoPE as its flags say, its mixture's experts' and shared expert's gate and up kept fused, Ministral 3's Q/K
    rows permuted as llama's, its YaRN's log multiplier and queries scaled with their position, OLMo 2's norms,
    OLMo 3's windows as its per-layer flags say, their RoPE without the YaRN scaling of its other layers (the
    file's attention factor YaRN's own), Qwen2's biases, YaRN and an end-of-turn token that ends generation too,
    Qwen3's query and key norms, SmolLM3's permuted rows and its every fourth layer without RoPE; the mixtures of
    experts' stacked experts: Mixtral's as llama's, OLMoE's, Qwen2-MoE's shared expert sized by its tensors,
    Qwen3-MoE's, their MoE layers those with a router; GPT-OSS's in MXFP4 both ways, its sinks, biases, YaRN and
    window in every other layer; Command R's LayerNorms, parallel attention and MLP and logit scale, Command
    R7B's windows in 3 of 4 layers with RoPE only there, ERNIE 4.5's and GLM-4's RoPE over adjacent dims (GLM-4's
    on half of each head, its gate and up fused, its norms after attention and the MLP; no BOS with its
    pre-tokenizer), Seed-OSS's biases; Llama 4's RoPE over adjacent dims, chunks, every fourth layer without RoPE
    and with scaled queries, unweighted query and key norms, sigmoid-weighted expert inputs and ungated shared
    expert, all as llama.cpp assumes them; Nemotron's biased LayerNorms (their weights stored as 1 + w), ungated
    MLP and RoPE on half of each head; Apertus's xIELU parameters, kept in the metadata; Arcee's ungated MLP, its
    Q/K rows permuted as llama's; StarCoder2's biases on every projection and LayerNorm, ungated MLP of GELUs,
    and no window (llama.cpp has none for it); StableLM's LayerNorms with biases and RoPE on a quarter of each
    head; EXAONE 4's norms after attention and the MLP only, query and key norms and RoPE in every layer (no
    window: 1.2B's); Phi-2's biases, its LM head's too, attention and the MLP side by side, RoPE on half of each
    head; GLM-4.5's experts routed by corrected sigmoids in groups, scaled, its norm before the MLP named as
    after attention, its multi-token prediction layer counted in the blocks and left out; dots.llm1's likewise
    routed, unwindowed (llama.cpp has no window for it); MiniMax-M2's routed so too, renormalised (llama.cpp
    reads no key for it), its query and key norms over all heads and RoPE on half of each head; each tensor under
    the name the converter gives it, by gguf's own map) and as a Hugging Face directory give the same model."""
    layers = {"smollm3": 8, "gemma3": 7, "cohere2": 4, "llama4": 4}.get(arch, 2)
    gpt_oss = arch == "gpt_oss"
    rng = np.random.default_rng(3)
    tensors = gpt_oss_mxfp4_tensors(rng) if gpt_oss else hf_tensors(arch, rng, layers=layers)
    if arch == "granite":  # attention biases (the output's scaled by the residual multiplier, as its weight)
        tensors.update({f"model.layers.{i}.self_attn.{n}_proj.bias": rng.normal(0, 0.3, w.shape[0]).astype(np.float32)
                        for i in range(layers) for n in "qkvo"
                        for w in [tensors[f"model.layers.{i}.self_attn.{n}_proj.weight"]]})
    # the ids that end generation beside the EOS: an end-of-turn id in the file (Qwen2's), or tokens llama.cpp
    # finds by their text (Gemma's end of a turn, GPT-OSS's of a reply and of a tool call)
    ends = {"qwen2": {4: None}, **dict.fromkeys(("gemma", "gemma2", "gemma3"), {3: "<end_of_turn>"}),
            "gpt_oss": {3: "<|return|>", 4: "<|call|>"}}.get(arch, {})
    hf_rope, gguf_rope = {"llama": ({"rope_type": "linear", "factor": 2.0}, ("linear", 2.0)),
                          "qwen2": (YARN, ("yarn", 4.0, 16)),
                          "olmo3": (ARCHS["olmo3"]["rope_scaling"], ("yarn", 4.0, 16)),
                          "ministral3": (None, ("yarn", 4.0, 8)),  # (its rope_parameters)
                          "apertus": ({"rope_type": "default"}, None)}.get(arch, (None, None))  # (not its llama3)
    # transformers' settings for what llama.cpp assumes (and the GGUF loader's padding id: the EOS)
    hf_config = {"smollm3": dict(no_rope_layers=None, use_sliding_window=False), "granite": dict(attention_bias=True),
                 "granite4": dict(position_embedding_type=None),  # (no RoPE)
                 "gemma": dict(pad_token_id=2), "ministral3": dict(pad_token_id=2),
                 "gemma2": dict(query_pre_attn_scalar=8, pad_token_id=2),
                 "gemma3": dict(sliding_window_pattern=6, rope_local_base_freq=10000.0, query_pre_attn_scalar=8,
                                pad_token_id=2),
                 "mixtral": dict(sliding_window=None),
                 **dict.fromkeys(("granite_swa", "granitemoe_swa"), dict(layer_rope_theta=[10000.0, 0])),
                 "cohere": dict(pad_token_id=2), "cohere2": dict(sliding_window_pattern=4, pad_token_id=2),
                 "ernie4_5": dict(pad_token_id=2), "seed_oss": dict(pad_token_id=2), "apertus": dict(pad_token_id=2),
                 "starcoder2": dict(sliding_window=None, pad_token_id=2),
                 "exaone4": dict(sliding_window=None),  # (llama.cpp windows its 64-layer model alone)
                 "dots1": dict(sliding_window=None),
                 "glm4": dict(bos_token_id=None),  # (llama.cpp adds no BOS with GLM-4's pre-tokenizer)
                 "llama4": dict(no_rope_layers=None, attention_chunk_size=8192, floor_scale=8192, attn_scale=0.1),
                 # llama.cpp's SwiGLU limit (no key gives it)
                 "gpt_oss": dict(hidden_size=64, intermediate_size=64, quantization_config=MXFP4, swiglu_limit=7.0)}
    write_checkpoint(tmp_path / "hf", arch, tensors, rope_scaling=hf_rope, eos_token_id=[2, *ends],
                     num_hidden_layers=layers, **hf_config.get(arch, {}))
    granite = dict(embedding_scale=12.0, residual_scale=0.25, logit_scale=8.0, **{"attention.scale": 1 / 128})
    swa = {"attention.sliding_window": 5, "attention.sliding_window_pattern": [True, False],
           "attention.rope_pattern": [True, False]}
    metadata = {"granite": granite, "granite4": dict(granite, **{"rope.scaling.finetuned": False}),
                "granitemoe": dict(granite, expert_count=4, expert_used_count=2),
                "granitemoeshared": dict(granite, expert_count=4, expert_used_count=2,
                                         expert_shared_feed_forward_length=24),
                "granite_swa": dict(granite, **swa),
                "granitemoe_swa": dict(granite, **swa, expert_count=4, expert_used_count=2, feed_forward_length=48,
                                       expert_shared_feed_forward_length=24),
                "gemma2": {"attention.sliding_window": 5, "attn_logit_softcapping": 2.0,
                           "final_logit_softcapping": 3.0},
                "gemma3": {"attention.sliding_window": 5},
                "ministral3": {"rope.freq_base": 1e4, "rope.scaling.yarn_log_multiplier": 1.0,
                               "attention.temperature_scale": 0.5},
                "olmo3": {"attention.sliding_window": 5, "attention.sliding_window_pattern": [True, False],
                          "rope.freq_base": 500000.0, "rope.scaling.yarn_attn_factor": 0.1 * math.log(4.0) + 1},
                "mixtral": dict(expert_count=4, expert_used_count=2),
                "olmoe": dict(expert_count=4, expert_used_count=2),
                "qwen2_moe": dict(expert_count=4, expert_used_count=2, expert_feed_forward_length=16),
                "qwen3_moe": dict(expert_count=8, expert_used_count=3, expert_feed_forward_length=16),
                "gpt_oss": {"expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": 64,
                            "attention.sliding_window": 5},
                "cohere": {"logit_scale": 0.25, "attention.layer_norm_epsilon": 1e-5},
                "cohere2": {"logit_scale": 0.25, "attention.layer_norm_epsilon": 1e-5, "attention.sliding_window": 5},
                "glm4": {"rope.dimension_count": 4},
                "nemotron": {"rope.dimension_count": 4, "attention.layer_norm_epsilon": 1e-5},
                "starcoder2": {"attention.layer_norm_epsilon": 1e-5},
                "stablelm": {"rope.dimension_count": 2, "attention.layer_norm_epsilon": 1e-5},
                "phi": {"rope.dimension_count": 4, "attention.layer_norm_epsilon": 1e-5},
                "llama4": dict(expert_count=4, expert_used_count=1, expert_feed_forward_length=16),
                # (its converter writes no groups; llama.cpp reads them where a file has them, here the checkpoint's)
                "glm4_moe": dict(expert_count=8, expert_used_count=3, expert_feed_forward_length=16,
                                 expert_shared_count=1, leading_dense_block_count=1, expert_gating_func=2,
                                 expert_weights_scale=2.5, expert_weights_norm=True, nextn_predict_layers=1,
                                 expert_group_count=4, expert_group_used_count=2, **{"rope.dimension_count": 4}),
                "dots1": dict(expert_count=8, expert_used_count=2, expert_feed_forward_length=16, expert_shared_count=2,
                              leading_dense_block_count=1, expert_gating_func=2, expert_weights_scale=2.0,
                              expert_weights_norm=False, expert_group_count=2, expert_group_used_count=1),
                # (renormalised whatever expert_weights_norm says: llama.cpp does not read it)
                "minimax_m2": dict(expert_count=4, expert_used_count=2, expert_feed_forward_length=48,
                                   expert_gating_func=2, expert_weights_norm=False, **{"rope.dimension_count": 4}),
                }.get(arch)
    if arch in ("gemma", "gemma2", "gemma3", "nemotron"):  # their converters store the norms' 1 + w
        tensors = {k: v + 1 if k.endswith("norm.weight") else v for k, v in tensors.items()}
    if gpt_oss:
        tensors, gguf_rope = gpt_oss_as_converted(tensors), ("yarn", 32.0, 4096)  # (GPT-OSS's default YaRN)
    if arch == "llama4":
        tensors = llama4_as_converted(tensors, layers)
    kept = {}
    if arch in ("granite4", "granitemoe", "granitemoeshared", "granitemoe_swa"):
        tensors, kept = granite_as_converted(tensors, layers, fused=arch == "granitemoe_swa")
    write_gguf(tmp_path / "model.gguf", GGUF_ARCH.get(arch, arch), tensors, layers=layers + (arch == "glm4_moe"),
               scaling=gguf_rope, eot=next((i for i, text in ends.items() if text is None), None), metadata=metadata,
               extras=kept, rename={i: text for i, text in ends.items() if text},
               quantized={f"blk.{i}.ffn_{n}_exps.weight" for i in range(layers) for n in ("gate", "up", "down")
                          if gpt_oss},
               pre={"cohere": "command-r", "cohere2": "command-r", "glm4": "glm4", "gpt_oss": "gpt-4o",
                    "seed_oss": "seed-coder", "llama4": "llama4"}.get(arch))
    hf, gg = load_hf(str(tmp_path / "hf")), load_gguf(str(tmp_path / "model.gguf"))
    # GGUF keeps the norm's epsilon as a float32, which the norm computes in anyway
    assert gg.config == dataclasses.replace(hf.config, rms_norm_eps=float(np.float32(hf.config.rms_norm_eps)))
    assert gg.config.nope_layers == {"smollm3": (3, 7), "cohere2": (3,), "llama4": (3,), "granite4": (0, 1),
                                     "granite_swa": (1,), "granitemoe_swa": (1,)}.get(arch, ())
    assert gg.config.window_layers == {"gemma2": (0,), "gemma3": (0, 1, 2, 3, 4, 6), "gpt_oss": (0,), "olmo3": (0,),
                                       "cohere2": (0, 1, 2), "llama4": (0, 1, 2), "granite_swa": (0,),
                                       "granitemoe_swa": (0,)}.get(arch)
    ids = jnp.asarray([TOKENS])
    np.testing.assert_array_equal(np.asarray(forward_causal(gg.params, gg.config, ids).logits),
                                  np.asarray(forward_causal(hf.params, hf.config, ids).logits))


def test_gguf_window_pattern_is_read_as_llama_cpp_reads_it():
    """attention.sliding_window_pattern: a flag per layer, or a period n whose last layer of every n attends to
    all (0: every layer windowed), or where the file names none the model's own period."""
    from redrafter_jax.loaders.gguf import _window_layers

    def layers(pattern, n=8, every=4):
        return _window_layers(lambda key, default: default if pattern is None else pattern, n, every)

    assert layers(None) == (0, 1, 2, 4, 5, 6) and layers(None, every=2) == (0, 2, 4, 6)
    assert layers(3) == (0, 1, 3, 4, 6, 7) and layers(0) == tuple(range(8))
    assert layers([True, False] * 4) == (0, 2, 4, 6)
    with pytest.raises(ValueError, match="sliding_window_pattern has 2 flags for 8 layers"):
        layers([True, False])


def test_gguf_stablelm_without_norms_before_its_mlps_runs_them_beside_attention(tmp_path):
    """A StableLM GGUF file whose layers have no norm before the MLP (llama.cpp's reading of
    use_parallel_residual) loads as its Hugging Face checkpoint: attention and the MLP side by side."""
    t = {k: v for k, v in hf_tensors("stablelm", np.random.default_rng(6)).items() if "post_attention" not in k}
    write_checkpoint(tmp_path / "hf", "stablelm", t, use_parallel_residual=True)
    write_gguf(tmp_path / "model.gguf", "stablelm", t,
               metadata={"rope.dimension_count": 2, "attention.layer_norm_epsilon": 1e-5})
    hf, gg = load_hf(str(tmp_path / "hf")), load_gguf(str(tmp_path / "model.gguf"))
    assert gg.config.parallel_block and hf.config.parallel_block
    ids = jnp.asarray([TOKENS])
    np.testing.assert_array_equal(np.asarray(forward_causal(gg.params, gg.config, ids).logits),
                                  np.asarray(forward_causal(hf.params, hf.config, ids).logits))


@pytest.mark.parametrize("arch, setting", PER_HEAD_QK_NORMS)
def test_gguf_per_head_query_and_key_layernorms_give_transformers_logits(tmp_path, arch, setting):
    """Command R+'s and StableLM 2 12B's query and key LayerNorms as llama.cpp's converter stores them
    ([heads, head_dim], StableLM's per-head tensors stacked; read as LayerNorms of each head, with weights
    of its own, by their shape): a model saved by transformers itself, its norms drawn, written so, gives
    transformers' logits."""
    hf = transformers_model(arch, **setting)
    saved_with_biases_and_norms_drawn(hf, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    for i, (part, heads) in itertools.product(range(2), (("q", 4), ("k", 2))):  # (StableLM's, one per head)
        if stacked := [t.pop(k) for h in range(heads) if (k := f"model.layers.{i}.self_attn.{part}_layernorm."
                                                               f"norms.{h}.weight") in t]:
            t[f"model.layers.{i}.self_attn.{part}_layernorm.weight"] = np.stack(stacked)
    write_gguf(tmp_path / "model.gguf", GGUF_ARCH.get(arch, arch), t, metadata={
        "attention.layer_norm_epsilon": 1e-5, "rope.freq_base": hf.config.rope_parameters["rope_theta"],
        **({"logit_scale": hf.config.logit_scale} if arch == "cohere" else {"rope.dimension_count": 2})})
    gg = load_gguf(str(tmp_path / "model.gguf"))
    assert gg.config.qk_norm == "per_head"
    assert_logits_match_transformers(gg, hf)


@pytest.mark.parametrize("window", [None, 2048])
def test_gguf_exaone4_of_64_layers_is_windowed_as_its_hugging_face_config_says(tmp_path, window):
    """llama.cpp windows the 64-layer EXAONE 4 (4.0 32B; by 4096 positions where the file names no window) in
    3 of every 4 layers, RoPE only there, as that model's Hugging Face config does."""
    t = hf_tensors("exaone4", np.random.default_rng(8), layers=64, hidden=8, inter=8, heads=2, kv=1, head_dim=4)
    write_gguf(tmp_path / "model.gguf", "exaone4", t, layers=64, heads=2, kv=1, head_dim=4,
               metadata=window and {"attention.sliding_window": window})
    write_checkpoint(tmp_path / "hf", "exaone4", t, num_hidden_layers=64, hidden_size=8, intermediate_size=8,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=4, sliding_window=window or 4096,
                     sliding_window_pattern=4)
    gg, hf = open_gguf(str(tmp_path / "model.gguf")).config, open_hf(str(tmp_path / "hf")).config
    assert (gg.sliding_window, gg.window_layers, gg.nope_layers) == (
        hf.sliding_window, hf.window_layers, hf.nope_layers)
    assert gg.sliding_window == (window or 4096)
    assert gg.window_layers[:4] == (0, 1, 2, 4) and gg.nope_layers[:2] == (3, 7)


def test_gguf_phi2_with_query_key_and_value_in_one_tensor_loads_as_with_three(tmp_path):
    """Older Phi-2 GGUF files hold Q, K and V (weights and biases) in one attn_qkv tensor, which llama.cpp
    reads as it reads the three: both files load alike."""
    t = hf_tensors("phi", np.random.default_rng(9))
    meta = {"rope.dimension_count": 4, "attention.layer_norm_epsilon": 1e-5}
    write_gguf(tmp_path / "three.gguf", "phi2", t, metadata=meta)
    fused = {f"blk.{i}.attn_qkv.{kind}": np.concatenate([t.pop(f"model.layers.{i}.self_attn.{p}_proj.{kind}")
                                                         for p in "qkv"])
             for i in range(2) for kind in ("weight", "bias")}
    write_gguf(tmp_path / "one.gguf", "phi2", t, metadata=meta, extras=fused)
    three, one = (load_gguf(str(tmp_path / f"{n}.gguf")) for n in ("three", "one"))
    assert one.config == three.config and one.config.attention_bias and one.config.lm_head_bias
    ids = jnp.asarray([TOKENS])
    np.testing.assert_array_equal(np.asarray(forward_causal(one.params, one.config, ids).logits),
                                  np.asarray(forward_causal(three.params, three.config, ids).logits))


def test_gguf_qwen2vl_text_model_loads_as_qwen2(tmp_path):
    """llama.cpp's qwen2vl files (Qwen2-VL's and Qwen2.5-VL's text models, beside their vision projector's
    file) hold Qwen2's model, whose multimodal RoPE is Qwen2's on text: the same tensors load alike."""
    t = hf_tensors("qwen2", np.random.default_rng(5))
    for arch in ("qwen2", "qwen2vl"):
        write_gguf(tmp_path / f"{arch}.gguf", arch, t)
    qwen2, vl = (load_gguf(str(tmp_path / f"{arch}.gguf")) for arch in ("qwen2", "qwen2vl"))
    assert vl.config == qwen2.config and vl.config.attention_bias
    ids = jnp.asarray([TOKENS])
    np.testing.assert_array_equal(np.asarray(forward_causal(vl.params, vl.config, ids).logits),
                                  np.asarray(forward_causal(qwen2.params, qwen2.config, ids).logits))


def llama_cpp_rope_factors(theta, head_dim, s):
    """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel), restated: Llama 3.1's RoPE scaling `s`
    stored as one divisor per frequency, the `rope_freqs` tensor."""
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen, old = 2 * math.pi / freq, s["original_max_position_embeddings"]
        if wavelen < old / s["high_freq_factor"]:
            factors.append(1.0)
        elif wavelen > old / s["low_freq_factor"]:
            factors.append(s["factor"])
        else:
            smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.asarray(factors, np.float32)


def test_gguf_mixture_with_mxfp4_experts_keeps_them_so(tmp_path):
    """A mixture whose GGUF file stores its experts in MXFP4 (as llama.cpp's MXFP4_MOE quantization does,
    here OLMoE's) loads with them kept in MXFP4, read from ggml's block layout into ours, and computes
    as the same file with those experts' values stored in float32."""
    tensors = hf_tensors("olmoe", np.random.default_rng(4), hidden=64, inter=64)
    experts = {f"blk.{i}.ffn_{n}_exps.weight" for i in range(2) for n in ("gate", "up", "down")}
    mx = gguf.GGMLQuantizationType.MXFP4
    exact = {k: gguf.quants.dequantize(gguf.quants.quantize(v, mx), mx) if re.search(r"experts\.\d+\.", k) else v
             for k, v in tensors.items()}  # the experts' values as MXFP4 holds them
    metadata = dict(expert_count=4, expert_used_count=2)
    for name, quantized in (("mxfp4.gguf", experts), ("float32.gguf", ())):
        write_gguf(tmp_path / name, "olmoe", exact, metadata=metadata, quantized=quantized)
    kept, dense = (load_gguf(str(tmp_path / name)) for name in ("mxfp4.gguf", "float32.gguf"))
    dequantized = load_gguf(str(tmp_path / "mxfp4.gguf"), dequantize_experts=True)  # (--dequantize-experts)
    assert [m.config.expert_format for m in (kept, dense, dequantized)] == ["mxfp4", "dense", "dense"]
    assert kept.params["layers"][1]["experts_down"].blocks.dtype == np.uint8
    ids = jnp.asarray([TOKENS])
    for other in (dense, dequantized):
        np.testing.assert_allclose(np.asarray(forward_causal(kept.params, kept.config, ids).logits),
                                   np.asarray(forward_causal(other.params, other.config, ids).logits), rtol=1e-5,
                                   atol=1e-5)


def test_gguf_rope_factors_load_as_llama3_scaling(tmp_path):
    """GGUF files store Llama 3.1's RoPE scaling as per-frequency factors: the model equals its Hugging Face
    checkpoint, whose config has the llama3 scaling (here blending one frequency, slowing the rest)."""
    tensors = hf_tensors("llama", np.random.default_rng(3))
    write_checkpoint(tmp_path / "hf", "llama", tensors)
    factors = llama_cpp_rope_factors(10000.0, 8, ARCHS["llama"]["rope_scaling"])
    write_gguf(tmp_path / "model.gguf", "llama", tensors, extras={"rope_freqs.weight": factors})
    hf, gg = load_hf(str(tmp_path / "hf")), load_gguf(str(tmp_path / "model.gguf"))
    assert gg.config.rope_scaling.kind == "factors" and hf.config.rope_scaling.kind == "llama3"
    plain = dataclasses.replace(hf.config, rope_scaling=None).rope_inv_freq()
    assert not np.allclose(hf.config.rope_inv_freq(), plain)
    np.testing.assert_allclose(gg.config.rope_inv_freq(), hf.config.rope_inv_freq(), rtol=1e-6)
    ids = jnp.asarray([TOKENS * 3])
    np.testing.assert_allclose(np.asarray(forward_causal(gg.params, gg.config, ids).logits),
                               np.asarray(forward_causal(hf.params, hf.config, ids).logits), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scaling,match", [
    (dict(kind="factors", factors=(1.0, 2.0)),
     r"2 RoPE frequency factors for 8 rotated dimensions of a head \(4 frequencies\)"),
    (dict(kind="factors"), "per-frequency factors go with kinds 'factors' and 'longrope'"),
    (dict(kind="linear", factor=2.0, factors=(1.0,) * 4), "per-frequency factors go with kinds 'factors' and"),
    (dict(kind="factors", factors=(1.0, 0.0, 1.0, 1.0)), "must be positive"),
    (dict(kind="longrope", factors=(1.0,) * 4), "long factors go with kind 'longrope' only, as many as its short"),
    (dict(kind="longrope", factors=(1.0,) * 4, long_factors=(2.0,) * 3), "got 3 long and 4 short"),
    (dict(kind="factors", factors=(1.0,) * 4, long_factors=(2.0,) * 4), "got 4 long and 4 short with 'factors'"),
    (dict(kind="longrope", factors=(1.0,) * 4, long_factors=(2.0, -1.0, 2.0, 2.0)), "must be positive"),
    (dict(kind="linear", factor=2.0, attention_factor=1.2), "attention_factor must be positive and goes with kinds"),
])
def test_bad_rope_factors_are_refused(scaling, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, rope_scaling=RopeScaling(**scaling))


def test_transformers_baseline_of_a_gguf_is_its_own_conversion_made_once(tmp_path, monkeypatch):
    """`load_transformers` on a GGUF file: transformers' own conversion of it, kept in the cache folder as a
    checkpoint (nothing else left there), made by the first call and only loaded by the next."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from infer.benchmark import load_transformers, transformers_copy

    monkeypatch.setenv("REDRAFTER_CACHE", str(tmp_path / "cache"))
    write_gguf(tmp_path / "m.gguf", "llama", hf_tensors("llama", np.random.default_rng(3)))
    folder = transformers_copy(str(tmp_path / "m.gguf"))
    made = os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns
    kept = load_transformers("cpu", gguf=str(tmp_path / "m.gguf"))
    assert os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns == made
    assert os.listdir(tmp_path / "cache" / "transformers") == [os.path.basename(folder)]
    direct = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    want = direct.state_dict()
    assert {k: v.tolist() for k, v in kept.state_dict().items()} == {k: v.tolist() for k, v in want.items()}


def test_truncated_and_foreign_gguf_files_raise(tmp_path, smollm_path):
    truncated = tmp_path / "truncated.gguf"
    with open(smollm_path, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(5_000_000))
    with pytest.raises(ValueError, match="corrupt or truncated GGUF"):
        load_gguf(str(truncated))
    # a vocabulary that claims 2^60 tokens: refused at once (gguf's own reader would loop over them)
    data = bytearray(truncated.read_bytes())
    at = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 8  # (past its type and item type)
    data[at:at + 8] = (1 << 60).to_bytes(8, "little")
    truncated.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"corrupt or truncated GGUF file .*: ValueError: array at byte \d+ runs "
                                         "past the end of the file"):
        load_gguf(str(truncated))
    for arch, match in (("mamba", r"'mamba' \(supported: [a-z0-9_, -]+\)$"),
                        ("phi3", r"'phi3' .*; its Hugging Face checkpoint loads\)")):
        foreign = tmp_path / f"{arch}.gguf"
        w = gguf.GGUFWriter(str(foreign), arch)
        w.add_block_count(1)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(ValueError, match=f"unsupported GGUF architecture {match}"):
            load_gguf(str(foreign))
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_gguf(str(tmp_path / "nope.gguf"))


@pytest.mark.parametrize("case,match", [
    ("longrope", "unsupported GGUF rope scaling type 'longrope'"),
    ("yarn_ext_factor", "unsupported GGUF YaRN setting 'rope.scaling.yarn_ext_factor' = 0.5"),
    ("partial_rope", "unsupported GGUF rope.dimension_count 4: the model needs it equal to the head size 8"),
    ("value_length", "unsupported GGUF attention.value_length 16"),
    ("extra", r"2 tensors this config does not use, e.g. \['blk.0.attn_norm.bias'"),  # (a LayerNorm's)
    ("olmo3_attn_factor", r"unsupported GGUF rope.scaling.attn_factor 1.20\d+ \(llama.cpp multiplies YaRN's own"),
    ("yarn_attn_factor", r"unsupported GGUF YaRN setting 'rope.scaling.yarn_attn_factor' = 1.5 \(llama.cpp applies "
                         r"YaRN's own 1.13863 instead\)"),
    ("window_pattern", "GGUF attention.sliding_window_pattern has 3 flags for 2 layers"),
    ("swa_base", r"unsupported GGUF rope.freq_base_swa 1000.0 for llama \(a RoPE base of the windowed layers' own\)"),
    ("sigmoid_experts", r"unsupported GGUF expert gating function 2 with weights scale 1.0"),
    ("scaled_experts", r"unsupported GGUF expert gating function 1 with weights scale 2.5"),
    ("softmax_llama4", r"unsupported GGUF expert gating function 1 with weights scale 1.0 for llama4"),
    ("grouped_experts", r"unsupported GGUF expert_group_count 2 for olmoe \(experts chosen in groups: DeepSeek-V3's"),
    ("dots1_no_gating", r"unsupported GGUF expert gating function 0 with weights scale 1.0 for dots1"),
    ("mobilellm", r"unsupported GGUF llama4 attention.sliding_window 0 \(Llama 4's chunks are 8192 positions"),
    ("pre_tokenizer", r"unsupported GGUF pre-tokenizer 'falcon' \(supported: default, gpt-2, "),
    ("rope_pattern", r"GGUF attention.rope_pattern must be a flag for each of the 2 layers, got \[True\]"),
    ("no_window_pattern", "GGUF metadata is missing 'granite_swa.attention.sliding_window_pattern'"),
])
def test_gguf_settings_the_model_lacks_are_refused(tmp_path, case, match):
    """What the model does not implement is refused, never ignored."""
    arch = {"olmo3_attn_factor": "olmo2", "window_pattern": "olmo2", "sigmoid_experts": "olmoe",
            "grouped_experts": "olmoe", "scaled_experts": "olmoe", "softmax_llama4": "llama4", "mobilellm": "llama4",
            "rope_pattern": "granite_swa", "no_window_pattern": "granite_swa",
            "dots1_no_gating": "dots1"}.get(case, "llama")
    extras = {f"blk.{i}.attn_norm.bias": np.zeros(32, np.float32) for i in range(2)} if case == "extra" else None
    yarn = ("yarn", 4.0, 16) if case in ("olmo3_attn_factor", "yarn_attn_factor", "yarn_ext_factor") else None
    scaling = ("longrope", 4.0) if case == "longrope" else yarn
    granite = {"embedding_scale": 12.0, "residual_scale": 0.25, "logit_scale": 8.0, "attention.sliding_window": 4}
    metadata = {"yarn_ext_factor": {"rope.scaling.yarn_ext_factor": 0.5},
                "partial_rope": {"rope.dimension_count": 4}, "value_length": {"attention.value_length": 16},
                "olmo3_attn_factor": {"attention.sliding_window": 4,  # (OLMo 3's, as converters once wrote it)
                                      "rope.scaling.attn_factor": 0.1 * math.log(8) + 1},
                "yarn_attn_factor": {"rope.scaling.yarn_attn_factor": 1.5},
                "window_pattern": {"attention.sliding_window": 4,
                                   "attention.sliding_window_pattern": [True, False, True]},
                "swa_base": {"rope.freq_base_swa": 1000.0},
                "sigmoid_experts": dict(expert_count=4, expert_used_count=2, expert_gating_func=2),
                "scaled_experts": dict(expert_count=4, expert_used_count=2, expert_weights_scale=2.5),
                "grouped_experts": dict(expert_count=4, expert_used_count=2, expert_group_count=2),
                "softmax_llama4": dict(expert_count=4, expert_used_count=1, expert_gating_func=1),
                "dots1_no_gating": dict(expert_count=8, expert_used_count=2, expert_feed_forward_length=16),
                "mobilellm": {"expert_count": 4, "expert_used_count": 1, "attention.sliding_window": 0},
                "rope_pattern": {**granite, "attention.sliding_window_pattern": [True, False],
                                 "attention.rope_pattern": [True]},
                "no_window_pattern": granite}.get(case)
    tensors = hf_tensors(arch, np.random.default_rng(3))
    write_gguf(tmp_path / "model.gguf", arch, llama4_as_converted(tensors, 2) if arch == "llama4" else tensors,
               scaling=scaling, extras=extras, metadata=metadata,
               pre="falcon" if case == "pre_tokenizer" else None)  # (a name of llama.cpp's we do not split)
    with pytest.raises(ValueError, match=match):
        load_gguf(str(tmp_path / "model.gguf"))


def test_gguf_xielu_parameters_are_read_per_layer_or_one_for_all(tmp_path):
    """Apertus's xIELU parameters in a GGUF file's metadata: an array of one value per layer, or one value for
    every layer (which llama.cpp broadcasts); another count is refused."""
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "apertus")
    w.add_xielu_alpha_p([0.5, 1.5])
    w.add_float32(gguf.Keys.xIELU.ALPHA_N, 0.25)
    w.add_xielu_beta([0.75])
    w.add_xielu_eps([-1.0, -2.0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    reader = gguf.GGUFReader(str(tmp_path / "x.gguf"))
    values = _xielu_values(reader, 2)
    assert {name: x.tolist() for name, x in values.items()} == {
        f"blk.{i}.xielu.{part}": [v] for part, per_layer in (("alpha_p", [0.5, 1.5]), ("alpha_n", [0.25, 0.25]),
                                                              ("beta", [0.75, 0.75]), ("eps", [-1.0, -2.0]))
        for i, v in enumerate(per_layer)}
    with pytest.raises(ValueError, match="GGUF metadata xielu.alpha_p has 2 values for 3 layers"):
        _xielu_values(reader, 3)


@pytest.mark.parametrize("fim_pad_key", [None, 9])
def test_gguf_generation_ends_where_llama_cpp_ends_it(tmp_path, fim_pad_key):
    """Beside the EOS and the file's end-of-turn id, llama.cpp ends generation at tokens it knows by their
    text in any model (an end of text, of a turn, ...) and at the fill-in-the-middle padding, repository and
    file-separator tokens (by the file's ids, else by their texts); with harmony's <|return|> and <|call|>
    (Solar Open's <|flush|> and <|calls|>), not at a message's <|end|>; with Gemma 4's <|tool_response>
    (PLaMo's EOS), not at </s>."""
    from redrafter_jax.loaders.gguf import _ends

    tokens = ["<s>", "</s>", "w0", "<|endoftext|>", "<fim-pad>", "<|fim_pad|>", "<reponame>", "<|im_start|>",
              "<|eot_id|>", "w1", "<|end|>"]

    def ends(vocabulary, eos=0):
        w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
        w.add_token_list(vocabulary)
        w.add_eot_token_id(2)
        if fim_pad_key is not None:
            w.add_uint32("tokenizer.ggml.fim_pad_token_id", fim_pad_key)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        return sorted(set(_ends(gguf.GGUFReader(str(tmp_path / "t.gguf")), vocabulary, eos)))

    fim_pad = 5 if fim_pad_key is None else fim_pad_key  # (the first of its texts the vocabulary has)
    every = {1, 2, 3, fim_pad, 6, 8}
    assert ends(tokens) == sorted(every | {10})
    assert ends(tokens + ["<|return|>", "<|call|>"]) == sorted(every | {11, 12})
    assert ends(tokens + ["<|calls|>", "<|flush|>"]) == sorted(every | {11, 12})
    assert ends(tokens + ["<|tool_response>"]) == sorted(every - {1} | {10, 11})
    assert ends(tokens + ["<|plamo:eos|>"], eos=11) == sorted(every - {1} | {10})
    deepseek = ["<s>", "<\uff5cend\u2581of\u2581sentence\uff5c>"] + [f"w{i}" for i in range(8)]
    assert ends(deepseek) == [1, 2] + [9] * (fim_pad_key is not None)
    assert ends(deepseek[:9]) == [1, 2]  # (the file's fill-in-the-middle id past the vocabulary: none)


def test_gguf_sentencepiece_vocabulary_encodes_as_sentencepiece(tmp_path):
    """Llama 1/2's, Mistral 7B's and TinyLlama's GGUF files hold a SentencePiece BPE vocabulary (pieces and
    scores, no merges): the loaded tokenizer encodes and decodes as SentencePiece itself, the dummy prefix,
    whitespace runs, split digits and byte fallback included, and adds a BOS as llama.cpp does."""
    spm = pytest.importorskip("sentencepiece")
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "design.md"), encoding="utf-8").read()
    (tmp_path / "corpus.txt").write_text("\n".join(line for line in text.splitlines() if line.strip()))
    spm.SentencePieceTrainer.train(  # Llama's settings: BPE, byte fallback, digits split, text unchanged
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=600, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    write_gguf(tmp_path / "model.gguf", "llama", hf_tensors("llama", np.random.default_rng(0), vocab=600),
               sentencepiece=sp)
    tok = load_gguf(str(tmp_path / "model.gguf")).tokenizer
    pieces = [text[i:i + 7 + i % 150] for i in range(0, len(text) - 200, 131)]
    for t in TEXTS + ["  two spaces", "trailing ", "a  b   c    d", "\n\nnew lines\n", "日本語", "x" * 40] + pieces:
        assert tok.encode(t) == [1] + sp.encode(t), t
        assert tok.decode(tok.encode(t)) == sp.decode(sp.encode(t)), t
    assert "<0xF0>" in [sp.id_to_piece(i) for i in sp.encode("😀")]  # byte fallback was exercised


TEXTS = ["Hello, world!", "The year 2024 had 366 days.", "  indented\n\ttabs and ünïcödé — “quotes” 😀",
         "<|im_start|>user\nHi<|im_end|>\n", "def f(x):\n    return x**2  # square"]


LLAMA3_PIECES = ["HelloWorld", "Ġdon", "'t", "Ġ", "123", "45", "Ġx", "!ĊĊ", "Ġ", "Ġy", "/"]


@pytest.mark.parametrize("pre, pieces", [
    ("llama-bpe", LLAMA3_PIECES), ("glm4", LLAMA3_PIECES),
    # o200k (GPT-OSS's, Llama 4's): words split before a capital, contractions kept with their word
    *((pre, ["Hello", "World", "Ġdon't", "Ġ", "123", "45", "Ġx", "!ĊĊ", "Ġ", "Ġy", "/"])
      for pre in ("gpt-4o", "llama4")),
    # Command R's: digits one by one, then GPT-2's regex (line breaks not split from spaces)
    ("command-r", ["HelloWorld", "Ġdon", "'t", "Ġ", "1", "2", "3", "4", "5", "Ġx", "!", "ĊĊĠ", "Ġy", "/"]),
    # Seed-Coder's (Seed-OSS's): Qwen2's, but punctuation does not take the line breaks after it
    ("seed-coder", ["HelloWorld", "Ġdon", "'t", "Ġ", "1", "2", "3", "4", "5", "Ġx", "!", "ĊĊ", "Ġ", "Ġy", "/"]),
    # Tekken's (Mistral NeMo's): o200k's words without their contractions, digits one by one
    ("tekken", ["Hello", "World", "Ġdon", "'t", "Ġ", "1", "2", "3", "4", "5", "Ġx", "!ĊĊ", "Ġ", "Ġy", "/"]),
    # llama.cpp's default (a file that names none): punctuation first, then GPT-2's regex, numbers in threes
    ("default", ["HelloWorld", "Ġdon", "'", "t", "Ġ", "123", "45", "Ġx", "!", "ĊĊĠ", "Ġy", "/"]),
    # Tiny Aya's: numbers in threes from their end (its \b is Oniguruma's, whose word characters other engines'
    # differ from, so it has no random texts below), then o200k's
    ("tiny_aya", ["Hello", "World", "Ġdon't", "Ġ", "12", "345", "Ġx", "!ĊĊ", "Ġ", "Ġy", "/"]),
    # DeepSeek's: every line break alone, a space taken by the word after it; LLM's numbers whole, Coder's digits
    ("deepseek-llm", ["HelloWorld", "Ġdon", "'", "t", "Ġ", "12345", "Ġx", "!", "Ċ", "Ċ", "Ġ", "Ġy", "/"]),
    ("deepseek-coder", ["HelloWorld", "Ġdon", "'", "t", "Ġ", "1", "2", "3", "4", "5", "Ġx", "!", "Ċ", "Ċ", "Ġ", "Ġy",
                        "/"]),
])
def test_gguf_pre_tokenizers_split_as_llama_cpp_does(pre, pieces):
    """Each GGUF pre-tokenizer name splits text as llama.cpp's regexes for it do."""
    from redrafter_jax.tokenizer import _gguf_pre_tokenizer

    assert [p for p, _ in _gguf_pre_tokenizer(pre).pre_tokenize_str("HelloWorld don't 12345 x!\n\n  y/")] == pieces


# llama.cpp's regexes of each kind of pre-tokenizer as llama-vocab.cpp writes them (o200k's and Tekken's as the
# models' own tokenizer.json files do: llama.cpp approximates their letter cases), with names it reads as that kind
LLAMA_CPP_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA_CPP_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
CASED = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+{c}|"
         r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*{c}|{n}| ?[^\s\p{L}\p{N}]+"
         r"[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA_CPP_TAIL = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA_CPP_SPLITS = [
    (("default",), [r"[\p{P}\$\+<=>\^~\|]+", LLAMA_CPP_GPT2, r"\p{N}+", "[0-9][0-9][0-9]"]),
    (("gpt-2", "olmo", "exaone4", "mpt"), [LLAMA_CPP_GPT2]),
    (("smollm", "starcoder", "refact", "command-r", "exaone"), [r"\p{N}", LLAMA_CPP_GPT2]),
    (("llama-bpe", "dbrx", "glm4", "pixtral", "falcon3"),
     [LLAMA_CPP_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|" + LLAMA_CPP_TAIL]),
    (("qwen2", "stablelm2", "deepseek-r1-qwen"),
     [LLAMA_CPP_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|" + LLAMA_CPP_TAIL]),
    (("seed-coder",), [LLAMA_CPP_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|"
                       r"\s*[\r\n]+|\s+(?!\S)|\s+"]),
    (("gpt-4o", "llama4"), [CASED.replace("{c}", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?").replace("{n}", r"\p{N}{1,3}")]),
    (("tekken",), [CASED.replace("{c}", "").replace("{n}", r"\p{N}")]),
    (("deepseek-llm",), ["[\r\n]", rf"\s?[{_DEEPSEEK_LETTERS}]+", "\\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$",
                         "[一-龥ࠀ-一가-퟿]+", r"\p{N}+"]),  # (its letters: the vocabulary test below reads them)
    (("deepseek-coder",), ["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}"]),
    (("viking",), [" ?[^(\\s|.,!?…。，、।۔،)]+", r"\p{N}"]),
]


def regex_split(text, regexes):
    """text split by each regex in turn as llama.cpp's unicode_regex_split splits it: a regex's matches and
    the text between them are both pieces, which the next regex splits further."""
    pieces = [text]
    for r in regexes:
        split = []
        for piece in pieces:
            at = 0
            for m in regex.finditer(r, piece):
                split += [piece[at:m.start()]] * (m.start() > at) + [m.group()] * (m.end() > m.start())
                at = m.end()
            split += [piece[at:]] * (at < len(piece))
        pieces = split
    return pieces


@pytest.mark.parametrize("pre, regexes", [(pre, r) for names, r in LLAMA_CPP_SPLITS for pre in names])
def test_gguf_pre_tokenizers_split_random_text_as_llama_cpp_regexes_do(pre, regexes):
    """Each GGUF pre-tokenizer name splits text (TEXTS and 300 random ones) as llama.cpp's regexes for its
    kind do, applied in turn by a regex engine of their own."""
    from redrafter_jax.tokenizer import _gguf_pre_tokenizer

    byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    ours = _gguf_pre_tokenizer(pre)
    for text in TEXTS + random_texts(300, seed=1):
        want = [byte_level.pre_tokenize_str(p)[0][0] for p in regex_split(text, regexes)]
        assert [p for p, _ in ours.pre_tokenize_str(text)] == want, text


@pytest.mark.parametrize("pre, whole, bos", [("llama-bpe", True, True), ("tekken", True, True), ("glm4", True, False),
                                             ("dbrx", False, False), ("qwen2", False, False)])
def test_gguf_pre_tokenizers_take_whole_tokens_and_a_bos_where_llama_cpp_does(pre, whole, bos):
    """llama.cpp's Llama 3, Tekken and GLM-4 pre-tokenizers take a piece that is a token whole, whatever the
    merges (ignore_merges, as those models' own tokenizers do), and the first two lead with a BOS where the
    file does not say otherwise; the others merge, and add a BOS only where the file says so."""
    from redrafter_jax.tokenizer import Tokenizer

    def tokenizer(add_bos):
        return Tokenizer.from_gguf_vocab(model="gpt2", pre=pre, tokens=["<s>", "a", "b", "c", "ab", "abc"],
                                         token_types=[3, 1, 1, 1, 1, 1], merges=["a b"], chat_template=None,
                                         bos_token_id=0, eos_token_ids=(0,), add_bos=add_bos)

    assert tokenizer(None).encode("abc") == [0] * bos + ([5] if whole else [4, 3])
    assert tokenizer(False).encode("abc") == ([5] if whole else [4, 3])
    assert tokenizer(True).encode("abc")[0] == 0


# llama.cpp's tokenizer tests, its models/ folder as llama-cpp-python's source archive ships it: vocabularies
# converted from models' own tokenizers (`tokenizer.ggml.pre` naming theirs), texts, and the ids those tokenizers
# encode them to
LLAMA_CPP_VOCABS = WheelFile("llama-cpp-python==0.3.36",
                             "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
                             "llama_cpp_python-0.3.36/vendor/llama.cpp/models/",
                             "5941dda3404fbbf2a3429f0bc2668950e1efecc97da93c64297602b9fac4dab6")


@pytest.fixture(scope="module")
def llama_cpp_vocabs():
    return fetch(LLAMA_CPP_VOCABS)


@pytest.mark.parametrize("name", ["llama-spm", "phi-3", "gpt-2", "mpt", "starcoder", "refact", "command-r",
                                  "llama-bpe", "qwen2", "deepseek-llm", "deepseek-coder"])
def test_gguf_tokenizers_encode_llama_cpps_test_texts_as_the_models_own_tokenizers(llama_cpp_vocabs, name):
    path = os.path.join(llama_cpp_vocabs, f"ggml-vocab-{name}.gguf")
    tok = gguf_tokenizer(_open(path))
    with open(f"{path}.inp", encoding="utf-8") as f:
        texts = f.read().split("\n__ggml_vocab_test__\n")
    with open(f"{path}.out", encoding="utf-8") as f:
        want = [[int(i) for i in line.split()] for line in f.read().split("\n")]
    assert len(texts) == len(want) > 40
    for text, ids in zip(texts, want):
        assert tok.tok.encode(text, add_special_tokens=False).ids == ids, text


def test_our_gguf_reader_reads_every_field_and_tensor_as_ggufs_own(tmp_path, llama_cpp_vocabs, smollm_path):
    """`_Reader` reads arrays in one pass: every field (whole, an element, a slice), its types and offset,
    and every tensor as gguf's own reader reads them, in a SentencePiece vocabulary (its strings, scores and
    types), the embedded model (a byte-level one's merges, its tensors) and arrays of every other kind."""
    from redrafter_jax.loaders.gguf import _Reader

    w = gguf.GGUFWriter(str(tmp_path / "arrays.gguf"), "llama")
    w.add_array("a.bools", [True, False, True])
    w.add_array("a.floats", [1.5, -2.25])
    w.add_array("a.nested", [[1, 2], [3]])  # (an array of arrays: gguf's own way)
    w.add_array("a.texts", ["é", "", "中文"])
    for kind, values in ((gguf.GGUFValueType.UINT64, [2 ** 63 + 5, 1]), (gguf.GGUFValueType.INT8, [-3, 4])):
        w.add_key_value(f"a.{kind.name}", values, gguf.GGUFValueType.ARRAY, sub_type=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    for path in (os.path.join(llama_cpp_vocabs, "ggml-vocab-llama-spm.gguf"), smollm_path, tmp_path / "arrays.gguf"):
        theirs, ours = gguf.GGUFReader(path), _Reader(path)
        assert list(ours.fields) == list(theirs.fields)
        for name, field in theirs.fields.items():
            mine = ours.fields[name]
            assert (mine.offset, mine.types, len(mine.data)) == (field.offset, field.types, len(field.data)), name
            for part in (slice(None), -1, slice(1, 5)):
                assert mine.contents(part) == field.contents(part), (name, part)
        assert ours.data_offset == theirs.data_offset and len(ours.tensors) == len(theirs.tensors)
        for mine, tensor in zip(ours.tensors, theirs.tensors):
            assert (mine.name, mine.tensor_type) == (tensor.name, tensor.tensor_type)
            np.testing.assert_array_equal(mine.data, tensor.data)


def random_texts(n, seed=0):
    """n texts strung from pieces that pre-tokenizers split on (runs of spaces and line breaks before
    digits and letters, contractions, numerals that are not digits, control tokens, sentence punctuation
    of other scripts) and random characters (ASCII, other scripts, CJK, emoji)."""
    pieces = ["Hello", " world", " ", "  ", "\n", "\n\n", "\t", "\r\n", " " * 7, "'s", "'t", "'re", "don't",
              "I'M", "123", "3.14", "$10,000", "½", "①", "Ⅻ", "ünïcödé", "—", "“", "”", "😀", "👍🏽", "中文", "한국어",
              "Ελληνικά", "\u00a0", "\u200b", "e\u0301", "ﬁ", "𝔘", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "**2",
              "!!", "...", "Why?", "。", "，", "、", "…", "।"]
    rng = np.random.default_rng(seed)
    ranges = [(32, 127), (160, 0x2FFF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF)]

    def piece():
        return pieces[rng.integers(len(pieces))] if rng.random() < 0.7 else chr(rng.integers(*ranges[rng.integers(4)]))

    return ["".join(piece() for _ in range(rng.integers(1, 12))) for _ in range(n)]


def test_gguf_tokenizer_round_trips(smollm):
    tok = smollm.tokenizer
    for text in TEXTS + random_texts(300):
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.encode("<|im_start|>") == [1]  # control tokens are matched whole
    assert tok.encode("2024") == [tok.tok.token_to_id(c) for c in "2024"]  # smollm splits digits


def test_gguf_tokenizer_matches_transformers(smollm, smollm_path):
    """Our tokenizer of the GGUF file encodes as transformers' of it, with the digits split off first as
    llama.cpp's smollm pre-tokenizer and SmolLM2's own tokenizer.json do (transformers' conversion of a
    GGUF vocabulary leaves that out, so it merges the spaces or line breaks before a digit, or a numeral
    like ½ into the space before it)."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm_path),
                                                     gguf_file=os.path.basename(smollm_path))
    for text in TEXTS:
        assert smollm.tokenizer.encode(text) == ref.encode(text, add_special_tokens=False), text
    pre = tokenizers.pre_tokenizers
    ref.backend_tokenizer.pre_tokenizer = pre.Sequence([pre.Digits(individual_digits=True),
                                                        ref.backend_tokenizer.pre_tokenizer])
    for text in random_texts(1000):
        assert smollm.tokenizer.encode(text) == ref.encode(text, add_special_tokens=False), text
