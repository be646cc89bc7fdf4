"""easyrl checkpoints on orbax.

One layout for converted models and training runs alike:

    <dir>/easyrl_config.json          model config (runtime options included) + "kind"
    <dir>/checkpoints/<step>/params   orbax pytree of the parameters
    <dir>/checkpoints/<step>/...      training items (optimizer state, data position, ...)

`--ckpt` arguments take `<dir>` (the latest step is used) or `<dir>/checkpoints/<step>`.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from easyrl import model as M
from easyrl.model.config import LlamaConfig
from easyrl.parallel import PARTITION_RULES, named_shardings

CONFIG_FILE = "easyrl_config.json"
CKPT_SUBDIR = "checkpoints"


def write_model_config(run_dir: str, config: LlamaConfig, kind: str, **extra) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(run_dir, exist_ok=True)
    write_json_atomic(os.path.join(run_dir, CONFIG_FILE),
                      {"kind": kind, "model": config.to_json_dict(), **extra})


def write_json_atomic(path: str, obj) -> None:
    """Write `obj` as JSON to `path` through a temporary file and a rename: a reader (or a rerun
    after a kill) sees the old file or the new one, never a torn one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_model_config(run_dir: str) -> Tuple[LlamaConfig, str, dict]:
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing (not an easyrl checkpoint or run directory)")
    try:
        with open(path) as f:
            d = json.load(f)
        return LlamaConfig.from_json_dict(d["model"]), d.get("kind", "causal_lm"), d
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable easyrl config ({type(e).__name__}: {e})") from None


def is_checkpoint(path: str) -> bool:
    return os.path.exists(os.path.join(resolve(path)[0], CONFIG_FILE)) if os.path.isdir(path) else False


def resolve(path: str) -> Tuple[str, Optional[int]]:
    """(run_dir, step or None for latest) from a run dir or a `<run>/checkpoints/<step>` dir."""
    path = os.path.abspath(path)
    base = os.path.basename(path)
    parent = os.path.dirname(path)
    if base.isdigit() and os.path.basename(parent) == CKPT_SUBDIR:
        return os.path.dirname(parent), int(base)
    return path, None


def manager(run_dir: str, keep: Optional[int] = None, async_save: bool = False,
            item_names=None) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                        enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(run_dir), CKPT_SUBDIR), options=opts,
                                 item_names=item_names)


def latest_step(run_dir: str) -> Optional[int]:
    d = os.path.join(run_dir, CKPT_SUBDIR)
    if not os.path.isdir(d):
        return None
    steps = [int(s) for s in os.listdir(d) if s.isdigit()]
    return max(steps) if steps else None


def save_model(run_dir: str, config: LlamaConfig, params, kind: str = "causal_lm", step: int = 0,
               **extra) -> None:
    """Write a standalone easyrl model checkpoint (used by `convert hf-to-easyrl`)."""
    write_model_config(run_dir, config, kind, **extra)
    with manager(run_dir) as mgr:
        mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
        mgr.wait_until_finished()


def abstract_params(config: LlamaConfig, kind: str, mesh=None, rules=PARTITION_RULES):
    shapes = M.param_shapes(config, kind)
    if mesh is None:
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: dev, shapes)
    else:
        shardings = named_shardings(shapes, mesh, rules)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def load_model(path: str, kind: Optional[str] = None, *, mesh=None, dtype=None,
               rules=PARTITION_RULES, merge_lora: bool = False, **runtime):
    """(config, kind, params) from an easyrl checkpoint or run dir, restored onto `mesh`.
    `kind` may differ from the stored kind only between reward and value (same parameters).

    A LoRA run's checkpoint holds the base and the adapters (`config.lora_rank > 0`); with
    `merge_lora` the adapters are folded into the kernels and the config has rank 0 (a
    quantized base, `config.base_quant`, is dequantized first: the merged model is a plain
    full-precision one)."""
    run_dir, step = resolve(path)
    config, stored_kind, _ = read_model_config(run_dir)
    kind = kind or stored_kind
    if {kind, stored_kind} - {"reward", "value"} and kind != stored_kind:
        raise ValueError(f"{run_dir}: checkpoint holds a {stored_kind!r} model, asked for {kind!r}")
    step = latest_step(run_dir) if step is None else step
    if step is None:
        raise FileNotFoundError(f"{run_dir}/{CKPT_SUBDIR}: no checkpoint steps found")
    if dtype is not None:
        runtime["param_dtype"] = jnp.dtype(dtype).name
    config = config.replace(**runtime) if runtime else config
    target = abstract_params(config, kind, mesh, rules)
    with manager(run_dir) as mgr:
        out = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    params = out["params"]
    if merge_lora and config.base_quant != "none":  # the base dequantized (a full copy)
        from easyrl.model import qlora
        params = qlora.dequantize_params(params, config.param_dtype, config)
        config = config.replace(base_quant="none")
    if merge_lora and config.lora_rank:
        from easyrl.model import lora
        params, config = lora.merge(config, params), lora.disabled(config)
    return config, kind, params
