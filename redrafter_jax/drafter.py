"""The recurrent drafter: an RNN over target token embeddings, conditioned on the target's last hidden
state, then ResBlocks and an LM head (ReDrafter, arXiv 2403.09919).

    s_0 = 0;  s_t = SiLU(E(x_{t-1}) W + s_{t-1} U + b)     (RNN off: s_t = s_{t-1} + E(x_{t-1}))
    x = [c ; s_t]  (2H) -> optional projection to exit_dim -> ResBlock^n: x + SiLU(x A + a) -> LM head

E is the target's (frozen) embedding. The LM head is the drafter's own, or the target's (then
exit_dim must be H). With a reduced draft vocabulary the head scores only `draft_vocab_size` tokens,
and params["vocab_map"] [Vd] maps draft ids back to target ids. With `apple_warp`, beam search warps
the logits as Apple's code does (`apple_logits`), so a drafter imported from Apple's format
(`redrafter_jax.apple`) proposes exactly Apple's beams.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from redrafter_jax import rows_matmul
from redrafter_jax.beam_search import DEAD_SCORE, Draft, beam_search
from redrafter_jax.config import DrafterConfig, ModelConfig, SpecConfig
from redrafter_jax.model import Params, is_shape, linear, lm_head, random_keys, random_values
from redrafter_jax.tree import ABSENT

APPLE_TOP_K = 50
APPLE_FILL = -5e4  # Apple's warped-away logits, and its dead beams' start score


def apple_logits(logits: jax.Array) -> jax.Array:
    """Apple's beam-search warp: logits minus their row max, every logit below the 50th largest set to
    -5e4 (ties at the 50th kept)."""
    logits = logits - jnp.max(logits, axis=-1, keepdims=True)
    kth = jax.lax.top_k(logits, min(APPLE_TOP_K, logits.shape[-1]))[0][..., -1:]
    return jnp.where(logits >= kth, logits, APPLE_FILL)


def param_shapes(dcfg: DrafterConfig) -> dict:
    h, e = dcfg.hidden_size, dcfg.exit
    shapes: dict = {"resblocks": [{"w": (e, e), "b": (e,)} for _ in range(dcfg.num_resblocks)]}
    if dcfg.rnn:
        shapes.update(rnn_w=(h, h), rnn_u=(h, h), rnn_b=(h,))
    if dcfg.exit_dim is not None and dcfg.exit_dim != 2 * h:
        shapes.update(proj_w=(2 * h, e), proj_b=(e,))
    if not dcfg.share_lm_head:
        shapes["lm_head"] = (e, dcfg.head_vocab)
    return shapes


def init_drafter(dcfg: DrafterConfig, key: jax.Array, vocab_map: jax.Array | None = None) -> Params:
    """Random drafter params: LeCun-normal matrices, zero biases (ResBlocks start near identity).

    vocab_map [draft_vocab_size] (target ids) is required with a reduced draft vocabulary.
    """
    shapes = param_shapes(dcfg)
    leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=is_shape)
    keys = random_keys(key, len(leaves))

    def lecun(key, shape):
        std = jnp.sqrt(shape[0])
        return random_values(lambda k, s: (jax.random.normal(k, s) / std).astype(dcfg.dtype), key, shape)

    out = [lecun(k, s) if len(s) == 2 else jnp.zeros(s, dcfg.dtype) for k, s in zip(keys, leaves)]
    params = jax.tree_util.tree_unflatten(treedef, out)
    if dcfg.draft_vocab_size is not None:
        if vocab_map is None or vocab_map.shape != (dcfg.draft_vocab_size,):
            raise ValueError(f"a reduced draft vocabulary needs vocab_map of shape ({dcfg.draft_vocab_size},)")
        params["vocab_map"] = jnp.asarray(vocab_map, jnp.int32)
    return params


def rnn_step(dparams: Params, dcfg: DrafterConfig, state: jax.Array, emb: jax.Array) -> jax.Array:
    """state, emb: [..., H] -> next state [..., H]."""
    if not dcfg.rnn:
        return state + emb
    return jax.nn.silu(linear(emb, dparams["rnn_w"]) + linear(state, dparams["rnn_u"]) + dparams["rnn_b"])


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout (training only): each element zeroed with probability `rate`, the rest scaled
    by 1 / (1 - rate); x itself when rate is 0."""
    if rate == 0:
        return x
    keep = jax.random.bernoulli(key, 1 - rate, x.shape)
    return jnp.where(keep, x / (1 - rate), 0).astype(x.dtype)


def draft_logits(dparams: Params, dcfg: DrafterConfig, target_params: Params, context: jax.Array,
                 state: jax.Array, dropout_rate: float = 0.0, key: jax.Array | None = None) -> jax.Array:
    """context, state: [..., H] -> logits [..., head_vocab] (draft-vocabulary ids), float32 (float64
    for float64 params). Training may drop out the ResBlocks' input and each ResBlock's branch
    (dropout_rate, key)."""
    n = 1 + len(dparams["resblocks"])
    keys = jax.random.split(key, n) if dropout_rate else [None] * n
    x = jnp.concatenate([jnp.broadcast_to(context, state.shape), state], axis=-1)
    if "proj_w" in dparams:
        x = linear(x, dparams["proj_w"]) + dparams["proj_b"]
    x = dropout(x, dropout_rate, keys[0])
    for rb, k in zip(dparams["resblocks"], keys[1:]):
        x = x + dropout(jax.nn.silu(linear(x, rb["w"]) + rb["b"]), dropout_rate, k)
    if dcfg.share_lm_head:
        return lm_head(target_params, x)
    if isinstance(dparams["lm_head"], rows_matmul.Packed):
        return linear(x, dparams["lm_head"])
    return jnp.matmul(x, dparams["lm_head"], preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))


def to_target_ids(dparams: Params, draft_ids: jax.Array) -> jax.Array:
    return dparams["vocab_map"][draft_ids] if "vocab_map" in dparams else draft_ids


@struct.dataclass
class Drafter:
    """A trained (or random) recurrent drafter: a `Proposer` for `generate(..., drafter=...)`."""

    params: Params
    config: DrafterConfig = struct.field(pytree_node=False)

    def check(self, target: ModelConfig, spec: SpecConfig) -> None:
        self.config.check_target(target)
        if spec.beam_width > self.config.head_vocab:
            raise ValueError(f"beam_width {spec.beam_width} exceeds the drafter's vocabulary "
                             f"({self.config.head_vocab})")

    def draft(self, target_params: Params, context: jax.Array, init_token: jax.Array, lengths: jax.Array,
              width: int, length: int, with_log_probs: bool = False) -> Draft:
        """Beams of L tokens from context [B, H] (the target hidden state that produced init_token [B]):
        the W final beams of beam search, then the W best prefixes of each shorter length, which
        the tree's node budget may prefer (`beam_search`'s every_depth): [B, (L-1) W, L]. For Apple's
        rule (with_log_probs), only the W final beams, the tree Apple's rule was made for. lengths
        (the rows' cache lengths) is unused: the drafter sees only the context."""
        del lengths
        p, c, embed = self.params, self.config, target_params["embed"]
        state = rnn_step(p, c, jnp.zeros_like(context), embed[init_token])
        ctx = context[:, None, :]
        warp = apple_logits if c.apple_warp else (lambda x: x)
        drafted, scores, logp = beam_search(
            lambda s: warp(draft_logits(p, c, target_params, ctx, s)),
            lambda s, tok: rnn_step(p, c, s, embed[to_target_ids(p, tok)]),
            state, width, length, with_log_probs, APPLE_FILL if c.apple_warp else DEAD_SCORE,
            every_depth=not with_log_probs)
        b, n = drafted.shape[:2]
        beams = jnp.concatenate([jnp.broadcast_to(init_token[:, None, None], (b, n, 1)),
                                 jnp.where(drafted == ABSENT, ABSENT, to_target_ids(p, drafted))], axis=-1)
        if logp is not None and "vocab_map" in p:  # draft ids -> target ids; the rest has probability 0
            logp = jnp.full(logp.shape[:-1] + (c.vocab_size,), -jnp.inf, logp.dtype).at[..., p["vocab_map"]].set(logp)
        scores = jnp.concatenate([jnp.zeros((b, n, 1), scores.dtype), scores], axis=-1)
        return Draft(beams, scores, logp)


def untrained_drafter(cfg: ModelConfig) -> Drafter:
    """A random drafter of the shipped one's shape (drafters/smollm2-135m: exit H, its own head over a
    draft vocabulary of 4096 tokens, here spread evenly over cfg's vocabulary) for cfg's target: output
    stays exact and next to nothing is accepted, so a step costs what a step of the real drafter does."""
    vd = min(4096, cfg.vocab_size)
    dcfg = DrafterConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, exit_dim=cfg.hidden_size,
                         draft_vocab_size=vd)
    vocab_map = jnp.arange(vd) * (cfg.vocab_size // vd)
    return Drafter(init_drafter(dcfg, jax.random.PRNGKey(0), vocab_map), dcfg)
