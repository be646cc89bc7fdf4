"""Reward model: a scalar head on the last real token, trained on preference pairs.

One forward over chosen and rejected concatenated ([2B, T] rows), score = the head at the last
non-pad token (`easyrl.model.score`, the LlamaForSequenceClassification convention), loss =
-log sigmoid(r_c - r_r - margin) per pair. Loss and metrics are sums over the micro-batch divided
by the number of pairs in the global batch, so any gradient-accumulation split gives the same
values. The run directory is a "reward" checkpoint: `easyrl convert easyrl-to-hf --kind reward`
exports it as a LlamaForSequenceClassification.
"""
from __future__ import annotations

import jax.numpy as jnp

from easyrl import losses
from easyrl import model as M
from easyrl.algorithms.common import (pair_batch_spec, pair_denom, pair_inputs, pair_iterators,
                                      pair_tokens)
from easyrl.algorithms.registry import Algorithm
from easyrl.train import loop


def pair_scores(config, params, batch: dict, rng=None):
    """(r_chosen [B], r_rejected [B]) from one forward over the 2B rows."""
    ids, attn = pair_inputs(batch)
    r = M.score(config, params, ids, attn, rng=rng).astype(jnp.float32)
    b = batch["chosen_input_ids"].shape[0]
    return r[:b], r[b:]


def make_loss(config, use_margin: bool = True):
    def loss_fn(params, frozen, batch, rng, denom):
        rc, rr = pair_scores(config, params, batch, rng)
        margin = batch.get("margin") if use_margin else None
        per_pair = losses.reward_losses(rc, rr, margin)
        _, means = losses.reward_loss(rc, rr, margin)  # batch means -> sums / global pairs
        b = rc.shape[0]
        return jnp.sum(per_pair) / denom, {k: v * b / denom for k, v in means.items()}
    return loss_fn


def build_task(env: loop.Env) -> loop.Task:
    c = env.config
    train, ev = pair_iterators(c, env.tokenizer)
    return loop.Task(kind="reward", loss_fn=make_loss(env.model_config, c.rm.use_margin),
                     denom_fn=pair_denom, train_data=train, eval_data=ev, tokens_fn=pair_tokens)


# an HF causal-LM folder as model.path gets a fresh N(0, 1/(D+1)) score head
ALGORITHM = Algorithm(
    command="rm", help="reward model on preference pairs", loop="supervised", kind="reward",
    order=20, build_task=build_task, init_missing_head=True,
    make_loss=lambda c, cfg, adapters_off=False: make_loss(cfg, c.rm.use_margin),
    denom=pair_denom, batch_spec=lambda c, rows: pair_batch_spec(rows, int(c.train.seq_len)))
train = ALGORITHM.train
