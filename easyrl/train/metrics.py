"""Metric sinks: metrics.jsonl (always), TensorBoard (when installed), W&B (when configured).
Only process 0 writes."""
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
                self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
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
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(output_dir: str) -> list:
    path = os.path.join(output_dir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]
