"""Supervised fine-tuning: token-level mean cross-entropy over completion tokens."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from easyrl import losses, parallel
from easyrl import model as M
from easyrl.algorithms.common import fmt, iter_kwargs, lm_hidden
from easyrl.algorithms.registry import Algorithm
from easyrl.data.iterator import sft_iterator
from easyrl.train import loop, setup


def make_loss(config):
    """Token-level cross-entropy with the LM head fused into it (`losses.lm_head_loss_sums`):
    logits exist for one chunk of positions at a time, never as a whole [B, T, V] array."""
    def loss_fn(params, frozen, batch, rng, denom):
        hidden = lm_hidden(config, params, batch, rng=rng)
        targets = batch.get("labels", batch["input_ids"])  # labels: optional explicit targets
        chunk = max(1, losses.LM_HEAD_CHUNK_TOKENS // parallel.local_rows(hidden.shape[0]))
        s = losses.lm_head_loss_sums(hidden, M.lm_head_kernel(config, params), targets,
                                     batch["loss_mask"], chunk=chunk)
        return s["nll_sum"] / denom, {"accuracy": s["correct_sum"] / denom}
    return loss_fn


def denom(batch):
    """Target tokens in the whole global batch (column 0 is never a target)."""
    return jnp.sum(batch["loss_mask"][:, 1:])


def iterators(c, tokenizer):
    kw = dict(seq_len=c.train.seq_len, template=c.data.template, packing=c.data.packing,
              format=fmt(c), skip_bad_rows=c.data.skip_bad_rows)
    train = sft_iterator(setup.data_source(c, "sft", "train"), tokenizer,
                         global_batch_size=c.train.batch_size, **kw, **iter_kwargs(c, "train"))
    src = setup.data_source(c, "sft", "eval")
    ev = None if src is None else sft_iterator(src, tokenizer, global_batch_size=c.train.batch_size,
                                               **kw, **iter_kwargs(c, "eval"))
    return train, ev


def batch_spec(c, rows: int) -> dict:
    """The global batch `iterators` produce, as ShapeDtypeStructs (the planner compiles with it)."""
    keys = ("input_ids", "attention_mask", "loss_mask", "positions", "segment_ids")  # packed or not
    return {k: jax.ShapeDtypeStruct((rows, int(c.train.seq_len)), jnp.int32) for k in keys}


def build_task(env: loop.Env) -> loop.Task:
    train, ev = iterators(env.config, env.tokenizer)
    return loop.Task(kind="causal_lm", loss_fn=make_loss(env.model_config), denom_fn=denom,
                     train_data=train, eval_data=ev)


ALGORITHM = Algorithm(
    command="sft", help="supervised fine-tuning", loop="supervised", order=10,
    build_task=build_task, make_loss=lambda c, cfg, adapters_off=False: make_loss(cfg),
    denom=denom, batch_spec=batch_spec)
train = ALGORITHM.train
