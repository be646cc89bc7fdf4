"""Group methods (GRPO and its variants, RLOO, REINFORCE++): group-relative advantages,
REINFORCE++ token returns, the k3 KL term, the token / sequence (GSPO) clipped policy loss,
the GRPO-family aggregations and DAPO's soft overlong penalty (docs/algorithms.md,
"Group methods").

Shapes: ``G = num_generations`` samples per prompt; sequence rewards are ``[N]`` with
``N = B * G`` and rows ``b*G .. b*G+G-1`` one prompt's group (or ``[B, G]``); per-token arrays
are ``[N, T]`` with a response mask ``[N, T]``. Every function is pure and jit-compatible
(``num_generations``, ``kind``, ``level``, ``loss_type`` and the like are static).
"""
from __future__ import annotations

import jax.numpy as jnp

from easyrl.losses.common import as_mask, masked_sum
from easyrl.losses.ppo import kl_penalty, ppo_rewards

ADVANTAGE_KINDS = ("grpo", "rloo")
SCALE_REWARDS = ("group", "batch", "none")
IS_LEVELS = ("token", "sequence")
GROUP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "rloo")
# loss types that sum per-token terms (length-weighted): GSPO's sequence ratio warns with them
LENGTH_WEIGHTED = ("bnpo", "dr_grpo", "dapo")


def _grouped(rewards, num_generations):
    """rewards [B*G] or [B, G] -> float [B, G] (consecutive rows form a group)."""
    r = jnp.asarray(rewards)
    r = r.astype(jnp.promote_types(r.dtype, jnp.float32))
    g = int(num_generations)
    if r.ndim == 2:
        if r.shape[1] != g:
            raise ValueError(f"rewards [B, G] has G={r.shape[1]}, num_generations={g}")
        return r
    if r.ndim != 1 or g < 1 or r.shape[0] % g:
        raise ValueError(f"rewards of shape {r.shape} do not split into groups of {g}")
    return r.reshape(-1, g)


def _nan_stats(r, axis=None):
    """(valid mask, count, mean, unbiased std) of ``r`` ignoring NaN entries, as TRL's
    ``torch.nanmean`` / ``trl.trainer.utils.nanstd`` (std NaN where fewer than 2 values)."""
    valid = ~jnp.isnan(r)
    keep = axis is not None
    n = jnp.sum(valid, axis=axis, keepdims=keep).astype(r.dtype)
    r0 = jnp.where(valid, r, 0)
    mean = jnp.sum(r0, axis=axis, keepdims=keep) / n
    sq = jnp.where(valid, jnp.square(r - mean), 0)
    std = jnp.where(n > 1, jnp.sqrt(jnp.sum(sq, axis=axis, keepdims=keep) / jnp.maximum(n - 1, 1)),
                    jnp.nan)
    return valid, n, mean, std


def group_advantages(rewards, num_generations, kind="grpo", scale_rewards="group", eps=1e-4):
    """Sequence advantages [N] from sequence rewards [N] (or [B, G]).

    ``grpo``: A_i = (r_i - mean_group(r)) / (std + eps) with ``scale_rewards``
      ``group``: std of the prompt's group; ``batch``: std of all N rewards (the group mean is
      still subtracted); ``none``: no division (Dr. GRPO). The std is the unbiased one (ddof=1,
      ``torch.std``) as TRL ``GRPOTrainer``; with a single element it is 0.
    ``rloo``: A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean_group(r)) (needs G >= 2;
      ``scale_rewards`` and ``eps`` are ignored).

    NaN rewards (a row every reward function returned None for: "unscorable", TRL) are left out
    of their group's mean and std (``nanmean`` / ``nanstd``), of the batch std and of the
    leave-one-out baselines (which average the group's other scorable rows), and get advantage
    0, as TRL's GRPOTrainer (grpo_trainer.py ``unscorable_mask``, ~l.2679-2728) and RLOOTrainer
    (rloo_trainer.py ~l.1512-1560). A group with a single scorable row gives it advantage 0
    (TRL: nanstd / the (count - 1) divisor of one value is NaN, zeroed). Without NaN the values
    are the formulas above.
    """
    if kind not in ADVANTAGE_KINDS:
        raise ValueError(f"unknown advantage kind {kind!r}; valid: {', '.join(ADVANTAGE_KINDS)}")
    r = _grouped(rewards, num_generations)
    g = r.shape[1]
    valid, n, mean, std = _nan_stats(r, axis=1)
    if kind == "rloo":
        if g < 2:
            raise ValueError("rloo needs num_generations >= 2")
        total = jnp.sum(jnp.where(valid, r, 0), axis=1, keepdims=True)
        adv = r - (total - r) / (n - 1)
    else:
        if scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"unknown scale_rewards {scale_rewards!r}; valid: "
                             f"{', '.join(SCALE_REWARDS)}")
        adv = r - mean
        if scale_rewards == "group":
            adv = adv / ((std if g > 1 else jnp.zeros_like(std)) + eps)
        elif scale_rewards == "batch":
            bstd = _nan_stats(r)[3] if r.size > 1 else jnp.zeros((), r.dtype)
            adv = adv / (bstd + eps)
    return jnp.where(valid & jnp.isfinite(adv), adv, 0).reshape(-1)


def reverse_cumsum(x, mask):
    """R_t = sum_{s >= t} m_s x_s along the last axis (gamma = 1), 0 where mask is 0."""
    ok = as_mask(mask, x) != 0
    xs = jnp.where(ok, x, 0)
    out = jnp.flip(jnp.cumsum(jnp.flip(xs, -1), axis=-1), -1)
    return jnp.where(ok, out, 0)


def reinforce_pp_returns(scores, logp, ref_logp, mask, beta, baseline=False, num_generations=1):
    """REINFORCE++ (Hu 2025; OpenRLHF ``advantage_estimator`` ``reinforce`` /
    ``reinforce_baseline``) token advantages from scores [N] and log-probs [N, T].

    Per-token reward r_t = -beta * (logp_t - ref_t) (k1), plus the score at the last valid token;
    with ``baseline`` the score first has its group mean subtracted (groups of
    ``num_generations`` consecutive rows; no std division). Returns R_t = sum_{s >= t} r_s
    (gamma 1); the advantages are R whitened over all valid tokens of the batch given:
    (R - mean) * rsqrt(max(var, 1e-8)), var the biased (population) variance, as OpenRLHF.
    Returns (advantages [N, T], returns [N, T]), both 0 where mask is 0. Whitening uses the
    statistics of the rows passed: pass the whole rollout batch.
    """
    s = jnp.asarray(scores, logp.dtype).reshape(-1)
    if baseline:
        g = _grouped(s, num_generations)
        s = (g - jnp.mean(g, axis=1, keepdims=True)).reshape(-1).astype(logp.dtype)
    rewards, _ = ppo_rewards(s, logp, ref_logp, mask, kl_coef=beta, kl_kind="k1")
    returns = reverse_cumsum(rewards, mask)
    m = as_mask(mask, returns)
    n = jnp.maximum(jnp.sum(m), 1)
    mean = masked_sum(returns, m) / n
    var = masked_sum((returns - mean) ** 2, m) / n
    adv = (returns - mean) * jnp.reciprocal(jnp.sqrt(jnp.maximum(var, 1e-8)))
    return jnp.where(m != 0, adv, 0), returns


def k3_kl(logp, ref_logp, mask):
    """Per-token k3 KL estimate exp(ref - logp) - (ref - logp) - 1 [N, T], 0 where mask is 0."""
    ok = as_mask(mask, logp) != 0
    kl = kl_penalty(jnp.where(ok, logp, 0), jnp.where(ok, ref_logp, 0), "k3")
    return jnp.where(ok, kl, 0)


def clipped_policy_loss(logp, old_logp, advantages, mask, eps_low=0.2, eps_high=0.2,
                        level="token", ref_logp=None, beta=0.0):
    """Per-token clipped surrogate of the GRPO family: ``-min(rho A, clip(rho, 1-eps_low,
    1+eps_high) A)`` [N, T] (0 where mask is 0), plus ``beta * k3_kl(logp, ref_logp)`` when
    ``ref_logp`` is given and ``beta != 0`` (TRL ``GRPOTrainer``).

    ``advantages``: [N] (one per sequence, broadcast over its tokens) or [N, T].
    ``level="token"``: rho_t = exp(logp_t - old_t). ``level="sequence"`` (GSPO, Zheng et al.
    2025): rho = exp(mean over the sequence's valid tokens of (logp - old)), shared by its
    tokens (gradient flows through the mean, as TRL ``importance_sampling_level="sequence"``).

    Returns (per_token_loss [N, T], clip) with ``clip`` bool [N, T] indicators, False where
    mask is 0: ``low`` = rho < 1 - eps_low and A < 0, ``high`` = rho > 1 + eps_high and A > 0,
    ``region`` = low or high (TRL's definitions; see ``clip_metrics``).
    """
    if level not in IS_LEVELS:
        raise ValueError(f"unknown importance-sampling level {level!r}; valid: "
                         f"{', '.join(IS_LEVELS)}")
    m = as_mask(mask, logp)
    ok = m != 0
    d = jnp.where(ok, logp - old_logp, 0)
    if level == "sequence":
        count = jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1)
        d = jnp.broadcast_to(jnp.sum(d * m, axis=-1, keepdims=True) / count, d.shape)
    rho = jnp.exp(d)
    a = jnp.asarray(advantages, logp.dtype)
    if a.ndim == 1:
        a = a[:, None]
    a = jnp.broadcast_to(a, rho.shape)
    loss = -jnp.minimum(rho * a, jnp.clip(rho, 1.0 - eps_low, 1.0 + eps_high) * a)
    if ref_logp is not None and beta != 0:
        loss = loss + beta * k3_kl(logp, ref_logp, mask)
    low = (rho < 1.0 - eps_low) & (a < 0) & ok
    high = (rho > 1.0 + eps_high) & (a > 0) & ok
    clip = {"low": low, "high": high, "region": low | high}
    return jnp.where(ok, loss, 0), clip


def grpo_token_loss(logp, old_logp, advantages, mask, eps_low=0.2, eps_high=0.2, level="token",
                    ref_logp=None, beta=0.0, is_weight=None):
    """The GRPO trainer's per-token loss [N, T] as TRL's GRPOTrainer composes it
    (grpo_trainer.py ``_compute_loss``, ~l.3083-3121): the clipped policy term
    (``clipped_policy_loss``), times the importance-sampling weight ``is_weight`` (``is_weights``;
    None: 1), THEN ``+ beta * k3(logp, ref_logp)``: the weight multiplies the policy term only,
    never the KL term. Returns (per_token_loss, clip)."""
    loss, clip = clipped_policy_loss(logp, old_logp, advantages, mask, eps_low, eps_high, level)
    if is_weight is not None:
        loss = loss * is_weight
    if ref_logp is not None and beta != 0:
        loss = loss + beta * k3_kl(logp, ref_logp, mask)
    return loss, clip


def rloo_sequence_loss(logp, old_logp, advantages, mask, eps_low=0.2, eps_high=0.2):
    """TRL's RLOOTrainer loss per sequence (trl/trainer/rloo_trainer.py ``_compute_loss``,
    ~l.1683-1694): one ratio per sequence rho = exp(sum_t m_t (logp_t - old_t)) (the summed
    log-prob ratio, no length normalisation), ``-min(rho A, clip(rho, 1-eps_low, 1+eps_high) A)``
    with A [N] the sequence advantage. The trainer's loss is the plain mean over sequences, so a
    sequence's gradient is not divided by its length.

    Returns (per_sequence_loss [N], clip) with ``clip`` bool [N] indicators (TRL's low / high /
    region at sequence level)."""
    m = as_mask(mask, logp)
    d = jnp.sum(jnp.where(m != 0, logp - old_logp, 0) * m, axis=-1)
    rho = jnp.exp(d)
    a = jnp.asarray(advantages, logp.dtype).reshape(-1)
    loss = -jnp.minimum(rho * a, jnp.clip(rho, 1.0 - eps_low, 1.0 + eps_high) * a)
    low = (rho < 1.0 - eps_low) & (a < 0)
    high = (rho > 1.0 + eps_high) & (a > 0)
    return loss, {"low": low, "high": high, "region": low | high}


def clip_metrics(clip, mask):
    """``clip_ratio/{low,high,region}_mean``: the token means of ``clipped_policy_loss``'s
    indicators over the valid tokens given (TRL's ``masked_batch_mean`` at token level)."""
    m = as_mask(mask, jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1)
    return {f"clip_ratio/{k}_mean": masked_sum(clip[k].astype(jnp.float32), m) / n
            for k in ("low", "high", "region")}


def aggregate(per_token, mask, loss_type, max_completion_length=None, global_tokens=None,
              global_sequences=None):
    """Scalar loss from per-token losses [N, T] (TRL ``GRPOTrainer`` ``loss_type``):

    ``grpo``: mean over the N sequences of each sequence's token mean (an empty sequence
      contributes 0 and still counts);
    ``bnpo``: token mean over the valid tokens passed;
    ``dr_grpo``: token sum / (num_sequences * max_completion_length) (Dr. GRPO);
    ``dapo``: token sum / ``global_tokens`` (the completion tokens of the whole global batch;
      defaults to the local count, i.e. bnpo) (DAPO's token-level loss).

    Split invariance: ``dapo`` (with ``global_tokens``) and ``dr_grpo`` (with
    ``global_sequences`` = the global batch's sequence count; default the local N) are sums of
    per-token terms over a fixed global normalizer, so summing the micro-batch values of any
    split gives the full batch's loss and gradient. ``grpo`` and ``bnpo`` normalise by local
    quantities (N and token count of the rows passed), so their summed (or averaged)
    micro-batch values depend on the split.
    """
    if loss_type not in GROUP_LOSS_TYPES or loss_type == "rloo":
        raise ValueError(f"unknown per-token loss_type {loss_type!r}; valid: "
                         f"{', '.join(t for t in GROUP_LOSS_TYPES if t != 'rloo')} (rloo: "
                         f"rloo_sequence_loss)")
    m = as_mask(mask, per_token)
    total = masked_sum(per_token, m)
    if loss_type == "grpo":
        seq = masked_sum(per_token, m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1)
        return jnp.mean(seq)
    if loss_type == "bnpo":
        return total / jnp.maximum(jnp.sum(m), 1)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("dr_grpo needs max_completion_length")
        n = per_token.shape[0] if global_sequences is None else global_sequences
        return total / (n * max_completion_length)
    tokens = jnp.sum(m) if global_tokens is None else jnp.asarray(global_tokens, total.dtype)
    return total / jnp.maximum(tokens, 1)


def overlong_penalty(lengths, max_len, cache_len):
    """DAPO soft overlong punishment (Yu et al. 2025, eq. 13) per response length L:
    0 if L <= Lmax - Lc; ((Lmax - Lc) - L) / Lc if Lmax - Lc < L <= Lmax; -1 if L > Lmax."""
    length = jnp.asarray(lengths)
    length = length.astype(jnp.promote_types(length.dtype, jnp.float32))
    start = max_len - cache_len
    ramp = (start - length) / max(cache_len, 1)
    return jnp.where(length <= start, 0.0, jnp.where(length <= max_len, ramp, -1.0)).astype(
        length.dtype)


IS_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def is_weights(old_logp, sampler_logp, mask, mode="token_truncate", cap=2.0, cap_min=None):
    """Importance weights correcting for a sampler whose log-probs differ from the trainer's
    (bf16 rollouts, another mesh; TRL's `vllm_importance_sampling_correction`) [N, T], 0 off
    the mask. With d_t = old_t - sampler_t (the trainer's old log-prob minus the sampler's):

    ``token_*``: w_t = exp(d_t); ``sequence_*``: w = exp(sum_t m_t d_t), shared by the row's
    tokens. ``*_truncate``: clip(w, cap_min, cap) (truncated IS); ``*_mask``: w where
    cap_min <= w <= cap, else 0. ``cap_min`` None: no lower bound. ``none``: 1. As TRL's
    ``vllm_importance_sampling_clip_max`` / ``_clip_min`` (grpo_trainer.py ~l.2596-2619). The
    policy term of the per-token loss is multiplied by w (no gradient flows through it); the KL
    term is not (TRL adds ``beta * k3`` after, ~l.3117-3121)."""
    if mode not in IS_CORRECTIONS:
        raise ValueError(f"unknown IS correction {mode!r}; valid: {', '.join(IS_CORRECTIONS)}")
    m = as_mask(mask, old_logp)
    ok = m != 0
    if mode == "none":
        return jnp.where(ok, 1.0, 0.0).astype(old_logp.dtype)
    d = jnp.where(ok, old_logp - sampler_logp, 0)
    if mode.startswith("sequence"):
        d = jnp.broadcast_to(jnp.sum(d, axis=-1, keepdims=True), d.shape)
    w = jnp.exp(d)
    lo = -jnp.inf if cap_min is None else cap_min
    if mode.endswith("truncate"):
        w = jnp.clip(w, lo, cap) if cap_min is not None else jnp.minimum(w, cap)
    else:
        w = jnp.where((w <= cap) & (w >= lo), w, 0.0)
    return jnp.where(ok, w, 0.0)
