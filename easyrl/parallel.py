"""Device mesh, the one partition-rule table, sharded init, and multi-host setup.

Mesh axes: `dp` (pure data parallel), `fsdp` (data parallel with sharded weights and optimizer
state), `tp` (tensor parallel). The batch is sharded over (`dp`, `fsdp`); weights over `fsdp`
and `tp`. Rules are regexes searched against the '/'-joined parameter path, anchored at the end,
so the same table covers optimizer moments (`.../mu/layers/mlp/up_proj/kernel`).
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

AXES = ("dp", "fsdp", "tp")
BATCH = ("dp", "fsdp")

# (regex on the parameter path, PartitionSpec). Stacked layer params have a leading L axis.
PARTITION_RULES = (
    (r"embed_tokens/embedding", P("tp", "fsdp")),
    (r"layers/self_attn/(q|k|v)_proj/kernel", P(None, "fsdp", "tp")),
    (r"layers/self_attn/(q|k|v)_proj/bias", P(None, "tp")),
    (r"layers/self_attn/o_proj/kernel", P(None, "tp", "fsdp")),
    (r"layers/self_attn/o_proj/bias", P(None, None)),
    (r"layers/mlp/(gate|up)_proj/kernel", P(None, "fsdp", "tp")),
    (r"layers/mlp/(gate|up)_proj/bias", P(None, "tp")),
    (r"layers/mlp/down_proj/kernel", P(None, "tp", "fsdp")),
    (r"layers/mlp/down_proj/bias", P(None, None)),
    (r"layers/(input|post_attention)_layernorm/scale", P(None, None)),
    (r"layers/self_attn/(q|k)_norm/scale", P(None, None)),  # qk_norm (Qwen3): [L, Dh]
    (r"norm/scale", P(None)),
    (r"lm_head/kernel", P("fsdp", "tp")),
    (r"score/kernel", P("fsdp", None)),
    # quantized frozen kernels (model.lora.base_quant, easyrl.model.qlora): each array split
    # along the kernel's own in / out axes (int8 q [L, in, out], scale [L, 1, out]; NF4 codes
    # [L, in/2, out], absmax (_q) [L, in/block, out], absmax_scale [L, in/block, out/256],
    # absmax_mean [L, 1, 1])
    (r"layers/(self_attn/(q|k|v)|mlp/(gate|up))_proj/kernel/(q|codes|absmax|absmax_q)",
     P(None, "fsdp", "tp")),
    (r"layers/(self_attn/o|mlp/down)_proj/kernel/(q|codes|absmax|absmax_q)",
     P(None, "tp", "fsdp")),
    (r"layers/(self_attn/(q|k|v)|mlp/(gate|up))_proj/kernel/scale", P(None, None, "tp")),
    (r"layers/(self_attn/o|mlp/down)_proj/kernel/scale", P(None, None, "fsdp")),
    (r"layers/(self_attn/(q|k|v)|mlp/(gate|up))_proj/kernel/absmax_scale", P(None, "fsdp", None)),
    (r"layers/(self_attn/o|mlp/down)_proj/kernel/absmax_scale", P(None, "tp", None)),
    (r"layers/\w+/\w+_proj/kernel/absmax_mean", P(None, None, None)),
    # LoRA adapters: A [L, in, r] follows the kernel's input sharding, B [L, r, out] its output
    (r"layers/self_attn/(q|k|v)_proj/lora_a", P(None, "fsdp", None)),
    (r"layers/self_attn/(q|k|v)_proj/lora_b", P(None, None, "tp")),
    (r"layers/self_attn/o_proj/lora_a", P(None, "tp", None)),
    (r"layers/self_attn/o_proj/lora_b", P(None, None, "fsdp")),
    (r"layers/mlp/(gate|up)_proj/lora_a", P(None, "fsdp", None)),
    (r"layers/mlp/(gate|up)_proj/lora_b", P(None, None, "tp")),
    (r"layers/mlp/down_proj/lora_a", P(None, "tp", None)),
    (r"layers/mlp/down_proj/lora_b", P(None, None, "fsdp")),
)


# ---- mesh -----------------------------------------------------------------------------------
def parse_mesh_spec(spec: str, num_devices: Optional[int] = None) -> dict:
    """'dp:1,fsdp:-1,tp:1' -> {'dp': 1, 'fsdp': n, 'tp': 1}; one -1 takes the remaining devices."""
    n = jax.device_count() if num_devices is None else num_devices
    sizes = {a: 1 for a in AXES}
    seen = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, val = part.partition(":")
        if name not in AXES or not val.lstrip("-").isdigit():
            raise ValueError(f"mesh spec {spec!r}: bad entry {part!r} (expected e.g. 'dp:1,fsdp:-1,tp:1')")
        if name in seen:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        seen.add(name)
        sizes[name] = int(val)
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"mesh spec {spec!r}: axis sizes must be positive or -1")
    if free:
        if n % fixed:
            raise ValueError(f"mesh spec {spec!r}: {n} devices are not divisible by {fixed}")
        sizes[free[0]] = n // fixed
    if int(np.prod(list(sizes.values()))) > n:
        raise ValueError(f"mesh spec {spec!r} needs {int(np.prod(list(sizes.values())))} devices, "
                         f"only {n} available")
    return sizes


def create_mesh(spec: str = "dp:1,fsdp:-1,tp:1", devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A Mesh over `devices` (default: all). A spec smaller than the device count uses the first
    devices. Axis types are Auto (the pjit behaviour of in/out shardings)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    n = int(np.prod(shape))
    try:
        from jax.experimental import mesh_utils
        dev = mesh_utils.create_device_mesh(shape, devices=devices[:n], allow_split_physical_axes=True)
    except Exception:  # noqa: BLE001 - CPU / odd topologies: plain reshape
        dev = np.asarray(devices[:n], dtype=object).reshape(shape)
    try:
        from jax.sharding import AxisType
        return Mesh(dev, AXES, axis_types=(AxisType.Auto,) * len(AXES))
    except (ImportError, TypeError):
        return Mesh(dev, AXES)


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH]))


# ---- partition rules ------------------------------------------------------------------------
def path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def spec_for(path: str, shape: Sequence[int], mesh: Optional[Mesh] = None,
             rules=PARTITION_RULES) -> P:
    """PartitionSpec for one array. Scalars are replicated; an unmatched array is an error.
    A dimension that the mesh axis size does not divide is left unsharded (logged)."""
    if len(shape) == 0:
        return P()
    for pattern, spec in rules:
        if re.search(f"(^|/)({pattern})$", path):
            break
    else:
        raise ValueError(f"no partition rule matches parameter {path!r} (shape {tuple(shape)}); "
                         f"add one to easyrl.parallel.PARTITION_RULES")
    if len(spec) != len(shape):
        raise ValueError(f"partition rule {pattern!r} has rank {len(spec)} but {path!r} has shape "
                         f"{tuple(shape)}")
    if mesh is None:
        return spec
    out = []
    for dim, ax in zip(shape, spec):
        size = 1 if ax is None else int(np.prod([mesh.shape[a] for a in (ax if isinstance(ax, tuple) else (ax,))]))
        if ax is not None and dim % size:
            log.info("%s: dim %d not divisible by mesh axis %s=%d, replicated", path, dim, ax, size)
            ax = None
        out.append(ax)
    return P(*out)


def partition_specs(tree, mesh: Optional[Mesh] = None, rules=PARTITION_RULES):
    """A PartitionSpec pytree for a pytree of arrays / ShapeDtypeStructs (params or opt state)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: spec_for(path_str(p), np.shape(x), mesh, rules), tree)


def named_shardings(tree, mesh: Mesh, rules=PARTITION_RULES):
    specs = partition_specs(tree, mesh, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def constrain_batch(x):
    """Keep activations [B, ...] sharded over (dp, fsdp) on axis 0 when traced under a mesh
    (`jax.set_mesh`); a no-op without one (single device, tests, plain calls)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH) <= set(mesh.axis_names):
        return x
    size = int(np.prod([mesh.shape[a] for a in BATCH]))
    if x.shape[0] % size:
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH, *([None] * (x.ndim - 1))))


def local_rows(n: int) -> int:
    """Rows of a batch of `n` that one device holds when traced under a mesh (`jax.set_mesh`)
    with the batch sharded over (dp, fsdp); `n` without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH) <= set(mesh.axis_names):
        return n
    size = int(np.prod([mesh.shape[a] for a in BATCH]))
    return n // size if n % size == 0 else n


def sharded_init(init_fn, mesh: Mesh, *args, rules=PARTITION_RULES):
    """Run `init_fn(*args)` under jit with out_shardings from the rule table: the pytree is born
    sharded and never materialized whole on one device or host."""
    shapes = jax.eval_shape(init_fn, *args)
    shardings = named_shardings(shapes, mesh, rules)
    return jax.jit(init_fn, out_shardings=shardings)(*args)


def shard_params(params, mesh: Mesh, rules=PARTITION_RULES):
    """Place an existing (host or device) pytree on the mesh by the rule table."""
    return jax.device_put(params, named_shardings(params, mesh, rules))


def to_global_batch(batch: dict, mesh: Mesh) -> dict:
    """Per-host numpy batch -> global jax arrays sharded over (dp, fsdp) on axis 0."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in batch.items()}


def to_host(x) -> np.ndarray:
    """The whole of array `x` as numpy on this host; an array not fully addressable here (sharded
    across processes) is gathered from all of them, so every process must call it."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ---- multi-host -----------------------------------------------------------------------------
def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           local_device_ids: Optional[Sequence[int]] = None) -> None:
    """Set up multi-host JAX once, before any device is touched.

    TPU pods and SLURM: JAX finds everything by itself (call with no arguments). GPU clusters:
    coordinator `host:port`, process count and id from the arguments or the environment
    (EASYRL_COORDINATOR, EASYRL_NUM_PROCESSES, EASYRL_PROCESS_ID). A single process with no
    coordinator is a no-op.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("EASYRL_COORDINATOR")
    if num_processes is None and env.get("EASYRL_NUM_PROCESSES"):
        num_processes = int(env["EASYRL_NUM_PROCESSES"])
    if process_id is None and env.get("EASYRL_PROCESS_ID"):
        process_id = int(env["EASYRL_PROCESS_ID"])
    auto = any(k in env for k in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "MEGASCALE_COORDINATOR_ADDRESS"))
    if coordinator_address is None and not auto:
        return
    if jax.config.jax_platforms == "cpu" or env.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw = {}
    if coordinator_address is not None:
        kw = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
        if local_device_ids is not None:
            kw["local_device_ids"] = local_device_ids
    jax.distributed.initialize(**kw)
    log.info("jax.distributed: process %d of %d, %d devices", jax.process_index(),
             jax.process_count(), jax.device_count())
