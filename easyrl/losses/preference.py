"""Pairwise preference losses: the reward model's Bradley-Terry loss and the DPO family
(docs/algorithms.md, "Reward model" and "DPO")."""
from __future__ import annotations

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


# ----------------------------------------------------------------------------- reward model
def reward_losses(r_chosen, r_rejected, margin=None):
    """Per-pair loss [B] = -log sigmoid(r_c - r_r - m) = softplus(-(r_c - r_r - m))."""
    d = r_chosen - r_rejected
    if margin is not None:
        d = d - margin
    return jax.nn.softplus(-d)


def reward_loss(r_chosen, r_rejected, margin=None):
    """Mean pairwise reward-model loss over B pairs, and metrics.

    Metrics: accuracy = mean(r_c > r_r), margin = mean(r_c - r_r), reward/chosen, reward/rejected.
    """
    loss = jnp.mean(reward_losses(r_chosen, r_rejected, margin))
    metrics = {
        "accuracy": jnp.mean((r_chosen > r_rejected).astype(loss.dtype)),
        "margin": jnp.mean(r_chosen - r_rejected),
        "reward/chosen": jnp.mean(r_chosen),
        "reward/rejected": jnp.mean(r_rejected),
    }
    return loss, metrics


# ----------------------------------------------------------------------------- DPO
def dpo_losses(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
               *, beta, loss_type="sigmoid", label_smoothing=0.0, reference_free=False,
               chosen_lengths=None, rejected_lengths=None):
    """DPO-family losses from summed response log-probs (all [B]).

    h = (pc - rc) - (pr - rr) (reference terms 0 when ``reference_free``; the ref arrays may
    then be None). loss_type:
      sigmoid: -(1-eps) log sig(beta h) - eps log sig(-beta h)
      robust:  (-(1-eps) log sig(beta h) + eps log sig(-beta h)) / (1 - 2 eps)
      hinge:   relu(1 - beta h)
      ipo:     (h - 1/(2 beta))^2, each log-ratio divided by its response length
               (``chosen_lengths``/``rejected_lengths`` [B] required).
    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]); implicit rewards are
    beta * (logp - logp_ref) on the summed log-probs, stop_gradient'ed.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if reference_free:
        ref_c = jnp.zeros_like(policy_chosen_logps)
        ref_r = jnp.zeros_like(policy_rejected_logps)
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError("ref_chosen_logps and ref_rejected_logps are required unless "
                             "reference_free=True")
        ref_c, ref_r = ref_chosen_logps, ref_rejected_logps
    eps = label_smoothing
    chosen_ratio = policy_chosen_logps - ref_c
    rejected_ratio = policy_rejected_logps - ref_r
    if loss_type == "ipo":
        for name, val in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
            if val is None:
                raise ValueError(f"dpo_losses(loss_type='ipo') requires {name} (response lengths [B])")
        h = (chosen_ratio / jnp.maximum(chosen_lengths, 1)
             - rejected_ratio / jnp.maximum(rejected_lengths, 1))
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        h = chosen_ratio - rejected_ratio
        pos, neg = jax.nn.log_sigmoid(beta * h), jax.nn.log_sigmoid(-beta * h)
        if loss_type == "sigmoid":
            losses = -(1.0 - eps) * pos - eps * neg
        elif loss_type == "robust":
            if isinstance(eps, (int, float)) and eps >= 0.5:
                raise ValueError(f"robust DPO needs label_smoothing < 0.5, got {eps}")
            losses = (-(1.0 - eps) * pos + eps * neg) / (1.0 - 2.0 * eps)
        else:  # hinge
            losses = jax.nn.relu(1.0 - beta * h)
    chosen_rewards = jax.lax.stop_gradient(beta * chosen_ratio)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_ratio)
    return losses, chosen_rewards, rejected_rewards


def dpo_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps):
    """Batch means (TRL names) of implicit rewards, their accuracy/margin, and policy log-probs."""
    return {
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(chosen_rewards.dtype)),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
        "logps/chosen": jnp.mean(policy_chosen_logps),
        "logps/rejected": jnp.mean(policy_rejected_logps),
    }
