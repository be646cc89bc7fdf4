"""Where the time of easyrl's jitted SFT train step goes: a jax.profiler trace, summed per XLA op.

    python benchmarks/profile_step.py --preset bench_100m --seq 512 --batch 4 --layers 2 --top 25

Runs a few steps under `jax.profiler.trace(create_perfetto_trace=True)`, reads the perfetto JSON
and prints the XLA ops (thunks) with the most total time, grouped into categories (matmul /
convolution, fusions, copies and layout, collectives, other). `--layers` shrinks the layer count
so the profile is quick; per-layer shares are unchanged. Shares, not absolute times, are the
useful output on a shared machine.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402


def category(name: str) -> str:
    n = name.lower()
    if "dot" in n or "matmul" in n or "gemm" in n or "conv" in n or "custom-call" in n:
        return "matmul"
    if "copy" in n or "transpose" in n or "dynamic-update-slice" in n or "dynamic-slice" in n:
        return "copy/layout"
    if "fusion" in n or "reduce" in n:
        return "fusion/elementwise"
    if "while" in n or "call" in n or "conditional" in n:
        return "control"
    return "other"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench_100m")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--layers", type=int, default=0, help="override num_hidden_layers (0: keep)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--remat", default=None)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--logdir", default=None)
    a = ap.parse_args(argv)

    from easyrl.model import get_preset
    import train_step as TS
    over = dict(dtype=a.dtype)
    if a.layers:
        over["num_hidden_layers"] = a.layers
    if a.remat:
        over["remat"] = a.remat
    cfg = get_preset(a.preset, **over)
    rs = np.random.RandomState(0)
    ids = rs.randint(3, cfg.vocab_size, size=(a.batch, a.seq)).astype(np.int32)
    batch = dict(input_ids=ids, attention_mask=np.ones_like(ids), loss_mask=np.ones_like(ids))
    run, sync, _ = TS.easyrl_setup(cfg, batch, a.steps)
    sync(run())
    logdir = a.logdir or tempfile.mkdtemp(prefix="easyrl_prof_")
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        for _ in range(a.steps):
            sync(run())
    path = sorted(glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    tot = collections.Counter()
    cnt = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        name = e.get("name", "")
        if re.match(r"^(PjitFunction|jit_|Thunk|ThunkExecutor|TfrtCpu|XlaModule|Execute)", name) \
                or name.startswith("$"):
            continue
        tot[name] += e["dur"]
        cnt[name] += 1
    total = sum(tot.values()) or 1
    cats = collections.Counter()
    for name, d in tot.items():
        cats[category(name)] += d
    print(f"# {C.cpu_model()} x{C.num_threads()} | load {C.loadavg()} | {a.preset} L={cfg.num_hidden_layers} "
          f"B={a.batch} T={a.seq} {a.dtype} remat={cfg.remat} | trace {path}")
    print(C.table([[k, f"{v / 1e3 / a.steps:.0f}", f"{100 * v / total:.1f}%"] for k, v in cats.most_common()],
                  ["category", "ms/step", "share"]))
    print()
    rows = [[n[:70], cnt[n] // a.steps, f"{d / 1e3 / a.steps:.1f}", f"{100 * d / total:.1f}%", category(n)]
            for n, d in tot.most_common(a.top)]
    print(C.table(rows, ["op", "calls/step", "ms/step", "share", "category"]))


if __name__ == "__main__":
    main()
