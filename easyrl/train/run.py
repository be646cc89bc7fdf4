"""The run scaffold every trainer stands on: distributed setup and mesh, the run directory, the
checkpoint manager (restore, periodic and final saves, keep K, async), the metrics writer, the
progress bar, and preemption (SIGTERM: save, then exit 143).

Both loops use it: the supervised loop (`easyrl.train.loop`: SFT, RM, DPO, RRHF) and the
online-RL loop (`easyrl.train.rl_loop`: PPO). A loop supplies one function that runs a step and
one that snapshots its state; resume, preemption and logging exist here once:

    run = Run.start(c)                          # jax.distributed + mesh, config checks
    run.open(model_config, kind, tokenizer)     # run dir: easyrl_config.json, tokenizer/
    restored = run.restore(like)                # None, or (arrays by name, json meta)
    metrics = run.loop(total_steps, step_fn, snapshot)
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
from typing import Any, Callable, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from easyrl import checkpoint, parallel
from easyrl.train.config import validate
from easyrl.train.metrics import MetricsWriter

log = logging.getLogger(__name__)


def say(msg: str) -> None:
    """Print on process 0 (and log everywhere): the one user-facing status line helper."""
    if jax.process_index() == 0:
        print(msg, flush=True)
    log.info(msg)


def init_mesh(c):
    """jax.distributed (when configured) then the mesh from `c.mesh`."""
    d = c.distributed
    parallel.initialize_distributed(d.coordinator or None, d.num_processes or None,
                                    None if d.process_id < 0 else d.process_id)
    return parallel.create_mesh(c.mesh)


def total_steps(c, steps_per_epoch: Optional[int] = None) -> Optional[int]:
    """Loop iterations (optimizer steps, or online-RL iterations) of a run: `train.steps`, else
    `train.epochs` passes over data of `steps_per_epoch` batches; None when that is not known
    yet (epochs, no data loaded)."""
    if c.train.steps > 0:
        return int(c.train.steps)
    return None if steps_per_epoch is None else int(c.train.epochs * steps_per_epoch)


@dataclasses.dataclass
class RunResult:
    """What a trainer returns: the last logged metrics (host floats), the final state, the step."""
    metrics: dict
    state: Any
    final_step: int


class Run:
    """One training run's home. `c`: the trainer config (output_dir, seed, checkpoint.*, log.*)."""

    def __init__(self, c, mesh):
        self.c, self.mesh = c, mesh
        self.out = c.output_dir
        self.mgr = None
        self.start_step = 0
        self.signal = None

    @classmethod
    def start(cls, c) -> "Run":
        """Distributed setup, the mesh, and the config checks that need the mesh."""
        mesh = init_mesh(c)
        validate(c, dp_size=parallel.data_parallel_size(mesh))
        return cls(c, mesh)

    # ---- run directory and checkpoints ----------------------------------------------------------
    def open(self, model_config, kind: str, tokenizer) -> None:
        """Write the run's model config and tokenizer, open the checkpoint manager."""
        c = self.c
        checkpoint.write_model_config(self.out, model_config, kind, command=c.command,
                                      run_config=c.to_dict())
        if jax.process_index() == 0:
            save_run_tokenizer(tokenizer, self.out)
        self.mgr = checkpoint.manager(self.out, keep=c.checkpoint.keep or None,
                                      async_save=c.checkpoint.async_save)

    def restore(self, like: dict) -> Optional[Tuple[dict, dict]]:
        """The latest checkpoint as ({name: pytree shaped and sharded like `like[name]`}, meta),
        or None when the run starts fresh."""
        step = self.mgr.latest_step()
        if step is None:
            return None
        args = {k: ocp.args.StandardRestore(checkpoint.abstract_like(v)) for k, v in like.items()}
        r = self.mgr.restore(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonRestore()))
        self.start_step = int(step)
        say(f"resuming from checkpoint at step {step} ({self.out}/checkpoints/{step})")
        return {k: r[k] for k in like}, r["meta"]

    def save(self, step: int, items: dict, meta: dict, force: bool = False) -> None:
        """One checkpoint: array pytrees by name plus a json `meta` (step and seed added)."""
        args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
        meta = dict(step=step, **meta, seed=self.c.seed)
        self.mgr.save(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonSave(meta)),
                      force=force)

    # ---- the loop -----------------------------------------------------------------------------
    def log_due(self, step: int, total: int) -> bool:
        """Is `step` (1-based, after the update) a logging step?"""
        return step % self.c.log.every == 0 or step == total

    def loop(self, total: int, step_fn: Callable[[int], Optional[dict]],
             snapshot: Callable[[], Tuple[dict, dict]], *, postfix: Tuple[str, ...] = (),
             after_log: Optional[Callable[[int, dict], None]] = None) -> dict:
        """Run steps `start_step .. total-1`. `step_fn(step)` runs one and returns the metrics to
        log (host floats) or None; rows are written on logging steps (`log_due`). `snapshot()`
        gives (array items, json meta) to checkpoint. Saves every `checkpoint.every` steps and at
        the end; on SIGTERM saves and exits 143. Returns the last logged metrics."""
        c = self.c
        writer = MetricsWriter(self.out, c, c.log.tensorboard, c.log.wandb_project,
                               c.log.wandb_name,
                               resume_step=self.start_step if self.start_step else None)
        step, last = self.start_step, {}
        bar = tqdm(total=total, initial=step, desc=c.command, dynamic_ncols=True,
                   disable=jax.process_index() != 0)

        def save(at: int, force: bool = False):
            items, meta = snapshot()
            self.save(at, items, meta, force=force)

        prev = signal.signal(signal.SIGTERM, self._on_signal)
        ok = False
        try:
            with jax.set_mesh(self.mesh):
                while step < total:
                    metrics = step_fn(step)
                    step += 1
                    bar.update(1)
                    if metrics is not None and self.log_due(step, total):
                        writer.write(step, metrics)
                        bar.set_postfix({k.rsplit("/", 1)[-1]: f"{metrics[k]:.4g}"
                                         for k in postfix if k in metrics})
                        last = metrics
                        if after_log is not None:
                            after_log(step, metrics)
                    self._after_step(step, total, save)
            ok = True
        finally:
            signal.signal(signal.SIGTERM, prev)
            try:
                if ok:
                    self.mgr.wait_until_finished()
            finally:
                bar.close()
                writer.close()
                self.mgr.close()
        return last

    def _on_signal(self, signum, frame):
        self.signal = signum

    def _after_step(self, step: int, total: int, save) -> None:
        every, final = self.c.checkpoint.every, step == total
        if (every and step % every == 0) or final:
            save(step, force=final)
        if self.signal is not None:
            say(f"received signal {self.signal}: saving checkpoint at step {step}")
            save(step, force=True)
            self.mgr.wait_until_finished()
            raise SystemExit(143)


def save_run_tokenizer(tokenizer, out: str) -> None:
    """The run's tokenizer in `<out>/tokenizer` (exports and `generate` pick it up)."""
    from easyrl.convert import TOKENIZER_SUBDIR
    from easyrl.data.tokenizer import save_tokenizer
    d = os.path.join(out, TOKENIZER_SUBDIR)
    if not os.path.isdir(d):
        save_tokenizer(tokenizer, d)

