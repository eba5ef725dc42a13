"""Expert weights kept in MXFP4, as GPT-OSS is released, and dequantized where they are multiplied.

MXFP4 (OCP microscaling) stores each run of 32 consecutive inputs of an output as 4-bit E2M1 codes (two a
byte, the low nibble first) and one power-of-two scale (a byte, biased by 127): 4.25 bits a weight, a
quarter of bfloat16's. Kept so, gpt-oss-120b's experts fit one 80 GB GPU and gpt-oss-20b's a 16 GB one;
a decode step dequantizes only the experts its tokens chose (`model.experts_mlp` gathers them first), a
prefill all of them for the layer it is in; on the CPU the rows kernel decodes them as they stream
(`rows_matmul.pack_mxfp4`). Every value is exact in bfloat16 and float32, so the products
are those of the weights dequantized at load.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

GROUP = 32  # inputs sharing a scale
# the experts' weights (`model.param_shapes`): `Mxfp4.order` from their stored [E, 2, F, H] and [E, H, F]
EXPERTS_ORDER = {"experts_gate_up": (2, 0, 1), "experts_down": (1, 0)}
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)  # by code


@struct.dataclass
class Mxfp4:
    """A weight of our layout [E, *ours] stored as blocks [E, *out, G, 16] uint8 and scales [E, *out, G]
    uint8 (G = inputs / 32), its input axis last; `order`: the permutation of the dequantized trailing axes
    [*out, inputs] into ours (e.g. (2, 0, 1): [2, F, H] -> [H, 2, F]). Indexing gathers experts."""

    blocks: jax.Array
    scales: jax.Array
    order: tuple[int, ...] = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """The dequantized weight's shape, in our layout."""
        n = len(self.order)
        trailing = (*self.scales.shape[-n:-1], self.scales.shape[-1] * GROUP)
        return (*self.scales.shape[:-n], *(trailing[i] for i in self.order))

    def __getitem__(self, index) -> "Mxfp4":
        return Mxfp4(self.blocks[index], self.scales[index], self.order)

    def dequantize(self, dtype) -> jax.Array:
        """The weight in our layout, as `dtype`, exactly: every MXFP4 value is a bfloat16 one (but those below
        float32's normal range, 2^-126, which XLA flushes to zero; real weights are far from it)."""
        codes = jnp.stack([self.blocks & 15, self.blocks >> 4], axis=-1).reshape(*self.blocks.shape[:-1], -1)
        x = jnp.ldexp(jnp.asarray(E2M1)[codes], self.scales.astype(jnp.int32)[..., None] - 127)
        x = x.reshape(*x.shape[:-2], -1).astype(dtype)
        lead = x.ndim - len(self.order)
        return x.transpose(*range(lead), *(lead + i for i in self.order))


def dense(w, dtype) -> jax.Array:
    """w as an array of `dtype`'s values: an `Mxfp4` dequantized, an array as it is."""
    return w.dequantize(dtype) if isinstance(w, Mxfp4) else w
