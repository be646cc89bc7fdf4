"""A quantized frozen base under LoRA (`LlamaConfig.base_quant` int8 | nf4): StackLLaMA's 8-bit
and QLoRA's 4-bit NF4 base.

With `base_quant` set, every dense projection (q k v o gate up down) is a `QuantDense`: its
`kernel` parameter is the quantized kernel, a dict of arrays (`easyrl.model.quant`: int8
`{q, scale}`, NF4 `{codes, absmax}` or, double-quantized, `{codes, absmax_q, absmax_scale,
absmax_mean}`), so the parameter paths are `layers/mlp/up_proj/kernel/codes` etc. (the partition
table in `easyrl.parallel` shards each array along the kernel's own axes). The forward
dequantizes the kernel in the compute dtype right before the matmul (inside the layer scan: one
layer's kernel at a time) and runs the same `dense_dot_general` as `nn.Dense`; biases, norms,
embeddings, the LM / score heads and the LoRA adapters stay in `param_dtype`. Nothing flows
into the quantized arrays (they are integers, and frozen: `trainable.trainable_mask`).

`quantize_params` / `dequantize_params` convert a params tree; `easyrl.hf.load` quantizes while
streaming, one tensor at a time.
"""
from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from easyrl.model import quant
from easyrl.model.lora import adapter_delta, lora_a_init
from easyrl.model.matmul import dense_dot_general
from easyrl.model.trainable import QUANT_PART, flatten, is_quant_part, unflatten

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
def dq_block(features: int) -> int:
    """The double-quant run length along `out`: 256 (QLoRA's), or the largest divisor of
    `features` below it (small test models)."""
    return math.gcd(256, features)


def settings(config, features: int) -> dict:
    return dict(block=config.quant_block, double_quant=config.double_quant,
                dq_block=dq_block(features))


def quantize_kernel(config, w, name=None):
    """A kernel [.., in, out] quantized as `config.base_quant` says."""
    return quant.quantize(w, config.base_quant, name=name, **settings(config, w.shape[-1]))


class QuantDense(nn.Module):
    """`nn.Dense` over a quantized frozen kernel (same `bias`), with an optional rank-r adapter
    (`lora_a`, `lora_b`: `lora.LoRADense`'s parameters and numerics)."""
    features: int
    config: Any
    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        d_in = x.shape[-1]
        qk = self.param("kernel", lambda key: quantize_kernel(
            self.config, self.kernel_init(key, (d_in, self.features), jnp.float32)))
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
                if self.use_bias else None)
        kernel = quant.dequantize(qk, self.dtype, n_in=d_in)
        x = x.astype(self.dtype)
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        y = dense_dot_general(x, kernel, dims)
        if bias is not None:
            y = y + jnp.reshape(bias.astype(self.dtype), (1,) * (y.ndim - 1) + (-1,))
        if not self.rank:
            return y
        a = self.param("lora_a", lora_a_init, (d_in, self.rank), self.param_dtype)
        b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features),
                       self.param_dtype)
        delta = adapter_delta(self, x, a.astype(self.dtype), b.astype(self.dtype),
                              self.alpha / self.rank, self.dropout)
        return y + delta.astype(y.dtype)


def quantize_params(config, params) -> dict:
    """`params` (plain dense kernels) with every projection kernel quantized for `config`
    (`base_quant`), one kernel at a time, shardings of the other leaves kept (used for bases
    that come from an easyrl checkpoint; HF folders are quantized while streaming)."""
    flat = flatten(params)
    out = {}
    for k, v in flat.items():
        if re.search(r"/(%s)/kernel$" % "|".join(PROJECTIONS), k):
            for part, arr in jax.jit(lambda w, k=k: quantize_kernel(config, w, k))(v).items():
                out[f"{k}/{part}"] = arr
        else:
            out[k] = v
    return unflatten(out)


def in_features(config, path: str) -> int:
    """The in size of projection kernel `path` (.../<name>_proj/kernel) under `config`."""
    name = re.search(r"(\w+_proj)/kernel$", path).group(1)
    if name == "o_proj":
        return config.num_attention_heads * config.head_dim
    return config.intermediate_size if name == "down_proj" else config.hidden_size


def dequantize_params(params, dtype, config=None) -> dict:
    """`params` with every quantized kernel back as a plain [.., in, out] kernel in `dtype`.
    `config`: the model's (needed when an NF4 kernel's in size is not a multiple of its
    block: the padded last block is cut to the true size)."""
    flat = flatten(params)
    groups, out = {}, {}
    for k, v in flat.items():
        m = QUANT_PART.search(k)
        if m:
            groups.setdefault(m.group(1), {})[m.group(2)] = v
        else:
            out[k] = v
    sizes = {k: (in_features(config, k) if config is not None else None) for k in groups}
    deq = jax.jit(lambda g: {k: quant.dequantize(v, dtype, sizes[k]) for k, v in g.items()})
    out.update(deq(groups) if groups else {})
    return unflatten(out)


def has_quantized(params) -> bool:
    return any(is_quant_part(k) for k in flatten(params))
