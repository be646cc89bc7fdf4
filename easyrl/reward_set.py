"""The weighted reward sources of one batch (`RewardSet`), called as TRL calls reward functions:
the calling convention, unscorable rows, async functions, the worker pool and the slow-function
line are documented in `easyrl.rewards` (which re-exports everything here)."""
from __future__ import annotations

import asyncio
import dataclasses
import inspect
import math
import numbers
import sys
import threading
from typing import Callable, Sequence

import numpy as np

from easyrl.reward_builtins import as_text
from easyrl.reward_workers import WorkerPool, function_ref

DEFAULT_TIMEOUT = 600.0  # seconds per reward call in a worker process (reward.timeout)
_RESERVED = ("prompts", "completions", "completion_ids")


class RewardError(ValueError):
    """A reward source failed on a batch (one line: which source, and what was wrong)."""


# ----------------------------------------------------------------------------- RewardSet
class _Source:
    def __init__(self, name: str, weight: float, fn: Callable, spec: str, takes_columns: bool):
        self.name, self.weight, self.fn, self.spec = name, weight, fn, spec
        self.takes_columns = takes_columns
        self.ref = None  # what a worker process needs to find fn (reward.num_workers > 0)

    def label(self) -> str:
        return f"reward function '{self.name}'" + (f" ({self.spec})" if self.spec else "")


def one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if len(msg) > 300:
        msg = msg[:297] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def check_weight(weight, what: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) \
            or not math.isfinite(float(weight)):
        raise ValueError(f"{what}: weight must be a finite number, got {weight!r}")
    return float(weight)


def to_values(result, n: int, label: str) -> list[float | None]:
    """Validate a source's return: N numbers or None -> a list of float | None."""
    if isinstance(result, (str, bytes, dict)) or not hasattr(result, "__len__"):
        raise RewardError(f"{label} returned {type(result).__name__}, expected a list of {n} "
                          f"floats (or None)")
    if not isinstance(result, (list, tuple)):
        arr = np.asarray(result)
        if arr.ndim != 1:
            raise RewardError(f"{label} returned an array of shape {arr.shape}, expected ({n},)")
        result = arr.tolist()
    if len(result) != n:
        raise RewardError(f"{label} returned {len(result)} values for {n} completions")
    out = []
    for i, v in enumerate(result):
        if v is None:
            out.append(None)
            continue
        if not isinstance(v, numbers.Real):
            a = np.asarray(v) if hasattr(v, "__array__") else None
            if a is None or a.shape != () or not np.issubdtype(a.dtype, np.number):
                raise RewardError(f"{label} returned a non-number at row {i}: {v!r:.60} "
                                  f"({type(v).__name__})")
        f = float(v)
        if math.isnan(f):  # NaN = not applicable (TRL turns None into NaN)
            out.append(None)
            continue
        if not math.isfinite(f):
            raise RewardError(f"{label} returned a non-finite value at row {i}: {f}")
        out.append(f)
    return out


@dataclasses.dataclass
class TrainerState:
    """What TRL hands reward functions as ``trainer_state`` (a ``transformers.TrainerState``):
    the optimizer steps done (``global_step``), the run's total (``max_steps``) and the epochs
    of prompts consumed (``epoch``, a float), for rewards shaped by training progress."""
    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0


ON_ERROR = ("raise", "none")
SLOW_WARNING_S = 60.0  # in process: a reward function still running after this prints a line


def _watched(label: str, call: Callable):
    """``call()``, printing one line if it is still running after ``SLOW_WARNING_S``."""
    t = threading.Timer(SLOW_WARNING_S, lambda: print(
        f"rewards: {label} is still running after {SLOW_WARNING_S:g} s (set reward.num_workers "
        f"> 0 to bound each call by reward.timeout)", file=sys.stderr, flush=True))
    t.daemon = True
    t.start()
    try:
        return call()
    finally:
        t.cancel()


def _in_thread(fn: Callable):
    """Run ``fn()`` in a fresh thread (its own event loop for ``asyncio.run``, also when the
    caller's thread already runs one, e.g. a notebook); re-raise what it raised."""
    box: dict = {}

    def target():
        try:
            box["out"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["err"] = e
    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join()
    if "err" in box:
        raise box["err"]
    return box["out"]


class RewardSet:
    """Weighted reward sources: ``total = sum_k w_k * r_k`` (``None`` entries skipped).

    ``context``: scalar keyword arguments passed to every function (e.g.
    ``max_completion_length``, ``overlong_cache``); a column of the same name wins.
    ``num_workers`` > 0 runs the functions in that many worker processes
    (`easyrl.reward_workers`), each call bounded by ``timeout`` seconds; ``on_error`` says what
    a call that raised, timed out or crashed does: ``raise`` (stop with one line) or ``none``
    (its rows are not applicable, counted in ``rewards/<name>/errors``)."""

    def __init__(self, context: dict | None = None, num_workers: int = 0,
                 timeout: float = DEFAULT_TIMEOUT, on_error: str = "raise",
                 resolver: Callable | None = None):
        self.sources: list[_Source] = []
        self.context = dict(context or {})
        if on_error not in ON_ERROR:
            raise ValueError(f"config reward.on_error: {on_error!r}; valid: {', '.join(ON_ERROR)}")
        self.num_workers, self.timeout, self.on_error = int(num_workers), float(timeout), on_error
        self.resolver = resolver  # spec -> (name, fn), for workers (rewards.resolve_reward_function)
        self._pool = None
        self.resolver = resolver  # spec -> (name, fn), for workers (rewards.resolve_reward_function)
        self.extra_metrics: dict[str, float] = {}  # of the last `values` call (errors, log_metric)

    def _unique(self, name: str) -> str:
        taken = {s.name for s in self.sources}
        if name not in taken:
            return name
        k = 2
        while f"{name}_{k}" in taken:
            k += 1
        return f"{name}_{k}"

    def add(self, name: str, weight: float, fn: Callable, spec: str = "") -> str:
        """Add a reward function (TRL convention); returns its (unique) metric name."""
        if not callable(fn):
            raise ValueError(f"reward source '{name}' is not callable")
        name = self._unique(name)
        src = _Source(name, check_weight(weight, f"reward source '{name}'"), fn, spec, True)
        if self.num_workers > 0:
            src.ref = function_ref(fn, spec if self.resolver else "", src.label(), self.resolver)
        self.sources.append(src)
        return name

    def add_model(self, name: str, weight: float,
                  score_fn: Callable[[Sequence[str], Sequence[str], Sequence], np.ndarray]) -> str:
        """Add a reward model ``score_fn(prompts, completions, completion_ids) -> [N]`` as a
        source (positional; no columns are passed to it, it runs in process); returns its
        (unique) metric name."""
        if not callable(score_fn):
            raise ValueError(f"reward model '{name}' is not callable")
        name = self._unique(name)
        self.sources.append(_Source(name, check_weight(weight, f"reward model '{name}'"),
                                    score_fn, "reward model", False))
        return name

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def weights(self) -> list[float]:
        return [s.weight for s in self.sources]

    def __len__(self) -> int:
        return len(self.sources)

    def __repr__(self) -> str:
        return "RewardSet(" + ", ".join(f"{s.name}*{s.weight:g}" for s in self.sources) + ")"

    def __call__(self, prompts: Sequence, completions: Sequence[str],
                 completion_ids: Sequence | None, columns: dict | None = None, **kw):
        """``(total [N] float32, metrics)`` for a batch (with the call's ``extra_metrics``)."""
        total, metrics = self.combine(self.values(prompts, completions, completion_ids, columns,
                                                  **kw))
        return total, {**metrics, **self.extra_metrics}

    def close(self) -> None:
        """Stop the worker processes (if any)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def values(self, prompts: Sequence, completions: Sequence[str],
               completion_ids: Sequence | None, columns: dict | None = None, *,
               trainer_state: TrainerState | None = None,
               messages: Sequence | None = None) -> np.ndarray:
        """Every source's rewards for a batch: float64 ``[N, K]`` (K sources, in order), NaN
        where a source returned ``None``. ``combine`` turns (rows of) it into the total; the
        online-RL loop computes it on each host's own rows and gathers the rows of all hosts.

        The functions are called as TRL calls them (keyword arguments ``prompts``,
        ``completions``, ``completion_ids``, the columns, ``trainer_state``, ``log_metric``,
        ``log_extra``). ``messages``: the rows' prompts as message lists (conversational data):
        then ``prompts`` passed to the functions are those lists and each completion is
        ``[{"role": "assistant", "content": text}]``, as TRL does."""
        if not self.sources:
            raise ValueError("no reward sources configured (reward.functions or a reward model)")
        prompts, completions = list(prompts), list(completions)
        n = len(prompts)
        if len(completions) != n or (completion_ids is not None and len(completion_ids) != n):
            raise ValueError(f"rewards: {n} prompts, {len(completions)} completions, "
                             f"{'no' if completion_ids is None else len(completion_ids)} "
                             f"completion_ids: they must align")
        columns = dict(columns or {})
        for k, v in columns.items():
            if k in _RESERVED:
                raise ValueError(f"rewards: a prompt column may not be named {k!r}")
            if len(v) != n:
                raise ValueError(f"rewards: column {k!r} has {len(v)} values for {n} prompts")
        if messages is not None and len(messages) == n and all(
                isinstance(m, (list, tuple)) for m in messages):
            call_prompts = [list(m) for m in messages]
            call_completions = [[{"role": "assistant", "content": c}] for c in completions]
        else:
            call_prompts, call_completions = prompts, completions
        ids = None if completion_ids is None else [list(x) for x in completion_ids]
        kwargs = {**{k: v for k, v in self.context.items() if k not in _RESERVED}, **columns,
                  "prompts": call_prompts, "completions": call_completions,
                  "completion_ids": ids, "trainer_state": trainer_state or TrainerState()}
        self.extra_metrics = {}
        logged: dict[str, list] = {}

        def log_metric(name, value):
            logged.setdefault(str(name), []).append(float(value))

        user = [j for j, s in enumerate(self.sources) if s.takes_columns]
        results: dict[int, tuple] = {}
        if self.num_workers > 0 and user:
            if self._pool is None:
                self._pool = WorkerPool(self.num_workers, self.timeout)
            answers = self._pool.run([(self.sources[j].ref, kwargs) for j in user])
            for j, a in zip(user, answers):
                if a[0] == "ok":
                    for name, v in a[2]:
                        log_metric(name, v)
                results[j] = a
        elif user:
            call_kw = dict(kwargs, log_metric=log_metric, log_extra=lambda column, values: None)
            sync = [j for j in user if not inspect.iscoroutinefunction(self.sources[j].fn)]
            for j in sync:
                s = self.sources[j]
                try:
                    results[j] = ("ok", _watched(s.label(), lambda: s.fn(**call_kw)))
                except Exception as e:  # user code: one line naming the source
                    results[j] = ("error", one_line(e))
            coros = [j for j in user if j not in results]
            if coros:
                results.update(self._run_async(coros, call_kw))
        out = np.full((n, len(self.sources)), np.nan, np.float64)
        for j, s in enumerate(self.sources):
            label = s.label()
            if not s.takes_columns:
                try:
                    result = s.fn(prompts, completions, completion_ids)
                except Exception as e:
                    raise RewardError(f"{label} raised {one_line(e)}") from None
            else:
                a = results[j]
                if a[0] != "ok":
                    why = {"error": lambda: f"raised {a[1]}",
                           "timeout": lambda: f"did not return within {a[1]:g} s "
                                              f"(config reward.timeout)",
                           "crash": lambda: f"killed its worker process (exit code {a[1]})"}[
                        a[0]]()
                    if self.on_error == "raise":
                        hint = "" if a[0] == "error" else " (reward.on_error=none skips such rows)"
                        raise RewardError(f"{label} {why}{hint}")
                    print(f"rewards: {label} {why}; its {n} rows count as not applicable "
                          f"(reward.on_error=none)", file=sys.stderr, flush=True)
                    self.extra_metrics[f"rewards/{s.name}/errors"] = float(n)
                    continue
                result = a[1]
                if self.on_error == "none":
                    self.extra_metrics[f"rewards/{s.name}/errors"] = 0.0
            for i, v in enumerate(to_values(result, n, label)):
                if v is not None:
                    out[i, j] = v
        for name, vs in logged.items():
            self.extra_metrics[name] = float(np.mean(vs))
        return out

    def _run_async(self, idx: list, call_kw: dict) -> dict:
        """The ``async def`` sources, awaited together (``asyncio.gather``, as TRL)."""
        srcs = [self.sources[j] for j in idx]

        async def one(s):
            try:
                return ("ok", await s.fn(**call_kw))
            except Exception as e:
                return ("error", one_line(e))

        async def gather():
            return await asyncio.gather(*(one(s) for s in srcs))

        label = ", ".join(s.label() for s in srcs)
        answers = _watched(label, lambda: _in_thread(lambda: asyncio.run(gather())))
        return dict(zip(idx, answers))

    def combine(self, values: np.ndarray):
        """``(total [N] float32, metrics)`` from ``values`` [N, K] (see ``values``). A row where
        every source is NaN (``None``) is unscorable: its total is NaN (as TRL), counted in
        ``rewards/none_rows`` and left out of ``reward`` / ``reward_std`` (nanmean, nanstd)."""
        values = np.asarray(values, np.float64)
        n = values.shape[0]
        if values.ndim != 2 or values.shape[1] != len(self.sources):
            raise ValueError(f"rewards: values of shape {values.shape} for {len(self.sources)} "
                             f"sources")
        total = np.zeros(n, np.float64)
        applicable = np.zeros(n, bool)
        metrics: dict[str, float] = {}
        for j, s in enumerate(self.sources):
            col = values[:, j]
            got = ~np.isnan(col)
            vals = col[got]
            if vals.size:
                metrics[f"rewards/{s.name}/mean"] = float(vals.mean())
                metrics[f"rewards/{s.name}/std"] = float(vals.std())
            applicable |= got
            if s.weight != 0.0:
                total[got] += s.weight * vals
        metrics["rewards/none_rows"] = float(n - applicable.sum())
        total[~applicable] = np.nan
        total = total.astype(np.float32)
        metrics.update(reward_stats(total))
        return total, metrics


def reward_stats(total) -> dict:
    """``reward`` / ``reward_std`` of the scorable (non-NaN) totals (0 when there are none)."""
    t = np.asarray(total, np.float64)
    t = t[~np.isnan(t)]
    return {"reward": float(t.mean()) if t.size else 0.0,
            "reward_std": float(t.std()) if t.size else 0.0}


def unscorable_warning(prompts, completions, values) -> str | None:
    """One line for the rows where every source returned None (TRL warns the same), or None."""
    bad = np.flatnonzero(np.all(np.isnan(np.asarray(values, np.float64)), axis=1))
    if not bad.size:
        return None
    i = int(bad[0])
    return (f"rewards: every reward function returned None for {bad.size} of {len(values)} "
            f"rows (first: row {i}, prompt {str(as_text(prompts[i]))[-80:]!r}, completion "
            f"{str(completions[i])[:80]!r}); they get advantage 0. Make sure at least one "
            f"reward function returns a value for every row.")
