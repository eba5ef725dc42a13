"""Frozen, hashable configurations (usable as static arguments of `jax.jit`)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. kind: "linear" or "llama3" (Llama 3.1 long-context scaling)."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.kind not in ("linear", "llama3"):
            raise ValueError(f"unsupported rope scaling type {self.kind!r} (supported: linear, llama3)")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections with bias (Qwen2)
    sliding_window: int | None = None  # Mistral: keys further back than this are masked
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
        np.dtype(self.dtype)  # raises on an unknown dtype name

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse RoPE frequencies, [head_dim // 2] float32, with any scaling applied."""
        inv = 1.0 / self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        s = self.rope_scaling
        if s is not None and s.kind == "linear":
            inv = inv / s.factor
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
        return inv.astype(np.float32)
