"""Optimizer: AdamW with a weight-decay mask, global-norm clipping, and learning-rate schedules."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from easyrl.parallel import path_str

SCHEDULES = ("constant", "linear", "cosine")


def warmup_steps(warmup, total_steps: int) -> int:
    """`warmup` in steps (int >= 1) or as a ratio of the run (float < 1)."""
    if isinstance(warmup, float) and 0 < warmup < 1:
        return int(round(warmup * total_steps))
    return int(warmup)


def make_schedule(lr: float, schedule: str, total_steps: int, warmup=0, min_lr_ratio: float = 0.0):
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={schedule!r}: expected one of {SCHEDULES}")
    w = min(warmup_steps(warmup, total_steps), max(total_steps, 1))
    decay = max(total_steps - w, 1)
    if schedule == "constant":
        main = optax.constant_schedule(lr)
    elif schedule == "linear":
        main = optax.linear_schedule(lr, lr * min_lr_ratio, decay)
    else:
        main = optax.cosine_decay_schedule(lr, decay, alpha=min_lr_ratio)
    if w == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, w), main], [w])


def decay_mask(params):
    """Weight decay on kernels and embeddings; never on norms' scales or biases."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: not path_str(p).endswith(("scale", "bias")), params)


def make_optimizer(optim, total_steps: int):
    """optax chain from the `optim` config section. Returns (optimizer, schedule). A frozen
    subset (LoRA) is handled by initializing it on the trainable leaves only
    (`easyrl.model.trainable.partition`)."""
    schedule = make_schedule(optim.lr, optim.schedule, total_steps, optim.warmup,
                             optim.get("min_lr_ratio", 0.0))
    parts = []
    if optim.clip and optim.clip > 0:
        parts.append(optax.clip_by_global_norm(optim.clip))
    parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                             weight_decay=optim.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def all_finite(tree) -> jax.Array:
    """True when no leaf holds a NaN or inf (a norm could overflow on large finite values)."""
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)
