"""The online-RL loop: prompts -> rollout (easyrl's sampler) -> rewards and the scoring pass ->
advantages -> update, on the run scaffold (`easyrl.train.run`: mesh, checkpoints, resume,
preemption, metrics, progress).

An algorithm (registry record with `loop="online"`, e.g. PPO) supplies only what differs, as an
object with

    section                      its config section (c.ppo): max_prompt_len, max_new_tokens,
                                 temperature, top_k, top_p, samples_every, num_samples, true_reward
    validate(c, mesh, max_positions)
    build(env: RLEnv) -> Online  its models, state and the jitted pieces of one iteration

The iteration itself (`iterate`) is shared with `benchmarks/ppo_iteration.py` and
`benchmarks/grpo_iteration.py`, so what is timed there is what trains here.

Group methods (GRPO, RLOO, ...): `Iteration.group = G` repeats every prompt G times (consecutive
rows, expanded on each host from its own prompts, so a prompt's group is generated and
rewarded on one host); `Iteration.rewards` (a `HostRewards`) runs the reward functions on the
host after the rollout, each host on its own rows, and gathers the values of all hosts before
the advantages. With `filter_groups` (DAPO dynamic sampling) groups whose rewards are all
equal are replaced by groups from up to `max_resample` more prompt batches (each host refills
its own rows from its own prompts).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from easyrl import parallel, rollout
from easyrl.algorithms.common import config_at, fmt, iter_kwargs
from easyrl.data.iterator import prompt_iterator
from easyrl.generate import make_sampler
from easyrl.rewards import DEFAULT_TIMEOUT, TrainerState, check_isolation
from easyrl.train import setup
from easyrl.train.config import SYNTHETIC
from easyrl.train.metrics import restart_jsonl
from easyrl.train.run import NonFiniteError, Run, RunResult, total_steps

SAMPLES = "samples.jsonl"  # prompts, responses and scores every ppo.samples_every steps


@dataclasses.dataclass
class RLEnv:
    """What the loop prepared for the algorithm's `build`."""
    config: Any
    mesh: Any
    tokenizer: Any
    policy_config: Any
    total_steps: int


@dataclasses.dataclass
class Iteration:
    """The jitted pieces of one iteration, built by the algorithm.

    models(state, frozen) -> dict          the scoring pass's models
    score(models, tokens, attn, resp_mask) -> scored   ONE pass (old / reference log-probs,
                                           the reward model's score, values, entropy, ...)
    advantages(scored, roll, ctrl) -> (update inputs, stats)
    update(state, inputs, rng) -> (state, metrics)     state donated
    policy(state) -> the policy params the sampler runs
    """
    models: Callable
    score: Callable
    advantages: Callable
    update: Callable
    policy: Callable
    group: int = 1  # samples per prompt (consecutive rows of the rollout)
    rewards: Optional["HostRewards"] = None  # host reward sources -> roll["rewards"] [N]
    filter_groups: bool = False  # DAPO dynamic sampling (needs rewards)
    max_resample: int = 0  # extra prompt batches dynamic sampling may draw per iteration


class HostRewards:
    """Reward sources run on the host after each rollout (`easyrl.rewards.RewardSet`), plus an
    optional reward model (`reward_config`: scored on device, one more source named
    `reward_model` with `reward_weight`) and a missing-EOS penalty (subtracted from the total
    of a completion that did not end with EOS, as TRL's `missing_eos_penalty`).

    `values(models, roll, host)`: each host decodes and rewards ITS rows of the global rollout
    (the rows its own prompts produced; `host` holds their prompt texts and columns), then the
    [N, K] values of all hosts are gathered, so every host holds the same array.
    `total(values, has_eos)` -> (total [N] float32, metrics)."""

    def __init__(self, reward_set, tokenizer, mesh, *, reward_config=None, reward_weight=1.0,
                 missing_eos_penalty=0.0):
        from easyrl import model as M
        self.set, self.tok, self.mesh = reward_set, tokenizer, mesh
        self.penalty = float(missing_eos_penalty)
        self._rm_fn, self._rm_local = None, None
        if reward_config is not None:
            self._rm_fn = jax.jit(lambda params, tokens, attn: M.score(reward_config, params,
                                                                       tokens, attn))
            self.set.add_model("reward_model", reward_weight, lambda p, c, ids: self._rm_local)

    def values(self, models, roll, host, trainer_state=None):
        """(values [N, K] float64 on every host, this host's completion texts). Stops the run
        (`RewardError`) when every source returned None for every row of the iteration, and
        prints one warning line for rows where every source returned None (they are NaN)."""
        from easyrl.rewards import RewardError, unscorable_warning
        mine = host_rows(roll["tokens"].shape[0])
        resp, mask = parallel.to_host(roll["response"]), parallel.to_host(roll["resp_mask"])
        ids = [[int(t) for t, m in zip(r, mr) if m] for r, mr in zip(resp[mine], mask[mine])]
        texts = [self.tok.decode(x, skip_special_tokens=True).strip() for x in ids]
        if self._rm_fn is not None:
            scores = parallel.to_host(self._rm_fn(models["reward"], roll["tokens"], roll["attn"]))
            self._rm_local = scores[mine]
        vals = self.set.values(host["prompts"], texts, ids, host["columns"],
                               trainer_state=trainer_state, messages=host.get("messages"))
        if jax.process_count() > 1:
            vals = parallel.to_host(parallel.to_global_batch({"v": vals}, self.mesh)["v"])
        if vals.size and np.isnan(vals).all():
            cols = sorted(host["columns"]) or ["none"]
            raise RewardError(
                f"every reward function ({', '.join(self.set.names)}) returned None for every "
                f"row of this iteration; the prompt rows have the columns: {', '.join(cols)} "
                f"(e.g. exact_match needs an 'answer' column: data.columns=SRC:answer renames)")
        warning = unscorable_warning(host["prompts"], texts, vals[mine])
        if warning:
            print(warning, file=sys.stderr, flush=True)
        return vals, texts

    def total(self, values, has_eos):
        from easyrl.rewards import reward_stats
        total, metrics = self.set.combine(values)
        metrics.update(self.set.extra_metrics)
        if self.penalty:
            total = (total - self.penalty * (~np.asarray(has_eos, bool))).astype(np.float32)
            metrics.update(reward_stats(total))
        return total, metrics


def reward_set(c, max_new_tokens: int):
    """The run's reward functions (config reward.functions / weights / num_workers / timeout /
    on_error), with `max_completion_length` = max_new_tokens for the functions."""
    from easyrl import rewards
    r = c.reward
    return rewards.load_reward_functions(
        r.functions, r.weights, context={"max_completion_length": int(max_new_tokens)},
        num_workers=r.get("num_workers", 0), timeout=r.get("timeout", rewards.DEFAULT_TIMEOUT),
        on_error=r.get("on_error", "raise"))


def host_rewards(c, env, mesh, section: str):
    """(HostRewards, reward model params or None): the run's reward sources, reward.functions
    and reward.path, with config section `section`'s max_new_tokens (the reward functions'
    `max_completion_length`) and missing_eos_penalty."""
    s = c[section]
    rs = reward_set(c, int(s.max_new_tokens))
    rcfg = rparams = None
    if c.reward.path:
        rc = config_at(c, c.reward.path, lora_on=False)
        rcfg = setup.model_config(rc)
        rparams = setup.load_params(rc, rcfg, "reward", mesh)
    hr = HostRewards(rs, env.tokenizer, mesh, reward_config=rcfg,
                     reward_weight=float(c.reward.get("weight", 1.0)),
                     missing_eos_penalty=float(s.missing_eos_penalty))
    return hr, rparams


def train_state(c, mesh, policy, mask, n_updates: int):
    """(state, state_sharding, tx): the policy's `TrainState` for `n_updates` optimizer steps of
    c.optim, its optimizer state over the trainable leaves (`mask`; None: all) born sharded,
    everything placed on `mesh` (own buffers: the state is donated to the update)."""
    from easyrl.model.trainable import partition
    from easyrl.train.optim import make_optimizer
    from easyrl.train.step import TrainState
    tx, _ = make_optimizer(c.optim, n_updates)
    repl = parallel.replicated(mesh)
    train = partition(policy, mask)[0]
    opt_sh = parallel.named_shardings(jax.eval_shape(tx.init, train), mesh)
    z = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
    state = TrainState(step=z(), params=policy,
                       opt_state=jax.jit(tx.init, out_shardings=opt_sh)(train), nonfinite=z(),
                       streak=z())
    state_sh = TrainState(step=repl, params=jax.tree.map(lambda x: x.sharding, policy),
                          opt_state=opt_sh, nonfinite=repl, streak=repl)
    return jax.device_put(state, state_sh), state_sh, tx


def host_rows(n: int) -> slice:
    """This process's rows of a global batch of `n` rows (`parallel.to_global_batch` places
    process p's local rows at p * n / P ...)."""
    nl = n // jax.process_count()
    return slice(jax.process_index() * nl, (jax.process_index() + 1) * nl)


def expand(batch: dict, host: dict, g: int):
    """Repeat every prompt row `g` times (consecutive): host arrays [b, P] -> [b*g, P], and
    the host info (`prompts` texts, `columns` lists) alike."""
    rep = lambda v: [x for x in v for _ in range(g)]  # noqa: E731
    out = dict(prompts=rep(host["prompts"]),
               columns={k: rep(v) for k, v in host.get("columns", {}).items()})
    if host.get("messages") is not None:
        out["messages"] = rep(host["messages"])
    return {k: np.repeat(np.asarray(v), g, axis=0) for k, v in batch.items()}, out


def _spread(x) -> float:
    """max - min of a group's scorable (non-NaN) rewards; 0 when fewer than two."""
    x = np.asarray(x, np.float64)
    x = x[~np.isnan(x)]
    return float(x.max() - x.min()) if x.size > 1 else 0.0


def pick_groups(rounds: list, g: int, n_proc: int):
    """DAPO dynamic sampling: choose each host's groups from `rounds` (reward arrays [N] of the
    rollouts drawn so far, rows ordered by host): groups whose rewards are not all equal first
    (in round order), then, if a host is still short, its zero-std groups. Returns (done,
    global row index [N] into the concatenated rounds, zero-std groups kept). `done`: every
    host has enough non-degenerate groups."""
    n = len(rounds[0])
    nl = n // n_proc
    want = nl // g
    idx, kept_flat, done = [], 0, True
    for p in range(n_proc):
        good, flat = [], []
        for r, rew in enumerate(rounds):
            for j in range(want):
                lo = p * nl + j * g
                rows = list(range(r * n + lo, r * n + lo + g))
                (good if _spread(rew[lo:lo + g]) > 0 else flat).append(rows)
        done &= len(good) >= want
        chosen = (good + flat)[:want]
        kept_flat += max(0, want - len(good))
        idx += [i for rows in chosen for i in rows]
    return done, np.asarray(idx, np.int32), kept_flat


@jax.jit
def _take_rows(rolls, idx):
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0)[idx], *rolls)


@dataclasses.dataclass
class Online:
    """An algorithm's built run: state, frozen models, the iteration, its controller and what
    to checkpoint.

    ctrl: a dict of host floats passed to `advantages` (e.g. PPO's kl_coef), saved in the
    checkpoint meta; `after_iteration(ctrl, metrics) -> ctrl` updates it (adaptive KL).
    items(state) -> {name: pytree}; restore(state, arrays, meta) -> state."""
    state: Any
    frozen: Any
    iteration: Iteration
    ctrl: dict
    items: Callable
    restore: Callable
    after_iteration: Callable = lambda ctrl, metrics: ctrl


def iterate(it: Iteration, sampler, state, frozen, prompts: dict, rng, ctrl: dict,
            host: Optional[dict] = None, more: Optional[Callable] = None, shared: int = 1,
            trainer_state=None):
    """One iteration: rollout, host rewards (if `it.rewards`), scoring, advantages, update.
    Returns (state, metrics (host floats, with `time/rollout`, `time/rewards`, `time/score`,
    `time/update`), roll, scored).

    prompts: global {input_ids, attention_mask} [N, P], already expanded to `it.group` rows per
    prompt, or, with `shared` = G (a sampler made with num_samples=G: each prompt prefilled
    once), [N / G, P]. host: this host's rows' {prompts, columns} (expanded; needed with
    `it.rewards`); it is updated in place to the rows trained on, with `completions` (texts)
    and `rewards` (totals). more(): the next (prompts, host) batch, for dynamic sampling.
    trainer_state: what the reward functions get as `trainer_state` (`rewards.TrainerState`)."""
    t0 = time.time()
    models = it.models(state, frozen)
    roll = rollout.sample(sampler, it.policy(state), prompts, jax.random.fold_in(rng, 0), shared)
    jax.block_until_ready(roll["resp_mask"])
    t1 = time.time()
    rmetrics: dict = {}
    if it.rewards is not None:
        vals, texts = it.rewards.values(models, roll, host, trainer_state)
        rounds = [(roll, dict(host, completions=texts), vals)]
        totals = [it.rewards.total(vals, parallel.to_host(roll["has_eos"]))[0]]
        if it.filter_groups:
            while len(rounds) <= it.max_resample and not pick_groups(
                    totals, it.group, jax.process_count())[0]:
                p2, h2 = more()
                r2 = rollout.sample(sampler, it.policy(state), p2,
                                    jax.random.fold_in(rng, 100 + len(rounds)), shared)
                v2, t2_ = it.rewards.values(models, r2, h2, trainer_state)
                rounds.append((r2, dict(h2, completions=t2_), v2))
                totals.append(it.rewards.total(v2, parallel.to_host(r2["has_eos"]))[0])
            rmetrics["dynamic_sampling/rounds"] = float(len(rounds))
        if len(rounds) > 1:
            _, idx, flat = pick_groups(totals, it.group, jax.process_count())
            roll = _take_rows([r for r, _, _ in rounds], idx)
            n = len(totals[0])
            mine = host_rows(n)
            picks = [(int(i) // n, int(i) % n - mine.start) for i in idx[mine]]
            hs = [h for _, h, _ in rounds]
            host.update(prompts=[hs[r]["prompts"][i] for r, i in picks],
                        completions=[hs[r]["completions"][i] for r, i in picks],
                        messages=[(hs[r].get("messages") or [None] * len(hs[r]["prompts"]))[i]
                                  for r, i in picks],
                        columns={k: [hs[r]["columns"][k][i] for r, i in picks]
                                 for k in host.get("columns", {})})
            vals = np.concatenate([v for _, _, v in rounds])[idx]
            rmetrics["dynamic_sampling/zero_std_groups_kept"] = float(flat)
        else:
            host.update(completions=texts)
        total, rm = it.rewards.total(vals, parallel.to_host(roll["has_eos"]))
        rmetrics.update(rm)  # of the rows trained on
        if it.group > 1:  # of the first rollout (what the policy generated, before filtering)
            rmetrics["frac_reward_zero_std"] = float(np.mean(
                [_spread(x) == 0 for x in totals[0].reshape(-1, it.group)]))
        host["rewards"] = total[host_rows(len(total))]
        roll = dict(roll, rewards=parallel.to_global_batch(
            {"r": host["rewards"]}, it.rewards.mesh)["r"])
    t2 = time.time()
    scored = it.score(models, roll["tokens"], roll["attn"], roll["resp_mask"])
    inputs, stats = it.advantages(scored, roll, {k: np.float32(v) for k, v in ctrl.items()})
    jax.block_until_ready(inputs)
    t3 = time.time()
    state, upd = it.update(state, inputs, jax.random.fold_in(rng, 1))
    if isinstance(inputs, dict) and "advantages" in inputs:  # for samples.jsonl
        roll = dict(roll, advantages=inputs["advantages"])
    metrics = {**rmetrics, **jax.device_get(stats), **jax.device_get(upd)}
    t4 = time.time()
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics.update({"time/rollout": t1 - t0, "time/rewards": t2 - t1, "time/score": t3 - t2,
                    "time/update": t4 - t3})
    return state, metrics, roll, scored


ENGINES = ("static", "continuous")


def validate_rollout(c) -> None:
    """The rollout section shared by the online trainers (rollout.engine, rollout.slots)."""
    ro = c.get("rollout") or {}
    eng = ro.get("engine", "static")
    if eng not in ENGINES:
        raise ValueError(f"config rollout.engine: {eng!r}; valid: {', '.join(ENGINES)}")
    if int(ro.get("slots", 0)) < 0:
        raise ValueError(f"config rollout.slots: {ro.get('slots')} must be >= 0 (0 = one per "
                         f"rollout row)")
    if eng == "continuous" and jax.process_count() > 1:
        raise ValueError("config rollout.engine: 'continuous' runs its host loop in one "
                         "process; use rollout.engine=static on multi-host runs")


def run(c, algo) -> RunResult:
    """Train according to config `c` with registry record `algo` (its `online` spec)."""
    spec = algo.online
    r = Run.start(c)
    s = c[spec.section]
    tok = setup.load_tokenizer(c)
    pcfg = setup.model_config(c, tok)
    spec.validate(c, r.mesh, pcfg.max_position_embeddings)
    validate_rollout(c)
    check_isolation(c.reward.get("num_workers", 0), c.reward.get("timeout", DEFAULT_TIMEOUT),
                    c.reward.get("on_error", "raise"))
    key = f"{spec.section}.max_prompt_len"
    prompts = prompt_iterator(setup.data_source(c, "prompts", "train"), tok,
                              max_prompt_len=s.max_prompt_len, global_batch_size=c.train.batch_size,
                              template=c.data.template, format=fmt(c),
                              skip_bad_rows=c.data.skip_bad_rows,
                              truncate=c.data.get("truncate_prompts", "left"),
                              max_prompt_len_key=key, **iter_kwargs(c, "train"))
    cut = int(prompts.stats.get("num_truncated", 0))
    if cut and jax.process_index() == 0:  # one line: prompts are never cut silently
        print(f"warning: {cut} of {prompts.stats.get('num_rows', '?')} prompts are longer than "
              f"config {key}={s.max_prompt_len} and are cut from the left (keeping BOS); raise "
              f"{key}, or set data.truncate_prompts=error to refuse them", file=sys.stderr,
              flush=True)
    steps = total_steps(c, prompts.steps_per_epoch)
    built = spec.build(RLEnv(c, r.mesh, tok, pcfg, steps))
    g = built.iteration.group
    # shared prefixes: each prompt prefilled once, its cache copied to its G samples on device
    # (needs the prompt batch itself to split over the data-parallel devices)
    shared = g if g > 1 and c.train.batch_size % parallel.data_parallel_size(r.mesh) == 0 else 1
    ro = c.get("rollout") or {}
    if ro.get("engine", "static") == "continuous":  # the continuous-batching engine
        from easyrl.engine import Engine
        shared = g  # the engine always prefills a prompt once for its G samples
        eng = Engine(pcfg, slots=int(ro.get("slots", 0)) or c.train.batch_size * g,
                     max_prompt_len=s.max_prompt_len, max_new_tokens=s.max_new_tokens,
                     temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                     eos_token_id=rollout.eos_ids(tok, pcfg), pad_token_id=tok.pad_token_id,
                     mesh=r.mesh)
        sampler = rollout.engine_sampler(eng, g)
    else:
        sampler = make_sampler(pcfg, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                               top_k=s.top_k, top_p=s.top_p,
                               eos_token_id=rollout.eos_ids(tok, pcfg),
                               pad_token_id=tok.pad_token_id, mesh=r.mesh, num_samples=shared)
    r.open(pcfg, "causal_lm", tok)
    restored = r.restore(built.items(built.state))
    if restored is not None:
        arrays, meta = restored
        built.state = built.restore(built.state, arrays, meta)
        built.ctrl = {k: float(meta[k]) for k in built.ctrl}
        prompts.set_state(meta["data"])
    if jax.process_index() == 0:  # samples of steps after the checkpoint will be redone
        restart_jsonl(os.path.join(r.out, SAMPLES), r.start_step if restored is not None else None)
    loop = _Loop(c, s, r, built, sampler, prompts, tok, shared, steps)
    last = r.loop(steps, loop.step, loop.snapshot,
                  postfix=getattr(spec, "postfix", ("objective/scores", "objective/kl")))
    return RunResult(metrics=last, state=built.state, final_step=steps)


class _Loop:
    """One iteration at a time: prompts in, metrics, samples.jsonl and the true reward out."""

    def __init__(self, c, s, r, built: Online, sampler, prompts, tok, shared: int = 1,
                 steps: int = 0):
        self.c, self.s, self.r, self.built = c, s, r, built
        self.steps = steps
        self.shared = shared
        self.sampler, self.prompts, self.tok = sampler, prompts, tok
        self.base = jax.random.PRNGKey(c.seed)
        self.streak = 0
        self.true_reward: Optional[Callable] = None
        if s.true_reward == SYNTHETIC:
            from easyrl.data.synthetic import true_reward
            self.true_reward = true_reward

    def _next(self):
        """The next prompt batch: (global arrays, this host's {prompts, columns}), each prompt
        repeated `group` times."""
        local = next(self.prompts)
        arrays = {k: local[k] for k in ("input_ids", "attention_mask")}
        host = dict(prompts=list(local["prompts"]), columns=dict(local.get("columns") or {}),
                    messages=local.get("messages"))
        g = self.built.iteration.group
        if g > 1:
            expanded, host = expand(arrays, host, g)
            if self.shared == 1:  # else the sampler repeats each prompt's cache on device
                arrays = expanded
        return parallel.to_global_batch(arrays, self.r.mesh), host

    def step(self, step: int) -> dict:
        b, s = self.built, self.s
        batch, host = self._next()
        b.state, metrics, roll, scored = iterate(
            b.iteration, self.sampler, b.state, b.frozen, batch,
            jax.random.fold_in(self.base, step), b.ctrl, host=host, more=self._next,
            shared=self.shared, trainer_state=TrainerState(
                global_step=step, max_steps=self.steps,
                epoch=step / max(1, self.prompts.steps_per_epoch)))
        done = step + 1
        metrics["data/num_truncated_prompts"] = float(self.prompts.stats.get("num_truncated", 0))
        self._check_nonfinite(done, metrics)
        b.ctrl = b.after_iteration(b.ctrl, metrics)
        want_samples = s.samples_every and done % s.samples_every == 0
        if (self.true_reward is not None or want_samples) and "completions" not in host:
            host["completions"] = rollout.decode(self.tok, roll["response"], roll["resp_mask"])[
                host_rows(roll["response"].shape[0])]
        if self.true_reward is not None:  # this host's rows
            metrics["objective/true_reward"] = float(np.mean(
                [self.true_reward(q, a) for q, a in zip(host["prompts"], host["completions"])]))
        if want_samples:
            scores = (host["rewards"] if "rewards" in host
                      else parallel.to_host(scored["scores"]))  # every host takes part
            adv = roll.get("advantages")  # the first response token's (the sequence's, for
            if adv is not None:           # the group methods)
                adv = parallel.to_host(adv)[host_rows(adv.shape[0]), 0]
            if jax.process_index() == 0:
                with open(os.path.join(self.r.out, SAMPLES), "a") as f:
                    rows = list(zip(host["prompts"], host["completions"], scores))
                    for i, (q, a, sc) in enumerate(rows[:s.num_samples]):
                        row = {"step": done, "prompt": q, "response": a,
                               "score": None if np.isnan(sc) else float(sc)}
                        if adv is not None:
                            row["advantage"] = float(adv[i])
                        f.write(json.dumps(row) + "\n")
        return metrics

    def _check_nonfinite(self, done: int, metrics: dict) -> None:
        """Iterations whose update skipped a minibatch for non-finite values, in a row: the run
        stops at train.max_nonfinite of them (0: never); checked every iteration."""
        self.streak = self.streak + 1 if metrics.get("nonfinite_updates", 0) > 0 else 0
        limit = self.c.train.max_nonfinite
        if limit and self.streak >= limit:
            raise NonFiniteError(
                f"{self.streak} consecutive iterations with non-finite losses, gradients or "
                f"updates at step {done} (skipped, train.max_nonfinite={limit}); lower optim.lr "
                f"or check the reward. The last checkpoint holds finite weights.")

    def snapshot(self):
        b = self.built
        return b.items(b.state), dict(**b.ctrl, data=self.prompts.get_state())
