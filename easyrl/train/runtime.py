"""Run plumbing shared by the supervised loop and PPO: distributed init + mesh, the checkpoint
cadence with preemption (SIGTERM) saves, and the closing of sinks."""
from __future__ import annotations

import logging
import signal

import jax

from easyrl import parallel

log = logging.getLogger(__name__)


def init_mesh(c):
    """jax.distributed (when configured) then the mesh from `c.mesh`."""
    d = c.distributed
    parallel.initialize_distributed(d.coordinator or None, d.num_processes or None,
                                    None if d.process_id < 0 else d.process_id)
    return parallel.create_mesh(c.mesh)


def say(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)
    log.info(msg)


class RunControl:
    """Checkpoint every `checkpoint.every` steps and at the last step; on SIGTERM save and exit
    with 143. `save(step, force)` writes one checkpoint. Use as a context manager around the loop:
    it waits for pending saves and closes the manager and sinks (`closers`)."""

    def __init__(self, c, mgr, total_steps: int, save, closers=()):
        self.every, self.total, self.mgr, self.save = c.checkpoint.every, total_steps, mgr, save
        self.closers = list(closers)
        self.signal = None

    def __enter__(self):
        self._prev = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        self.signal = signum

    def after_step(self, step: int) -> None:
        last = step == self.total
        if (self.every and step % self.every == 0) or last:
            self.save(step, force=last)
        if self.signal is not None:
            say(f"received signal {self.signal}: saving checkpoint at step {step}")
            self.save(step, force=True)
            self.mgr.wait_until_finished()
            raise SystemExit(143)

    def __exit__(self, exc_type, exc, tb):
        signal.signal(signal.SIGTERM, self._prev)
        try:
            if exc_type is None:
                self.mgr.wait_until_finished()
        finally:
            for c in self.closers:
                c.close()
            self.mgr.close()
        return False
