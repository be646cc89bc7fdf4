"""`--compile`: lower and compile the real train step / PPO update with abstract inputs and read
XLA's memory analysis."""
from __future__ import annotations

import jax
import numpy as np

from easyrl.algorithms import registry
from easyrl.train.run import total_steps
from easyrl.plan.planner import Planner, Setting


def compiled_memory(planner: Planner, s: Setting) -> dict:
    """Lower and compile the real train step (or PPO update) with abstract inputs and return
    XLA's memory analysis (bytes per device). On this machine's devices when `--devices` of them
    exist (sharded as the trainer shards), else on one device with the per-device micro-batch
    (parameters then count whole)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from easyrl import parallel
    from easyrl.train.optim import make_optimizer
    c, command = planner.c, planner.command
    if command == "grpo":  # the GRPO trainer's update function is not available to lower
        raise NotImplementedError("grpo: --compile not supported yet")
    local = jax.device_count()
    dpf = s.mesh["dp"] * s.mesh["fsdp"]
    if planner.devices <= local:
        mesh = parallel.create_mesh(s.mesh_spec(), devices=jax.devices()[:planner.devices])
        scale, where = 1, f"{planner.devices} local device(s), mesh {s.mesh_spec()}"
    else:
        mesh = parallel.create_mesh("dp:1,fsdp:1,tp:1", devices=jax.devices()[:1])
        scale, where = dpf, ("1 device with the per-device micro-batch (parameters, optimizer "
                             "state and gradients unsharded)")
    repl = NamedSharding(mesh, P())
    shard = lambda t: parallel.named_shardings(t, mesh)  # noqa: E731
    pol = planner.models["policy"]
    pcfg = pol.config.replace(remat=s.remat)
    abstract = lambda t, sh: jax.tree.map(  # noqa: E731
        lambda x, y: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=y), t, sh)
    # no mesh context: as the trainers (easyrl.train.loop / easyrl.train.rl_loop) compile
    if command == "ppo":
        from easyrl.algorithms.ppo import PPOState, make_update
        p = c.ppo
        val = planner.models["value"]
        vcfg = val.config.replace(remat=s.remat)
        ptx, _ = make_optimizer(c.optim, total_steps(c) or 1)
        vtx, _ = make_optimizer(c.value_optim, total_steps(c) or 1)
        state = PPOState(step=jax.ShapeDtypeStruct((), np.int32), policy=pol.params,
                         value=val.params, policy_opt=pol.opt_state, value_opt=val.opt_state)
        sh = PPOState(step=repl, policy=shard(pol.params), value=shard(val.params),
                      policy_opt=shard(pol.opt_state), value_opt=shard(val.opt_state))
        B = max(int(c.train.batch_size) // scale, 1)
        Sq, N = int(p.max_prompt_len) + int(p.max_new_tokens), int(p.max_new_tokens)
        nm = max(int(c.train.batch_size) // s.micro, 1)
        f32, i32 = np.float32, np.int32
        roll = {"tokens": (Sq, i32), "attn": (Sq, i32), "resp_mask": (N, i32),
                "logprobs": (N, f32), "values": (N, f32), "advantages": (N, f32),
                "returns": (N, f32)}
        roll = {k: jax.ShapeDtypeStruct((B, n), d) for k, (n, d) in roll.items()}
        roll_sh = {k: parallel.batch_sharding(mesh, 2) for k in roll}
        fn = make_update(pcfg, vcfg, ptx, vtx, prompt_len=int(p.max_prompt_len),
                         temperature=float(p.temperature), ppo_epochs=1,
                         num_minibatches=nm, cliprange=p.cliprange,
                         cliprange_value=p.cliprange_value, vf_coef=p.vf_coef,
                         policy_mask=pol.mask, value_mask=val.mask)
        jitted = jax.jit(fn, in_shardings=(sh, roll_sh, repl), out_shardings=(sh, repl),
                         donate_argnums=(0,))
        args = (abstract(state, sh), roll, jax.ShapeDtypeStruct((2,), np.uint32))
        what = "PPO update (1 epoch)"
    else:
        from easyrl.train.step import TrainState, make_train_step
        tx, schedule = make_optimizer(c.optim, total_steps(c) or 1)
        adapters_off = pol.lora and planner.live_reference  # LoRA: reference = adapters off
        algo = registry.get(command)
        if algo.batch_spec is None:
            raise ValueError(f"--compile: trainer {command!r} has no batch_spec in its registry record")
        loss_fn, denom_fn = algo.make_loss(c, pcfg, adapters_off), algo.denom
        B = int(c.train.batch_size)
        micro_steps = max(B // s.micro, 1)
        rows = max(B // scale, 1)
        if scale > 1:  # per-device equivalent: the per-device share of the global batch
            micro_steps = max(min(micro_steps, rows), 1)
        batch = algo.batch_spec(c, rows)
        frozen = planner.models["reference"].params if "reference" in planner.models else None
        z = jax.ShapeDtypeStruct((), np.int32)
        state = TrainState(step=z, params=pol.params, opt_state=pol.opt_state, nonfinite=z,
                           streak=z, frozen=frozen)
        sh = TrainState(step=repl, params=shard(pol.params), opt_state=shard(pol.opt_state),
                        nonfinite=repl, streak=repl,
                        frozen=None if frozen is None else shard(frozen))
        batch_sh = {k: parallel.batch_sharding(mesh, len(v.shape)) for k, v in batch.items()}
        fn = make_train_step(loss_fn, tx, schedule, denom_fn, micro_steps, pol.mask)
        jitted = jax.jit(fn, in_shardings=(sh, batch_sh, repl), out_shardings=(sh, repl),
                         donate_argnums=(0,))
        args = (abstract(state, sh), batch, jax.ShapeDtypeStruct((2,), np.uint32))
        what = f"train step ({micro_steps} micro-steps)"
    compiled = jitted.lower(*args).compile()
    ma = compiled.memory_analysis()
    if ma is None:
        return dict(what=what, where=where, available=False, unsharded=scale > 1)
    get = lambda k: int(getattr(ma, k, 0) or 0)  # noqa: E731
    out = dict(what=what, where=where, available=True, unsharded=scale > 1,
               argument=get("argument_size_in_bytes"), output=get("output_size_in_bytes"),
               alias=get("alias_size_in_bytes"), temp=get("temp_size_in_bytes"),
               code=get("generated_code_size_in_bytes"))
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out

