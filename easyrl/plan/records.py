"""The planner's records: a memory line, a setting (mesh, micro-batch, remat) and a plan."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional



@dataclasses.dataclass
class Line:
    name: str
    per_device: float
    total: Optional[float] = None  # unsharded total (None: not meaningful)
    note: str = ""
    phase: str = "resident"  # resident | rollout | scoring | step | update


@dataclasses.dataclass
class Setting:
    mesh: dict  # {'dp': .., 'fsdp': .., 'tp': ..}
    micro: int  # examples per micro-batch (PPO: rows per update minibatch; GRPO: completion rows
    # per micro-batch = train.micro_batch_size x grpo.num_generations, or the whole minibatch)
    remat: str

    def mesh_spec(self) -> str:
        return ",".join(f"{a}:{self.mesh[a]}" for a in ("dp", "fsdp", "tp"))


@dataclasses.dataclass
class Plan:
    command: str
    devices: int
    device_memory: float  # bytes
    headroom: float
    setting: Setting
    lines: List[Line]
    resident: float
    phases: Dict[str, float]
    peak: float
    problems: List[str]  # reasons the trainer would refuse this setting
    info: List[str]  # batch / shape notes
    group: int = 1  # completions per prompt (GRPO's grpo.num_generations; else 1)
    engine: str = "static"  # PPO / GRPO: rollout.engine (static | continuous)
    slots: int = 0  # continuous engine: its decode slots (rollout.slots, 0 resolved to the rows)

    @property
    def limit(self) -> float:
        return (1.0 - self.headroom) * self.device_memory

    @property
    def fits(self) -> bool:
        return not self.problems and self.peak <= self.limit

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get) if self.phases else ""

    def line(self, name: str) -> Line:
        return next(x for x in self.lines if x.name.startswith(name))
