"""CPO and SimPO: DPO-style pair losses on the policy's own log-probs, no reference model
(Xu et al. 2024, "Contrastive Preference Optimization"; Meng et al. 2024, "SimPO"; TRL
`CPOTrainer.cpo_loss`). Formulas in `easyrl.losses.refless` and docs/algorithms.md.

cpo.loss_type sigmoid | hinge | ipo | simpo on logits = lp_w - lp_l (summed log-probs for
sigmoid / hinge, length-normalized for ipo / simpo, as TRL); simpo subtracts the target margin:
-log sig(beta lp_w - beta lp_l - gamma) with gamma = `simpo_gamma`. Plus `cpo_alpha` x the
token-mean NLL of the chosen responses of the global batch (TRL: cpo_alpha, default 1; SimPO:
0). Loss and metrics are sums over the micro-batch / global counts: split-invariant.

`easyrl cpo` reads section `cpo`; `easyrl simpo` (easyrl/algorithms/simpo.py) is the same
trainer with section `simpo`, loss type simpo and cpo_alpha 0 by default.

Metrics (TRL names): rewards/chosen, rewards/rejected (beta x the log-probs used),
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected, nll_loss (when cpo_alpha >
0), and their `eval/` versions.
"""
from __future__ import annotations

import jax.numpy as jnp

from easyrl import losses
from easyrl.algorithms.common import (pair_batch_spec, pair_iterators, pair_logps, pair_metrics,
                                      pair_nll_denom, pair_tokens)
from easyrl.algorithms.registry import Algorithm
from easyrl.train import loop

AVERAGED = ("ipo", "simpo")  # loss types on length-normalized log-probs (TRL)


def loss_type(section, name: str) -> str:
    return "simpo" if name == "simpo" else section.loss_type


def make_loss(config, s, kind: str):
    """Loss for config section `s` (c.cpo or c.simpo) with CPO loss type `kind`."""
    alpha = float(s.cpo_alpha)

    def loss_fn(params, frozen, batch, rng, denom):
        del frozen
        pc, pr, lc, lr = pair_logps(config, params, batch, rng)
        per, r_c, r_r = losses.cpo_losses(pc, pr, lc, lr, beta=s.beta, loss_type=kind,
                                          label_smoothing=s.label_smoothing,
                                          simpo_gamma=s.simpo_gamma)
        # TRL logs the log-probs the loss type uses: per-token means for ipo / simpo
        lp_c, lp_r = (pc / jnp.maximum(lc, 1), pr / jnp.maximum(lr, 1)) if kind in AVERAGED \
            else (pc, pr)
        metrics = pair_metrics(r_c, r_r, lp_c, lp_r, denom["pairs"])
        loss = jnp.sum(per) / denom["pairs"]
        if alpha:
            nll = -jnp.sum(pc) / denom["chosen_tokens"]
            metrics["nll_loss"] = nll
            loss = loss + alpha * nll
        return loss, metrics
    return loss_fn


def check_config(s, name: str) -> None:
    kind = loss_type(s, name)
    if kind not in losses.CPO_LOSS_TYPES:
        raise ValueError(f"config {name}.loss_type: {kind!r}; valid: "
                         f"{', '.join(losses.CPO_LOSS_TYPES)}")
    if not s.beta > 0:
        raise ValueError(f"config {name}.beta: must be positive, got {s.beta}")
    if not 0.0 <= s.label_smoothing < 0.5:
        raise ValueError(f"config {name}.label_smoothing: must be in [0, 0.5), got "
                         f"{s.label_smoothing}")
    if not s.cpo_alpha >= 0:
        raise ValueError(f"config {name}.cpo_alpha: must be >= 0 (0 = no NLL term), got "
                         f"{s.cpo_alpha}")


def record(name: str, order: int, help: str) -> Algorithm:
    """The registry record of command `name` (cpo or simpo), reading config section `name`."""
    def build_task(env: loop.Env) -> loop.Task:
        c = env.config
        check_config(c[name], name)
        train, ev = pair_iterators(c, env.tokenizer)
        return loop.Task(kind="causal_lm",
                         loss_fn=make_loss(env.model_config, c[name], loss_type(c[name], name)),
                         denom_fn=pair_nll_denom, train_data=train, eval_data=ev,
                         tokens_fn=pair_tokens)

    return Algorithm(
        command=name, help=help, loop="supervised", order=order,
        check_config=lambda c: check_config(c[name], name), build_task=build_task,
        make_loss=lambda c, cfg, adapters_off=False: make_loss(cfg, c[name],
                                                               loss_type(c[name], name)),
        denom=pair_nll_denom, batch_spec=lambda c, rows: pair_batch_spec(rows, int(c.train.seq_len)))


ALGORITHM = record("cpo", 36, "contrastive preference optimization (CPO: no reference model)")
train = ALGORITHM.train
