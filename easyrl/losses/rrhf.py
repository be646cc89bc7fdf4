"""RRHF: rank N scored responses per prompt by length-normalized log-likelihood, plus SFT on the
best-scored one (docs/algorithms.md, "RRHF")."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from easyrl.losses.common import compute_dtype

# the per-prompt metrics of `rrhf_sums` a trainer reports (sums / number of prompts)
RRHF_METRICS = ("loss/rank", "loss/sft", "rank_pairs", "rank_acc", "logps/best", "logps/worst")


def rrhf_sums(logp_sums, lengths, scores, valid, nll_sums, *, length_penalty=1.0, rank_weight=1.0):
    """RRHF loss terms and metrics of N candidate responses per prompt (all inputs [B, N]), each
    a per-prompt quantity SUMMED over the B prompts (divide by a prompt count to average).

    p_i = logp_sums_i / lengths_i ** length_penalty with the true response lengths (clipped to
    >= 1). Ordered pairs (i, j): both valid and score_i < score_j (ties give no pair). The best
    (worst) response is the valid one with the highest (lowest) score, the first one on ties. A
    row with no valid response contributes 0 to every sum. Returns a dict of scalars:
      loss/rank    sum over pairs of relu(p_i - p_j)
      loss/sft     nll_sums / lengths of the best response
      loss         rank_weight * loss/rank + loss/sft
      rank_pairs   number of ordered pairs
      rank_right   number of ordered pairs with p_i < p_j (ranked right already)
      rank_acc     per prompt rank_right / max(rank_pairs, 1)
      logps/best   logp_sums / lengths (mean per-token log-prob) of the best response
      logps/worst  the same of the worst response
    """
    dt = compute_dtype(logp_sums)
    lengths = jnp.maximum(jnp.asarray(lengths, dt), 1)
    valid = jnp.asarray(valid, bool)
    scores = jnp.asarray(scores, dt)
    p = jnp.where(valid, logp_sums.astype(dt) / lengths ** length_penalty, 0)
    pair = valid[:, :, None] & valid[:, None, :] & (scores[:, :, None] < scores[:, None, :])
    diff = p[:, :, None] - p[:, None, :]  # [B, N, N]: p_i - p_j
    rank = jnp.sum(jnp.where(pair, jax.nn.relu(diff), 0))
    has = jnp.any(valid, axis=-1)
    best = jnp.argmax(jnp.where(valid, scores, -jnp.inf), axis=-1)
    worst = jnp.argmin(jnp.where(valid, scores, jnp.inf), axis=-1)

    def per_token(sums, pick):  # sums / lengths of the picked response, 0 for an empty row
        x = jnp.take_along_axis(sums.astype(dt) / lengths, pick[:, None], axis=-1)[:, 0]
        return jnp.sum(jnp.where(has, x, 0))

    sft = per_token(nll_sums, best)
    n_pairs = jnp.sum(pair, axis=(1, 2)).astype(dt)  # [B]
    right = jnp.sum(pair & (diff < 0), axis=(1, 2)).astype(dt)  # [B]
    return {
        "loss": rank_weight * rank + sft,
        "loss/rank": rank,
        "loss/sft": sft,
        "rank_pairs": jnp.sum(n_pairs),
        "rank_right": jnp.sum(right),
        "rank_acc": jnp.sum(right / jnp.maximum(n_pairs, 1)),
        "logps/best": per_token(logp_sums, best),
        "logps/worst": per_token(logp_sums, worst),
    }


def rrhf_loss(logp_sums, lengths, scores, valid, nll_sums, *, length_penalty=1.0, rank_weight=1.0):
    """RRHF loss for N candidate responses per prompt (all inputs [B, N]), from `rrhf_sums`.

    L = rank_weight * rank + sft with rank = loss/rank / B and sft = loss/sft / B (averages over
    the B prompts). Metrics: loss/rank, loss/sft (those averages), rank_pairs (ordered pairs in
    the batch, a total) and rank_acc (fraction of ALL the batch's pairs with p_i < p_j, pooled
    over prompts; trainers report the per-prompt average `rrhf_sums()["rank_acc"] / B` instead).
    """
    s = rrhf_sums(logp_sums, lengths, scores, valid, nll_sums, length_penalty=length_penalty,
                  rank_weight=rank_weight)
    b = logp_sums.shape[0]
    rank, sft = s["loss/rank"] / b, s["loss/sft"] / b
    metrics = {
        "loss/rank": rank,
        "loss/sft": sft,
        "rank_pairs": s["rank_pairs"],
        "rank_acc": s["rank_right"] / jnp.maximum(s["rank_pairs"], 1),
    }
    return rank_weight * rank + sft, metrics
