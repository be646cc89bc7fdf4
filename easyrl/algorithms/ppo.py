"""PPO with a KL penalty (StackLLaMA, Tulu 2.5): an online-RL algorithm (`easyrl.train.rl_loop`).

Per iteration (the online-RL loop runs it; this file supplies the PPO parts):
  1. rollout: easyrl's jitted sampler on left-padded prompts [B, P] -> responses [B, N];
  2. `score_rollout`: ONE jitted pass gives old log-probs, reference log-probs, values, the
     reward-model score and the entropy;
  3. `advantages`: per-token rewards (-kl_coef * kl_t, plus the score minus the missing-EOS
     penalty at the last token), GAE in a lax.scan, whitening over valid tokens;
  4. `make_update`: ppo_epochs x minibatches of clipped policy + value losses, one jit, with the
     ratio-threshold skip and the target-KL early stop done on device.
Log-probs use logits / temperature and, with ppo.top_k / ppo.top_p, the filtered distribution the
sampler drew from (old and new log-probs; the reference and the entropy unfiltered).

LoRA (`model.lora.rank > 0`): the policy and the value model train only their adapters (and the
value head); the reference is the policy's own parameters applied with the adapters off
(`cfgs["ref"] = lora.disabled(policy config)`, `models["ref"] = models["policy"]`), so no second
copy of the weights is held.
"""
from __future__ import annotations

import types

import flax
import jax
import jax.numpy as jnp
import optax

from easyrl import losses
from easyrl.algorithms.common import config_at, reference, reference_params
from easyrl.algorithms.registry import Algorithm
from easyrl import model as M
from easyrl.rollout import response_logprobs
from easyrl.model.trainable import combine, partition
from easyrl.train.optim import all_finite, global_norm


@flax.struct.dataclass
class PPOState:
    step: jax.Array
    policy: dict
    value: dict
    policy_opt: object
    value_opt: object


def response_values(config, params, tokens, attn, prompt_len: int):
    """V [B,N]: the value head at the position before each response token (the state that chose
    it), i.e. aligned with the log-probs."""
    return M.values(config, params, tokens, attn)[:, prompt_len - 1:-1]


def score_rollout(cfgs, models, tokens, attn, resp_mask, *, prompt_len: int, temperature: float,
                  top_k: int = 0, top_p: float = 1.0, policy_pass: bool = True):
    """The single scoring pass. cfgs/models: dicts with keys policy, ref, value, reward (cfgs
    may give the reference its own config, e.g. LoRA adapters off; default: the policy's).

    The old (behaviour) log-probs are those of the distribution the sampler drew from: logits /
    temperature, filtered by the sampler's top_k / top_p (log softmax over the kept tokens), so
    they equal the sampler's own `logprobs`. The reference log-probs and the entropy use the
    same temperature and NO filtering (TRL's reference: same temperature, never filtered): the KL
    estimate is then of the sampling distribution against the plain reference, and a sampled
    token outside the reference's own nucleus cannot make it infinite. top_k = 0, top_p = 1
    (the default): unfiltered everywhere, bit-identical to the unfiltered pass."""
    # lp filtered by top_k / top_p, the entropy never (`rollout.response_logprobs`).
    # policy_pass=False (rollout.behaviour_logprobs=sampler): the sampler's log-probs are the
    # old ones (`make_iteration` puts them in) and the update measures the entropy
    if policy_pass:
        lp, ent = response_logprobs(cfgs["policy"], models["policy"], tokens, attn, prompt_len,
                                    temperature, top_k, top_p)
    else:
        lp = ent = jnp.zeros(resp_mask.shape, jnp.float32)
    ref_cfg = cfgs.get("ref", cfgs["policy"])
    ref_lp, _ = response_logprobs(ref_cfg, models["ref"], tokens, attn, prompt_len, temperature)
    values = response_values(cfgs["value"], models["value"], tokens, attn, prompt_len)
    if cfgs.get("reward") is None:  # no reward model: the host reward functions alone
        scores = jnp.zeros(tokens.shape[:1], jnp.float32)
    else:
        scores = M.score(cfgs["reward"], models["reward"], tokens, attn)
    m = resp_mask.astype(jnp.float32)
    return dict(logprobs=lp * m, ref_logprobs=ref_lp * m, values=values * m, scores=scores,
                entropy=ent * m)


def advantages(scored, resp_mask, has_eos, *, kl_coef, kl_estimator, gamma, lam,
               missing_eos_penalty=None, whiten=True):
    """Per-token rewards, GAE advantages (whitened over valid tokens) and returns."""
    mask = resp_mask.astype(jnp.float32)
    rewards, kl = losses.ppo_rewards(scored["scores"], scored["logprobs"], scored["ref_logprobs"],
                                     mask, kl_coef=kl_coef, kl_kind=kl_estimator, has_eos=has_eos,
                                     missing_eos_penalty=missing_eos_penalty)
    adv, returns = losses.gae(rewards, scored["values"], mask, gamma, lam)
    if whiten:
        adv = losses.whiten(adv, mask) * mask
    kl_seq = jnp.sum(kl * mask, -1)
    stats = {
        "objective/kl": jnp.mean(kl_seq),
        "objective/entropy": jnp.mean(jnp.sum(scored["entropy"], -1)),
        "objective/scores": jnp.mean(scored["scores"]),
        "objective/rlhf_reward": jnp.mean(scored["scores"] - kl_coef * kl_seq),
        "objective/kl_coef": jnp.asarray(kl_coef, jnp.float32),
        "tokens/response_len": jnp.mean(jnp.sum(mask, -1)),
        "val/num_eos_tokens": jnp.sum(has_eos.astype(jnp.float32)),
    }
    return adv, returns, stats


def make_update(policy_cfg, value_cfg, policy_tx, value_tx, *, prompt_len: int, temperature: float,
                ppo_epochs: int, num_minibatches: int, cliprange: float, cliprange_value: float,
                vf_coef: float, ratio_threshold: float = 0.0, target_kl: float = 0.0,
                policy_mask=None, value_mask=None, top_k: int = 0, top_p: float = 1.0,
                sampler_logprobs: bool = False):
    """update(state, rollout, rng) -> (state, metrics). rollout: tokens, attn, resp_mask,
    logprobs, values, advantages, returns ([B, ...]); minibatches are random row subsets.

    The new log-probs of the ratio are, like the old ones of `score_rollout`, those of logits /
    temperature filtered by the sampler's top_k / top_p (log softmax over the tokens the current
    parameters keep; a sampled token they no longer keep is scored as if kept, see
    `losses.common.filtered_logprobs`). top_k = 0, top_p = 1 (the default): unfiltered.

    policy_mask / value_mask (bool pytrees, LoRA): only their True leaves get gradients and
    updates; the optimizer states cover `trainable.partition(params, mask)[0]`."""

    def loss_fn(params, fixed, mb):
        policy, value = (combine(t, f) for t, f in zip(params, fixed))
        mask = mb["resp_mask"].astype(jnp.float32)
        lp, ent = response_logprobs(policy_cfg, policy, mb["tokens"], mb["attn"], prompt_len,
                                    temperature, top_k, top_p)
        v = response_values(value_cfg, value, mb["tokens"], mb["attn"], prompt_len)
        pg, pstats = losses.ppo_policy_loss(lp, mb["logprobs"], mb["advantages"], mask, cliprange)
        vf, vstats = losses.ppo_value_loss(v, mb["values"], mb["returns"], mask, cliprange_value)
        loss = pg + vf_coef * vf
        d = jnp.abs(jax.lax.stop_gradient(lp) - mb["logprobs"]) * mask
        extra = {"entropy_seq": jnp.mean(jnp.sum(jax.lax.stop_gradient(ent) * mask, -1)),
                 "diff_max": jnp.max(d), "diff_mean": jnp.sum(d) / jnp.maximum(jnp.sum(mask), 1)}
        return loss, {**pstats, **vstats, "loss/policy": pg, "loss/value": vf, **extra}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def minibatch(carry, idx):
        state, rollout, stopped = carry
        mb = jax.tree.map(lambda x: x[idx], rollout)
        pol, pol_fixed = partition(state.policy, policy_mask)
        val, val_fixed = partition(state.value, value_mask)
        (loss, stats), (g_pol, g_val) = grad_fn((pol, val), (pol_fixed, val_fixed), mb)
        skip = stopped
        if ratio_threshold > 0:
            skip = skip | (stats["policy/ratio"] > ratio_threshold)
        up_p, pol_opt = policy_tx.update(g_pol, state.policy_opt, pol)
        up_v, val_opt = value_tx.update(g_val, state.value_opt, val)
        new_pol, new_val = optax.apply_updates(pol, up_p), optax.apply_updates(val, up_v)
        gp, gv = global_norm(g_pol), global_norm(g_val)
        # a non-finite loss, gradient, update or new parameter skips the minibatch (counted)
        bad = ~(jnp.isfinite(loss) & jnp.isfinite(gp) & jnp.isfinite(gv) & all_finite(new_pol)
                & all_finite(new_val))
        skip = skip | bad
        pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(skip, b, a), new, old)  # noqa: E731
        state = state.replace(
            policy=combine(pick(new_pol, pol), pol_fixed),
            value=combine(pick(new_val, val), val_fixed),
            policy_opt=pick(pol_opt, state.policy_opt), value_opt=pick(val_opt, state.value_opt))
        if target_kl > 0:  # stop the remaining updates of this iteration once KL runs away
            stopped = stopped | (stats["policy/approxkl"] > target_kl)
        stats = dict(stats, grad_norm=gp, value_grad_norm=gv, skipped=skip.astype(jnp.float32),
                     nonfinite_updates=bad.astype(jnp.float32))
        return (state, rollout, stopped), stats

    def update(state: PPOState, rollout: dict, rng):
        b = rollout["tokens"].shape[0]
        mbs = b // num_minibatches
        idx = jnp.stack([jax.random.permutation(jax.random.fold_in(rng, e), b)
                         for e in range(ppo_epochs)]).reshape(ppo_epochs * num_minibatches, mbs)
        (state, _, stopped), stats = jax.lax.scan(minibatch, (state, rollout, jnp.array(False)), idx)
        first = jax.tree.map(lambda x: x[0], stats)  # the first minibatch (rho == 1 at lr 0)
        extra = {k: stats.pop(k) for k in ("entropy_seq", "diff_max", "diff_mean")}
        metrics = jax.tree.map(jnp.mean, stats)
        if sampler_logprobs:  # no policy scoring pass: measured in the update instead
            metrics["objective/entropy"] = jnp.mean(extra["entropy_seq"][:num_minibatches])
            metrics["rollout/logprob_diff_max"] = extra["diff_max"][0]
            metrics["rollout/logprob_diff_mean"] = extra["diff_mean"][0]
        metrics["policy/approxkl_first"] = first["policy/approxkl"]
        metrics["policy/ratio_first"] = first["policy/ratio"]
        metrics["ppo/early_stopped"] = stopped.astype(jnp.float32)
        metrics["nonfinite_updates"] = jnp.sum(stats["nonfinite_updates"])  # this iteration
        return state.replace(step=state.step + 1), metrics

    return update


# ----------------------------------------------------------------------------- the iteration
def make_iteration(cfgs, p, policy_tx, value_tx, *, policy_mask=None, value_mask=None,
                   state_sharding=None, mesh=None, host_rewards=None, reward_weight=1.0,
                   behaviour_logprobs: str = "trainer"):
    """PPO's jitted pieces of one online-RL iteration (`rl_loop.Iteration`) for config section
    `p` (= c.ppo). cfgs: model configs by role (policy, ref, value, reward; reward None: no
    reward model). With a mesh, the update's output state keeps `state_sharding`. The sampler's
    `p.top_k` / `p.top_p` (default 0 / 1: off) filter the old and new policy log-probs
    (`score_rollout`, `make_update`).

    host_rewards (`rl_loop.HostRewards`, from reward.functions): the sequence score is then
    reward_weight * (reward-model score) + the weighted sum of the reward functions.

    behaviour_logprobs="sampler": the sampler's log-probs are the old ones (no policy forward in
    the scoring pass); the entropy and the sampler-vs-trainer difference are then measured in
    the update (first epoch / first minibatch)."""
    sampler_lp = behaviour_logprobs == "sampler"
    from easyrl import parallel
    from easyrl.train.rl_loop import Iteration
    plen = p.max_prompt_len
    top_k, top_p = int(p.get("top_k", 0)), float(p.get("top_p", 1.0))
    score = jax.jit(lambda models, tokens, attn, m: score_rollout(
        cfgs, models, tokens, attn, m, prompt_len=plen, temperature=p.temperature, top_k=top_k,
        top_p=top_p, policy_pass=not sampler_lp))

    def adv(scored, roll, ctrl):
        if sampler_lp:
            scored = dict(scored, logprobs=roll["logprobs"].astype(jnp.float32)
                          * roll["resp_mask"].astype(jnp.float32))
        if host_rewards is not None:
            # an unscorable row (every reward function returned None) adds 0 to the score
            scored = dict(scored, scores=reward_weight * scored["scores"]
                          + jnp.nan_to_num(roll["rewards"]))
        elif reward_weight != 1.0:
            scored = dict(scored, scores=reward_weight * scored["scores"])
        a, ret, stats = advantages(
            scored, roll["resp_mask"], roll["has_eos"], kl_coef=ctrl["kl_coef"],
            kl_estimator=p.kl_estimator, gamma=p.gamma, lam=p.lam,
            missing_eos_penalty=p.missing_eos_penalty or None, whiten=p.whiten_advantages)
        inputs = dict(tokens=roll["tokens"], attn=roll["attn"], resp_mask=roll["resp_mask"],
                      logprobs=scored["logprobs"], values=scored["values"], advantages=a,
                      returns=ret)
        # the sampler's log-probs vs the scoring pass's (the behaviour log-probs PPO uses)
        m = roll["resp_mask"].astype(jnp.float32)
        d = jnp.abs(scored["logprobs"] - roll["logprobs"].astype(jnp.float32) * m) * m
        stats = dict(stats, **{"rollout/logprob_diff_max": jnp.max(d),
                               "rollout/logprob_diff_mean": jnp.sum(d) / jnp.maximum(jnp.sum(m), 1)})
        return inputs, stats

    out_sh = None if mesh is None else (state_sharding, parallel.replicated(mesh))
    update = jax.jit(make_update(
        cfgs["policy"], cfgs["value"], policy_tx, value_tx, prompt_len=plen,
        temperature=p.temperature, ppo_epochs=p.ppo_epochs, num_minibatches=p.num_minibatches,
        cliprange=p.cliprange, cliprange_value=p.cliprange_value, vf_coef=p.vf_coef,
        ratio_threshold=p.ratio_threshold, target_kl=p.target_kl, policy_mask=policy_mask,
        value_mask=value_mask, top_k=top_k, top_p=top_p, sampler_logprobs=sampler_lp),
        donate_argnums=(0,),
        out_shardings=out_sh)

    def models(state, frozen):  # LoRA: the policy's own base (+ the frozen initial adapters)
        ref = reference_params(frozen["ref"], frozen.get("ref_adapters"), state.policy)
        return dict(policy=state.policy, ref=ref, value=state.value, reward=frozen["reward"])

    return Iteration(models=models, score=score, advantages=jax.jit(adv), update=update,
                     policy=lambda state: state.policy, rewards=host_rewards)


# ----------------------------------------------------------------------------- wiring
def behaviour(c) -> str:
    """rollout.behaviour_logprobs: sampler | trainer (auto = trainer for PPO: its scoring pass
    runs anyway for the values, the reference and the reward model)."""
    mode = (c.get("rollout") or {}).get("behaviour_logprobs", "auto")
    return "trainer" if mode == "auto" else mode


def validate(c, mesh, max_positions: int) -> None:
    mode = (c.get("rollout") or {}).get("behaviour_logprobs", "auto")
    if mode not in ("auto", "sampler", "trainer"):
        raise ValueError(f"config rollout.behaviour_logprobs: {mode!r}; valid: auto, sampler, "
                         f"trainer")
    from easyrl import parallel
    p = c.ppo
    if not p.temperature > 0:
        raise ValueError(f"config ppo.temperature: {p.temperature}; PPO needs a sampling "
                         f"temperature > 0 (log-probs divide the logits by it; greedy rollouts "
                         f"are not PPO)")
    if not 0.0 < p.get("top_p", 1.0) <= 1.0:
        raise ValueError(f"config ppo.top_p: {p.top_p} must be in (0, 1] (1 = off)")
    if p.get("top_k", 0) < 0:
        raise ValueError(f"config ppo.top_k: {p.top_k} must be an integer >= 0 (0 = off)")
    for key in ("max_new_tokens", "max_prompt_len"):
        if not isinstance(p[key], int) or p[key] < 1:
            raise ValueError(f"config ppo.{key}: {p[key]!r} must be an int >= 1")
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
    if not (c.reward.path or c.reward.get("functions")):
        raise ValueError("config reward.path: PPO needs a reward source: a reward model (an "
                         "`easyrl rm` run dir or HF folder) and/or reward.functions")
    if not (c.value.path or c.reward.path):
        raise ValueError("config value.path: without a reward model (reward.path) the critic "
                         "needs its own initialization (an `easyrl rm` run dir or a causal-LM "
                         "folder, e.g. the SFT policy)")
    if p.kl_estimator not in ("k1", "k3"):
        raise ValueError(f"config ppo.kl_estimator: {p.kl_estimator!r}, expected k1 or k3")
    lo = c.model.get("lora")
    if lo is not None and lo.dropout > 0:
        raise ValueError(f"config model.lora.dropout: {lo.dropout}; PPO runs without dropout "
                         f"(the first minibatch's ratio must be 1), set it to 0")


def build(env):
    """Policy, reference, reward and value models, optimizers and the PPO state (`rl_loop.Online`)."""
    from easyrl import parallel
    from easyrl.model.trainable import trainable_mask
    from easyrl.train import setup
    from easyrl.train.optim import make_optimizer
    from easyrl.train.rl_loop import Online
    c, mesh, pcfg = env.config, env.mesh, env.policy_config
    p = c.ppo
    rcfg = reward = None
    if c.reward.path:
        rc = config_at(c, c.reward.path, lora_on=False)
        rcfg = setup.model_config(rc)
        reward = setup.load_params(rc, rcfg, "reward", mesh)
    vc = config_at(c, c.value.path or c.reward.path)
    vcfg = setup.model_config(vc)
    policy = setup.load_params(c, pcfg, "causal_lm", mesh)
    use_lora = pcfg.lora_rank > 0
    # LoRA: the reference is the policy with its adapters off (no copy; with model.lora.init_from
    # the base + a frozen copy of the loaded adapter); else a frozen copy (`common.reference`)
    ref, ref_adapters, ref_cfg = reference(c, policy, pcfg)
    value = setup.load_params(vc, vcfg, "value", mesh, init_missing_head=True)  # LM: fresh head
    pol_mask = trainable_mask(policy) if use_lora else None
    val_mask = trainable_mask(value) if vcfg.lora_rank > 0 else None
    n_updates = env.total_steps * p.ppo_epochs * p.num_minibatches
    policy_tx, _ = make_optimizer(c.optim, n_updates)
    value_tx, _ = make_optimizer(c.value_optim, n_updates)
    repl = parallel.replicated(mesh)
    sh = lambda t: jax.tree.map(lambda x: x.sharding, t)  # noqa: E731
    pol_train = partition(policy, pol_mask)[0]  # optimizer state: trainable leaves only
    val_train = partition(value, val_mask)[0]
    pol_opt_sh = parallel.named_shardings(jax.eval_shape(policy_tx.init, pol_train), mesh)
    val_opt_sh = parallel.named_shardings(jax.eval_shape(value_tx.init, val_train), mesh)
    state = PPOState(step=jnp.zeros((), jnp.int32), policy=policy, value=value,
                     policy_opt=jax.jit(policy_tx.init, out_shardings=pol_opt_sh)(pol_train),
                     value_opt=jax.jit(value_tx.init, out_shardings=val_opt_sh)(val_train))
    state_sh = PPOState(step=repl, policy=sh(policy), value=sh(value), policy_opt=pol_opt_sh,
                        value_opt=val_opt_sh)
    state = jax.device_put(state, state_sh)
    cfgs = dict(policy=pcfg, ref=ref_cfg, value=vcfg, reward=rcfg)
    hr = None
    if c.reward.get("functions"):  # host reward functions, added to the reward model's score
        from easyrl.train.rl_loop import HostRewards, reward_set
        hr = HostRewards(reward_set(c, int(p.max_new_tokens)), env.tokenizer, mesh)
    it = make_iteration(cfgs, p, policy_tx, value_tx, policy_mask=pol_mask, value_mask=val_mask,
                        state_sharding=state_sh, mesh=mesh, host_rewards=hr,
                        reward_weight=float(c.reward.get("weight", 1.0)),
                        behaviour_logprobs=behaviour(c))

    def items(s):
        return dict(params=s.policy, value=s.value, policy_opt=s.policy_opt, value_opt=s.value_opt)

    def restore(s, a, meta):
        return s.replace(policy=a["params"], value=a["value"], policy_opt=a["policy_opt"],
                         value_opt=a["value_opt"], step=jax.device_put(jnp.int32(meta["step"]), repl))

    def after_iteration(ctrl, metrics):
        if not p.adaptive_kl:
            return ctrl
        return dict(ctrl, kl_coef=float(losses.adaptive_kl_update(
            ctrl["kl_coef"], metrics["objective/kl"], c.train.batch_size, target=p.kl_target,
            horizon=p.kl_horizon)))

    return Online(state=state, frozen=dict(ref=ref, ref_adapters=ref_adapters, reward=reward),
                  iteration=it,
                  ctrl=dict(kl_coef=float(p.kl_coef)), items=items, restore=restore,
                  after_iteration=after_iteration)


ALGORITHM = Algorithm(
    command="ppo", help="PPO with a KL penalty, rollouts from the jitted sampler", loop="online",
    order=50, online=types.SimpleNamespace(section="ppo", validate=validate, build=build))
train = ALGORITHM.train
