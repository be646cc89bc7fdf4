"""SFT training step: easyrl (jitted step, donated state) vs transformers + torch.optim.AdamW.

    python benchmarks/train_step.py --preset bench_100m --seq 512 --batch 4 --steps 3 --reps 5 \
        --out benchmarks/results/train_step_cpu.json

Both sides: the same LLaMA shape, batch, sequence length, dtype, random tokens with every position
a target, AdamW (lr 1e-4, betas 0.9/0.999, eps 1e-8, no weight decay) after global-norm clipping
at 1.0, the same number of threads (XLA:CPU's pool = cores of this process; torch.set_num_threads
to the same). Timings interleave easyrl / torch repetitions; medians are reported.

FLOPs per token (PaLM appendix B): 6 N + 12 L D T, with N = the parameters of every matmul
(attention and MLP kernels of all layers plus the LM head; the input embedding is a gather and is
excluded) and 12 L D T the attention score / value matmuls (forward + backward, full T x T, no
causal skipping counted). MFU = tokens/s * FLOPs per token / the matmul ceiling measured in this
run (a large jitted matmul in the benchmark dtype; torch's matmul is printed for reference).
"""
from __future__ import annotations

import argparse
import os
import sys

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


def easyrl_setup(cfg, batch, steps):
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

    return run, lambda m: jax.block_until_ready(m["loss"]), step


def torch_setup(cfg, batch, dtype, threads):
    import torch
    import transformers
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf())
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench_100m")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed repetition")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions (median reported)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="compute dtype (params stay float32; torch uses autocast for bf16)")
    ap.add_argument("--remat", default=None, help="easyrl remat policy (default: the preset's)")
    ap.add_argument("--attention", default=None, help="easyrl attention impl (xla | cudnn)")
    ap.add_argument("--no-torch", action="store_true", help="easyrl only")
    ap.add_argument("--ceiling-n", type=int, default=4096, help="matmul ceiling size n (n x n @ n x n)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)

    from easyrl.model import get_preset
    over = dict(dtype=a.dtype)
    if a.remat:
        over["remat"] = a.remat
    if a.attention:
        over["attention"] = a.attention
    cfg = get_preset(a.preset, **over)
    info = C.machine_info()
    threads = C.num_threads()
    print(f"# {info['host_cpu']} x{threads} threads | jax {info['jax']} ({info['jax_backend']}) | "
          f"torch {info['torch']} | transformers {info['transformers']} | load {info['loadavg_start']}")

    rs = np.random.RandomState(0)
    ids = rs.randint(3, cfg.vocab_size, size=(a.batch, a.seq)).astype(np.int32)
    batch = dict(input_ids=ids, attention_mask=np.ones_like(ids), loss_mask=np.ones_like(ids))

    ceiling = C.jax_matmul_ceiling(a.ceiling_n, a.dtype)
    ceiling_torch = None
    fpt, n_matmul = flops_per_token(cfg, a.seq)
    print(f"# matmul ceiling (jax, {a.dtype}, n={a.ceiling_n}): {ceiling / 1e9:.1f} GFLOP/s")

    runs = {}
    e_run, e_sync, _ = easyrl_setup(cfg, batch, a.steps)
    e_sync(e_run())  # compile
    e_sync(e_run())
    runs["easyrl"] = (e_run, e_sync)
    if not a.no_torch:
        import torch  # noqa: F401
        ceiling_torch = C.torch_matmul_ceiling(a.ceiling_n, a.dtype)
        print(f"# matmul ceiling (torch, {a.dtype}, n={a.ceiling_n}): {ceiling_torch / 1e9:.1f} GFLOP/s")
        t_run, t_sync, _ = torch_setup(cfg, batch, a.dtype, threads)
        t_sync(t_run())
        t_sync(t_run())
        runs["torch"] = (t_run, t_sync)

    times = {k: [] for k in runs}
    for r in range(a.reps):
        for name, (run, sync) in runs.items():
            times[name].append(C.timeit(run, sync, a.steps) / a.steps)
    tokens = a.batch * a.seq
    res = {}
    rows = []
    for name, ts in times.items():
        t = C.median(ts)
        tps = tokens / t
        res[name] = dict(step_s=t, step_s_all=ts, tokens_per_s=tps, flops_per_s=tps * fpt,
                         mfu=tps * fpt / ceiling)
        rows.append([name, f"{t * 1e3:.0f}", f"{tps:.0f}", f"{tps * fpt / 1e9:.1f}",
                     f"{100 * tps * fpt / ceiling:.1f}%", f"{min(ts) * 1e3:.0f}-{max(ts) * 1e3:.0f}"])
    print(f"\nSFT train step: {a.preset} ({n_matmul / 1e6:.1f}M matmul params), batch {a.batch} x "
          f"seq {a.seq}, {a.dtype}, {threads} threads, {a.reps} reps x {a.steps} steps")
    print(C.table(rows, ["impl", "step ms (median)", "tokens/s", "GFLOP/s", "MFU", "range ms"]))
    ratio = None
    if "torch" in res:
        ratio = res["easyrl"]["tokens_per_s"] / res["torch"]["tokens_per_s"]
        print(f"easyrl / torch tokens/s: {ratio:.2f}x")
    print(f"FLOPs/token = 6*N + 12*L*D*T = {fpt / 1e6:.1f} MFLOP; matmul ceiling "
          f"{ceiling / 1e9:.1f} GFLOP/s (jax)" +
          (f", {ceiling_torch / 1e9:.1f} GFLOP/s (torch)" if ceiling_torch else ""))
    print(f"load average start {info['loadavg_start']} end {C.loadavg()}")
    C.write_json(a.out, dict(benchmark="train_step", machine=info, threads=threads,
                             args=vars(a), config=dict(preset=a.preset, remat=cfg.remat,
                                                       attention=cfg.attention, dtype=cfg.dtype),
                             flops_per_token=fpt, n_matmul_params=n_matmul,
                             matmul_ceiling_flops=ceiling, torch_matmul_ceiling_flops=ceiling_torch,
                             results=res, ratio_easyrl_over_torch=ratio))
    return res


if __name__ == "__main__":
    main()
