"""PPO: KL estimators, per-token KL-penalised rewards, GAE, the clipped policy and value losses
and the adaptive KL controller (docs/algorithms.md, "PPO")."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from easyrl.losses.common import as_mask, masked_mean

KL_KINDS = ("k1", "k3", "abs", "mse")


def kl_penalty(logp, ref_logp, kind="k1"):
    """Per-token KL estimate [B, R]: k1 = logp - ref; k3 = exp(ref - logp) - 1 - (ref - logp);
    abs = |logp - ref|; mse = 0.5 (logp - ref)^2."""
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k3":
        return jnp.expm1(-d) + d
    if kind == "abs":
        return jnp.abs(d)
    if kind == "mse":
        return 0.5 * d * d
    raise ValueError(f"unknown kl kind {kind!r}; valid: {', '.join(KL_KINDS)}")


def ppo_rewards(scores, logp, ref_logp, mask, *, kl_coef, kl_kind="k1", has_eos=None,
                missing_eos_penalty=None):
    """Per-token PPO rewards from scores [B] and response log-probs [B, R] with mask [B, R].

    r_t = -kl_coef * kl_t (0 where mask is 0); at the last valid token of each row the score is
    added (minus ``missing_eos_penalty`` where ``has_eos`` [B] is False, if a penalty is given).
    Rows with an empty mask get no score. Returns (rewards [B, R], kl [B, R] masked to 0).
    """
    m = as_mask(mask, logp)
    diff_ok = m != 0
    kl = jnp.where(diff_ok, kl_penalty(jnp.where(diff_ok, logp, 0), jnp.where(diff_ok, ref_logp, 0),
                                       kl_kind), 0)
    score = jnp.asarray(scores, logp.dtype)
    if missing_eos_penalty is not None:
        if has_eos is None:
            raise ValueError("ppo_rewards: missing_eos_penalty given without has_eos [B]")
        score = score - jnp.where(jnp.asarray(has_eos, bool), 0.0, missing_eos_penalty)
    r = m.shape[-1]
    last = r - 1 - jnp.argmax(diff_ok[:, ::-1], axis=-1)  # last index with mask != 0
    at_last = (jnp.arange(r)[None, :] == last[:, None]) & jnp.any(diff_ok, axis=-1, keepdims=True)
    rewards = -kl_coef * kl + jnp.where(at_last, score[:, None], 0)
    return rewards, kl


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation over response tokens (all [B, R]), reverse lax.scan.

    rewards and values are zeroed where mask == 0; V after the last token is 0.
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, returns = A + V.
    Advantages are 0 at masked positions. Returns (advantages, returns), not whitened.
    """
    m = as_mask(mask, values)
    ok = m != 0
    r = jnp.where(ok, rewards, 0)
    v = jnp.where(ok, values, 0)

    def step(carry, xs):
        next_v, next_a = carry
        r_t, v_t = xs
        a_t = r_t + gamma * next_v - v_t + gamma * lam * next_a
        return (v_t, a_t), a_t

    zero = jnp.zeros(r.shape[0], r.dtype)
    _, adv = jax.lax.scan(step, (zero, zero), (r.T, v.T), reverse=True)
    adv = jnp.where(ok, adv.T, 0)
    return adv, adv + v


def ppo_policy_loss(logp, old_logp, advantages, mask, clip):
    """Clipped PPO policy loss over response tokens (all [B, R]).

    rho = exp(logp - old_logp); loss = masked_mean(max(-A rho, -A clip(rho, 1-c, 1+c))).
    Metrics: policy/approxkl = 0.5 masked_mean((logp - old_logp)^2), policy/clipfrac (fraction
    where the clipped branch is strictly larger), policy/ratio = masked_mean(rho).
    """
    ok = as_mask(mask, logp) != 0
    d = jnp.where(ok, logp - old_logp, 0)
    rho = jnp.exp(d)
    l1 = -advantages * rho
    l2 = -advantages * jnp.clip(rho, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(l1, l2), mask)
    metrics = {
        "policy/approxkl": 0.5 * masked_mean(d * d, mask),
        "policy/clipfrac": masked_mean((l2 > l1).astype(rho.dtype), mask),
        "policy/ratio": masked_mean(rho, mask),
    }
    return loss, metrics


def ppo_value_loss(values, old_values, returns, mask, clip):
    """Clipped value loss over response tokens (all [B, R]).

    0.5 masked_mean(max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2)).
    Metrics: val/clipfrac (fraction where the clipped branch is strictly larger), val/mean.
    """
    v_clipped = jnp.clip(values, old_values - clip, old_values + clip)
    l1 = (values - returns) ** 2
    l2 = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(l1, l2), mask)
    metrics = {
        "val/clipfrac": masked_mean((l2 > l1).astype(l1.dtype), mask),
        "val/mean": masked_mean(values, mask),
    }
    return loss, metrics


def adaptive_kl_update(kl_coef, current_kl, n_steps, *, target, horizon):
    """Adaptive KL controller (Ziegler et al.): e = clip(kl / target - 1, -0.2, 0.2);
    new_coef = kl_coef * (1 + e * n_steps / horizon). Python floats in -> python float out."""
    if all(isinstance(x, (int, float)) for x in (kl_coef, current_kl, n_steps)):
        e = min(max(current_kl / target - 1.0, -0.2), 0.2)
        return float(kl_coef * (1.0 + e * n_steps / horizon))
    e = jnp.clip(jnp.asarray(current_kl) / target - 1.0, -0.2, 0.2)
    return kl_coef * (1.0 + e * n_steps / horizon)
