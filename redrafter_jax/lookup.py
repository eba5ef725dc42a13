"""Context-lookup beams: drafts copied from the row's own token history (prompt + generated so far).

Small models repeat themselves and copy from their prompts; the recurrent drafter, which sees only
the target's last hidden state, cannot copy. Each step, the longest suffix of the history (between
`min_ngram` and `max_ngram` tokens, ending at the init token) is looked up in the earlier history;
each occurrence, ranked by match length then recency, proposes the tokens that followed it. Where the
continuation runs into the suffix itself, it repeats with the match's period (the history up to the
end is x[..end]; an occurrence ending at e continues x[e+1], ..., x[end], x[e+1], ...), which is what
the history says if its last (end - e) tokens loop.

Everything is static-shaped: a fixed-size history per row and a vectorised match over all its
positions, so lookup runs inside the decode loop with no host round trip. Lookup beams are a `Draft`
whose prefix scores come from how often looked-up tokens were right (`MATCH_ACCEPTANCE`), so the
tree packing weighs them against the drafter's log-probs node by node; they are -inf where a row
has no match (such nodes never enter the tree).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from redrafter_jax.beam_search import Draft
from redrafter_jax.tree import ABSENT

# P(looked-up token d is right | tokens 1..d-1 were) for matches of n = 1, 2, 3+ tokens (rows) at
# d = 1..7 (columns; deeper tokens take the last): SmolLM2-135M-Instruct's greedy replies to the 341
# held-out ShareGPT prompts (92,769 reply tokens). The longer the match, the likelier the copy; a
# one-token match is right less often than the drafter's first token (about 0.5).
MATCH_ACCEPTANCE = np.array([[0.224, 0.601, 0.697, 0.733, 0.759, 0.827, 0.857],
                             [0.564, 0.684, 0.744, 0.773, 0.838, 0.862, 0.887],
                             [0.901, 0.931, 0.948, 0.958, 0.966, 0.970, 0.973]])


def match_scores(n: jax.Array, length: int) -> jax.Array:
    """Prefix log-probs [..., length] of a beam copied after an n-token match (n [...] >= 1)."""
    table = np.log(MATCH_ACCEPTANCE)[:, np.minimum(np.arange(length - 1), MATCH_ACCEPTANCE.shape[1] - 1)]
    prefix = jnp.asarray(np.concatenate([np.zeros((len(table), 1)), np.cumsum(table, axis=1)], axis=1), jnp.float32)
    return prefix[jnp.clip(n, 1, len(table)) - 1]


def history(prompts: jax.Array, prompt_lengths: jax.Array, generated: jax.Array) -> jax.Array:
    """Each row's prompt followed by its generated tokens: [B, P] + [B, M] -> [B, P + M].

    prompts are right-padded to P; row b's generated tokens start at prompt_lengths[b].
    """
    b, p = prompts.shape
    i = jnp.arange(p + generated.shape[1])[None, :]
    gen_idx = jnp.clip(i - prompt_lengths[:, None], 0, generated.shape[1] - 1)
    from_gen = jnp.take_along_axis(generated, gen_idx, axis=1)
    from_prompt = jnp.pad(prompts, ((0, 0), (0, generated.shape[1])))
    return jnp.where(i < prompt_lengths[:, None], from_prompt, from_gen)


def _match_lengths(hist: jax.Array, end: jax.Array, max_ngram: int) -> jax.Array:
    """[B, T]: how many tokens (up to max_ngram) ending at position e equal those ending at `end`."""
    t = hist.shape[1]
    e = jnp.arange(t)[None, :]
    run = jnp.ones(hist.shape, bool)
    total = jnp.zeros(hist.shape, jnp.int32)
    for k in range(max_ngram):
        ref = jnp.take_along_axis(hist, jnp.maximum(end - k, 0)[:, None], axis=1)  # [B, 1]
        earlier = jnp.take_along_axis(hist, jnp.maximum(e - k, 0), axis=1)
        run = run & (e - k >= 0) & (end[:, None] - k >= 0) & (earlier == ref)
        total = total + run
    return total


def lookup_draft(hist: jax.Array, end: jax.Array, num_beams: int, length: int, min_ngram: int,
                 max_ngram: int) -> Draft:
    """Up to `num_beams` beams of `length` tokens from the history.

    hist: [B, T] token history; end: [B] index of its newest token (the init token, beams[:, :, 0]).
    Candidates are earlier positions e < end whose last n tokens equal the history's last n, for
    the largest n in [min_ngram, max_ngram] that position allows; they rank by n, then by recency.
    Candidates whose continuations equal a better one's are skipped, so the beams differ. Beam k's
    scores are `match_scores` of its match length, or -inf past the init token when there are fewer
    than k + 1 distinct matches.
    """
    b, t = hist.shape
    e = jnp.arange(t)[None, :]
    n = _match_lengths(hist, end, max_ngram)
    found = (e < end[:, None]) & (n >= min_ngram)
    rank = jnp.where(found, n * t + e, -1)  # longest first, then most recent
    pool = min(t, 4 * num_beams)  # candidates examined for distinct continuations
    key, pos = jax.lax.top_k(rank, pool)  # [B, pool]
    period = jnp.maximum(end[:, None] - pos, 1)[:, :, None]
    j = jnp.arange(length - 1)[None, None, :]
    cont_idx = pos[:, :, None] + 1 + j % period  # [B, pool, L-1]
    cont = jnp.take_along_axis(hist, cont_idx.reshape(b, -1), axis=1).reshape(cont_idx.shape)
    return first_distinct(hist, end, cont, key >= 0, match_scores(key // t, length), num_beams)


def first_distinct(hist: jax.Array, end: jax.Array, cont: jax.Array, ok: jax.Array, scores: jax.Array,
                   num_beams: int) -> Draft:
    """The first `num_beams` candidates, in rank order, whose continuations differ from every earlier
    valid one's, as beams after the init token (shared by the lookup and datastore proposers).

    hist [B, T], end [B]: the history and its newest token's index; cont [B, P, L-1]: candidate
    continuations, best first; ok [B, P]: which exist; scores [B, P, L]: each candidate's prefix
    log-probs (0 at the init token). Beams past the distinct candidates are scored -inf after the init token.
    """
    b, p = ok.shape
    if num_beams > p:  # fewer candidates than beams: the rest propose nothing
        cont, ok, scores = (jnp.pad(x, [(0, 0), (0, num_beams - p)] + [(0, 0)] * (x.ndim - 2))
                            for x in (cont, ok, scores))
        p = num_beams
    same = jnp.all(cont[:, :, None] == cont[:, None, :], axis=-1)  # [B, P, P]
    earlier_ok = ok[:, None, :] & jnp.tril(jnp.ones((p, p), bool), -1)[None]
    distinct = ok & ~jnp.any(same & earlier_ok, axis=-1)
    order = jnp.argsort(~distinct, axis=1, stable=True)[:, :num_beams]
    cont = jnp.take_along_axis(cont, order[:, :, None], axis=1)
    valid = jnp.take_along_axis(distinct, order, axis=1)
    scores = jnp.take_along_axis(scores, order[:, :, None], axis=1)
    init = jnp.take_along_axis(hist, end[:, None], axis=1)
    beams = jnp.concatenate([jnp.broadcast_to(init[:, :, None], (b, num_beams, 1)), cont], axis=-1)
    scores = jnp.where(valid[:, :, None] | (jnp.arange(beams.shape[-1]) == 0), scores, -jnp.inf)
    return Draft(beams.astype(jnp.int32), scores.astype(jnp.float32))


def combine(drafts: list[Draft]) -> Draft:
    """One beam set from several proposers' beams: [B, sum W, max L], in the order given.

    Shorter beams end in `tree.ABSENT` tokens (scored -inf). The tree packing ranks nodes by score,
    so the proposers' beams need no merging order.
    """
    if len(drafts) == 1:
        return drafts[0]
    if any(d.log_probs is not None for d in drafts):
        raise ValueError("draft log-probs cannot be combined across proposers")
    length = max(d.beams.shape[-1] for d in drafts)
    pad = lambda x, fill: jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[-1])), constant_values=fill)  # noqa: E731
    return Draft(jnp.concatenate([pad(d.beams, ABSENT) for d in drafts], axis=1),
                 jnp.concatenate([pad(d.scores.astype(jnp.float32), -jnp.inf) for d in drafts], axis=1))
