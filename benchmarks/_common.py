"""Shared pieces of the benchmark scripts: machine info, hardware ceilings, timing, tables, JSON.

Timings on a shared machine are noisy: every script measures easyrl and the reference in the same
process, interleaved (A, B, A, B, ...), several repetitions, and reports medians together with the
load average before and after the run.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def num_threads() -> int:
    """Cores this process may use. XLA:CPU sizes its intra-op (Eigen) thread pool to this, and the
    torch side is pinned to the same number with torch.set_num_threads."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def loadavg() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    import jax
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                host_cpu=cpu_model(), cores=num_threads(), python=platform.python_version(),
                jax=jax.__version__, jax_backend=jax.default_backend(),
                devices=[str(d) for d in jax.devices()], loadavg_start=loadavg(),
                argv=" ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]))
    for mod in ("flax", "optax", "torch", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if jax.default_backend() == "gpu":
        info["gpu"] = jax.devices()[0].device_kind
    return info


def median(xs):
    return float(statistics.median(xs))


def timeit(fn, sync=lambda r: r, n: int = 1) -> float:
    """Seconds for `n` calls of fn() (the last result passed through `sync` to block)."""
    t0 = time.perf_counter()
    r = None
    for _ in range(n):
        r = fn()
    sync(r)
    return time.perf_counter() - t0


# ---- hardware ceilings ---------------------------------------------------------------------
def jax_matmul_ceiling(n: int = 4096, dtype="float32", reps: int = 5) -> float:
    """Best FLOP/s of a jitted [n, n] @ [n, n] matmul (the achievable matmul ceiling)."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = min(timeit(lambda: f(a, b), lambda r: r.block_until_ready()) for _ in range(reps))
    return 2.0 * n ** 3 / best


def torch_matmul_ceiling(n: int = 4096, dtype="float32", reps: int = 5) -> float:
    import torch
    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    a @ b
    best = min(timeit(lambda: a @ b) for _ in range(reps))
    return 2.0 * n ** 3 / best


def jax_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Memory read bandwidth (bytes/s): best time of a jitted sum over a `nbytes` float32 array
    (bigger than any cache). A copy (read + write) is also measured; the read figure is the one a
    decode step (which mostly reads weights and cache) is bound by."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: jnp.sum(a))
    f(x).block_until_ready()
    best = min(timeit(lambda: f(x), lambda r: r.block_until_ready()) for _ in range(reps))
    return nbytes / best


def jax_copy_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """(read + write) bytes/s of a jitted out-of-place x * 1.0000001 over `nbytes` of float32."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0000001)
    f(x).block_until_ready()
    best = min(timeit(lambda: f(x), lambda r: r.block_until_ready()) for _ in range(reps))
    return 2 * nbytes / best


def numpy_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    x = np.ones((nbytes // 4,), np.float32)
    best = min(timeit(lambda: x.sum()) for _ in range(reps))
    return nbytes / best


# ---- profiles -------------------------------------------------------------------------------
def profile_ops(run, sync, steps: int = 1, logdir=None):
    """Run `run()` `steps` times under jax.profiler and sum the trace's op durations by name.

    Returns (Counter name -> microseconds per step, Counter name -> calls per step, trace path).
    XLA:CPU emits one event per executed thunk (fusions, dots, copies, loops)."""
    import collections
    import glob
    import gzip
    import re
    import tempfile
    import jax
    logdir = logdir or tempfile.mkdtemp(prefix="easyrl_prof_")
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        for _ in range(steps):
            sync(run())
    path = sorted(glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    tot, cnt = collections.Counter(), collections.Counter()
    skip = re.compile(r"^(PjitFunction|jit_|Thunk|ThunkExecutor|TfrtCpu|XlaModule|Execute|\$)")
    for e in events:
        if e.get("ph") != "X" or "dur" not in e or skip.match(e.get("name", "")):
            continue
        tot[e["name"]] += e["dur"] / steps
        cnt[e["name"]] += 1
    return tot, collections.Counter({k: v // steps for k, v in cnt.items()}), path


# ---- output ---------------------------------------------------------------------------------
def table(rows, headers) -> str:
    rows = [[("%.4g" % c) if isinstance(c, float) else str(c) for c in r] for r in rows]
    w = [max(len(str(h)), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(cells)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (x + 2) for x in w) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def write_json(path, payload: dict) -> None:
    if not path:
        return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    payload = dict(payload)
    payload.setdefault("machine", {})["loadavg_end"] = loadavg()
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=float)
    print(f"wrote {path}")
