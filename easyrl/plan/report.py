"""The printed plan, the verdict, and the `easyrl plan` command line."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Dict, List, Optional, Tuple

import jax

from easyrl.plan.compiled import compiled_memory
from easyrl.plan.memory import GiB, count
from easyrl.plan.models import ModelInfo
from easyrl.plan.planner import DEFAULT_HEADROOM, Plan, make_plan
from easyrl.plan.suggest import min_devices, setting_flags, suggest
from easyrl.platform_tuning import platform_of

DEFAULT_DEVICE_MEMORY_GIB = 16.0
COMPILE_MAX_PARAMS = 2e9
PLATFORMS = ("cpu", "gpu", "tpu")


def _g(x: Optional[float], unit: float = GiB) -> str:
    return "" if x is None else f"{x / unit:10.3f}"


PHASE_TITLES = {"rollout": "rollout (sampler)", "scoring": "scoring pass",
                "update": "PPO update (one minibatch)", "step": "train step (one micro-batch)"}
# GRPO: the scoring pass and the update run on one micro-batch; the reward model on the rollout
COMMAND_PHASE_TITLES = {"grpo": {"scoring": "scoring pass (one micro-batch)",
                                 "rewards": "reward model (rollout batch)",
                                 "update": "GRPO update (one micro-batch)"}}
COMPILE_UNSUPPORTED = {"grpo": "grpo: --compile not supported yet (it needs the GRPO trainer's "
                               "update function; the analytic plan above stands)"}

# the config keys that size the rollout batch (the sampler's KV cache and prefill)
ROLLOUT_SIZE_KEYS = {
    "ppo": "train.batch_size, ppo.max_prompt_len, ppo.max_new_tokens",
    "grpo": "train.batch_size (prompts) x grpo.num_generations, grpo.max_prompt_len, "
            "grpo.max_new_tokens"}


# rollout.engine=continuous: the rollout phase is the engine's
ENGINE_PHASE_TITLES = {"continuous": {"rollout": "rollout (continuous engine)"}}


def phase_title(command: str, phase: str, engine: str = "static") -> str:
    return (ENGINE_PHASE_TITLES.get(engine, {}).get(phase)
            or COMMAND_PHASE_TITLES.get(command, {}).get(phase) or PHASE_TITLES.get(phase, phase))


def slot_candidates(rows: int, dpf: int) -> List[int]:
    """rollout.slots values the lever search tries, largest first: multiples of dp*fsdp (the
    engine splits its slots over it when they divide) and halvings of the rollout rows."""
    cand = {rows >> k for k in range(rows.bit_length()) if rows >> k} | {
        dpf * k for k in range(1, rows // max(dpf, 1) + 1)}
    return sorted((x for x in cand if 1 <= x <= rows), reverse=True)


def slots_that_fit(planner, plan: Plan) -> Optional[Tuple[int, Plan]]:
    """The most continuous-engine slots (<= the rollout rows) with which the configured setting
    fits, and that plan; None when none does."""
    s = plan.setting
    dpf = s.mesh["dp"] * s.mesh["fsdp"]
    for slots in slot_candidates(planner.rollout_rows(), dpf):
        p = planner.with_rollout("continuous", slots).estimate(s)
        if p.fits:
            return slots, p
    return None


def rollout_lever(planner, plan: Plan, search: bool) -> List[str]:
    """Lines on rollout.engine / rollout.slots when the peak is the rollout (PPO / GRPO): the
    engine's slots size its KV cache without changing the algorithm's batch or its samples.
    `search` (the plan does not fit): also the most slots that fit."""
    if plan.peak_phase != "rollout" or plan.command not in ROLLOUT_SIZE_KEYS:
        return []
    rows = planner.rollout_rows()
    if plan.engine == "continuous":
        kv, pre = plan.line("KV cache (engine slots)"), plan.line("prefix store (engine)")
        out = [f"lever: the peak is the rollout (continuous engine, rollout.slots={plan.slots}): "
               f"rollout.slots sizes the engine's KV cache ({human(kv.per_device)} per device) "
               f"and bounds its prefix store ({human(pre.per_device)}); fewer slots hold less "
               f"and decode fewer rows at once (slower; the samples and the algorithm's batch "
               f"are unchanged)"]
    else:
        out = [f"lever: the peak is the rollout (static sampler: the KV cache of all {rows} "
               f"rows); --config.rollout.engine=continuous --config.rollout.slots=S decodes "
               f"on S slots, refilled as samples finish (the samples and the algorithm's "
               f"batch are unchanged)"]
    if search:
        found = slots_that_fit(planner, plan)
        if found:
            slots, p = found
            out.append(f"  --config.rollout.engine=continuous --config.rollout.slots={slots} "
                       f"fits: peak {human(p.peak)}")
        else:
            out.append("  no rollout.slots fits with this setting")
    return out


def format_plan(plan: Plan, models: Dict[str, ModelInfo], config_spec: str) -> str:
    s = plan.setting
    out = [f"easyrl plan: {plan.command} {config_spec}",
           f"devices: {plan.devices} x {plan.device_memory / GiB:.1f} GiB, mesh {s.mesh_spec()} "
           f"(dp*fsdp={s.mesh['dp'] * s.mesh['fsdp']} batch shards, fsdp*tp="
           f"{s.mesh['fsdp'] * s.mesh['tp']} weight shards)"]
    out.append("models:")
    for role, mi in models.items():
        cfg = mi.config
        out.append(f"  {role:9s} {count(mi.num_params):>7s} params  L={cfg.num_hidden_layers} "
                   f"D={cfg.hidden_size} F={cfg.intermediate_size} H={cfg.num_attention_heads} "
                   f"K={cfg.num_key_value_heads} V={cfg.vocab_size}  {mi.kind}  <- {mi.source}")
        if mi.lora:
            out.append(f"  {'':9s} LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha:g} on "
                       f"{'|'.join(lora_targets(cfg))}: {count(mi.num_trainable)} trainable "
                       f"({'adapters' if mi.kind == 'causal_lm' else 'adapters + score head'}), "
                       f"the rest frozen")
    pm = models["policy"]
    pol = pm.config
    base = f" (frozen base {pm.base_dtype})" if pm.lora and pm.base_dtype else ""
    out.append(f"dtypes: params {pol.param_dtype}{base}, compute {pol.dtype}; remat {s.remat}")
    out.extend(plan.info)
    out.append("")
    unit, u = (GiB, "GiB") if plan.peak >= GiB else (2 ** 20, "MiB")
    out.append(f"{'per-device memory':44s} {u + '/device':>10s} {u + ' total':>10s}  notes")
    phase = None
    for x in plan.lines:
        if x.phase != phase:
            phase = x.phase
            title = ("resident" if phase == "resident"
                     else phase_title(plan.command, phase, plan.engine))
            out.append(f"[{title}]")
        out.append(f"  {x.name:42s} {_g(x.per_device, unit)} {_g(x.total, unit):>10s}  {x.note}")
    out.append("")
    out.append(f"  {'resident (params + optimizer states)':42s} {_g(plan.resident, unit)}")
    for ph, v in plan.phases.items():
        out.append(f"  {'+ ' + phase_title(plan.command, ph, plan.engine):42s} {_g(v, unit)}")
    out.append(f"  {'peak = resident + largest phase':42s} {_g(plan.peak, unit)}  ({plan.peak_phase})")
    return "\n".join(out)


def lora_targets(cfg) -> tuple:
    from easyrl.model.lora import target_names
    return target_names(cfg.lora_targets)


def human(x: float) -> str:
    return f"{x / GiB:.2f} GiB" if x >= GiB / 10 else f"{x / 2 ** 20:.2f} MiB"


def verdict(plan: Plan) -> str:
    mem = (f"peak {human(plan.peak)} per device vs {plan.limit / GiB:.2f} GiB usable "
           f"({plan.device_memory / GiB:.1f} GiB less {plan.headroom:.0%} headroom)")
    if plan.problems:
        return ("verdict: does NOT fit: this setting cannot run: " + "; ".join(plan.problems)
                + f" [memory estimate: {mem}]")
    if plan.fits:
        return f"verdict: FITS: {mem}"
    return f"verdict: does NOT fit: {mem}"


# ---- CLI ------------------------------------------------------------------------------------------
def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="per-device memory plan of a training config (no model allocated)",
        description="Per-device memory for parameters, optimizer state, gradients, activations "
                    "(and for PPO / GRPO the reference / reward / value models and the KV "
                    "cache) of a trainer config on a mesh, and whether it fits. Extra "
                    "--config.KEY=VALUE "
                    "arguments override the config as for the trainers.")
    # what argparse does not know (the --config.KEY=VALUE overrides) reaches args.config_overrides
    # (easyrl.cli), for the trainers' config parser, which rejects anything else
    p.set_defaults(accepts_overrides=True)
    p.add_argument("--config", required=True, help="configs/X.py:PRESET (any trainer config)")
    p.add_argument("--devices", type=int, default=None,
                   help="number of devices (default: the preset's documented hardware, its config "
                        "file's HARDWARE[PRESET], if any, else this machine's jax.device_count())")
    p.add_argument("--device-memory", type=float, default=None,
                   help="GiB per device (default: the documented hardware's when --devices is not "
                        "given, else the local device's memory if known, else 16)")
    p.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                   help="fraction of device memory kept free (default 0.1)")
    p.add_argument("--model-preset", default=None,
                   help="architecture preset when model.path is not available locally")
    p.add_argument("--reward-preset", default=None,
                   help="PPO / GRPO: preset of the reward / value models when their paths are not "
                        "local")
    p.add_argument("--platform", choices=PLATFORMS, default=None,
                   help="backend the run targets (PPO / GRPO: the sampler's decode='auto' "
                        "unrolls its layers, holding a second copy of the decoder weights, on cpu only; "
                        "default without --devices: the preset's documented hardware's, else "
                        "this machine's backend; with --devices: unknown, the copy not counted)")
    p.add_argument("--compile", action="store_true",
                   help=f"also compile the train step and print XLA's memory analysis (models "
                        f"under {COMPILE_MAX_PARAMS / 1e9:g}B parameters)")
    p.add_argument("--no-suggest", action="store_true", help="skip the search for a setting that fits")
    p.set_defaults(func=run)


HARDWARE_KEYS = ("devices", "device_memory_gib", "platform", "name")


def documented_hardware(spec: str) -> Optional[dict]:
    """The hardware the preset of `--config FILE:PRESET` is sized for: the config file's
    module-level `HARDWARE[PRESET]` (devices, device_memory_gib, platform, name), None when the
    file has no entry for it (tiny presets)."""
    import importlib.util
    import inspect
    import os

    from easyrl.train import config as config_module
    path, _, preset = spec.partition(":")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(config_module.__file__))))
    found = next((p for p in (path, os.path.join(root, path)) if os.path.isfile(p)), None)
    if found is None:
        return None
    mod_spec = importlib.util.spec_from_file_location(f"easyrl_hardware_{abs(hash(found))}", found)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    table = getattr(mod, "HARDWARE", None)
    if not isinstance(table, dict):
        return None
    if not preset:  # get_config's default preset
        param = inspect.signature(mod.get_config).parameters.get("preset")
        preset = param.default if param is not None else ""
    hw = table.get(preset)
    if hw is None:
        return None
    missing = [k for k in HARDWARE_KEYS if k not in hw]
    if missing:
        raise ValueError(f"{found}: HARDWARE[{preset!r}] lacks {', '.join(missing)}")
    return dict(hw)


def target_platform(args: argparse.Namespace,
                    hardware: Optional[dict] = None) -> Tuple[Optional[str], str]:
    """(platform, why) of the run being planned: --platform; else, with no --devices, the
    preset's documented hardware's, else (the plan is of this machine's devices) this machine's
    backend; else (None, ''): unknown."""
    if args.platform:
        return args.platform, "--platform"
    if args.devices is None and hardware:
        return hardware["platform"], f"{hardware['name']}, the preset's documented hardware"
    if args.devices is None:
        return platform_of(), "this machine's backend; --devices not given"
    return None, ""


def local_device_memory() -> Optional[float]:
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"])
    return None


def load_config(spec: str, overrides: List[str]):
    """The trainer config from `--config FILE:PRESET` + overrides (errors name the key), parsed
    as the trainers parse theirs."""
    from easyrl.train.launch import parse_config
    return parse_config(None, ["--config", spec, *overrides])


def run(args: argparse.Namespace) -> None:
    c = load_config(args.config, args.config_overrides)
    # no --devices: the hardware the preset documents (its config file's HARDWARE), if any
    hw = documented_hardware(args.config) if args.devices is None else None
    devices = args.devices or (hw["devices"] if hw else jax.device_count())
    mem = args.device_memory
    mem_note = ""
    if mem is None and hw:
        mem = float(hw["device_memory_gib"])
    elif mem is None:
        local = local_device_memory()
        mem = local / GiB if local else DEFAULT_DEVICE_MEMORY_GIB
        mem_note = " (local device)" if local else " (default; pass --device-memory)"
    platform, why = target_platform(args, hw)
    planner, plan = make_plan(c, devices, mem, headroom=args.headroom,
                              model_preset=args.model_preset, reward_preset=args.reward_preset,
                              platform=platform, platform_source=why)
    if hw:
        print(f"hardware: {hw['name']} ({hw['devices']} x {hw['device_memory_gib']:g} GiB, "
              f"{hw['platform']}), the preset's documented hardware (HARDWARE in its config "
              f"file; --devices / --device-memory / --platform plan other hardware)")
    print(format_plan(plan, planner.models, args.config) + ("" if not mem_note else
                                                             f"\n  device memory {mem:.1f} GiB{mem_note}"))
    print(verdict(plan))
    for line in rollout_lever(planner, plan, search=not plan.fits and not args.no_suggest):
        print(line)
    if not plan.fits and not args.no_suggest:
        cur = planner.current()
        sugg = suggest(planner)
        B = int(c.train.batch_size)
        if sugg:
            print(f"settings that fit on {devices} devices (peak per device; best first):")
            for p in sugg:
                print(f"  {setting_flags(p, cur, plan.command, B):70s} peak {human(p.peak)}")
        else:
            found = min_devices(c, planner.models, planner.device_memory, args.headroom, devices,
                                platform=planner.platform)
            if found:
                n, p = found
                flags = setting_flags(p, dataclasses.replace(cur, mesh={}), plan.command, B)
                print(f"no mesh / micro-batch / remat setting fits on {devices} devices; the "
                      f"smallest power-of-two multiple that fits: --devices {n} {flags} "
                      f"(peak {human(p.peak)})")
            else:
                print(f"nothing fits on up to 65536 devices of {mem:.1f} GiB")
            pm = planner.models["policy"]
            if pm.lora:
                if not pm.base_dtype:
                    print("  other levers: model.lora.base_dtype=bfloat16 halves the frozen base")
            else:
                print("  other levers: model.param_dtype=bfloat16 halves parameters, gradients and "
                      "optimizer state (numerics change); model.lora.rank=8 trains adapters only "
                      "(no optimizer state or gradients for the base)")
            if plan.peak_phase == "rollout" and plan.command in ROLLOUT_SIZE_KEYS:
                print(f"  the peak is the rollout ({'engine' if plan.engine == 'continuous' else 'sampler'}): "
                      f"its KV cache and prefill grow with "
                      f"the rollout batch x (prompt + response tokens), set by "
                      f"{ROLLOUT_SIZE_KEYS[plan.command]} (changing them changes the "
                      f"algorithm's batch), not by mesh / micro-batch / remat; and with "
                      f"rollout.slots (rollout.engine=continuous, above)")
    if args.compile:
        n = planner.models["policy"].num_params
        if plan.command in COMPILE_UNSUPPORTED:
            print(COMPILE_UNSUPPORTED[plan.command])
        elif n >= COMPILE_MAX_PARAMS:
            print(f"--compile: skipped ({n / 1e9:.1f}B parameters; compiling needs < "
                  f"{COMPILE_MAX_PARAMS / 1e9:g}B on this machine)")
        else:
            r = compiled_memory(planner, plan.setting)
            if not r["available"]:
                print(f"compiled {r['what']}: memory analysis not available on this backend")
            else:
                phase = "update" if plan.command == "ppo" else "step"
                whole = lambda x: x.total if r["unsharded"] and x.total is not None else x.per_device  # noqa: E731
                est = sum(whole(x) for x in plan.lines if x.phase == phase)
                args_est = sum(whole(x) for x in plan.lines if x.phase == "resident" and not (
                    plan.command == "ppo" and x.name.startswith(("reference", "reward"))))
                print(f"compiled {r['what']} on {r['where']}:")
                print(f"  XLA memory analysis: arguments {r['argument'] / GiB:.3f} GiB, outputs "
                      f"{r['output'] / GiB:.3f} GiB, aliased {r['alias'] / GiB:.3f} GiB, temporaries "
                      f"{r['temp'] / GiB:.3f} GiB, code {r['code'] / 2**20:.1f} MiB; peak "
                      f"{r['peak'] / GiB:.3f} GiB")
                print(f"  estimate (same inputs): arguments {args_est / GiB:.3f} GiB, temporaries "
                      f"(gradients + activations) {est / GiB:.3f} GiB, peak "
                      f"{(args_est + est) / GiB:.3f} GiB")

