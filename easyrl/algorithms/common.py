"""Pieces the algorithm files share: iterator arguments, the hidden-state forward, response
log-probs, and the preference-pair helpers (the reward model, the DPO family and any other
pairwise trainer batch chosen and rejected rows the same way)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from easyrl import losses
from easyrl import model as M
from easyrl.data.iterator import preference_iterator
from easyrl.train import setup
from easyrl.train.step import split_micro

SIDES = ("chosen", "rejected")


def iter_kwargs(c, split: str) -> dict:
    train = split == "train"
    return dict(seed=c.seed, shuffle=bool(c.data.shuffle) and train,
                num_epochs=None, process_index=jax.process_index(),
                process_count=jax.process_count())


def fmt(c):
    return c.data.format or None


def lm_hidden(config, params, batch, prefix: str = "", rng=None):
    """Final normed hidden states [B, T, D] of a right-padded / packed batch (positions and
    segments when present), without the LM head (`losses.lm_head_loss_sums` applies it fused
    with the cross-entropy). `rng`: LoRA adapter dropout key (training)."""
    g = lambda k: batch.get(prefix + k)  # noqa: E731
    return M.hidden_states(config, params, g("input_ids"), g("attention_mask"),
                           positions=g("positions"), segment_ids=g("segment_ids"), rng=rng)


def response_logps(config, params, input_ids, attention_mask, loss_mask, rng=None):
    """(summed response log-probs [B], response lengths [B]) of right-padded rows [B, T]."""
    logits = M.forward(config, params, input_ids, attention_mask, rng=rng)
    lp = losses.token_logprobs(logits, input_ids)
    mask = loss_mask.at[:, 0].set(0)  # column 0 has no predictor
    return losses.masked_sum(lp, mask, axis=-1), jnp.sum(mask, axis=-1).astype(lp.dtype)


# ---- preference pairs ----------------------------------------------------------------------
def pair_inputs(batch: dict):
    """[2B, T] input_ids and attention_mask: chosen rows first, then rejected rows."""
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]], axis=0)
    attn = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]], axis=0)
    return ids, attn


def pair_logps(config, params, batch, rng=None):
    """(logp_chosen, logp_rejected, len_chosen, len_rejected), all [B], from one 2B-row forward."""
    ids, attn = pair_inputs(batch)
    mask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]], axis=0)
    lp, n = response_logps(config, params, ids, attn, mask, rng)
    b = batch["chosen_input_ids"].shape[0]
    return lp[:b], lp[b:], n[:b], n[b:]


def pair_logps_with_chosen_nll(config, params, batch, rng=None):
    """`pair_logps` plus the summed log-probs of every attended token of the chosen rows
    (prompt + response, column 0 excepted: it has no predictor), from the same forward: the
    chosen NLL of TRL's ORPOTrainer ("orpo chosen nll loss is computed over the full prompt and
    response", trl/experimental/orpo/orpo_trainer.py ``concatenated_forward``)."""
    ids, attn = pair_inputs(batch)
    mask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]], axis=0)
    logits = M.forward(config, params, ids, attn, rng=rng)
    lp = losses.token_logprobs(logits, ids)
    mask = mask.at[:, 0].set(0)
    seq, n = losses.masked_sum(lp, mask, axis=-1), jnp.sum(mask, axis=-1).astype(lp.dtype)
    b = batch["chosen_input_ids"].shape[0]
    full = losses.masked_sum(lp[:b], attn[:b].at[:, 0].set(0), axis=-1)
    return seq[:b], seq[b:], n[:b], n[b:], full


def pair_denom(batch):
    """Number of pairs in the whole global batch."""
    return jnp.asarray(batch["chosen_input_ids"].shape[0], jnp.float32)


def pair_nll_denom(batch):
    """{pairs, chosen_tokens, chosen_all_tokens} of the whole global batch: the normalizers of a
    pair loss plus a token-mean NLL of the chosen responses (CPO; ORPO with
    orpo.nll_tokens=response) or of the chosen prompt + response (ORPO's default, as TRL), so
    each is split-invariant."""
    m = batch["chosen_loss_mask"][:, 1:]  # column 0 has no predictor (response_logps)
    a = batch["chosen_attention_mask"][:, 1:]  # prompt + response (ORPO's NLL, as TRL)
    return {"pairs": pair_denom(batch), "chosen_tokens": jnp.sum(m).astype(jnp.float32),
            "chosen_all_tokens": jnp.sum(a).astype(jnp.float32)}


def pair_metrics(r_c, r_r, lp_c, lp_r, pairs) -> dict:
    """TRL's pair metrics as sums over the micro-batch / the global `pairs` (rewards/*, logps/*);
    all without gradient."""
    sg = jax.lax.stop_gradient
    m = {"rewards/chosen": r_c, "rewards/rejected": r_r,
         "rewards/accuracies": (r_c > r_r).astype(r_c.dtype), "rewards/margins": r_c - r_r,
         "logps/chosen": lp_c, "logps/rejected": lp_r}
    return {k: jnp.sum(sg(v)) / pairs for k, v in m.items()}


def pair_tokens(batch) -> int:
    return int(sum(batch[f"{s}_attention_mask"].sum() for s in SIDES))


def pair_iterators(c, tokenizer, kind: str = "preference"):
    """(train, eval or None) preference iterators from data.train / data.eval."""
    kw = dict(seq_len=c.train.seq_len, template=c.data.template, format=fmt(c),
              skip_bad_rows=c.data.skip_bad_rows, global_batch_size=c.train.batch_size)
    train = preference_iterator(setup.data_source(c, kind, "train"), tokenizer, **kw,
                                **iter_kwargs(c, "train"))
    src = setup.data_source(c, kind, "eval")
    ev = None if src is None else preference_iterator(src, tokenizer, **kw, **iter_kwargs(c, "eval"))
    return train, ev


def pair_batch_spec(rows: int, seq_len: int) -> dict:
    """ShapeDtypeStructs of a global batch of `rows` pairs as `pair_iterators` produce it."""
    b = {f"{side}_{k}": jax.ShapeDtypeStruct((rows, seq_len), jnp.int32) for side in SIDES
         for k in ("input_ids", "attention_mask", "loss_mask")}
    b["margin"] = jax.ShapeDtypeStruct((rows,), jnp.float32)  # 0 where the data has none
    return b


# ---- the frozen reference of the supervised trainers (DPO, KTO) ----------------------------
REFERENCE_MODES = ("copy", "adapters_off", "frozen_adapters")


def frozen_copy(params):
    """A distinct, identically sharded copy of `params` (the train state is donated)."""
    sh = jax.tree.map(lambda x: x.sharding, params)
    return jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=sh)(params)


def live_reference(env):
    """(frozen, mode) of a live reference = the initial policy: `copy` (frozen = a copy of the
    params), with LoRA `adapters_off` (frozen None: the policy's own base, adapters off; no
    copy of the weights) or, continuing a loaded adapter (model.lora.init_from),
    `frozen_adapters` (frozen = a copy of that adapter, applied on the policy's base)."""
    from easyrl.model.trainable import adapters
    if env.model_config.lora_rank > 0 and env.config.model.lora.init_from:
        return frozen_copy(adapters(env.params)), "frozen_adapters"
    if env.model_config.lora_rank > 0:
        return None, "adapters_off"
    return frozen_copy(env.params), "copy"


def reference_of(config, mode: str, params, frozen):
    """(model config, params) of the reference in `mode` (see `live_reference`), inside a loss."""
    from easyrl.model.lora import disabled
    from easyrl.model.trainable import combine, strip
    if mode == "frozen_adapters":
        return config, combine(frozen, strip(params))
    if mode == "adapters_off":
        return disabled(config), params
    return config, frozen


def reference_logps(it, logps_fn, params, mesh, chunk: int) -> tuple:
    """Reference log-probs of every example of iterator `it` (one float32 array [len(items)] per
    output of `logps_fn(params, global batch)`), in global batches of `chunk` examples (the last
    one padded by repeating example 0). Every process holds all items and feeds its slice of
    each chunk; results are gathered to all."""
    import numpy as np
    from jax.experimental import multihost_utils

    from easyrl import parallel
    n = len(it.items)
    outs = None
    nproc, pid = jax.process_count(), jax.process_index()
    local = chunk // nproc
    for start in range(0, n, chunk):
        idx = list(range(start, min(start + chunk, n)))
        idx += [0] * (chunk - len(idx))
        batch = it.collate([it.items[i] for i in idx[pid * local:(pid + 1) * local]])
        batch = {k: v for k, v in batch.items() if isinstance(v, np.ndarray)
                 and not k.startswith("ref_")}
        vals = logps_fn(params, parallel.to_global_batch(batch, mesh))
        if nproc > 1:
            vals = multihost_utils.process_allgather(vals, tiled=True)
        vals = [np.asarray(v) for v in vals]
        if outs is None:
            outs = [np.zeros(n, np.float32) for _ in vals]
        m = min(chunk, n - start)
        for o, v in zip(outs, vals):
            o[start:start + m] = v[:m]
    return tuple(outs)


def attach_reference(it, keys, values) -> None:
    """Store reference log-probs (`values`, one array per key) in the iterator's examples under
    `keys` and add them to its batches (float32 [B])."""
    import numpy as np
    for i, ex in enumerate(it.items):
        for k, v in zip(keys, values):
            ex[k] = float(v[i])
    base = it.collate

    def collate(items):
        batch = base(items)
        for k in keys:
            batch[k] = np.array([ex[k] for ex in items], np.float32)
        return batch

    it.collate = collate


# ---- the online trainers: chunked passes, the frozen reference -----------------------------
def chunked(fn, n_chunks: int, *arrays):
    """fn over `n_chunks` interleaved row chunks (lax.map: one chunk's activations at a time),
    results back in row order."""
    if n_chunks == 1:
        return fn(*arrays)
    micro = split_micro(arrays, n_chunks)
    out = jax.lax.map(lambda xs: fn(*xs), micro)
    return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape(-1, *y.shape[2:]), out)


def reference(c, policy, policy_config):
    """(ref, ref_adapters, ref_config) for a policy about to be trained (PPO, GRPO, ...).

    Full fine-tuning: ref is a frozen copy of the initial policy (own buffers: the policy is
    donated). LoRA (`model.lora.rank > 0`): no copy; the reference is the policy's own base
    with the adapters off (ref_config = `lora.disabled(policy_config)`), or, when continuing
    a loaded adapter (`model.lora.init_from`), the base with a frozen copy of that adapter
    (ref_adapters; ref_config = the policy's). `reference_params` resolves it per iteration."""
    from easyrl.model.lora import disabled
    from easyrl.model.trainable import adapters
    if policy_config.lora_rank <= 0:
        return jax.tree.map(jnp.copy, policy), None, policy_config
    if c.model.lora.init_from:
        return None, jax.tree.map(jnp.copy, adapters(policy)), policy_config
    return None, None, disabled(policy_config)


def reference_params(ref, ref_adapters, policy):
    """The reference's params for this iteration (see `reference`)."""
    from easyrl.model.trainable import combine, strip
    if ref is not None:
        return ref
    return policy if ref_adapters is None else combine(ref_adapters, strip(policy))


def config_at(c, path: str, lora_on: bool = True):
    """A copy of config `c` whose model.path is `path` (to load the reward / value models).
    The value model gets fresh LoRA adapters like the policy (never the policy's init_from);
    the reward model (lora_on=False) none: it is not trained."""
    import ml_collections as mlc
    from easyrl.train import setup
    sub = mlc.ConfigDict(c.to_dict())
    sub.model.path = path
    if sub.model.get("lora") is not None:
        if lora_on and sub.model.lora.init_from:  # the policy's adapter shape, fresh weights
            rt = setup.lora_runtime(c)
            sub.model.lora.update(rank=rt["lora_rank"], alpha=rt["lora_alpha"],
                                  targets=rt["lora_targets"])
        sub.model.lora.init_from = ""
        sub.model.lora.rank = sub.model.lora.rank if lora_on else 0
        if not lora_on or not sub.model.lora.rank:
            sub.model.lora.base_dtype = ""
    return sub
