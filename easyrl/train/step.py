"""TrainState and the shared jitted train/eval steps (gradient accumulation, non-finite skip).

A loss function has the signature

    loss_fn(params, frozen, micro_batch, rng, denom) -> (loss, metrics)

where `loss` and every metric are SUMS over the micro-batch divided by `denom`, a normalizer the
algorithm computes from the whole global batch (`denom_fn(batch)`, e.g. its number of target
tokens). Summing over micro-batches then gives exactly the global-batch value, so any
micro-batch split yields the same loss and gradient. `denom_fn` may return a scalar or a dict of
scalars (several normalizers, e.g. pairs and chosen tokens); each is floored at 1, and
evaluation weights its batches by the scalar or by the dict's first entry.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from easyrl.model.trainable import combine, partition
from easyrl.parallel import BATCH
from easyrl.train.optim import all_finite, global_norm


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: Any
    opt_state: Any
    nonfinite: jax.Array  # total skipped updates
    streak: jax.Array  # consecutive skipped updates
    frozen: Any = None  # not trained, not checkpointed (e.g. a DPO reference model)

    @classmethod
    def create(cls, params, tx, frozen=None):
        z = jnp.zeros((), jnp.int32)
        return cls(step=z, params=params, opt_state=tx.init(params), nonfinite=z, streak=z,
                   frozen=frozen)


def split_micro(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B/n, ...] with micro-batch m = rows m, m+n, ... (stays evenly sharded)."""
    def f(x):
        b = x.shape[0]
        y = x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1)
        return _constrain_micro(y)
    return jax.tree.map(f, batch)


def _constrain_micro(y):
    """[n, b, ...] micro-batches: keep rows (axis 1) sharded over (dp, fsdp) under a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH) <= set(mesh.axis_names):
        return y
    size = 1
    for a in BATCH:
        size *= mesh.shape[a]
    if y.shape[1] % size:
        return y
    return jax.lax.with_sharding_constraint(y, jax.sharding.PartitionSpec(None, BATCH))


def accumulate(loss_fn, params, frozen, batch, rng, denom, micro_steps: int, with_grad=True):
    """Sum loss, metrics (and gradients) over `micro_steps` micro-batches with lax.scan
    (metrics whose name ends in `_max`: their maximum)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True) if with_grad else None
    if micro_steps == 1:
        if with_grad:
            (loss, metrics), grads = grad_fn(params, frozen, batch, rng, denom)
            return loss, metrics, grads
        loss, metrics = loss_fn(params, frozen, batch, rng, denom)
        return loss, metrics, None
    micro = split_micro(batch, micro_steps)
    rngs = jax.random.split(rng, micro_steps)

    def one(mb, r):
        if with_grad:
            (loss, metrics), grads = grad_fn(params, frozen, mb, r, denom)
            return loss, metrics, grads
        return loss_fn(params, frozen, mb, r, denom) + (None,)

    # every micro-step inside the scan (a zero carry shaped like one step's output), so XLA keeps
    # one micro-batch of activations alive at a time
    shapes = jax.eval_shape(one, jax.tree.map(lambda x: x[0], micro), rngs[0])
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(carry, xs):
        loss, metrics, grads = one(*xs)
        # metrics named *_max are maxima over the micro-batches, the rest sums
        metrics = {k: (jnp.maximum if k.endswith("_max") else jnp.add)(carry[1][k], v)
                   for k, v in metrics.items()}
        return (carry[0] + loss, metrics, jax.tree.map(jnp.add, carry[2], grads)), None

    carry, _ = jax.lax.scan(body, zero, (micro, rngs))
    return carry


def optimizer_step(loss_fn, tx, params, opt_state, frozen, batch, rng, denom, micro_steps: int,
                   trainable_mask=None):
    """One optimizer step with the non-finite skip, shared by every trainer's update:
    accumulate `loss_fn` over `micro_steps` micro-batches, apply `tx` to the trainable leaves
    (`trainable_mask`; None: all), and keep the old parameters and optimizer state when the
    loss, gradient norm, update or a new parameter is non-finite.
    Returns (params, opt_state, loss, metrics, grad_norm, ok)."""
    train, fixed = partition(params, trainable_mask)
    fn = loss_fn if trainable_mask is None else (
        lambda tp, fr, mb, r, d: loss_fn(combine(tp, fixed), fr, mb, r, d))
    loss, metrics, grads = accumulate(fn, train, frozen, batch, rng, denom, micro_steps)
    gnorm = global_norm(grads)
    updates, new_opt = tx.update(grads, opt_state, train)
    new_train = optax.apply_updates(train, updates)
    # a non-finite loss, gradient, update (e.g. optim.lr=inf) or new parameter skips the step
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm) & all_finite(updates) & all_finite(new_train)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    return (combine(keep(new_train, train), fixed), keep(new_opt, opt_state), loss, metrics,
            gnorm, ok)


def counted_step(loss_fn, tx, state, batch, rng, denom, micro_steps: int, trainable_mask=None):
    """`optimizer_step` on a TrainState: (state with params / opt_state / the non-finite
    counters updated, metrics with loss, grad_norm and nonfinite_updates (1.0 when skipped)).
    The online trainers' minibatch step (the step counter is theirs to advance)."""
    params, opt_state, loss, metrics, gnorm, ok = optimizer_step(
        loss_fn, tx, state.params, state.opt_state, state.frozen, batch, rng, denom, micro_steps,
        trainable_mask)
    bad = (~ok).astype(jnp.int32)
    state = state.replace(params=params, opt_state=opt_state, nonfinite=state.nonfinite + bad,
                          streak=(state.streak + bad) * bad)
    return state, dict(metrics, loss=loss, grad_norm=gnorm,
                       nonfinite_updates=bad.astype(jnp.float32))


def normalizers(denom):
    """A denom_fn's value (a scalar or a dict of scalars) as float32, each at least 1."""
    return jax.tree.map(lambda d: jnp.maximum(jnp.asarray(d).astype(jnp.float32), 1.0), denom)


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule,
                    denom_fn: Callable, micro_steps: int = 1, trainable_mask=None):
    """step(state, batch, rng) -> (state, metrics). Skips the update (parameters and optimizer
    state unchanged) on a non-finite loss, gradient, update or new parameter, and counts it.

    `trainable_mask` (bool pytree like the params, e.g. LoRA's): gradients, the update and the
    optimizer state (`tx` initialized on `trainable.partition(params, mask)[0]`) cover only the True
    leaves; the rest is passed through untouched."""
    def step(state: TrainState, batch: dict, rng):
        denom = normalizers(denom_fn(batch))
        params, opt_state, loss, metrics, gnorm, ok = optimizer_step(
            loss_fn, tx, state.params, state.opt_state, state.frozen, batch, rng, denom,
            micro_steps, trainable_mask)
        bad = (~ok).astype(jnp.int32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  nonfinite=state.nonfinite + bad, streak=(state.streak + bad) * bad)
        metrics = dict(metrics, loss=loss, grad_norm=gnorm, lr=schedule(state.step),
                       nonfinite=new_state.nonfinite, nonfinite_streak=new_state.streak)
        return new_state, metrics

    return step


def make_eval_step(loss_fn: Callable, denom_fn: Callable):
    """eval_step(params, frozen, batch, rng) -> (loss_sum_weighted, metrics, denom): callers
    aggregate over batches as sum(value * denom) / sum(denom). Evaluation is deterministic: the
    loss gets rng=None (no LoRA adapter dropout)."""
    def eval_step(params, frozen, batch, rng):
        del rng
        denom = normalizers(denom_fn(batch))
        loss, metrics, _ = accumulate(loss_fn, params, frozen, batch, None, denom, 1, with_grad=False)
        weight = next(iter(denom.values())) if isinstance(denom, dict) else denom
        return dict(metrics, loss=loss), weight

    return eval_step
