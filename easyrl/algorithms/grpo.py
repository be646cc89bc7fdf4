"""GRPO and its family (Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++): critic-free online RL on the
online-RL loop (`easyrl.train.rl_loop`), formulas in `easyrl.losses.group` and
docs/algorithms.md ("Group methods").

Per iteration (`python -m easyrl grpo --config configs/grpo.py:PRESET`):
  1. rollout: every prompt repeated grpo.num_generations (G) times, sampled by easyrl's sampler;
  2. rewards on the host (`rl_loop.HostRewards`: reward functions, a reward model, or both),
     DAPO dynamic sampling optionally refilling groups whose rewards are all equal;
  3. `score`: ONE jitted pass (micro-batched) of the old log-probs (only when the update is off
     policy: num_iterations > 1 or num_minibatches > 1; else the update's own log-probs,
     detached, are the old ones, as TRL) and of the reference (only when grpo.beta > 0);
  4. `advantages`: grpo (group-normalised), rloo, reinforce_pp[_baseline];
  5. `make_update`: num_iterations x num_minibatches optimizer steps of the clipped surrogate
     (token or sequence level), each accumulated over micro-batches inside one jit, loss
     aggregated by grpo.loss_type with its global normaliser (split-invariant for dapo,
     dr_grpo and grpo; bnpo averages micro-batch token means as TRL does).

KL (beta > 0): advantage=grpo puts beta * k3(pi, ref) in the loss (TRL GRPOTrainer); rloo and
reinforce_pp* put it in the reward as beta * k1 (old log-probs minus reference; TRL RLOO: per
sequence, subtracted from the score; REINFORCE++: per token, OpenRLHF). beta = 0: no reference
model is held at all. LoRA: reference = the policy's base with the adapters off, or the base
with the frozen loaded adapter (`common.reference`).
"""
from __future__ import annotations

import logging
import types

import jax
import jax.numpy as jnp

from easyrl import losses, parallel
from easyrl.algorithms.common import chunked, reference, reference_params
from easyrl.algorithms.registry import Algorithm
from easyrl.losses import group as G
from easyrl.rollout import response_logprobs
from easyrl.train.step import counted_step

ADVANTAGES = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
log = logging.getLogger("easyrl.grpo")
BEHAVIOUR = ("auto", "sampler", "trainer")


def settings(c):
    """c.grpo plus the resolved rollout settings (c.rollout): `behaviour_logprobs` sampler |
    trainer (auto: the sampler's own log-probs when the model computes in float32, where they
    equal the trainer's to ~1e-6; the trainer's otherwise), `is_correction`, `is_cap`."""
    import ml_collections as mlc
    g = mlc.ConfigDict(c.grpo.to_dict())
    ro = c.get("rollout") or {}
    mode = ro.get("behaviour_logprobs", "auto")
    if mode == "auto":
        mode = "sampler" if c.model.dtype == "float32" else "trainer"
    g.behaviour_logprobs = mode
    g.is_correction = ro.get("is_correction", "none")
    g.is_cap = float(ro.get("is_cap", 2.0))
    g.is_cap_min = float(ro.get("is_cap_min", 0.0))
    return g


def _behaviour(g) -> str:
    return g.get("behaviour_logprobs", "trainer")


def needs_old(g) -> bool:
    """Does the update run off-policy with the trainer's own old log-probs (so they need a
    pass of their own)? With behaviour_logprobs=sampler the sampler's are the old ones."""
    return (g.num_iterations > 1 or g.num_minibatches > 1) and _behaviour(g) == "trainer"


def needs_ref(g) -> bool:
    return g.beta > 0


def kl_in_loss(g) -> bool:
    return g.advantage == "grpo" and g.beta > 0


def micro_rows(c) -> int:
    """Completions per micro-batch (train.micro_batch_size prompts x G; 0: a whole minibatch)."""
    g = c.grpo
    prompts = c.train.micro_batch_size or c.train.batch_size // g.num_minibatches
    return prompts * g.num_generations


def make_score(cfgs, g, n_chunks: int = 1):
    """score(models, tokens, attn, resp_mask) -> {old_logprobs?, ref_logprobs?} [N, T]."""
    plen, temp = g.max_prompt_len, g.temperature
    top_k, top_p = int(g.top_k), float(g.top_p)
    want_old = needs_old(g) or (g.advantage != "grpo" and needs_ref(g)
                                and _behaviour(g) == "trainer")
    want_ref = needs_ref(g)

    def one(models, tokens, attn, resp_mask):
        m = resp_mask.astype(jnp.float32)
        out = {}
        if want_old:
            lp, _ = response_logprobs(cfgs["policy"], models["policy"], tokens, attn, plen, temp,
                                      top_k, top_p)
            out["old_logprobs"] = lp * m
        if want_ref:  # same temperature, never filtered (as PPO's reference)
            lp, _ = response_logprobs(cfgs["ref"], models["ref"], tokens, attn, plen, temp)
            out["ref_logprobs"] = lp * m
        return out

    def score(models, tokens, attn, resp_mask):
        if not (want_old or want_ref):
            return {}
        return chunked(lambda t, a, r: one(models, t, a, r), n_chunks, tokens, attn, resp_mask)

    return score


def advantages(scored, roll, g):
    """(update inputs, stats) from the rewards [N] and the scoring pass."""
    mask = roll["resp_mask"].astype(jnp.float32)
    has_eos = roll["has_eos"]
    rewards = roll["rewards"].astype(jnp.float32)
    n_gen = int(g.num_generations)
    zeros = jnp.zeros_like(mask)
    sampler_lp = roll["logprobs"].astype(jnp.float32) * mask
    if _behaviour(g) == "sampler":
        scored = dict(scored, old_logprobs=sampler_lp)
    old, ref = scored.get("old_logprobs", zeros), scored.get("ref_logprobs", zeros)
    stats = {}
    penalised = g.advantage != "grpo" and g.beta > 0
    scorable = ~jnp.isnan(rewards)  # NaN: every reward function returned None (advantage 0)
    if g.advantage == "grpo":
        adv = G.group_advantages(rewards, n_gen, "grpo", g.scale_rewards, g.adv_eps)
        adv = jnp.broadcast_to(adv[:, None], mask.shape)
    elif g.advantage == "rloo":
        kl_seq = jnp.sum((old - ref) * mask, -1)
        r = rewards - g.beta * kl_seq if penalised else rewards
        adv = jnp.broadcast_to(G.group_advantages(r, n_gen, "rloo")[:, None], mask.shape)
    else:
        sc = rewards
        if g.advantage == "reinforce_pp_baseline":  # the group mean of the scorable rows
            grp = sc.reshape(-1, n_gen)
            sc = (grp - jnp.nanmean(grp, axis=1, keepdims=True)).reshape(-1)
        m_ok = mask * scorable[:, None]  # unscorable rows: out of the whitening, advantage 0
        adv, _ = G.reinforce_pp_returns(jnp.where(scorable, sc, 0.0), old, ref, m_ok,
                                        g.beta if penalised else 0.0)
        adv = jnp.where(scorable[:, None], adv, 0.0)
    if penalised:
        stats["kl"] = jnp.mean(jnp.sum((old - ref) * mask, -1))
    loss_mask = mask * has_eos[:, None] if g.mask_truncated_completions else mask
    grouped = rewards.reshape(-1, n_gen)
    lengths = jnp.sum(mask, -1)
    term = has_eos.astype(jnp.float32)
    n_term = jnp.maximum(jnp.sum(term), 1)
    big = jnp.float32(1e9)
    stats.update({
        "reward_std": (jnp.nan_to_num(jnp.nanmean(jnp.nanstd(grouped, axis=1, ddof=1)))
                       if n_gen > 1 else jnp.float32(0)),
        "completions/mean_length": jnp.mean(lengths),
        "completions/min_length": jnp.min(lengths),
        "completions/max_length": jnp.max(lengths),
        "completions/clipped_ratio": 1.0 - jnp.mean(term),
        "completions/mean_terminated_length": jnp.sum(lengths * term) / n_term,
        "completions/min_terminated_length": jnp.where(
            jnp.any(has_eos), jnp.min(jnp.where(has_eos, lengths, big)), 0.0),
        "completions/max_terminated_length": jnp.max(lengths * term),
        "advantages/mean": jnp.sum(adv * mask) / jnp.maximum(jnp.sum(mask), 1),
        "num_tokens_iter": jnp.sum(roll["attn"]).astype(jnp.float32),
    })
    inputs = dict(tokens=roll["tokens"], attn=roll["attn"], loss_mask=loss_mask, advantages=adv,
                  sampler_logprobs=sampler_lp)
    if "old_logprobs" in scored:  # the sampler's, or the scoring pass's (off-policy, trainer)
        inputs["old_logprobs"] = scored["old_logprobs"]
    if kl_in_loss(g):
        inputs["ref_logprobs"] = scored["ref_logprobs"]
    return inputs, stats


def denominators(loss_mask, g, n_micro: int):
    """The global normalisers of one minibatch (all its rows, across micro-batches and hosts)."""
    rows = loss_mask.shape[0]
    tokens = jnp.maximum(jnp.sum(loss_mask), 1.0)
    if g.loss_type == "dapo":
        loss = tokens
    elif g.loss_type == "dr_grpo":
        loss = jnp.float32(rows * g.max_new_tokens)
    elif g.loss_type in ("grpo", "rloo"):
        loss = jnp.float32(rows)
    else:  # bnpo: each micro-batch's token mean, averaged over the micro-batches
        loss = jnp.float32(n_micro)
    return dict(loss=loss, tokens=tokens, rows=jnp.float32(rows))


def make_loss(policy_cfg, g):
    """loss_fn(params, frozen, micro, rng, denom) -> (loss, metrics): sums over the micro-batch
    divided by the minibatch's global normalisers (`denominators`), so summing over the
    micro-batches gives the minibatch's value (`train.step.accumulate`)."""
    plen, temp = g.max_prompt_len, g.temperature
    top_k, top_p = int(g.top_k), float(g.top_p)
    beta = g.beta if kl_in_loss(g) else 0.0
    is_mode, is_cap = g.get("is_correction", "none"), float(g.get("is_cap", 2.0))
    is_min = float(g.get("is_cap_min", 0.0)) or None
    seq_level = g.importance_sampling_level == "sequence" or g.loss_type == "rloo"

    def loss_fn(params, frozen, mb, rng, denom):
        del frozen, rng
        m = mb["loss_mask"]
        lp, ent = response_logprobs(policy_cfg, params, mb["tokens"], mb["attn"], plen, temp,
                                    top_k, top_p)
        old = mb["old_logprobs"] if "old_logprobs" in mb else jax.lax.stop_gradient(lp)
        ref = mb.get("ref_logprobs")
        samp = mb.get("sampler_logprobs")
        extra, w = {}, None
        if samp is not None:
            if is_mode != "none":  # the trainer's old log-probs vs the sampler's
                w = G.is_weights(jax.lax.stop_gradient(old), samp, m, is_mode, is_cap, is_min)
                extra["rollout/is_weight_mean"] = losses.masked_sum(w, m) / denom["tokens"]
            diff = jnp.abs(jax.lax.stop_gradient(lp) - samp) * m
            extra["rollout/logprob_diff_mean"] = jnp.sum(diff) / denom["tokens"]
            extra["rollout/logprob_diff_max"] = jnp.max(diff)
        if g.loss_type == "rloo":  # TRL RLOOTrainer: one summed-ratio term per sequence
            seq_loss, clip = G.rloo_sequence_loss(lp, old, mb["advantages"][:, 0], m,
                                                  g.epsilon_low, g.epsilon_high)
        else:  # IS weights multiply the policy term only; beta * k3 is added after (TRL)
            per_tok, clip = G.grpo_token_loss(lp, old, mb["advantages"], m, g.epsilon_low,
                                              g.epsilon_high, g.importance_sampling_level,
                                              ref_logp=ref, beta=beta, is_weight=w)
        if g.loss_type == "rloo":
            loss = jnp.sum(seq_loss) / denom["loss"]
        elif g.loss_type == "grpo":
            seq = losses.masked_sum(per_tok, m, axis=-1) / jnp.maximum(jnp.sum(m, -1), 1)
            loss = jnp.sum(seq) / denom["loss"]
        elif g.loss_type == "bnpo":
            loss = G.aggregate(per_tok, m, "bnpo") / denom["loss"]
        else:
            loss = losses.masked_sum(per_tok, m) / denom["loss"]
        tok = lambda x: losses.masked_sum(x, m) / denom["tokens"]  # noqa: E731
        if seq_level:  # one ratio per sequence: the clip metrics count sequences (TRL)
            has = (jnp.sum(m, -1) > 0).astype(jnp.float32)
            metrics = {f"clip_ratio/{k}_mean": jnp.sum(
                (v if v.ndim == 1 else jnp.any(v, -1)).astype(jnp.float32) * has) / denom["rows"]
                for k, v in clip.items()}
        else:
            metrics = {f"clip_ratio/{k}_mean": tok(v.astype(jnp.float32))
                       for k, v in clip.items()}
        metrics["entropy"] = tok(ent)
        metrics["ratio"] = tok(jnp.exp(jnp.where(m > 0, lp - old, 0.0)))
        if ref is not None:
            metrics["kl"] = tok(G.k3_kl(lp, ref, m))
        return loss, {**metrics, **extra}

    return loss_fn


def make_update(policy_cfg, tx, g, *, n_micro: int = 1, trainable_mask=None):
    """update(state: TrainState, inputs, rng) -> (state, metrics): num_iterations passes over
    the rollout, each a random split into num_minibatches optimizer steps, each accumulated
    over `n_micro` micro-batches. A non-finite loss, gradient, update or parameter skips the
    step (counted in `nonfinite_updates`). metrics: means over the steps, plus `ratio/first`
    and `ratio/last` (the first and last step's token-mean ratio: 1 on the first step)."""
    loss_fn = make_loss(policy_cfg, g)
    steps = g.num_iterations * g.num_minibatches

    def one_step(state, mb, rng):
        return counted_step(loss_fn, tx, state, mb, rng, denominators(mb["loss_mask"], g, n_micro), n_micro,
                            trainable_mask)

    def update(state, inputs, rng):
        n = inputs["tokens"].shape[0]
        mbs = n // g.num_minibatches
        idx = jnp.stack([jax.random.permutation(jax.random.fold_in(rng, e), n)
                         for e in range(g.num_iterations)]).reshape(steps, mbs)

        def body(st, xs):
            i, k = xs  # this step's rows and its index (LoRA dropout key)
            mb = jax.tree.map(lambda x: parallel.constrain_batch(x[i]), inputs)
            return one_step(st, mb, jax.random.fold_in(rng, 1000 + k))

        state, stats = jax.lax.scan(body, state, (idx, jnp.arange(steps)))
        metrics = jax.tree.map(jnp.mean, stats)
        metrics["ratio/first"] = stats["ratio"][0]
        metrics["ratio/last"] = stats["ratio"][-1]
        for k in ("rollout/logprob_diff_mean", "rollout/logprob_diff_max"):
            if k in stats:  # the first step: the parameters the sampler ran
                metrics[k] = stats[k][0]
        metrics["nonfinite_updates"] = jnp.sum(stats["nonfinite_updates"])
        metrics.pop("ratio")
        return state.replace(step=state.step + 1), metrics

    return update


# ----------------------------------------------------------------------------- the iteration
def make_iteration(cfgs, g, tx, *, host_rewards=None, trainable_mask=None, state_sharding=None,
                   mesh=None, n_micro: int = 1, score_chunks: int = 1):
    """GRPO's jitted pieces of one online-RL iteration (`rl_loop.Iteration`) for config
    section `g` (= c.grpo). cfgs: model configs by role (policy, ref)."""
    from easyrl.train.rl_loop import Iteration
    score = jax.jit(make_score(cfgs, g, score_chunks))
    out_sh = None if mesh is None else (state_sharding, parallel.replicated(mesh))
    update = jax.jit(make_update(cfgs["policy"], tx, g, n_micro=n_micro,
                                 trainable_mask=trainable_mask),
                     donate_argnums=(0,), out_shardings=out_sh)

    def models(state, frozen):
        out = dict(policy=state.params, reward=frozen.get("reward"))
        if needs_ref(g):
            out["ref"] = reference_params(frozen["ref"], frozen.get("ref_adapters"), state.params)
        return out

    adv = jax.jit(lambda scored, roll, ctrl: advantages(scored, roll, g))
    return Iteration(models=models, score=score, advantages=adv, update=update,
                     policy=lambda state: state.params, group=int(g.num_generations),
                     rewards=host_rewards, filter_groups=bool(g.dynamic_sampling),
                     max_resample=int(g.max_resample))


# ----------------------------------------------------------------------------- wiring
def validate(c, mesh, max_positions: int) -> None:
    ro = c.get("rollout") or {}
    if ro.get("behaviour_logprobs", "auto") not in BEHAVIOUR:
        raise ValueError(f"config rollout.behaviour_logprobs: {ro.get('behaviour_logprobs')!r}; "
                         f"valid: {', '.join(BEHAVIOUR)}")
    if ro.get("is_correction", "none") not in G.IS_CORRECTIONS:
        raise ValueError(f"config rollout.is_correction: {ro.get('is_correction')!r}; valid: "
                         f"{', '.join(G.IS_CORRECTIONS)}")
    g = settings(c)
    if g.is_correction != "none" and g.behaviour_logprobs != "trainer":
        raise ValueError(f"config rollout.is_correction: {g.is_correction} corrects the trainer's "
                         f"old log-probs for the sampler's; with rollout.behaviour_logprobs="
                         f"{g.behaviour_logprobs} the sampler's ARE the old ones: set "
                         f"rollout.behaviour_logprobs=trainer")
    if not g.is_cap > 0:
        raise ValueError(f"config rollout.is_cap: {g.is_cap} must be > 0")
    if not 0 <= g.is_cap_min < g.is_cap:
        raise ValueError(f"config rollout.is_cap_min: {g.is_cap_min} must be in [0, "
                         f"rollout.is_cap={g.is_cap}) (0 = no lower bound)")

    def need(cond, key, msg):
        if not cond:
            raise ValueError(f"config grpo.{key}: {msg}")
    need(g.temperature > 0, "temperature", f"{g.temperature}; group RL needs a sampling "
         f"temperature > 0 (greedy samples of a prompt are all the same)")
    need(0.0 < g.top_p <= 1.0, "top_p", f"{g.top_p} must be in (0, 1] (1 = off)")
    need(g.top_k >= 0, "top_k", f"{g.top_k} must be an integer >= 0 (0 = off)")
    need(g.advantage in ADVANTAGES, "advantage",
         f"{g.advantage!r}; valid: {', '.join(ADVANTAGES)}")
    need(g.scale_rewards in G.SCALE_REWARDS, "scale_rewards",
         f"{g.scale_rewards!r}; valid: {', '.join(G.SCALE_REWARDS)}")
    need(g.loss_type in G.GROUP_LOSS_TYPES, "loss_type",
         f"{g.loss_type!r}; valid: {', '.join(G.GROUP_LOSS_TYPES)}")
    need(g.importance_sampling_level in G.IS_LEVELS, "importance_sampling_level",
         f"{g.importance_sampling_level!r}; valid: {', '.join(G.IS_LEVELS)}")
    need(g.loss_type != "rloo" or g.advantage == "rloo", "loss_type",
         f"rloo (TRL RLOOTrainer's summed sequence ratio) goes with advantage=rloo, got "
         f"advantage={g.advantage}")
    need(g.loss_type != "rloo" or g.importance_sampling_level == "token",
         "importance_sampling_level", "the rloo loss has its own sequence ratio: leave it 'token'")
    need(g.loss_type != "rloo" or g.is_correction == "none", "loss_type",
         "rloo does not take rollout.is_correction (TRL's RLOOTrainer has no IS correction)")
    if g.importance_sampling_level == "sequence" and g.loss_type in G.LENGTH_WEIGHTED:
        log.warning(  # TRL GRPOTrainer warns the same (grpo_trainer.py ~l.903)
            "config grpo.importance_sampling_level=sequence with loss_type=%s: that loss sums "
            "per-token terms, which weights each sequence by its completion length instead of "
            "optimizing the per-sequence objective; for the GSPO paper's setup use "
            "grpo.loss_type=grpo", g.loss_type)
    need(g.num_generations >= 2 or g.advantage in ("reinforce_pp",), "num_generations",
         f"{g.num_generations}; {g.advantage} compares the samples of a prompt: use >= 2")
    need(g.num_iterations >= 1, "num_iterations", f"{g.num_iterations} must be >= 1")
    need(g.beta >= 0, "beta", f"{g.beta} must be >= 0 (0 = no reference model)")
    need(0 <= g.epsilon_low < 1, "epsilon_low",
         f"{g.epsilon_low} must be in [0, 1) (clip range [1 - epsilon_low, 1 + epsilon_high])")
    need(g.epsilon_high >= 0, "epsilon_high",
         f"{g.epsilon_high} must be >= 0 (clip range [1 - epsilon_low, 1 + epsilon_high])")
    need(isinstance(g.max_new_tokens, int) and g.max_new_tokens >= 1, "max_new_tokens",
         f"{g.max_new_tokens!r} must be an int >= 1")
    need(isinstance(g.max_prompt_len, int) and g.max_prompt_len >= 1, "max_prompt_len",
         f"{g.max_prompt_len!r} must be an int >= 1")
    need(g.max_resample >= 0, "max_resample", f"{g.max_resample} must be >= 0")
    need(not g.dynamic_sampling or g.num_generations >= 2, "dynamic_sampling",
         "needs num_generations >= 2")
    b, dp = c.train.batch_size, parallel.data_parallel_size(mesh)
    need(g.num_minibatches > 0 and b % g.num_minibatches == 0, "num_minibatches",
         f"{g.num_minibatches} must divide train.batch_size={b} (prompts)")
    mb_rows = b // g.num_minibatches * g.num_generations
    micro = micro_rows(c)
    if mb_rows % micro:
        raise ValueError(f"config train.micro_batch_size: {c.train.micro_batch_size} prompts "
                         f"must divide a minibatch of {b // g.num_minibatches} prompts "
                         f"(train.batch_size / grpo.num_minibatches)")
    if micro % dp:
        raise ValueError(f"config train.micro_batch_size: a micro-batch of {micro} completions "
                         f"(x grpo.num_generations={g.num_generations}) is not divisible by the "
                         f"data-parallel size {dp} of mesh {c.mesh!r}")
    need(g.max_prompt_len + g.max_new_tokens <= max_positions, "max_new_tokens",
         f"max_prompt_len + max_new_tokens = {g.max_prompt_len + g.max_new_tokens} exceeds "
         f"max_position_embeddings={max_positions}")
    if not (c.reward.path or c.reward.functions):
        raise ValueError("config reward.functions: no reward source; set reward.functions "
                         "(e.g. synthetic, gsm8k_exact, my_rewards:fn) and/or reward.path")
    lo = c.model.get("lora")
    if lo is not None and lo.dropout > 0 and needs_old(g):
        raise ValueError(f"config model.lora.dropout: {lo.dropout}; the off-policy update "
                         f"(num_iterations / num_minibatches > 1) needs ratio 1 at its first "
                         f"step: set it to 0")


def build(env):
    """Policy (+ reference when beta > 0, + reward model when reward.path), optimizer, state."""
    from easyrl.model.trainable import trainable_mask
    from easyrl.train import setup
    from easyrl.train.rl_loop import Online, host_rewards, train_state
    c, mesh, pcfg = env.config, env.mesh, env.policy_config
    g = settings(c)
    hr, rparams = host_rewards(c, env, mesh, "grpo")
    policy = setup.load_params(c, pcfg, "causal_lm", mesh)
    ref = ref_adapters = None
    ref_cfg = pcfg
    if needs_ref(g):
        ref, ref_adapters, ref_cfg = reference(c, policy, pcfg)
    mask = trainable_mask(policy) if pcfg.lora_rank > 0 else None
    state, state_sh, tx = train_state(c, mesh, policy, mask,
                                      env.total_steps * g.num_iterations * g.num_minibatches)
    repl = parallel.replicated(mesh)
    rows = c.train.batch_size * g.num_generations
    micro = micro_rows(c)
    it = make_iteration(dict(policy=pcfg, ref=ref_cfg), g, tx, host_rewards=hr,
                        trainable_mask=mask, state_sharding=state_sh, mesh=mesh,
                        n_micro=rows // g.num_minibatches // micro, score_chunks=rows // micro)

    def items(s):
        return dict(params=s.params, opt_state=s.opt_state)

    def restore(s, a, meta):
        return s.replace(params=a["params"], opt_state=a["opt_state"],
                         step=jax.device_put(jnp.int32(meta["step"]), repl))

    def after_iteration(ctrl, metrics):
        total = ctrl["num_tokens"] + metrics.pop("num_tokens_iter", 0.0)
        metrics["num_tokens"] = total
        return dict(ctrl, num_tokens=total)

    return Online(state=state, frozen=dict(ref=ref, ref_adapters=ref_adapters, reward=rparams),
                  iteration=it, ctrl=dict(num_tokens=0.0), items=items, restore=restore,
                  after_iteration=after_iteration)


ALGORITHM = Algorithm(
    command="grpo", help="GRPO / Dr. GRPO / DAPO / GSPO / RLOO / REINFORCE++ with reward functions",
    loop="online", order=55,
    online=types.SimpleNamespace(section="grpo", validate=validate, build=build,
                                 postfix=("reward", "kl")))
train = ALGORITHM.train
