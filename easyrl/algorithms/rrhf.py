"""RRHF: rank N scored responses per prompt by length-normalized log-likelihood, plus SFT on the
best-scored one (Yuan et al. 2023, "RRHF: Rank Responses to Align Language Models with Human
Feedback without tears").

All N responses of the B prompts go through one forward ([B, N, T] -> [B*N, T]). Per response:
the summed log-prob over its response tokens and its TRUE length (loss-mask count, not the
padded length). p_i = logp_i / len_i ** rrhf.length_penalty; loss = rrhf.rank_weight *
sum over pairs (score_i < score_j) relu(p_i - p_j) + mean-token NLL of the best response, each
averaged over prompts (`easyrl.losses.rrhf_sums`; formulas in docs/algorithms.md). Loss and
metrics are sums over the micro-batch's prompts divided by the number of prompts in the global
batch.

Metrics: loss/rank, loss/sft, rank_pairs (ordered pairs per prompt), rank_acc (per-prompt fraction
of ordered pairs the model already ranks right, averaged over prompts), logps/best and
logps/worst (mean per-token log-prob of the best- / worst-scored response).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from easyrl import losses
from easyrl.algorithms.common import fmt, iter_kwargs, response_logps
from easyrl.algorithms.registry import Algorithm
from easyrl.data.iterator import rrhf_iterator
from easyrl.train import loop, setup


def response_stats(config, params, batch, rng=None):
    """(logp sums [B, N], true lengths [B, N]) of every response, one forward of B*N rows."""
    b, n, t = batch["input_ids"].shape
    flat = lambda k: batch[k].reshape(b * n, t)  # noqa: E731
    lp, length = response_logps(config, params, flat("input_ids"), flat("attention_mask"),
                                flat("loss_mask"), rng=rng)
    return lp.reshape(b, n), length.reshape(b, n)


def make_loss(config, r):
    """Loss for config section `r` (= c.rrhf): `losses.rrhf_sums` (per-prompt terms summed over
    the micro-batch's prompts) / denom (the prompts in the global batch)."""
    def loss_fn(params, frozen, batch, rng, denom):
        lp, length = response_stats(config, params, batch, rng)
        s = losses.rrhf_sums(lp, length, batch["scores"], batch["valid"] > 0, -lp,
                             length_penalty=r.length_penalty, rank_weight=r.rank_weight)
        return s["loss"] / denom, {k: s[k] / denom for k in losses.RRHF_METRICS}
    return loss_fn


def denom(batch):
    """Number of prompts in the whole global batch."""
    return jnp.asarray(batch["input_ids"].shape[0], jnp.float32)


def tokens(batch) -> int:
    return int(batch["attention_mask"].sum())


def iterators(c, tokenizer):
    kw = dict(seq_len=c.train.seq_len, template=c.data.template, format=fmt(c),
              skip_bad_rows=c.data.skip_bad_rows, global_batch_size=c.train.batch_size,
              num_responses=c.rrhf.num_responses or None)
    train = rrhf_iterator(setup.data_source(c, "rrhf", "train"), tokenizer, **kw,
                          **iter_kwargs(c, "train"))
    src = setup.data_source(c, "rrhf", "eval")
    if src is None:
        return train, None
    # eval batches must have the training N (same array shapes)
    n = train.collate(train.items[:1])["input_ids"].shape[1]
    ev = rrhf_iterator(src, tokenizer, **{**kw, "num_responses": n}, **iter_kwargs(c, "eval"))
    return train, ev


def check_config(r) -> None:
    if r.length_penalty < 0:
        raise ValueError(f"config rrhf.length_penalty: must be >= 0, got {r.length_penalty}")
    if r.rank_weight < 0:
        raise ValueError(f"config rrhf.rank_weight: must be >= 0, got {r.rank_weight}")
    if r.num_responses < 0:
        raise ValueError(f"config rrhf.num_responses: must be >= 0 (0 = the most in the data), "
                         f"got {r.num_responses}")


def build_task(env: loop.Env) -> loop.Task:
    c = env.config
    train, ev = iterators(c, env.tokenizer)
    return loop.Task(kind="causal_lm", loss_fn=make_loss(env.model_config, c.rrhf),
                     denom_fn=denom, train_data=train, eval_data=ev, tokens_fn=tokens)


PLAN_RESPONSES = 4  # responses per prompt the planner assumes when rrhf.num_responses = 0


def batch_spec(c, rows: int) -> dict:
    """The global batch `iterators` produce: N responses per prompt (rrhf.num_responses, or
    PLAN_RESPONSES when the data decides)."""
    n, t = int(c.rrhf.num_responses) or PLAN_RESPONSES, int(c.train.seq_len)
    b = {k: jax.ShapeDtypeStruct((rows, n, t), jnp.int32)
         for k in ("input_ids", "attention_mask", "loss_mask")}
    b.update(valid=jax.ShapeDtypeStruct((rows, n), jnp.int32),
             scores=jax.ShapeDtypeStruct((rows, n), jnp.float32))
    return b


ALGORITHM = Algorithm(
    command="rrhf", help="rank responses to align with human feedback (RRHF)", loop="supervised",
    order=40, check_config=lambda c: check_config(c.rrhf), build_task=build_task,
    make_loss=lambda c, cfg, adapters_off=False: make_loss(cfg, c.rrhf), denom=denom,
    batch_spec=batch_spec)
train = ALGORITHM.train
