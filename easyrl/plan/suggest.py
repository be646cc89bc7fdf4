"""The search for a (mesh, micro-batch, remat) setting that fits, and the flags that set it."""
from __future__ import annotations

import itertools
from typing import List, Optional, Tuple

from easyrl.plan.planner import Plan, Planner, Setting

REMAT_COST = {"none": 0, "dots": 1, "dots_no_batch": 2, "minimal": 2, "full": 3}
SEARCH_REMAT = ("none", "dots", "dots_no_batch", "full")  # minimal == dots_no_batch


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_meshes(devices: int, max_tp: int = 8) -> List[dict]:
    out = []
    for tp in _divisors(devices):
        if tp > max_tp:
            break
        for dp in _divisors(devices // tp):
            out.append({"dp": dp, "fsdp": devices // tp // dp, "tp": tp})
    return out


def _cost(s: Setting, cur: Setting) -> tuple:
    changed = (s.mesh != cur.mesh) + (s.micro != cur.micro) + (s.remat != cur.remat)
    # fewer changes first; then less recomputation, bigger micro-batches, less tensor parallelism,
    # fewer replicas (dp) than fsdp
    return (changed, REMAT_COST[s.remat], -s.micro, s.mesh["tp"], s.mesh["dp"])


def suggest(planner: Planner, limit: int = 3) -> List[Plan]:
    """Settings of (mesh, micro-batch, remat) on the same devices that fit, best first: fewest
    changed knobs, then the cheapest (least recomputation, biggest micro-batch, least tp)."""
    cur = planner.current()
    micros = planner.micro_candidates()
    fits = []
    for mesh, micro, remat in itertools.product(candidate_meshes(planner.devices), micros,
                                                SEARCH_REMAT):
        s = Setting(mesh, micro, remat)
        if s == cur:
            continue
        p = planner.estimate(s)
        if p.fits:
            fits.append((_cost(s, cur), p))
    fits.sort(key=lambda x: x[0])
    out, seen = [], set()
    for _, p in fits:  # one suggestion per set of changed knobs
        key = (p.setting.mesh != cur.mesh, p.setting.micro != cur.micro, p.setting.remat != cur.remat)
        if key in seen:
            continue
        seen.add(key)
        out.append(p)
        if len(out) >= limit:
            break
    return out


def min_devices(c, models, device_memory: float, headroom: float, start: int,
                cap: int = 1 << 16, platform: Optional[str] = None) -> Optional[Tuple[int, Plan]]:
    """The smallest power-of-two multiple of `start` devices on which some setting fits."""
    n = start * 2
    while n <= cap:
        pl = Planner(c, models, n, device_memory, headroom, platform)
        cur = pl.current()
        best = None
        for mesh in candidate_meshes(n):
            for remat in SEARCH_REMAT:
                for micro in pl.micro_candidates():
                    p = pl.estimate(Setting(mesh, micro, remat))
                    if p.fits and (best is None or _cost(p.setting, cur) < _cost(best.setting, cur)):
                        best = p
        if best is not None:
            return n, best
        n *= 2
    return None


def setting_flags(plan: Plan, cur: Setting, command: str, batch_size: int) -> str:
    s = plan.setting
    out = []
    if s.mesh != cur.mesh:
        out.append(f"--config.mesh={s.mesh_spec()}")
    if s.micro != cur.micro:
        if command == "ppo":
            out.append(f"--config.ppo.num_minibatches={batch_size // s.micro}")
        elif command in ("grpo", "online_dpo"):  # micro counts rows: whole groups (online DPO:
            g = plan.group if command == "grpo" else 2  # whole pairs), or the minibatch (0)
            out.append(f"--config.train.micro_batch_size={s.micro // g if s.micro % g == 0 else 0}")
        else:
            out.append(f"--config.train.micro_batch_size={s.micro}")
    if s.remat != cur.remat:
        out.append(f"--config.model.remat={s.remat}")
    return " ".join(out) or "(as configured)"

