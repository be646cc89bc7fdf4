"""SFT training step: easyrl (jitted step, donated state) vs transformers + torch.optim.AdamW.

    python benchmarks/train_step.py --preset bench_100m --seq 512 --batch 4 --steps 1 --reps 3 \
        --out benchmarks/results/train_step.json

Both sides: the same LLaMA shape, batch, sequence length, dtype, random tokens with every position
a target, AdamW (lr 1e-4, betas 0.9/0.999, eps 1e-8, no weight decay) after global-norm clipping
at 1.0, the same number of threads (XLA:CPU's pool = cores of this process; torch.set_num_threads
to the same). The torch side runs in a worker process of its own (`--same-process` puts it in
this one, as earlier runs did), each library alone in its process as users run them; timings
interleave easyrl / torch repetitions, the idle side waiting on a pipe; medians (and the best
repetition) are reported. easyrl runs `easyrl.algorithms.sft.make_loss` (the LM head fused with the
cross-entropy) under `make_train_step`, jitted with the state donated, with `--remat`
(default `dots`, what the 7B/13B presets in configs/ use); transformers runs its default
attention (sdpa) without gradient checkpointing.

FLOPs per token (PaLM appendix B): 6 N + 12 L D T, with N = the parameters of every matmul
(attention and MLP kernels of all layers plus the LM head; the input embedding is a gather and is
excluded) and 12 L D T the attention score / value matmuls (forward + backward, full T x T, no
causal skipping counted, no remat recomputation counted). MFU = tokens/s * FLOPs per token / the
matmul ceiling measured in this run: the best FLOP/s of a jitted [n, n] @ [n, n] matmul over
n in (1024, 2048, 4096) in the benchmark dtype (torch's is recorded for reference).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def flops_per_token(cfg, seq: int) -> float:
    d, f, l, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    h, k, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    n_matmul = l * (d * h * dh * 2 + d * k * dh * 2 + 3 * d * f) + d * v
    return 6.0 * n_matmul + 12.0 * l * h * dh * seq, n_matmul


def optim_config(lr=1e-4):
    import ml_collections as mlc
    return mlc.ConfigDict(dict(lr=lr, schedule="constant", warmup=0, min_lr_ratio=0.0,
                               weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, clip=1.0))


def easyrl_setup(cfg, batch, steps, with_args=False):
    """(run, sync, jitted step) for easyrl's SFT step; with_args: also a function returning the
    step's current arguments (for `step.lower(*args())`)."""
    from easyrl import model as M
    from easyrl.algorithms import sft
    from easyrl.train.optim import make_optimizer
    from easyrl.train.step import TrainState, make_train_step
    params = M.init_params(cfg, jax.random.PRNGKey(0))
    tx, sched = make_optimizer(optim_config(), max(steps, 1))
    state = TrainState.create(params, tx)
    state = jax.tree.map(jnp.copy, state)  # distinct buffers everywhere: the state is donated
    step = jax.jit(make_train_step(sft.make_loss(cfg), tx, sched, sft.denom), donate_argnums=(0,))
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    rng = jax.random.PRNGKey(1)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], b, rng)
        return metrics

    sync = lambda m: jax.block_until_ready(m["loss"])  # noqa: E731
    if with_args:
        return run, sync, step, lambda: (holder["state"], b, rng)
    return run, sync, step


def torch_setup(cfg, batch, dtype, threads, dev=None):
    import torch
    import transformers
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf())
    if dev is None:
        dev = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
    model = transformers.LlamaForCausalLM(hf_cfg).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0)
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long, device=dev)
    mask = torch.as_tensor(batch["attention_mask"], dtype=torch.long, device=dev)
    amp = dtype == "bfloat16"

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    def sync(loss):
        if dev == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    return run, sync, model


def make_batch(vocab_size, batch, seq):
    rs = np.random.RandomState(0)
    ids = rs.randint(3, vocab_size, size=(batch, seq)).astype(np.int32)
    return dict(input_ids=ids, attention_mask=np.ones_like(ids), loss_mask=np.ones_like(ids))


def torch_worker(spec: dict) -> None:
    """The torch side in its own process (`C.Worker`): matmul ceiling, setup, two warm-up steps,
    then timed repetitions on request."""
    from easyrl.model import get_preset
    cfg = get_preset(spec["preset"], **spec["overrides"])
    ceiling = C.torch_matmul_ceiling(spec["ceiling_n"], spec["dtype"])
    run, sync, _ = torch_setup(cfg, make_batch(cfg.vocab_size, spec["batch"], spec["seq"]),
                               spec["dtype"], spec["threads"], spec["device"])
    sync(run())
    sync(run())

    def timed(n, warm=0):
        for _ in range(warm):
            sync(run())
        w, c = C.timeit2(run, sync, n)
        return dict(wall=w, cpu=c)

    C.serve(dict(run=timed), dict(ceiling=ceiling))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return torch_worker(json.loads(argv[1]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench_100m")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed repetition")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions (median reported)")
    ap.add_argument("--warm", type=int, default=1,
                    help="untimed steps before each timed repetition, on each side: a training "
                         "process runs its steps back to back, so each side is timed warm, not "
                         "right after the other side's step (measured: easyrl's first step after "
                         "a torch step ran 25-30%% slower than its steps back to back)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="compute dtype (params stay float32; torch uses autocast for bf16)")
    ap.add_argument("--remat", default="dots",
                    help="easyrl remat policy (none | full | dots | dots_no_batch | minimal)")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--attention", default=None, help="easyrl attention impl (xla | cudnn)")
    ap.add_argument("--no-torch", action="store_true", help="easyrl only")
    ap.add_argument("--same-process", action="store_true",
                    help="run torch in this process (default: a worker process of its own)")
    ap.add_argument("--ceiling-n", type=int, nargs="+", default=[1024, 2048, 4096],
                    help="matmul ceiling sizes n (n x n @ n x n); the best is the ceiling")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)

    from easyrl.model import get_preset
    over = dict(dtype=a.dtype)
    if a.remat:
        over["remat"] = a.remat
    if a.attention:
        over["attention"] = a.attention
    if a.layers:
        over["num_hidden_layers"] = a.layers
    cfg = get_preset(a.preset, **over)
    info = C.machine_info()
    threads = C.num_threads()
    print(C.banner(info), flush=True)

    batch = make_batch(cfg.vocab_size, a.batch, a.seq)

    ceilings = C.jax_matmul_flops(a.ceiling_n, a.dtype)
    ceiling = max(ceilings.values())
    ceiling_torch = None
    fpt, n_matmul = flops_per_token(cfg, a.seq)
    print("# matmul ceiling (jax, %s): %.1f GFLOP/s (%s)" % (a.dtype, ceiling / 1e9, ", ".join(
        f"n={n}: {f / 1e9:.0f}" for n, f in ceilings.items())), flush=True)

    runs = {}
    worker = None
    if not a.no_torch and not a.same_process:  # before easyrl's setup: nothing runs beside it
        dev = "cuda" if jax.default_backend() == "gpu" else "cpu"
        worker = C.Worker(os.path.abspath(__file__), dict(
            preset=a.preset, overrides=over, ceiling_n=a.ceiling_n, dtype=a.dtype, batch=a.batch,
            seq=a.seq, threads=threads, device=dev))
        ceiling_torch = worker.ready["ceiling"]
        print(f"# matmul ceiling (torch, {a.dtype}): {ceiling_torch / 1e9:.1f} GFLOP/s "
              "(worker process)", flush=True)
    e_run, e_sync, _ = easyrl_setup(cfg, batch, a.steps)
    t0 = time.perf_counter()
    e_sync(e_run())  # compile
    compile_s = time.perf_counter() - t0
    e_sync(e_run())
    runs["easyrl"] = (e_run, e_sync)
    if worker is not None:
        runs["torch"] = worker
    elif not a.no_torch:
        import torch  # noqa: F401
        ceiling_torch = C.torch_matmul_ceiling(a.ceiling_n, a.dtype)
        print(f"# matmul ceiling (torch, {a.dtype}): {ceiling_torch / 1e9:.1f} GFLOP/s", flush=True)
        t_run, t_sync, _ = torch_setup(cfg, batch, a.dtype, threads)
        t_sync(t_run())
        t_sync(t_run())
        runs["torch"] = (t_run, t_sync)

    walls = {k: [] for k in runs}
    cpus = {k: [] for k in runs}
    for r in range(a.reps):
        for name, side in runs.items():
            if isinstance(side, C.Worker):
                r_ = side.call(op="run", n=a.steps, warm=a.warm)
                w, c = r_["wall"], r_["cpu"]
            else:
                for _ in range(a.warm):
                    side[1](side[0]())
                w, c = C.timeit2(*side, a.steps)
            walls[name].append(w / a.steps)
            cpus[name].append(c / a.steps)
        print(f"  rep {r}: " + ", ".join(f"{k} {walls[k][-1]:.2f}s" for k in runs), flush=True)
    tokens = a.batch * a.seq
    res = {}
    rows = []
    for name in runs:
        st = C.stats(walls[name], cpus[name])
        t, best = st["median_s"], st["best_s"]
        tps = tokens / t
        res[name] = dict(step_s=t, step_s_best=best, step_s_all=st["all_s"],
                         cpu_s_per_step=st["cpu_median_s"], tokens_per_s=tps,
                         tokens_per_s_best=tokens / best, flops_per_s=tps * fpt,
                         mfu=tps * fpt / ceiling, mfu_best=tokens / best * fpt / ceiling)
        rows.append([name, f"{t * 1e3:.0f}", f"{best * 1e3:.0f}", f"{tps:.0f}",
                     f"{tps * fpt / 1e9:.1f}", f"{100 * tps * fpt / ceiling:.1f}%",
                     f"{st['cpu_median_s']:.1f}"])
    if "easyrl" in res:
        res["easyrl"]["compile_s"] = compile_s
    print(f"\nSFT train step: {a.preset} ({n_matmul / 1e6:.1f}M matmul params), batch {a.batch} x "
          f"seq {a.seq}, {a.dtype}, remat={cfg.remat}, {threads} threads, {a.reps} reps x "
          f"{a.steps} steps (median)")
    print(C.table(rows, ["impl", "step ms (median)", "best ms", "tokens/s", "GFLOP/s",
                         "MFU", "CPU s/step"]))
    ratio = ratio_best = None
    if "torch" in res:
        ratio = res["easyrl"]["tokens_per_s"] / res["torch"]["tokens_per_s"]
        ratio_best = res["easyrl"]["tokens_per_s_best"] / res["torch"]["tokens_per_s_best"]
        print(f"easyrl / torch tokens/s: {ratio:.2f}x (median), {ratio_best:.2f}x (best reps)")
    print(f"FLOPs/token = 6*N + 12*L*D*T = {fpt / 1e6:.1f} MFLOP; matmul ceiling "
          f"{ceiling / 1e9:.1f} GFLOP/s (jax)" +
          (f", {ceiling_torch / 1e9:.1f} GFLOP/s (torch)" if ceiling_torch else ""))
    print(f"load average start {info['loadavg_start']} end {C.loadavg()}")
    if worker is not None:
        worker.close()
    C.write_json(a.out, dict(benchmark="train_step", machine=info, threads=threads,
                             args=vars(a), config=dict(preset=a.preset, remat=cfg.remat,
                                                       attention=cfg.attention, dtype=cfg.dtype),
                             tokens_per_step=tokens, flops_per_token=fpt,
                             n_matmul_params=n_matmul, matmul_ceiling_flops=ceiling,
                             matmul_flops_by_size={str(k): v for k, v in ceilings.items()},
                             torch_matmul_ceiling_flops=ceiling_torch, results=res,
                             ratio_easyrl_over_torch=ratio,
                             ratio_easyrl_over_torch_best=ratio_best,
                             torch_process="same" if a.same_process else "worker"))
    return res


if __name__ == "__main__":
    main()
