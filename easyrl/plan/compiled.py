"""`--compile`: lower and compile the real train step / PPO update with abstract inputs and read
XLA's memory analysis."""
from __future__ import annotations

import jax
import numpy as np

from easyrl.plan.models import total_steps
from easyrl.plan.planner import RRHF_DEFAULT_RESPONSES, Planner, Setting


def _abstract_batch(c, command: str, rows: int):
    """ShapeDtypeStructs of one global batch as the trainers' iterators produce it."""
    S = jax.ShapeDtypeStruct
    i32, f32 = np.int32, np.float32
    T = int(c.train.seq_len)
    if command == "sft":
        keys = ["input_ids", "attention_mask", "loss_mask"] + (
            ["positions", "segment_ids"] if c.data.packing else [])
        return {k: S((rows, T), i32) for k in keys}
    if command in ("rm", "dpo"):
        b = {f"{side}_{k}": S((rows, T), i32) for side in ("chosen", "rejected")
             for k in ("input_ids", "attention_mask", "loss_mask")}
        if command == "rm" and c.rm.use_margin:
            b["margin"] = S((rows,), f32)
        if command == "dpo" and c.dpo.precompute_ref and not c.dpo.reference_free:
            b.update(ref_chosen_logps=S((rows,), f32), ref_rejected_logps=S((rows,), f32))
        return b
    if command == "rrhf":
        n = int(c.rrhf.num_responses) or RRHF_DEFAULT_RESPONSES
        b = {k: S((rows, n, T), i32) for k in ("input_ids", "attention_mask", "loss_mask")}
        b.update(valid=S((rows, n), i32), scores=S((rows, n), f32))
        return b
    raise ValueError(f"--compile: no abstract batch for command {command!r}")


def _loss_and_denom(c, command: str, cfg, adapters_off_reference: bool = False):
    import importlib
    mod = importlib.import_module(f"easyrl.algorithms.{command}")
    if command == "sft":
        return mod.make_loss(cfg), mod.denom
    if command == "rm":
        return mod.make_loss(cfg, c.rm.use_margin), mod.denom
    if command == "dpo":
        from easyrl.algorithms import rm
        return mod.make_loss(cfg, c.dpo, adapters_off_reference), rm.denom
    if command == "rrhf":
        return mod.make_loss(cfg, c.rrhf), mod.denom
    raise ValueError(command)


def compiled_memory(planner: Planner, s: Setting) -> dict:
    """Lower and compile the real train step (or PPO update) with abstract inputs and return
    XLA's memory analysis (bytes per device). On this machine's devices when `--devices` of them
    exist (sharded as the trainer shards), else on one device with the per-device micro-batch
    (parameters then count whole)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from easyrl import parallel
    from easyrl.train.optim import make_optimizer
    c, command = planner.c, planner.command
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
    # no mesh context: as the trainers (loop.run / ppo_loop.run) compile
    if command == "ppo":
        from easyrl.algorithms.ppo import PPOState, make_update
        p = c.ppo
        val = planner.models["value"]
        vcfg = val.config.replace(remat=s.remat)
        ptx, _ = make_optimizer(c.optim, total_steps(c))
        vtx, _ = make_optimizer(c.value_optim, total_steps(c))
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
        tx, schedule = make_optimizer(c.optim, total_steps(c))
        adapters_off = pol.lora and planner.live_reference  # LoRA: reference = adapters off
        loss_fn, denom_fn = _loss_and_denom(c, command, pcfg, adapters_off)
        B = int(c.train.batch_size)
        micro_steps = max(B // s.micro, 1)
        rows = max(B // scale, 1)
        if scale > 1:  # per-device equivalent: the per-device share of the global batch
            micro_steps = max(min(micro_steps, rows), 1)
        batch = _abstract_batch(c, command, rows)
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

