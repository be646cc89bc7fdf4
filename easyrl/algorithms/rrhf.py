"""RRHF: rank N scored responses per prompt by length-normalized log-likelihood, plus SFT on the
best-scored one (Yuan et al. 2023, "RRHF: Rank Responses to Align Language Models with Human
Feedback without tears").

All N responses of the B prompts go through one forward ([B, N, T] -> [B*N, T]). Per response:
the summed log-prob over its response tokens and its TRUE length (loss-mask count, not the
padded length). p_i = logp_i / len_i ** rrhf.length_penalty; loss = rrhf.rank_weight *
sum over pairs (score_i < score_j) relu(p_i - p_j) + mean-token NLL of the best response, each
averaged over prompts (`easyrl.losses.rrhf_loss`). Loss and metrics are sums over the
micro-batch's prompts divided by the number of prompts in the global batch.

Metrics: loss/rank, loss/sft, rank_pairs (ordered pairs per prompt), rank_acc (per-prompt fraction
of ordered pairs the model already ranks right, averaged over prompts), logps/best and
logps/worst (mean per-token log-prob of the best- / worst-scored response).
"""
from __future__ import annotations

import jax.numpy as jnp

from easyrl import losses
from easyrl.algorithms.common import fmt, iter_kwargs
from easyrl.algorithms.dpo import response_logps
from easyrl.data.iterator import rrhf_iterator
from easyrl.train import loop, setup


def response_stats(config, params, batch, rng=None):
    """(logp sums [B, N], true lengths [B, N]) of every response, one forward of B*N rows."""
    b, n, t = batch["input_ids"].shape
    flat = lambda k: batch[k].reshape(b * n, t)  # noqa: E731
    lp, length = response_logps(config, params, flat("input_ids"), flat("attention_mask"),
                                flat("loss_mask"), rng=rng)
    return lp.reshape(b, n), length.reshape(b, n)


def _pick(x, scores, valid, best: bool):
    s = jnp.where(valid, scores, -jnp.inf if best else jnp.inf)
    i = jnp.argmax(s, axis=-1) if best else jnp.argmin(s, axis=-1)
    return jnp.take_along_axis(x, i[:, None], axis=-1)[:, 0]


def make_loss(config, r):
    """Loss for config section `r` (= c.rrhf)."""
    def loss_fn(params, frozen, batch, rng, denom):
        lp, length = response_stats(config, params, batch, rng)
        valid = batch["valid"] > 0
        scores = batch["scores"]
        loss, m = losses.rrhf_loss(lp, length, scores, valid, -lp,
                                   length_penalty=r.length_penalty, rank_weight=r.rank_weight)
        b = lp.shape[0]
        # per-prompt quantities, summed over the micro-batch (÷ denom = prompts in the batch)
        safe = jnp.maximum(length, 1)
        p = lp / safe ** r.length_penalty
        pair = valid[:, :, None] & valid[:, None, :] & (scores[:, :, None] < scores[:, None, :])
        n_pairs = jnp.sum(pair, axis=(1, 2))
        right = jnp.sum(pair & (p[:, :, None] < p[:, None, :]), axis=(1, 2))
        has = jnp.any(valid, axis=-1)
        tok = lp / safe
        metrics = {
            "loss/rank": m["loss/rank"] * b / denom,
            "loss/sft": m["loss/sft"] * b / denom,
            "rank_pairs": jnp.sum(n_pairs) / denom,
            "rank_acc": jnp.sum(right / jnp.maximum(n_pairs, 1)) / denom,
            "logps/best": jnp.sum(jnp.where(has, _pick(tok, scores, valid, True), 0)) / denom,
            "logps/worst": jnp.sum(jnp.where(has, _pick(tok, scores, valid, False), 0)) / denom,
        }
        return loss * b / denom, metrics
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
    check_config(c.rrhf)
    train, ev = iterators(c, env.tokenizer)
    return loop.Task(kind="causal_lm", loss_fn=make_loss(env.model_config, c.rrhf),
                     denom_fn=denom, train_data=train, eval_data=ev, tokens_fn=tokens)


def train(c) -> dict:
    check_config(c.rrhf)
    return loop.run(c, build_task, init_kind="causal_lm")
