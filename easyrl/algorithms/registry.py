"""The algorithm registry: one record per trainer, read by the CLI, the pipeline and the planner.

Each module in `easyrl/algorithms/` that defines `ALGORITHM = Algorithm(...)` is a trainer
(`easyrl <command>`, `configs/<command>.py`); `easyrl.pipeline.run` adds the `pipeline`
recipe. Adding a trainer = one algorithm file with its record + one config file.

A record names its loop and what that loop needs:

* `loop="supervised"` (`easyrl.train.loop`): `build_task(env) -> Task`; for the planner also
  `make_loss(c, model_config, adapters_off_reference) -> loss_fn`, `denom` and
  `batch_spec(c, rows) -> {key: ShapeDtypeStruct}` (the global batch the iterators produce).
* `loop="online"` (`easyrl.train.rl_loop`): `online`, an object with `section`, `validate` and
  `build` (see rl_loop's docstring).
* `loop="recipe"`: `run(c)` (the pipeline).
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Dict, Optional

LOOPS = ("supervised", "online", "recipe")
# modules outside easyrl/algorithms that carry a record
EXTRA_MODULES = ("easyrl.pipeline.run",)


@dataclasses.dataclass(frozen=True)
class Algorithm:
    command: str
    help: str
    loop: str
    kind: str = "causal_lm"  # the model kind the run trains (its run dir's kind)
    order: int = 100  # position in `easyrl --help`
    check_config: Optional[Callable] = None  # c -> None; ValueError naming the key
    build_task: Optional[Callable] = None  # supervised: Env -> Task
    make_loss: Optional[Callable] = None  # supervised: (c, model_config, adapters_off_reference)
    denom: Optional[Callable] = None  # supervised: global batch -> normalizer
    batch_spec: Optional[Callable] = None  # supervised: (c, rows) -> {key: ShapeDtypeStruct}
    init_missing_head: bool = False  # supervised reward models: fresh score head on an LM
    live_reference: Optional[Callable] = None  # c -> does training hold a frozen reference?
    online: Any = None  # online: the algorithm spec
    run: Optional[Callable] = None  # recipe: c -> result

    def __post_init__(self):
        if self.loop not in LOOPS:
            raise ValueError(f"algorithm {self.command!r}: loop={self.loop!r}, expected one of {LOOPS}")

    def train(self, c):
        """Run this trainer on config `c` (checked first)."""
        if self.check_config is not None:
            self.check_config(c)
        if self.loop == "supervised":
            from easyrl.train import loop
            return loop.run(c, self)
        if self.loop == "online":
            from easyrl.train import rl_loop
            return rl_loop.run(c, self)
        return self.run(c)


_CACHE: Dict[str, Algorithm] = {}


def _modules():
    import easyrl.algorithms as pkg
    names = [f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)
             if not m.name.startswith("_") and m.name not in ("registry", "common")]
    return names + list(EXTRA_MODULES)


def all_algorithms() -> Dict[str, Algorithm]:
    """{command: record} for every registered trainer, in `order`."""
    if not _CACHE:
        found = []
        for name in _modules():
            rec = getattr(importlib.import_module(name), "ALGORITHM", None)
            if isinstance(rec, Algorithm):
                found.append(rec)
        for rec in sorted(found, key=lambda a: (a.order, a.command)):
            if rec.command in _CACHE:
                raise ValueError(f"two algorithm records for command {rec.command!r}")
            _CACHE[rec.command] = rec
    return dict(_CACHE)


def get(command: str) -> Algorithm:
    algos = all_algorithms()
    if command not in algos:
        raise ValueError(f"unknown trainer {command!r}; available: {', '.join(algos)}")
    return algos[command]
