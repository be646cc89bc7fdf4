"""Per-platform tuning: every choice easyrl makes by backend, in one place.

Three code paths are picked by the platform the computation runs on. All three were measured on
XLA:CPU (2 cores, bench_100m; benchmarks/RESULTS.md, "what changed" table); off CPU they are
either unmeasured or cost memory, so every other platform takes the plain path:

``decode``  "unrolled" on CPU, "scan" elsewhere: the sampler's decode loop (`generate`).
    "unrolled" runs the layers as a Python loop over per-layer weights, sliced out of the stacked
    ``params['layers']`` once before the loop, and per-layer KV caches carried by it
    (`llama.forward_unrolled`): each step updates one cache slot in place and reads every weight
    where it lies. On CPU a decode step took 123 ms against 424 ms for the scanned stack (3.4x;
    slicing the weights inside the loop instead was 1.4x slower). The price: while sampling the
    decoder weights exist twice (stacked + sliced, in the compute dtype), which the planner
    counts (`plan.memory.decode_copy_bytes`). "scan" (the scanned stack over the stacked cache,
    no second copy) is what large models on GPU / TPU want.
``kv_cache_as_bits``  True on CPU: a bfloat16 KV cache is held as uint16 bit patterns
    (`llama.cache_storage_dtype`; `cache_read` / `cache_write` bitcast). XLA:CPU computes bf16
    elementwise ops in float32, and its update of one slot of a bf16 cache became "convert the
    whole cache to f32, write one slot, convert back": a full copy of every layer's cache per
    decode step. An integer update is a plain in-place write: bf16 decode step 110 ms -> 66 ms.
    Same bytes (2 per element), so the planner's KV-cache term does not depend on it.
``wgrad_barrier``  True on CPU: `matmul.dense_matmul`'s backward puts the weight-gradient dot's
    operands behind an optimization barrier, so XLA does not fuse the producers of the cotangent
    (the SwiGLU backward, the residual adds) into transposed-layout loops feeding the dot, which
    ran at a fraction of memory speed: float32 train step 10.6 s -> 9.3 s. Other backends fuse
    freely.

Where they are resolved: `decode` and `kv_cache_as_bits` shape the sampler's program (loop
structure, cache dtype), so `generate.make_sampler` resolves them once, at construction, from the
devices of its mesh (the default backend without one): `tuning_for_mesh`. `wgrad_barrier` sits
deep inside the traced model (every dense layer's VJP), so it is decided inside the computation
with `jax.lax.platform_dependent` (`wgrad_operands`): jax picks the branch when it lowers for the
platform it compiles for, and the compiler never sees a conditional. The planner
(`easyrl.plan`) reads `tuning_for(platform)` for the platform it plans for.
"""
from __future__ import annotations

import dataclasses

import jax

__all__ = ["Tuning", "CPU", "ACCELERATOR", "tuning_for", "platform_of", "tuning_for_mesh",
           "wgrad_operands"]


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The platform-dependent settings (see the module docstring for the measurements)."""
    decode: str  # the sampler's decode="auto": "unrolled" | "scan"
    kv_cache_as_bits: bool  # a bfloat16 KV cache held as uint16 bit patterns
    wgrad_barrier: bool  # optimization barrier on the weight-gradient dot's operands


CPU = Tuning(decode="unrolled", kv_cache_as_bits=True, wgrad_barrier=True)
ACCELERATOR = Tuning(decode="scan", kv_cache_as_bits=False, wgrad_barrier=False)


def tuning_for(platform: str) -> Tuning:
    """The settings for a platform name as jax spells it (`Device.platform`: 'cpu', 'gpu',
    'tpu', ...): `CPU` on 'cpu', `ACCELERATOR` on anything else."""
    return CPU if platform == "cpu" else ACCELERATOR


def platform_of(mesh=None) -> str:
    """The platform of a mesh's devices (all of them must share one), or with no mesh the
    platform jit places computations on by default (jax's default backend)."""
    if mesh is None:
        return jax.default_backend()
    platforms = sorted({d.platform for d in mesh.devices.flat})
    if len(platforms) != 1:
        raise ValueError(f"mesh devices span several platforms: {platforms}")
    return platforms[0]


def tuning_for_mesh(mesh=None) -> Tuning:
    """`tuning_for(platform_of(mesh))`: the settings of the devices a mesh (or, with None, the
    default backend) runs on."""
    return tuning_for(platform_of(mesh))


# lax.platform_dependent's names for the lowering platforms, per Device.platform name
_LOWERING_NAMES = {"cpu": ("cpu",), "gpu": ("cuda", "rocm"), "tpu": ("tpu",)}


def wgrad_operands(x, g):
    """(x, g), behind an optimization barrier on the platforms whose `Tuning.wgrad_barrier` is
    set. Decided in the traced computation (`jax.lax.platform_dependent`): the branch is picked
    when the computation is lowered for its platform."""
    def barrier(x, g):
        return jax.lax.optimization_barrier((x, g))

    def plain(x, g):
        return x, g

    branches = {name: barrier if tuning_for(p).wgrad_barrier else plain
                for p, names in _LOWERING_NAMES.items() for name in names}
    default = barrier if ACCELERATOR.wgrad_barrier else plain  # any other platform
    return jax.lax.platform_dependent(x, g, default=default, **branches)
