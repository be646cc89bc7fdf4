"""One PPO iteration split into rollout, scoring and update, with easyrl's PPO pieces.

    python benchmarks/ppo_iteration.py --preset tiny --batch 16 --prompt 32 --new 32 --iters 6 \
        --out benchmarks/results/ppo_tiny.json
    python benchmarks/ppo_iteration.py --preset bench_100m --batch 8 --prompt 64 --new 64 --iters 3 \
        --out benchmarks/results/ppo_bench_100m.json
    ... --engine continuous [--slots N]   # the rollout through easyrl.engine.Engine

Random-init policy, reference (a copy of the policy), value and reward models of the preset's
shape; random prompts (no data); the PPO settings of `configs/ppo.py:tulu25_13b` at these
lengths. The iteration is the one `easyrl ppo` runs: `easyrl.train.rl_loop.iterate` over
`easyrl.algorithms.ppo.make_iteration`:
  rollout = `make_sampler` (temperature 0.7, EOS disabled so every response has --new tokens),
            or, with --engine continuous, the continuous-batching engine as `easyrl ppo` builds
            it with rollout.engine=continuous (`easyrl.engine.Engine` with --slots decode slots,
            0 = one per rollout row as rollout.slots=0, wrapped by `rollout.engine_sampler`;
            EOS disabled the same way, eos_token_id=(), so the two rows are comparable: with
            every response --new tokens long no slot frees early, so continuous batching has
            nothing to refill),
  scoring = jitted `score_rollout` (ONE pass: old/ref log-probs, values, reward score, entropy)
            + jitted advantages (KL-penalised rewards, GAE, whitening),
  update  = jitted `make_update` (ppo_epochs x minibatches of clipped policy + value updates,
            state donated).
Iteration 0 (compilation) is reported separately; the split is the median over the others.
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1, help="ppo_epochs")
    ap.add_argument("--minibatches", type=int, default=2)
    ap.add_argument("--iters", type=int, default=4, help="iterations (the first compiles)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--remat", default="dots", help="remat policy of the policy / value updates")
    ap.add_argument("--engine", default="static", choices=["static", "continuous"],
                    help="rollout: make_sampler (static) or easyrl.engine.Engine (continuous)")
    ap.add_argument("--slots", type=int, default=0,
                    help="the engine's decode slots (0: one per rollout row, as rollout.slots=0)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    from easyrl import model as M
    from easyrl import rollout
    from easyrl.algorithms.ppo import PPOState, make_iteration
    from easyrl.generate import make_sampler
    from easyrl.train.config import load_config_file
    from easyrl.train.optim import make_optimizer
    from easyrl.train.rl_loop import iterate

    info = C.machine_info()
    print(C.banner(info), flush=True)
    cfg = M.get_preset(a.preset, dtype=a.dtype, remat=a.remat)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    policy = M.init_params(cfg, keys[0], "causal_lm")
    ref = jax.tree.map(jnp.copy, policy)  # own buffers: the policy is donated
    value = M.init_params(cfg, keys[1], "value")
    reward = M.init_params(cfg, keys[2], "reward")
    c = load_config_file("configs/ppo.py:tulu25_13b")  # Tulu 2.5's PPO settings at this shape
    c.optim.update(lr=1e-6, schedule="linear", warmup=0.1)
    p = c.ppo
    p.update(max_prompt_len=a.prompt, max_new_tokens=a.new, temperature=0.7, kl_coef=0.05,
             ppo_epochs=a.epochs, num_minibatches=a.minibatches, missing_eos_penalty=0.0)
    n_updates = a.iters * a.epochs * a.minibatches
    policy_tx, _ = make_optimizer(c.optim, n_updates)
    value_tx, _ = make_optimizer(c.optim, n_updates)
    state = PPOState(step=jnp.zeros((), jnp.int32), policy=policy, value=value,
                     policy_opt=policy_tx.init(policy), value_opt=value_tx.init(value))
    state = jax.tree.map(jnp.copy, state)  # distinct buffers everywhere (donated)

    # EOS disabled: every response has --new tokens
    if a.engine == "continuous":  # as rl_loop.run with rollout.engine=continuous (G = 1)
        from easyrl.engine import Engine
        eng = Engine(cfg, slots=a.slots or a.batch, max_prompt_len=a.prompt, max_new_tokens=a.new,
                     temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, eos_token_id=(),
                     pad_token_id=0)
        sampler = rollout.engine_sampler(eng, 1)
    else:
        eng = None
        sampler = make_sampler(cfg, max_new_tokens=a.new, temperature=p.temperature,
                               top_k=p.top_k, top_p=p.top_p, eos_token_id=(), pad_token_id=0)
    it = make_iteration(dict(policy=cfg, ref=cfg, value=cfg, reward=cfg), p, policy_tx, value_tx)
    frozen = dict(ref=ref, reward=reward)

    rs = np.random.RandomState(0)
    times = []
    for i in range(a.iters):
        ids = jnp.asarray(rs.randint(3, cfg.vocab_size, size=(a.batch, a.prompt)), jnp.int32)
        prompts = dict(input_ids=ids, attention_mask=jnp.ones_like(ids))
        state, m, _, _ = iterate(it, sampler, state, frozen, prompts, jax.random.PRNGKey(i),
                                 dict(kl_coef=p.kl_coef))
        times.append((m["time/rollout"], m["time/score"], m["time/update"]))
        print(f"  iter {i}: rollout {times[-1][0]:.2f}s score {times[-1][1]:.2f}s update "
              f"{times[-1][2]:.2f}s (approxkl_first {m['policy/approxkl_first']:.2e})", flush=True)
    steady = times[1:] or times
    med = [C.median([t[i] for t in steady]) for i in range(3)]
    total = sum(med)
    names = ("rollout", "scoring", "update")
    rows = [[n, f"{m:.3f}", f"{100 * m / total:.0f}%", f"{t0:.2f}"]
            for n, m, t0 in zip(names, med, times[0])]
    rows.append(["total", f"{total:.3f}", "100%", f"{sum(times[0]):.2f}"])
    tok = a.batch * a.new
    where = (f"engine continuous ({eng.slots} slots)" if eng is not None
             else "static sampler")
    print(f"\nPPO iteration: {a.preset} ({cfg.num_params / 1e6:.1f}M params x 4 models), batch "
          f"{a.batch}, prompt {a.prompt}, {a.new} new tokens, {a.epochs} epoch(s) x "
          f"{a.minibatches} minibatches, {a.dtype}, remat={cfg.remat}, rollout: {where}, "
          f"median of {len(steady)} iterations")
    print(C.table(rows, ["phase", "s (median)", "share", "iter 0 s (compile)"]))
    print(f"response tokens/s over the whole iteration: {tok / total:.0f}")
    print(f"load average start {info['loadavg_start']} end {C.loadavg()}")
    C.write_json(a.out, dict(benchmark="ppo_iteration", machine=info, args=vars(a),
                             params_per_model=cfg.num_params, steady_iterations=len(steady),
                             engine=a.engine, slots=None if eng is None else eng.slots,
                             engine_stats=None if eng is None else dict(eng.stats),
                             results={n: dict(s=m, share=m / total, s_all=[t[i] for t in times],
                                              first_iteration_s=times[0][i])
                                      for i, (n, m) in enumerate(zip(names, med))},
                             total_s=total, first_iteration_s=sum(times[0]),
                             response_tokens_per_s=tok / total))


if __name__ == "__main__":
    main()
