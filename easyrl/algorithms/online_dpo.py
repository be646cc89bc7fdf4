"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; TRL
`OnlineDPOTrainer.training_step`, trl/trainer/online_dpo_trainer.py) on the online-RL loop
(`easyrl.train.rl_loop`), docs/algorithms.md ("Online DPO").

Per iteration (`python -m easyrl online_dpo --config configs/online_dpo.py:PRESET`):
  1. rollout: every prompt sampled online_dpo.num_generations (G, default 2 as TRL) times
     (`Iteration.group`: the shared-prefix sampler / the engine prefill each prompt once);
  2. rewards on the host (`rl_loop.HostRewards`: reward.functions and / or the reward model
     reward.path, minus online_dpo.missing_eos_penalty for a completion without EOS);
  3. `score`: one jitted pass (micro-batched) of the frozen reference's summed log-probs;
  4. `pairs`: per prompt chosen = the first argmax of the G scores, rejected = the first argmin
     (G = 2: TRL's `first_half >= second_half`, the first sample wins ties); when all G scores
     are equal, the sample after the chosen one;
  5. `make_update`: online_dpo.num_minibatches optimizer steps (default 1, as TRL), each
     accumulated over micro-batches of train.micro_batch_size pairs (`train.step.optimizer_step`),
     the loss `losses.dpo_losses` (any DPO loss type, loss_weights, label_smoothing) on the
     policy's summed log-probs (with gradient) and the reference's, summed over the pairs and
     divided by the minibatch's pair count, so the micro-batch split does not change the update
     (batch-level loss types, bco_pair / aot* / sft, see one micro-batch, as in `dpo.py`).

Log-probs are of logits / temperature, unfiltered (top-k / top-p only shape sampling), for the
policy and the reference alike: the open-instruct online DPO script (`online_dpo_vllm_thread.py`)
and the rest of easyrl's RL; TRL's OnlineDPOTrainer uses the raw logits. Reference: a frozen copy
of the initial policy; LoRA: the base with the adapters off (`common.reference`).
"""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp

from easyrl import losses, parallel
from easyrl.algorithms.common import chunked, reference, reference_params
from easyrl.algorithms.dpo import check_loss_types
from easyrl.algorithms.registry import Algorithm
from easyrl.rollout import response_logprobs
from easyrl.train.step import counted_step

SECTION = "online_dpo"
SIDES = ("chosen", "rejected")


def select_pairs(rewards, g: int):
    """(chosen, rejected) row indices [B] into `rewards` [B * g] (groups of g consecutive rows):
    chosen = the first argmax, rejected = the first argmin, or (all g equal) the next sample.
    NaN rewards (unscorable rows: every reward function returned None) are never chosen or
    rejected while the group has scorable rows; see `pair_ok`."""
    r = rewards.reshape(-1, g)
    ok = ~jnp.isnan(r)
    best = jnp.argmax(jnp.where(ok, r, -jnp.inf), axis=1)
    worst = jnp.argmin(jnp.where(ok, r, jnp.inf), axis=1)
    worst = jnp.where(worst == best, (best + 1) % g, worst)
    base = jnp.arange(r.shape[0]) * g
    return base + best, base + worst


def pair_ok(rewards, ci, ri):
    """[B] 1.0 where both sides of a pair have a reward (not NaN), else 0.0: a pair with an
    unscorable side is no preference and adds nothing to the loss."""
    return (~jnp.isnan(rewards[ci]) & ~jnp.isnan(rewards[ri])).astype(jnp.float32)


def make_score(ref_cfg, d, n_chunks: int = 1):
    """score(models, tokens, attn, resp_mask) -> {ref_logps [N]} (summed over the response)."""
    def one(models, tokens, attn, resp_mask):
        lp, _ = response_logprobs(ref_cfg, models["ref"], tokens, attn, d.max_prompt_len,
                                  d.temperature)
        return {"ref_logps": jnp.sum(lp * resp_mask.astype(jnp.float32), -1)}

    return lambda models, tokens, attn, resp_mask: chunked(
        lambda t, a, m: one(models, t, a, m), n_chunks, tokens, attn, resp_mask)


def pairs(scored, roll, d):
    """(update inputs: {chosen,rejected}_{tokens,attn,mask,ref,score} [B, ...], stats)."""
    rewards = roll["rewards"].astype(jnp.float32)
    ci, ri = select_pairs(rewards, int(d.num_generations))
    ok = pair_ok(rewards, ci, ri)
    inputs = {"pair_ok": ok}
    for side, i in zip(SIDES, (ci, ri)):
        inputs.update({f"{side}_tokens": roll["tokens"][i], f"{side}_attn": roll["attn"][i],
                       f"{side}_mask": roll["resp_mask"][i].astype(jnp.float32),
                       f"{side}_ref": scored["ref_logps"][i],
                       f"{side}_score": jnp.nan_to_num(rewards[i])})
    margin = jnp.where(ok > 0, rewards[ci] - rewards[ri], 0.0)
    stats = {"objective/scores": jnp.nan_to_num(jnp.nanmean(rewards)),
             "objective/scores_margin": jnp.sum(margin) / jnp.maximum(jnp.sum(ok), 1),
             "pairs/unscorable": jnp.sum(1.0 - ok),
             "val/contain_eos_token": jnp.mean(roll["has_eos"].astype(jnp.float32)),
             "completions/mean_length": jnp.mean(jnp.sum(roll["resp_mask"], -1).astype(jnp.float32)),
             "beta": jnp.float32(d.beta)}
    return inputs, stats


def make_loss(policy_cfg, d):
    """loss_fn(params, frozen, micro, rng, denom) -> (loss, metrics), sums over the micro-batch's
    pairs divided by the minibatch's pair count denom["pairs"] (`train.step.accumulate`)."""
    kinds = losses.parse_loss_types(d.loss_type)
    beta = float(d.beta)

    def loss_fn(params, frozen, mb, rng, denom):
        del frozen, rng
        b = mb["chosen_tokens"].shape[0]
        cat = lambda k: jnp.concatenate([mb[f"chosen_{k}"], mb[f"rejected_{k}"]])  # noqa: E731
        m = cat("mask")
        lp, _ = response_logprobs(policy_cfg, params, cat("tokens"), cat("attn"),
                                  d.max_prompt_len, d.temperature)
        seq, lens = jnp.sum(lp * m, -1), jnp.sum(m, -1)
        pc, pr = seq[:b], seq[b:]
        per_pair, r_c, r_r, terms = losses.dpo_losses(
            pc, pr, mb["chosen_ref"], mb["rejected_ref"], beta=beta, loss_type=d.loss_type,
            label_smoothing=d.label_smoothing, loss_weights=d.get("loss_weights", ""),
            chosen_lengths=lens[:b], rejected_lengths=lens[b:], return_terms=True)
        n = denom["pairs"]
        sg = jax.lax.stop_gradient
        means = losses.dpo_metrics(r_c, r_r, sg(pc), sg(pr))
        if len(kinds) > 1:
            means.update({k: jnp.mean(v) for k, v in terms.items() if k.startswith("loss/")})
        metrics = {k: sg(v) * b / n for k, v in means.items()}
        kl = jnp.sum(sg(seq) - cat("ref"))  # TRL: sum_t (logp - logp_ref), over the 2b rows
        metrics.update({"objective/kl": kl / (2 * n),
                        "objective/non_score_reward": -beta * kl / (2 * n),
                        "objective/entropy": -jnp.sum(sg(seq)) / (2 * n),
                        "objective/rlhf_reward": (jnp.sum(cat("score")) - beta * kl) / (2 * n)})
        w = mb["pair_ok"] if "pair_ok" in mb else 1.0
        return jnp.sum(per_pair * w) / n, metrics

    return loss_fn


def make_update(policy_cfg, tx, d, *, n_micro: int = 1, trainable_mask=None):
    """update(state, inputs, rng) -> (state, metrics): the pairs split at random into
    num_minibatches optimizer steps (1: all pairs, in order), each accumulated over `n_micro`
    micro-batches; a non-finite step is skipped (`nonfinite_updates`). metrics: step means."""
    loss_fn = make_loss(policy_cfg, d)
    steps = int(d.num_minibatches)

    def one_step(state, mb, rng):
        denom = {"pairs": jnp.float32(mb["chosen_tokens"].shape[0])}
        return counted_step(loss_fn, tx, state, mb, rng, denom, n_micro, trainable_mask)

    def update(state, inputs, rng):
        n = inputs["chosen_tokens"].shape[0]
        idx = (jnp.arange(n) if steps == 1 else jax.random.permutation(rng, n)).reshape(steps, -1)

        def body(st, xs):
            i, k = xs
            mb = jax.tree.map(lambda x: parallel.constrain_batch(x[i]), inputs)
            return one_step(st, mb, jax.random.fold_in(rng, 1000 + k))

        state, stats = jax.lax.scan(body, state, (idx, jnp.arange(steps)))
        metrics = jax.tree.map(jnp.mean, stats)
        metrics["nonfinite_updates"] = jnp.sum(stats["nonfinite_updates"])
        return state.replace(step=state.step + 1), metrics

    return update


def make_iteration(cfgs, d, tx, *, host_rewards=None, trainable_mask=None, state_sharding=None,
                   mesh=None, n_micro: int = 1, score_chunks: int = 1):
    """Online DPO's jitted pieces of one iteration (`rl_loop.Iteration`) for section `d`."""
    from easyrl.train.rl_loop import Iteration
    out_sh = None if mesh is None else (state_sharding, parallel.replicated(mesh))
    update = jax.jit(make_update(cfgs["policy"], tx, d, n_micro=n_micro,
                                 trainable_mask=trainable_mask),
                     donate_argnums=(0,), out_shardings=out_sh)

    def models(state, frozen):
        return dict(policy=state.params, reward=frozen.get("reward"),
                    ref=reference_params(frozen["ref"], frozen.get("ref_adapters"), state.params))

    return Iteration(models=models, score=jax.jit(make_score(cfgs["ref"], d, score_chunks)),
                     advantages=jax.jit(lambda scored, roll, ctrl: pairs(scored, roll, d)),
                     update=update, policy=lambda state: state.params,
                     group=int(d.num_generations), rewards=host_rewards)


# ----------------------------------------------------------------------------- wiring
def validate(c, mesh, max_positions: int) -> None:
    d = c[SECTION]

    def need(cond, key, msg):
        if not cond:
            raise ValueError(f"config {SECTION}.{key}: {msg}")
    need(d.num_generations >= 2, "num_generations",
         f"{d.num_generations}; a preference pair needs >= 2 samples per prompt")
    need(d.temperature > 0, "temperature", f"{d.temperature}; online DPO needs a sampling "
         f"temperature > 0 (greedy samples of a prompt are all the same)")
    need(0.0 < d.top_p <= 1.0, "top_p", f"{d.top_p} must be in (0, 1] (1 = off)")
    need(d.top_k >= 0, "top_k", f"{d.top_k} must be an integer >= 0 (0 = off)")
    need(d.beta > 0, "beta", f"{d.beta} must be > 0")
    need(isinstance(d.max_new_tokens, int) and d.max_new_tokens >= 1, "max_new_tokens",
         f"{d.max_new_tokens!r} must be an int >= 1")
    need(isinstance(d.max_prompt_len, int) and d.max_prompt_len >= 1, "max_prompt_len",
         f"{d.max_prompt_len!r} must be an int >= 1")
    check_loss_types(d, SECTION)
    need(0.0 <= d.label_smoothing < 0.5, "label_smoothing",
         f"{d.label_smoothing} must be in [0, 0.5)")
    if not (c.reward.path or c.reward.functions):
        raise ValueError("config reward.functions: no reward source; set reward.functions "
                         "(e.g. synthetic, gsm8k_exact, my_rewards:fn) and/or reward.path")
    b, nm = c.train.batch_size, d.num_minibatches
    need(nm > 0 and b % nm == 0, "num_minibatches",
         f"{nm} must divide train.batch_size={b} (prompts = pairs)")
    mb, micro = b // max(nm, 1), c.train.micro_batch_size or b // max(nm, 1)
    dp = parallel.data_parallel_size(mesh)
    if mb % micro or micro % dp:
        raise ValueError(f"config train.micro_batch_size: a micro-batch of {micro} pairs must "
                         f"divide a minibatch of {mb} pairs (train.batch_size / {SECTION}."
                         f"num_minibatches) and be divisible by the data-parallel size {dp}")
    need(d.max_prompt_len + d.max_new_tokens <= max_positions, "max_new_tokens",
         f"max_prompt_len + max_new_tokens = {d.max_prompt_len + d.max_new_tokens} exceeds "
         f"max_position_embeddings={max_positions}")


def build(env):
    """Policy, frozen reference, reward model (reward.path), optimizer, state, the iteration."""
    from easyrl.model.trainable import trainable_mask
    from easyrl.train import setup
    from easyrl.train.rl_loop import Online, host_rewards, train_state
    c, mesh, pcfg = env.config, env.mesh, env.policy_config
    d = c[SECTION]
    hr, rparams = host_rewards(c, env, mesh, SECTION)
    policy = setup.load_params(c, pcfg, "causal_lm", mesh)
    ref, ref_adapters, ref_cfg = reference(c, policy, pcfg)
    mask = trainable_mask(policy) if pcfg.lora_rank > 0 else None
    state, state_sh, tx = train_state(c, mesh, policy, mask, env.total_steps * d.num_minibatches)
    mb = c.train.batch_size // d.num_minibatches
    micro = c.train.micro_batch_size or mb
    it = make_iteration(dict(policy=pcfg, ref=ref_cfg), d, tx, host_rewards=hr,
                        trainable_mask=mask, state_sharding=state_sh, mesh=mesh,
                        n_micro=mb // micro, score_chunks=c.train.batch_size // micro)
    repl = parallel.replicated(mesh)

    def restore(s, a, meta):
        return s.replace(params=a["params"], opt_state=a["opt_state"],
                         step=jax.device_put(jnp.int32(meta["step"]), repl))

    return Online(state=state, frozen=dict(ref=ref, ref_adapters=ref_adapters, reward=rparams),
                  iteration=it, ctrl={}, restore=restore,
                  items=lambda s: dict(params=s.params, opt_state=s.opt_state))


ALGORITHM = Algorithm(
    command="online_dpo", help="online DPO: pairs sampled from the policy, ranked by a reward",
    loop="online", order=52,
    online=types.SimpleNamespace(section=SECTION, validate=validate, build=build,
                                 postfix=("objective/scores", "rewards/accuracies", "objective/kl")))
train = ALGORITHM.train
