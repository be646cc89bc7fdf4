"""Bytes: per-device bytes of a pytree under the partition rules, and the activation / KV-cache
formulas.

Memory model, per device (b = rows of one micro-batch on a device = rows / (dp*fsdp), T = tokens
per row, a = bytes of the compute dtype, 4 = float32; D hidden, F intermediate, L layers, H / K
query / kv heads, Dh head dim, V vocab; under tensor parallelism q = H*Dh/tp, k = K*Dh/tp,
f = F/tp, v = V/tp, h = H/tp whenever tp divides them, as the partition rules shard them):

  parameters, optimizer state  exact: eval_shape pytrees x partition specs (AdamW: mu and nu in
                               the parameter dtype + int32 counts; PPO: policy and value)
  gradients                    = parameter bytes (param dtype, sharded like the parameters);
                               x2 with gradient accumulation (accumulator + this micro-batch);
                               with exactly 2 micro-steps activations count twice (XLA overlaps
                               them: measured with --compile)
  activations (training)       b*T * [ L * S(remat) + W + logits ]  where, per token,
      S(none)          = W = a*(4D + 2q + 2k + 4f) + 16D + (4 + a)*h*T + T
                         (every residual of the layer: norm inputs / float32 copies, rotated q,k,
                         v, float32 softmax probs and their compute-dtype copy, the mask,
                         attention output, gate, up, silu(gate), silu*up)
      S(dots)          = a*(3D + 2q + 2k + 2f) + 4*h*T  (every matmul output incl. the float32
                         attention scores, + the layer input)
      S(dots_no_batch) = S(minimal) = a*(3D + q + 2k + 2f)  (projection outputs, + layer input)
      S(full)          = a*D  (the layer input only)
      W                = one layer's working set while its backward runs (recomputed forward or
                         gradient buffers)
      logits           = (a + 3*4)*v for a LM head: [B,T,V] in the compute dtype + float32
                         logits, float32 softmax for the backward, float32 gradient; ~0 for a
                         score head. Plus 10*D*a for the embedding / final norm.
  forward-only passes          b*T * [ W + (a + 2*4)*v ] (DPO's live reference, PPO scoring)
  PPO                          resident: policy, reference (a copy of the policy), reward and
                               value parameters, policy and value optimizer states; then the peak
                               phase of: rollout = KV cache 2*L*B*(P+N)*K*Dh*a (batch over
                               dp*fsdp, kv heads over tp, as the sampler pins it) + a prefill
                               forward; scoring = the largest forward-only pass over the rollout
                               batch; update = policy + value gradients and training activations
"""
from __future__ import annotations

import types
from typing import Dict, Tuple

import jax
import numpy as np

GiB = 2 ** 30


def count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def tree_bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def fake_mesh(sizes: dict):
    """What `easyrl.parallel.spec_for` reads of a mesh: `.shape[axis]`."""
    return types.SimpleNamespace(shape=dict(sizes), axis_names=tuple(sizes))


def per_device_bytes(tree, mesh_sizes: dict) -> int:
    """Bytes of `tree` on one device when placed by the partition rules on a mesh of that shape
    (sharded dims count 1/axis size; replicated dims fully)."""
    from easyrl import parallel
    mesh = fake_mesh(mesh_sizes)
    specs = parallel.partition_specs(tree, mesh)
    total = 0
    for x, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(
            specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))):
        n = 1
        for i, dim in enumerate(x.shape):
            ax = spec[i] if i < len(spec) else None
            axes = () if ax is None else (ax if isinstance(ax, tuple) else (ax,))
            div = int(np.prod([mesh_sizes[a] for a in axes])) if axes else 1
            n *= dim // div
        total += n * np.dtype(x.dtype).itemsize
    return int(total)


def _split(n: int, tp: int) -> float:
    """n per device when tp shards it (only if divisible, as the partition rules do)."""
    return n / tp if tp > 1 and n % tp == 0 else float(n)


def layer_bytes_per_token(cfg, tp: int, key_len: int) -> Dict[str, float]:
    """Per-token bytes of one decoder layer: saved residuals per remat policy and the working set
    W (see the module docstring)."""
    a = np.dtype(cfg.dtype).itemsize
    D, F, H, K, Dh = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                      cfg.num_key_value_heads, cfg.head_dim)
    q, k, f, h = _split(H * Dh, tp), _split(K * Dh, tp), _split(F, tp), _split(H, tp)
    t = key_len
    w = a * (4 * D + 2 * q + 2 * k + 4 * f) + 16 * D + (4 + a) * h * t + t
    saved = {
        "none": w,
        "dots": a * (3 * D + 2 * q + 2 * k + 2 * f) + 4 * h * t,
        "dots_no_batch": a * (3 * D + q + 2 * k + 2 * f),
        "minimal": a * (3 * D + q + 2 * k + 2 * f),
        "full": a * D,
    }
    return dict(saved=saved, working=w)


def head_bytes_per_token(cfg, kind: str, tp: int, train: bool) -> float:
    a = np.dtype(cfg.dtype).itemsize
    other = 10 * cfg.hidden_size * a  # embedding output, final norm (+ float32 copies)
    if kind != "causal_lm":
        return other + 8
    v = _split(cfg.vocab_size, tp)
    return other + (a + (3 if train else 2) * 4) * v


def activation_bytes(cfg, kind: str, rows: float, seq: int, remat: str, tp: int,
                     train: bool = True) -> float:
    """Per-device activation bytes of one forward(+backward) over `rows` rows of `seq` tokens."""
    lb = layer_bytes_per_token(cfg, tp, seq)
    per_token = lb["working"] + head_bytes_per_token(cfg, kind, tp, train)
    if train:
        per_token += cfg.num_hidden_layers * lb["saved"][remat]
    return rows * seq * per_token


def kv_cache_bytes(cfg, batch: int, seq: int, mesh: dict, dtype=None) -> Tuple[float, float]:
    """(total, per device) bytes of the sampler's KV cache 2 x [L, B, S, K, Dh] (batch over
    dp*fsdp when divisible, kv heads over tp when divisible, as `generate._cache_sharding`)."""
    item = np.dtype(dtype or cfg.dtype).itemsize
    total = 2.0 * cfg.num_hidden_layers * batch * seq * cfg.num_key_value_heads * cfg.head_dim * item
    dpf = mesh["dp"] * mesh["fsdp"]
    div = (dpf if batch % dpf == 0 else 1) * (mesh["tp"] if cfg.num_key_value_heads % mesh["tp"] == 0 else 1)
    return total, total / div

