"""PPO with a KL penalty (StackLLaMA, Tulu 2.5): the pure pieces of one iteration.

Per iteration (`ppo_loop.py` wires it):
  1. rollout: easyrl's jitted sampler on left-padded prompts [B, P] -> responses [B, N];
  2. `score_rollout`: ONE jitted pass gives old log-probs, reference log-probs, values, the
     reward-model score and the entropy;
  3. `advantages`: per-token rewards (-kl_coef * kl_t, plus the score minus the missing-EOS
     penalty at the last token), GAE in a lax.scan, whitening over valid tokens;
  4. `make_update`: ppo_epochs x minibatches of clipped policy + value losses, one jit, with the
     ratio-threshold skip and the target-KL early stop done on device.
Log-probs use logits / temperature, as the sampler does.

LoRA (`model.lora.rank > 0`): the policy and the value model train only their adapters (and the
value head); the reference is the policy's own parameters applied with the adapters off
(`cfgs["ref"] = lora.disabled(policy config)`, `models["ref"] = models["policy"]`), so no second
copy of the weights is held.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import optax

from easyrl import losses
from easyrl import model as M
from easyrl.model.lora import combine, partition
from easyrl.train.optim import global_norm


@flax.struct.dataclass
class PPOState:
    step: jax.Array
    policy: dict
    value: dict
    policy_opt: object
    value_opt: object


def response_logprobs(config, params, tokens, attn, prompt_len: int, temperature: float):
    """(logprobs [B,N], entropy [B,N]) of the response tokens (positions P.. of `tokens`)."""
    logits = M.forward(config, params, tokens, attn)
    lp = losses.token_logprobs(logits, tokens, temperature)[:, prompt_len:]
    ent = losses.token_entropy(logits, temperature)[:, prompt_len:]
    return lp, ent


def response_values(config, params, tokens, attn, prompt_len: int):
    """V [B,N]: the value head at the position before each response token (the state that chose
    it), i.e. aligned with the log-probs."""
    return M.values(config, params, tokens, attn)[:, prompt_len - 1:-1]


def score_rollout(cfgs, models, tokens, attn, resp_mask, *, prompt_len: int, temperature: float):
    """The single scoring pass. cfgs/models: dicts with keys policy, ref, value, reward (cfgs
    may give the reference its own config, e.g. LoRA adapters off; default: the policy's)."""
    lp, ent = response_logprobs(cfgs["policy"], models["policy"], tokens, attn, prompt_len, temperature)
    ref_cfg = cfgs.get("ref", cfgs["policy"])
    ref_lp, _ = response_logprobs(ref_cfg, models["ref"], tokens, attn, prompt_len, temperature)
    values = response_values(cfgs["value"], models["value"], tokens, attn, prompt_len)
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
                policy_mask=None, value_mask=None):
    """update(state, rollout, rng) -> (state, metrics). rollout: tokens, attn, resp_mask,
    logprobs, values, advantages, returns ([B, ...]); minibatches are random row subsets.

    policy_mask / value_mask (bool pytrees, LoRA): only their True leaves get gradients and
    updates; the optimizer states cover `lora.partition(params, mask)[0]`."""

    def loss_fn(params, fixed, mb):
        policy, value = (combine(t, f) for t, f in zip(params, fixed))
        mask = mb["resp_mask"].astype(jnp.float32)
        lp, _ = response_logprobs(policy_cfg, policy, mb["tokens"], mb["attn"], prompt_len, temperature)
        v = response_values(value_cfg, value, mb["tokens"], mb["attn"], prompt_len)
        pg, pstats = losses.ppo_policy_loss(lp, mb["logprobs"], mb["advantages"], mask, cliprange)
        vf, vstats = losses.ppo_value_loss(v, mb["values"], mb["returns"], mask, cliprange_value)
        loss = pg + vf_coef * vf
        return loss, {**pstats, **vstats, "loss/policy": pg, "loss/value": vf}

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
        pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(skip, b, a), new, old)  # noqa: E731
        state = state.replace(
            policy=combine(pick(optax.apply_updates(pol, up_p), pol), pol_fixed),
            value=combine(pick(optax.apply_updates(val, up_v), val), val_fixed),
            policy_opt=pick(pol_opt, state.policy_opt), value_opt=pick(val_opt, state.value_opt))
        if target_kl > 0:  # stop the remaining updates of this iteration once KL runs away
            stopped = stopped | (stats["policy/approxkl"] > target_kl)
        stats = dict(stats, grad_norm=global_norm(g_pol), value_grad_norm=global_norm(g_val),
                     skipped=skip.astype(jnp.float32))
        return (state, rollout, stopped), stats

    def update(state: PPOState, rollout: dict, rng):
        b = rollout["tokens"].shape[0]
        mbs = b // num_minibatches
        idx = jnp.stack([jax.random.permutation(jax.random.fold_in(rng, e), b)
                         for e in range(ppo_epochs)]).reshape(ppo_epochs * num_minibatches, mbs)
        (state, _, stopped), stats = jax.lax.scan(minibatch, (state, rollout, jnp.array(False)), idx)
        first = jax.tree.map(lambda x: x[0], stats)  # the first minibatch (rho == 1 at lr 0)
        metrics = jax.tree.map(jnp.mean, stats)
        metrics["policy/approxkl_first"] = first["policy/approxkl"]
        metrics["policy/ratio_first"] = first["policy/ratio"]
        metrics["ppo/early_stopped"] = stopped.astype(jnp.float32)
        return state.replace(step=state.step + 1), metrics

    return update


def train(c) -> dict:
    from easyrl.algorithms.ppo_loop import run
    return run(c)
