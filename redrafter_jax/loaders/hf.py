"""Hugging Face checkpoint directory loader: config.json, safetensors (single or sharded), tokenizer.json."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import tokenizers
from jax.sharding import Mesh
from safetensors import safe_open

from redrafter_jax.config import ModelConfig, QueryScaling, RopeScaling, yarn_mscale
from redrafter_jax.loaders import (
    FUSED_GATE_UP,
    FUSED_QKV,
    HF,
    PRE_MLP_NORM,
    Hidden,
    LoadedModel,
    OpenedModel,
    Renamed,
    RopeOrdered,
    Scaled,
    Source,
    Unfused,
    expert_stacks,
    fused_parts,
    gemma_adjustments,
    granite_adjustments,
    norm_shifts,
    stored_names,
)
from redrafter_jax.mxfp4 import GROUP, Mxfp4
from redrafter_jax.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "ApertusForCausalLM", "ArceeForCausalLM", "CohereForCausalLM",
                           "Cohere2ForCausalLM", "Dots1ForCausalLM", "Ernie4_5ForCausalLM", "CwmForCausalLM",
                           "Exaone4ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
                           "GlmForCausalLM", "Glm4ForCausalLM", "Glm4MoeForCausalLM", "GptOssForCausalLM",
                           "GraniteForCausalLM", "GraniteMoeForCausalLM", "GraniteMoeHybridForCausalLM",
                           "GraniteMoeSharedForCausalLM", "GraniteMoeSWAForCausalLM", "GraniteSWAForCausalLM",
                           "HeliumForCausalLM", "HyperCLOVAXForCausalLM", "Llama4ForCausalLM", "MistralForCausalLM",
                           "MinistralForCausalLM", "Ministral3ForCausalLM", "MiniMaxM2ForCausalLM",
                           "MixtralForCausalLM", "NemotronForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM",
                           "OlmoeForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM", "Qwen2ForCausalLM",
                           "Qwen2MoeForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "SeedOssForCausalLM",
                           "SmolLM3ForCausalLM", "StableLmForCausalLM", "Starcoder2ForCausalLM",
                           "VaultGemmaForCausalLM")
# how transformers picks the model when `architectures` is absent
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "apertus": "ApertusForCausalLM", "arcee": "ArceeForCausalLM",
                "cohere": "CohereForCausalLM", "cohere2": "Cohere2ForCausalLM", "cwm": "CwmForCausalLM",
                "dots1": "Dots1ForCausalLM", "ernie4_5": "Ernie4_5ForCausalLM", "exaone4": "Exaone4ForCausalLM",
                "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                "glm": "GlmForCausalLM", "glm4": "Glm4ForCausalLM", "glm4_moe": "Glm4MoeForCausalLM",
                "gpt_oss": "GptOssForCausalLM",
                "granite": "GraniteForCausalLM", "granitemoe": "GraniteMoeForCausalLM",
                "granitemoehybrid": "GraniteMoeHybridForCausalLM",
                "granitemoeshared": "GraniteMoeSharedForCausalLM", "granitemoe_swa": "GraniteMoeSWAForCausalLM",
                "granite_swa": "GraniteSWAForCausalLM", "helium": "HeliumForCausalLM",
                "hyperclovax": "HyperCLOVAXForCausalLM", "llama4_text": "Llama4ForCausalLM",
                "mistral": "MistralForCausalLM", "ministral": "MinistralForCausalLM",
                "ministral3": "Ministral3ForCausalLM", "minimax_m2": "MiniMaxM2ForCausalLM",
                "mixtral": "MixtralForCausalLM",
                "nemotron": "NemotronForCausalLM", "olmo2": "Olmo2ForCausalLM", "olmo3": "Olmo3ForCausalLM",
                "olmoe": "OlmoeForCausalLM", "phi": "PhiForCausalLM", "phi3": "Phi3ForCausalLM",
                "qwen2": "Qwen2ForCausalLM",
                "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                "seed_oss": "SeedOssForCausalLM",
                **dict.fromkeys(("qwen2_vl_text", "qwen2_5_vl_text"), "Qwen2ForCausalLM"),
                "qwen3_vl_text": "Qwen3ForCausalLM",
                "smollm3": "SmolLM3ForCausalLM", "stablelm": "StableLmForCausalLM",
                "starcoder2": "Starcoder2ForCausalLM", "vaultgemma": "VaultGemmaForCausalLM"}
EXAONE4, GEMMA2, GEMMA3, PHI3 = "Exaone4ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM"
MIXTRAL, OLMOE = "MixtralForCausalLM", "OlmoeForCausalLM"
QWEN2_MOE, QWEN3_MOE = "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"
GPT_OSS, MINISTRAL3, LLAMA4 = "GptOssForCausalLM", "Ministral3ForCausalLM", "Llama4ForCausalLM"
# Gemma 1 (and CodeGemma): Gemma 2's norms, GeGLU and embedding scale on Llama's layer; VaultGemma: Gemma 2's
# layer without the norms after attention and the MLP
GEMMA, VAULTGEMMA = "GemmaForCausalLM", "VaultGemmaForCausalLM"
GEMMAS, OLMOS = (GEMMA2, GEMMA3, VAULTGEMMA), ("Olmo2ForCausalLM", "Olmo3ForCausalLM")  # (GEMMAS: Gemma 2's kind)
HELIUM = "HeliumForCausalLM"  # Kyutai's: Llama's layer, RoPE over adjacent dims
# Swiss AI's Apertus: Qwen3's layer (query and key norms) with an ungated MLP of learned xIELU activations, its
# norms named otherwise
APERTUS = "ApertusForCausalLM"
_APERTUS_NORMS = {"model.layers.{i}.input_layernorm.weight": "model.layers.{i}.attention_layernorm.weight",
                  "model.layers.{i}.post_attention_layernorm.weight": "model.layers.{i}.feedforward_layernorm.weight"}
# Arcee's AFM: Llama's layer with an ungated MLP of squared ReLUs
ARCEE = "ArceeForCausalLM"
# NVIDIA's Nemotron (Minitron): LayerNorms with biases whose weights w scale by 1 + w, an ungated MLP of squared
# ReLUs, RoPE on half of each head
NEMOTRON = "NemotronForCausalLM"
# BigCode's StarCoder2: LayerNorms with biases, an ungated MLP of GELUs (stored as c_fc and c_proj), biases on
# attention's and the MLP's projections where use_bias says, a window in every layer
STARCODER2 = "Starcoder2ForCausalLM"
_STARCODER2_MLP = {f"model.layers.{{i}}.mlp.{ours}_proj.{kind}": f"model.layers.{{i}}.mlp.c_{theirs}.{kind}"
                   for ours, theirs in (("up", "fc"), ("down", "proj")) for kind in ("weight", "bias")}
# Stability AI's StableLM (2): LayerNorms with biases, RoPE on a quarter of each head, Q/K/V biases where
# use_qkv_bias says, attention and the MLP side by side where use_parallel_residual says (one norm, as Cohere's)
STABLELM = "StableLmForCausalLM"
# Microsoft's Phi-1, Phi-1.5, Phi-2: StableLM's parallel layer with biases everywhere (Q, K, V, the output
# projection, an ungated MLP of GELUs, the LM head), its projections and final norm named otherwise
PHI = "PhiForCausalLM"
_PHI_NAMES = {f"model.{ours}.{kind}": f"model.{theirs}.{kind}" for kind in ("weight", "bias") for ours, theirs in (
    ("layers.{i}.self_attn.o_proj", "layers.{i}.self_attn.dense"), ("layers.{i}.mlp.up_proj", "layers.{i}.mlp.fc1"),
    ("layers.{i}.mlp.down_proj", "layers.{i}.mlp.fc2"), ("norm", "final_layernorm"))}
CWM = "CwmForCausalLM"  # Meta's Code World Model: Llama's layer, windows in 3 of every 4 layers
# Naver's HyperCLOVA X: Granite's multipliers (its logits multiplied, not divided) and, where use_post_norm
# says, norms after attention and the MLP (stored as post_norm1 and post_norm2; its norm before the MLP
# under Llama's name), the residual multiplier after them
HYPERCLOVAX = "HyperCLOVAXForCausalLM"
_VAULTGEMMA_NORMS = {"model.layers.{i}.post_attention_layernorm.weight": PRE_MLP_NORM}  # its norm before the MLP
_HYPERCLOVAX_NORMS = {f"model.layers.{{i}}.{ours}.weight": f"model.layers.{{i}}.{theirs}.weight"
                      for ours, theirs in (("post_attention_layernorm", "post_norm1"),
                                           ("pre_feedforward_layernorm", "post_attention_layernorm"),
                                           ("post_feedforward_layernorm", "post_norm2"))}
GLM, GLM4, ERNIE, SEED_OSS = "GlmForCausalLM", "Glm4ForCausalLM", "Ernie4_5ForCausalLM", "SeedOssForCausalLM"
# Zhipu's GLM-4.5 and 4.6 (GLM4_MOE): Qwen's biased Q, K and V (query and key norms where use_qk_norm says), RoPE
# on half of each head (Llama's pairs), dense layers first, then DeepSeek-V3's router (`ModelConfig.routing`
# "sigmoid") over experts beside ungated shared ones; its multi-token prediction layers, stored after the
# others, unused (as transformers leaves them)
GLM4_MOE = "Glm4MoeForCausalLM"
# rednote's dots.llm1: Qwen3's attention, GLM-4.5's layers (dense first, DeepSeek-V3's routing, ungated shared experts)
DOTS1 = "Dots1ForCausalLM"
DEEPSEEK_MOES = (DOTS1, GLM4_MOE)  # (DeepSeek-V3's mixture of experts)
# MiniMax-M2: Mixtral's layers, its experts routed as DeepSeek-V3's without groups, query and key norms over all
# heads, RoPE on part of each head (rotary_dim in its released configs)
MINIMAX_M2 = "MiniMaxM2ForCausalLM"
COHERE, COHERE2 = "CohereForCausalLM", "Cohere2ForCausalLM"
# IBM's Granite: Granite 3's; Granite 4's attention-only models (GraniteMoeHybrid without Mamba layers, its MLP
# stored fused as shared_mlp, a shared expert beside any experts); Granite 3's mixtures of experts
# (GraniteMoe), with an ungated shared expert (GraniteMoeShared); Granite SWA, dense or not (GraniteMoeSWA):
# windows, attention sinks and a RoPE base per layer. Their experts are stored fused, [E, 2F, H] (gate's rows
# first) and [E, H, F], their routers softmax the chosen experts' logits.
GRANITE4, GRANITE_MOE, GRANITE_MOE_SHARED = ("GraniteMoeHybridForCausalLM", "GraniteMoeForCausalLM",
                                             "GraniteMoeSharedForCausalLM")
GRANITE_SWA, GRANITE_MOE_SWA = "GraniteSWAForCausalLM", "GraniteMoeSWAForCausalLM"
GRANITE_SWAS = (GRANITE_SWA, GRANITE_MOE_SWA)
GRANITE_MOES = (GRANITE4, GRANITE_MOE, GRANITE_MOE_SHARED, GRANITE_MOE_SWA)
GRANITES = ("GraniteForCausalLM", GRANITE4, GRANITE_MOE, GRANITE_MOE_SHARED, *GRANITE_SWAS)
MOES = (*DEEPSEEK_MOES, GPT_OSS, LLAMA4, MINIMAX_M2, MIXTRAL, OLMOE, QWEN2_MOE, QWEN3_MOE, *GRANITE_MOES)
# the models whose projections transformers builds without biases, whatever attention_bias says
_NO_ATTENTION_BIAS = ("MistralForCausalLM", "MinistralForCausalLM", MINISTRAL3, MINIMAX_M2, MIXTRAL, EXAONE4,
                      PHI3, "Qwen2ForCausalLM", QWEN2_MOE, ERNIE, CWM, STABLELM, STARCODER2)
# the models whose norms are LayerNorms (with biases but Cohere's), not RMS norms
_LAYER_NORMS = (COHERE, COHERE2, NEMOTRON, PHI, STABLELM, STARCODER2)
# the config key of the norms' epsilon where it is not rms_norm_eps
_NORM_EPS = {**dict.fromkeys((COHERE, COHERE2, PHI, STABLELM), "layer_norm_eps"), NEMOTRON: "norm_eps",
             STARCODER2: "norm_epsilon"}
# the models whose dense MLPs transformers biases where mlp_bias says (ERNIE 4.5's and StarCoder2's where
# use_bias says, with their attention)
_MLP_BIAS = ("LlamaForCausalLM", ARCEE, CWM, "GraniteForCausalLM", GRANITE_SWA, HELIUM, HYPERCLOVAX, NEMOTRON,
             SEED_OSS, "SmolLM3ForCausalLM")
_USE_BIAS = (ERNIE, STARCODER2)
# Granite's shared_mlp, [gate; up] fused, and down: Granite 4's dense MLP, or a shared expert
_GRANITE_SHARED_MLP = ("model.layers.{i}.shared_mlp.input_linear.weight",
                       "model.layers.{i}.shared_mlp.output_linear.weight")
# whose heads rotate adjacent dimensions (`loaders.RopeOrdered`)
INTERLEAVED_ROPE = (COHERE, COHERE2, ERNIE, GLM, GLM4, HELIUM, LLAMA4)
# GLM-4's norms after attention and the MLP, stored under other names than the table's (Gemma's)
_GLM4_NORMS = {f"model.layers.{{i}}.{ours}_layernorm.weight": f"model.layers.{{i}}.{theirs}_layernorm.weight"
               for ours, theirs in (("post_attention", "post_self_attn"), ("pre_feedforward", "post_attention"),
                                    ("post_feedforward", "post_mlp"))}
# where a mixture of experts stores its router and each expert's gate, up and down projections
_EXPERT_NAMES = dict.fromkeys((MIXTRAL, MINIMAX_M2), [f"model.layers.{{i}}.block_sparse_moe.{n}.weight" for n in (
    "gate", "experts.{e}.w1", "experts.{e}.w3", "experts.{e}.w2")])
# MiniMax-M2's router's correction bias, stored beside the router
_MINIMAX_M2_NAMES = {"model.layers.{i}.mlp.gate.e_score_correction_bias":
                     "model.layers.{i}.block_sparse_moe.e_score_correction_bias"}
_EXPERT_NAMES_DEFAULT = [f"model.layers.{{i}}.mlp.{n}.weight"
                         for n in ("gate", "experts.{e}.gate_proj", "experts.{e}.up_proj", "experts.{e}.down_proj")]
POST_NORMS_ONLY = (EXAONE4, *OLMOS)  # norms after attention and the MLP, none before
# Models whose windowed layers have RoPE of their own, unscaled: the key of its base in transformers 4's
# configs (5's give a set of RoPE parameters for each layer kind)
_LOCAL_ROPE = {GEMMA3: "rope_local_base_freq", "Olmo3ForCausalLM": "rope_theta"}
# Multimodal checkpoints whose text model loads on its own (Gemma 3 4B-27B, Mistral Small 3.1 and 3.2, Llama 4,
# Qwen2-VL, Qwen2.5-VL, Qwen3-VL), by default of this architecture (its text_config's model_type names it where
# it has one). Qwen's multimodal RoPE rotates by three position ids (time, height, width), which are equal for
# text, where it is the text model's RoPE.
TEXT_MODELS = {"Gemma3ForConditionalGeneration": GEMMA3, "Mistral3ForConditionalGeneration": "MistralForCausalLM",
               "Llama4ForConditionalGeneration": LLAMA4, "Qwen2VLForConditionalGeneration": "Qwen2ForCausalLM",
               "Qwen2_5_VLForConditionalGeneration": "Qwen2ForCausalLM",
               "Qwen3VLForConditionalGeneration": "Qwen3ForCausalLM"}
# where they keep the text model's tensors (transformers 4's layout, which 5 saves too; 5's own; Qwen2-VL's and
# Qwen2.5-VL's, a text-only checkpoint's beside `visual.`), by the names a text-only checkpoint gives them
_TEXT_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                  ("model.language_model.", "model."), ("lm_head.", "lm_head."),
                  *((f"model.{part}.", f"model.{part}.") for part in ("embed_tokens", "layers", "norm")))

# What transformers' config classes (4.45 to 5) assume for a key that config.json leaves out: a config
# written by hand, or saved without its model, must load as transformers reads it.
_COMMON = dict(rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, vocab_size=32000,
               hidden_size=4096, num_hidden_layers=32, num_attention_heads=32)
_LLAMA = dict(_COMMON, intermediate_size=11008, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
_QWEN = dict(_COMMON, vocab_size=151936, intermediate_size=22016, num_key_value_heads=32,
             max_position_embeddings=32768)
# transformers' activation names -> ours (`ModelConfig.ACTIVATIONS`)
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "relu2": "relu2", "xielu": "xielu"}
# Keys that must hold a value: a null in config.json is no default (num_key_value_heads and head_dim are:
# null means from num_attention_heads and hidden_size).
_NOT_NULL = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")
_OLMO = dict(_COMMON, vocab_size=50304, intermediate_size=11008, max_position_embeddings=2048, rms_norm_eps=1e-5,
             pad_token_id=1, bos_token_id=None, eos_token_id=50279)
_MISTRAL = dict(_LLAMA, intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=131072,
                sliding_window=4096)
_GLM = dict(_COMMON, vocab_size=151552, intermediate_size=13696, num_hidden_layers=40, num_key_value_heads=2,
            head_dim=128, max_position_embeddings=131072, rms_norm_eps=1.5625e-07, pad_token_id=151329,
            eos_token_id=[151329, 151336, 151338], bos_token_id=None, attention_bias=True, partial_rotary_factor=0.5)
_QWEN_MOE = dict(_QWEN, hidden_size=2048, num_hidden_layers=24, decoder_sparse_step=1, norm_topk_prob=False)
_COHERE = dict(_COMMON, vocab_size=256000, hidden_size=8192, intermediate_size=22528, num_hidden_layers=40,
               num_attention_heads=64, max_position_embeddings=8192, rope_theta=500000.0, layer_norm_eps=1e-5,
               logit_scale=0.0625, tie_word_embeddings=True, pad_token_id=0, bos_token_id=5, eos_token_id=255001)
_GEMMA2 = dict(_COMMON, vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
               num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
               tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
               hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=4096,
               sliding_window_pattern=2, final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
_GRANITE = dict(_LLAMA, embedding_multiplier=1.0, logits_scaling=1.0, residual_multiplier=1.0, attention_multiplier=1.0)
_GRANITE_MOE = dict(_GRANITE, num_experts=8, num_experts_per_tok=2)
TRANSFORMERS_DEFAULTS = {
    "LlamaForCausalLM": _LLAMA,
    ARCEE: dict(_COMMON, hidden_size=2560, intermediate_size=18432, max_position_embeddings=4096, rms_norm_eps=1e-5,
                bos_token_id=128000, eos_token_id=128001, hidden_act="relu2"),
    APERTUS: dict(_COMMON, vocab_size=131072, intermediate_size=14336, max_position_embeddings=65536,
                  rms_norm_eps=1e-5, rope_theta=12e6, pad_token_id=3, bos_token_id=1, eos_token_id=2,
                  hidden_act="xielu"),
    COHERE: _COHERE,
    COHERE2: dict(_COHERE, rope_theta=10000.0, head_dim=128, sliding_window=4096, sliding_window_pattern=4),
    GEMMA: dict(_COMMON, vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                num_attention_heads=16, num_key_value_heads=16, head_dim=256, max_position_embeddings=8192,
                tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                hidden_act="gelu_pytorch_tanh"),
    GEMMA2: _GEMMA2,
    VAULTGEMMA: _GEMMA2,
    GEMMA3: dict(_COMMON, vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                 rope_theta=1e6, rope_local_base_freq=10000.0, tie_word_embeddings=True, pad_token_id=0,
                 eos_token_id=1, bos_token_id=2, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
                 sliding_window=4096, sliding_window_pattern=6),
    EXAONE4: dict(_COMMON, vocab_size=102400, intermediate_size=16384, num_key_value_heads=32,
                  max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                  sliding_window=4096, sliding_window_pattern=4),
    "Olmo2ForCausalLM": _OLMO,
    "Olmo3ForCausalLM": dict(_OLMO, rope_theta=500000.0, sliding_window=4096),
    PHI3: dict(_COMMON, vocab_size=32064, hidden_size=3072, intermediate_size=8192, max_position_embeddings=4096,
               original_max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=32000,
               pad_token_id=32000, sliding_window=None),
    ERNIE: dict(_COMMON, vocab_size=103424, hidden_size=1024, intermediate_size=3072, num_hidden_layers=18,
                num_attention_heads=16, num_key_value_heads=2, head_dim=128, max_position_embeddings=131072,
                rope_theta=500000.0, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=True),
    GLM: _GLM,
    GLM4: _GLM,
    GLM4_MOE: dict(_COMMON, vocab_size=151552, intermediate_size=10944, num_hidden_layers=46, num_attention_heads=96,
                   num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, partial_rotary_factor=0.5,
                   moe_intermediate_size=1408, num_experts_per_tok=8, n_shared_experts=1, num_experts=128,
                   routed_scaling_factor=1.0, n_group=1, topk_group=1, first_k_dense_replace=1, norm_topk_prob=True,
                   num_nextn_predict_layers=1, bos_token_id=None, eos_token_id=None),
    MINIMAX_M2: dict(_COMMON, vocab_size=200064, hidden_size=3072, intermediate_size=1536, num_hidden_layers=62,
                     num_attention_heads=48, num_key_value_heads=8, head_dim=128, max_position_embeddings=196608,
                     rope_theta=5e6, bos_token_id=200034, eos_token_id=200020, num_experts=256, num_experts_per_tok=8),
    DOTS1: dict(_COMMON, vocab_size=152064, hidden_size=4608, intermediate_size=10944, num_hidden_layers=62,
                max_position_embeddings=2048, moe_intermediate_size=1408, n_shared_experts=None, num_experts=None,
                num_experts_per_tok=None, n_group=1, topk_group=1, first_k_dense_replace=0, norm_topk_prob=False,
                routed_scaling_factor=1.0, sliding_window=4096, max_window_layers=62, bos_token_id=None,
                eos_token_id=None),
    GPT_OSS: dict(_COMMON, vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
                  num_attention_heads=64, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                  rms_norm_eps=1e-5, rope_theta=150000.0, sliding_window=128, num_experts=128,
                  num_experts_per_tok=4, swiglu_alpha=1.702, swiglu_limit=7.0, attention_bias=True),
    SEED_OSS: dict(_COMMON, vocab_size=155136, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=80,
                   num_key_value_heads=8, head_dim=128, max_position_embeddings=524288, pad_token_id=1,
                   bos_token_id=0, eos_token_id=2, attention_bias=True),
    LLAMA4: dict(_COMMON, vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
                 num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                 max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=1,
                 eos_token_id=2, pad_token_id=None, num_experts=16, num_experts_per_tok=1,
                 interleave_moe_layer_step=1, use_qk_norm=True, no_rope_layer_interval=4, attention_chunk_size=8192,
                 attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1),
    GRANITE4: dict(_GRANITE_MOE, shared_intermediate_size=1024, position_embedding_type=None),
    GRANITE_MOE: _GRANITE_MOE,
    GRANITE_MOE_SHARED: dict(_GRANITE_MOE, shared_intermediate_size=0),
    GRANITE_SWA: dict(_GRANITE, vocab_size=100352, hidden_size=2560, intermediate_size=8192, num_hidden_layers=24,
                      num_attention_heads=20, num_key_value_heads=4, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      bos_token_id=100257, eos_token_id=100257, tie_word_embeddings=True, sliding_window=128),
    GRANITE_MOE_SWA: dict(_GRANITE_MOE, shared_intermediate_size=0, sliding_window=128),
    CWM: dict(_COMMON, vocab_size=128256, hidden_size=6144, intermediate_size=21504, num_hidden_layers=64,
              num_attention_heads=48, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
              rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=[128001, 128008, 128009], sliding_window=8192),
    HYPERCLOVAX: dict(_LLAMA, embedding_multiplier=1.0, logits_scaling=1.0, residual_multiplier=1.0,
                      attention_multiplier=None, use_post_norm=True),
    HELIUM: dict(_COMMON, vocab_size=48000, hidden_size=2560, intermediate_size=7040, num_hidden_layers=24,
                 num_attention_heads=20, head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-8,
                 rope_theta=100000.0, pad_token_id=3, eos_token_id=2, bos_token_id=1),
    "GraniteForCausalLM": _GRANITE,
    "MistralForCausalLM": _MISTRAL,
    STABLELM: dict(_COMMON, vocab_size=50304, hidden_size=2560, intermediate_size=6912, max_position_embeddings=4096,
                   layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=0, partial_rotary_factor=0.25,
                   use_qkv_bias=False, qk_layernorm=False, use_parallel_residual=False),
    PHI: dict(_COMMON, vocab_size=51200, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
              max_position_embeddings=2048, layer_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
              hidden_act="gelu_new", partial_rotary_factor=0.5, qk_layernorm=False),
    STARCODER2: dict(_COMMON, vocab_size=49152, hidden_size=3072, intermediate_size=12288, num_hidden_layers=30,
                     num_attention_heads=24, num_key_value_heads=2, max_position_embeddings=4096, norm_epsilon=1e-5,
                     bos_token_id=50256, eos_token_id=50256, hidden_act="gelu_pytorch_tanh", use_bias=True,
                     tie_word_embeddings=True),
    NEMOTRON: dict(_COMMON, vocab_size=256000, hidden_size=6144, intermediate_size=24576, num_attention_heads=48,
                   max_position_embeddings=4096, norm_eps=1e-5, pad_token_id=None, bos_token_id=2, eos_token_id=3,
                   hidden_act="relu2", partial_rotary_factor=0.5),
    "MinistralForCausalLM": _MISTRAL,
    MINISTRAL3: dict(_MISTRAL, vocab_size=131072, num_hidden_layers=34, head_dim=128, max_position_embeddings=262144,
                     rms_norm_eps=1e-5, pad_token_id=11, sliding_window=None),
    MIXTRAL: dict(_MISTRAL, rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None, num_experts=8,
                  num_experts_per_tok=2),
    OLMOE: dict(_OLMO, hidden_size=2048, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=16,
                max_position_embeddings=4096, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False),
    QWEN2_MOE: dict(_QWEN_MOE, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16,
                    num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                    shared_expert_intermediate_size=5632, qkv_bias=True),
    QWEN3_MOE: dict(_QWEN_MOE, intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4,
                    num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
    "Qwen2ForCausalLM": _QWEN,
    "Qwen3ForCausalLM": dict(_QWEN, head_dim=128),
    "SmolLM3ForCausalLM": dict(_COMMON, vocab_size=128256, hidden_size=2048, intermediate_size=11008,
                               num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=4,
                               max_position_embeddings=32768, rope_theta=2e6, tie_word_embeddings=True,
                               bos_token_id=128000, eos_token_id=128001, pad_token_id=128004),
}


# The RoPE scaling transformers gives a model whose config.json sets none
_DEFAULT_ROPE = {
    APERTUS: dict(rope_parameters=dict(rope_type="llama3", rope_theta=12e6, factor=8.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=8192)),
    CWM: dict(rope_parameters=dict(rope_type="llama3", rope_theta=1e6, factor=16.0, low_freq_factor=1.0,
                                   high_freq_factor=4.0, original_max_position_embeddings=8192)),
    GPT_OSS: dict(rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                                    original_max_position_embeddings=4096)),
    MINISTRAL3: dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=16.0, beta_fast=32.0, beta_slow=1.0,
                                          original_max_position_embeddings=16384, mscale=1.0, mscale_all_dim=1.0,
                                          llama_4_scaling_beta=0.1))}


def _read_json(path: str, required: bool = True) -> dict:
    if not os.path.isfile(path):
        if required:
            raise FileNotFoundError(f"missing {os.path.basename(path)} in {os.path.dirname(path)}")
        return {}
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e


def _as_tuple(x) -> tuple[int, ...]:
    if x is None:
        return ()
    return tuple(int(i) for i in x) if isinstance(x, (list, tuple)) else (int(x),)


def _nope_layers(arch: str, c: dict) -> tuple[int, ...]:
    """SmolLM3's and Llama 4's layers without RoPE: those whose `no_rope_layers` flag is 0, by default
    (Llama 4's also where the list is empty) every `no_rope_layer_interval`-th; Granite 4's, all but where
    position_embedding_type is "rope"; Granite SWA's, those whose base in layer_rope_theta is 0 (llama.cpp's
    converter reads no_rope_layers instead, which transformers ignores: refused where they differ)."""
    if arch in GRANITE_SWAS:
        bases = c.get("layer_rope_theta") or ()
        nope = tuple(i for i, base in enumerate(bases) if not base)
        flags = c.get("no_rope_layers")
        if flags is not None and tuple(i for i, flag in enumerate(flags) if not flag) != nope:
            raise ValueError(f"config.json's no_rope_layers {flags} and layer_rope_theta {list(bases)} disagree on "
                             f"the layers without RoPE (transformers reads layer_rope_theta, llama.cpp no_rope_layers)")
        return nope
    if arch == GRANITE4 and c.get("position_embedding_type") != "rope":
        return tuple(range(int(c["num_hidden_layers"])))
    if arch not in ("SmolLM3ForCausalLM", LLAMA4):
        return ()
    n = int(c["num_hidden_layers"])
    flags = c.get("no_rope_layers")
    if flags is None or (arch == LLAMA4 and not flags):
        flags = [int((i + 1) % int(c.get("no_rope_layer_interval", 4)) != 0) for i in range(n)]
    if len(flags) < n:
        raise ValueError(f"config.json's no_rope_layers lists {len(flags)} layers, the model has {n}")
    return tuple(i for i in range(n) if not flags[i])


def _sliding_window(arch: str, c: dict, nope: tuple[int, ...]) -> tuple[int | None, tuple[int, ...] | None]:
    """The attention window and the layers it applies to (None: all), as transformers reads them: Llama, Apertus,
    Arcee, Cohere, Gemma 1, GLM-4.5, Granite but Granite SWA, Helium, MiniMax-M2, Nemotron, OLMo 2, OLMoE and
    StableLM have none, nor Qwen's mixtures of experts (which refuse use_sliding_window); Mistral, Ministral 3,
    Mixtral, Phi-3 and StarCoder2 window every layer; Ministral, CWM, Granite SWA, Gemma 2 and 3, OLMo 3, EXAONE 4,
    Cohere 2, GPT-OSS, dots.llm1, and Qwen2, Qwen3 and SmolLM3 with use_sliding_window, the layers `layer_types`
    calls sliding, by default all of Ministral's, Gemma's, EXAONE 4's and Cohere 2's as sliding_window_pattern says,
    OLMo 3's but every fourth, CWM's and Granite SWA's all but every fourth from the first, GPT-OSS's every other
    from the first, Qwen's and dots.llm1's from max_window_layers on and SmolLM3's NoPE layers; Llama 4's chunks of
    attention_chunk_size (`ModelConfig.window_chunks`) in those it calls chunked, by default those with RoPE."""
    window, n, kinds = c.get("attention_chunk_size" if arch == LLAMA4 else "sliding_window"), \
        int(c["num_hidden_layers"]), c.get("layer_types")
    windowed = "chunked_attention" if arch == LLAMA4 else "sliding_attention"
    if arch in ("LlamaForCausalLM", APERTUS, ARCEE, COHERE, GEMMA, GLM4_MOE, "GraniteForCausalLM", GRANITE4,
                GRANITE_MOE, GRANITE_MOE_SHARED, HELIUM, HYPERCLOVAX, MINIMAX_M2, NEMOTRON, "Olmo2ForCausalLM",
                OLMOE, STABLELM) or not window:
        return None, None
    if arch in (QWEN2_MOE, QWEN3_MOE) and c.get("use_sliding_window"):  # transformers' versions disagree on where
        raise ValueError(f"unsupported use_sliding_window: true for {arch}")
    if arch in ("MistralForCausalLM", MINISTRAL3, MIXTRAL, PHI3, STARCODER2):  # whose models ignore layer_types
        if kinds is not None and set(kinds) != {"sliding_attention"}:
            raise ValueError(f"unsupported layer_types {sorted(set(kinds))} for {arch}, which windows every layer "
                             f"(sliding_window {window}; MinistralForCausalLM reads them)")
        return int(window), None
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "SmolLM3ForCausalLM", QWEN2_MOE, QWEN3_MOE) and \
            not c.get("use_sliding_window"):
        return None, None
    if kinds is None:
        sliding = {"MinistralForCausalLM": lambda i: True, "SmolLM3ForCausalLM": lambda i: i in nope,
                   LLAMA4: lambda i: i not in nope,
                   "Olmo3ForCausalLM": lambda i: (i + 1) % 4 != 0, GPT_OSS: lambda i: i % 2 == 0,
                   **dict.fromkeys((CWM, *GRANITE_SWAS), lambda i: i % 4 != 0),
                   # every pattern-th layer global:
                   **dict.fromkeys((COHERE2, EXAONE4, *GEMMAS),
                                   lambda i: (i + 1) % int(c["sliding_window_pattern"]) != 0)
                   }.get(arch, lambda i: i >= int(c.get("max_window_layers", 28)))
        kinds = [windowed if sliding(i) else "full_attention" for i in range(n)]
    if len(kinds) != n or not set(kinds) <= {windowed, "full_attention"}:
        raise ValueError(f"unsupported layer_types {kinds}: expected full_attention or {windowed} for "
                         f"each of the {n} layers")
    layers = tuple(i for i, kind in enumerate(kinds) if kind == windowed)
    if not layers:
        return None, None
    return int(window), None if len(layers) == n else layers


def _experts(arch: str, c: dict) -> dict:
    """A mixture of experts' `ModelConfig` fields, as transformers reads them (none for a dense model): Qwen's
    MoE layers are every decoder_sparse_step-th but mlp_only_layers, Llama 4's those moe_layers lists, by
    default every interleave_moe_layer_step-th; Mixtral and GPT-OSS (a softmax over the chosen experts'
    logits) renormalise the chosen experts' weights, as Granite's do, the others where norm_topk_prob says;
    GPT-OSS's router and experts have biases; Llama 4 weights its experts' inputs by sigmoids and has an
    ungated shared expert of their size, Granite's (but GraniteMoe's) one of shared_intermediate_size;
    GLM-4.5's and dots.llm1's are all layers but their first first_k_dense_replace, routed as DeepSeek-V3's
    (n_group, topk_group, routed_scaling_factor), beside n_shared_experts ungated shared experts (one of their
    sizes' sum); MiniMax-M2's routed so too without groups, renormalised, in every layer."""
    experts = int(c.get("num_experts") or 0)
    if arch not in MOES or not experts:
        return {}
    if arch in DEEPSEEK_MOES:  # their first first_k_dense_replace layers dense
        # (no defaults in dots.llm1's config class)
        if missing := [k for k in ("num_experts_per_tok", "n_shared_experts") if c[k] is None]:
            raise ValueError(f"config.json's {' and '.join(missing)} must be a number for {arch}, got null")
        size, first, n = int(c["moe_intermediate_size"]), int(c["first_k_dense_replace"]), int(c["num_hidden_layers"])
        return dict(num_experts=experts, experts_per_token=int(c["num_experts_per_tok"]), expert_size=size,
                    moe_layers=tuple(range(first, n)) if first else None, routing="sigmoid",
                    norm_topk=bool(c["norm_topk_prob"]), expert_groups=int(c["n_group"]),
                    expert_groups_kept=int(c["topk_group"]), routed_scaling=float(c["routed_scaling_factor"]),
                    shared_expert_size=size * int(c["n_shared_experts"]), shared_expert_gate=False)
    if arch == MINIMAX_M2:  # in every layer
        return dict(num_experts=experts, experts_per_token=int(c["num_experts_per_tok"]),
                    expert_size=int(c["intermediate_size"]), routing="sigmoid", norm_topk=True)
    shared = {QWEN2_MOE: "shared_expert_intermediate_size", **dict.fromkeys(
        (GRANITE4, GRANITE_MOE_SHARED, GRANITE_MOE_SWA), "shared_intermediate_size")}.get(arch)  # (its size's key)
    key = "interleave_moe_layer_step" if arch == LLAMA4 else "decoder_sparse_step"
    n, step = int(c["num_hidden_layers"]), c.get(key, 1)
    if not (isinstance(step, int) and step > 0):
        raise ValueError(f"config.json's {key} must be a positive integer, got {step!r}")
    dense = set(c.get("mlp_only_layers") or ())
    layers = tuple(i for i in range(n) if i not in dense and (i + 1) % step == 0)
    if arch == LLAMA4:
        layers = layers if c.get("moe_layers") is None else tuple(int(i) for i in c["moe_layers"])
        return dict(num_experts=experts, experts_per_token=int(c["num_experts_per_tok"]),
                    expert_size=int(c["intermediate_size"]), moe_layers=None if len(layers) == n else layers,
                    routing="sigmoid_input", shared_expert_size=int(c["intermediate_size"]), shared_expert_gate=False)
    return dict(num_experts=experts, experts_per_token=int(c["num_experts_per_tok"]),
                expert_size=int(c.get("moe_intermediate_size") or c["intermediate_size"]),
                moe_layers=None if len(layers) == n else layers,
                norm_topk=arch in (MIXTRAL, GPT_OSS, *GRANITE_MOES) or bool(c["norm_topk_prob"]),
                shared_expert_size=int(c[shared] or 0) if shared else 0,
                shared_expert_gate=arch not in GRANITE_MOES, expert_bias=arch == GPT_OSS,
                expert_format="mxfp4" if c.get("quantization_config") else "dense")  # (the only one let through)


def _query_scaling(arch: str, c: dict, nope: tuple[int, ...]) -> QueryScaling | None:
    """The queries' scaling with their position (`ModelConfig.query_scaling`): Ministral 3's from its RoPE
    parameters (llama_4_scaling_beta, and the original context as its period), Llama 4's in its NoPE
    layers where attn_temperature_tuning says (attn_scale, floor_scale)."""
    if arch == LLAMA4 and c.get("attn_temperature_tuning") and nope:
        if not (isinstance(c["attn_scale"], (int, float)) and isinstance(c["floor_scale"], (int, float))
                and c["attn_scale"] >= 0 and c["floor_scale"] >= 1 and float(c["floor_scale"]).is_integer()):
            raise ValueError(f"config.json's attn_scale and floor_scale must be a number >= 0 and a whole number "
                             f">= 1 (Llama 4's attention temperature tuning), got {c['attn_scale']!r} and "
                             f"{c['floor_scale']!r}")
        return QueryScaling(float(c["attn_scale"]), int(c["floor_scale"]), offset=1, nope_only=True)
    if arch != MINISTRAL3:
        return None
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    beta, period = rope.get("llama_4_scaling_beta"), rope.get("original_max_position_embeddings")
    if not all(isinstance(v, (int, float)) for v in (beta, period)):
        raise ValueError(f"{MINISTRAL3}'s rope_parameters need numbers llama_4_scaling_beta and "
                         f"original_max_position_embeddings (its queries' scaling with position), got {rope}")
    return QueryScaling(float(beta), int(period))


def _rope(arch: str, c: dict) -> tuple[float, RopeScaling | None, float | None, int | None]:
    """RoPE base and scaling, the windowed layers' own base (`_LOCAL_ROPE`), and the dimensions of a head it rotates
    (None: all; Phi-3's and GLM's partial_rotary_factor, MiniMax-M2's rotary_dim): transformers >= 5 writes them in
    `rope_parameters` (those models: a set for each layer kind), earlier versions as `rope_theta`, `rope_scaling`
    and the key `_LOCAL_ROPE` names."""
    params = c.get("rope_parameters") or {}
    local = float(c[_LOCAL_ROPE[arch]]) if arch in _LOCAL_ROPE else None
    if arch in _LOCAL_ROPE and set(params) == {"full_attention", "sliding_attention"}:
        if params["sliding_attention"].get("rope_type", "default") != "default":
            raise ValueError(f"unsupported RoPE scaling of the windowed layers {params['sliding_attention']}")
        params, local = params["full_attention"], float(params["sliding_attention"]["rope_theta"])
    if params and "rope_theta" not in params:
        raise ValueError(f"unsupported rope_parameters {params}: expected one set for every layer")
    theta = params.get("rope_theta", c["rope_theta"])
    if theta is None:
        raise ValueError("config.json sets rope_theta to null: the RoPE base must be a number")
    theta = float(theta)
    rs = params or c.get("rope_scaling") or {}
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    # (MiniMax-M2's released configs give the rotated dims as rotary_dim)
    default = c["rotary_dim"] / head_dim if arch == MINIMAX_M2 and c.get("rotary_dim") else 1.0
    partial = float(rs.get("partial_rotary_factor", c.get("partial_rotary_factor", default)))
    rotary = None if partial == 1.0 else int(head_dim * partial)  # (transformers rounds it down so)
    # (the others' models rotate all of each head)
    if rotary is not None and (arch not in (PHI, PHI3, GLM, GLM4, GLM4_MOE, MINIMAX_M2, NEMOTRON, STABLELM)
                               or rotary % 2):
        raise ValueError(f"unsupported partial_rotary_factor {partial} for {arch} (RoPE on {rotary} of a head's "
                         f"{head_dim} dimensions)")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "mrope":  # Qwen2-VL's (transformers 4's name): on text, the default RoPE (`TEXT_MODELS`)
        kind = "default"
    if arch == PHI3 and kind in ("su", "yarn"):  # Phi-3's configs name its LongRoPE so
        kind = "longrope"
    if kind == "default":
        return theta, None, local, rotary
    # transformers 5: a top-level original_max_position_embeddings (Phi-3's) comes first
    original = int(c.get("original_max_position_embeddings") or rs.get("original_max_position_embeddings")
                   or c["max_position_embeddings"])
    factor = rs.get("factor")
    if factor is None and kind in ("yarn", "longrope"):  # DeepSeek-V3's, Phi-3's: the two contexts' ratio
        factor = c["max_position_embeddings"] / original
    if factor is None and kind in RopeScaling.KINDS:  # (RopeScaling names an unknown kind)
        raise ValueError(f"unsupported rope scaling {rs} (it has no factor)")
    attention_factor = rs.get("attention_factor") if kind in ("yarn", "longrope") else None  # (others have none)
    if kind == "yarn" and attention_factor is None and rs.get("mscale") and rs.get("mscale_all_dim"):
        attention_factor = yarn_mscale(factor, rs["mscale"]) / yarn_mscale(factor, rs["mscale_all_dim"])
    short = long = ()  # LongRoPE's per-frequency factors
    if kind == "longrope":
        if not all(isinstance(rs.get(key), list) for key in ("short_factor", "long_factor")):
            raise ValueError(f"LongRoPE scaling needs lists short_factor and long_factor, got {rs}")
        short, long = (tuple(float(f) for f in rs[key]) for key in ("short_factor", "long_factor"))
    scaling = RopeScaling(kind=kind, factor=float(factor or 1), low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                          high_freq_factor=float(rs.get("high_freq_factor", 4.0)), original_max_position=original,
                          beta_fast=float(rs.get("beta_fast") or 32), beta_slow=float(rs.get("beta_slow") or 1),
                          truncate=bool(rs.get("truncate", True)), factors=short, long_factors=long,
                          attention_factor=None if attention_factor is None else float(attention_factor))
    return theta, scaling, local, rotary


def _layer_bases(c: dict, theta: float, scaling: RopeScaling | None,
                 windowed: tuple[int, ...] | range) -> tuple[float, float | None]:
    """Granite SWA's RoPE base per layer (layer_rope_theta, by default `theta` in every layer; a 0, no RoPE:
    `_nope_layers`) as ours: one base for all layers with RoPE, or one for the windowed layers (`windowed`)
    and one for the others where RoPE is unscaled (transformers scales every base alike, we the global one)."""
    bases, n = c.get("layer_rope_theta"), int(c["num_hidden_layers"])
    if bases is None:
        return theta, None
    if len(bases) != n or not all(isinstance(b, (int, float)) and b >= 0 for b in bases):
        raise ValueError(f"config.json's layer_rope_theta must list a RoPE base >= 0 (0: none) for each of the "
                         f"{n} layers, got {bases}")
    local, other = ({float(b) for i, b in enumerate(bases) if b and (i in windowed) == kind} for kind in (True, False))
    if len(local | other) <= 1:
        return (local | other or {theta}).pop(), None
    if len(local) == len(other) == 1 and scaling is None:
        return other.pop(), local.pop()
    raise ValueError(f"unsupported layer_rope_theta {bases}: one RoPE base for every layer with RoPE, or one for "
                     f"the windowed layers and one for the others, without RoPE scaling")


def _with_defaults(c: dict) -> tuple[str, dict]:
    """The architecture config.json names, and the config with what it leaves out as transformers reads it
    (of a multimodal checkpoint, its text model's)."""
    archs = c.get("architectures") or []
    if archs and archs[0] in TEXT_MODELS:  # its text model alone (Qwen2-VL's config of transformers 4: the top level)
        config = c.get("text_config") or {k: v for k, v in c.items() if k not in ("model_type", "vision_config")}
        kind = config.get("model_type")
        text = TEXT_MODELS[archs[0]] if kind is None else _MODEL_TYPES.get(kind)
        if text is None:  # (Ministral 3's, say)
            raise ValueError(f"unsupported text model {kind!r} of {archs[0]}")
        tied = {"tie_word_embeddings": c["tie_word_embeddings"]} if "tie_word_embeddings" in c else {}
        c, archs = {**tied, **config, "architectures": [text]}, [text]
    arch = archs[0] if archs else _MODEL_TYPES.get(c.get("model_type"))
    if arch not in SUPPORTED_ARCHITECTURES:
        found = repr(arch) if archs else f"model_type {c.get('model_type')!r} without architectures"
        raise ValueError(f"unsupported architecture {found} (supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES + tuple(TEXT_MODELS))})")
    # the experts' count: num_local_experts in some of transformers' configs (Mixtral's, GPT-OSS's, and Qwen3-MoE's
    # as transformers >= 5 saves it), n_routed_experts in DeepSeek-V3's (GLM-4.5's, dots.llm1's), num_experts in
    # others; num_experts here
    for key in ("num_local_experts", "n_routed_experts"):
        if c.get("num_experts") is None and c.get(key) is not None:
            c = {**c, "num_experts": c[key]}
    c = {**TRANSFORMERS_DEFAULTS[arch], **c}
    if arch == STABLELM:  # its heads are hidden_size / num_attention_heads wide, whatever head_dim says
        c.pop("head_dim", None)
    if not (c.get("rope_scaling") or c.get("rope_parameters")):  # (where config.json has none, or null)
        c.update(_DEFAULT_ROPE.get(arch, {}))
    return arch, c


def config_from_hf(c: dict, generation: dict | None = None, dtype: str = "float32") -> ModelConfig:
    """ModelConfig from config.json (and generation_config.json, which may list more EOS ids), missing keys
    read as transformers reads them. Settings the model does not implement are refused, not ignored: they
    would change its answers."""
    arch, c = _with_defaults(c)
    if nulls := [k for k in _NOT_NULL if c[k] is None]:  # transformers' configs refuse these too
        raise ValueError(f"config.json sets {', '.join(nulls)} to null: {'they need' if nulls[1:] else 'it needs'} "
                         f"a value (leave a key out for transformers' default)")
    if quantized := c.get("quantization_config"):  # its tensors would fail one by one, not naming why
        method = quantized.get("quant_method", "unknown") if isinstance(quantized, dict) else quantized
        if (arch, method) != (GPT_OSS, "mxfp4"):  # (GPT-OSS's experts as released, kept so: `mxfp4.py`)
            raise ValueError(f"unsupported quantized checkpoint (quantization_config: {method}): load the "
                             f"unquantized weights (float32, bfloat16 or float16 safetensors), or a GGUF file")
    act_key = "hidden_activation" if arch in GEMMAS else "hidden_act"  # Gemma 2's and 3's configs name it so
    # (Gemma 1's released configs say "gelu", which transformers reads as the tanh approximation they meant)
    act = "gelu_tanh" if arch == GEMMA and c.get(act_key) == "gelu" else _ACTIVATIONS.get(c.get(act_key, "silu"))
    if act is None:
        raise ValueError(f"unsupported {act_key} {c[act_key]!r} (supported: {', '.join(_ACTIVATIONS)})")
    if arch == GPT_OSS:  # its experts compute this whatever hidden_act says
        act = "clamped_swiglu"
    if c.get("use_bidirectional_attention"):  # EmbeddingGemma's
        raise ValueError(f"unsupported use_bidirectional_attention: {c['use_bidirectional_attention']}")
    if arch == GRANITE4:  # Granite 4: its attention-only models
        kinds = c.get("layer_types") or c.get("layers_block_type") or ["linear_attention"] * int(c["num_hidden_layers"])
        # ("attention" as IBM released it; transformers >= 5 saves it as "full_attention", Mamba as "linear_attention")
        if not set(kinds) <= {"attention", "full_attention"}:
            raise ValueError(f"unsupported GraniteMoeHybridForCausalLM with layers {sorted(set(kinds))} (only Granite "
                             f"4's attention-only models load, not its Mamba layers)")
        if not c["num_experts"]:  # shared_mlp is its MLP
            c = {**c, "intermediate_size": c["shared_intermediate_size"]}
    if arch == PHI and c.get("qk_layernorm"):  # (no released Phi sets it)
        raise ValueError(f"unsupported qk_layernorm: true for {PHI} (LayerNorms of each query and key head, with "
                         f"biases)")
    if c.get("clip_qkv") is not None:  # OLMoE's
        raise ValueError(f"unsupported clip_qkv: {c['clip_qkv']} (queries, keys and values clipped)")
    # Qwen2 biases Q, K and V (Qwen2-MoE where qkv_bias says); attention_bias biases Q, K, V and O as
    # transformers reads it, only Q, K and V in GLM's, Helium's and Seed-OSS's models (Seed-OSS's
    # attention_out_bias biases O), nothing where they ignore it; use_bias all of attention's and the MLP's
    # (ERNIE's, StarCoder2's), as Phi's always are
    use_bias = arch in _USE_BIAS and bool(c.get("use_bias")) or arch == PHI
    attention_bias = use_bias or bool(c.get("attention_bias")) and arch not in _NO_ATTENTION_BIAS
    qkv_key = {QWEN2_MOE: "qkv_bias", STABLELM: "use_qkv_bias"}.get(arch)
    qkv_bias = arch == "Qwen2ForCausalLM" or bool(c[qkv_key] if qkv_key else attention_bias)
    output_bias = bool(c.get("attention_out_bias")) if arch == SEED_OSS else attention_bias and \
        arch not in (GLM, GLM4, GLM4_MOE, HELIUM)
    theta, scaling, local_theta, rotary = _rope(arch, c)
    nope = _nope_layers(arch, c)
    window, window_layers = _sliding_window(arch, c, nope)
    # RoPE only in the windowed layers: EXAONE 4's where there are global ones beside them, Cohere 2's always
    if arch == COHERE2 or (arch == EXAONE4 and window_layers is not None):
        nope = tuple(i for i in range(int(c["num_hidden_layers"])) if not window or i not in (window_layers or [i]))
    if arch in GRANITE_SWAS:
        windowed = () if not window else window_layers or range(int(c["num_hidden_layers"]))
        theta, local_theta = _layer_bases(c, theta, scaling, windowed)
    heads, cohere = int(c["num_attention_heads"]), arch in (COHERE, COHERE2)
    eos = _as_tuple(c.get("eos_token_id"))
    eos += tuple(i for i in _as_tuple((generation or {}).get("eos_token_id")) if i not in eos)
    return ModelConfig(
        vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size_mlp" if arch == LLAMA4 else "intermediate_size"]),
        num_layers=int(c["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
        max_position_embeddings=int(c["max_position_embeddings"]),
        rope_theta=theta, rope_scaling=scaling, rotary_dim=rotary,
        query_scaling=_query_scaling(arch, c, nope),
        rms_norm_eps=float(c[_NORM_EPS.get(arch, "rms_norm_eps")]),
        tie_word_embeddings=bool(c["tie_word_embeddings"]),
        attention_bias=qkv_bias, output_bias=output_bias, attention_sinks=arch in (GPT_OSS, *GRANITE_SWAS),
        sliding_window=window, window_layers=window_layers, window_chunks=arch == LLAMA4 and window is not None,
        nope_layers=nope,
        qk_norm={**dict.fromkeys(("Qwen3ForCausalLM", QWEN3_MOE, GEMMA3, EXAONE4, APERTUS, DOTS1), "head"),
                 **dict.fromkeys((*OLMOS, OLMOE, MINIMAX_M2), "all"),
                 LLAMA4: "unweighted" if c.get("use_qk_norm") else None,
                 GLM4_MOE: "head" if c.get("use_qk_norm") else None,
                 # (Command R+'s, StableLM 2 12B's)
                 COHERE: "per_head" if c.get("use_qk_norm") else None,
                 STABLELM: "per_head" if c.get("qk_layernorm") else None}.get(arch),
        hidden_act=act, gated_mlp=arch not in (APERTUS, ARCEE, NEMOTRON, PHI, STARCODER2),
        lm_head_bias=arch == PHI,
        mlp_bias=use_bias or arch in _MLP_BIAS and bool(c.get("mlp_bias")),
        **{k: float(c[k]) for k in ("swiglu_alpha", "swiglu_limit") if arch == GPT_OSS},
        local_rope_theta=local_theta if window else None,
        pre_norms=arch not in POST_NORMS_ONLY,
        post_norms=arch in (GEMMA2, GEMMA3, GLM4, *POST_NORMS_ONLY) or arch == HYPERCLOVAX and bool(c["use_post_norm"]),
        attn_softcap=c.get("attn_logit_softcapping") if arch in GEMMAS else None,
        final_softcap=c.get("final_logit_softcapping") if arch in GEMMAS else None,
        embedding_multiplier={**dict.fromkeys((*GRANITES, HYPERCLOVAX), c.get("embedding_multiplier")),
                              **dict.fromkeys((GEMMA, *GEMMAS), int(c["hidden_size"]) ** 0.5)}.get(arch, 1.0),
        logits_scaling={**dict.fromkeys(GRANITES, c.get("logits_scaling")),
                        **dict.fromkeys((COHERE, COHERE2), 1 / c["logit_scale"] if c.get("logit_scale") else 0),
                        HYPERCLOVAX: 1 / c["logits_scaling"] if c.get("logits_scaling") else 0}.get(arch, 1.0),
        layer_norm=arch in _LAYER_NORMS, norm_bias=arch in _LAYER_NORMS and not cohere,
        parallel_block=cohere or arch == PHI or arch == STABLELM and bool(c["use_parallel_residual"]),
        **_experts(arch, c),
        bos_token_id=c.get("bos_token_id"), eos_token_ids=eos,
        pad_token_id=int(c["pad_token_id"]) if c.get("pad_token_id") is not None else (eos[0] if eos else 0),
        dtype=dtype)


def _tensor_index(directory: str) -> dict[str, str]:
    """Tensor name -> safetensors file, from the shard index or the single file."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = _read_json(index)["weight_map"]
    else:
        single = os.path.join(directory, "model.safetensors")
        if not os.path.isfile(single):
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}")
        with open_safetensors(single) as f:
            files = {k: "model.safetensors" for k in f.keys()}
    return {k: os.path.join(directory, v) for k, v in files.items()}


def load_tokenizer(directory: str, cfg: ModelConfig) -> Tokenizer:
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        hint = (" (a SentencePiece tokenizer.model is not read: transformers' AutoTokenizer.from_pretrained(...)"
                ".save_pretrained(...) writes its tokenizer.json)"
                if os.path.isfile(os.path.join(directory, "tokenizer.model")) else "")
        raise FileNotFoundError(f"missing tokenizer.json in {directory}{hint}")
    tok = tokenizers.Tokenizer.from_file(path)
    tc = _read_json(os.path.join(directory, "tokenizer_config.json"), required=False)
    # a multimodal model's processor may keep it in chat_template.json instead
    template = tc.get("chat_template") or _read_json(os.path.join(directory, "chat_template.json"),
                                                     required=False).get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja = os.path.join(directory, "chat_template.jinja")  # where recent transformers save it; it comes first
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    # BOS is added iff tokenizer.json's own post-processor adds it.
    probe = tok.encode("a", add_special_tokens=True).ids
    add_bos = cfg.bos_token_id is not None and probe[:1] == [cfg.bos_token_id]
    tok.no_padding()
    tok.no_truncation()
    return Tokenizer(tok, template, cfg.bos_token_id, cfg.eos_token_ids, add_bos)


def open_safetensors(path: str):
    """safe_open(path), or an error naming the file when it cannot be read (a download cut short, say)."""
    try:
        return safe_open(path, framework="numpy")
    except Exception as e:
        raise ValueError(f"cannot read safetensors file {path} (cut short, or not safetensors?): {e}") from e


class _TextModel:
    """The `Source` of a multimodal checkpoint's text model: its tensors by a text-only checkpoint's names,
    the vision tower's left out."""

    def __init__(self, source: Source):
        self.source = source
        self.stored = {ours + name[len(theirs):]: name for name in source.names()
                       for theirs, ours in _TEXT_PREFIXES if name.startswith(theirs)}

    def names(self) -> list[str]:
        return list(self.stored)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(self.stored[name])

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return self.source.read(self.stored[name], index)


class _Safetensors:
    """The `Source` of a safetensors checkpoint (one file or sharded): reads each block on its own."""

    def __init__(self, index: dict[str, str]):
        self.index, self.handles = index, {}

    def _slice(self, name: str):
        path = self.index[name]  # KeyError -> "missing tensor" in assemble_params
        if path not in self.handles:
            self.handles[path] = open_safetensors(path)
        return self.handles[path].get_slice(name)

    def names(self) -> list[str]:
        return list(self.index)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return self._slice(name)[index]


# GPT-OSS's and Llama 4's MLP tensors by the table's names, in model.layers.{i}.mlp and .feed_forward: (ours,
# theirs, which half of theirs: gate (0), up (1) or all (None))
_GPT_OSS_MLP = (("gate.weight", "router.weight", None), ("gate.bias", "router.bias", None),
                ("experts.gate_proj.bias", "experts.gate_up_proj_bias", 0),
                ("experts.up_proj.bias", "experts.gate_up_proj_bias", 1),
                ("experts.down_proj.bias", "experts.down_proj_bias", None))
_FUSED_EXPERTS = (("experts.gate_proj.weight", "experts.gate_up_proj", 0),
                  ("experts.up_proj.weight", "experts.gate_up_proj", 1),
                  ("experts.down_proj.weight", "experts.down_proj", None))
# Granite's experts by their router's name: as released, or as transformers 5 names them (as it multiplies them,
# [E, out, in], unlike GPT-OSS's and Llama 4's)
_GRANITE_EXPERTS = {"router.layer.weight": (("experts.gate_proj.weight", "input_linear.weight", 0),
                                            ("experts.up_proj.weight", "input_linear.weight", 1),
                                            ("experts.down_proj.weight", "output_linear.weight", None)),
                    "router.weight": _FUSED_EXPERTS}
_LLAMA4_MLP = (("gate.weight", "router.weight", None),
               *((f"{mlp}{w}_proj.weight", f"{mlp}{w}_proj.weight", None)
                 for mlp in ("", "shared_expert.") for w in ("gate", "up", "down")))


class _FusedExperts:
    """The `Source` of mixtures of experts that store a layer's experts in two tensors, by default as they
    multiply (`as_multiplied`), gate_up_proj [E, H, 2F] (gate and up along the outputs: GPT-OSS interleaves
    them, gate_up[..., 0::2] and [..., 1::2], Llama 4 and Granite put gate's first) and down_proj [E, F, H],
    or (Granite's) [E, 2F, H] and [E, H, F]; read as the name table expects ([E, out, in], one per
    projection); its other MLP tensors renamed (`parts`), its experts' stored names `experts`' (the table's
    name, the stored one's after the MLP's, its half). GPT-OSS also biases them
    (gate_up_proj_bias [E, 2F]), and OpenAI released its experts in MXFP4: [out, in] codes and scales
    (gate_up_proj_blocks [E, 2F, H / 32, 16] and _scales [E, 2F, H / 32], down_proj_blocks [E, H, F / 32,
    16] and _scales), read as they are into MXFP4 params (expert_format "mxfp4", `mxfp4.Mxfp4`) or, with
    expert_format "dense", dequantized (only the 32-input blocks a read covers)."""

    def __init__(self, source: Source, cfg: ModelConfig, mlp: str, parts: tuple, interleaved: bool,
                 experts: tuple = _FUSED_EXPERTS, as_multiplied: bool = True):
        self.source, self.interleaved = source, interleaved
        names = source.names()
        quantized = any(n.endswith("gate_up_proj_blocks") for n in names)
        weights = [(f"{ours}_{part}", f"{theirs}_{part}", half) for ours, theirs, half in experts
                   for part in ("blocks", "scales")] if cfg.expert_format == "mxfp4" else list(experts)
        # the table's name -> (the stored tensor, its half)
        self.parts = {f"model.layers.{i}.mlp.{table}": (f"model.layers.{i}.{mlp}.{stored}", half)
                      for i in range(cfg.num_layers) for table, stored, half in (*parts, *weights)}
        floats = {name for name in self.parts if ".experts." in name and name.endswith("proj.weight")}
        # float weights stored [E, in, out], read as ours [E, out, in]; or in MXFP4, read as their values
        self.transposed, self.dequantized = (set(), floats) if quantized else (
            floats if as_multiplied else set(), set())
        stored = {name for name, _ in self.parts.values()}
        stored |= {f"{self.parts[name][0]}_{part}" for name in self.dequantized for part in ("blocks", "scales")}
        # the stored tensors there are (a weight dequantized as read: where its codes are); a dense layer has none
        present = set(names) | {name for name in stored if f"{name}_blocks" in names}
        self._names = [n for n in names if n not in stored] + [n for n, (theirs, _) in self.parts.items()
                                                                 if theirs in present]

    def names(self) -> list[str]:
        return self._names

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.parts:
            return self.source.shape(name)
        stored, half = self.parts[name]
        if name in self.dequantized:  # its codes [E, out, G, 16] as values [E, out, G x 32]
            stored += "_blocks"
        try:
            shape = tuple(self.source.shape(stored))
        except KeyError:
            raise ValueError(f"checkpoint is missing tensor {stored!r}") from None
        if name in self.transposed:
            shape = (shape[0], shape[2], shape[1])
        if name in self.dequantized:
            shape = (*shape[:2], shape[2] * GROUP)
        return shape if half is None else (shape[0], shape[1] // 2, *shape[2:])

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        if name not in self.parts:
            return self.source.read(name, index)
        stored, half = self.parts[name]
        if half is None and name not in self.transposed | self.dequantized:
            return self.source.read(stored, index)
        e, rows, *rest = index  # rows: the outputs, our second axis
        if half is not None:  # this half's rows: of both, interleaved (then this one's taken), or its own
            first, last, _ = rows.indices(self.shape(name)[1])
            rows = slice(2 * first, 2 * last) if self.interleaved else \
                slice(half * self.shape(name)[1] + first, half * self.shape(name)[1] + last)
        if name in self.transposed:
            x = self.source.read(stored, (e, *rest, rows)).transpose(0, 2, 1)
        elif name in self.dequantized:  # the blocks of 32 inputs the read covers, dequantized
            start, stop, _ = rest[0].indices(self.shape(name)[2])
            groups = slice(start // GROUP, -(-stop // GROUP))
            codes = Mxfp4(self.source.read(stored + "_blocks", (e, rows, groups, slice(None))),
                          self.source.read(stored + "_scales", (e, rows, groups)), (0,))
            first = GROUP * groups.start
            x = np.asarray(codes.dequantize(np.float32))[..., start - first:stop - first]
        else:
            x = self.source.read(stored, (e, rows, *rest))
        return x if half is None or not self.interleaved else x[:, half::2]


def _model_source(c: dict, cfg: ModelConfig, source: Source) -> Source:
    """The checkpoint's tensors as the name table expects them: a multimodal checkpoint's text model alone
    (`_TextModel`), GLM-4.5's without its multi-token prediction layers (`loaders.Hidden`), Phi-3's fused tensors
    split (`loaders.Unfused`), Granite's multipliers or Gemma's and Nemotron's norm offsets and Gemma's query scale
    folded in (`loaders.Scaled`), a mixture of experts' experts stacked (`loaders.Renamed`; GPT-OSS's, Llama 4's and
    Granite's split: `_FusedExperts`), GLM's and Granite's (its shared_mlp's) fused gate and up split, tensors
    stored under other names renamed (GLM-4's, VaultGemma's, Apertus's and HyperCLOVA X's norms, Granite's and
    StarCoder2's MLPs, GLM-4.5's and dots.llm1's shared experts, MiniMax-M2's router's correction bias, Phi's
    projections and final norm; StableLM's query and key norms, one per head, stacked), query and key heads' dims
    reordered where RoPE covers part of them (Phi's, Phi-4-mini's, GLM's, GLM-4.5's, MiniMax-M2's, Nemotron's,
    StableLM's) or pairs adjacent ones (GLM's, ERNIE's, Cohere's, Llama 4's: `loaders.RopeOrdered`); the others' as
    they are."""
    def in_layers(names):  # {"...{i}...": "...{i}..."} for every layer
        return {ours.format(i=i): theirs.format(i=i) for ours, theirs in names.items() for i in range(cfg.num_layers)}

    if (c.get("architectures") or [None])[0] in TEXT_MODELS:
        source = _TextModel(source)
    arch, c = _with_defaults(c)
    if arch == GLM4_MOE:
        extra = range(cfg.num_layers, cfg.num_layers + int(c["num_nextn_predict_layers"] or 0))
        source = Hidden(source, tuple(f"model.layers.{i}." for i in extra))
    if arch == GPT_OSS:
        source = _FusedExperts(source, cfg, "mlp", _GPT_OSS_MLP, interleaved=True)
    elif arch == LLAMA4:
        source = _FusedExperts(source, cfg, "feed_forward", _LLAMA4_MLP, interleaved=False)
    elif arch in GRANITE_MOES and cfg.num_experts:  # (its router's name says which names its experts have)
        router = next((n for n in _GRANITE_EXPERTS if f"model.layers.0.block_sparse_moe.{n}" in source.names()),
                      "router.weight")
        source = _FusedExperts(source, cfg, "block_sparse_moe", (("gate.weight", router, None),), interleaved=False,
                               experts=_GRANITE_EXPERTS[router], as_multiplied=False)
    elif cfg.num_experts:
        source = Renamed(source, expert_stacks(cfg, *_EXPERT_NAMES.get(arch, _EXPERT_NAMES_DEFAULT)))
    if arch in DEEPSEEK_MOES and cfg.shared_expert_size:  # their shared experts', in the MoE layers
        source = Renamed(source, {ours.format(i=i): ours.format(i=i).replace(".shared_expert.", ".shared_experts.")
                                  for name in ("shared_gate_up", "shared_down") for ours in stored_names(cfg, name, HF)
                                  for i in range(cfg.num_layers) if cfg.moe(i)})
    if arch == PHI3:
        source = Unfused(source, fused_parts(cfg, HF, {"wqkv": FUSED_QKV, "w_gate_up": FUSED_GATE_UP}))
    # tensors stored under other names than the table's (HyperCLOVA X's only with its norms after attention
    # and the MLP: without them its names are Llama's)
    names = {APERTUS: _APERTUS_NORMS, GLM4: _GLM4_NORMS, MINIMAX_M2: _MINIMAX_M2_NAMES, PHI: _PHI_NAMES,
             STARCODER2: _STARCODER2_MLP, VAULTGEMMA: _VAULTGEMMA_NORMS,
             HYPERCLOVAX: _HYPERCLOVAX_NORMS if cfg.post_norms else None}.get(arch)
    if names:
        source = Renamed(source, in_layers(names))
    if arch == STABLELM and cfg.qk_norm:  # its query and key LayerNorms, stored one per head
        source = Renamed(source, {f"model.layers.{i}.self_attn.{ours}.weight": [
            f"model.layers.{i}.self_attn.{theirs}.norms.{h}.weight" for h in range(heads)]
            for i in range(cfg.num_layers) for ours, theirs, heads in (("q_norm", "q_layernorm", cfg.num_heads),
                                                                       ("k_norm", "k_layernorm", cfg.num_kv_heads))})
    if arch in (GLM, GLM4):
        source = Unfused(source, fused_parts(cfg, HF, {"w_gate_up": FUSED_GATE_UP}))
    if arch == GRANITE4 and not cfg.num_experts or arch in GRANITE_MOES and cfg.shared_expert_size:  # shared_mlp
        gate_up, down = ("shared_gate_up", "shared_down") if cfg.num_experts else ("w_gate_up", "w_down")
        source = Renamed(source, in_layers({stored_names(cfg, down, HF)[0]: _GRANITE_SHARED_MLP[1]}))
        source = Unfused(source, fused_parts(cfg, HF, {gate_up: _GRANITE_SHARED_MLP[0]}))
    if arch in INTERLEAVED_ROPE or cfg.rotary != cfg.head_dim:
        source = RopeOrdered(source, cfg, HF, interleaved=arch in INTERLEAVED_ROPE)
    if arch in (*GRANITES, HYPERCLOVAX):
        attention = c["attention_multiplier"]
        if attention is None:  # (HyperCLOVA X's default)
            attention = cfg.head_dim ** -0.5
        return Scaled(source, cfg, HF, granite_adjustments(cfg, c["residual_multiplier"], attention))
    if arch in (GEMMA, *GEMMAS):  # (Gemma 1 scales the scores by head_dim^-1/2)
        query_scalar = cfg.head_dim if arch == GEMMA else c["query_pre_attn_scalar"]
        return Scaled(source, cfg, HF, gemma_adjustments(cfg, query_scalar))
    if arch == NEMOTRON:
        return Scaled(source, cfg, HF, norm_shifts())
    return source


def open_hf(directory: str, dtype: str = "float32", mesh: Mesh | None = None,
            dequantize_experts: bool = False) -> OpenedModel:
    """A checkpoint directory's config (its tokenizer and tensor files found and read too: a missing file
    fails now); `.load()` reads the weights, with a `mesh` each parameter's shards placed directly on
    their devices (`sharding.param_specs`), never the whole model on the host; MXFP4 experts (GPT-OSS's)
    kept so unless `dequantize_experts`."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    c = _read_json(os.path.join(directory, "config.json"))
    cfg = config_from_hf(c, _read_json(os.path.join(directory, "generation_config.json"), required=False), dtype)
    if dequantize_experts:
        cfg = dataclasses.replace(cfg, expert_format="dense")
    source = _model_source(c, cfg, _Safetensors(_tensor_index(directory)))
    return OpenedModel(cfg, load_tokenizer(directory, cfg), HF, source, mesh)


def load_hf(directory: str, dtype: str = "float32", mesh: Mesh | None = None,
            dequantize_experts: bool = False) -> LoadedModel:
    return open_hf(directory, dtype, mesh, dequantize_experts).load()
