"""PPO wiring: models, sampler, the iteration loop, KL controller, checkpoints, metrics, samples."""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from easyrl import checkpoint, losses, parallel
from easyrl.model import lora
from easyrl.algorithms.common import fmt, iter_kwargs
from easyrl.algorithms.ppo import PPOState, advantages, make_update, score_rollout
from easyrl.data.iterator import prompt_iterator
from easyrl.generate import make_sampler, normalize_eos
from easyrl.hf import _host
from easyrl.train import setup
from easyrl.train.config import SYNTHETIC, validate
from easyrl.train.loop import save_run_tokenizer
from easyrl.train.runtime import RunControl, init_mesh, say
from easyrl.train.metrics import MetricsWriter
from easyrl.train.optim import make_optimizer

log = logging.getLogger(__name__)


def _at(c, path: str, lora_on: bool = True):
    """A copy of config `c` whose model.path is `path` (to load the reward / value models).
    The value model gets fresh LoRA adapters like the policy (never the policy's init_from);
    the reward model (lora_on=False) none: it is not trained."""
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


def validate_ppo(c, mesh, max_positions: int) -> None:
    p = c.ppo
    b = c.train.batch_size
    if p.num_minibatches <= 0 or b % p.num_minibatches:
        raise ValueError(f"config ppo.num_minibatches: {p.num_minibatches} must divide train.batch_size={b}")
    mb = b // p.num_minibatches
    if mb % parallel.data_parallel_size(mesh):
        raise ValueError(f"config ppo.num_minibatches: minibatch {mb} is not divisible by the "
                         f"data-parallel size {parallel.data_parallel_size(mesh)} of mesh {c.mesh!r}")
    if p.max_prompt_len + p.max_new_tokens > max_positions:
        raise ValueError(f"config ppo.max_new_tokens: max_prompt_len + max_new_tokens = "
                         f"{p.max_prompt_len + p.max_new_tokens} exceeds max_position_embeddings={max_positions}")
    if not c.reward.path:
        raise ValueError("config reward.path: PPO needs a reward model (an `easyrl rm` run dir or HF folder)")
    if p.kl_estimator not in ("k1", "k3"):
        raise ValueError(f"config ppo.kl_estimator: {p.kl_estimator!r}, expected k1 or k3")
    lo = c.model.get("lora")
    if lo is not None and lo.dropout > 0:
        raise ValueError(f"config model.lora.dropout: {lo.dropout}; PPO runs without dropout "
                         f"(the first minibatch's ratio must be 1), set it to 0")


def run(c) -> dict:
    mesh = init_mesh(c)
    validate(c, dp_size=parallel.data_parallel_size(mesh))
    p = c.ppo
    tok = setup.load_tokenizer(c)
    pcfg = setup.model_config(c, tok)
    validate_ppo(c, mesh, pcfg.max_position_embeddings)
    rc = _at(c, c.reward.path, lora_on=False)
    rcfg = setup.model_config(rc)
    vc = _at(c, c.value.path or c.reward.path)
    vcfg = setup.model_config(vc)
    policy = setup.load_params(c, pcfg, "causal_lm", mesh)
    use_lora = pcfg.lora_rank > 0
    # LoRA: the reference is the policy with its adapters off (no copy); else a frozen copy
    ref = None if use_lora else jax.tree.map(jnp.copy, policy)  # own buffers: policy is donated
    reward = setup.load_params(rc, rcfg, "reward", mesh)
    value = setup.load_params(vc, vcfg, "value", mesh)
    pol_mask = lora.trainable_mask(policy) if use_lora else None
    val_mask = lora.trainable_mask(value) if vcfg.lora_rank > 0 else None

    prompts = prompt_iterator(setup.data_source(c, "prompts", "train"), tok,
                              max_prompt_len=p.max_prompt_len, global_batch_size=c.train.batch_size,
                              template=c.data.template, format=fmt(c),
                              skip_bad_rows=c.data.skip_bad_rows, **iter_kwargs(c, "train"))
    steps = int(c.train.steps) if c.train.steps > 0 else int(c.train.epochs * prompts.steps_per_epoch)
    n_updates = steps * p.ppo_epochs * p.num_minibatches
    policy_tx, _ = make_optimizer(c.optim, n_updates)
    value_tx, _ = make_optimizer(c.value_optim, n_updates)
    repl = parallel.replicated(mesh)
    sh = lambda t: jax.tree.map(lambda x: x.sharding, t)  # noqa: E731
    pol_train = lora.partition(policy, pol_mask)[0]  # optimizer state: trainable leaves only
    val_train = lora.partition(value, val_mask)[0]
    pol_opt_sh = parallel.named_shardings(jax.eval_shape(policy_tx.init, pol_train), mesh)
    val_opt_sh = parallel.named_shardings(jax.eval_shape(value_tx.init, val_train), mesh)
    state = PPOState(step=jnp.zeros((), jnp.int32), policy=policy, value=value,
                     policy_opt=jax.jit(policy_tx.init, out_shardings=pol_opt_sh)(pol_train),
                     value_opt=jax.jit(value_tx.init, out_shardings=val_opt_sh)(val_train))
    state_sh = PPOState(step=repl, policy=sh(policy), value=sh(value), policy_opt=pol_opt_sh,
                        value_opt=val_opt_sh)
    state = jax.device_put(state, state_sh)

    eos = normalize_eos(tuple({*normalize_eos(tok.eos_token_id), *normalize_eos(None, pcfg)}))
    sampler = make_sampler(pcfg, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                           top_k=p.top_k, top_p=p.top_p, eos_token_id=eos,
                           pad_token_id=tok.pad_token_id, mesh=mesh)
    cfgs = dict(policy=pcfg, ref=lora.disabled(pcfg), value=vcfg, reward=rcfg)
    plen = p.max_prompt_len
    score_fn = jax.jit(lambda models, tokens, attn, m: score_rollout(
        cfgs, models, tokens, attn, m, prompt_len=plen, temperature=p.temperature))
    adv_fn = jax.jit(lambda scored, m, has_eos, kl_coef: advantages(
        scored, m, has_eos, kl_coef=kl_coef, kl_estimator=p.kl_estimator, gamma=p.gamma,
        lam=p.lam, missing_eos_penalty=p.missing_eos_penalty or None,
        whiten=p.whiten_advantages))
    update_fn = jax.jit(make_update(
        pcfg, vcfg, policy_tx, value_tx, prompt_len=plen, temperature=p.temperature,
        ppo_epochs=p.ppo_epochs, num_minibatches=p.num_minibatches, cliprange=p.cliprange,
        cliprange_value=p.cliprange_value, vf_coef=p.vf_coef, ratio_threshold=p.ratio_threshold,
        target_kl=p.target_kl, policy_mask=pol_mask, value_mask=val_mask), donate_argnums=(0,),
        out_shardings=(state_sh, repl))

    # ---- resume ---------------------------------------------------------------------------
    out = c.output_dir
    checkpoint.write_model_config(out, pcfg, "causal_lm", command="ppo", run_config=c.to_dict())
    if jax.process_index() == 0:
        save_run_tokenizer(tok, out)
    mgr = checkpoint.manager(out, keep=c.checkpoint.keep or None, async_save=c.checkpoint.async_save)
    kl_coef = float(p.kl_coef)
    start = mgr.latest_step()
    if start is not None:
        r = mgr.restore(start, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(checkpoint.abstract_like(state.policy)),
            value=ocp.args.StandardRestore(checkpoint.abstract_like(state.value)),
            policy_opt=ocp.args.StandardRestore(checkpoint.abstract_like(state.policy_opt)),
            value_opt=ocp.args.StandardRestore(checkpoint.abstract_like(state.value_opt)),
            meta=ocp.args.JsonRestore()))
        state = state.replace(policy=r["params"], value=r["value"], policy_opt=r["policy_opt"],
                              value_opt=r["value_opt"],
                              step=jax.device_put(jnp.int32(r["meta"]["step"]), repl))
        kl_coef = float(r["meta"]["kl_coef"])
        prompts.set_state(r["meta"]["data"])
        say(f"resuming from checkpoint at step {start} ({out}/checkpoints/{start})")
    step = int(start or 0)
    writer = MetricsWriter(out, c, c.log.tensorboard, c.log.wandb_project, c.log.wandb_name,
                           resume_step=start)

    def save(at, force=False):
        meta = dict(step=at, kl_coef=kl_coef, data=prompts.get_state(), seed=c.seed)
        mgr.save(at, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.policy), value=ocp.args.StandardSave(state.value),
            policy_opt=ocp.args.StandardSave(state.policy_opt),
            value_opt=ocp.args.StandardSave(state.value_opt), meta=ocp.args.JsonSave(meta)),
            force=force)

    true_reward = None
    if p.true_reward == SYNTHETIC:
        from easyrl.data.synthetic import true_reward
    base = jax.random.PRNGKey(c.seed)
    bar = tqdm(total=steps, initial=step, desc="ppo", disable=jax.process_index() != 0,
               dynamic_ncols=True)
    last = {}
    with RunControl(c, mgr, steps, save, closers=(bar, writer)) as control, jax.set_mesh(mesh):
        while step < steps:
            local = next(prompts)
            batch = parallel.to_global_batch({k: local[k] for k in ("input_ids", "attention_mask")}, mesh)
            rng = jax.random.fold_in(base, step)
            t0 = time.time()
            roll = sampler(state.policy, batch["input_ids"], batch["attention_mask"],
                           jax.random.fold_in(rng, 0))
            resp_mask = roll["response_mask"]
            jax.block_until_ready(resp_mask)
            t1 = time.time()
            attn = jnp.concatenate([batch["attention_mask"], resp_mask], axis=1)
            models = dict(policy=state.policy, ref=state.policy if ref is None else ref,
                          value=state.value, reward=reward)
            scored = score_fn(models, roll["tokens"], attn, resp_mask)
            adv, ret, stats = adv_fn(scored, resp_mask, roll["has_eos"], jnp.float32(kl_coef))
            jax.block_until_ready(adv)
            t2 = time.time()
            rollout = dict(tokens=roll["tokens"], attn=attn, resp_mask=resp_mask,
                           logprobs=scored["logprobs"], values=scored["values"], advantages=adv,
                           returns=ret)
            state, upd = update_fn(state, rollout, jax.random.fold_in(rng, 1))
            metrics = {**jax.device_get(stats), **jax.device_get(upd)}
            t3 = time.time()
            step += 1
            metrics = {k: float(v) for k, v in metrics.items()}
            metrics.update({"time/rollout": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2})
            if p.adaptive_kl:
                kl_coef = float(losses.adaptive_kl_update(kl_coef, metrics["objective/kl"],
                                                          c.train.batch_size, target=p.kl_target,
                                                          horizon=p.kl_horizon))
            texts = None
            if true_reward is not None or (p.samples_every and step % p.samples_every == 0):
                texts = _decode(tok, _host(roll["response"]), _host(resp_mask))
            if true_reward is not None:
                metrics["objective/true_reward"] = float(np.mean(
                    [true_reward(q, r) for q, r in zip(local["prompts"], texts)]))
            if p.samples_every and step % p.samples_every == 0 and jax.process_index() == 0:
                scores = _host(scored["scores"])
                with open(os.path.join(out, "samples.jsonl"), "a") as f:
                    for q, r, s in list(zip(local["prompts"], texts, scores))[:p.num_samples]:
                        f.write(json.dumps({"step": step, "prompt": q, "response": r,
                                            "score": float(s)}) + "\n")
            if step % c.log.every == 0 or step == steps:
                writer.write(step, metrics)
            last = metrics
            bar.update(1)
            bar.set_postfix(score=f"{metrics['objective/scores']:.3f}",
                            kl=f"{metrics['objective/kl']:.3f}")
            control.after_step(step)
    last["final_step"] = step
    last["_state"] = state
    return last


def _decode(tok, response, mask):
    return [tok.decode([int(t) for t, m in zip(row, mrow) if m], skip_special_tokens=True).strip()
            for row, mrow in zip(response, mask)]
