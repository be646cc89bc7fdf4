"""The online-RL loop: prompts -> rollout (easyrl's sampler) -> rewards and the scoring pass ->
advantages -> update, on the run scaffold (`easyrl.train.run`: mesh, checkpoints, resume,
preemption, metrics, progress).

An algorithm (registry record with `loop="online"`, e.g. PPO) supplies only what differs, as an
object with

    section                      its config section (c.ppo): max_prompt_len, max_new_tokens,
                                 temperature, top_k, top_p, samples_every, num_samples, true_reward
    validate(c, mesh, max_positions)
    build(env: RLEnv) -> Online  its models, state and the jitted pieces of one iteration

The iteration itself (`iterate`) is shared with `benchmarks/ppo_iteration.py`, so what is timed
there is what trains here.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from easyrl import parallel, rollout
from easyrl.algorithms.common import fmt, iter_kwargs
from easyrl.data.iterator import prompt_iterator
from easyrl.generate import make_sampler
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


def iterate(it: Iteration, sampler, state, frozen, prompts: dict, rng, ctrl: dict):
    """One iteration: rollout, scoring, advantages, update. Returns (state, metrics (host
    floats, with `time/rollout`, `time/score`, `time/update`), roll, scored)."""
    t0 = time.time()
    roll = rollout.sample(sampler, it.policy(state), prompts, jax.random.fold_in(rng, 0))
    jax.block_until_ready(roll["resp_mask"])
    t1 = time.time()
    scored = it.score(it.models(state, frozen), roll["tokens"], roll["attn"], roll["resp_mask"])
    inputs, stats = it.advantages(scored, roll, {k: np.float32(v) for k, v in ctrl.items()})
    jax.block_until_ready(inputs)
    t2 = time.time()
    state, upd = it.update(state, inputs, jax.random.fold_in(rng, 1))
    metrics = {**jax.device_get(stats), **jax.device_get(upd)}
    t3 = time.time()
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics.update({"time/rollout": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2})
    return state, metrics, roll, scored


def run(c, algo) -> RunResult:
    """Train according to config `c` with registry record `algo` (its `online` spec)."""
    spec = algo.online
    r = Run.start(c)
    s = c[spec.section]
    tok = setup.load_tokenizer(c)
    pcfg = setup.model_config(c, tok)
    spec.validate(c, r.mesh, pcfg.max_position_embeddings)
    prompts = prompt_iterator(setup.data_source(c, "prompts", "train"), tok,
                              max_prompt_len=s.max_prompt_len, global_batch_size=c.train.batch_size,
                              template=c.data.template, format=fmt(c),
                              skip_bad_rows=c.data.skip_bad_rows, **iter_kwargs(c, "train"))
    steps = total_steps(c, prompts.steps_per_epoch)
    built = spec.build(RLEnv(c, r.mesh, tok, pcfg, steps))
    sampler = make_sampler(pcfg, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                           top_k=s.top_k, top_p=s.top_p, eos_token_id=rollout.eos_ids(tok, pcfg),
                           pad_token_id=tok.pad_token_id, mesh=r.mesh)
    r.open(pcfg, "causal_lm", tok)
    restored = r.restore(built.items(built.state))
    if restored is not None:
        arrays, meta = restored
        built.state = built.restore(built.state, arrays, meta)
        built.ctrl = {k: float(meta[k]) for k in built.ctrl}
        prompts.set_state(meta["data"])
    if jax.process_index() == 0:  # samples of steps after the checkpoint will be redone
        restart_jsonl(os.path.join(r.out, SAMPLES), r.start_step if restored is not None else None)
    loop = _Loop(c, s, r, built, sampler, prompts, tok)
    last = r.loop(steps, loop.step, loop.snapshot, postfix=("objective/scores", "objective/kl"))
    return RunResult(metrics=last, state=built.state, final_step=steps)


class _Loop:
    """One iteration at a time: prompts in, metrics, samples.jsonl and the true reward out."""

    def __init__(self, c, s, r, built: Online, sampler, prompts, tok):
        self.c, self.s, self.r, self.built = c, s, r, built
        self.sampler, self.prompts, self.tok = sampler, prompts, tok
        self.base = jax.random.PRNGKey(c.seed)
        self.streak = 0
        self.true_reward: Optional[Callable] = None
        if s.true_reward == SYNTHETIC:
            from easyrl.data.synthetic import true_reward
            self.true_reward = true_reward

    def step(self, step: int) -> dict:
        b, s = self.built, self.s
        local = next(self.prompts)
        batch = parallel.to_global_batch({k: local[k] for k in ("input_ids", "attention_mask")},
                                         self.r.mesh)
        b.state, metrics, roll, scored = iterate(b.iteration, self.sampler, b.state, b.frozen,
                                                 batch, jax.random.fold_in(self.base, step), b.ctrl)
        done = step + 1
        self._check_nonfinite(done, metrics)
        b.ctrl = b.after_iteration(b.ctrl, metrics)
        want_samples = s.samples_every and done % s.samples_every == 0
        texts = None
        if self.true_reward is not None or want_samples:
            texts = rollout.decode(self.tok, roll["response"], roll["resp_mask"])
        if self.true_reward is not None:
            metrics["objective/true_reward"] = float(np.mean(
                [self.true_reward(q, a) for q, a in zip(local["prompts"], texts)]))
        if want_samples and jax.process_index() == 0:
            scores = parallel.to_host(scored["scores"])
            with open(os.path.join(self.r.out, SAMPLES), "a") as f:
                for q, a, sc in list(zip(local["prompts"], texts, scores))[:s.num_samples]:
                    f.write(json.dumps({"step": done, "prompt": q, "response": a,
                                        "score": float(sc)}) + "\n")
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
