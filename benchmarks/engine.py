"""Rollout throughput on a GRPO-shaped workload: easyrl's continuous-batching engine
(`easyrl.engine.Engine`) vs transformers `generate(num_return_sequences=G)` vs easyrl's static
sampler (`easyrl.generate.make_sampler`), and the engine with each of its levers turned off.

    python benchmarks/engine.py --preset bench_100m --prompts 2 --group 8 --prompt 128 --new 256 \
        --slots 8 --reps 1 --out benchmarks/results/engine.json

Workload: --prompts random prompts of --prompt tokens, each sampled G = --group times at
temperature 1.0 (no top-k / top-p), responses up to --new tokens. EOS on: --eos-tokens ids drawn
at random from the vocabulary all count as EOS, so with the near-uniform next-token distribution
of a random-init model each token ends a response with probability ~ eos_tokens / V (default
320 / 32000 = 1%: geometric response lengths, mean ~100, different for every sample). On top,
each request has its own length limit drawn from a long-tailed distribution: a log-normal with
median --limit-median (64) and sigma --limit-sigma (1.0), rounded and clipped to
[--limit-min (8), --new]; about 8% of the requests hit the --new cap. A sample stops at its
first EOS or at its request's limit, whichever comes first; only those tokens are counted
("useful tokens", the same count for every implementation up to sampling noise).

Implementations (same weights: a random-init `LlamaForCausalLM` of the preset saved by
transformers and loaded with `easyrl.hf.load`; same dtype on both sides):
  engine          Engine(slots=--slots): prompts prefilled once per request and shared by its G
                  samples, slots refilled as samples finish, attention over the live cache
                  blocks only
  engine_no_cb    continuous batching off: slots = prompts x G (every sample has a slot from
                  the start; a finished slot stays empty until the run ends)
  engine_no_skip  block skipping off: --slots slots, attention reads all cache blocks each step
  engine_no_share shared prefixes off: each of the G samples of a prompt is its own request
                  (its prompt prefilled again), --slots slots
  static_sampler  `make_sampler` on the prompts repeated G times ([prompts x G, prompt]), one
                  call with max_new_tokens = the largest request limit (a static batch has one
                  limit; its loop stops once every row has emitted EOS), responses cut at each
                  request's limit afterwards
  transformers    `generate(num_return_sequences=G, do_sample=True, top_k=0,
                  max_new_tokens=largest limit, eos_token_id=[the EOS ids])`, cut the same way
Useful tokens / wall seconds is reported (end to end: prefill, decode, outputs on the host),
median over --reps interleaved repetitions after one warm-up (compilation) per implementation.
The engine's warm-up runs the same requests with their limits cut to 2 tokens (the same
programs compile); the static sampler is compiled ahead of time (`jit.lower().compile()`).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

IMPLS = ("engine", "engine_no_cb", "engine_no_skip", "engine_no_share", "static_sampler",
         "transformers")


def workload(a, vocab: int) -> dict:
    rs = np.random.RandomState(a.seed)
    prompts = rs.randint(3, vocab, size=(a.prompts, a.prompt)).astype(np.int32)
    lim = np.exp(np.log(a.limit_median) + a.limit_sigma * rs.randn(a.prompts))
    limits = np.clip(np.round(lim), a.limit_min, a.new).astype(int)
    eos = tuple(sorted(int(x) for x in rs.choice(np.arange(3, vocab), a.eos_tokens, replace=False)))
    return dict(prompts=prompts, limits=limits.tolist(), eos=eos)


def useful_lengths(responses, limits, group, eos) -> list:
    """Per sample: tokens up to and including the first EOS, at most its request's limit."""
    eos = set(eos)
    out = []
    for i, row in enumerate(responses):
        lim = limits[i // group]
        n = 0
        for t in row[:lim]:
            n += 1
            if int(t) in eos:
                break
        out.append(n)
    return out


def build(preset: str, folder: str, threads: int):
    import torch
    import transformers

    from easyrl.model import get_preset
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = get_preset(preset)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf())).eval()
    ref.save_pretrained(folder)
    return ref


def load(folder: str, dtype: str):
    """easyrl's (config, params) and transformers' model of the saved weights, both in dtype."""
    import torch
    import transformers

    from easyrl import hf
    config, params = hf.load(folder, dtype=dtype)
    if dtype != "float32":
        config = config.replace(dtype=dtype)
    ref = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    return config, params, ref


def run_dtype(a, folder, dtype, impls):
    import torch

    from easyrl.engine import Engine
    from easyrl.generate import make_sampler, normalize_eos
    config, params, ref = load(folder, dtype)
    w = workload(a, config.vocab_size)
    prompts, limits, eos = w["prompts"], w["limits"], w["eos"]
    r, g = a.prompts, a.group
    n_max = max(limits)
    reqs = [dict(prompt_ids=p.tolist(), num_samples=g, max_new_tokens=lim)
            for p, lim in zip(prompts, limits)]
    kw = dict(max_prompt_len=a.prompt, max_new_tokens=a.new, temperature=1.0, eos_token_id=eos,
              block=a.block, chunk=a.chunk)
    engines = dict(engine=Engine(config, slots=a.slots, **kw),
                   engine_no_cb=Engine(config, slots=r * g, **kw),
                   engine_no_skip=Engine(config, slots=a.slots, skip_blocks=False, **kw),
                   engine_no_share=Engine(config, slots=a.slots, **kw))
    # shared prefixes off: G requests of one sample each per prompt (same limits)
    unshared = [dict(q, num_samples=1) for q in reqs for _ in range(g)]
    fns, warm = {}, {}
    rep = [0]
    for name, eng in engines.items():
        if name not in impls:
            continue
        rq = unshared if name == "engine_no_share" else reqs

        def fn(eng=eng, rq=rq):
            out = eng.run(params, rq, seed=rep[0])
            return [x for o in out for x in o["response_ids"]], dict(eng.stats)
        fns[name] = fn
        warm[name] = lambda eng=eng, rq=rq: eng.run(
            params, [dict(q, max_new_tokens=min(2, q["max_new_tokens"])) for q in rq], seed=0)
    if "static_sampler" in impls:
        ids = jnp.asarray(np.repeat(prompts, g, axis=0))
        mask = jnp.ones_like(ids)
        sampler = make_sampler(config, max_new_tokens=n_max, temperature=1.0, eos_token_id=eos,
                               pad_token_id=0)
        eos_ids = normalize_eos(eos)
        n_e = max(8, -(-len(eos_ids) // 8) * 8)  # the sampler pads its EOS ids with -1
        eos_arr = np.asarray(list(eos_ids) + [-1] * (n_e - len(eos_ids)), np.int32)
        box = {}

        def static_warm():
            try:  # ahead of time: compiling needs no full run
                box["fn"] = sampler.jitted.lower(params, ids, mask, jax.random.PRNGKey(0),
                                                 eos_arr, np.int32(0)).compile()
            except (AttributeError, TypeError):  # the sampler's internals changed: one full call
                box["fn"] = None
                jax.block_until_ready(sampler(params, ids, mask, jax.random.PRNGKey(0)))

        def static_fn():
            key = jax.random.PRNGKey(rep[0])
            if box["fn"] is None:
                out = sampler(params, ids, mask, key)
            else:
                out = box["fn"](params, ids, mask, key, eos_arr, np.int32(0))
            return np.asarray(out["response"]).tolist(), {}
        fns["static_sampler"], warm["static_sampler"] = static_fn, static_warm
    if "transformers" in impls:
        t_ids = torch.as_tensor(prompts, dtype=torch.long)
        t_mask = torch.ones_like(t_ids)

        def hf_gen(n):
            # --hf-chunk prompts per generate call (0: all at once); each call runs to n tokens
            # and stops early once all its rows emitted EOS
            torch.manual_seed(rep[0])
            step = a.hf_chunk or r
            rows = []
            with torch.inference_mode():
                for lo in range(0, r, step):
                    out = ref.generate(input_ids=t_ids[lo:lo + step],
                                       attention_mask=t_mask[lo:lo + step], do_sample=True,
                                       temperature=1.0, top_k=0, top_p=1.0,
                                       num_return_sequences=g, max_new_tokens=n,
                                       eos_token_id=list(eos), pad_token_id=0, use_cache=True)
                    rows += out[:, a.prompt:].numpy().tolist()
            return rows, {}
        fns["transformers"] = lambda: hf_gen(n_max)
        warm["transformers"] = lambda: hf_gen(2)
    first = {}
    for name in fns:
        t0 = time.perf_counter()
        warm[name]()
        first[name] = time.perf_counter() - t0
        print(f"  [{dtype}] {name}: warm-up {first[name]:.1f}s", flush=True)
    walls = {n: [] for n in fns}
    cpus = {n: [] for n in fns}
    toks = {n: [] for n in fns}
    stats, samples = {}, {}
    for i in range(a.reps):
        rep[0] = i
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            resp, st = fn()
            walls[name].append(time.perf_counter() - t0)
            cpus[name].append(time.process_time() - c0)
            lens = useful_lengths(resp, limits, g, eos)
            toks[name].append(int(sum(lens)))
            stats[name], samples[name] = st, resp
        print(f"  [{dtype}] rep {i}: " + ", ".join(
            f"{n} {walls[n][-1]:.1f}s {toks[n][-1] / walls[n][-1]:.0f} tok/s" for n in fns),
            flush=True)
    res = {}
    for name in fns:
        tps = [t / s for t, s in zip(toks[name], walls[name])]
        res[name] = dict(wall_s=C.median(walls[name]), wall_s_all=walls[name],
                         cpu_s=C.median(cpus[name]), useful_tokens=toks[name],
                         tokens_per_s=C.median(tps), tokens_per_s_all=tps,
                         warmup_s=first[name], stats=stats[name])
    # the engine variants draw the same samples (keys from (seed, request, sample, token))
    same = {}
    if "engine" in samples:
        for name in ("engine_no_cb", "engine_no_skip"):
            if name in samples:
                same[name] = samples[name] == samples["engine"]
    return dict(workload=dict(limits=limits, eos_tokens=len(eos), max_limit=n_max,
                              samples=r * g, vocab_size=int(config.vocab_size)),
                results=res, engine_variants_identical=same)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench_100m")
    ap.add_argument("--prompts", type=int, default=2, help="requests (prompts) per rollout")
    ap.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--new", type=int, default=256, help="max new tokens (the engine's cap)")
    ap.add_argument("--slots", type=int, default=8, help="the engine's decode slots")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--eos-tokens", type=int, default=320)
    ap.add_argument("--limit-median", type=float, default=64.0)
    ap.add_argument("--limit-sigma", type=float, default=1.0)
    ap.add_argument("--limit-min", type=int, default=8)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--hf-chunk", type=int, default=0,
                    help="prompts per transformers generate call (0 = all; at 64 prompts x G 8 x "
                         "384 positions in float32 its KV cache alone is 14.5 GB: on a 24 GiB "
                         "machine the one-call baseline was OOM-killed)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    impls = [x for x in a.impls.split(",") if x]
    bad = sorted(set(impls) - set(IMPLS))
    if bad:
        ap.error(f"unknown --impls {bad}; choose from {IMPLS}")
    if a.no_torch and "transformers" in impls:
        impls.remove("transformers")

    info = C.machine_info()
    threads = C.num_threads()
    print(C.banner(info), flush=True)
    folder = tempfile.mkdtemp(prefix="easyrl_bench_engine_")
    ref = build(a.preset, folder, threads)
    out = {}
    for dtype in [d for d in a.dtypes.split(",") if d]:
        out[dtype] = run_dtype(a, folder, dtype, impls)

    for dtype, d in out.items():
        res = d["results"]
        wl = d["workload"]
        print(f"\nRollout: {a.preset}, {a.prompts} prompts x G={a.group}, prompt {a.prompt}, "
              f"up to {a.new} new tokens, EOS = {wl['eos_tokens']} ids (~"
              f"{100 * wl['eos_tokens'] / ref.config.vocab_size:.1f}% per token), request "
              f"limits {wl['limits']}, {dtype}, {threads} threads, {a.reps} rep(s) (median)")
        rows = []
        base = res.get("engine", {}).get("tokens_per_s")
        for name in IMPLS:
            if name not in res:
                continue
            x = res[name]
            st = x["stats"]
            rows.append([name, f"{x['wall_s']:.2f}", str(int(np.median(x["useful_tokens"]))),
                         f"{x['tokens_per_s']:.0f}",
                         f"{base / x['tokens_per_s']:.2f}x" if base else "-",
                         str(st.get("decode_steps", "-")),
                         f"{st['slot_utilization']:.2f}" if "slot_utilization" in st else "-",
                         f"{x['warmup_s']:.1f}"])
        print(C.table(rows, ["impl", "wall s", "useful tokens", "tokens/s", "engine speedup",
                             "decode steps", "slot use", "warm-up s"]))
        if d["engine_variants_identical"]:
            print("engine variants draw identical samples: " + ", ".join(
                f"{k} {v}" for k, v in d["engine_variants_identical"].items()))
    print(f"load average start {info['loadavg_start']} end {C.loadavg()}")
    C.write_json(a.out, dict(benchmark="engine", machine=info, threads=threads, args=vars(a),
                             results=out))
    return out


if __name__ == "__main__":
    main()
