"""Reference-free pair losses: ORPO and CPO / SimPO (docs/algorithms.md, "KTO, ORPO, CPO,
SimPO"). Inputs are the policy's SUMMED response log-probs pc, pr [B] and the response lengths
lc, lr [B] (response token counts); there is no reference model. The chosen-response NLL that
ORPO always and CPO with `cpo_alpha` add is not in here: the trainer adds `chosen_nll` itself.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from easyrl.losses.preference import smoothed_sigmoid_loss

# ORPO's log(1 - exp(lp)) is -inf at lp = 0 (probability 1, or an empty response whose sum 0
# is divided by max(0, 1)); length-normalized log-probs are clamped to <= ORPO_MAX_LOGP first,
# so log_odds stays finite (|log(1 - exp(-1e-7))| ~ 16.1) and has a finite gradient. A row with
# lp > ORPO_MAX_LOGP therefore gets no gradient through lp from the odds-ratio term.
ORPO_MAX_LOGP = -1e-7

# TRL CPOConfig.loss_type
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


def _mean_logps(logps, lengths):
    """Length-normalized (per-token mean) log-probs: sum / max(len, 1)."""
    return logps / jnp.maximum(lengths, 1)


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Maechler 2012): log(-expm1(x))
    near 0, log1p(-exp(x)) below. Each branch only sees inputs where it and its gradient are
    finite."""
    near = x > -math.log(2.0)
    a = jnp.log(-jnp.expm1(jnp.where(near, x, -1.0)))
    b = jnp.log1p(-jnp.exp(jnp.where(near, -1.0, x)))
    return jnp.where(near, a, b)


def orpo_losses(pc, pr, lc, lr, *, beta):
    """ORPO odds-ratio losses [B]; TRL `ORPOTrainer.odds_ratio_loss` (Hong et al. 2024, "ORPO:
    Monolithic Preference Optimization without Reference Model", Eq. 6-7).

    With the length-normalized log-probs lp_c = pc / max(lc, 1), lp_r = pr / max(lr, 1) (TRL's
    `average_log_prob=True`), each clamped to <= ORPO_MAX_LOGP (-1e-7; only lp ~ 0 is affected:
    an empty response or probability ~1, where log(1 - exp(lp)) would be -inf):
      log_odds  = (lp_c - lp_r) - (log(1 - exp(lp_c)) - log(1 - exp(lp_r)))
      or_losses = -beta log sig(log_odds)
    log(1 - exp(lp)) is computed stably (log(-expm1(lp)) near 0, log1p(-exp(lp)) below -ln 2).
    TRL's loss is `nll_loss - mean(beta * logsigmoid(log_odds))`, i.e. chosen NLL + mean(or_losses);
    the NLL term is NOT included here (the trainer adds `chosen_nll`).

    Returns (or_losses [B], chosen_rewards [B], rejected_rewards [B], terms): rewards =
    stop_gradient(beta lp_c), stop_gradient(beta lp_r) (TRL ORPO: beta times the averaged
    log-probs, unclamped); terms = {"log_odds_ratio": stop_gradient(log sig(log_odds)) [B],
    "log_odds_chosen": stop_gradient(log_odds) [B]} (TRL logs their batch means).
    """
    lp_c = _mean_logps(pc, lc)
    lp_r = _mean_logps(pr, lr)
    xc = jnp.minimum(lp_c, ORPO_MAX_LOGP)
    xr = jnp.minimum(lp_r, ORPO_MAX_LOGP)
    log_odds = (xc - xr) - (_log1mexp(xc) - _log1mexp(xr))
    ratio = jax.nn.log_sigmoid(log_odds)
    or_losses = -beta * ratio
    chosen_rewards = jax.lax.stop_gradient(beta * lp_c)
    rejected_rewards = jax.lax.stop_gradient(beta * lp_r)
    terms = {"log_odds_ratio": jax.lax.stop_gradient(ratio),
             "log_odds_chosen": jax.lax.stop_gradient(log_odds)}
    return or_losses, chosen_rewards, rejected_rewards, terms


def cpo_losses(pc, pr, lc, lr, *, beta, loss_type="sigmoid", label_smoothing=0.0,
               simpo_gamma=0.5):
    """CPO / SimPO per-pair losses [B]; TRL `CPOTrainer.cpo_loss` (Xu et al. 2024, "Contrastive
    Preference Optimization", Eq. 3; Meng et al. 2024, "SimPO", Eq. 6).

    The policy log-probs used are length-normalized, lp = sum / max(len, 1), for ``ipo`` and
    ``simpo`` (TRL `concatenated_forward`: `average_log_prob=self.loss_type in ["ipo",
    "simpo"]`) and the sums pc, pr for ``sigmoid`` and ``hinge``. With h = lp_c - lp_r and
    eps = ``label_smoothing``:
      sigmoid: -(1-eps) log sig(beta h) - eps log sig(-beta h)
      hinge:   relu(1 - beta h)
      ipo:     (h - 1/(2 beta))^2
      simpo:   the sigmoid form on h' = h - simpo_gamma / beta, i.e.
               -(1-eps) log sig(beta lp_c - beta lp_r - gamma) - eps log sig(-(...))
    label_smoothing is used by sigmoid and simpo only. The CPO NLL term (TRL `cpo_alpha`) is
    not included (the trainer adds `chosen_nll`).

    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]); rewards =
    stop_gradient(beta lp) of the log-probs used (averaged for ipo / simpo, summed otherwise).
    """
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"unknown CPO loss_type {loss_type!r}; valid: "
                         f"{', '.join(CPO_LOSS_TYPES)}")
    if loss_type in ("ipo", "simpo"):
        lp_c, lp_r = _mean_logps(pc, lc), _mean_logps(pr, lr)
    else:
        lp_c, lp_r = pc, pr
    h = lp_c - lp_r
    if loss_type == "sigmoid":
        losses = smoothed_sigmoid_loss(beta * h, label_smoothing)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:  # simpo
        losses = smoothed_sigmoid_loss(beta * (h - simpo_gamma / beta), label_smoothing)
    chosen_rewards = jax.lax.stop_gradient(beta * lp_c)
    rejected_rewards = jax.lax.stop_gradient(beta * lp_r)
    return losses, chosen_rewards, rejected_rewards
