"""Metric sinks: metrics.jsonl (always), TensorBoard (when installed), W&B (when configured).
Only process 0 writes. metrics.jsonl holds every row as logged (`step` and all values, lists
included); TensorBoard and W&B receive the same scalars: every real-number value of the row
(ints, floats, bools as 0/1) other than `step`, which is their x-axis, not a metric."""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import jax
import numpy as np

log = logging.getLogger(__name__)


def to_python(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v)
        out[k] = v.item() if v.ndim == 0 else v.tolist()
    return out


def scalars(row: dict) -> dict:
    """The row's scalar metrics as the TensorBoard / W&B sinks receive them (`step` left out)."""
    out = {}
    for k, v in row.items():
        if k == "step":
            continue
        if isinstance(v, bool):
            out[k] = int(v)
        elif isinstance(v, (int, float)):
            out[k] = v
    return out


class MetricsWriter:
    def __init__(self, output_dir: str, config=None, tensorboard: bool = True,
                 wandb_project: str = "", wandb_name: str = "", resume_step: Optional[int] = None):
        self.active = jax.process_index() == 0
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._tb = self._wandb = None
        if not self.active:
            return
        os.makedirs(output_dir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            # drop lines logged after the checkpoint we resume from (they will be redone)
            with open(self.path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(keep)
        elif resume_step is None and os.path.exists(self.path):
            os.remove(self.path)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                tb_dir = os.path.join(output_dir, "tensorboard")
                purge = None
                if resume_step is not None:
                    # TensorBoard drops the earlier event files' points at steps >= purge_step
                    # (they will be redone), as metrics.jsonl drops its rows
                    purge = int(resume_step) + 1
                elif os.path.isdir(tb_dir):  # a fresh run: no stale curves, as metrics.jsonl
                    for name in os.listdir(tb_dir):
                        if name.startswith("events.out.tfevents."):
                            os.remove(os.path.join(tb_dir, name))
                self._tb = SummaryWriter(tb_dir, purge_step=purge)
            except ImportError:
                pass
        if wandb_project:
            import wandb
            self._wandb = wandb.init(project=wandb_project, name=wandb_name or None,
                                     config=config.to_dict() if config is not None else None,
                                     resume="allow")

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        row = {"step": int(step), **to_python(metrics)}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        sc = scalars(row)
        if self._tb is not None:
            for k, v in sc.items():
                self._tb.add_scalar(k, v, row["step"])
        if self._wandb is not None:
            self._wandb.log(sc, step=row["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(output_dir: str) -> list:
    path = os.path.join(output_dir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]
