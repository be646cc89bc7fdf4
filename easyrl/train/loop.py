"""The supervised loop every gradient-based trainer on fixed data shares (SFT, RM, DPO, RRHF).

An algorithm supplies a `Task` (built from the `Env` by its registry record's `build_task`): its
model kind, its loss (see `easyrl.train.step`), its batches and optional frozen arrays (a
reference model). This loop builds the sharded state and the jitted step with donated state, and
averages metrics over each logging window and runs evaluation; the run scaffold
(`easyrl.train.run`) owns the mesh, checkpoints with exact resume, preemption, the metrics sinks
and the progress bar.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from easyrl import parallel
from easyrl.model.trainable import partition, trainable_mask
from easyrl.train import setup
from easyrl.train.config import validate
from easyrl.train.optim import make_optimizer
from easyrl.train.run import DivergenceWatch, NonFiniteError, Run, RunResult, say, total_steps
from easyrl.train.step import TrainState, make_eval_step, make_train_step


@dataclasses.dataclass
class Task:
    kind: str  # model kind trained: causal_lm | reward
    loss_fn: Callable  # (params, frozen, batch, rng, denom) -> (loss, metrics)
    denom_fn: Callable  # global batch -> normalizer
    train_data: Any  # BatchIterator (per-host numpy batches, get_state/set_state)
    eval_data: Any = None
    frozen: Any = None  # sharded pytree passed to the loss, not trained
    tokens_fn: Callable = lambda b: int(np.sum(b.get("attention_mask", 0)))


@dataclasses.dataclass
class Env:
    """What setup produced: shared with algorithms that build their Task from it."""
    config: Any
    mesh: Any
    tokenizer: Any
    model_config: Any
    params: Any


def run(c, algo) -> RunResult:
    """Train according to config `c` with registry record `algo` (its `kind`, `build_task`,
    `init_missing_head`)."""
    r = Run.start(c)
    mesh = r.mesh
    tokenizer = setup.load_tokenizer(c)
    mcfg = setup.model_config(c, tokenizer)
    validate(c, max_positions=mcfg.max_position_embeddings)
    params = setup.load_params(c, mcfg, algo.kind, mesh, init_missing_head=algo.init_missing_head)
    task = algo.build_task(Env(c, mesh, tokenizer, mcfg, params))
    steps = total_steps(c, task.train_data.steps_per_epoch)
    # LoRA: only the adapters (and a score head) train; the optimizer state covers only them
    mask = trainable_mask(params) if mcfg.lora_rank > 0 else None
    tx, schedule = make_optimizer(c.optim, steps)
    trainable = partition(params, mask)[0]
    micro = c.train.batch_size // (c.train.micro_batch_size or c.train.batch_size)

    # ---- state, shardings, jitted steps --------------------------------------------------
    repl = parallel.replicated(mesh)
    opt_sh = parallel.named_shardings(jax.eval_shape(tx.init, trainable), mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
    frozen_sh = None if task.frozen is None else jax.tree.map(lambda x: x.sharding, task.frozen)
    z = lambda: jnp.zeros((), jnp.int32)  # noqa: E731 (distinct buffers: the state is donated)
    state = TrainState(step=z(), params=params, opt_state=opt_state, nonfinite=z(), streak=z(),
                       frozen=task.frozen)
    state_sh = TrainState(step=repl, params=jax.tree.map(lambda x: x.sharding, params),
                          opt_state=opt_sh, nonfinite=repl, streak=repl, frozen=frozen_sh)
    state = jax.device_put(state, state_sh)
    sample = task.train_data.collate(task.train_data.items[:1])
    batch_sh = {k: parallel.batch_sharding(mesh, np.ndim(v)) for k, v in sample.items()
                if isinstance(v, np.ndarray)}
    step_fn = jax.jit(make_train_step(task.loss_fn, tx, schedule, task.denom_fn, micro, mask),
                      in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl),
                      donate_argnums=(0,))
    eval_fn = jax.jit(make_eval_step(task.loss_fn, task.denom_fn))

    # ---- resume ---------------------------------------------------------------------------
    r.open(mcfg, task.kind, tokenizer)
    restored = r.restore({"params": state.params, "opt_state": state.opt_state})
    if restored is not None:
        arrays, meta = restored
        put = lambda v: jax.device_put(jnp.int32(v), repl)  # noqa: E731
        state = state.replace(params=arrays["params"], opt_state=arrays["opt_state"],
                              step=put(meta["step"]), nonfinite=put(meta["nonfinite"]),
                              streak=put(meta["streak"]))
        task.train_data.set_state(meta["data"])

    loop = _Window(c, r, task, state, step_fn, eval_fn, batch_sh, steps)
    if restored is not None:
        loop.restore(restored[1].get("window"))
    last = r.loop(steps, loop.step, loop.snapshot, postfix=("loss", "tokens_per_sec"))
    return RunResult(metrics={**last}, state=loop.state, final_step=steps)


class _Window:
    """One step at a time, metrics averaged over each logging window, the checkpoint snapshot."""

    def __init__(self, c, r, task, state, step_fn, eval_fn, batch_sh, steps):
        self.c, self.r, self.task, self.state = c, r, task, state
        self.step_fn, self.eval_fn, self.batch_sh, self.steps = step_fn, eval_fn, batch_sh, steps
        self.base_rng = jax.random.PRNGKey(c.seed)
        self.pending, self.tokens, self.t0 = [], 0, time.time()
        self.last_streak = None  # (device scalar, step) not yet checked
        self.watch = DivergenceWatch()
        stats = getattr(task.train_data, "stats", {}) or {}
        self.data_metrics = {f"data/{k}": v for k, v in stats.items()
                             if k.startswith("num_") and isinstance(v, (int, float))}
        if stats.get("num_bad_rows"):
            say(f"skipped {stats['num_bad_rows']} bad rows in {stats.get('source')} "
                f"(data.skip_bad_rows=True)")

    def step(self, step: int):
        task, mesh, c = self.task, self.r.mesh, self.c
        local = next(task.train_data)
        self.tokens += task.tokens_fn(local)
        batch = parallel.to_global_batch({k: v for k, v in local.items() if k in self.batch_sh},
                                         mesh)
        self.state, metrics = self.step_fn(self.state, batch,
                                           jax.random.fold_in(self.base_rng, step))
        self.pending.append(metrics)
        done = step + 1
        if c.train.max_nonfinite > 0:  # checked every step (0: never stop for non-finite steps)
            # the previous step's streak, read once this step is queued (the device keeps one
            # step ahead of the host), and this step's at the end of the run
            if self.last_streak is not None:
                self._check_streak(*self.last_streak)
            self.last_streak = (metrics["nonfinite_streak"], done)
            if done == self.steps:
                self._check_streak(*self.last_streak)
        if not self.r.log_due(done, self.steps):
            return None
        host = jax.device_get(self.pending)
        for i, m in enumerate(host):
            self.watch.observe(done - len(host) + i + 1, loss=m["loss"], grad_norm=m["grad_norm"])
        avg = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        avg["nonfinite"] = float(host[-1]["nonfinite"])
        avg.pop("nonfinite_streak")
        avg["tokens_per_sec"] = self.tokens * jax.process_count() / max(time.time() - self.t0, 1e-9)
        if task.eval_data is not None and (done == self.steps or (c.eval.every and done % c.eval.every == 0)):
            avg.update(evaluate(self.eval_fn, self.state, task, mesh, self.batch_sh, c,
                                self.base_rng))
        self.pending, self.tokens, self.t0 = [], 0, time.time()
        return {**avg, **self.data_metrics}

    def _check_streak(self, streak, at: int) -> None:
        limit = self.c.train.max_nonfinite
        if int(streak) >= limit:
            raise NonFiniteError(
                f"{int(streak)} consecutive steps with a non-finite loss, gradient or update at "
                f"step {at} (skipped, train.max_nonfinite={limit}); lower optim.lr or check the "
                f"data. The last checkpoint holds finite weights.")

    def snapshot(self):
        """The state to checkpoint, and in the meta the logging window so far (a resumed run's
        next row averages the same steps as an uninterrupted run's)."""
        s = self.state
        window = [{k: [np.asarray(v).item(), np.asarray(v).dtype.str] for k, v in m.items()}
                  for m in jax.device_get(self.pending)]
        return ({"params": s.params, "opt_state": s.opt_state},
                dict(nonfinite=int(s.nonfinite), streak=int(s.streak),
                     data=self.task.train_data.get_state(), window=window))

    def restore(self, window) -> None:
        """The logging window of a checkpoint's meta (exact values and dtypes)."""
        self.pending = [{k: np.asarray(v, dtype=np.dtype(dt)) for k, (v, dt) in m.items()}
                        for m in (window or [])]


def evaluate(eval_fn, state, task, mesh, batch_sh, c, base_rng) -> dict:
    """`eval/` metrics over the eval iterator (or its first `eval.max_batches` batches)."""
    it = task.eval_data
    n = it.steps_per_epoch if not c.eval.max_batches else min(c.eval.max_batches, it.steps_per_epoch)
    sums, total = {}, 0.0
    it.set_state({"epoch": 0, "index": 0})
    for i in range(n):
        local = next(it)
        batch = parallel.to_global_batch({k: v for k, v in local.items() if k in batch_sh}, mesh)
        metrics, denom = jax.device_get(eval_fn(state.params, state.frozen, batch,
                                                jax.random.fold_in(base_rng, 2**30 + i)))
        for k, v in metrics.items():  # metrics are sums / denom: re-weight by denom
            sums[k] = sums.get(k, 0.0) + float(v) * float(denom)
        total += float(denom)
    return {f"eval/{k}": v / max(total, 1e-9) for k, v in sums.items()}
