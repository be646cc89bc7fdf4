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
import json
import logging
import os
import signal
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
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


class NonFiniteError(RuntimeError):
    """A run stopped for non-finite values (the CLI prints it as one line and exits 1)."""


# run config keys that may change when a run resumes: where it runs and what it logs, and how
# long it runs (the learning-rate schedule then follows the new length)
RESUMABLE = ("output_dir", "mesh", "distributed", "log", "checkpoint", "eval", "train.steps",
             "train.epochs")


def normalize(d):
    """A config dict as JSON would store it (tuples -> lists, sorted keys)."""
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def config_diff(stored: dict, wanted: dict, prefix: str = "", ignore=(), defaults=None) -> list:
    """['key: old -> new'] over keys not in `ignore` (dotted paths; a top-level name covers its
    section). A key the stored config lacks (a run made before easyrl added it) counts as its
    default from `defaults`."""
    out = []
    defaults = defaults if isinstance(defaults, dict) else {}
    for k in sorted(set(stored) | set(wanted)):
        if f"{prefix}{k}" in ignore:
            continue
        a, b = stored.get(k, "<missing>"), wanted.get(k, "<missing>")
        if a == "<missing>" and k in defaults:
            a = defaults[k]
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.", ignore, defaults.get(k))
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


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
        self.saved_step = None
        self.signal = None
        # several processes: all must save at the same step; orbax's synchronized preemption
        # point (the jax.distributed preemption service handles SIGTERM) decides which
        self.multihost = jax.process_count() > 1

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
        self._check_resume_config()
        checkpoint.write_model_config(self.out, model_config, kind, command=c.command,
                                      run_config=c.to_dict())
        if jax.process_index() == 0:
            save_run_tokenizer(tokenizer, self.out)
        self.mgr = checkpoint.manager(self.out, keep=c.checkpoint.keep or None,
                                      async_save=c.checkpoint.async_save)

    def _check_resume_config(self) -> None:
        """A run resumed with other settings (batch size, lr, data, model...) would continue
        silently as something else: refuse, naming the keys, unless checkpoint.allow_changes."""
        path = os.path.join(self.out, checkpoint.CONFIG_FILE)
        if checkpoint.latest_step(self.out) is None or not os.path.exists(path):
            return
        with open(path) as f:
            stored = json.load(f).get("run_config") or {}
        from easyrl.train.config import base_config
        diff = config_diff(normalize(stored), normalize(self.c.to_dict()), ignore=RESUMABLE,
                           defaults=normalize(base_config(self.c.command).to_dict()))
        if not diff:
            return
        if self.c.checkpoint.get("allow_changes", False):
            say(f"resuming {self.out} with a changed config (checkpoint.allow_changes=True): "
                f"{'; '.join(diff)}")
            return
        raise ValueError(
            f"{self.out} holds a run made with a different config ({'; '.join(diff[:4])}"
            f"{'; ...' if len(diff) > 4 else ''}): resuming would continue it as another run. "
            f"Use another output_dir, or --config.checkpoint.allow_changes=True to resume anyway")

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
        """One checkpoint: array pytrees by name plus a json `meta` (step and seed added).
        Refuses (NonFiniteError) to write state that holds a NaN or inf."""
        bad = nonfinite_leaves(items)
        if bad:
            raise NonFiniteError(f"not saving the checkpoint of step {step}: non-finite values in "
                                 f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
        args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
        meta = dict(step=step, **meta, seed=self.c.seed)
        self.mgr.save(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonSave(meta)),
                      force=force)
        self.saved_step = step

    # ---- the loop -----------------------------------------------------------------------------
    def log_due(self, step: int, total: int) -> bool:
        """Is `step` (1-based, after the update) a logging step?"""
        return step % self.c.log.every == 0 or step == total

    def loop(self, total: int, step_fn: Callable[[int], Optional[dict]],
             snapshot: Callable[[], Tuple[dict, dict]], *, postfix: Tuple[str, ...] = ()) -> dict:
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

        prev = None if self.multihost else signal.signal(signal.SIGTERM, self._on_signal)
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
                    self._after_step(step, total, save)
            ok = True
        finally:
            if prev is not None:
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

    def _preempted(self, step: int) -> bool:
        if self.multihost:
            return bool(self.mgr.reached_preemption(step))
        return self.signal is not None

    def _after_step(self, step: int, total: int, save) -> None:
        every, final = self.c.checkpoint.every, step == total
        preempted = self._preempted(step)
        if preempted:
            say(f"received {'a preemption notice' if self.multihost else f'signal {self.signal}'}: "
                f"saving checkpoint at step {step}")
        if ((every and step % every == 0) or final or preempted) and self.saved_step != step:
            save(step, force=final or preempted)
        if preempted:
            self.mgr.wait_until_finished()
            raise SystemExit(143)


class DivergenceWatch:
    """Warns once when a watched value (loss, grad norm) grows by `factor` or more over the
    smallest seen, and once when the grad norm is exactly 0 for `zero_steps` consecutive steps
    (a dead model: its loss stops moving, nothing is non-finite)."""

    def __init__(self, factor: float = 100.0, zero_steps: int = 3):
        self.factor, self.zero_steps = factor, zero_steps
        self.best, self.zeros, self.warned = {}, 0, set()

    def observe(self, step: int, **values) -> None:
        for k, v in values.items():
            v = float(v)
            if not np.isfinite(v):
                continue
            if k == "grad_norm":
                self.zeros = self.zeros + 1 if v == 0.0 else 0
                if self.zeros >= self.zero_steps:
                    self._warn("zero", f"warning: grad_norm is exactly 0 for {self.zeros} "
                                       f"consecutive steps at step {step}: the model has stopped "
                                       f"learning (optim.lr too high? dead activations?)")
            best = self.best.get(k)
            if best is not None and best > 0 and v > self.factor * best:
                self._warn(k, f"warning: {k} grew from {best:.4g} to {v:.4g} ({v / best:.0f}x) "
                              f"by step {step}: the run may be diverging (lower optim.lr?)")
            if v > 0 and (best is None or v < best):
                self.best[k] = v

    def _warn(self, kind: str, msg: str) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            say(msg)


def nonfinite_leaves(items: dict) -> list:
    """Paths ('params/layers/...') of the floating-point leaves of `items` holding a NaN or inf."""
    flat = [(f"{k}/{parallel.path_str(p)}", x) for k, tree in items.items()
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    if not flat:
        return []
    ok = jax.device_get(_all_finite([x for _, x in flat]))
    return [name for (name, _), good in zip(flat, ok) if not good]


@jax.jit
def _all_finite(leaves):
    return [jnp.all(jnp.isfinite(x)) for x in leaves]


def save_run_tokenizer(tokenizer, out: str) -> None:
    """The run's tokenizer in `<out>/tokenizer` (exports and `generate` pick it up)."""
    from easyrl.convert import TOKENIZER_SUBDIR
    from easyrl.data.tokenizer import save_tokenizer
    d = os.path.join(out, TOKENIZER_SUBDIR)
    if not os.path.isdir(d):
        save_tokenizer(tokenizer, d)

