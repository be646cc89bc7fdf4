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
from easyrl.algorithms.common import fmt, iter_kwargs
from easyrl.data.iterator import preference_iterator
from easyrl.train import loop, setup

SIDES = ("chosen", "rejected")


def pair_inputs(batch: dict):
    """[2B, T] input_ids and attention_mask: chosen rows first, then rejected rows."""
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]], axis=0)
    attn = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]], axis=0)
    return ids, attn


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


def denom(batch):
    """Number of pairs in the whole global batch."""
    return jnp.asarray(batch["chosen_input_ids"].shape[0], jnp.float32)


def tokens(batch) -> int:
    return int(sum(batch[f"{s}_attention_mask"].sum() for s in SIDES))


def iterators(c, tokenizer, kind: str = "preference"):
    """(train, eval or None) preference iterators from data.train / data.eval."""
    kw = dict(seq_len=c.train.seq_len, template=c.data.template, format=fmt(c),
              skip_bad_rows=c.data.skip_bad_rows, global_batch_size=c.train.batch_size)
    train = preference_iterator(setup.data_source(c, kind, "train"), tokenizer, **kw,
                                **iter_kwargs(c, "train"))
    src = setup.data_source(c, kind, "eval")
    ev = None if src is None else preference_iterator(src, tokenizer, **kw, **iter_kwargs(c, "eval"))
    return train, ev


def build_task(env: loop.Env) -> loop.Task:
    c = env.config
    train, ev = iterators(c, env.tokenizer)
    return loop.Task(kind="reward", loss_fn=make_loss(env.model_config, c.rm.use_margin),
                     denom_fn=denom, train_data=train, eval_data=ev, tokens_fn=tokens)


def train(c) -> dict:
    # an HF causal-LM folder as model.path gets a fresh N(0, 1/(D+1)) score head
    return loop.run(c, build_task, init_kind="reward", init_missing_head=True)
