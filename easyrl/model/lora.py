"""LoRA adapters on the dense kernels: which kernels, the module, adding and merging.

With `LlamaConfig.lora_rank > 0`, every dense projection whose short name (q, k, v, o, gate, up,
down) matches the regex `lora_targets` becomes a `LoRADense`: it keeps the `kernel` (and `bias`)
of `nn.Dense`, so the base tree and the Hugging Face name table are unchanged, and adds

    lora_a [in, r]   (PEFT's init: kaiming-uniform, i.e. U(-1/sqrt(in), 1/sqrt(in)))
    lora_b [r, out]  (zeros: a fresh adapter leaves the model exactly as it was)

    y = x W (+ b) + (alpha / r) * dropout(x) A B

Under `nn.scan` both get the leading layer axis L (`layers/self_attn/q_proj/lora_a [L, D, r]`),
which the partition table in `easyrl.parallel` covers. Applying the same parameters with
`disabled(config)` (rank 0) ignores the adapter leaves: the base model, with no copy of the
weights (the DPO / PPO reference under LoRA).

The trainable subset (adapters + score head), partition / combine and casting the frozen base
are in `easyrl.model.trainable`; PEFT adapter folders are read and written by `easyrl.peft`.
"""
from __future__ import annotations

import re
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from easyrl.model.matmul import dense_dot_general
from easyrl.model.trainable import (adapters, combine, flatten, has_adapters, is_adapter, strip,
                                     unflatten)
from easyrl.parallel import named_shardings

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
MODULE_OF = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn",
             "gate": "mlp", "up": "mlp", "down": "mlp"}


# ---- which kernels ---------------------------------------------------------------------------
def _short(name: str) -> str:
    return name[:-5] if name.endswith("_proj") else name


def matches(targets: str, name: str) -> bool:
    """Does regex `targets` select projection `name` ('q_proj' or 'q')? The regex must match
    the whole short name (q, k, v, o, gate, up, down) or the whole module name (q_proj, ...)."""
    short = _short(name)
    if short not in TARGETS:
        return False
    return bool(re.fullmatch(targets, short) or re.fullmatch(targets, f"{short}_proj"))


def target_names(targets: str) -> Tuple[str, ...]:
    """The short names (in TARGETS order) that regex `targets` selects."""
    return tuple(t for t in TARGETS if matches(targets, t))


def check_targets(targets: str, key: str = "model.lora.targets") -> Tuple[str, ...]:
    try:
        re.compile(targets)
    except re.error as e:
        raise ValueError(f"config {key}: {targets!r} is not a valid regex ({e})") from None
    names = target_names(targets)
    if not names:
        raise ValueError(f"config {key}: {targets!r} matches none of the dense kernels "
                         f"{', '.join(TARGETS)} (e.g. 'q|v' or 'q|k|v|o|gate|up|down')")
    return names


def is_target(config, name: str) -> bool:
    return config.lora_rank > 0 and matches(config.lora_targets, name)


def disabled(config):
    """The same model with adapters off (their parameter leaves are ignored by `apply`)."""
    return config.replace(lora_rank=0, lora_dropout=0.0) if config.lora_rank else config


def scale(config) -> float:
    return float(config.lora_alpha) / float(config.lora_rank)


# ---- the module ------------------------------------------------------------------------------
def lora_a_init(key, shape, dtype=jnp.float32):
    """PEFT's default: kaiming_uniform(a=sqrt(5)) on [r, in] = U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / np.sqrt(shape[-2])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


class LoRADense(nn.Module):
    """`nn.Dense` (same `kernel` / `bias` parameters and numerics) plus a rank-r adapter."""
    features: int
    rank: int
    alpha: float
    dropout: float = 0.0
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        d_in = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (d_in, self.features), self.param_dtype)
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
                if self.use_bias else None)
        a = self.param("lora_a", lora_a_init, (d_in, self.rank), self.param_dtype)
        b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features), self.param_dtype)
        x, kernel, bias, a, b = nn.dtypes.promote_dtype(x, kernel, bias, a, b, dtype=self.dtype)
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        y = dense_dot_general(x, kernel, dims)
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y + adapter_delta(self, x, a, b, self.alpha / self.rank, self.dropout).astype(y.dtype)


def adapter_delta(module: nn.Module, x, a, b, scale: float, dropout: float):
    """scale * dropout(x) A B for x [..., in], a [in, r], b [r, out] (all in the compute dtype);
    dropout only when `module` has a 'dropout' rng (training). Shared by `LoRADense` and
    `qlora.QuantDense`."""
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    if dropout > 0 and module.has_rng("dropout"):
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout), jnp.zeros_like(x))
    low = jax.lax.dot_general(x, a, dims)
    return jax.lax.dot_general(low, b, dims) * jnp.asarray(scale, x.dtype)


# ---- adding, merging ---------------------------------------------------------------------------
def _out_shardings(fn, args, mesh):
    if mesh is None:
        return None
    return named_shardings(jax.eval_shape(fn, *args), mesh)


def add_adapters(config, base_params, rng, kind: str = "causal_lm", mesh=None) -> dict:
    """`base_params` (no adapters) plus fresh adapters for `config` (B = 0: the model is
    unchanged), initialized already sharded by the partition table. Only the adapters are
    materialized (the base init is dead code under jit)."""
    from easyrl import model as M
    if config.lora_rank <= 0:
        return base_params
    fn = lambda r: adapters(M.init_params(config, r, kind))  # noqa: E731
    fresh = jax.jit(fn, out_shardings=_out_shardings(fn, (rng,), mesh))(rng)
    return combine(strip(base_params), fresh)


def merge(config, params) -> dict:
    """Base parameters with every adapter folded in: W + (alpha / r) A B (computed in float32,
    stored in W's dtype). Shardings are kept; the result has no adapter leaves."""
    if not has_adapters(params):
        return params
    s = scale(config)
    flat = flatten(params)
    kernels = {}
    for k in flat:
        if k.endswith("/lora_a"):
            base = k[: -len("lora_a")]
            kernels[base + "kernel"] = (flat[base + "kernel"], flat[k], flat[base + "lora_b"])

    def fold(w, a, b):
        ab = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
        return (w.astype(jnp.float32) + s * ab).astype(w.dtype)

    shard = {k: getattr(w, "sharding", None) for k, (w, _, _) in kernels.items()}
    if any(v is None for v in shard.values()):
        shard = None
    merged = jax.jit(lambda t: {k: fold(*v) for k, v in t.items()}, out_shardings=shard)(kernels)
    out = {k: v for k, v in flat.items() if not is_adapter(k)}
    out.update(merged)
    return unflatten(out)
