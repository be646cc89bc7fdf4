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


def read_jsonl_rows(path: str) -> list:
    """The rows of a jsonl file easyrl appended to. A torn LAST line (a kill mid-write) is
    dropped with a warning; a bad line elsewhere is an error naming the file and line."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    rows = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            rows.append(json.loads(ln))
        except ValueError as e:
            if all(not x.strip() for x in lines[i + 1:]):
                log.warning("%s: line %d is torn (the run was killed while writing it); dropped",
                            path, i + 1)
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e})") from None
    return rows


def restart_jsonl(path: str, resume_step: Optional[int]) -> None:
    """A per-step jsonl log (metrics, samples) at the start of a run: resuming from a checkpoint
    at `resume_step` keeps the rows up to it (later ones will be redone, a torn last line is
    dropped); a fresh run (None) starts the file anew."""
    if not os.path.exists(path):
        return
    if resume_step is None:
        os.remove(path)
        return
    keep = [r for r in read_jsonl_rows(path) if r.get("step", 0) <= resume_step]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(tmp, path)


class MetricsWriter:
    def __init__(self, output_dir: str, config=None, tensorboard: bool = True,
                 wandb_project: str = "", wandb_name: str = "", resume_step: Optional[int] = None):
        self.active = jax.process_index() == 0
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._tb = self._wandb = None
        if not self.active:
            return
        os.makedirs(output_dir, exist_ok=True)
        restart_jsonl(self.path, resume_step)
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
    return read_jsonl_rows(os.path.join(output_dir, "metrics.jsonl"))
