"""Where the time of easyrl's jitted SFT train step goes: a jax.profiler trace, summed per XLA op.

    python benchmarks/profile_step.py --preset bench_100m --seq 512 --batch 4 --layers 4 --top 25 \
        --out benchmarks/results/profile_step.json

Builds the step exactly as `train_step.py` does, runs a few steps under
`jax.profiler.trace(create_perfetto_trace=True)`, reads the perfetto JSON and sums each XLA op's
exclusive time (a loop's own time excludes its body's ops). Ops are grouped by what the compiled
HLO says they are:
  matmul          dots (XLA:CPU runs them as `ynn_fusion` / `dot` thunks)
  transpose/copy  fusions that contain a transpose or copy (layout changes feeding the dots)
  scan slicing    dynamic-(update-)slice fusions: per-layer slices of the stacked scan arrays
  elementwise     the other fusions (norms, rotary, softmax, SiLU, the optimizer update)
  other           loops, thread-pool waits, ...
`--layers` shrinks the layer count so the profile is quick; per-layer shares hardly change.
Times are summed over threads (they can exceed the wall time); shares are the useful output.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import numpy as np  # noqa: E402

CATEGORIES = ("matmul", "transpose/copy", "scan slicing", "elementwise", "other")


def hlo_index(hlo: str):
    """name -> (result shape, op kind, op_name metadata, fused computation body or '')."""
    comps = {}
    for m in re.finditer(r"^(?:%)?([\w.\-]+) [^\n]*\{\n(.*?)^\}", hlo, re.S | re.M):
        comps[m.group(1)] = m.group(2)
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$", hlo, re.M):
        name, shape, kind, rest = m.groups()
        meta = re.search(r'op_name="([^"]+)"', rest)
        calls = re.search(r"calls=%?([\w.\-]+)", rest)
        out[name] = (shape, kind, meta.group(1) if meta else "",
                     comps.get(calls.group(1), "") if calls else "")
    return out


def category(name: str, index) -> str:
    shape, kind, meta, body = index.get(name, ("", "", "", ""))
    if name.startswith(("ynn_fusion", "dot", "xnn_fusion", "onednn")) or kind in ("dot", "custom-call"):
        return "matmul"
    if re.search(r"= \S+ (transpose|copy)\(", body) or kind in ("transpose", "copy") \
            or name.startswith(("copy", "transpose")):
        return "transpose/copy"
    if re.search(r"= \S+ dynamic-(update-)?slice\(", body) or kind.startswith("dynamic"):
        return "scan slicing"
    if kind == "fusion" or "fusion" in name or kind in ("add", "multiply", "select", "reduce",
                                                         "broadcast"):
        return "elementwise"
    return "other"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench_100m")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--layers", type=int, default=0, help="override num_hidden_layers (0: keep)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--remat", default="dots")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--logdir", default=None)
    ap.add_argument("--out", default=None, help="write the profile summary as JSON here")
    a = ap.parse_args(argv)

    from easyrl.model import get_preset
    import train_step as TS
    over = dict(dtype=a.dtype, remat=a.remat)
    if a.layers:
        over["num_hidden_layers"] = a.layers
    cfg = get_preset(a.preset, **over)
    info = C.machine_info()
    rs = np.random.RandomState(0)
    ids = rs.randint(3, cfg.vocab_size, size=(a.batch, a.seq)).astype(np.int32)
    batch = dict(input_ids=ids, attention_mask=np.ones_like(ids), loss_mask=np.ones_like(ids))
    run, sync, step, args = TS.easyrl_setup(cfg, batch, a.steps, with_args=True)
    index = hlo_index(step.lower(*args()).compile().as_text())
    sync(run())
    wall = C.timeit(run, sync)
    tot, cnt, path = C.profile_ops(run, sync, a.steps, a.logdir)
    total = sum(tot.values()) or 1
    cats = collections.Counter()
    for name, d in tot.items():
        cats[category(name, index)] += d
    print(f"{C.banner(info)}\n# {a.preset} L={cfg.num_hidden_layers} B={a.batch} T={a.seq} {a.dtype} "
          f"remat={cfg.remat} | step {wall:.2f}s wall | trace {path}")
    print(C.table([[k, f"{cats[k] / 1e3:.0f}", f"{100 * cats[k] / total:.1f}%"] for k in CATEGORIES],
                  ["category", "ms/step (all threads)", "share"]))
    print()
    top = []
    for n, d in tot.most_common(a.top):
        shape, kind, meta, _ = index.get(n, ("", "", "", ""))
        meta = re.sub(r"^jit\([^)]*\)/", "", meta)
        top.append(dict(op=n, calls=cnt[n], ms=d / 1e3, share=d / total,
                        category=category(n, index), shape=shape, source=meta))
    print(C.table([[t["op"][:34], t["calls"], f"{t['ms']:.1f}", f"{100 * t['share']:.1f}%",
                    t["category"], t["shape"][:28], t["source"][-60:]] for t in top],
                  ["op", "calls/step", "ms/step", "share", "category", "shape", "source"]))
    C.write_json(a.out, dict(benchmark="profile_step", machine=info, args=vars(a),
                             step_wall_s=wall, total_ms_all_threads=total / 1e3,
                             categories={k: dict(ms=cats[k] / 1e3, share=cats[k] / total)
                                         for k in CATEGORIES},
                             top_ops=top, trace=path))


if __name__ == "__main__":
    main()
