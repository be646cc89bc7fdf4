"""KTO: Kahneman-Tversky optimisation on unpaired, labelled completions (docs/algorithms.md,
"KTO, ORPO, CPO, SimPO"). Follows TRL `KTOTrainer.kto_loss` (`trl/trainer/kto_trainer.py`) and
Ethayarajh et al. 2024 ("KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 7)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

# TRL KTOConfig.loss_type: "kto" (Eq. 7 of the KTO paper) and "apo_zero_unpaired" (the unpaired
# variant of APO-zero, D'Oosterlinck et al. 2024, Eq. 7; no reference point z).
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_kl(policy_kl_logps, ref_kl_logps):
    """KTO reference point z = max(0, mean_b(policy_kl_logps - ref_kl_logps)), stop-gradient'ed.

    Inputs [B]: summed completion log-probs of the policy and the reference on the *mismatched*
    (prompt_i, completion_j) rows (TRL's `KL_completion_*`), an estimate of KL(policy || ref).
    TRL `KTOTrainer.kto_loss`: `(policy_KL_logps - reference_KL_logps).mean().detach()`, then
    the mean over processes and `.clamp(min=0)`; here the mean is over the rows given. Returns
    a scalar; no gradient flows to either input.
    """
    kl = jnp.mean(policy_kl_logps - ref_kl_logps)
    return jax.lax.stop_gradient(jnp.maximum(kl, 0.0))


def kto_losses(policy_logps, ref_logps, labels, kl, *, beta, desirable_weight=1.0,
               undesirable_weight=1.0, loss_type="kto"):
    """Per-row KTO losses [B] from summed completion log-probs (TRL `KTOTrainer.kto_loss`).

    With r = policy_logps - ref_logps, z = ``kl`` (a scalar, see `kto_kl`; stop-gradient'ed
    here as well) and labels [B] (bool or 0/1, 1 / True = desirable):
      kto:                desirable   w_d (1 - sig(beta (r - z)))
                          undesirable w_u (1 - sig(beta (z - r)))
      apo_zero_unpaired:  desirable   w_d (1 - sig(beta r))
                          undesirable w_u sig(beta r)               (z unused; ``kl`` may be None)
    w_d = ``desirable_weight``, w_u = ``undesirable_weight``. The loss is the mean of these over
    all rows of both labels (TRL `losses.nanmean()` over the concatenated chosen and rejected
    losses); the caller takes it.

    Returns (losses [B], rewards [B]); rewards = stop_gradient(beta r) (TRL's chosen_rewards /
    rejected_rewards, here in row order; split them by label with `kto_metric_sums`).
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; valid: "
                         f"{', '.join(KTO_LOSS_TYPES)}")
    desirable = jnp.asarray(labels).astype(bool)
    r = policy_logps - ref_logps
    if loss_type == "kto":
        if kl is None:
            raise ValueError("kto_losses(loss_type='kto') requires kl (see kto_kl)")
        z = jax.lax.stop_gradient(jnp.asarray(kl, r.dtype))
        chosen = 1.0 - jax.nn.sigmoid(beta * (r - z))
        rejected = 1.0 - jax.nn.sigmoid(beta * (z - r))
    else:  # apo_zero_unpaired
        chosen = 1.0 - jax.nn.sigmoid(beta * r)
        rejected = jax.nn.sigmoid(beta * r)
    losses = jnp.where(desirable, desirable_weight * chosen, undesirable_weight * rejected)
    rewards = jax.lax.stop_gradient(beta * r)
    return losses, rewards


def kto_metric_sums(rewards, policy_logps, labels):
    """Per-class sums and counts (TRL `KTOTrainer.get_batch_loss_metrics` names), stop-gradient.

    {"rewards/chosen_sum", "rewards/rejected_sum"}: sums of ``rewards`` over desirable /
    undesirable rows; {"logps/chosen_sum", "logps/rejected_sum"}: the same of ``policy_logps``;
    {"count/chosen", "count/rejected"}: the number of rows of each label (float). The trainer
    divides sums by counts over its whole (global) batch: rewards/chosen = rewards/chosen_sum /
    count/chosen, etc.
    """
    desirable = jnp.asarray(labels).astype(bool)
    rewards = jax.lax.stop_gradient(rewards)
    logps = jax.lax.stop_gradient(policy_logps)
    dtype = jnp.result_type(rewards.dtype, logps.dtype, jnp.float32)
    d = desirable.astype(dtype)
    u = 1.0 - d
    return {
        "rewards/chosen_sum": jnp.sum(jnp.where(desirable, rewards, 0.0)).astype(dtype),
        "rewards/rejected_sum": jnp.sum(jnp.where(desirable, 0.0, rewards)).astype(dtype),
        "logps/chosen_sum": jnp.sum(jnp.where(desirable, logps, 0.0)).astype(dtype),
        "logps/rejected_sum": jnp.sum(jnp.where(desirable, 0.0, logps)).astype(dtype),
        "count/chosen": jnp.sum(d),
        "count/rejected": jnp.sum(u),
    }
