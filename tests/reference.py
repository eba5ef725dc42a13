"""Independent float64 NumPy forward of a llama GGUF, for checking the JAX model.

Written from the GGUF tensors as llama.cpp stores them: Q/K rows stay in llama.cpp's permuted order
and RoPE is applied the way llama.cpp does for that order (adjacent pairs 2i, 2i+1), so it shares no
code and no layout conversion with redrafter_jax's loader.
"""

import gguf
import numpy as np


class GGUFReference:
    def __init__(self, path):
        r = gguf.GGUFReader(path)
        f = lambda k: r.fields[k].contents()  # noqa: E731
        self.n_layers = f("llama.block_count")
        self.n_heads = f("llama.attention.head_count")
        self.n_kv = f("llama.attention.head_count_kv")
        self.base = f("llama.rope.freq_base")
        self.eps = f("llama.attention.layer_norm_rms_epsilon")
        self.w = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64) for t in r.tensors}

    def _norm(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def _rope_adjacent_pairs(self, x, pos):  # x: [T, heads, D]
        d = x.shape[-1]
        theta = pos[:, None] * self.base ** (-np.arange(0, d, 2) / d)  # [T, D/2]
        cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out

    def logits(self, tokens):
        """[T] token ids -> [T, V] float64 logits, plain causal attention, no cache."""
        w, t = self.w, len(tokens)
        x = w["token_embd.weight"][np.asarray(tokens)]
        pos = np.arange(t, dtype=np.float64)
        causal = np.tril(np.ones((t, t), bool))
        for i in range(self.n_layers):
            g = lambda n: w[f"blk.{i}.{n}.weight"]  # noqa: E731
            h = self._norm(x, g("attn_norm"))
            q = (h @ g("attn_q").T).reshape(t, self.n_heads, -1)
            k = (h @ g("attn_k").T).reshape(t, self.n_kv, -1)
            v = (h @ g("attn_v").T).reshape(t, self.n_kv, -1)
            q, k = self._rope_adjacent_pairs(q, pos), self._rope_adjacent_pairs(k, pos)
            rep = self.n_heads // self.n_kv
            k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
            s = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1])
            s = np.where(causal, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            x = x + np.einsum("hts,shd->thd", p, v).reshape(t, -1) @ g("attn_output").T
            h = self._norm(x, g("ffn_norm"))
            gate = h @ g("ffn_gate").T
            x = x + ((gate / (1 + np.exp(-gate))) * (h @ g("ffn_up").T)) @ g("ffn_down").T
        x = self._norm(x, w["output_norm.weight"])
        return x @ w.get("output.weight", w["token_embd.weight"]).T
