"""Every loss of easyrl as a pure, jit-compatible function of arrays, one module per family:

  common      masked sums / means / variance, whitening, token log-probs and entropy
  sft         token-level cross-entropy, also fused with the LM head in chunks
  preference  reward-model pairwise loss, the DPO family and their metrics
  kto         KTO / unpaired APO-zero losses on labelled completions, the KL reference point
  refless     reference-free pair losses: ORPO's odds ratio, CPO / SimPO
  rrhf        RRHF ranking + SFT loss and its per-prompt metrics
  ppo         KL estimators, per-token rewards, GAE, clipped policy / value losses, adaptive KL
  group       GRPO / Dr. GRPO / DAPO / GSPO / RLOO / REINFORCE++ advantages, losses, aggregations

All public names are re-exported here (`from easyrl import losses; losses.gae(...)`).

Shape letters: B batch, T sequence length, V vocab, R response length (PPO), N responses per
prompt (RRHF). The formulas, their sources and the metric names are in docs/algorithms.md.

Alignment convention: token-level arrays are aligned with the tokens they score.
``token_logprobs(logits, ids)[:, t]`` is the log-probability of ``ids[:, t]`` under the
distribution predicted at position ``t - 1``; column 0 has no predictor and is 0. A loss mask
``mask[b, t] = 1`` marks token ``t`` as a response/target token, so a sequence log-prob is
``masked_sum(token_logprobs(logits, ids), mask, axis=-1)``.

Masks may be bool or float. Masked reductions ignore whatever sits at masked positions (even
inf/nan), and a reduction over an empty mask returns 0 instead of nan.
"""
from easyrl.losses.common import (as_mask, compute_dtype, masked_mean, masked_sum, masked_var,
                                  next_token_stats, shift_to_tokens, token_entropy, token_logprobs,
                                  whiten)
from easyrl.losses.group import (ADVANTAGE_KINDS, GROUP_LOSS_TYPES, IS_LEVELS, SCALE_REWARDS,
                                 aggregate, clip_metrics, clipped_policy_loss, group_advantages,
                                 k3_kl, overlong_penalty, reinforce_pp_returns, reverse_cumsum)
from easyrl.losses.kto import KTO_LOSS_TYPES, kto_kl, kto_losses, kto_metric_sums
from easyrl.losses.ppo import (KL_KINDS, adaptive_kl_update, gae, kl_penalty, ppo_policy_loss,
                               ppo_rewards, ppo_value_loss)
from easyrl.losses.preference import (DPO_BATCH_LOSS_TYPES, DPO_LOSS_TYPES, chosen_nll,
                                      dpo_losses, dpo_metrics, parse_loss_types,
                                      parse_loss_weights, reward_loss, reward_losses)
from easyrl.losses.refless import CPO_LOSS_TYPES, ORPO_MAX_LOGP, cpo_losses, orpo_losses
from easyrl.losses.rrhf import RRHF_METRICS, rrhf_loss, rrhf_sums
from easyrl.losses.sft import (LM_HEAD_CHUNK_TOKENS, head_scan, lm_head_loss_sums, sft_loss,
                               sft_loss_sums)

__all__ = [
    "as_mask", "compute_dtype", "masked_mean", "masked_sum", "masked_var", "next_token_stats",
    "shift_to_tokens", "token_entropy", "token_logprobs", "whiten",
    "ADVANTAGE_KINDS", "GROUP_LOSS_TYPES", "IS_LEVELS", "SCALE_REWARDS", "aggregate",
    "clip_metrics", "clipped_policy_loss", "group_advantages", "k3_kl", "overlong_penalty",
    "reinforce_pp_returns", "reverse_cumsum",
    "KL_KINDS", "adaptive_kl_update", "gae", "kl_penalty", "ppo_policy_loss", "ppo_rewards",
    "ppo_value_loss",
    "DPO_BATCH_LOSS_TYPES", "DPO_LOSS_TYPES", "chosen_nll", "dpo_losses", "dpo_metrics",
    "parse_loss_types", "parse_loss_weights", "reward_loss", "reward_losses",
    "KTO_LOSS_TYPES", "kto_kl", "kto_losses", "kto_metric_sums",
    "CPO_LOSS_TYPES", "ORPO_MAX_LOGP", "cpo_losses", "orpo_losses",
    "RRHF_METRICS", "rrhf_loss", "rrhf_sums",
    "LM_HEAD_CHUNK_TOKENS", "head_scan", "lm_head_loss_sums", "sft_loss", "sft_loss_sums",
]
