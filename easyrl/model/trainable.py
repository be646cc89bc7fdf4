"""Trainable subsets of a parameter pytree: '/'-path flattening, the adapter / head mask, and the
(trainable, fixed) split the optimizer sees.

Paths are the '/'-joined keys of the nested params dict (`layers/self_attn/q_proj/lora_a`).
Under LoRA only the adapter leaves (`lora_a`, `lora_b`, see `easyrl.model.lora`) and the score
head (reward / value models) train; the rest of the model is frozen. `partition` splits params by
a bool mask pytree, `combine` puts the halves back together.
"""
from __future__ import annotations

from typing import Tuple

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

ADAPTER_LEAVES = ("lora_a", "lora_b")
TRAINABLE_HEADS = ("score",)  # reward / value heads stay trainable under LoRA
# a part of a quantized frozen kernel (`easyrl.model.qlora`) in a flat path
# ('layers/mlp/up_proj/kernel/codes'): group 1 the kernel's path, group 2 the part
QUANT_PART = re.compile(r"(.*/\w+_proj/kernel)/(q|scale|codes|absmax|absmax_q|absmax_scale|"
                        r"absmax_mean)$")


def is_quant_part(path: str) -> bool:
    return QUANT_PART.search(path) is not None


def flatten(tree) -> dict:
    """{'/'-joined path: leaf} of a nested dict ({} for an empty or None tree)."""
    return traverse_util.flatten_dict(tree, sep="/") if tree else {}


def unflatten(flat: dict) -> dict:
    """Inverse of `flatten`."""
    return traverse_util.unflatten_dict(flat, sep="/") if flat else {}


def is_adapter(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in ADAPTER_LEAVES


def has_adapters(params) -> bool:
    return any(is_adapter(p) for p in flatten(params))


def trainable_mask(params, heads=TRAINABLE_HEADS):
    """Bool pytree like `params`: adapters and the score head (reward / value) train, the rest
    of the model stays frozen."""
    return unflatten({p: is_adapter(p) or p.split("/", 1)[0] in heads for p in flatten(params)})


def partition(params, mask) -> Tuple[dict, dict]:
    """(trainable, fixed) nested dicts, by a bool pytree `mask` (None: everything trains)."""
    if mask is None:
        return params, {}
    flat, m = flatten(params), flatten(mask)
    return (unflatten({k: v for k, v in flat.items() if m[k]}),
            unflatten({k: v for k, v in flat.items() if not m[k]}))


def combine(trainable, fixed):
    """Inverse of `partition`."""
    if not fixed:
        return trainable
    return unflatten({**flatten(trainable), **flatten(fixed)})


def adapters(params) -> dict:
    """The adapter leaves alone."""
    return unflatten({k: v for k, v in flatten(params).items() if is_adapter(k)})


def strip(params) -> dict:
    """The parameters without adapter leaves."""
    return unflatten({k: v for k, v in flatten(params).items() if not is_adapter(k)})


def num_params(tree) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def cast_frozen(params, dtype, mask=None) -> dict:
    """Frozen leaves (mask False; default: all but adapters and the score head) cast to `dtype`,
    keeping their shardings."""
    mask = trainable_mask(params) if mask is None else mask
    dt = jnp.dtype(dtype)
    train, fixed = partition(params, mask)
    fixed = {k: v for k, v in flatten(fixed).items()}
    # quantized kernels (integers and their float32 scales: easyrl.model.qlora) stay as they are
    cast = {k: v for k, v in fixed.items() if v.dtype != dt and not is_quant_part(k)}
    if cast:
        shard = {k: v.sharding for k, v in cast.items()}
        cast = jax.jit(lambda t: {k: v.astype(dt) for k, v in t.items()}, out_shardings=shard,
                       donate_argnums=0)(cast)
    return combine(train, unflatten({**fixed, **cast}))
