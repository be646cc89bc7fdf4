"""Run every CPU benchmark of issues 7 and 17 at their sizes, then write benchmarks/RESULTS.md.

    python benchmarks/run_all.py --out benchmarks/results            # the full run (22-32 min, 2 cores)
    python benchmarks/run_all.py --out /tmp/bench --quick --no-md    # smoke test (tiny sizes)
    python benchmarks/make_results.py benchmarks/results             # RESULTS.md from saved JSON

Each benchmark runs in its own process (its own XLA and torch thread pools), one after the
other, and writes one JSON file into --out; the load average is recorded before and after each.
Timings are only meaningful on an otherwise idle machine: the scripts interleave easyrl and the
reference, so a busy machine slows both, but the medians still move.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common as C  # noqa: E402

# (name, script, arguments): the sizes
FULL = [
    ("train_step", "train_step.py",
     "--preset bench_100m --seq 512 --batch 4 --steps 1 --reps 3 --remat dots"),
    ("profile_step", "profile_step.py",
     "--preset bench_100m --seq 512 --batch 4 --layers 4 --steps 1 --remat dots --top 20"),
    ("sampler", "sampler.py", "--preset bench_100m --batch 16 --prompt 128 --new 128 --reps 3"),
    ("train_step_bf16", "train_step.py",
     "--preset bench_100m --seq 512 --batch 4 --steps 1 --reps 3 --remat dots --dtype bfloat16"),
    ("sampler_bf16", "sampler.py",
     "--preset bench_100m --batch 16 --prompt 128 --new 128 --reps 3 --dtype bfloat16"),
    ("ppo_tiny", "ppo_iteration.py", "--preset tiny --batch 16 --prompt 32 --new 32 --iters 6"),
    ("ppo_bench_100m", "ppo_iteration.py",
     "--preset bench_100m --batch 8 --prompt 64 --new 64 --iters 3"),
    ("grpo_tiny", "grpo_iteration.py",
     "--preset tiny --batch 8 --group 8 --prompt 32 --new 32 --iters 5"),
    ("grpo_bench_100m", "grpo_iteration.py",
     "--preset bench_100m --batch 2 --group 8 --prompt 64 --new 64 --iters 3"),
    # issue 17: the continuous-batching rollout engine, and the PPO / GRPO splits through it
    ("engine", "engine.py",
     "--preset bench_100m --prompts 2 --group 8 --prompt 128 --new 256 --slots 8 --reps 1"),
    ("ppo_tiny_engine", "ppo_iteration.py",
     "--preset tiny --batch 16 --prompt 32 --new 32 --iters 6 --engine continuous"),
    ("ppo_bench_100m_engine", "ppo_iteration.py",
     "--preset bench_100m --batch 8 --prompt 64 --new 64 --iters 3 --engine continuous"),
    ("grpo_tiny_engine", "grpo_iteration.py",
     "--preset tiny --batch 8 --group 8 --prompt 32 --new 32 --iters 5 --engine continuous"),
    ("grpo_bench_100m_engine", "grpo_iteration.py",
     "--preset bench_100m --batch 2 --group 8 --prompt 64 --new 64 --iters 3 --engine continuous"),
]
QUICK = [
    ("train_step", "train_step.py",
     "--preset tiny --seq 64 --batch 2 --steps 1 --reps 2 --ceiling-n 256 512"),
    ("profile_step", "profile_step.py", "--preset tiny --seq 64 --batch 2 --steps 1 --top 5"),
    ("sampler", "sampler.py", "--preset tiny --batch 4 --prompt 16 --new 16 --reps 2"),
    ("ppo_tiny", "ppo_iteration.py", "--preset tiny --batch 4 --prompt 8 --new 8 --iters 2"),
    ("grpo_tiny", "grpo_iteration.py",
     "--preset tiny --batch 2 --group 4 --prompt 8 --new 8 --iters 2"),
    ("engine", "engine.py",  # tiny's vocabulary is 256 ids: 3 EOS ids ~1% per token
     "--preset tiny --prompts 2 --group 4 --prompt 16 --new 32 --slots 4 --eos-tokens 3 "
     "--limit-median 16 --reps 1"),
    ("ppo_tiny_engine", "ppo_iteration.py",
     "--preset tiny --batch 4 --prompt 8 --new 8 --iters 2 --engine continuous"),
    ("grpo_tiny_engine", "grpo_iteration.py",
     "--preset tiny --batch 2 --group 4 --prompt 8 --new 8 --iters 2 --engine continuous"),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the JSON files")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of the scripts)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these benchmark names")
    ap.add_argument("--md", default=os.path.join(HERE, "RESULTS.md"),
                    help="write the markdown report here after the run")
    ap.add_argument("--no-md", action="store_true", help="do not write the markdown report")
    a = ap.parse_args(argv)

    plan = QUICK if a.quick else FULL
    if a.only:
        unknown = set(a.only) - {n for n, _, _ in plan}
        if unknown:
            ap.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {[n for n, _, _ in plan]}")
        plan = [p for p in plan if p[0] in a.only]
    os.makedirs(a.out, exist_ok=True)
    summary = dict(command=" ".join(["python", os.path.relpath(__file__, C.ROOT)] + sys.argv[1:]),
                   quick=a.quick, loadavg_start=C.loadavg(), runs=[])
    t_all = time.perf_counter()
    for name, script, args in plan:
        out = os.path.join(a.out, f"{name}.json")
        cmd = [sys.executable, os.path.join(HERE, script)] + args.split() + ["--out", out]
        shown = " ".join(["python", f"benchmarks/{script}"] + args.split())
        print(f"\n=== {name}: {shown}  (load {C.loadavg()})", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        dt = time.perf_counter() - t0
        summary["runs"].append(dict(name=name, command=shown, returncode=rc, seconds=dt,
                                    json=os.path.basename(out)))
        print(f"=== {name}: exit {rc} after {dt:.0f}s", flush=True)
    summary.update(seconds=time.perf_counter() - t_all, loadavg_end=C.loadavg())
    path = os.path.join(a.out, "run_all.json")
    if a.only and os.path.exists(path):  # a partial re-run: keep the other benchmarks' records
        with open(path) as f:
            old = json.load(f)
        rerun = {r["name"] for r in summary["runs"]}
        summary["runs"] = [r for r in old.get("runs", []) if r["name"] not in rerun] + summary["runs"]
        summary["reruns"] = old.get("reruns", []) + [summary["command"]]
        summary["command"], summary["seconds"] = old["command"], old["seconds"]
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\nall benchmarks: {summary['seconds'] / 60:.1f} min; load {summary['loadavg_start']} -> "
          f"{summary['loadavg_end']}")
    if not a.no_md:
        import make_results
        make_results.main([a.out, "--md", a.md])
    return 0 if all(r["returncode"] == 0 for r in summary["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
