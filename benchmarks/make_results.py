"""Write benchmarks/RESULTS.md from the JSON files of a `run_all.py` run.

    python benchmarks/make_results.py benchmarks/results [--md benchmarks/RESULTS.md]

Every figure comes from the JSON (machine, versions, command, date and load average included);
the fixed text at the end (NOTES) records what was measured while tuning and why.
"""
from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))

TARGETS = dict(train_ratio=1.0, train_mfu=0.40, sampler_ratio=3.0)

NOTES = """\
## What the easyrl side does, and what each piece was worth

Measured while tuning (2-core machine shared with other jobs; each change against the code
without it in the same process, interleaved, median of 3-7 repetitions, wall and process CPU time
agreeing within a few %); bench_100m, seq 512, float32.

| change | where | measured |
|---|---|---|
| SFT loss: LM head fused with the cross-entropy, 512 tokens per chunk, gradient formed in the forward pass (`losses.lm_head_loss_sums`); no [B, T, V] logits | `losses.py`, `algorithms/sft.py` | step 0.70x the time at L=2, B=4 (0.78x at B=1); chunks of 64-128 tokens were slower than 512 |
| `token_logprobs` / `token_entropy` without the sliced [B, T-1, V] copies (DPO, PPO, RRHF, eval) | `losses.py` | fwd+bwd of a [4, 512, 32000] log-prob sum 0.65x (0.78x with a temperature) |
| attention operands in the dots' canonical layouts ([B, K, G, T, Dh] x [B, K, Dh, S]) | `model/llama.py` | train step 0.96x at L=12, B=1 |
| causal block skipping in training attention (query blocks of 256 see keys [0, end of block)) | `model/llama.py` | train step 0.95x on top of the layouts (blocks of 128: 0.98x) |
| remat `dots` (what the 7B/13B presets use) instead of `none` | config | train step 0.75x at L=12, B=4 (`full` 0.80x, `minimal` 0.81x): with `none` the backward reads per-layer residuals out of the scan's stacked arrays in badly fused, transposed elementwise ops |
| sampler KV cache stored as k [B, K, Dh, S], v [B, K, S, Dh] (no transposed copy of the cache per step) | `model/llama.py`, `generate.py` | decode step 0.55-0.65x |
| sampler decode loop with the layers unrolled over per-layer weights and caches (each step updates one cache slot in place; weights sliced out of the stacked arrays once, not per step) | `generate.py`, `model/llama.py` | with the cache layouts: decode step 123 ms vs 424 ms before (3.4x) at batch 16; slicing the weights per step instead: 1.4x slower |

Tried and dropped (no gain beyond noise, or slower): XLA flags `--xla_cpu_use_onednn=true`,
`--xla_cpu_use_xnnpack=false`, `--xla_cpu_experimental_ynn_fusion_type=-dot`,
`--xla_cpu_experimental_enable_tiling_propagation=true`, `--xla_cpu_use_fusion_emitters=false`,
`--xla_cpu_enable_fast_math=true`; unrolling the layer scan in training (all 12 layers: 1.16x
slower; by 2: 0.95x, within noise); a custom-VJP SwiGLU (0.98x); the fused head's kernel
pre-transposed for the backward dots (no change).

### Training step: where the time goes, and what would close the gap

On an idle machine torch's step is about 1.8x faster than easyrl's (table above; an earlier
idle run: 13.9 s vs 7.8 s). On a loaded machine (load 5-6, a run while other jobs ran) the two
came out even (27.9 s each): torch's OpenMP threads suffer more from sharing the cores than
XLA's pool, so only idle-machine figures count. The gap is XLA:CPU's code around the
matmuls, not the matmuls themselves: alone, XLA's dots of the model's shapes ([2048, 768] x
[768, 2048] and their transposes for the backward) run at 250-290 GFLOP/s (torch/oneDNN
310-320), but inside the step they average ~130 GFLOP/s, and another ~22% of the step is
transposes/copies XLA inserts so that its dot kernels get canonical operands (the largest: the
SwiGLU backward writing [T, F] gradients transposed for the weight-gradient dots, ~13%), plus ~6%
slicing per-layer weights and residuals out of the scan's stacked arrays. torch's GEMMs take
transposed operands directly. What would close it: kernels stored [out, in] so that the
weight-gradient dots need no transposed activations (a change to the parameter layout and the
HF name table); an XLA:CPU whose dot thunks accept transposed operands; bf16 (this CPU has
AMX-BF16: torch's bf16 matmul runs several times its fp32 one; XLA's bf16-output dots are 4-6x
slower than the same dot accumulating in float32, so `_dense` would first need
`preferred_element_type=float32`).

### Sampler: where the time goes, and what would close the gap

Per decode step (batch 16) easyrl reads 438 MB of weights and 302 MB of KV cache. Its profile:
MLP projections ~43%, attention projections ~20%, LM head ~12%, the rest (attention over
the cache, its in-place update, sampling) ~25%.
The M = 16 matrix-vector products stream weights at 9-11 GB/s on this machine, torch's at
9-10 GB/s too (a plain sum reads 15-22 GB/s), so both implementations sit at 2-3x the
bandwidth floor and transformers' `generate` is already within ~1.1x of easyrl: a 3x ratio is
out of reach in float32 on this CPU. What would close it: fewer bytes per step -- bf16 or int8
weights and KV cache (with float32-accumulating dots; see above), attention over only the
filled blocks of the cache (on average a quarter of the KV bytes here) -- and larger decode
batches per weight read.
"""


def _load(folder, name):
    p = os.path.join(folder, f"{name}.json")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def _g(x, unit=1.0, fmt="%.1f"):
    return "n/a" if x is None else fmt % (x / unit)


def _ok(value, target, more_is_better=True):
    if value is None:
        return "not measured"
    met = value >= target if more_is_better else value <= target
    return "**met**" if met else "**missed**"


def _table(rows, headers):
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def machine_section(docs, run_all):
    first = next(d for d in docs.values() if d)
    m = first["machine"]
    rows = [["CPU (/proc/cpuinfo)", m.get("host_cpu")], ["ISA extensions", m.get("cpu_flags", "")],
            ["cores used (threads)", m.get("cores")], ["memory", f"{m.get('memory_gib')} GiB"],
            ["python", m.get("python")], ["jax / jaxlib", f"{m.get('jax')} / {m.get('jaxlib')}"],
            ["flax / optax", f"{m.get('flax')} / {m.get('optax')}"],
            ["torch / transformers", f"{m.get('torch')} / {m.get('transformers')}"],
            ["XLA_FLAGS", f"`{m.get('xla_flags') or '(none)'}`"],
            ["easyrl commit", m.get("easyrl_commit")], ["date (UTC)", m.get("date")]]
    text = "## Machine\n\n" + _table(rows, ["", ""]) + "\n\n"
    load_rows = []
    for name, d in docs.items():
        if d:
            mm = d["machine"]
            load_rows.append([name, mm.get("date"), mm.get("loadavg_start"), mm.get("loadavg_end"),
                              f"`{mm.get('argv')}`"])
    text += ("Load average (1, 5, 15 min) before and after each benchmark, and its command (each "
             f"benchmark itself keeps the {m.get('cores')} cores busy, so ~{m.get('cores')} after it "
             "means nothing else ran):\n\n")
    text += _table(load_rows, ["benchmark", "date", "load start", "load end", "command"]) + "\n"
    # a benchmark keeps all cores busy itself, so the 1-min load after it is ~cores when nothing
    # else runs; more than that (or a loaded machine before the run) means other work competed
    cores = m.get("cores") or 1
    busy = [r[0] for r in load_rows if r[3] and r[3][0] > cores + 0.75]
    if run_all and run_all.get("loadavg_start") and run_all["loadavg_start"][0] > 0.5 * cores:
        busy = ["all (loaded before the run started)"]
    if busy:
        text += (f"\n> **The machine was busy** during {', '.join(busy)} (1-min load above the "
                 f"{cores} cores the benchmark itself keeps busy, or above {0.5 * cores:g} before "
                 "the run): those figures are provisional; re-run on an idle machine.\n")
    if run_all:
        text += (f"\nOne command ran everything in {run_all['seconds'] / 60:.1f} min: "
                 f"`{run_all['command']}`\n")
        for cmd in run_all.get("reruns", []):
            text += f"; re-run afterwards: `{cmd}`\n"
    return text


def train_section(d, prof, title="## 1. Training step (SFT)"):
    if not d:
        return f"{title}\n\nnot measured\n"
    r, a = d["results"], d["args"]
    rows = []
    for name, x in r.items():
        rows.append([name, _g(x["step_s"], 1, "%.2f"), _g(x.get("step_s_best"), 1, "%.2f"),
                     _g(x["tokens_per_s"], 1, "%.0f"), _g(x["flops_per_s"], 1e9),
                     f"{100 * x['mfu']:.1f}%"])
    ratio = d.get("ratio_easyrl_over_torch")
    mfu = r.get("easyrl", {}).get("mfu")
    sizes = ", ".join(f"n={k}: {v / 1e9:.0f}" for k, v in (d.get("matmul_flops_by_size") or {}).items())
    text = f"""{title}

`{d['machine']['argv']}`

{d['config']['preset']}, batch {a['batch']} x seq {a['seq']} ({d['tokens_per_step']} tokens/step),
{d['config']['dtype']}, easyrl remat `{d['config']['remat']}`, {d['threads']} threads on both sides,
AdamW + global-norm clipping on both sides, {a['reps']} interleaved repetitions of {a['steps']}
step(s) (median; best in its own column); torch in {"this process" if d.get("torch_process") == "same" else "a worker process of its own"}.

{_table(rows, ["impl", "step s (median)", "step s (best)", "tokens/s", "GFLOP/s", "MFU"])}

- easyrl / transformers+torch tokens/s: **{_g(ratio, 1, "%.2f")}x** (median; \
{_g(d.get("ratio_easyrl_over_torch_best"), 1, "%.2f")}x from the best repetitions) -- target >= \
{TARGETS['train_ratio']:.1f}x: {_ok(ratio, TARGETS['train_ratio'])}
- MFU (easyrl): **{_g(None if mfu is None else 100 * mfu, 1, "%.1f")}%** of the matmul ceiling -- \
target >= {100 * TARGETS['train_mfu']:.0f}%: {_ok(mfu, TARGETS['train_mfu'])}
- FLOPs per token = 6 N + 12 L D T = {d['flops_per_token'] / 1e6:.1f} MFLOP (N = \
{d['n_matmul_params'] / 1e6:.1f}M matmul parameters incl. the LM head; no remat recomputation or \
causal skipping counted)
- matmul ceiling (best jitted [n, n] @ [n, n], GFLOP/s): {d['matmul_ceiling_flops'] / 1e9:.0f} \
({sizes}); torch's: {_g(d.get('torch_matmul_ceiling_flops'), 1e9, "%.0f")}
- easyrl compile time: {_g(r.get('easyrl', {}).get('compile_s'), 1, "%.0f")} s
"""
    if prof:
        pa = prof["args"]
        cats = prof["categories"]
        crow = [[k, f"{v['ms']:.0f}", f"{100 * v['share']:.1f}%"] for k, v in cats.items()]
        top = [[t["op"], t["calls"], f"{t['ms']:.0f}", f"{100 * t['share']:.1f}%", t["category"],
                f"`{t['shape']}`", t["source"][-70:]] for t in prof["top_ops"][:12]]
        text += f"""
### Where the time goes (profile)

`{prof['machine']['argv']}` ({pa['layers'] or 'all'} layers, batch {pa['batch']}, seq {pa['seq']},
remat `{pa['remat']}`; one step {prof['step_wall_s']:.2f} s wall; exclusive op times from the
profiler trace):

{_table(crow, ["category", "ms/step (all threads)", "share"])}

Top ops:

{_table(top, ["op", "calls", "ms", "share", "category", "shape", "source"])}
"""
    return text


def sampler_section(d, title="## 2. Sampler (decode)"):
    if not d:
        return f"{title}\n\nnot measured\n"
    r, a = d["results"], d["args"]
    rows = []
    for name, x in r.items():
        rows.append([name, f"{x['total_s']:.2f}", f"{x['prefill_s']:.2f}",
                     f"{x['tokens_per_s']:.0f}", f"{x['decode_tokens_per_s']:.0f}",
                     f"{x['decode_step_ms']:.1f}", f"{1e3 * x['bandwidth_floor_s']:.1f}",
                     f"{100 * x['bandwidth_floor_fraction']:.0f}%"])
    ratio = d.get("decode_ratio_easyrl_over_transformers")
    e = r["easyrl"]
    return f"""{title}

`{d['machine']['argv']}`

{a['preset']}, batch {a['batch']}, prompt {a['prompt']}, {a['new']} new tokens, greedy (EOS off),
{a['dtype']}, the same weights on both sides (saved by transformers, loaded by `easyrl.hf.load`),
{a['reps']} interleaved repetitions (median). Decode = (full run - 1-token run) / (new - 1).
Greedy tokens equal to transformers: {_g(None if d.get('greedy_token_agreement') is None else 100 * d['greedy_token_agreement'], 1, "%.1f")}%.

{_table(rows, ["impl", "total s", "prefill s", "tokens/s (end to end)", "decode tokens/s", "ms / decode step", "bandwidth floor ms", "floor / step"])}

- easyrl / transformers `generate` decode tokens/s: **{_g(ratio, 1, "%.2f")}x** \
({_g(d.get('decode_ratio_easyrl_over_transformers_best'), 1, "%.2f")}x from the best repetitions; \
{_g(d.get('ratio_easyrl_over_transformers'), 1, "%.2f")}x end to end with the prefill) -- target >= \
{TARGETS['sampler_ratio']:.0f}x: {_ok(ratio, TARGETS['sampler_ratio'])}
- bandwidth floor: {e['bytes_per_step'] / 1e6:.0f} MB read per decode step (weights \
{e['weight_bytes'] / 1e6:.0f} MB + KV cache {e['kv_bytes'] / 1e6:.0f} MB: easyrl reads all \
P + N cache slots every step) / {d['bandwidth_read'] / 1e9:.1f} GB/s measured read bandwidth \
(best of a 1 GiB sum by jax, torch, numpy) = **{1e3 * e['bandwidth_floor_s']:.1f} ms per step**; \
easyrl's decode step is at {100 * e['bandwidth_floor_fraction']:.0f}% of that floor; compute floor \
{1e3 * e['compute_floor_s']:.1f} ms
"""


def ppo_section(docs):
    text = "## 3. PPO iteration (rollout / scoring / update)\n\n"
    found = False
    for name, d in docs.items():
        if not d:
            continue
        found = True
        a, r = d["args"], d["results"]
        rows = [[k, f"{v['s']:.3f}", f"{100 * v['share']:.0f}%", f"{v['first_iteration_s']:.1f}"]
                for k, v in r.items()]
        rows.append(["total", f"{d['total_s']:.3f}", "100%", f"{d['first_iteration_s']:.1f}"])
        text += f"""### {a['preset']}

`{d['machine']['argv']}`

{d['params_per_model'] / 1e6:.1f}M parameters x 4 models (policy, reference, value, reward),
batch {a['batch']}, prompt {a['prompt']}, {a['new']} new tokens (temperature 0.7, EOS off),
{a['epochs']} epoch x {a['minibatches']} minibatches, {a['dtype']}, median of
{d['steady_iterations']} iterations after the first (which compiles).

{_table(rows, ["phase", "s (median)", "share", "first iteration s (compiles)"])}

Response tokens per second over the whole iteration: {d['response_tokens_per_s']:.0f}.

"""
    return text if found else text + "not measured\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default=os.path.join(HERE, "results"))
    ap.add_argument("--md", default=os.path.join(HERE, "RESULTS.md"))
    a = ap.parse_args(argv)
    docs = {n: _load(a.folder, n) for n in ("train_step", "profile_step", "sampler",
                                            "train_step_bf16", "sampler_bf16", "ppo_tiny",
                                            "ppo_bench_100m")}
    if not any(docs.values()):
        raise SystemExit(f"no benchmark JSON in {a.folder} (run benchmarks/run_all.py first)")
    run_all = _load(a.folder, "run_all")
    parts = [
        "# Benchmark results (issue 7)\n\n"
        "Written by `benchmarks/make_results.py` from the JSON in "
        f"`{os.path.relpath(os.path.abspath(a.folder), os.path.dirname(HERE))}/`; re-run everything "
        "with `python benchmarks/run_all.py --out benchmarks/results` (12-20 minutes on 2 cores). "
        "easyrl and transformers + PyTorch run interleaved, same shapes, batch, dtype and thread "
        "count (the training step's torch side in a worker process of its own, the sampler's in "
        "the same process); timings are medians. Each benchmark runs in float32 and in bfloat16 "
        "(both sides in the same dtype); the issue's targets are judged on both.\n",
        machine_section(docs, run_all),
        train_section(docs["train_step"], docs["profile_step"],
                      "## 1. Training step (SFT), float32"),
        train_section(docs["train_step_bf16"], None,
                      "## 1b. Training step (SFT), bfloat16 compute (float32 parameters)"),
        sampler_section(docs["sampler"], "## 2. Sampler (decode), float32"),
        sampler_section(docs["sampler_bf16"], "## 2b. Sampler (decode), bfloat16"),
        ppo_section({k: docs[k] for k in ("ppo_tiny", "ppo_bench_100m")}),
        "## 4. GPU\n\nNot measured: no GPU was lent to the session that produced these figures. "
        "The same scripts run on a GPU unchanged (`pip install -e \".[cuda]\"` and a CUDA torch; "
        "the torch side moves to `cuda` when jax's backend is `gpu`; use `--dtype bfloat16`).\n",
        NOTES,
    ]
    with open(a.md, "w") as f:
        f.write("\n".join(parts))
    print(f"wrote {a.md}")


if __name__ == "__main__":
    main()
