"""Frozen, hashable configurations (usable as static arguments of `jax.jit`)."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re

import numpy as np


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. kind: "linear", "llama3" (Llama 3.1 long-context scaling), "yarn" (YaRN,
    arXiv 2309.00071: frequencies that turn fewer than `beta_slow` times over the original context
    `original_max_position` divided by `factor`, those that turn more than `beta_fast` times kept, a
    linear ramp between; cos and sin times `attention_factor`, None: 0.1 ln(factor) + 1), "factors"
    (each frequency divided by its own factor: llama.cpp's `rope_freqs` tensor, [head_dim // 2], in
    which GGUF files store Llama 3.1's scaling) or "longrope" (Phi-3's LongRoPE: each frequency divided
    by its own factor, `factors` at positions before `original_max_position` and `long_factors` from
    there on; cos and sin times `attention_factor`, None: (1 + ln(factor) / ln(original_max_position))^1/2,
    where factor is how many times longer the context is than the original)."""

    KINDS = ("linear", "llama3", "yarn", "factors", "longrope")

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    factors: tuple[float, ...] = ()
    long_factors: tuple[float, ...] = ()
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True  # yarn: the ramp's ends rounded out to whole frequencies
    attention_factor: float | None = None

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"unsupported rope scaling type {self.kind!r} (supported: {', '.join(self.KINDS)})")
        if self.factor <= 0 or min(self.factors + self.long_factors, default=1) <= 0:
            raise ValueError(f"rope scaling factors must be positive, got factor {self.factor}"
                             + (f" and per-frequency factors {self.factors + self.long_factors}"
                                if self.factors else ""))
        if (self.kind in ("factors", "longrope")) != bool(self.factors):
            raise ValueError("rope scaling: per-frequency factors go with kinds 'factors' and 'longrope', and only "
                             "with them")
        if (self.kind == "longrope") != bool(self.long_factors) or len(self.long_factors) not in (0, len(self.factors)):
            raise ValueError(f"rope scaling: long factors go with kind 'longrope' only, as many as its short ones, got "
                             f"{len(self.long_factors)} long and {len(self.factors)} short with {self.kind!r}")
        if self.attention_factor is not None and (self.kind not in ("yarn", "longrope") or
                                                  not self.attention_factor > 0):
            raise ValueError(f"rope scaling: attention_factor must be positive and goes with kinds 'yarn' and "
                             f"'longrope' only, got {self.attention_factor} with {self.kind!r}")

    def cos_sin_scale(self) -> float:
        """What cos and sin are multiplied by (YaRN's and LongRoPE's attention factors; 1 for the other
        kinds)."""
        if self.kind not in ("yarn", "longrope"):
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.kind == "yarn":
            return yarn_mscale(self.factor)
        return 1.0 if self.factor <= 1 else math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_position))


@dataclasses.dataclass(frozen=True)
class QueryScaling:
    """Queries times 1 + beta ln(1 + floor((position + offset) / period)) before attention: a softmax
    temperature that grows with position (exactly 1 before the first period ends). Ministral 3's: offset
    0, its original context as the period, in every layer; Llama 4's "temperature tuning": offset 1, in
    its NoPE layers only (`nope_only`)."""

    beta: float
    period: int
    offset: int = 0
    nope_only: bool = False

    def __post_init__(self):
        if not (isinstance(self.beta, numbers.Real) and self.beta >= 0 and isinstance(self.period, int)
                and self.period > 0 and isinstance(self.offset, int) and self.offset >= 0):
            raise ValueError(f"query scaling needs beta >= 0, a positive period and an offset >= 0 in positions, got "
                             f"beta {self.beta}, period {self.period}, offset {self.offset}")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context `factor` times longer (1 where it is not longer)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder. What the families `loaders.hf.SUPPORTED_ARCHITECTURES` names add to Llama's
    layer (norm placement and kind, per-layer attention windows and RoPE, RoPE variants, soft caps,
    multipliers, dense or mixture-of-experts MLPs) are static fields of one layer loop."""

    # the MLP's activation: SiLU (gated: SwiGLU), tanh-approximated GELU (Gemma's GeGLU), squared ReLU
    # (Nemotron's, Arcee's), xIELU (Apertus's, ungated: per-layer learned parameters, `model.xielu`), or
    # GPT-OSS's clamped SwiGLU: min(gate, limit) sigmoid(alpha min(gate, limit)) (clip(up, -limit, limit) + 1),
    # `swiglu_alpha` and `_limit`
    ACTIVATIONS = ("silu", "gelu_tanh", "relu2", "xielu", "clamped_swiglu")

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rotary_dim: int | None = None  # the dimensions of a head RoPE rotates, None: all (Phi-4-mini's: 3/4)
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    query_scaling: QueryScaling | None = None  # None: queries unscaled
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections with bias (Qwen2)
    output_bias: bool = False  # the attention's output projection with bias (GPT-OSS)
    attention_sinks: bool = False  # a learned logit per query head joins its softmax, its share dropped (GPT-OSS)
    sliding_window: int | None = None  # keys further back than this are masked (Mistral's, every layer's)
    window_layers: tuple[int, ...] | None = None  # the layers with it, None: all (Qwen's, Gemma's: some)
    # those layers attend within aligned chunks of sliding_window positions (a query at p to keys from
    # floor(p / w) w on: Llama 4's chunked attention), not to the last sliding_window
    window_chunks: bool = False
    nope_layers: tuple[int, ...] = ()  # layers whose queries and keys are not rotated (SmolLM3's NoPE layers)
    # Norms of the queries and keys before RoPE (RMS norms, LayerNorms where layer_norm): "head" of each head
    # on its own, one weight for all (Qwen3, Gemma 3), "per_head" of each head on its own with weights of its
    # own (Command R+, StableLM 2 12B), "all" of all query heads together and all key heads together (OLMo
    # 2), "unweighted" of each head without weights, in the layers with RoPE only (Llama 4's; it norms them
    # after RoPE, which keeps their norms)
    qk_norm: str | None = None
    embedding_multiplier: float = 1.0  # token embeddings times this entering the first layer (Granite, Gemma)
    logits_scaling: float = 1.0  # logits divided by this (Granite; its other two multipliers: `loaders.Scaled`)
    lm_head_bias: bool = False  # the LM head adds a bias to the logits (Phi-2's)
    hidden_act: str = "silu"  # one of ACTIVATIONS
    gated_mlp: bool = True  # the MLP is act(gate) * up, then down; False: act(up), then down (Nemotron, Arcee)
    mlp_bias: bool = False  # the dense MLP's projections (gate and up, or up, and down) with biases
    swiglu_alpha: float = 1.702  # clamped_swiglu's
    swiglu_limit: float = 7.0
    pre_norms: bool = True  # each layer norms the residual stream before attention and before the MLP
    post_norms: bool = False  # and what they add to it (Gemma: both; OLMo 2: only these)
    layer_norm: bool = False  # those norms take out the mean too (a LayerNorm without bias: Cohere's)
    norm_bias: bool = False  # the norms before attention and the MLP and the final norm add a bias (Nemotron's)
    parallel_block: bool = False  # attention and the MLP read one norm and add to the stream together (Cohere's)
    local_rope_theta: float | None = None  # the windowed layers' own RoPE base, unscaled (Gemma 3, OLMo 3)
    # Gemma 2's soft caps: attention scores and logits x become cap tanh(x / cap)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # Mixture-of-experts MLPs: a router picks experts_per_token of num_experts experts (each a gated MLP of
    # expert_size hidden units) per token, by `routing` "softmax" their outputs weighted by their softmax
    # probabilities (renormalised over the chosen ones with norm_topk: Mixtral, Qwen3-MoE), "sigmoid_input"
    # their inputs by their logits' sigmoids (Llama 4's), "sigmoid" (DeepSeek-V3's: GLM-4.5's, dots.llm1's,
    # MiniMax-M2's) chosen by their logits' sigmoids plus a bias per expert (router_correction [E]) among
    # the experts of the expert_groups_kept best of expert_groups groups (a group's score: its two best),
    # their outputs weighted by the sigmoids (renormalised with norm_topk) times routed_scaling; in
    # moe_layers (None: all), the others dense of intermediate_size. shared_expert_size: an always-on
    # expert beside them, sigmoid-gated where shared_expert_gate (Qwen2-MoE's; Llama 4's is not);
    # expert_bias: the router and the experts' projections with biases (GPT-OSS); expert_format "mxfp4":
    # the experts' weights kept in MXFP4 as GPT-OSS is released (`mxfp4.py`), "dense": as `dtype`.
    num_experts: int = 0
    experts_per_token: int = 0
    expert_size: int = 0
    moe_layers: tuple[int, ...] | None = None
    routing: str = "softmax"
    norm_topk: bool = False
    expert_groups: int = 1
    expert_groups_kept: int = 1
    routed_scaling: float = 1.0
    shared_expert_size: int = 0
    shared_expert_gate: bool = True
    expert_bias: bool = False
    expert_format: str = "dense"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    dtype: str = "float32"  # parameter and activation dtype; softmax and norms run in float32

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model config: num_heads ({self.num_heads}) is not a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.rotary_dim is not None and not (2 <= self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(f"model config: rotary_dim must be even and in [2, head_dim = {self.head_dim}], got "
                             f"{self.rotary_dim}")
        if self.rope_scaling is not None and self.rope_scaling.factors and \
                len(self.rope_scaling.factors) != self.rotary // 2:
            raise ValueError(f"model config: {len(self.rope_scaling.factors)} RoPE frequency factors for "
                             f"{self.rotary} rotated dimensions of a head ({self.rotary // 2} frequencies)")
        if not all(isinstance(v, numbers.Real) and v > 0 for v in (self.embedding_multiplier, self.logits_scaling)):
            raise ValueError(f"model config: embedding_multiplier and logits_scaling must be positive, got "
                             f"{self.embedding_multiplier} and {self.logits_scaling}")
        if self.hidden_act not in self.ACTIVATIONS:
            raise ValueError(f"model config: unsupported hidden_act {self.hidden_act!r} (supported: "
                             f"{', '.join(self.ACTIVATIONS)})")
        if self.hidden_act == "clamped_swiglu" and not self.gated_mlp:
            raise ValueError("model config: clamped_swiglu is a gated MLP's (gated_mlp)")
        if self.hidden_act == "xielu" and self.gated_mlp:
            raise ValueError("model config: xielu is an ungated MLP's (gated_mlp False: Apertus's)")
        if not self.gated_mlp and self.num_experts:
            raise ValueError("model config: ungated MLPs (gated_mlp False) are dense, not mixtures of experts")
        if self.norm_bias and self.post_norms:  # (no checkpoint has such biases)
            raise ValueError("model config: norm_bias (biased norms) goes without post_norms")
        if self.query_scaling is not None and not isinstance(self.query_scaling, QueryScaling):
            raise ValueError(f"model config: query_scaling must be a QueryScaling, got {self.query_scaling!r}")
        if not all(isinstance(v, numbers.Real) and v > 0 for v in (self.swiglu_alpha, self.swiglu_limit)):
            raise ValueError(f"model config: swiglu_alpha and swiglu_limit must be positive, got {self.swiglu_alpha} "
                             f"and {self.swiglu_limit}")
        caps = (self.attn_softcap, self.final_softcap)
        if not all(c is None or (isinstance(c, numbers.Real) and c > 0) for c in caps):
            raise ValueError(f"model config: soft caps must be positive or None, got {self.attn_softcap} and "
                             f"{self.final_softcap}")
        if self.qk_norm not in (None, "head", "per_head", "all", "unweighted"):
            raise ValueError(f"model config: qk_norm must be None, 'head', 'per_head', 'all' or 'unweighted', got "
                             f"{self.qk_norm!r}")
        if not (self.pre_norms or self.post_norms):
            raise ValueError("model config: a layer needs pre_norms or post_norms (or both)")
        if self.parallel_block and (self.post_norms or not self.pre_norms):
            raise ValueError("model config: parallel_block needs pre_norms and no post_norms")
        if self.local_rope_theta is not None and self.sliding_window is None:
            raise ValueError("model config: local_rope_theta (the windowed layers' RoPE base) needs a sliding_window")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"model config: sliding_window must be positive, got {self.sliding_window}")
        if (self.window_layers is not None or self.window_chunks) and self.sliding_window is None:
            raise ValueError("model config: window_layers and window_chunks need a sliding_window")
        if self.num_experts:
            if not 1 <= self.experts_per_token <= self.num_experts or self.expert_size <= 0:
                raise ValueError(f"model config: a mixture of experts needs 1 <= experts_per_token <= num_experts and "
                                 f"a positive expert_size, got {self.experts_per_token} of {self.num_experts} "
                                 f"experts of size {self.expert_size}")
        elif (self.experts_per_token or self.expert_size or self.moe_layers is not None or self.shared_expert_size
              or self.expert_bias):
            raise ValueError("model config: experts_per_token, expert_size, moe_layers, shared_expert_size and "
                             "expert_bias need num_experts > 0")
        if self.routing not in ("softmax", "sigmoid_input", "sigmoid"):
            raise ValueError(f"model config: routing must be 'softmax', 'sigmoid_input' or 'sigmoid', got "
                             f"{self.routing!r}")
        if self.routing == "sigmoid_input" and self.norm_topk:
            raise ValueError("model config: norm_topk (renormalised weights) goes with softmax or sigmoid routing")
        groups, kept = self.expert_groups, self.expert_groups_kept
        if self.routing != "sigmoid" and (groups, kept, self.routed_scaling) != (1, 1, 1.0):
            raise ValueError("model config: expert_groups, expert_groups_kept and routed_scaling go with sigmoid "
                             "routing")
        if self.num_experts and not (groups >= 1 and self.num_experts % groups == 0 and 1 <= kept <= groups
                                     and (groups == 1 or self.num_experts // groups >= 2)
                                     and self.experts_per_token <= kept * self.num_experts // groups):
            raise ValueError(f"model config: {self.num_experts} experts in expert_groups {groups} (each of at least "
                             f"2 experts, scored by its best two) of which expert_groups_kept {kept} are kept must "
                             f"hold experts_per_token {self.experts_per_token}")
        if self.expert_format not in ("dense", "mxfp4"):
            raise ValueError(f"model config: expert_format must be 'dense' or 'mxfp4', got {self.expert_format!r}")
        if self.expert_format == "mxfp4" and not (self.num_experts and self.hidden_size % 32 == 0
                                                  and self.expert_size % 32 == 0):
            raise ValueError(f"model config: MXFP4 experts need num_experts > 0 and hidden_size and expert_size "
                             f"multiples of 32, got {self.num_experts} experts, {self.hidden_size} and "
                             f"{self.expert_size}")
        if self.shared_expert_size < 0:
            raise ValueError(f"model config: shared_expert_size must be >= 0, got {self.shared_expert_size}")
        for name in ("window_layers", "nope_layers", "moe_layers"):
            layers = getattr(self, name) or ()
            if list(layers) != sorted(set(layers)) or not all(0 <= i < self.num_layers for i in layers):
                raise ValueError(f"model config: {name} must be distinct layer indices in [0, {self.num_layers}) "
                                 f"in order, got {layers}")
        np.dtype(self.dtype)  # raises on an unknown dtype name

    def windowed(self, layer: int) -> bool:
        """Whether `layer` attends within the sliding window."""
        return self.sliding_window is not None and (self.window_layers is None or layer in self.window_layers)

    def moe(self, layer: int) -> bool:
        """Whether `layer`'s MLP is a mixture of experts."""
        return bool(self.num_experts) and (self.moe_layers is None or layer in self.moe_layers)

    @property
    def layer_kinds(self) -> tuple[tuple[bool, bool, bool], ...]:
        """What the model varies between layers, each layer's: (windowed, NoPE, mixture of experts)."""
        return tuple((self.windowed(i), i in self.nope_layers, self.moe(i)) for i in range(self.num_layers))

    @property
    def rotary(self) -> int:
        """The dimensions of a head RoPE rotates."""
        return self.rotary_dim or self.head_dim

    def rope_inv_freq(self, local: bool = False, long: bool = False) -> np.ndarray:
        """Inverse RoPE frequencies, [head_dim // 2] float32, with any scaling applied; local: the windowed
        layers' (`local_rope_theta`, unscaled); long: LongRoPE's from its original context on. With RoPE on
        part of a head, the frequencies past rotary_dim // 2 are 0: those pairs pass unrotated
        (`model.rotary_order`)."""
        theta, r = self.local_rope_theta if local else self.rope_theta, self.rotary
        inv = 1.0 / theta ** (np.arange(0, r, 2, dtype=np.float64) / r)
        s = None if local else self.rope_scaling
        if s is not None and s.kind == "linear":
            inv = inv / s.factor
        elif s is not None and s.kind in ("factors", "longrope"):
            inv = inv / np.asarray(s.long_factors if long else s.factors, np.float64)
        elif s is not None and s.kind == "yarn":
            inv = _yarn_inv_freq(inv, r, self.rope_theta, s)
        elif s is not None and s.kind == "llama3":
            # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth blend between.
            wavelen = 2 * math.pi / inv
            low_wavelen = s.original_max_position / s.low_freq_factor
            high_wavelen = s.original_max_position / s.high_freq_factor
            smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor)
            blended = (1 - smooth) * inv / s.factor + smooth * inv
            inv = np.where(wavelen > low_wavelen, inv / s.factor,
                           np.where(wavelen < high_wavelen, inv, blended))
        return np.pad(inv, (0, (self.head_dim - r) // 2)).astype(np.float32)

    def rope_cos_sin_scale(self) -> float | np.ndarray:
        """What cos and sin are multiplied by (`RopeScaling.cos_sin_scale`): with RoPE on part of a head, on
        the rotated frequencies only, an array [head_dim // 2] (the other pairs pass as they are)."""
        scale = 1.0 if self.rope_scaling is None else self.rope_scaling.cos_sin_scale()
        if scale == 1.0 or self.rotary == self.head_dim:
            return scale
        return np.where(np.arange(self.head_dim // 2) < self.rotary // 2, scale, 1.0).astype(np.float32)

    def long_rope_from(self) -> int | None:
        """The first position LongRoPE rotates by its long factors (None without LongRoPE)."""
        s = self.rope_scaling
        return s.original_max_position if s is not None and s.kind == "longrope" else None

    @property
    def context_length(self) -> int:
        """The most positions a sequence may take: max_position_embeddings, or YaRN's original context times
        its factor where that is more (Qwen's configs keep the unscaled length when YaRN is added; vLLM
        reads them so too)."""
        s = self.rope_scaling
        if s is None or s.kind != "yarn":
            return self.max_position_embeddings
        return max(self.max_position_embeddings, int(s.factor * s.original_max_position))


def _yarn_inv_freq(inv: np.ndarray, head_dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    """YaRN: frequency i keeps its value where it turns more than beta_fast times over the original context,
    is divided by `factor` where fewer than beta_slow times, and blends linearly in between."""
    def dim_turning(turns):  # the (fractional) frequency index that turns `turns` times over the context
        return head_dim * math.log(s.original_max_position / (turns * 2 * math.pi)) / (2 * math.log(theta))
    low, high = dim_turning(s.beta_fast), dim_turning(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    interpolated = np.clip((np.arange(head_dim // 2) - low) / (high - low or 1e-3), 0, 1)
    return inv / s.factor * interpolated + inv * (1 - interpolated)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 (or top_k 1) is greedy; top_k 0, top_p 1 and min_p 0 switch those filters off. They
    apply in transformers' order: temperature, top-k, top-p, then min-p (tokens less likely than min_p
    times the likeliest one go)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    MIN_TEMPERATURE = 1e-6  # below this, logits / temperature overflows float32

    def __post_init__(self):
        if not (self.temperature == 0 or self.temperature >= self.MIN_TEMPERATURE):
            raise ValueError(f"temperature must be 0 (greedy) or at least {self.MIN_TEMPERATURE} (smaller ones "
                             f"overflow float32 logits), got {self.temperature}")
        if not isinstance(self.top_k, numbers.Integral) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclasses.dataclass(frozen=True)
class DrafterConfig:
    hidden_size: int  # the target's H (context and embedding width)
    vocab_size: int  # the target's vocabulary
    num_resblocks: int = 2
    rnn: bool = True
    exit_dim: int | None = None  # None: 2H, no projection (Apple's recipe)
    share_lm_head: bool = False  # use the target's LM head (needs exit_dim == H)
    draft_vocab_size: int | None = None  # None: the full target vocabulary
    dtype: str = "float32"
    apple_warp: bool = False  # beam search over Apple's warped logits (drafters imported from Apple's format)

    def __post_init__(self):
        if self.num_resblocks < 0:
            raise ValueError(f"drafter: num_resblocks must be >= 0, got {self.num_resblocks}")
        if self.share_lm_head and self.exit_dim != self.hidden_size:
            raise ValueError(f"drafter: sharing the target's LM head needs exit_dim == hidden_size "
                             f"({self.hidden_size}), got {self.exit_dim}")
        if self.share_lm_head and self.draft_vocab_size is not None:
            raise ValueError("drafter: a reduced draft vocabulary needs its own LM head (share_lm_head=False)")
        if self.draft_vocab_size is not None and not 1 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"drafter: draft_vocab_size must be in [1, {self.vocab_size}], "
                             f"got {self.draft_vocab_size}")

    @property
    def exit(self) -> int:
        return self.exit_dim or 2 * self.hidden_size

    @property
    def head_vocab(self) -> int:
        return self.draft_vocab_size or self.vocab_size

    def check_target(self, cfg: ModelConfig) -> None:
        """Raises if this drafter was not built for a target of cfg's shape."""
        if self.hidden_size != cfg.hidden_size:
            raise ValueError(f"drafter hidden size {self.hidden_size} does not match the target's {cfg.hidden_size}")
        if self.vocab_size != cfg.vocab_size:
            raise ValueError(f"drafter vocabulary {self.vocab_size} does not match the target's {cfg.vocab_size}")


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding shape: W beams of L tokens (the init token included) from the recurrent
    drafter plus K context-lookup beams of `lookup_length` tokens (None: L; `lookup.py`: the tokens
    that followed the most recent earlier occurrences of the history's last
    `lookup_min_ngram`..`lookup_max_ngram` tokens) plus D datastore beams of `datastore_length`
    tokens (`datastore.py`: what most often followed the history's last n-grams in the target's own
    replies), packed into a tree of `tree_budget` slots (None: the worst case 1 + W(L-1) +
    K(lookup_length-1) + D(datastore_length-1), every node; with fewer, the best-scored nodes at any
    depth, `tree.py`), its slots padded to a multiple of `slot_multiple` (`slots`: some GPU kernels run
    an odd token count, e.g. 8 x 5's 33, slower than a larger round one; padding slots attend only to
    themselves and are never accepted). beam_width 0 is decoding without a drafter. A lookup or
    datastore beam costs no drafting, only tree slots, so it may be longer than the drafter's (e.g.
    "2x4+1x8": the drafter's later tokens are rarely right, a repeated passage often is for many tokens).

    acceptance (used when sampling): "tree_walk" keeps the target's distribution exactly;
    "apple_biased" is Apple's min(1, p/q) rule, which does not, offered only to measure the bias.
    """

    beam_width: int = 4
    beam_length: int = 4
    tree_budget: int | None = None
    acceptance: str = "tree_walk"
    lookup_beams: int = 0
    lookup_min_ngram: int = 1
    lookup_max_ngram: int = 3
    lookup_length: int | None = None
    datastore_beams: int = 0
    datastore_length: int = 8
    slot_multiple: int = 1

    def __post_init__(self):
        optional = ("lookup_length",) if self.lookup_length is not None else ()
        for name in ("beam_width", "beam_length", "lookup_beams", "lookup_min_ngram", "lookup_max_ngram",
                     "datastore_beams", "datastore_length", "slot_multiple") + optional:
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if min(self.beam_width, self.lookup_beams, self.datastore_beams) < 0 or self.num_beams < 1:
            raise ValueError(f"need beam_width >= 0, lookup_beams >= 0 and datastore_beams >= 0 with at least one "
                             f"beam in all, got beam_width={self.beam_width}, lookup_beams={self.lookup_beams}, "
                             f"datastore_beams={self.datastore_beams}")
        if self.slot_multiple < 1:
            raise ValueError(f"slot_multiple must be >= 1, got {self.slot_multiple}")
        if self.datastore_length < 2:
            raise ValueError(f"datastore_length must be >= 2 (the init token plus at least one retrieved token), "
                             f"got {self.datastore_length}")
        if self.beam_length < 2:
            raise ValueError(f"beam_length must be >= 2 (the init token plus at least one drafted token), "
                             f"got {self.beam_length}")
        if self.lookup_length is not None and (self.lookup_length < 2 or not self.lookup_beams):
            raise ValueError(f"lookup_length must be >= 2 (the init token plus at least one looked-up token) and "
                             f"needs lookup_beams > 0, got {self.lookup_length} with {self.lookup_beams} lookup beams")
        if self.acceptance not in ("tree_walk", "apple_biased"):
            raise ValueError(f"acceptance must be 'tree_walk' or 'apple_biased', got {self.acceptance!r}")
        if self.acceptance == "apple_biased" and (self.lookup_beams or self.datastore_beams):
            raise ValueError("Apple's acceptance rule needs the drafter's probability of every drafted token; "
                             "lookup beams have none, nor do datastore beams (use acceptance='tree_walk', which is "
                             "exact)")
        if not 1 <= self.lookup_min_ngram <= self.lookup_max_ngram:
            raise ValueError(f"lookup n-gram lengths must satisfy 1 <= lookup_min_ngram <= lookup_max_ngram, got "
                             f"{self.lookup_min_ngram}, {self.lookup_max_ngram}")
        if self.tree_budget is not None and not 2 <= self.tree_budget <= self.max_nodes:
            raise ValueError(f"tree_budget must be in [2, 1 + W(L-1) + K(lookup_length-1) + D(datastore_length-1)] = "
                             f"[2, {self.max_nodes}] "
                             f"(the init token and at least one drafted token, at most every node), got "
                             f"{self.tree_budget}")

    def check_proposers(self, drafter: bool, store) -> None:
        """Raises unless every beam has its proposer and no proposer goes unused: drafter beams need a
        drafter (`drafter`: whether one is given), datastore beams a datastore (`store`, or None) whose
        continuations are long enough."""
        if self.beam_width and not drafter:
            raise ValueError(f"beam_width {self.beam_width} needs a drafter; for lookup-only decoding use "
                             f"beam_width=0 with lookup_beams > 0")
        if drafter and not self.beam_width:
            raise ValueError("a drafter was given with beam_width 0, which would not use it")
        if bool(self.datastore_beams) != (store is not None):
            raise ValueError("datastore beams need a datastore (datastore.load(path)), and a datastore needs a spec "
                             f"with datastore_beams > 0; got datastore_beams={self.datastore_beams} and "
                             f"{'a' if store is not None else 'no'} datastore")
        if store is not None:
            store.check(self.datastore_length)

    @property
    def num_beams(self) -> int:
        return self.beam_width + self.lookup_beams + self.datastore_beams

    @property
    def lookup_len(self) -> int:
        """Tokens in a lookup beam: lookup_length, or L when that is None."""
        return self.lookup_length or self.beam_length

    @property
    def depth(self) -> int:
        """Tokens in the longest beam (the init token included): the tree's depth + 1."""
        return max(self.beam_length if self.beam_width else 0, self.lookup_len if self.lookup_beams else 0,
                   self.datastore_length if self.datastore_beams else 0)

    @property
    def max_nodes(self) -> int:
        return (1 + self.beam_width * (self.beam_length - 1) + self.lookup_beams * (self.lookup_len - 1)
                + self.datastore_beams * (self.datastore_length - 1))

    @property
    def budget(self) -> int:
        """Tree nodes kept each step."""
        return self.tree_budget or self.max_nodes

    @property
    def slots(self) -> int:
        """Tokens in one verification forward: the budget rounded up to a multiple of slot_multiple."""
        return -(-self.budget // self.slot_multiple) * self.slot_multiple

    def describe_slots(self) -> str:
        """The tree's size for a report: "7", or "7 in 8" when its 7 nodes are padded to 8 slots."""
        return f"{self.budget}" + (f" in {self.slots}" if self.slots > self.budget else "")

    def describe(self) -> str:
        """Short label, the inverse of `parse`: "WxL", "+K" with lookup beams ("+KxL'" when they are
        L' long), "+DxL''ds" with datastore beams, ":N" with a tree budget, "/M" with a slot multiple."""
        label = f"{self.beam_width}x{self.beam_length}"
        if self.lookup_beams:
            label += f"+{self.lookup_beams}" + (f"x{self.lookup_length}" if self.lookup_length else "")
        if self.datastore_beams:
            label += f"+{self.datastore_beams}x{self.datastore_length}ds"
        label += f":{self.tree_budget}" if self.tree_budget else ""
        return label + (f"/{self.slot_multiple}" if self.slot_multiple > 1 else "")

    @classmethod
    def default(cls, batch_size: int = 1, **kwargs) -> "SpecConfig":
        """The tree that measured best on MT-Bench on a CPU for batches of `batch_size` rows (per device):
        4 x 3 + 1 x 8 (the drafter's four beams of 3 tokens, of every depth, and a lookup beam of 8),
        its best-scored nodes in 7 slots at batch 1, 6 at 2 and 4 at 3 (12 tree tokens, which fit one
        pass of the CPU kernel's 12 rows; at batch 2, 7 and 4 slots ran 3-8% slower in float32 and
        bfloat16), then 16-21 tree tokens per step across the batch (4 slots at 4 and 5, 3 at 6 and 7),
        2 slots from 8 on: a CPU forward's cost grows slowly up to about 16-24 tokens in all, then with
        them, so a larger batch affords fewer slots a row (docs/benchmarks.md, "MT-Bench in batches").
        kwargs set the other fields (e.g. the lookup n-gram lengths)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        slots = {1: 7, 2: 6, 3: 4, 4: 4, 5: 4, 6: 3, 7: 3}.get(batch_size, 2)
        return cls.parse(f"4x3+1x8:{slots}", **kwargs)

    @classmethod
    def parse(cls, text: str, **kwargs) -> "SpecConfig":
        """"WxL", "WxL+K", "WxL+KxL'" (lookup beams of L' tokens), then optionally "+DxL''ds" (datastore
        beams of L'' tokens), any with ":budget" (e.g. "1x5+2:9", "2x4+1x8:11", "4x3+1x8+1x8ds:9") and then
        "/M", the slots padded to a multiple of M (e.g. "8x5/16": 33 nodes in 48 slots); kwargs set the
        other fields."""
        m = re.fullmatch(r"(\d+)x(\d+)(?:\+(\d+)(?:x(\d+))?)?(?:\+(\d+)x(\d+)ds)?(?::(\d+))?(?:/(\d+))?",
                         text.strip())
        if m is None:
            raise ValueError(f"bad speculative setting {text!r}: expected WxL, WxL+K, WxL+KxL', any followed by "
                             f"+DxL''ds, any with :budget, then /M, e.g. 4x4, 1x5+2, 2x4+1x8, 0x5+4:12, "
                             f"4x3+1x8+1x8ds:9, 8x5/16")
        w, length, k, lookup_length, d, datastore_length, budget, multiple = m.groups()
        more = dict(datastore_beams=int(d), datastore_length=int(datastore_length)) if d else {}
        if multiple:
            more["slot_multiple"] = int(multiple)
        return cls(int(w), int(length), int(budget) if budget else None, lookup_beams=int(k or 0),
                   lookup_length=int(lookup_length) if lookup_length else None, **more, **kwargs)
