"""Decode throughput: easyrl's jitted KV-cache sampler vs transformers `generate` (KV cache on).

    python benchmarks/sampler.py --preset bench_100m --batch 16 --prompt 128 --new 128 --reps 3 \
        --out benchmarks/results/sampler.json

One random-init `LlamaForCausalLM` of the preset's shape is saved to a temporary folder and loaded
into easyrl with `easyrl.hf.load`, so both sides run the same weights. Greedy, EOS disabled
(easyrl: `eos_token_id=()`; transformers: `min_new_tokens = max_new_tokens`), so every row
generates exactly `--new` tokens. Timed end to end (prefill + decode, outputs on the host), easyrl
and transformers interleaved, medians reported. A second pass with one new token measures the
prefill, so the decode-only rate is (new - 1) * batch / (total - prefill).

Floors per decode step (the sampler's step reads every weight once and the KV cache):
  bandwidth floor = (matmul weights + B embedding rows + KV cache bytes) / measured read bandwidth
  compute floor   = 2 * (matmul params) * B + attention FLOPs / measured matmul ceiling
KV bytes are counted as the sampler reads them: easyrl attends over its whole cache of P + N
slots every step (masked), transformers over the tokens so far (P + i); both are printed.
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


def build_models(preset: str, folder: str, threads: int, dtype="float32"):
    import torch
    import transformers

    from easyrl import hf
    from easyrl.model import get_preset
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = get_preset(preset)
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf())
    ref = transformers.LlamaForCausalLM(hf_cfg).eval()
    ref.save_pretrained(folder)
    config, params = hf.load(folder, dtype=dtype)  # parameters in `dtype`
    if dtype != "float32":
        config = config.replace(dtype=dtype)  # and compute in it
        dev = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
        ref = ref.to(device=dev, dtype=getattr(torch, dtype))
    return config, params, ref


def floors(cfg, batch, prompt, new, bandwidth, ceiling, bytes_per=4):
    d, f, l, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    h, k, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    n_matmul = l * (d * h * dh * 2 + d * k * dh * 2 + 3 * d * f) + d * v
    weights = (n_matmul + batch * d + l * 2 * d + d) * bytes_per
    kv_row = l * 2 * k * dh * bytes_per  # bytes of K and V of one token, all layers
    kv_full = batch * (prompt + new) * kv_row  # easyrl: every slot of the cache, every step
    kv_avg = batch * (prompt + new / 2) * kv_row  # transformers: the tokens so far, on average
    attn_flops = lambda s: 4 * l * h * dh * s * batch  # noqa: E731
    out = {}
    for name, kv, s in (("easyrl", kv_full, prompt + new), ("transformers", kv_avg, prompt + new / 2)):
        byt = weights + kv
        t_bw = byt / bandwidth
        t_fl = (2 * n_matmul * batch + attn_flops(s)) / ceiling
        out[name] = dict(bytes_per_step=byt, weight_bytes=weights, kv_bytes=kv,
                         bandwidth_floor_s=t_bw, compute_floor_s=t_fl,
                         floor_tokens_per_s=batch / max(t_bw, t_fl),
                         bandwidth_floor_tokens_per_s=batch / t_bw)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench_100m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    import torch

    from easyrl.generate import make_sampler
    info = C.machine_info()
    threads = C.num_threads()
    print(C.banner(info), flush=True)
    bws = [C.read_bandwidth()]
    bw_copy = C.jax_copy_bandwidth()
    ceiling = C.jax_matmul_ceiling(dtype=a.dtype)
    print(f"# read bandwidth {bws[0]['best'] / 1e9:.1f} GB/s (best of jnp / torch / numpy sum over "
          f"1 GiB), copy {bw_copy / 1e9:.1f} GB/s (read+write), matmul ceiling "
          f"{ceiling / 1e9:.1f} GFLOP/s", flush=True)

    tmp = tempfile.mkdtemp(prefix="easyrl_bench_sampler_")
    cfg, params, ref = build_models(a.preset, tmp, threads, a.dtype)
    rs = np.random.RandomState(0)
    ids = rs.randint(3, cfg.vocab_size, size=(a.batch, a.prompt)).astype(np.int32)
    mask = np.ones_like(ids)
    j_ids, j_mask = jnp.asarray(ids), jnp.asarray(mask)
    dev = ref.device
    t_ids = torch.as_tensor(ids, dtype=torch.long, device=dev)
    t_mask = torch.as_tensor(mask, dtype=torch.long, device=dev)
    rng = jax.random.PRNGKey(0)

    def easyrl_fn(n):
        s = make_sampler(cfg, max_new_tokens=n, temperature=0.0, eos_token_id=(), pad_token_id=0)
        return lambda: np.asarray(s(params, j_ids, j_mask, rng)["response"])

    def torch_fn(n):
        def run():
            with torch.inference_mode():
                out = ref.generate(input_ids=t_ids, attention_mask=t_mask, do_sample=False,
                                   max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                                   eos_token_id=None, use_cache=True)
            return out[:, a.prompt:].cpu().numpy()
        return run

    runs = {"easyrl": {n: easyrl_fn(n) for n in (a.new, 1)}}
    if not a.no_torch:
        runs["transformers"] = {n: torch_fn(n) for n in (a.new, 1)}
    outs, compile_s = {}, {}
    for name, fns in runs.items():  # compile / warm up
        for n, fn in fns.items():
            t0 = time.perf_counter()
            outs[(name, n)] = fn()
            compile_s[(name, n)] = time.perf_counter() - t0
    if "transformers" in runs:
        same = float(np.mean(outs[("easyrl", a.new)] == outs[("transformers", a.new)]))
        first = float(np.mean(outs[("easyrl", a.new)][:, 0] == outs[("transformers", a.new)][:, 0]))
        print(f"# greedy tokens equal to transformers: {100 * same:.1f}% (first token {100 * first:.1f}%)")
    else:
        same = first = None
    walls = {(name, n): [] for name, fns in runs.items() for n in fns}
    cpus = {k: [] for k in walls}
    for r in range(a.reps):
        bws.append(C.read_bandwidth(reps=2))  # the floor uses the best bandwidth seen in the run
        for name, fns in runs.items():
            for n, fn in fns.items():
                w, c = C.timeit2(fn)
                walls[(name, n)].append(w)
                cpus[(name, n)].append(c)
        print(f"  rep {r}: " + ", ".join(f"{k[0]} new={k[1]} {v[-1]:.2f}s" for k, v in walls.items()),
              flush=True)
    bw = max(b["best"] for b in bws)
    fl = floors(cfg, a.batch, a.prompt, a.new, bw, ceiling, 2 if a.dtype == "bfloat16" else 4)
    res, rows = {}, []
    for name in runs:
        total, pre = C.median(walls[(name, a.new)]), C.median(walls[(name, 1)])
        # best decode estimate: best full run minus best prefill-only run
        dec = max(total - pre, 1e-9)
        dec_best = max(min(walls[(name, a.new)]) - min(walls[(name, 1)]), 1e-9)
        r = dict(total_s=total, total_s_all=walls[(name, a.new)], prefill_s=pre,
                 prefill_s_all=walls[(name, 1)], cpu_total_s=C.median(cpus[(name, a.new)]),
                 cpu_prefill_s=C.median(cpus[(name, 1)]), first_call_s=compile_s[(name, a.new)],
                 tokens_per_s=a.batch * a.new / total,
                 tokens_per_s_best=a.batch * a.new / min(walls[(name, a.new)]),
                 decode_tokens_per_s=a.batch * (a.new - 1) / dec,
                 decode_tokens_per_s_best=a.batch * (a.new - 1) / dec_best,
                 decode_step_ms=1e3 * dec / (a.new - 1), **fl[name])
        r["bandwidth_floor_fraction"] = r["bandwidth_floor_s"] / (dec / (a.new - 1))
        res[name] = r
        rows.append([name, f"{total:.2f}", f"{pre:.2f}", f"{r['tokens_per_s']:.0f}",
                     f"{r['decode_tokens_per_s']:.0f}", f"{r['decode_step_ms']:.1f}",
                     f"{1e3 * r['bandwidth_floor_s']:.1f}", f"{1e3 * r['compute_floor_s']:.1f}",
                     f"{100 * r['bandwidth_floor_fraction']:.0f}%"])
    print(f"\nSampler: {a.preset}, batch {a.batch}, prompt {a.prompt}, {a.new} new tokens, greedy, "
          f"{a.dtype}, {threads} threads, {a.reps} reps (median)")
    print(C.table(rows, ["impl", "total s", "prefill s", "tokens/s (e2e)", "decode tok/s",
                         "ms/step", "bw floor ms", "compute floor ms", "floor / step"]))
    ratio = dec_ratio = dec_ratio_best = None
    if "transformers" in res:
        e, t = res["easyrl"], res["transformers"]
        ratio = e["tokens_per_s"] / t["tokens_per_s"]
        dec_ratio = e["decode_tokens_per_s"] / t["decode_tokens_per_s"]
        dec_ratio_best = e["decode_tokens_per_s_best"] / t["decode_tokens_per_s_best"]
        print(f"easyrl / transformers tokens/s: {ratio:.2f}x end to end, {dec_ratio:.2f}x decode "
              f"only ({dec_ratio_best:.2f}x from the best repetitions)")
    e = res["easyrl"]
    print(f"bytes per decode step: easyrl {e['bytes_per_step'] / 1e6:.0f} MB (weights "
          f"{e['weight_bytes'] / 1e6:.0f} MB + KV {e['kv_bytes'] / 1e6:.0f} MB); read bandwidth "
          f"{bw / 1e9:.1f} GB/s -> floor {1e3 * e['bandwidth_floor_s']:.1f} ms/step")
    print(f"load average start {info['loadavg_start']} end {C.loadavg()}")
    C.write_json(a.out, dict(benchmark="sampler", machine=info, threads=threads, args=vars(a),
                             bandwidth_read=bw, bandwidth_read_all=bws, bandwidth_copy=bw_copy,
                             matmul_ceiling_flops=ceiling, greedy_token_agreement=same,
                             first_token_agreement=first, results=res,
                             ratio_easyrl_over_transformers=ratio,
                             decode_ratio_easyrl_over_transformers=dec_ratio,
                             decode_ratio_easyrl_over_transformers_best=dec_ratio_best))
    return res


if __name__ == "__main__":
    main()
