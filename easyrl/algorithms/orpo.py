"""ORPO: odds-ratio preference optimization, SFT and preference in one loss with no reference
model (Hong et al. 2024; TRL `ORPOTrainer.odds_ratio_loss`). Formulas in `easyrl.losses.refless`
and docs/algorithms.md ("ORPO").

loss = NLL(chosen) + mean over pairs of -orpo.beta x log sig(log odds(y_w) - log odds(y_l)),
log odds(y) = lp - log(1 - exp(lp)) with lp the length-normalized (mean token) log-prob; TRL
calls the weight lambda `beta` (default 0.1). NLL(chosen) is the token-mean cross-entropy over
the chosen rows' prompt AND response tokens of the global batch, as TRL's ORPOTrainer computes it
(trl/experimental/orpo/orpo_trainer.py `concatenated_forward`: "orpo chosen nll loss is computed
over the full prompt and response"; `orpo.nll_tokens=all`, the default), or over the response
tokens only (`orpo.nll_tokens=response`, the paper's SFT term on y_w). The odds-ratio term is a
sum over pairs / the global pairs, so any micro-batch split gives the same loss and gradient.

Metrics (TRL names): rewards/chosen, rewards/rejected (beta x lp), rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected (lp), nll_loss, log_odds_ratio (mean log sig(.)),
log_odds_chosen (mean log-odds difference), and their `eval/` versions.
"""
from __future__ import annotations

import jax.numpy as jnp

from easyrl import losses
from easyrl.algorithms.common import (pair_batch_spec, pair_iterators,
                                      pair_logps_with_chosen_nll, pair_metrics, pair_nll_denom,
                                      pair_tokens)
from easyrl.algorithms.registry import Algorithm
from easyrl.train import loop


def make_loss(config, o):
    """Loss for config section `o` (= c.orpo); no reference model."""
    def loss_fn(params, frozen, batch, rng, denom):
        del frozen
        pc, pr, lc, lr, full = pair_logps_with_chosen_nll(config, params, batch, rng)
        per, r_c, r_r, terms = losses.orpo_losses(pc, pr, lc, lr, beta=o.beta)
        if o.get("nll_tokens", "all") == "all":
            nll = -jnp.sum(full) / denom["chosen_all_tokens"]
        else:
            nll = -jnp.sum(pc) / denom["chosen_tokens"]
        pairs = denom["pairs"]
        metrics = pair_metrics(r_c, r_r, pc / jnp.maximum(lc, 1), pr / jnp.maximum(lr, 1), pairs)
        metrics.update({"nll_loss": nll, "log_odds_ratio": jnp.sum(terms["log_odds_ratio"]) / pairs,
                        "log_odds_chosen": jnp.sum(terms["log_odds_chosen"]) / pairs})
        return nll + jnp.sum(per) / pairs, metrics
    return loss_fn


NLL_TOKENS = ("all", "response")


def check_config(o) -> None:
    if o.get("nll_tokens", "all") not in NLL_TOKENS:
        raise ValueError(f"config orpo.nll_tokens: {o.get('nll_tokens')!r}; valid: all (prompt + "
                         f"response, as TRL's ORPOTrainer), response")
    if not o.beta >= 0:
        raise ValueError(f"config orpo.beta: the odds-ratio weight (lambda) must be >= 0, "
                         f"got {o.beta}")


def build_task(env: loop.Env) -> loop.Task:
    c = env.config
    check_config(c.orpo)
    train, ev = pair_iterators(c, env.tokenizer)
    return loop.Task(kind="causal_lm", loss_fn=make_loss(env.model_config, c.orpo),
                     denom_fn=pair_nll_denom, train_data=train, eval_data=ev,
                     tokens_fn=pair_tokens)


ALGORITHM = Algorithm(
    command="orpo", help="odds-ratio preference optimization (ORPO: SFT + preference, no reference)",
    loop="supervised", order=34, check_config=lambda c: check_config(c.orpo),
    build_task=build_task, make_loss=lambda c, cfg, adapters_off=False: make_loss(cfg, c.orpo),
    denom=pair_nll_denom, batch_spec=lambda c, rows: pair_batch_spec(rows, int(c.train.seq_len)))
train = ALGORITHM.train
