"""Shared pieces of the benchmark scripts: machine info, hardware ceilings, timing, tables, JSON.

Timings on a shared machine are noisy: every script measures easyrl and the reference
interleaved (A, B, A, B, ...), several repetitions, and reports medians (and the best
repetition) together with the load average before and after the run. The training-step
benchmark runs the torch side in a worker process of its own (`Worker`): with both libraries'
training steps in one process, easyrl's step ran ~20% slower than alone (torch's allocations and
thread pool beside XLA's), which is not how either is used. Each timing also records
the process CPU time, which other processes on the machine disturb less than the wall clock.
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
# EASYRL_ROOT: import easyrl from another checkout (e.g. a `git archive` of an older commit) to
# measure a before/after pair with the same benchmark script
EASYRL_ROOT = os.environ.get("EASYRL_ROOT") or ROOT
if EASYRL_ROOT not in sys.path:
    sys.path.insert(0, EASYRL_ROOT)


def num_threads() -> int:
    """Cores this process may use. XLA:CPU sizes its intra-op thread pool to this, and the torch
    side is pinned to the same number with torch.set_num_threads."""
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
    """`model name` from /proc/cpuinfo (lscpu / platform as fallbacks)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    """The vector / matrix ISA extensions the CPU reports (what the matmul ceiling depends on)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    keep = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16",
                            "amx_tile")
                    return " ".join(k for k in keep if k in have)
    except OSError:
        pass
    return ""


def git_commit(path: str) -> str:
    """HEAD commit of `path` (+ "-dirty" when the easyrl package there has local changes)."""
    stamp = os.path.join(path, "COMMIT")  # written next to a `git archive` export
    if os.path.exists(stamp):
        with open(stamp) as f:
            return "archive of " + f.read().strip()
    try:
        head = subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "easyrl"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def machine_info() -> dict:
    import jax
    import jaxlib
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = round(int(f.readline().split()[1]) / 2 ** 20, 1)  # MemTotal, GiB
    except (OSError, ValueError, IndexError):
        pass
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                host_cpu=cpu_model(), cpu_flags=cpu_flags(), cores=num_threads(),
                cpu_count=os.cpu_count(), memory_gib=mem, python=platform.python_version(),
                jax=jax.__version__, jaxlib=jaxlib.__version__, jax_backend=jax.default_backend(),
                devices=[str(d) for d in jax.devices()], xla_flags=os.environ.get("XLA_FLAGS", ""),
                loadavg_start=loadavg(), easyrl_root=EASYRL_ROOT,
                easyrl_commit=git_commit(EASYRL_ROOT),
                argv=" ".join(["python", os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]))
    for mod in ("flax", "optax", "torch", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if jax.default_backend() == "gpu":
        info["gpu"] = jax.devices()[0].device_kind
    return info


def banner(info: dict) -> str:
    return (f"# {info['host_cpu']} x{info['cores']} threads | jax {info['jax']} "
            f"({info['jax_backend']}) | torch {info['torch']} | transformers {info['transformers']} "
            f"| load {info['loadavg_start']}")


def median(xs):
    return float(statistics.median(xs))


def timeit(fn, sync=lambda r: r, n: int = 1) -> float:
    """Seconds for `n` calls of fn() (the last result passed through `sync` to block)."""
    return timeit2(fn, sync, n)[0]


def timeit2(fn, sync=lambda r: r, n: int = 1):
    """(wall seconds, process CPU seconds) for `n` calls of fn(), the last result synced."""
    c0, t0 = time.process_time(), time.perf_counter()
    r = None
    for _ in range(n):
        r = fn()
    sync(r)
    return time.perf_counter() - t0, time.process_time() - c0


def stats(walls, cpus=None) -> dict:
    """Median / best / all of repeated timings (seconds)."""
    out = dict(median_s=median(walls), best_s=float(min(walls)), all_s=[float(x) for x in walls])
    if cpus is not None:
        out.update(cpu_median_s=median(cpus), cpu_all_s=[float(x) for x in cpus])
    return out


# ---- a reference implementation in its own process ---------------------------------------
class Worker:
    """A child process running `script --worker SPEC_JSON`, driven by JSON lines: `call(op=...)`
    sends one request and returns the child's reply (lines the child prints with `reply`); its
    other output passes through. The child idles on stdin between calls, so the two sides of an
    interleaved benchmark never run at the same time."""

    def __init__(self, script: str, spec: dict):
        self.proc = subprocess.Popen([sys.executable, script, "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     bufsize=1)
        self.ready = self._read()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                return json.loads(line[3:])
            print(line, end="", flush=True)
        raise RuntimeError(f"benchmark worker exited with code {self.proc.wait()}")

    def call(self, **msg):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


def reply(obj) -> None:
    print("@@ " + json.dumps(obj), flush=True)


def serve(handlers: dict, ready: dict) -> None:
    """The worker's side of `Worker`: reply `ready`, then answer {"op": name, **kwargs} lines."""
    reply(ready)
    for line in sys.stdin:
        msg = json.loads(line)
        reply(handlers[msg.pop("op")](**msg))


# ---- hardware ceilings ---------------------------------------------------------------------
CEILING_SIZES = (1024, 2048, 4096)


def jax_matmul_ceiling(n=CEILING_SIZES, dtype="float32", reps: int = 5) -> float:
    """Best FLOP/s of a jitted [n, n] @ [n, n] matmul over the sizes `n` (an int or several):
    the achievable matmul ceiling of this machine through XLA."""
    return max(jax_matmul_flops(n, dtype, reps).values())


def jax_matmul_flops(sizes=CEILING_SIZES, dtype="float32", reps: int = 5) -> dict:
    """{n: best FLOP/s of a jitted [n, n] @ [n, n] matmul} for each n in `sizes`."""
    import jax
    out = {}
    for n in ([sizes] if isinstance(sizes, int) else sizes):
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
        b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
        k = max(1, reps if n <= 2048 else reps // 2)
        best = float("inf")
        # low precision: the better of a plain dot and one accumulating in float32 (the form
        # easyrl's dense layers use; on XLA:CPU the plain bf16 dot is upcast and slower)
        pets = [None] if a.dtype.itemsize >= 4 else [None, "float32"]
        for pet in pets:
            f = jax.jit(lambda x, y, pet=pet: jax.numpy.matmul(x, y, preferred_element_type=pet))
            f(a, b).block_until_ready()
            best = min([best] + [timeit(lambda: f(a, b), lambda r: r.block_until_ready())
                                 for _ in range(k)])
        out[n] = 2.0 * n ** 3 / best
    return out


def torch_matmul_ceiling(n=CEILING_SIZES, dtype="float32", reps: int = 5) -> float:
    import torch
    dt = getattr(torch, dtype)
    best_flops = 0.0
    for m in ([n] if isinstance(n, int) else n):
        a, b = torch.randn(m, m, dtype=dt), torch.randn(m, m, dtype=dt)
        a @ b
        k = max(1, reps if m <= 2048 else reps // 2)
        best = min(timeit(lambda: a @ b) for _ in range(k))
        best_flops = max(best_flops, 2.0 * m ** 3 / best)
    return best_flops


def jax_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Memory read bandwidth (bytes/s): best time of a jitted sum over a `nbytes` float32 array
    (bigger than any cache)."""
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


def torch_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Read bytes/s of torch's (multi-threaded) sum over `nbytes` of float32."""
    import torch
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = min(timeit(lambda: x.sum()) for _ in range(reps))
    return nbytes / best


def numpy_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    x = np.ones((nbytes // 4,), np.float32)
    best = min(timeit(lambda: x.sum()) for _ in range(reps))
    return nbytes / best


def read_bandwidth(nbytes: int = 1 << 30, reps: int = 3) -> dict:
    """Read bandwidth (bytes/s) of a sum over `nbytes` of float32 by jax, torch and numpy, and
    their max (`best`): the memory bandwidth a decode step can at most use."""
    out = dict(jax=jax_bandwidth(nbytes, reps), numpy=numpy_bandwidth(nbytes, reps))
    try:
        out["torch"] = torch_bandwidth(nbytes, reps)
    except ImportError:
        pass
    out["best"] = max(out.values())
    return out


# ---- profiles -------------------------------------------------------------------------------
def profile_ops(run, sync, steps: int = 1, logdir=None):
    """Run `run()` `steps` times under jax.profiler and sum the trace's op durations by name.

    Returns (Counter name -> exclusive microseconds per step, Counter name -> calls per step,
    trace path). XLA:CPU emits one event per executed thunk (fusions, dots, copies, loops); a
    loop's event contains its body's, so each event counts its own time minus its children's
    (summed over threads: the total can exceed the wall time when ops run in parallel)."""
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
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") != "X" or "dur" not in e or skip.match(e.get("name", "")):
            continue
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []  # [end, name, exclusive time]

        def close(until):
            while stack and stack[-1][0] <= until:
                _, name, own = stack.pop()
                tot[name] += own / steps

        for e in evs:
            close(e["ts"])
            if stack:
                stack[-1][2] -= e["dur"]
            stack.append([e["ts"] + e["dur"], e["name"], e["dur"]])
            cnt[e["name"]] += 1
        close(float("inf"))
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
