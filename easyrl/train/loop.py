"""The one training loop every gradient-based trainer (SFT, RM, DPO, RRHF) shares.

An algorithm supplies a `Task`: its model kind, its loss (see `easyrl.train.step`), its batches
and optional frozen arrays (a reference model). The loop owns everything else: mesh, sharded
state, the jitted step with donated state, checkpoints with exact resume and preemption saves,
evaluation, metrics and the progress bar.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from easyrl import checkpoint, parallel
from easyrl.model import lora
from easyrl.train.config import validate
from easyrl.train.metrics import MetricsWriter
from easyrl.train.optim import make_optimizer
from easyrl.train.runtime import RunControl, init_mesh, say
from easyrl.train.step import TrainState, make_eval_step, make_train_step

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Task:
    kind: str  # model kind trained: causal_lm | reward
    loss_fn: Callable  # (params, frozen, batch, rng, denom) -> (loss, metrics)
    denom_fn: Callable  # global batch -> normalizer
    train_data: Any  # BatchIterator (per-host numpy batches, get_state/set_state)
    eval_data: Any = None
    frozen: Any = None  # sharded pytree passed to the loss, not trained
    tokens_fn: Callable = lambda b: int(np.sum(b.get("attention_mask", 0)))
    eval_hook: Optional[Callable] = None  # (params, step) -> extra metrics dict, at eval time
    trainable_mask: Any = None  # pytree of bools (LoRA): False leaves get no update/state


class NonFiniteError(RuntimeError):
    pass


@dataclasses.dataclass
class Env:
    """What setup produced: shared with algorithms that build their Task from it."""
    config: Any
    mesh: Any
    tokenizer: Any
    model_config: Any
    params: Any


def total_steps(c, steps_per_epoch: int) -> int:
    return int(c.train.steps) if c.train.steps > 0 else int(c.train.epochs * steps_per_epoch)


def run(c, build_task: Callable[[Env], Task], *, init_kind: str = "causal_lm",
        init_missing_head: bool = False) -> dict:
    """Train according to config `c`. Returns the last logged metrics (host floats)."""
    from easyrl.train import setup
    mesh = init_mesh(c)
    validate(c, dp_size=parallel.data_parallel_size(mesh))
    tokenizer = setup.load_tokenizer(c)
    mcfg = setup.model_config(c, tokenizer)
    validate(c, max_positions=mcfg.max_position_embeddings)
    params = setup.load_params(c, mcfg, init_kind, mesh, init_missing_head=init_missing_head)
    task = build_task(Env(c, mesh, tokenizer, mcfg, params))
    steps = total_steps(c, task.train_data.steps_per_epoch)
    # LoRA: only the adapters (and a score head) train; the optimizer state covers only them
    mask = task.trainable_mask
    if mask is None and mcfg.lora_rank > 0:
        mask = lora.trainable_mask(params)
    tx, schedule = make_optimizer(c.optim, steps)
    trainable = lora.partition(params, mask)[0]
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

    # ---- checkpoints: resume ---------------------------------------------------------------
    out = c.output_dir
    checkpoint.write_model_config(out, mcfg, task.kind, command=c.command, run_config=c.to_dict())
    if jax.process_index() == 0:
        save_run_tokenizer(tokenizer, out)
    mgr = checkpoint.manager(out, keep=c.checkpoint.keep or None,
                             async_save=c.checkpoint.async_save)
    start = mgr.latest_step()
    if start is not None:
        restored = mgr.restore(start, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(checkpoint.abstract_like(state.params)),
            opt_state=ocp.args.StandardRestore(checkpoint.abstract_like(state.opt_state)),
            meta=ocp.args.JsonRestore()))
        meta = restored["meta"]
        state = state.replace(params=restored["params"], opt_state=restored["opt_state"],
                              step=jax.device_put(jnp.int32(meta["step"]), repl),
                              nonfinite=jax.device_put(jnp.int32(meta["nonfinite"]), repl),
                              streak=jax.device_put(jnp.int32(meta["streak"]), repl))
        task.train_data.set_state(meta["data"])
        say(f"resuming from checkpoint at step {start} ({out}/checkpoints/{start})")
    step = int(start or 0)
    stats = getattr(task.train_data, "stats", {}) or {}
    data_metrics = {f"data/{k}": v for k, v in stats.items()
                    if k.startswith("num_") and isinstance(v, (int, float))}
    if stats.get("num_bad_rows"):
        say(f"skipped {stats['num_bad_rows']} bad rows in {stats.get('source')} "
               f"(data.skip_bad_rows=True)")
    writer = MetricsWriter(out, c, c.log.tensorboard, c.log.wandb_project, c.log.wandb_name,
                           resume_step=start)

    def save(at: int, force: bool = False):
        meta = dict(step=at, nonfinite=int(state.nonfinite), streak=int(state.streak),
                    data=task.train_data.get_state(), seed=c.seed)
        mgr.save(at, args=ocp.args.Composite(params=ocp.args.StandardSave(state.params),
                                             opt_state=ocp.args.StandardSave(state.opt_state),
                                             meta=ocp.args.JsonSave(meta)), force=force)

    # ---- loop ---------------------------------------------------------------------------------
    base_rng = jax.random.PRNGKey(c.seed)
    pending, tokens, t0, last = [], 0, time.time(), {}
    bar = tqdm(total=steps, initial=step, desc=c.command, disable=jax.process_index() != 0,
               dynamic_ncols=True)
    with RunControl(c, mgr, steps, save, closers=(bar, writer)) as control, jax.set_mesh(mesh):
        while step < steps:
            local = next(task.train_data)
            tokens += task.tokens_fn(local)
            batch = parallel.to_global_batch({k: v for k, v in local.items() if k in batch_sh}, mesh)
            state, metrics = step_fn(state, batch, jax.random.fold_in(base_rng, step))
            step += 1
            pending.append(metrics)
            bar.update(1)
            is_last = step == steps
            if step % c.log.every == 0 or is_last:
                host = jax.device_get(pending)
                avg = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
                avg["nonfinite"] = float(host[-1]["nonfinite"])
                streak = int(host[-1]["nonfinite_streak"])
                avg.pop("nonfinite_streak")
                dt = time.time() - t0
                avg["tokens_per_sec"] = tokens * jax.process_count() / max(dt, 1e-9)
                if task.eval_data is not None and (is_last or (c.eval.every and step % c.eval.every == 0)):
                    avg.update(_evaluate(eval_fn, state, task, mesh, batch_sh, c, base_rng))
                    if task.eval_hook is not None:
                        avg.update(task.eval_hook(state.params, step))
                writer.write(step, {**avg, **data_metrics})
                bar.set_postfix(loss=f"{avg['loss']:.4f}", tok_s=f"{avg['tokens_per_sec']:.0f}")
                last, pending, tokens, t0 = avg, [], 0, time.time()
                if streak >= c.train.max_nonfinite:
                    raise NonFiniteError(
                        f"{streak} consecutive non-finite losses or gradients at step {step} "
                        f"(train.max_nonfinite={c.train.max_nonfinite}); lower optim.lr or check the data")
            control.after_step(step)
    last["final_step"] = step
    last["_state"] = state
    return last


def _evaluate(eval_fn, state, task, mesh, batch_sh, c, base_rng) -> dict:
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


def save_run_tokenizer(tokenizer, out: str) -> None:
    """The run's tokenizer in `<out>/tokenizer` (exports and `generate` pick it up)."""
    from easyrl.convert import TOKENIZER_SUBDIR
    from easyrl.data.tokenizer import save_tokenizer
    d = os.path.join(out, TOKENIZER_SUBDIR)
    if not os.path.isdir(d):
        save_tokenizer(tokenizer, d)


