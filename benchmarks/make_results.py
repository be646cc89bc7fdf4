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

Measured while tuning, each change against the code without it (same machine, idle unless
said, medians of 2-7 repetitions); bench_100m, batch 4 x seq 512 for the training step, batch 16,
prompt 128, 128 new tokens for the sampler.

| change | where | measured |
|---|---|---|
| SFT loss: LM head fused with the cross-entropy, 512 tokens per chunk, gradient formed in the forward pass (`losses.lm_head_loss_sums`); no [B, T, V] logits | `losses.py`, `algorithms/sft.py` | step 0.70x the time at L=2, B=4 (0.78x at B=1); chunks of 64-128 tokens were slower than 512 |
| `token_logprobs` / `token_entropy` without the sliced [B, T-1, V] copies (DPO, PPO, RRHF, eval) | `losses.py` | fwd+bwd of a [4, 512, 32000] log-prob sum 0.65x (0.78x with a temperature) |
| attention operands in the dots' canonical layouts ([B, K, G, T, Dh] x [B, K, Dh, S]) | `model/llama.py` | train step 0.96x at L=12, B=1 |
| causal block skipping in training attention (query blocks of 256 see keys [0, end of block)) | `model/llama.py` | train step 0.95x on top of the layouts (blocks of 128: 0.98x) |
| remat `dots` (what the 7B/13B presets use) instead of `none` | config | train step 0.75x at L=12, B=4 (`full` 0.80x, `minimal` 0.81x) |
| dense layers through `dense_matmul` (custom VJP): in bf16 every dot (forward, d x, d W) takes bf16 operands and accumulates in float32 -- XLA:CPU upcasts a bf16 -> bf16 dot to a float32 one (230 GFLOP/s at 2048^3) but runs bf16 -> f32 on its AMX/AVX512-BF16 kernels (950) | `model/llama.py` | bf16 train step 10.2 s -> 5.2-5.7 s |
| on CPU, the weight-gradient dot's operands behind an optimization barrier (XLA had fused the SwiGLU backward into transposed-layout loops feeding the dot) | `model/llama.py` | fp32 train step 10.6 s -> 9.3 s |
| remat dot policies also save the dense outputs (`checkpoint_name`; the custom VJP hid its dots from `checkpoint_dots`, so gate/up/q/k/v were recomputed) | `model/llama.py` | fp32 step 10.0 s -> 9.3 s (bf16: recomputing is faster, 5.2 vs 5.7 s, but `dots` keeps its meaning) |
| sampler KV cache stored as k [B, K, Dh, S], v [B, K, S, Dh] (no transposed copy of the cache per step) | `model/llama.py`, `generate.py` | decode step 0.55-0.65x |
| sampler decode loop with the layers unrolled over per-layer weights and caches (each step updates one cache slot in place; weights sliced out of the stacked arrays once) | `generate.py`, `model/llama.py` | decode step 123 ms vs 424 ms before (3.4x); slicing the weights per step instead: 1.4x slower |
| bf16 attention backward with bf16 dots accumulating in float32 (`_attend_lowp`, custom VJP, softmax recomputed): autodiff of the float32-accumulating attention dots had run all four backward dots in float32 | `model/llama.py` | bf16 train step 5.68 s -> 5.16-5.31 s |
| bf16 KV cache held as uint16 bits on CPU (`cache_storage_dtype`): XLA:CPU normalizes bf16 ops to f32, and the per-step write into a bf16 cache became "convert every layer's cache to f32, write one slot, convert back" | `model/llama.py`, `generate.py` | bf16 decode step 110 ms -> 66 ms |
| attention's probs x V dot and the sampler's LM head accumulate in float32 (`lm_head_apply`) | `model/llama.py`, `generate.py` | bf16 decode step 118 -> 110 ms and 66 -> 58 ms; fp32 86.6 -> 82.5 ms |

Benchmark method: the torch training step runs in a worker process of its own, and each timed
repetition follows one untimed step on the same side. easyrl's step right after a torch step
took 12.0 s against 9.3-9.5 s back to back -- in the same process and in a separate one alike,
so a machine effect (memory handed back to the VM's host and faulted in again is the likely
cause; `MALLOC_*` settings did not change it) -- and a training process runs its steps back to
back, so each side is timed warm.

Tried and dropped (no gain beyond noise, or slower): XLA flags `--xla_cpu_use_onednn=true`,
`--xla_cpu_use_xnnpack=false`, `--xla_cpu_experimental_ynn_fusion_type=-dot`,
`--xla_cpu_experimental_enable_tiling_propagation=true`, `--xla_cpu_use_fusion_emitters=false`,
`--xla_cpu_enable_fast_math=true`; unrolling the layer scan in training (all 12 layers: 1.16x
slower; by 2: 0.95x, within noise); a custom-VJP SwiGLU (0.98x); the fused head's kernel
pre-transposed for the backward dots (no change); an optimization barrier on the fused head's
softmax gradient (no change); a bf16 cache updated through a uint16 view inside the step (the
loop still carried bf16, so each step converted the whole cache: slower, 128 ms).

### Training step: where the time goes, and what would close the gap

float32: 73% of the step is matmuls (profile above; the LM head and its two backward dots are
~29% of the 4-layer profile, ~12% of the 12-layer step), 11% transposed copies (the largest: the
down projection's input, transposed for its weight gradient), 6% slicing per-layer arrays out of
the scan's stacks, 10% elementwise. The gap to torch is mostly GEMM speed: XLA:CPU's float32
GEMM (YNNPACK) reaches 280-310 GFLOP/s alone at 1024-4096, torch's oneDNN 330-370, and inside
the step easyrl sustains 152-156 GFLOP/s of model FLOPs (50-54% MFU in two runs) against torch's
190-198 (64-68% of the jax ceiling). In the profile the head's backward dots last ~2x their isolated time because the
two run side by side on the two threads (the profile sums per-thread durations). What would close
it: a faster float32 GEMM in XLA:CPU (oneDNN through `--xla_cpu_use_onednn` gave nothing with
this jaxlib), the down projection's transposed input (~3%), and the scan slicing.

bfloat16: easyrl 5.1-5.3 s vs torch 3.7-3.8 s (0.72x): torch's bf16 GEMM (oneDNN, AMX) measures 1.9-2.5
TFLOP/s against XLA's 1.4-1.5, and the step spends more of its time outside the GEMMs than in
float32 (the bf16 dots are 4-5x faster, the elementwise work, converts and scan slicing are not).
What would close it: XLA:CPU's bf16 GEMM speed, fewer converts around the LM head (its kernel is
cast to bf16 every step and its gradient accumulated in float32 over the chunks), and fusing the
RMSNorm/rope/SwiGLU elementwise work into fewer passes.

### Sampler: where the time goes, and what would close the gap

float32: easyrl's decode step (82-86 ms) reads 438 MB of weights and 302 MB of KV cache; both
libraries sit at 25-30% of the bandwidth floor, because the M = 16 matrix-vector products of
decode stream weights at 9-12 GB/s in XLA:CPU (measured alone: [16, 768] x [768, 2048] 10.6
GB/s, the LM head 9.1 GB/s) as in torch, against ~30 GB/s a plain sum reads. A 3x ratio to
`generate` at the same dtype would need ~80% of the floor: out of reach with these kernels.
bf16 halves the bytes: 58-60 ms per step, 1.5x transformers' float32 `generate`, 0.87x its bf16
one (torch's bf16 matvecs are faster). What would close it: a memory-speed small-M matvec in
XLA:CPU; attention over only the filled blocks of the cache (on average a quarter of the KV bytes
here); int8 weights. (The LM head pre-transposed to [V, D] for decode -- that matvec layout
measured 1.3x faster in float32 and 1.8x in bf16 alone -- changed nothing measurable inside the
sampler: 84.7 vs 82.5-86.3 ms in float32, 64.9 vs 58-64 ms in bf16; not kept.)
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
timed step(s) after {a.get('warm', 0)} untimed one(s) on the same side (median; best in its own column); torch in {"this process" if d.get("torch_process") == "same" else "a worker process of its own"}.

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


ENGINE_IMPLS = (
    ("engine", "`Engine(slots)`: each prompt prefilled once and shared by its G samples, slots "
               "refilled as samples finish, attention over the live cache blocks only"),
    ("engine_no_cb", "continuous batching off: one slot per sample from the start (a finished "
                     "slot stays empty until the run ends)"),
    ("engine_no_skip", "block skipping off: the same slots, attention reads every cache block"),
    ("engine_no_share", "shared prefixes off: each of a prompt's G samples is its own request, "
                        "its prompt prefilled again (the same slots)"),
    ("static_sampler", "`make_sampler` on the prompts repeated G times, one static batch with "
                       "max_new_tokens = the largest request limit, cut per request afterwards"),
    ("transformers", "`generate(num_return_sequences=G, do_sample=True, top_k=0)` to the largest "
                     "request limit, cut the same way"),
)


def _preset_vocab(preset):
    try:  # older engine JSON has no vocab_size: the preset's
        from easyrl.model import get_preset
        return get_preset(preset).vocab_size
    except Exception:  # noqa: BLE001 (no easyrl on the path: the percentage is left out)
        return None


def engine_section(d, title="## 2c. Rollout engine (continuous batching)"):
    if not d:
        return f"{title}\n\nnot measured\n"
    a, m, out = d["args"], d["machine"], d["results"]
    wl = next(iter(out.values()))["workload"]
    vocab = wl.get("vocab_size") or _preset_vocab(a["preset"])
    p_eos = wl["eos_tokens"] / vocab if vocab else None
    eos = (f"{wl['eos_tokens']} ids drawn at random from the vocabulary all count as EOS"
           + (f" (~{100 * p_eos:.1f}% per token of V = {vocab} under a random-init model's "
              f"near-uniform next-token distribution: geometric response lengths, mean "
              f"~{1 / p_eos:.0f} tokens, different for every sample)" if p_eos else ""))
    rows = []
    for dtype, x in out.items():
        res = x["results"]
        hf = res.get("transformers", {}).get("tokens_per_s")
        for name, _ in ENGINE_IMPLS:
            if name not in res:
                continue
            r = res[name]
            st = r.get("stats") or {}
            toks = sorted(r["useful_tokens"])[len(r["useful_tokens"]) // 2]
            rows.append([f"`{name}`", dtype, f"{r['wall_s']:.2f}", toks, f"{r['tokens_per_s']:.0f}",
                         ("**%.2fx**" if name == "engine" else "%.2fx") % (r["tokens_per_s"] / hf)
                         if hf else "n/a",
                         st.get("decode_steps", "-"),
                         f"{st['slot_utilization']:.2f}" if "slot_utilization" in st else "-",
                         f"{r['warmup_s']:.1f}"])
    what = "\n".join(f"- `{n}`: {t}" for n, t in ENGINE_IMPLS
                      if any(n in x["results"] for x in out.values()))
    same = []
    for dtype, x in out.items():
        for k, v in (x.get("engine_variants_identical") or {}).items():
            same.append(f"{k} {'identical' if v else '**different**'} ({dtype})")
    text = f"""{title}

`{m['argv']}`

GRPO-shaped workload: {a['prompts']} prompts x G {a['group']} = {wl['samples']} samples,
prompt {a['prompt']} tokens, at most {a['new']} new tokens, temperature 1.0 (no top-k / top-p),
{a['preset']}, the same weights on every side (random init saved by transformers, loaded by
`easyrl.hf.load`), every side in the row's dtype. EOS on: {eos}. Length limits: each request has
its own, drawn from a long-tailed log-normal (median {a['limit_median']:g}, sigma
{a['limit_sigma']:g}) rounded and clipped to [{a['limit_min']}, {a['new']}]: drawn
{wl['limits']} (the static batches run to the largest, {wl['max_limit']}). A sample stops at its
first EOS or at its request's limit; only those "useful" tokens count, and tokens/s = useful
tokens / wall seconds end to end (prefill, decode, outputs on the host). Engine: {a['slots']}
slots, cache blocks of {a['block']} keys, {a['chunk']} decode steps per call. {a['reps']}
repetition(s) after one warm-up (compilation) per implementation, median; {d['threads']}
threads; {m.get('host_cpu')} x{m.get('cores')} (not the machine of sections 1-3), load
{m.get('loadavg_start')} -> {m.get('loadavg_end')}.

{_table(rows, ["impl", "dtype", "wall s", "useful tokens", "tokens/s", "vs transformers generate", "decode steps", "slot use", "warm-up s"])}

{what}

"vs transformers generate": tokens/s over `generate`'s at the same dtype. The engine variants
draw the same samples (keys from (seed, request, sample, token)): {', '.join(same) or 'n/a'}
(engine_no_share submits each sample as its own request: other keys, the same distribution).
The static sampler and `generate` draw from other random streams, so their useful-token counts
differ from the engine's (sampling noise at {wl['samples']} samples); a static batch's wall time
is set by its longest sample whatever the count.
"""
    return text


def _gap(a, b):
    """Seconds between two benchmark runs (their machine.date)."""
    import datetime
    try:
        ta, tb = (datetime.datetime.fromisoformat(d["machine"]["date"]) for d in (a, b))
        return abs((ta - tb).total_seconds())
    except (KeyError, TypeError, ValueError):
        return float("inf")


def engine_rows(static, paired, eng, phases, what):
    """The rows of a PPO / GRPO split with the rollout through the continuous-batching engine,
    beside the static sampler's (the section's table, and re-measured beside the engine)."""
    if not eng:
        return ""
    # a `*_static_paired` run counts only while it is closer in time to the engine run than the
    # section's own static run (a later full run_all measures both again, side by side)
    if paired and static and _gap(paired, eng) >= _gap(static, eng):
        paired = None
    rows = []
    docs = [("static sampler (the table above)", static),
            ("static sampler, re-measured beside the engine", paired),
            (f"rollout engine: continuous ({eng.get('slots')} slots)", eng)]
    for label, d in docs:
        if not d:
            continue
        m = d["machine"]
        rows.append([label] + [f"{d['results'][k]['s']:.3f}" for k in phases]
                    + [f"{d['total_s']:.3f}", f"{d['first_iteration_s']:.1f}",
                       f"{d['response_tokens_per_s']:.0f}",
                       f"{m.get('host_cpu')}, {m.get('date', '')[:10]}, load "
                       f"{m.get('loadavg_start')} -> {m.get('loadavg_end')}"])
    st = eng.get("engine_stats") or {}
    base = paired or static
    ratio = (f" Rollout {eng['results']['rollout']['s']:.3f} s with the engine vs "
             f"{base['results']['rollout']['s']:.3f} s static "
             f"({'re-measured beside it' if paired else 'the table above'}): "
             f"**{base['results']['rollout']['s'] / eng['results']['rollout']['s']:.2f}x** the "
             f"static sampler's speed; the whole iteration {base['total_s'] / eng['total_s']:.2f}x."
             if base else "")
    stats = (f" Engine, last rollout: {st.get('prefill_calls')} prefill call(s) for "
             f"{st.get('prefilled_prompts')} prompt(s), {st.get('admit_calls')} admit call(s), "
             f"{st.get('decode_chunks')} decode chunks / {st.get('decode_steps')} steps, slot "
             f"use {st.get('slot_utilization', 0):.2f}." if st else "")
    return f"""
#### Rollout engine: continuous

`{eng['machine']['argv']}`

{_table(rows, ["rollout", *[f"{k} s" for k in phases], "total s", "first iteration s (compiles)", "response tokens/s", "CPU, date, load"])}

{what} EOS off on both sides, as in the static rows (`eos_token_id=()`: every response has
{eng['args']['new']} tokens), so the rows are comparable; it also means no slot frees early and
continuous batching has nothing to refill (slots = rollout rows, as `rollout.slots=0`).{ratio}{stats}
"""


def ppo_section(docs, engine=None, paired=None):
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
        e = (engine or {}).get(name)
        if e:
            text = text.rstrip("\n") + "\n" + engine_rows(d, (paired or {}).get(name), e, list(r), (
                "The engine rollout is `easyrl ppo`'s with rollout.engine=continuous: "
                "`easyrl.engine.Engine` wrapped by `rollout.engine_sampler(eng, 1)` (G = 1)."))
            text += "\n"
    return text if found else text + "not measured\n"


def grpo_section(docs, ppo_docs=None, engine=None, paired=None):
    text = "## 3b. GRPO iteration (rollout / rewards / scoring / update)\n\n"
    found = False
    for name, d in docs.items():
        if not d:
            continue
        found = True
        a, r, m = d["args"], d["results"], d["machine"]
        rows = [[k, f"{v['s']:.3f}", f"{100 * v['share']:.0f}%", f"{v['first_iteration_s']:.1f}"]
                for k, v in r.items()]
        rows.append(["total", f"{d['total_s']:.3f}", "100%", f"{d['first_iteration_s']:.1f}"])
        models = ("policy + reference, the reference scored" if d["models"] == 2
                  else "the policy only: beta 0, no reference, no scoring pass")
        text += f"""### {a['preset']}

`{m['argv']}`

{d['params_per_model'] / 1e6:.1f}M parameters x {d['models']} model(s) ({models}),
{a['batch']} prompts x G {a['group']} = {d['completions']} completions, prompt {a['prompt']},
{a['new']} new tokens (temperature 1.0, EOS off), `configs/grpo.py:gsm8k_rlvr`'s grpo settings
(advantage {d['advantage']}, loss {d['loss_type']}, beta {d['beta']:g}, 1 update on policy: no
old-log-prob pass), {d['n_micro']} micro-batch(es) of {d['micro_rows']} completions, host reward
`{d['reward_functions']}` (tokenizer: {d['tokenizer']}), {a['dtype']}, median of
{d['steady_iterations']} iterations after the first (which compiles); {m.get('host_cpu')}
x{m.get('cores')}, load {m.get('loadavg_start')} -> {m.get('loadavg_end')}.

{_table(rows, ["phase", "s (median)", "share", "first iteration s (compiles)"])}

Completions per second over the whole iteration: {d['completions_per_s']:.3g}; response
tokens per second: {d['response_tokens_per_s']:.0f}. (EOS off: every completion has the same
length, so `length_penalty` gives every one the same reward and the advantages are 0; the work
is the same whatever the rewards.)
"""
        p = next((x for x in (ppo_docs or {}).values()
                  if x and x["args"].get("preset") == a["preset"]), None)
        if p:
            split = ", ".join(f"{k} {v['s']:.3f} s" for k, v in p["results"].items())
            other = p["machine"].get("host_cpu") != m.get("host_cpu")
            text += (f"\nPPO at this preset (section 3): {p['args']['batch']} rows x "
                     f"{p['args']['new']} new tokens, 4 models: {split}; total "
                     f"{p['total_s']:.3f} s"
                     + (f" (measured on another machine: {p['machine'].get('host_cpu')})"
                        if other else "") + ".\n")
        e = (engine or {}).get(name)
        if e:
            text += engine_rows(d, (paired or {}).get(name), e, list(r), (
                "The engine rollout is `easyrl grpo`'s with rollout.engine=continuous: "
                "`easyrl.engine.Engine` wrapped by `rollout.engine_sampler(eng, G)`, fed the "
                "unexpanded prompts [B, P] (`iterate(shared=G)`: each prompt prefilled once, its "
                "cache copied into its G slots); the static rows sample the expanded prompts "
                "[B x G, P] (one prefill per completion; `easyrl grpo` with rollout.engine=static "
                "would share prefixes too, through `make_sampler(num_samples=G)`)."))
        text += "\n"
    return text if found else text + "not measured\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default=os.path.join(HERE, "results"))
    ap.add_argument("--md", default=os.path.join(HERE, "RESULTS.md"))
    a = ap.parse_args(argv)
    docs = {n: _load(a.folder, n) for n in ("train_step", "profile_step", "sampler",
                                            "train_step_bf16", "sampler_bf16", "ppo_tiny",
                                            "ppo_bench_100m", "grpo_tiny", "grpo_bench_100m",
                                            "engine", "engine_full")}
    iters = ("ppo_tiny", "ppo_bench_100m", "grpo_tiny", "grpo_bench_100m")
    # the splits with the rollout through the engine, and the static split re-measured beside
    # them (a `*_static_paired` file, when the static table is from another session)
    for suffix in ("_engine", "_static_paired"):
        docs.update({n + suffix: _load(a.folder, n + suffix) for n in iters})
    eng = {n: docs.get(n + "_engine") for n in iters}
    paired = {n: docs.get(n + "_static_paired") for n in iters}
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
        engine_section(docs.get("engine")),
        engine_section(docs.get("engine_full"),
                       "## 2d. Rollout engine at the issue's size (64 prompts x G 8)"),
        ppo_section({k: docs[k] for k in ("ppo_tiny", "ppo_bench_100m")}, eng, paired),
        grpo_section({k: docs[k] for k in ("grpo_tiny", "grpo_bench_100m")},
                     {k: docs[k] for k in ("ppo_tiny", "ppo_bench_100m")}, eng, paired),
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
