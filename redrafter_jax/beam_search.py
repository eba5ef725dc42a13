"""Beam search with static beam width W and beam length L (the init token included), generic over
the proposal model: it only needs a logits function of the model state and a state update."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from redrafter_jax.tree import ABSENT

if TYPE_CHECKING:
    from redrafter_jax.config import ModelConfig, SpecConfig

# Start score of beams 1..W-1: finite (no inf - inf = nan), yet below any sum of L log-probs.
DEAD_SCORE = -1e9


class Draft(NamedTuple):
    # [B, W', L] int32 target ids, beams[:, :, 0] = init token, best beam first; `ABSENT` after a
    # shorter beam's end
    beams: jax.Array
    # [B, W', L] float32 log-prob that each beam's prefix beams[:, :, :d+1] is right (for the drafter, the
    # sum of its log-probs of the drafted tokens; 0 at the init token; -inf where nothing is proposed)
    scores: jax.Array
    # Only when asked for (Apple's acceptance rule): [B, W, L-1, V] the drafter's log-probs over the
    # target vocabulary at each drafted position of each beam.
    log_probs: jax.Array | None = None


@runtime_checkable
class Proposer(Protocol):
    """What the speculative loop needs from a drafter (the recurrent `Drafter`, `OracleDrafter`): a
    check that it fits the target and beam shape, and beams of L tokens per row: W of them, or more
    (e.g. shorter prefixes as well) with at most W(L-1) distinct drafted nodes in all, the tree's
    room for them (`SpecConfig.max_nodes`). Implementations are pytrees, as they are arguments of the
    jitted decode function."""

    def check(self, target: ModelConfig, spec: SpecConfig) -> None:
        """Raises ValueError if it cannot propose for this target at this beam shape."""

    def draft(self, target_params: dict, context: jax.Array, init_token: jax.Array, lengths: jax.Array,
              width: int, length: int, with_log_probs: bool = False) -> Draft:
        """context [B, H]: the target's hidden state that produced init_token [B]; lengths [B]: the
        rows' cache lengths (init_token's position). Returns beams of L tokens, init token first."""


def top_w_of_beams(cand: jax.Array, w: int):
    """Exact top-w over the flattened (beam, token) axes of cand [..., W, V], without a top-k over W*V.

    A pair in the overall top w is in its own beam's top w, so top w per beam, then top w of the
    W*w survivors, is exact. Returns (values [..., w], beam [..., w], token [..., w]), best first.
    """
    per_val, per_tok = jax.lax.top_k(cand, w)  # [..., W, w]
    flat_val = per_val.reshape(*per_val.shape[:-2], -1)
    val, flat = jax.lax.top_k(flat_val, w)
    tok = jnp.take_along_axis(per_tok.reshape(flat_val.shape), flat, axis=-1)
    return val, flat // w, tok


def beam_search(logits_fn: Callable[[jax.Array], jax.Array], next_state: Callable[[jax.Array, jax.Array], jax.Array],
                state: jax.Array, width: int, length: int, with_log_probs: bool = False,
                dead_score: float = DEAD_SCORE, every_depth: bool = False):
    """Beam search from one start state per row.

    state: [B, S], the model state after the init token. logits_fn: [B, W, S] -> [B, W, V] logits;
    next_state: (state [B, W, S], tokens [B, W]) -> [B, W, S]. The first step spreads beam 0's best
    W tokens over the W beams (the others start at dead_score). Scores are sums of log-probs in
    float32, or float64 for a float64 state.
    Returns tokens [B, W, L-1] (ids of the proposal vocabulary), best first; scores [B, W, L-1], each
    final beam's prefix scores after each drafted token; and with with_log_probs the log-probs
    [B, W, L-1, V] each final beam's tokens were drawn from (else None). With every_depth, the W beams
    kept after each earlier step follow the final ones (deepest first): [B, (L-1) W, L-1], the beams
    of d < L-1 tokens ending in `ABSENT` tokens scored -inf. They are the W best d-token prefixes,
    which the final beams' prefixes need not include (a tree can use them: at most W(L-1) distinct
    nodes either way).
    """
    b = state.shape[0]
    dtype = jnp.promote_types(state.dtype, jnp.float32)
    state = jnp.broadcast_to(state[:, None], (b, width) + state.shape[1:])
    scores = jnp.full((b, width), dead_score, dtype).at[:, 0].set(0.0)

    def step(carry, _):
        state, scores = carry
        logp = jax.nn.log_softmax(logits_fn(state).astype(dtype), axis=-1)
        scores, parent, tok = top_w_of_beams(scores[..., None] + logp, width)
        state = next_state(jnp.take_along_axis(state, parent[..., None], axis=1), tok)
        return (state, scores), (parent, tok, scores, logp if with_log_probs else None)

    _, (parents, toks, step_scores, logps) = jax.lax.scan(step, (state, scores), None, length=length - 1)

    # Backtrack every returned beam at once: ends[e] is the step the beams of group e end at; idx [B, E, W]
    # is the index, after step t, of the beam that beam j of group e descends from, itself from src =
    # parents[t][idx], whose distribution at step t was logps[t][src].
    ends = jnp.arange(length - 2, -1, -1) if every_depth else jnp.asarray([length - 2])

    def gather(x, idx):
        return jnp.take_along_axis(x[:, None], idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=2)

    def back(idx, xs):
        t, parent, tok, score, logp = xs
        live = (ends >= t)[None, :, None]  # groups with a token at step t
        src = gather(parent, idx)
        lp = None if logp is None else gather(logp, src)
        out = jnp.where(live, gather(tok, idx), ABSENT), jnp.where(live, gather(score, idx), -jnp.inf), lp
        return jnp.where(live, src, idx), out

    start = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (b, len(ends), width))
    _, (path, path_scores, path_logp) = jax.lax.scan(
        back, start, (jnp.arange(length - 1), parents, toks, step_scores, logps), reverse=True)  # [L-1, B, E, W, ...]
    flat = lambda x: jnp.moveaxis(x, 0, 3).reshape((b, -1, length - 1) + x.shape[4:])  # noqa: E731 [B, E W, L-1, ...]
    return flat(path).astype(jnp.int32), flat(path_scores), None if path_logp is None else flat(path_logp)
