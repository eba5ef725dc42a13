"""GGUF loader: config and tokenizer from the metadata, tensors dequantized with the `gguf` package."""

from __future__ import annotations

import functools
import math
import os
import re
import sys

import gguf
import numpy as np
from jax.sharding import Mesh

from redrafter_jax.config import ModelConfig, QueryScaling, RopeScaling, yarn_mscale
from redrafter_jax.loaders import (
    GGUF,
    ROPE_FACTORS,
    Hidden,
    LoadedModel,
    OpenedModel,
    Renamed,
    RopeOrdered,
    Scaled,
    Unfused,
    fused_parts,
    gemma_adjustments,
    granite_adjustments,
    stored_names,
)
from redrafter_jax.mxfp4 import GROUP
from redrafter_jax.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama", "apertus", "arcee", "cohere2", "command-r", "dots1", "ernie4_5", "exaone4", "gemma",
                           "gemma2", "gemma3", "glm4", "glm4moe", "gpt-oss", "granite", "granitemoe", "granite_swa",
                           "llama4", "minimax-m2", "mistral3", "nemotron", "olmo2", "olmoe", "phi2", "qwen2",
                           "qwen2moe", "qwen2vl", "qwen3", "qwen3moe", "seed_oss", "smollm3", "stablelm", "starcoder2")
# (qwen2vl: Qwen2-VL's and Qwen2.5-VL's text model, Qwen2's; its multimodal RoPE sections, on text, Qwen2's RoPE)
# llama.cpp's reading of these differs between its versions (Phi-3's window): from Hugging Face only
HF_ONLY = ("phi3",)
# Architectures whose Q/K rows llama.cpp's converter permutes for its interleaved RoPE (`unpermute_rope`)
_PERMUTED = ("llama", "arcee", "granite", "granitemoe", "granite_swa", "mistral3", "smollm3")
# Granite's multipliers, and where a file has experts (granitemoe: Granite 3's mixtures) their weights renormalised
# beside an ungated shared expert (GraniteMoeShared's); Granite SWA's windows, sinks and layers without RoPE, dense
# or with such experts (their gate and up fused, as its converter keeps them)
_GRANITES = ("granite", "granitemoe", "granite_swa")
# routed as DeepSeek-V3's (`ModelConfig.routing` "sigmoid"): GLM-4.5's and dots.llm1's mixtures of experts (with
# ungated shared experts), MiniMax-M2's (without)
_CORRECTED = ("dots1", "glm4moe", "minimax-m2")
_UNGATED_SHARED = ("dots1", "glm4moe", "llama4", *_GRANITES)  # (shared experts without a sigmoid gate)
# Those that rotate adjacent dims (llama.cpp's "normal" RoPE) as their Hugging Face checkpoints store them
_ADJACENT_ROPE = ("cohere2", "command-r", "ernie4_5", "glm4", "llama4")
# Cohere's: LayerNorms, attention and the MLP side by side, logits scaled
_COHERE = ("cohere2", "command-r")
# Those with LayerNorms (Nemotron's, StableLM's and StarCoder2's biased, Nemotron's weights stored by its
# converter as the 1 + w they scale by)
_LAYER_NORMS = (*_COHERE, "nemotron", "phi2", "stablelm", "starcoder2")
# Those whose RoPE may cover part of each head (`rope.dimension_count`)
_PARTIAL_ROPE = ("glm4", "glm4moe", "minimax-m2", "nemotron", "phi2", "stablelm")
# llama.cpp's Command R7B, EXAONE 4.0 32B (the 64-layer EXAONE 4, windowed by 4096 positions where the file
# names no window) and OLMo 3: 3 of every 4 layers windowed where the file names no pattern (the first two with
# RoPE only there)
WINDOW_EVERY = 4
EXAONE4_WINDOWED = dict(layers=64, window=4096)
# Those whose converter names the norm before the MLP post_attention_norm
_MLP_NORM_AFTER_ATTENTION = ("glm4moe", "gpt-oss", "seed_oss")
NOPE_EVERY = 4  # llama.cpp's SmolLM3 and Llama 4 leave every 4th layer unrotated (no GGUF key says so)
# llama.cpp's Llama 4, with no GGUF keys for these: chunks of 8192 positions in its RoPE layers, queries scaled
# by 1 + 0.1 ln(1 + floor((position + 1) / 8192)) in its NoPE layers, unweighted query and key norms but in
# the 128-expert model (Maverick)
LLAMA4 = dict(chunk=8192, temperature=QueryScaling(0.1, 8192, offset=1, nope_only=True), no_qk_norm_experts=128)
# llama.cpp's Gemma, where the file names no pattern or base: every full_every-th layer attends to all, the
# others within the window (Gemma 3's at RoPE base local_theta; Gemma 1 has no window); with no GGUF key for it,
# the 27B model, known by its layer count, scales its scores by (hidden / heads)^-1/2, the others by head_dim^-1/2
GEMMA = {"gemma": dict(full_every=None, local_theta=None, layers_27b=None),
         "gemma2": dict(full_every=2, local_theta=None, layers_27b=46),
         "gemma3": dict(full_every=6, local_theta=10000.0, layers_27b=62)}
# The tokens llama.cpp ends generation at beside the file's end-of-text, turn and message ids, in every model
# (llama-vocab.cpp as llama-cpp-python 0.3.36 ships it): those with these texts, and the fill-in-the-middle
# padding, repository and file-separator tokens (the file's ids, else the first of these texts the vocabulary
# has); but a message's <|end|> where the vocabulary ends replies and tool calls otherwise (harmony's
# <|return|> and <|call|>, Solar Open's <|flush|> and <|calls|>), and </s> where it is a normal token (beside
# Gemma 4's <|tool_response>, PLaMo's <|plamo:eos|>)
_END_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
              "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[")
_FIM_ENDS = {"fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
             "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
             "fim_sep": ("<|file_sep|>",)}
# Mixtures of experts (llama's are Mixtral's) whose chosen experts' weights llama.cpp renormalises unless
# the file's expert_weights_norm says otherwise
NORM_TOPK = ("llama", *_GRANITES, "qwen3moe")
# llama.cpp's expert gating functions (`expert_gating_func`): a softmax over all experts' logits, sigmoids of the
# chosen ones' (Llama 4's, which weigh the experts' inputs; DeepSeek-V3's, chosen by them plus exp_probs_b, in
# groups where expert_group_count says), or a softmax over the chosen ones' (GPT-OSS's, its default there: the same
# weights renormalised); none where a file names none and llama.cpp has no default (its graph aborts then)
NO_GATING, SOFTMAX, SIGMOID, SOFTMAX_CHOSEN = 0, 1, 2, 3


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (interleaved RoPE pairs -> rotate_half halves).

    llama.cpp's converter reorders each head's rows from [first half; second half] to interleaved
    pairs (0, D/2), (1, D/2+1), ...; w: [n_heads * D, ...] (weight or bias).
    """
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Reader(gguf.GGUFReader):
    """gguf's reader over a plain-array view of its memory map, reading arrays (the tokenizer's ~50-250k
    strings, their types and scores) in one pass each: gguf's slices two numpy arrays out of the map per
    string and one per number, and np.memmap's Python-level slicing hooks made that 2.4 s of SmolLM2's load
    (0.7 s on the view, 0.2 s in one pass). The same fields and tensors."""

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, mapped: np.memmap):
        self._data = mapped.view(np.ndarray)  # the same read-only pages, still mapped (the view keeps its base)

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list, list[int], list]:
        """gguf's parts of an array of strings or numbers (in a little-endian file on a little-endian host),
        as slices of one memoryview: each string's length and bytes, each number alone."""
        array, string = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING
        if raw_type != array or self.byte_order != "I" or sys.byteorder != "little":
            return super()._get_field_parts(orig_offs, raw_type)
        item_type, count = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        item, n, offs = gguf.GGUFValueType(item_type[0]), int(count[0]), orig_offs + 12
        number = self.gguf_scalar_to_np.get(item)
        if item != string and number is None:  # arrays of arrays: gguf's own way
            return super()._get_field_parts(orig_offs, raw_type)
        buf, parts = memoryview(self.data), [item_type, count]
        if item == string:
            for _ in range(n):
                size = int.from_bytes(buf[offs:offs + 8], "little")
                if offs + 8 + size > len(buf):
                    raise ValueError(f"array at byte {orig_offs} runs past the end of the file")
                parts += [buf[offs:offs + 8], buf[offs + 8:offs + 8 + size]]
                offs += 8 + size
            data = list(range(3, len(parts), 2))  # (the strings' bytes)
        else:
            width = np.dtype(number).itemsize
            if offs + n * width > len(buf):
                raise ValueError(f"array at byte {orig_offs} runs past the end of the file")
            numbers = buf[offs:offs + n * width].cast(np.dtype(number).char)
            parts += [numbers[i:i + 1] for i in range(n)]
            offs += n * width
            data = list(range(2, len(parts)))
        return offs - orig_offs, parts, data, [array] + [item] * (n > 0)


def _open(path: str) -> gguf.GGUFReader:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return _Reader(path)
    except Exception as e:  # the reader raises assorted errors on truncated/corrupt files
        raise ValueError(f"corrupt or truncated GGUF file {path}: {type(e).__name__}: {e}") from e


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise ValueError(f"GGUF metadata is missing {key!r}")
        return default
    return f.contents()


def _arch_field(reader: gguf.GGUFReader, arch: str):
    """`_field` of the architecture's own keys ("llama.context_length" as "context_length")."""
    return lambda key, default=None: _field(reader, f"{arch}.{key}", default)


MXFP4 = gguf.GGMLQuantizationType.MXFP4
MXFP4_BLOCK = 1 + GROUP // 2  # bytes of ggml's block of 32 values: the scale, then 16 of codes
_EXPERT_WEIGHTS = re.compile(r"blk\.\d+\.ffn_(gate|up|down)_exps\.weight")


def _kept_mxfp4(reader: gguf.GGUFReader) -> frozenset[str]:
    """The experts' weights where all of them are stored in MXFP4 (GPT-OSS's, or any mixture quantized so),
    which load kept in MXFP4 (`mxfp4.py`); none otherwise."""
    experts = [t for t in reader.tensors if _EXPERT_WEIGHTS.fullmatch(t.name)]
    all_mxfp4 = bool(experts) and all(t.tensor_type == MXFP4 for t in experts)
    return frozenset(t.name for t in experts) if all_mxfp4 else frozenset()


class _GGUFTensors:
    """The `Source` of a GGUF file: each tensor dequantised whole (quantisation blocks span rows), the
    last few kept while a parameter's shards are read from them; the MXFP4 tensors named in `kept` instead
    as codes and scales in our layout (`mxfp4.Mxfp4`), under their names with "_blocks" and "_scales"
    appended. ggml's block is a scale byte, then 16 bytes whose low nibbles are its first 16 codes and high
    nibbles its last 16; ours pair codes 2j and 2j + 1 in byte j, as Hugging Face checkpoints do."""

    def __init__(self, reader: gguf.GGUFReader, path: str, n_heads: int, n_kv: int, kept: frozenset[str]):
        self.tensors = {t.name: t for t in reader.tensors}
        self.path, self.n_heads, self.n_kv, self.kept = path, n_heads, n_kv, kept
        self.permuted = _field(reader, "general.architecture") in _PERMUTED
        self._dequantized = functools.lru_cache(maxsize=3)(self._dequantize)  # a fused parameter's parts

    def names(self) -> list[str]:
        return [n for n in self.tensors if n not in self.kept] + [f"{n}_{part}" for n in self.kept
                                                                  for part in ("blocks", "scales")]

    def _kept_part(self, name: str) -> tuple[str, str] | None:
        """(tensor, "blocks" or "scales") for a kept MXFP4 tensor's codes or scales, else None."""
        base, _, part = name.rpartition("_")
        return (base, part) if base in self.kept and part in ("blocks", "scales") else None

    def shape(self, name: str) -> tuple[int, ...]:
        if kept := self._kept_part(name):  # [..., inputs] as codes [..., G, 16] and scales [..., G]
            *lead, inputs = self.shape(kept[0])
            return (*lead, inputs // GROUP, 16) if kept[1] == "blocks" else (*lead, inputs // GROUP)
        return tuple(int(n) for n in reversed(self.tensors[name].shape))  # GGUF lists the fastest axis first

    def _dequantize(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        try:
            x = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ValueError(f"corrupt GGUF tensor {name!r} in {self.path}: {e}") from e
        if self.permuted and ".attn_q." in name:
            x = unpermute_rope(x, self.n_heads)
        elif self.permuted and ".attn_k." in name:
            x = unpermute_rope(x, self.n_kv)
        return x

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        if kept := self._kept_part(name):
            t = self.tensors[kept[0]]
            blocks = np.asarray(t.data).reshape(*t.data.shape[:-1], -1, MXFP4_BLOCK)[index[:t.data.ndim]]
            if kept[1] == "scales":
                return blocks[..., 0]
            codes = np.concatenate([blocks[..., 1:] & 15, blocks[..., 1:] >> 4], axis=-1)
            return (codes[..., 0::2] | codes[..., 1::2] << 4)[(..., *index[t.data.ndim:])]
        return self._dequantized(name)[index]


# YaRN keys whose meaning llama.cpp's converters and models vary (an extrapolation mix): refused rather than guessed
_YARN_REFUSED = ("rope.scaling.yarn_ext_factor",)


def _rope_scaling(reader: gguf.GGUFReader, arch: str) -> RopeScaling | None:
    """The file's RoPE scaling (RopeScaling refuses the kinds the model does not implement), as llama.cpp
    reads it: the context before scaling defaults to the file's context length."""
    m = _arch_field(reader, arch)
    # llama.cpp scales every model's cos and sin by rope.scaling.attn_factor, which converters have written with
    # another meaning (OLMo 3's once: the model's own YaRN factor, which llama.cpp multiplies by its own)
    if f"{arch}.rope.scaling.attn_factor" in reader.fields and float(m("rope.scaling.attn_factor")) != 1:
        raise ValueError(f"unsupported GGUF rope.scaling.attn_factor {m('rope.scaling.attn_factor')} (llama.cpp "
                         f"multiplies YaRN's own factor by it; converters have meant it as the whole factor)")
    kind = m("rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind not in ("linear", "yarn"):  # (LongRoPE's factors as tensors of their own, say)
        raise ValueError(f"unsupported GGUF rope scaling type {kind!r} (supported: linear, yarn, and Llama 3's "
                         f"per-frequency factors as {ROPE_FACTORS})")
    factor = float(m("rope.scaling.factor"))
    original = int(m("rope.scaling.original_context_length", m("context_length")))
    if kind == "linear":
        return RopeScaling(kind=kind, factor=factor, original_max_position=original)
    if refused := [k for k in _YARN_REFUSED if f"{arch}.{k}" in reader.fields]:
        raise ValueError(f"unsupported GGUF YaRN setting {refused[0]!r} = {m(refused[0])} (supported: the scaling "
                         f"factor, original context length and beta_fast/beta_slow)")
    # llama.cpp scales cos and sin by YaRN's own 0.1 ln(factor) + 1 (over that with the log multiplier, Ministral
    # 3's mscale_all_dim, in its place) whatever yarn_attn_factor says (the model's attention_factor, as its
    # converter writes it): a file where the two differ is refused
    log_mul = float(m("rope.scaling.yarn_log_multiplier", 0.0))
    own, key = yarn_mscale(factor) / (yarn_mscale(factor, log_mul) if log_mul else 1), "rope.scaling.yarn_attn_factor"
    if f"{arch}.{key}" in reader.fields and not math.isclose(float(m(key)), own, rel_tol=1e-6):
        raise ValueError(f"unsupported GGUF YaRN setting {key!r} = {m(key)} (llama.cpp applies YaRN's own "
                         f"{own:.6g} instead)")
    # GPT-OSS's YaRN ramp, as its model computes it, has unrounded ends (llama.cpp rounds them out)
    return RopeScaling(kind="yarn", factor=factor, original_max_position=original,
                       beta_fast=float(m("rope.scaling.yarn_beta_fast", 32.0)),
                       beta_slow=float(m("rope.scaling.yarn_beta_slow", 1.0)), truncate=arch != "gpt-oss",
                       attention_factor=own if log_mul else None)


def _window_layers(m, layers: int, every: int) -> tuple[int, ...]:
    """The windowed layers as llama.cpp reads attention.sliding_window_pattern: a flag per layer, or a period n
    (the model's `every` where the file names none) whose last layer of every n is unwindowed."""
    pattern = m("attention.sliding_window_pattern", every)
    if isinstance(pattern, list):
        if len(pattern) != layers:
            raise ValueError(f"GGUF attention.sliding_window_pattern has {len(pattern)} flags for {layers} layers")
        return tuple(i for i, windowed in enumerate(pattern) if windowed)
    return tuple(i for i in range(layers) if pattern == 0 or i % pattern < pattern - 1)


def _own_settings(reader: gguf.GGUFReader, arch: str, hidden: int, layers: int, tensors: dict) -> dict:
    """The `ModelConfig` settings an architecture has of its own, as llama.cpp reads them (tensors: the file's,
    by name)."""
    m = _arch_field(reader, arch)

    def windows(size):  # in 3 of every 4 layers (`WINDOW_EVERY`) unless the file says, RoPE only there
        window = _window_layers(m, layers, WINDOW_EVERY)
        return dict(sliding_window=size, window_layers=window, nope_layers=tuple(i for i in range(layers)
                                                                                 if i not in window))

    if arch in _GRANITES:  # Granite SWA's windows where its pattern's flags say, RoPE where its own flags do
        settings = dict(embedding_multiplier=float(m("embedding_scale")), logits_scaling=float(m("logit_scale")))
        if arch == "granite" and not m("rope.scaling.finetuned", True):  # llama.cpp's switch for its RoPE
            settings.update(nope_layers=tuple(range(layers)))
        if arch == "granite_swa":
            rope = m("attention.rope_pattern", [True] * layers)
            if not isinstance(rope, list) or len(rope) != layers:
                raise ValueError(f"GGUF attention.rope_pattern must be a flag for each of the {layers} layers, got "
                                 f"{rope}")
            window = _window_layers(m, layers, None)  # (as a Hugging Face config reads: none, some or all)
            settings.update(attention_sinks=True, nope_layers=tuple(i for i, rotated in enumerate(rope) if not rotated),
                            **(dict(sliding_window=int(m("attention.sliding_window")),
                                    window_layers=None if len(window) == layers else window) if window else {}))
        return settings
    if arch == "mistral3":  # Ministral 3's queries scaled up with their position, by YaRN's original context
        beta = float(m("attention.temperature_scale", 0.0))
        original = int(m("rope.scaling.original_context_length", m("context_length")))
        return dict(query_scaling=QueryScaling(beta, original)) if beta else {}
    if arch == "olmo2":  # OLMo 3's windows: their RoPE unscaled, at its own base where the file names one
        settings = dict(pre_norms=False, post_norms=True)
        if int(m("attention.sliding_window", 0)) > 0:
            settings.update(sliding_window=int(m("attention.sliding_window")),
                            window_layers=_window_layers(m, layers, WINDOW_EVERY),
                            local_rope_theta=float(m("rope.freq_base_swa", m("rope.freq_base", 10000.0))))
        return settings
    if arch == "exaone4":  # OLMo 2's norms; windows in the 64-layer model only
        settings = dict(pre_norms=False, post_norms=True)
        if layers == EXAONE4_WINDOWED["layers"]:
            settings.update(windows(int(m("attention.sliding_window", EXAONE4_WINDOWED["window"]))))
        return settings
    if arch == "smollm3":
        return dict(nope_layers=tuple(range(NOPE_EVERY - 1, layers, NOPE_EVERY)))
    if arch == "llama4":  # (MobileLLM-R1's files, attention.sliding_window 0, llama.cpp reads otherwise)
        if f"{arch}.attention.sliding_window" in reader.fields:
            raise ValueError(f"unsupported GGUF llama4 attention.sliding_window {m('attention.sliding_window')} "
                             f"(Llama 4's chunks are 8192 positions; its Hugging Face checkpoint loads)")
        nope = tuple(range(NOPE_EVERY - 1, layers, NOPE_EVERY))
        return dict(sliding_window=LLAMA4["chunk"], window_chunks=True, nope_layers=nope,
                    window_layers=tuple(i for i in range(layers) if i not in nope), query_scaling=LLAMA4["temperature"],
                    qk_norm=None if int(m("expert_count", 0)) == LLAMA4["no_qk_norm_experts"] else "unweighted")
    if arch in _COHERE:
        settings = dict(layer_norm=True, parallel_block=True, logits_scaling=1 / float(m("logit_scale")))
        return {**settings, **windows(int(m("attention.sliding_window")))} if arch == "cohere2" else settings
    if arch == "glm4":  # norms after attention and the MLP too
        return dict(post_norms=True)
    if arch in ("arcee", "nemotron"):  # ungated MLPs of squared ReLUs; Nemotron's LayerNorms have biases
        norms = dict(layer_norm=True, norm_bias=True) if arch == "nemotron" else {}
        return dict(hidden_act="relu2", gated_mlp=False, **norms)
    if arch == "stablelm":  # attention and the MLP side by side where a layer has no norm before the MLP
        return dict(layer_norm=True, norm_bias=True,
                    parallel_block="blk.0.ffn_norm.weight" not in tensors)
    if arch in ("phi2", "starcoder2"):  # ungated MLPs of GELUs (biases, as attention's, where the file has them)
        return dict(layer_norm=True, norm_bias=True, hidden_act="gelu_tanh", gated_mlp=False,
                    parallel_block=arch == "phi2")  # (Phi-2's MLP beside attention)
    if arch == "apertus":  # (its xIELU's parameters: `_xielu_values`)
        return dict(hidden_act="xielu", gated_mlp=False)
    if arch == "gpt-oss":  # llama.cpp's windows in every other layer, its SwiGLU's constants (our defaults)
        return dict(hidden_act="clamped_swiglu", attention_sinks=True, output_bias=True,
                    sliding_window=int(m("attention.sliding_window")), window_layers=_window_layers(m, layers, 2))
    if arch in GEMMA:
        settings = dict(hidden_act="gelu_tanh", embedding_multiplier=hidden ** 0.5)
        if GEMMA[arch]["full_every"] is None:  # Gemma 1's layers are Llama's but for these
            return settings
        cap = {key: float(m(key)) if f"{arch}.{key}" in reader.fields else None
               for key in ("attn_logit_softcapping", "final_logit_softcapping")}
        local = GEMMA[arch]["local_theta"] and float(m("rope.freq_base_swa", GEMMA[arch]["local_theta"]))
        return dict(settings, post_norms=True, sliding_window=int(m("attention.sliding_window")),
                    local_rope_theta=local, window_layers=_window_layers(m, layers, GEMMA[arch]["full_every"]),
                    attn_softcap=cap["attn_logit_softcapping"], final_softcap=cap["final_logit_softcapping"])
    return {}


class _WithValues:
    """A GGUF `Source` with numbers the file keeps in its metadata read as tensors: `values` maps their names
    (the name table's) to arrays."""

    def __init__(self, source, values: dict[str, np.ndarray]):
        self.source, self.values = source, values

    def names(self) -> list[str]:
        return self.source.names() + list(self.values)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.values[name].shape if name in self.values else self.source.shape(name)

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return self.values[name][index] if name in self.values else self.source.read(name, index)


def _xielu_values(reader: gguf.GGUFReader, layers: int) -> dict[str, np.ndarray]:
    """Apertus's xIELU parameters as llama.cpp's converter stores them (as the checkpoint has them, before
    their softplus), from the metadata arrays xielu.alpha_p, .alpha_n, .beta and .eps (one value per
    layer, or one for all), each layer's [1] by the name table's names."""
    values = {}
    for part in ("alpha_p", "alpha_n", "beta", "eps"):
        key = getattr(gguf.Keys.xIELU, part.upper())
        v = np.asarray(_field(reader, key), np.float32).reshape(-1)
        if len(v) not in (1, layers):
            raise ValueError(f"GGUF metadata {key} has {len(v)} values for {layers} layers")
        values.update({f"blk.{i}.xielu.{part}": v[i % len(v)][None] for i in range(layers)})
    return values


def _ends(reader: gguf.GGUFReader, tokens: list[str], eos: int) -> list[int]:
    """The ids llama.cpp ends generation at beside the EOS (`_END_TEXTS`)."""
    ids = {text: i for i, text in enumerate(tokens)}  # (a text twice: its last id, as llama.cpp maps it)
    keys = ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"]
    ends = [int(f.contents()) for f in map(reader.fields.get, keys) if f is not None]
    ends += [ids[text] for text in _END_TEXTS if text in ids]
    for kind, texts in _FIM_ENDS.items():
        f = reader.fields.get(f"tokenizer.ggml.{kind}_token_id")
        ends += [int(f.contents())] if f is not None else [ids[t] for t in texts if t in ids][:1]
    ends = [e for e in ends if 0 <= e < len(tokens)]  # (an id past the vocabulary: ignored, as llama.cpp does)
    texts = {tokens[e] for e in [eos, *ends] if 0 <= e < len(tokens)}
    if texts & {"<|call|>", "<|calls|>"} and texts & {"<|return|>", "<|flush|>"}:
        ends = [e for e in ends if tokens[e] != "<|end|>"]
    if texts & {"<|tool_response>", "<|plamo:eos|>"}:
        ends = [e for e in ends if tokens[e] != "</s>"]
    return ends


def _experts(reader: gguf.GGUFReader, arch: str, source: _GGUFTensors, layers: int) -> dict:
    """A mixture of experts' `ModelConfig` settings (none for a dense model), as llama.cpp reads them: the
    layers with a router, softmax gating, the shared expert's size from its tensors where no key gives it (Llama
    4's, Granite's, GLM-4.5's and dots.llm1's ungated); GPT-OSS's router and experts biased; GLM-4.5's, dots.llm1's
    and MiniMax-M2's routed as DeepSeek-V3's (`ModelConfig.routing` "sigmoid"), scaled by expert_weights_scale
    (llama.cpp has no default gating function for dots.llm1 and MiniMax-M2: a file must name it)."""
    m = _arch_field(reader, arch)
    count = int(m("expert_count", 0))
    if not count:
        return {}
    sigmoids, corrected = ("llama4", *_CORRECTED), arch in _CORRECTED  # (corrected: DeepSeek-V3's routing)
    defaults = {"gpt-oss": SOFTMAX_CHOSEN, **dict.fromkeys(("llama4", "glm4moe"), SIGMOID),
                **dict.fromkeys(("dots1", "minimax-m2"), NO_GATING)}  # (llama.cpp's, by architecture)
    gating = int(m("expert_gating_func", defaults.get(arch, SOFTMAX)))
    # (llama.cpp reads neither expert_weights_scale nor expert_weights_norm of MiniMax-M2, and renormalises it)
    minimax = arch == "minimax-m2"
    scale = 1.0 if minimax else float(m("expert_weights_scale", 1.0)) or 1.0  # (0: llama.cpp's none)
    if gating not in (SOFTMAX, SOFTMAX_CHOSEN, SIGMOID) or (gating == SIGMOID) != (arch in sigmoids) or \
            scale != 1.0 and not corrected:
        raise ValueError(f"unsupported GGUF expert gating function {gating} with weights scale {scale} for {arch} "
                         f"(supported: softmax ({SOFTMAX}) or softmax over the chosen experts ({SOFTMAX_CHOSEN}), "
                         f"unscaled; Llama 4's, GLM-4.5's, dots.llm1's and MiniMax-M2's sigmoids ({SIGMOID}))")
    # experts chosen in groups, as llama.cpp reads them for every model
    groups, kept = int(m("expert_group_count", 0)) or 1, int(m("expert_group_used_count", 0)) or 1
    if groups > 1 and not corrected:
        raise ValueError(f"unsupported GGUF expert_group_count {groups} for {arch} (experts chosen in groups: "
                         f"DeepSeek-V3's routing only: GLM-4.5's, dots.llm1's, MiniMax-M2's)")
    routed = dict(expert_groups=groups, expert_groups_kept=kept, routed_scaling=scale) if corrected else {}
    moe = tuple(i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" in source.tensors)
    shared = next((n for n in (f"blk.{i}.ffn_gate_shexp.weight" for i in moe) if n in source.tensors), None)
    return dict(num_experts=count, experts_per_token=int(m("expert_used_count")),
                expert_size=int(m("expert_feed_forward_length", m("feed_forward_length"))),
                moe_layers=None if len(moe) == layers else moe,
                norm_topk=gating == SOFTMAX_CHOSEN or minimax or bool(m("expert_weights_norm", arch in NORM_TOPK)),
                routing="sigmoid" if corrected else "sigmoid_input" if gating == SIGMOID else "softmax", **routed,
                shared_expert_gate=arch not in _UNGATED_SHARED,
                expert_bias=arch == "gpt-oss", expert_format="mxfp4" if source.kept else "dense",
                shared_expert_size=int(m("expert_shared_feed_forward_length", 0)) or (
                    source.shape(shared)[0] if shared else 0))


def gguf_tokenizer(reader: gguf.GGUFReader) -> Tokenizer:
    """The tokenizer a GGUF file's `tokenizer.*` metadata describes, with the BOS and the ids llama.cpp ends
    generation at (the EOS first) as llama.cpp reads them."""
    tokens = _field(reader, "tokenizer.ggml.tokens")
    eos = (int(_field(reader, "tokenizer.ggml.eos_token_id")),)
    eos += tuple(e for e in dict.fromkeys(_ends(reader, tokens, eos[0])) if e not in eos)
    bos = reader.fields.get("tokenizer.ggml.bos_token_id")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    bos = int(bos.contents()) if bos is not None and pre not in ("glm4", "glm5", "chatglm-bpe") else None  # llama.cpp's
    model = _field(reader, "tokenizer.ggml.model")
    spm = model == "llama"  # SentencePiece: llama.cpp's default is a space before the text
    add_bos = reader.fields.get("tokenizer.ggml.add_bos_token")  # (None: llama.cpp's default for the vocabulary)
    return Tokenizer.from_gguf_vocab(
        model=model, pre=pre,
        tokens=tokens, token_types=_field(reader, "tokenizer.ggml.token_type"),
        merges=None if spm else _field(reader, "tokenizer.ggml.merges"),
        chat_template=_field(reader, "tokenizer.chat_template", ""), bos_token_id=bos,
        eos_token_ids=eos, add_bos=None if add_bos is None else bool(add_bos.contents()),
        scores=_field(reader, "tokenizer.ggml.scores") if spm else None,
        unknown_token_id=int(_field(reader, "tokenizer.ggml.unknown_token_id", 0)),
        add_space_prefix=bool(_field(reader, "tokenizer.ggml.add_space_prefix", True)))


def open_gguf(path: str, dtype: str = "float32", mesh: Mesh | None = None,
              dequantize_experts: bool = False) -> OpenedModel:
    """A GGUF file's config and tokenizer, read from its metadata; `.load()` dequantises one tensor at a
    time straight onto its devices (its shards on `mesh`, if given), but MXFP4 experts, kept so unless
    `dequantize_experts`."""
    reader = _open(path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        hint = "; its Hugging Face checkpoint loads" if arch in HF_ONLY else ""
        raise ValueError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
                         f"{hint})")
    m = _arch_field(reader, arch)
    n_heads = int(m("attention.head_count"))
    n_kv = int(m("attention.head_count_kv", n_heads))
    source = _GGUFTensors(reader, path, n_heads, n_kv, frozenset() if dequantize_experts else _kept_mxfp4(reader))
    tensors = source.tensors
    scaling = _rope_scaling(reader, arch)
    if ROPE_FACTORS in tensors:  # Llama 3.1's scaling, as llama.cpp's converter stores it
        if scaling is not None:
            raise ValueError(f"GGUF file has both rope scaling type {scaling.kind!r} and per-frequency factors "
                             f"({ROPE_FACTORS})")
        factors = source.read(ROPE_FACTORS, (slice(None),))
        scaling = RopeScaling(kind="factors", factors=tuple(float(f) for f in factors))
    # (GLM-4.5's multi-token prediction layers follow the others, unused: llama.cpp generates without them)
    nextn = int(m("nextn_predict_layers", 0))
    hidden, layers = int(m("embedding_length")), int(m("block_count")) - nextn
    head_dim = int(m("attention.key_length", hidden // n_heads))
    rotary = int(m("rope.dimension_count", head_dim))  # (GLM-4's and Nemotron's: half of each head)
    swa_base = "rope.freq_base_swa"  # (read by OLMo 3's and Gemma 3's, whose windowed layers' RoPE is unscaled)
    if f"{arch}.{swa_base}" in reader.fields and arch not in ("olmo2", "gemma3") \
            and float(m(swa_base)) != float(m("rope.freq_base", 10000.0)):
        raise ValueError(f"unsupported GGUF {swa_base} {m(swa_base)} for {arch} (a RoPE base of the windowed layers' "
                         f"own)")
    for key in ("rope.dimension_count", "attention.value_length"):
        if int(m(key, head_dim)) != head_dim and not (key == "rope.dimension_count" and arch in _PARTIAL_ROPE):
            raise ValueError(f"unsupported GGUF {key} {m(key)}: the model needs it equal to the head size {head_dim} "
                             f"(RoPE on every dimension of a head, values as wide as keys)")
    # of each head ([head_dim]), each with its own weights (Command R+'s, StableLM's [heads, head_dim]), or of
    # all heads at once (OLMo's [heads x head_dim])
    qk_norm = None
    if "blk.0.attn_q_norm.weight" in tensors:
        qk_norm = {(head_dim,): "head", (n_heads, head_dim): "per_head"}.get(
            tuple(source.shape("blk.0.attn_q_norm.weight")), "all")
    tok = gguf_tokenizer(reader)
    eos = tok.eos_token_ids
    cfg = ModelConfig(
        vocab_size=int(m("vocab_size", len(reader.fields["tokenizer.ggml.tokens"].data))), hidden_size=hidden,
        intermediate_size=int(m("feed_forward_length")), num_layers=layers,
        num_heads=n_heads, num_kv_heads=n_kv,
        head_dim=head_dim,
        max_position_embeddings=int(m("context_length")), rope_theta=float(m("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rotary_dim=None if rotary == head_dim else rotary,
        rms_norm_eps=float(m(f"attention.layer_norm{'' if arch in _LAYER_NORMS else '_rms'}_epsilon")),
        tie_word_embeddings="output.weight" not in tensors, lm_head_bias="output.bias" in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors or "blk.0.attn_qkv.bias" in tensors,
        mlp_bias=any(f"blk.{i}.ffn_down.bias" in tensors for i in range(layers)),
        **{"qk_norm": qk_norm, "output_bias": "blk.0.attn_output.bias" in tensors,
           **_own_settings(reader, arch, hidden, layers, tensors)}, **_experts(reader, arch, source, layers),
        bos_token_id=tok.bos_token_id, eos_token_ids=eos,
        pad_token_id=int(_field(reader, "tokenizer.ggml.padding_token_id", eos[0])), dtype=dtype)

    if nextn:
        source = Hidden(source, tuple(f"blk.{i}." for i in range(layers, layers + nextn)))
    if arch == "apertus":
        source = _WithValues(source, _xielu_values(reader, layers))
    if arch in GEMMA:  # its converter wrote the norms' 1 + w
        query_scalar = hidden / n_heads if layers == GEMMA[arch]["layers_27b"] else head_dim
        source = Scaled(source, cfg, GGUF, gemma_adjustments(cfg, query_scalar, norm_shift=0))
    if arch in _MLP_NORM_AFTER_ATTENTION:
        source = Renamed(source, {f"blk.{i}.ffn_norm.weight": f"blk.{i}.post_attention_norm.weight"
                                  for i in range(layers)})
    if arch == "glm4":  # gate and up in one tensor, as Hugging Face stores them
        source = Unfused(source, fused_parts(cfg, GGUF, {"w_gate_up": "blk.{i}.ffn_up.weight"}))
    if arch == "granite_swa" and cfg.num_experts:  # (all its layers') gate and up in one tensor, where no gate's own
        fused = {ours: name for ours, name in (("experts_gate_up", "blk.{i}.ffn_gate_up_exps.weight"),
                                               ("shared_gate_up", "blk.{i}.ffn_up_shexp.weight"))
                 if name.format(i=0) in tensors and stored_names(cfg, ours, GGUF)[0].format(i=0) not in tensors}
        source = Unfused(source, fused_parts(cfg, GGUF, fused))
    if "blk.0.attn_qkv.weight" in tensors:  # Q, K and V in one tensor (Phi-2's older files), biases too
        source = Unfused(source, fused_parts(cfg, GGUF, {"wqkv": "blk.{i}.attn_qkv.weight",
                                                         **({"bqkv": "blk.{i}.attn_qkv.bias"}
                                                            if cfg.attention_bias else {})}))
    if arch in _ADJACENT_ROPE or cfg.rotary != head_dim:
        source = RopeOrdered(source, cfg, GGUF, interleaved=arch in _ADJACENT_ROPE)
    if arch in _GRANITES:  # an attention scale of 0 is llama.cpp's head_dim^-1/2
        source = Scaled(source, cfg, GGUF, granite_adjustments(cfg, float(m("residual_scale")),
                                                               float(m("attention.scale")) or head_dim ** -0.5))
    return OpenedModel(cfg, tok, GGUF, source, mesh)


def load_gguf(path: str, dtype: str = "float32", mesh: Mesh | None = None,
              dequantize_experts: bool = False) -> LoadedModel:
    return open_gguf(path, dtype, mesh, dequantize_experts).load()
