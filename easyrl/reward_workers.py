"""Reward functions in worker processes: a call that hangs or kills its process cannot hang or
kill the run (`reward.num_workers > 0`).

`WorkerPool(n, timeout)` keeps `n` worker processes (multiprocessing's "spawn" context: a fresh
interpreter, never a fork of the JAX process). `run(tasks)` hands each task (one reward
function's call on one batch) to a free worker and waits at most `timeout` seconds for it. A
worker that does not answer in time is killed, one that died (a segfault, `os._exit`) is
reaped; either is replaced by a fresh process at its next task. The answer of a task is
`("ok", values, logged)`, `("error", "ExcType: message")` (the function raised),
`("timeout", seconds)` or `("crash", exit code)`.

The function travels as its config spec (`module:function`, `path/to/file.py:function` or a
built-in name) with the resolver that loads it (`easyrl.rewards.resolve_reward_function`,
pickled by reference), re-resolved in the worker and cached there, or, for a function added in code
without a spec, pickled by reference (a module-level function). Its keyword arguments are the
ones TRL passes (see `easyrl.rewards`); `log_metric` / `log_extra` are recorded in the worker and
sent back with the values.
"""
from __future__ import annotations

import asyncio
import inspect
import multiprocessing as mp
import pickle
import time
from multiprocessing.connection import wait
from typing import Any, Callable, Sequence

import numpy as np

Answer = tuple


def _plain(result):
    """A reward function's return value as a picklable list (numpy arrays -> lists)."""
    if isinstance(result, np.ndarray):
        return result.tolist()
    return result


def call_reward_function(fn: Callable, kwargs: dict):
    """Call `fn(**kwargs)`, awaiting it when it is `async def` (in a fresh event loop)."""
    out = fn(**kwargs)
    if inspect.isawaitable(out):
        async def _await():
            return await out
        out = asyncio.run(_await())
    return out


def _worker_main(conn) -> None:  # pragma: no cover - runs in the child process
    cache: dict = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if msg is None:
            return
        ref, kwargs = msg
        logged: list = []
        try:
            if ref[0] == "spec":  # ("spec", resolver pickled by reference, spec)
                if ref[2] not in cache:
                    cache[ref[2]] = ref[1](ref[2])[1]
                fn = cache[ref[2]]
            else:
                fn = ref[1]
            kwargs = dict(kwargs, log_metric=lambda name, value: logged.append(
                (str(name), float(value))), log_extra=lambda column, values: None)
            answer = ("ok", _plain(call_reward_function(fn, kwargs)), logged)
        except BaseException as e:  # noqa: BLE001 - user code: reported, the worker lives on
            answer = ("error", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
        try:
            conn.send(answer)
        except Exception as e:  # an unpicklable return value
            conn.send(("error", f"its return value could not be sent back from the worker "
                                f"({type(e).__name__}: {e})"))


def function_ref(fn: Callable, spec: str, label: str, resolver: Callable | None = None):
    """What a worker needs to find `fn`: its spec and the resolver that turns it into the
    function (`easyrl.rewards.resolve_reward_function`, pickled by reference), else the function
    itself pickled by reference."""
    if spec and resolver is not None:
        return ("spec", resolver, spec)
    try:
        pickle.dumps(fn)
    except Exception as e:
        raise ValueError(f"config reward.num_workers: {label} cannot be sent to a worker "
                         f"process ({type(e).__name__}: {e}); give it as 'module:function' or "
                         f"'path/to/file.py:function', or set reward.num_workers=0") from None
    return ("fn", fn)


class WorkerPool:
    """`n` worker processes for reward calls, each call bounded by `timeout` seconds."""

    def __init__(self, n: int, timeout: float):
        if n < 1:
            raise ValueError(f"WorkerPool needs n >= 1, got {n}")
        self.timeout = float(timeout)
        self._ctx = mp.get_context("spawn")
        self._workers: list = [None] * int(n)
        self.replaced = 0  # workers killed or reaped and replaced (over the pool's life)

    def _worker(self, i: int):
        w = self._workers[i]
        if w is None or not w[0].is_alive():
            if w is not None:
                self._drop(i)
            parent, child = self._ctx.Pipe()
            p = self._ctx.Process(target=_worker_main, args=(child,), daemon=True,
                                  name=f"easyrl-reward-{i}")
            p.start()
            child.close()
            self._workers[i] = w = (p, parent)
        return w

    def _drop(self, i: int, kill: bool = False) -> None:
        p, conn = self._workers[i]
        if kill and p.is_alive():
            p.kill()
        p.join(5)
        conn.close()
        self._workers[i] = None
        self.replaced += 1

    def run(self, tasks: Sequence[tuple[Any, dict]]) -> list[Answer]:
        """Answers of `tasks` ((function ref, kwargs) each), in order; see the module doc."""
        results: list = [None] * len(tasks)
        pending = list(range(len(tasks)))
        busy: dict[int, tuple[int, float]] = {}  # worker -> (task, deadline)
        while pending or busy:
            for i in range(len(self._workers)):
                if i in busy or not pending:
                    continue
                t = pending.pop(0)
                p, conn = self._worker(i)
                try:
                    conn.send(tasks[t])
                except Exception as e:  # unpicklable arguments: the task fails, not the pool
                    results[t] = ("error", f"its arguments could not be sent to a worker "
                                           f"({type(e).__name__}: {e})")
                    self._drop(i, kill=True)
                    continue
                busy[i] = (t, time.monotonic() + self.timeout)
            if not busy:
                continue
            now = time.monotonic()
            soonest = min(dl for _, dl in busy.values())
            handles = []
            for i in busy:
                p, conn = self._workers[i]
                handles += [conn, p.sentinel]
            wait(handles, timeout=max(0.0, soonest - now))
            now = time.monotonic()
            for i, (t, dl) in list(busy.items()):
                p, conn = self._workers[i]
                if conn.poll():
                    try:
                        results[t] = conn.recv()
                    except (EOFError, OSError):
                        p.join(5)
                        results[t] = ("crash", p.exitcode)
                        self._drop(i, kill=True)
                    del busy[i]
                elif not p.is_alive():
                    p.join(5)
                    results[t] = ("crash", p.exitcode)
                    self._drop(i)
                    del busy[i]
                elif now >= dl:
                    results[t] = ("timeout", self.timeout)
                    self._drop(i, kill=True)
                    del busy[i]
        return results

    def close(self) -> None:
        for i, w in enumerate(self._workers):
            if w is None:
                continue
            p, conn = w
            try:
                conn.send(None)
            except Exception:
                pass
            p.join(2)
            if p.is_alive():
                p.kill()
                p.join(2)
            conn.close()
            self._workers[i] = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
