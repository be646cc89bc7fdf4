"""Pairwise preference losses: the reward model's Bradley-Terry loss and the DPO family
(docs/algorithms.md, "Reward model" and "DPO")."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


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
# TRL DPOTrainer.dpo_loss loss types (docs/algorithms.md, "DPO family"). "aot_unpaired" is TRL's
# newer name for "aot_pair"; "sft" is the chosen-response NLL (the `rpo_alpha` term as a loss).
DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair",
                  "sppo_hard", "aot", "aot_pair", "aot_unpaired", "apo_zero", "apo_down",
                  "discopop", "sft")
# loss types whose per-pair value depends on the whole (micro-)batch, not on the pair alone
DPO_BATCH_LOSS_TYPES = ("bco_pair", "aot", "aot_pair", "aot_unpaired", "sft")
EXO_DEFAULT_EPS = 1e-3  # TRL: exo_pair with label_smoothing == 0 uses 1e-3


def parse_loss_types(loss_type) -> tuple:
    """`"sigmoid"`, `"sigmoid,sppo_hard"` (comma-separated) or a sequence of names -> tuple."""
    parts = loss_type.split(",") if isinstance(loss_type, str) else list(loss_type)
    names = tuple(str(p).strip() for p in parts)
    if not names or any(not n for n in names):
        raise ValueError(f"DPO loss_type {loss_type!r}: empty loss type name; valid: "
                         f"{', '.join(DPO_LOSS_TYPES)}")
    for n in names:
        if n not in DPO_LOSS_TYPES:
            raise ValueError(f"unknown DPO loss_type {n!r} (in {loss_type!r}); valid: "
                             f"{', '.join(DPO_LOSS_TYPES)}")
    return names


def parse_loss_weights(loss_weights, n: int) -> tuple:
    """Weights of `n` loss types: None / "" (1 each), comma-separated floats or a sequence."""
    if loss_weights is None or (isinstance(loss_weights, str) and not loss_weights.strip()):
        return (1.0,) * n
    if isinstance(loss_weights, str):
        parts = loss_weights.split(",")
    elif isinstance(loss_weights, (int, float)):
        parts = [loss_weights]
    else:
        parts = list(loss_weights)
    try:
        weights = tuple(float(str(p).strip()) for p in parts)
    except ValueError:
        raise ValueError(f"DPO loss_weights {loss_weights!r}: expected comma-separated "
                         f"numbers") from None
    if len(weights) != n:
        raise ValueError(f"DPO loss_weights {loss_weights!r}: {len(weights)} weight(s) for "
                         f"{n} loss type(s); give one weight per loss type")
    for w in weights:
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"DPO loss_weights {loss_weights!r}: each weight must be a finite "
                             f"number >= 0, got {w}")
    return weights


def chosen_nll(policy_chosen_logps, chosen_lengths):
    """Mean token NLL of the chosen responses over the batch: -sum_b pc_b / sum_b len_b
    (TRL's `nll_loss`: cross-entropy over all chosen response tokens of the batch; 0 when the
    batch has no chosen response token)."""
    n = jax.lax.stop_gradient(jnp.sum(chosen_lengths))
    return -jnp.sum(policy_chosen_logps) / jnp.maximum(n, 1)


def smoothed_sigmoid_loss(x, eps):
    """-(1 - eps) log sig(x) - eps log sig(-x)."""
    return -(1.0 - eps) * jax.nn.log_sigmoid(x) - eps * jax.nn.log_sigmoid(-x)


def _dpo_term(kind, pc, pr, ref_c, ref_r, cr, rr, *, beta, eps, chosen_lengths,
              rejected_lengths, discopop_tau):
    """One loss type's per-pair loss [B] (cr, rr: the log-ratios pc - ref_c, pr - ref_r)."""
    h = cr - rr
    if kind == "sigmoid":
        return smoothed_sigmoid_loss(beta * h, eps)
    if kind == "robust":
        if isinstance(eps, (int, float)) and eps >= 0.5:
            raise ValueError(f"robust DPO needs label_smoothing < 0.5, got {eps}")
        return (-(1.0 - eps) * jax.nn.log_sigmoid(beta * h)
                + eps * jax.nn.log_sigmoid(-beta * h)) / (1.0 - 2.0 * eps)
    if kind == "hinge":
        return jax.nn.relu(1.0 - beta * h)
    if kind == "ipo":
        hl = cr / jnp.maximum(chosen_lengths, 1) - rr / jnp.maximum(rejected_lengths, 1)
        return (hl - 1.0 / (2.0 * beta)) ** 2
    if kind == "exo_pair":
        e = jnp.where(jnp.asarray(eps) == 0, EXO_DEFAULT_EPS, eps)
        z = beta * h
        return (jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-e))
                + jax.nn.sigmoid(-z) * (jax.nn.log_sigmoid(-z) - jnp.log(e)))
    if kind == "nca_pair":
        zc, zr = beta * cr, beta * rr
        return (-jax.nn.log_sigmoid(zc) - 0.5 * jax.nn.log_sigmoid(-zc)
                - 0.5 * jax.nn.log_sigmoid(-zr))
    if kind == "bco_pair":
        zc, zr = beta * cr, beta * rr
        delta = jax.lax.stop_gradient(jnp.mean(jnp.concatenate([zc, zr])))
        return -jax.nn.log_sigmoid(zc - delta) - jax.nn.log_sigmoid(-(zr - delta))
    if kind == "sppo_hard":
        return (cr - 0.5 / beta) ** 2 + (rr + 0.5 / beta) ** 2
    if kind == "aot":
        delta = jnp.sort(pc - pr) - jnp.sort(ref_c - ref_r)
        return smoothed_sigmoid_loss(beta * delta, eps)
    if kind in ("aot_pair", "aot_unpaired"):
        delta = jnp.sort(cr) - jnp.sort(rr)
        return smoothed_sigmoid_loss(beta * delta, eps)
    if kind == "apo_zero":
        return (1.0 - jax.nn.sigmoid(beta * cr)) + jax.nn.sigmoid(beta * rr)
    if kind == "apo_down":
        return jax.nn.sigmoid(beta * cr) + (1.0 - jax.nn.sigmoid(beta * h))
    if kind == "discopop":
        z = beta * h
        m = jax.nn.sigmoid(z / discopop_tau)
        return -jax.nn.log_sigmoid(z) * (1.0 - m) + jnp.exp(-z) * m
    if kind == "sft":
        return jnp.broadcast_to(chosen_nll(pc, chosen_lengths), pc.shape)
    raise ValueError(f"unknown DPO loss_type {kind!r}; valid: {', '.join(DPO_LOSS_TYPES)}")


def dpo_losses(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
               *, beta, loss_type="sigmoid", label_smoothing=0.0, reference_free=False,
               chosen_lengths=None, rejected_lengths=None, loss_weights=None, rpo_alpha=0.0,
               discopop_tau=0.05, return_terms=False):
    """DPO-family losses from summed response log-probs (all [B]); TRL `DPOTrainer.dpo_loss`.

    Log-ratios c = pc - rc, r = pr - rr and h = c - r (reference terms 0 when
    ``reference_free``; the ref arrays may then be None); eps = label_smoothing. loss_type
    (one name, comma-separated names or a sequence; formulas and sources in docs/algorithms.md):
      sigmoid:   -(1-eps) log sig(beta h) - eps log sig(-beta h)
      robust:    (-(1-eps) log sig(beta h) + eps log sig(-beta h)) / (1 - 2 eps)
      hinge:     relu(1 - beta h)
      ipo:       (h' - 1/(2 beta))^2, h' with each log-ratio divided by its response length
      exo_pair:  sig(z)(log sig(z) - log(1-eps)) + sig(-z)(log sig(-z) - log eps), z = beta h
                 (eps = 1e-3 when label_smoothing is 0)
      nca_pair:  -log sig(beta c) - 1/2 log sig(-beta c) - 1/2 log sig(-beta r)
      bco_pair:  -log sig(beta c - delta) - log sig(-(beta r - delta)), delta = stop_gradient of
                 the mean of the batch's 2B implicit rewards (TRL: a running mean over steps)
      sppo_hard: (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2
      aot:       sigmoid form on sort_B(pc - pr) - sort_B(rc - rr)
      aot_pair:  sigmoid form on sort_B(c) - sort_B(r)   (aot_unpaired: the same)
      apo_zero:  1 - sig(beta c) + sig(beta r)
      apo_down:  sig(beta c) + 1 - sig(beta h)
      discopop:  -log sig(beta h)(1 - m) + exp(-beta h) m, m = sig(beta h / discopop_tau)
      sft:       chosen_nll (the same value for every pair)
    Several types: losses = sum_i w_i loss_i with w = ``loss_weights`` (1 each by default).
    ``rpo_alpha`` > 0 adds rpo_alpha * chosen_nll(pc, chosen_lengths) to every pair (TRL
    `rpo_alpha`). bco_pair, aot*, sft and the rpo term depend on the whole batch given.
    ``chosen_lengths``/``rejected_lengths`` [B] (response token counts) are required by ipo
    (both), sft and rpo_alpha (chosen).

    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]); implicit rewards are
    beta * (logp - logp_ref) on the summed log-probs, stop_gradient'ed, whatever the loss types.
    With ``return_terms`` a 4th item: {"loss/<type>": unweighted per-pair loss [B] of each
    type, "nll_loss": chosen_nll broadcast to [B] when rpo_alpha > 0}.
    """
    kinds = parse_loss_types(loss_type)
    weights = parse_loss_weights(loss_weights, len(kinds))
    if reference_free:
        ref_c = jnp.zeros_like(policy_chosen_logps)
        ref_r = jnp.zeros_like(policy_rejected_logps)
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError("ref_chosen_logps and ref_rejected_logps are required unless "
                             "reference_free=True")
        ref_c, ref_r = ref_chosen_logps, ref_rejected_logps
    need = set()
    if "ipo" in kinds:
        need |= {"chosen_lengths", "rejected_lengths"}
    if "sft" in kinds or rpo_alpha:
        need.add("chosen_lengths")
    for name, val in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if name in need and val is None:
            what = "loss_type='ipo'" if "ipo" in kinds else "loss_type='sft' / rpo_alpha"
            raise ValueError(f"dpo_losses({what}) requires {name} (response lengths [B])")
    pc, pr = policy_chosen_logps, policy_rejected_logps
    cr, rr = pc - ref_c, pr - ref_r
    kw = dict(beta=beta, eps=label_smoothing, chosen_lengths=chosen_lengths,
              rejected_lengths=rejected_lengths, discopop_tau=discopop_tau)
    terms = {}
    losses = None
    for kind, w in zip(kinds, weights):
        term = _dpo_term(kind, pc, pr, ref_c, ref_r, cr, rr, **kw)
        terms[f"loss/{kind}"] = term
        losses = w * term if losses is None else losses + w * term
    if rpo_alpha:
        nll = jnp.broadcast_to(chosen_nll(pc, chosen_lengths), pc.shape)
        terms["nll_loss"] = nll
        losses = losses + rpo_alpha * nll
    chosen_rewards = jax.lax.stop_gradient(beta * cr)
    rejected_rewards = jax.lax.stop_gradient(beta * rr)
    if return_terms:
        return losses, chosen_rewards, rejected_rewards, terms
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
