"""One GRPO iteration split into rollout, host rewards, scoring and update, with easyrl's GRPO.

    python benchmarks/grpo_iteration.py --preset tiny --batch 8 --group 8 --prompt 32 --new 32 \
        --iters 5 --out benchmarks/results/grpo_tiny.json
    python benchmarks/grpo_iteration.py --preset bench_100m --batch 2 --group 8 --prompt 64 \
        --new 64 --iters 3 --out benchmarks/results/grpo_bench_100m.json
    ... --beta 0     # no reference model held, no scoring pass (only the advantages)
    ... --engine continuous [--slots N]   # the rollout through easyrl.engine.Engine

Random-init policy of the preset's shape (and, with beta > 0, a reference: a copy of it), placed
on a `dp:1,fsdp:-1,tp:1` mesh over the available devices (1 CPU device unless XLA_FLAGS says
otherwise) as `easyrl grpo` places it; --batch random prompts [B, P] (no data), each repeated
G = --group times (`rl_loop.expand`), so an iteration has B x G completions; the grpo section of
`configs/grpo.py:gsm8k_rlvr` at these lengths (advantage grpo with group-scaled rewards, loss
grpo, beta 0.04, 1 iteration x 1 minibatch: on policy, so the update's own log-probs, detached,
are the old ones and no old-log-prob pass runs; micro-batches of --micro prompts x G completions,
as train.micro_batch_size), temperature 1.0, and its optimizer (lr 1e-6, constant). The
iteration is the one `easyrl grpo` runs: `easyrl.train.rl_loop.iterate` over
`easyrl.algorithms.grpo.make_iteration`:
  rollout = `make_sampler` (temperature 1.0, EOS disabled so every response has --new tokens),
            on the expanded prompts [B x G, P] (--engine static), or, with --engine continuous,
            the continuous-batching engine as `easyrl grpo` builds it with
            rollout.engine=continuous: `easyrl.engine.Engine` with --slots decode slots (0 = one
            per completion, as rollout.slots=0) wrapped by `rollout.engine_sampler(eng, G)`, fed
            the UNexpanded prompts [B, P] (`iterate(shared=G)`: each prompt prefilled once, its
            cache copied to its G slots); EOS disabled the same way (eos_token_id=()), so the
            two rows are comparable (every sample runs to --new tokens: no slot frees early),
  rewards = `rl_loop.HostRewards` on the host: the completions decoded and rewarded by the
            built-in `length_penalty` reward function (needs no tokenizer semantics). The bundled
            synthetic tokenizer has 160 ids, fewer than either preset's vocabulary (tiny 256,
            bench_100m 32000), so a stub tokenizer decodes ids as " ".join(map(str, ids)) (the
            synthetic one is used for a preset whose vocabulary fits in it),
            With EOS off every completion has --new tokens, so every reward is -1, each group's
            rewards are equal and the advantages 0 (the loss is the KL term alone): the work
            done is the same whatever the rewards,
  scoring = jitted `score` (the reference's log-probs, in --micro-prompt chunks; nothing when
            beta = 0) + jitted group advantages,
  update  = jitted `make_update` (one optimizer step accumulated over the micro-batches, state
            donated).
Iteration 0 (compilation) is reported separately; the split is the median over the others.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

PHASES = (("rollout", "time/rollout"), ("rewards", "time/rewards"), ("scoring", "time/score"),
          ("update", "time/update"))


class StubTokenizer:
    """Just what `HostRewards` needs: decode(ids) -> the ids as text."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def reward_tokenizer(vocab_size: int):
    """(tokenizer, name): the bundled synthetic tokenizer when the preset's ids fit in it."""
    from easyrl.data.synthetic import synthetic_tokenizer_path
    from easyrl.data.tokenizer import load_tokenizer
    tok = load_tokenizer(synthetic_tokenizer_path())
    if vocab_size <= len(tok):
        return tok, "synthetic"
    return StubTokenizer(), f"stub (synthetic tokenizer has {len(tok)} ids < vocab {vocab_size})"


def ppo_comparison(preset: str) -> str:
    """One line per saved PPO iteration result of this preset (benchmarks/results/ppo_*.json)."""
    lines = []
    for p in sorted(glob.glob(os.path.join(C.ROOT, "benchmarks", "results", "ppo_*.json"))):
        try:
            with open(p) as f:
                d = json.load(f)
        except (OSError, ValueError):
            continue
        if d.get("args", {}).get("preset") != preset:
            continue
        r, a = d["results"], d["args"]
        split = ", ".join(f"{k} {v['s']:.3f} s" for k, v in r.items())
        where = d.get("machine", {}).get("host_cpu")
        other = f" (on {where})" if where != C.cpu_model() else ""
        lines.append(f"PPO ({os.path.basename(p)}): {a['batch']} rows x {a['new']} new tokens, "
                     f"4 models: {split}; total {d['total_s']:.3f} s{other}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8, help="prompts per iteration")
    ap.add_argument("--group", type=int, default=8, help="G: completions per prompt")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--beta", type=float, default=None,
                    help="KL coefficient (default: gsm8k_rlvr's 0.04; 0: no reference model)")
    ap.add_argument("--micro", type=int, default=1,
                    help="prompts per micro-batch (train.micro_batch_size; 0: the whole batch)")
    ap.add_argument("--iters", type=int, default=5, help="iterations (the first compiles)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--remat", default="dots", help="remat policy of the update")
    ap.add_argument("--engine", default="static", choices=["static", "continuous"],
                    help="rollout: make_sampler (static) or easyrl.engine.Engine (continuous)")
    ap.add_argument("--slots", type=int, default=0,
                    help="the engine's decode slots (0: one per completion, as rollout.slots=0)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    from easyrl import model as M
    from easyrl import parallel, rewards, rollout
    from easyrl.algorithms.grpo import make_iteration, micro_rows, needs_old, needs_ref
    from easyrl.generate import make_sampler
    from easyrl.train.config import load_config_file
    from easyrl.train.optim import make_optimizer
    from easyrl.train.rl_loop import HostRewards, expand, iterate
    from easyrl.train.step import TrainState

    info = C.machine_info()
    print(C.banner(info), flush=True)
    mesh = parallel.create_mesh("dp:1,fsdp:-1,tp:1")
    cfg = M.get_preset(a.preset, dtype=a.dtype, remat=a.remat)
    c = load_config_file("configs/grpo.py:gsm8k_rlvr")  # DeepSeekMath's GRPO settings
    g = c.grpo
    g.update(max_prompt_len=a.prompt, max_new_tokens=a.new, temperature=1.0,
             num_generations=a.group)
    if a.beta is not None:
        g.beta = a.beta
    c.train.update(batch_size=a.batch, micro_batch_size=a.micro)
    rows = a.batch * a.group
    micro = micro_rows(c)
    if rows // g.num_minibatches % micro:
        ap.error(f"--micro {a.micro} prompts must divide a minibatch of "
                 f"{a.batch // g.num_minibatches} prompts")
    n_micro, score_chunks = rows // g.num_minibatches // micro, rows // micro  # as grpo.build

    policy = parallel.shard_params(M.init_params(cfg, jax.random.PRNGKey(0), "causal_lm"), mesh)
    # own buffers (the state is donated)
    ref = jax.tree.map(jnp.copy, policy) if needs_ref(g) else None
    n_updates = a.iters * g.num_iterations * g.num_minibatches
    tx, _ = make_optimizer(c.optim, n_updates)
    repl = parallel.replicated(mesh)
    opt_sh = parallel.named_shardings(jax.eval_shape(tx.init, policy), mesh)
    z = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (each its own buffer)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(policy)
    state = TrainState(step=z(), params=policy, opt_state=opt_state, nonfinite=z(), streak=z())
    state_sh = TrainState(step=repl, params=jax.tree.map(lambda x: x.sharding, policy),
                          opt_state=opt_sh, nonfinite=repl, streak=repl)
    state = jax.device_put(state, state_sh)

    tok, tok_name = reward_tokenizer(cfg.vocab_size)
    rs_fn = rewards.load_reward_functions("length_penalty",
                                          context={"max_completion_length": int(a.new)})
    hr = HostRewards(rs_fn, tok, mesh, missing_eos_penalty=float(g.missing_eos_penalty))
    # EOS disabled: every response has --new tokens
    if a.engine == "continuous":  # as rl_loop.run with rollout.engine=continuous
        from easyrl.engine import Engine
        eng = Engine(cfg, slots=a.slots or rows, max_prompt_len=a.prompt, max_new_tokens=a.new,
                     temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, eos_token_id=(),
                     pad_token_id=0, mesh=mesh)
        sampler = rollout.engine_sampler(eng, a.group)
        shared = a.group  # prompts go in unexpanded; the engine prefills each once
    else:
        eng = None
        sampler = make_sampler(cfg, max_new_tokens=a.new, temperature=g.temperature,
                               top_k=g.top_k, top_p=g.top_p, eos_token_id=(), pad_token_id=0,
                               mesh=mesh)
        shared = 1
    it = make_iteration(dict(policy=cfg, ref=cfg), g, tx, host_rewards=hr, state_sharding=state_sh,
                        mesh=mesh, n_micro=n_micro, score_chunks=score_chunks)
    frozen = dict(ref=ref, ref_adapters=None, reward=None)
    ctrl = {"num_tokens": 0.0}

    rs = np.random.RandomState(0)
    times = []
    for i in range(a.iters):
        ids = rs.randint(3, cfg.vocab_size, size=(a.batch, a.prompt)).astype(np.int32)
        batch = dict(input_ids=ids, attention_mask=np.ones_like(ids))
        host = dict(prompts=[f"prompt {i}.{j}" for j in range(a.batch)], columns={})
        expanded, host = expand(batch, host, a.group)  # the host info always per completion
        if shared == 1:  # as rl_loop._Loop._next
            batch = expanded
        prompts = parallel.to_global_batch(batch, mesh)
        state, m, _, _ = iterate(it, sampler, state, frozen, prompts, jax.random.PRNGKey(i), ctrl,
                                 host=host, shared=shared)
        ctrl = dict(ctrl, num_tokens=ctrl["num_tokens"] + m.get("num_tokens_iter", 0.0))
        times.append(tuple(m[k] for _, k in PHASES))
        kl = f", kl {m['kl']:.2e}" if "kl" in m else ""
        print(f"  iter {i}: " + " ".join(f"{n} {t:.2f}s" for (n, _), t in zip(PHASES, times[-1]))
              + f" (reward {m['reward']:.3f}, loss {m['loss']:.2e}{kl}, "
              f"mean length {m['completions/mean_length']:.0f})", flush=True)
    steady = times[1:] or times
    names = [n for n, _ in PHASES]
    med = [C.median([t[i] for t in steady]) for i in range(len(names))]
    total = sum(med)
    table = [[n, f"{s:.3f}", f"{100 * s / total:.0f}%", f"{t0:.2f}"]
             for n, s, t0 in zip(names, med, times[0])]
    table.append(["total", f"{total:.3f}", "100%", f"{sum(times[0]):.2f}"])
    tok_n = rows * a.new
    models = 2 if needs_ref(g) else 1
    print(f"\nGRPO iteration: {a.preset} ({cfg.num_params / 1e6:.1f}M params x {models} "
          f"model(s)), {a.batch} prompts x G {a.group} = {rows} completions, prompt {a.prompt}, "
          f"{a.new} new tokens, beta {g.beta}, loss {g.loss_type}, {n_micro} micro-batch(es) of "
          f"{micro}, {a.dtype}, remat={cfg.remat}, rewards: length_penalty, tokenizer "
          f"{tok_name}, rollout: "
          + (f"engine continuous ({eng.slots} slots)" if eng is not None else "static sampler")
          + f", median of {len(steady)} iterations")
    print(C.table(table, ["phase", "s (median)", "share", "iter 0 s (compile)"]))
    print(f"completions/s over the whole iteration: {rows / total:.1f}; response tokens/s: "
          f"{tok_n / total:.0f}")
    cmp = ppo_comparison(a.preset)
    if cmp:
        print(cmp)
    print(f"load average start {info['loadavg_start']} end {C.loadavg()}")
    C.write_json(a.out, dict(
        benchmark="grpo_iteration", machine=info, args=vars(a), params_per_model=cfg.num_params,
        models=models, completions=rows, beta=float(g.beta), loss_type=g.loss_type,
        advantage=g.advantage, old_logprob_pass=needs_old(g), n_micro=n_micro,
        micro_rows=micro, score_chunks=score_chunks, reward_functions="length_penalty",
        tokenizer=tok_name, steady_iterations=len(steady), engine=a.engine,
        slots=None if eng is None else eng.slots,
        engine_stats=None if eng is None else dict(eng.stats),
        results={n: dict(s=s, share=s / total, s_all=[t[i] for t in times],
                         first_iteration_s=times[0][i])
                 for i, (n, s) in enumerate(zip(names, med))},
        total_s=total, first_iteration_s=sum(times[0]), completions_per_s=rows / total,
        response_tokens_per_s=tok_n / total))


if __name__ == "__main__":
    main()
