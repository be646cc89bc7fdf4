"""KTO: Kahneman-Tversky optimization from unpaired thumbs-up / thumbs-down data (Ethayarajh et
al. 2024; TRL `KTOTrainer`). Formulas in `easyrl.losses.kto` and docs/algorithms.md ("KTO").

Rows are `prompt` / `completion` / `label` (true = desirable); paired preference data is
unpaired automatically (chosen -> true, rejected -> false; `easyrl.data.iterator.
unpaired_iterator`). Every example carries a KL row: its prompt with another example's
completion (TRL's mismatched pairs, fixed per example), whose policy and reference log-probs
give the reference point z = max(0, mean(logp - logp_ref)) (no gradient; none with
kto.loss_type=apo_zero_unpaired). Per example, r = logp - logp_ref:
desirable w_d (1 - sig(beta (r - z))), undesirable w_u (1 - sig(beta (z - r))); the loss is
their mean over the examples (TRL `losses.nanmean()`).

The reference is the initial policy, as for DPO: a frozen copy, the LoRA base with the adapters
off, the base with a frozen loaded adapter, or (kto.precompute_ref) log-probs computed once
before training and stored per example (batch keys `ref_logps`, `ref_kl_logps`).

z is a batch statistic: it is the mean over one micro-batch (`train.micro_batch_size`
examples across all devices; the whole global batch without accumulation), as TRL's is over its
per-step batch gathered across processes, so the loss depends on the accumulation split through
z alone (while z = 0, e.g. at the first step, the split does not matter). Everything else is a
sum over the micro-batch divided by global counts: the mean loss by the examples, the class
means (TRL: rewards/chosen, rewards/rejected, logps/chosen, logps/rejected) by each class's
examples in the global batch. Metrics: kl (z, averaged over micro-batches), rewards/margins
(rewards/chosen - rewards/rejected), count/chosen, count/rejected, and their `eval/` versions.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from easyrl import losses
from easyrl.algorithms.common import (attach_reference, fmt, iter_kwargs, live_reference,
                                      reference_logps, reference_of, response_logps)
from easyrl.algorithms.registry import Algorithm
from easyrl.data.iterator import unpaired_iterator
from easyrl.train import loop, setup

log = logging.getLogger(__name__)
REF_KEYS = ("ref_logps", "ref_kl_logps")
ROWS = ("completion", "kl")


def needs_kl(k) -> bool:
    return k.loss_type == "kto"


def example_logps(config, params, batch, rows=ROWS, rng=None):
    """Summed response log-probs [B] of each of `rows` (completion: the example, kl: its
    mismatched KL row), from one forward of len(rows) x B rows."""
    ids = jnp.concatenate([batch[f"{r}_input_ids"] for r in rows], axis=0)
    attn = jnp.concatenate([batch[f"{r}_attention_mask"] for r in rows], axis=0)
    mask = jnp.concatenate([batch[f"{r}_loss_mask"] for r in rows], axis=0)
    lp, _ = response_logps(config, params, ids, attn, mask, rng)
    b = batch[f"{rows[0]}_input_ids"].shape[0]
    return tuple(lp[i * b:(i + 1) * b] for i in range(len(rows)))


def denom(batch):
    """Global counts: examples, desirable and undesirable examples."""
    lab = batch["label"].astype(jnp.float32)
    n = jnp.asarray(lab.shape[0], jnp.float32)
    return {"rows": n, "chosen": jnp.sum(lab), "rejected": n - jnp.sum(lab)}


def make_loss(config, k, mode: str = "copy"):
    """Loss for config section `k` (= c.kto); the reference per `mode` (common.live_reference:
    copy | adapters_off | frozen_adapters), or from the batch with k.precompute_ref."""
    with_kl = needs_kl(k)

    def loss_fn(params, frozen, batch, rng, denom):
        (lp,) = example_logps(config, params, batch, ("completion",), rng)
        rows = ROWS if with_kl else ("completion",)
        if with_kl:  # the policy's KL-row log-probs carry no gradient (TRL: torch.no_grad)
            (kl_lp,) = jax.lax.stop_gradient(example_logps(config, params, batch, ("kl",), rng))
        if k.precompute_ref:
            ref = [batch[r].astype(lp.dtype) for r in REF_KEYS[:len(rows)]]
        else:
            rcfg, rparams = reference_of(config, mode, params, frozen)
            ref = jax.lax.stop_gradient(example_logps(rcfg, rparams, batch, rows))
        label = batch["label"]
        z = losses.kto_kl(kl_lp, ref[1]) if with_kl else jnp.zeros((), lp.dtype)
        per, rewards = losses.kto_losses(lp, ref[0], label, z, beta=k.beta,
                                         desirable_weight=k.desirable_weight,
                                         undesirable_weight=k.undesirable_weight,
                                         loss_type=k.loss_type)
        s = losses.kto_metric_sums(rewards, jax.lax.stop_gradient(lp), label)
        b = lp.shape[0]
        chosen = s["rewards/chosen_sum"] / denom["chosen"]
        rejected = s["rewards/rejected_sum"] / denom["rejected"]
        metrics = {
            "kl": z * b / denom["rows"],
            "rewards/chosen": chosen, "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected,
            "logps/chosen": s["logps/chosen_sum"] / denom["chosen"],
            "logps/rejected": s["logps/rejected_sum"] / denom["rejected"],
            "count/chosen": s["count/chosen"], "count/rejected": s["count/rejected"],
        }
        return jnp.sum(per) / denom["rows"], metrics
    return loss_fn


def tokens(batch) -> int:
    return int(sum(batch[f"{r}_attention_mask"].sum() for r in ROWS))


# ----------------------------------------------------------------------------- wiring
def iterators(c, tokenizer):
    kw = dict(seq_len=c.train.seq_len, template=c.data.template, format=fmt(c),
              skip_bad_rows=c.data.skip_bad_rows, global_batch_size=c.train.batch_size)
    train = unpaired_iterator(setup.data_source(c, "preference", "train"), tokenizer, **kw,
                              **iter_kwargs(c, "train"))
    src = setup.data_source(c, "preference", "eval")
    ev = None if src is None else unpaired_iterator(src, tokenizer, **kw, **iter_kwargs(c, "eval"))
    return train, ev


def weight_advice(k, n_desirable: int, n_undesirable: int):
    """TRL KTOTrainer's check (bounds from Eq. 8 of the KTO paper): with unequal class counts,
    the desirable weight should lie in [1, 1.33] x n_u w_u / n_d, or the undesirable weight in
    [1/1.33, 1] x n_d w_d / n_u. Returns the warning text, or None when either is in range.
    With no example of one class no weight helps: the text says that and what to check."""
    if n_desirable == 0 or n_undesirable == 0:
        none, label = ("undesirable", "false") if n_undesirable == 0 else ("desirable", "true")
        return (f"kto: {n_desirable} desirable and {n_undesirable} undesirable examples: with no "
                f"{none} example no kto.desirable_weight / kto.undesirable_weight can balance the "
                f"classes; KTO learns from both (rows with label {label}; check data.columns "
                f"maps your label column, or use paired data, whose rejected answers are the "
                f"undesirable ones)")
    nd, nu = n_desirable, n_undesirable
    if nd == nu:
        return None
    d_lo, d_hi = round(nu * k.undesirable_weight / nd, 2), round(nu * k.undesirable_weight / nd * 1.33, 2)
    u_lo, u_hi = round(nd * k.desirable_weight / nu / 1.33, 2), round(nd * k.desirable_weight / nu, 2)
    if d_lo <= k.desirable_weight <= d_hi or u_lo <= k.undesirable_weight <= u_hi:
        return None
    return (f"kto: {n_desirable} desirable vs {n_undesirable} undesirable examples, and "
            f"kto.desirable_weight={k.desirable_weight}, kto.undesirable_weight="
            f"{k.undesirable_weight} are outside the recommended range (TRL, KTO paper Eq. 8): "
            f"set kto.desirable_weight in [{d_lo}, {d_hi}] or kto.undesirable_weight in "
            f"[{u_lo}, {u_hi}] (not both)")


def check_config(k) -> None:
    if k.loss_type not in losses.KTO_LOSS_TYPES:
        raise ValueError(f"config kto.loss_type: {k.loss_type!r}; valid: "
                         f"{', '.join(losses.KTO_LOSS_TYPES)}")
    if not k.beta > 0:
        raise ValueError(f"config kto.beta: must be positive, got {k.beta}")
    for key in ("desirable_weight", "undesirable_weight"):
        if not k[key] > 0:
            raise ValueError(f"config kto.{key}: must be positive, got {k[key]}")


def build_task(env: loop.Env) -> loop.Task:
    c = env.config
    k = c.kto
    check_config(k)
    train, ev = iterators(c, env.tokenizer)
    advice = weight_advice(k, train.stats.get("num_desirable", 0),
                           train.stats.get("num_undesirable", 0))
    if advice and jax.process_index() == 0:
        log.warning(advice)
    frozen, mode = None, "copy"
    if k.precompute_ref:
        chunk = c.train.micro_batch_size or c.train.batch_size
        rows = ROWS if needs_kl(k) else ("completion",)
        fn = jax.jit(lambda p, b: example_logps(env.model_config, p, b, rows))
        for it in (train, ev):
            if it is not None:
                attach_reference(it, REF_KEYS[:len(rows)],
                                 reference_logps(it, fn, env.params, env.mesh, chunk))
    else:
        frozen, mode = live_reference(env)
    return loop.Task(kind="causal_lm", loss_fn=make_loss(env.model_config, k, mode),
                     denom_fn=denom, train_data=train, eval_data=ev, frozen=frozen,
                     tokens_fn=tokens)


def batch_spec(c, rows: int) -> dict:
    """The global batch `iterators` produce (plus the precomputed reference log-probs)."""
    t = int(c.train.seq_len)
    b = {f"{r}_{key}": jax.ShapeDtypeStruct((rows, t), jnp.int32) for r in ROWS
         for key in ("input_ids", "attention_mask", "loss_mask")}
    b["label"] = jax.ShapeDtypeStruct((rows,), jnp.int32)
    if c.kto.precompute_ref:
        b.update({key: jax.ShapeDtypeStruct((rows,), jnp.float32) for key in REF_KEYS})
    return b


def _plan_loss(c, cfg, adapters_off=False):
    return make_loss(cfg, c.kto, "adapters_off" if adapters_off else "copy")


ALGORITHM = Algorithm(
    command="kto", help="Kahneman-Tversky optimization from unpaired good / bad labels (KTO)",
    loop="supervised", order=32, check_config=lambda c: check_config(c.kto),
    build_task=build_task, make_loss=_plan_loss, denom=denom, batch_spec=batch_spec)
train = ALGORITHM.train
