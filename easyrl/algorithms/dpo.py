"""Direct preference optimization (DPO) and its variants: every TRL `DPOTrainer.dpo_loss` loss type
that is a formula over the four log-probs (sigmoid (+ label smoothing), robust, hinge, IPO,
EXO, NCA, BCO, SPPO, AOT, APO, DiscoPOP) and the chosen NLL, a weighted sum of several
(`dpo.loss_type=a,b` with `dpo.loss_weights=w_a,w_b`), and the RPO term (`dpo.rpo_alpha`), with a
live frozen reference or precomputed reference log-probs.

Log-probs are sums of token log-probs over response tokens (`loss_mask`; prompt and pad
excluded), chosen and rejected in one forward of 2B rows. The reference is either

* live: a copy of the initial policy parameters, passed to the loss as `Task.frozen` (sharded
  like the policy, never trained, no optimizer state); with LoRA (`model.lora.rank > 0`) no copy
  at all: the reference is the policy's own parameters applied with the adapters off (the
  frozen base), or
* precomputed (`dpo.precompute_ref=True`): before training, one jitted pass of the initial
  policy over the training and eval examples stores each example's reference log-probs in the
  example (batch keys `ref_chosen_logps`, `ref_rejected_logps` [B]), so no reference model is held
  during training. The iterator's position stays the plain `{epoch, index}`: on resume the pass
  is recomputed from the same initial parameters and gives the same values.

With `dpo.reference_free` the reference terms are 0. Metrics (TRL names): rewards/chosen,
rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected (each a sum
over pairs / pairs in the global batch), `nll_loss` with rpo_alpha > 0, `loss/<type>` per loss
type when several are combined, and their `eval/` versions on data.eval.

Batch-level loss types (bco_pair's reward shift, aot's sorting, the chosen NLL of sft and
rpo_alpha) see one micro-batch (`train.micro_batch_size` pairs, the whole global batch without
accumulation) across all devices: their value depends on the accumulation split, as TRL's does on
its per-device batch.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from easyrl import losses
from easyrl.algorithms.common import (attach_reference, live_reference, pair_batch_spec, pair_denom,
                                      pair_iterators, pair_logps, pair_tokens, reference_logps,
                                      reference_of)
from easyrl.algorithms.registry import Algorithm
from easyrl.train import loop

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def loss_options(d) -> dict:
    """dpo_losses keyword arguments of config section `d` (loss_weights, rpo_alpha and
    discopop_tau take configs/dpo.py's defaults where the section lacks them)."""
    return dict(beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
                reference_free=d.reference_free, loss_weights=d.get("loss_weights", ""),
                rpo_alpha=float(d.get("rpo_alpha", 0.0)),
                discopop_tau=float(d.get("discopop_tau", 0.05)))


def objective(d, pc, pr, rc, rr, lc, lr, denom):
    """(loss, metrics) as sums over the pairs / `denom` from policy log-probs pc, pr, reference
    log-probs rc, rr (None when reference_free) and response lengths lc, lr, all [B]."""
    opts = loss_options(d)
    per_pair, r_c, r_r, terms = losses.dpo_losses(pc, pr, rc, rr, chosen_lengths=lc,
                                                  rejected_lengths=lr, return_terms=True, **opts)
    means = losses.dpo_metrics(r_c, r_r, pc, pr)  # batch means -> sums / global pairs
    if len(losses.parse_loss_types(opts["loss_type"])) > 1:
        means.update({k: jnp.mean(v) for k, v in terms.items() if k.startswith("loss/")})
    if "nll_loss" in terms:
        means["nll_loss"] = jnp.mean(terms["nll_loss"])
    means = {k: jax.lax.stop_gradient(v) for k, v in means.items()}
    b = pc.shape[0]
    return jnp.sum(per_pair) / denom, {k: v * b / denom for k, v in means.items()}


def make_loss(config, d, adapters_off_reference: bool = False, frozen_adapters: bool = False):
    """Loss for config section `d` (= c.dpo). The reference comes from the batch
    (precompute_ref), from `frozen` (live: a copy of the initial policy), from the policy's own
    parameters with the LoRA adapters off (`adapters_off_reference`: no copy of the weights),
    from its base with the frozen initial adapters in `frozen` (`frozen_adapters`: LoRA
    continuing model.lora.init_from; a copy of the adapter leaves only) or is 0
    (reference_free). The reference is the initial policy in every mode."""
    if (adapters_off_reference or frozen_adapters) and config.lora_rank <= 0:
        raise ValueError("adapters_off_reference / frozen_adapters need a LoRA model "
                         "(model.lora.rank > 0)")
    mode = ("frozen_adapters" if frozen_adapters else "adapters_off" if adapters_off_reference
            else "copy")

    def loss_fn(params, frozen, batch, rng, denom):
        pc, pr, lc, lr = pair_logps(config, params, batch, rng)
        if d.reference_free:
            rc = rr = None
        elif d.precompute_ref:
            rc, rr = (batch[k].astype(pc.dtype) for k in REF_KEYS)
        else:
            rcfg, ref = reference_of(config, mode, params, frozen)
            rc, rr, _, _ = jax.lax.stop_gradient(pair_logps(rcfg, ref, batch))
        return objective(d, pc, pr, rc, rr, lc, lr, denom)
    return loss_fn


# ----------------------------------------------------------------------------- reference
def precompute_reference(env: loop.Env, iterators) -> None:
    """One jitted pass of the initial policy over each iterator's examples."""
    c = env.config
    chunk = c.train.micro_batch_size or c.train.batch_size
    fn = jax.jit(lambda p, b: pair_logps(env.model_config, p, b)[:2])
    for it in iterators:
        if it is not None:
            attach_reference(it, REF_KEYS, reference_logps(it, fn, env.params, env.mesh, chunk))


# ----------------------------------------------------------------------------- wiring
def check_loss_types(d, section: str = "dpo") -> None:
    """`<section>.loss_type` (one or several DPO loss types) and its `loss_weights`."""
    try:
        kinds = losses.parse_loss_types(d.loss_type)
    except ValueError as e:
        raise ValueError(f"config {section}.loss_type: {e}") from None
    try:
        losses.parse_loss_weights(d.get("loss_weights", ""), len(kinds))
    except ValueError as e:
        raise ValueError(f"config {section}.loss_weights: {e} ({section}.loss_type="
                         f"{d.loss_type!r})") from None


def check_config(d) -> None:
    check_loss_types(d)
    rpo = d.get("rpo_alpha", 0.0)
    if not (isinstance(rpo, (int, float)) and math.isfinite(rpo) and rpo >= 0):
        raise ValueError(f"config dpo.rpo_alpha: must be a finite number >= 0 (0 = off), "
                         f"got {rpo!r}")
    tau = d.get("discopop_tau", 0.05)
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"config dpo.discopop_tau: must be positive, got {tau!r}")
    if d.beta <= 0:
        raise ValueError(f"config dpo.beta: must be positive, got {d.beta}")
    if not 0.0 <= d.label_smoothing < 0.5:
        raise ValueError(f"config dpo.label_smoothing: must be in [0, 0.5), got {d.label_smoothing}")


def build_task(env: loop.Env) -> loop.Task:
    c = env.config
    d = c.dpo
    check_config(d)
    train, ev = pair_iterators(c, env.tokenizer)
    frozen, mode = None, "copy"
    if not d.reference_free:
        if d.precompute_ref:
            precompute_reference(env, (train, ev))
        else:
            frozen, mode = live_reference(env)
    return loop.Task(kind="causal_lm", loss_fn=make_loss(env.model_config, d,
                                                         mode == "adapters_off",
                                                         mode == "frozen_adapters"),
                     denom_fn=pair_denom, train_data=train, eval_data=ev, frozen=frozen,
                     tokens_fn=pair_tokens)


def batch_spec(c, rows: int) -> dict:
    """The global batch `pair_iterators` produce (plus the precomputed reference log-probs)."""
    b = pair_batch_spec(rows, int(c.train.seq_len))
    if c.dpo.precompute_ref and not c.dpo.reference_free:
        b.update({k: jax.ShapeDtypeStruct((rows,), jnp.float32) for k in REF_KEYS})
    return b


ALGORITHM = Algorithm(
    command="dpo", help="direct preference optimization (sigmoid / IPO / ... TRL loss types, RPO)",
    loop="supervised", order=30, check_config=lambda c: check_config(c.dpo),
    build_task=build_task, make_loss=lambda c, cfg, adapters_off=False: make_loss(cfg, c.dpo, adapters_off),
    denom=pair_denom, batch_spec=batch_spec)
train = ALGORITHM.train
