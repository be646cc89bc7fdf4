"""What every loss family shares: dtype / mask helpers, masked statistics, whitening, and the
token-aligned log-probs and entropy of a causal LM's logits (conventions in `easyrl.losses`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_dtype(x):
    """At least float32 (bf16/f16 logits are upcast; float64 stays float64)."""
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def as_mask(mask, like):
    """``mask`` (bool or numeric) as an array of ``like``'s dtype."""
    return jnp.asarray(mask).astype(jnp.result_type(like))


# ----------------------------------------------------------------------------- masked stats
def masked_sum(x, mask, axis=None):
    """sum(x * mask) over ``axis``; masked positions contribute exactly 0."""
    x = jnp.asarray(x)
    m = as_mask(mask, x)
    return jnp.sum(jnp.where(m != 0, x * m, 0), axis=axis)


def masked_mean(x, mask, axis=None):
    """sum(x * mask) / sum(mask) over ``axis``; 0 where the mask is empty."""
    x = jnp.asarray(x)
    m = as_mask(mask, x)
    count = jnp.sum(m, axis=axis)
    safe = jnp.where(count != 0, count, 1)
    return jnp.where(count != 0, masked_sum(x, m, axis) / safe, 0)


def masked_var(x, mask, unbiased=True):
    """Variance of the valid entries of ``x`` (all axes), TRL semantics.

    ``unbiased`` applies Bessel's correction n / (n - 1) with n = sum(mask); with n <= 1 the
    correction is skipped (TRL raises there; a jitted function cannot).
    """
    x = jnp.asarray(x)
    m = as_mask(mask, x)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    if unbiased:
        n = jnp.sum(m)
        var = var * jnp.where(n > 1, n / jnp.where(n > 1, n - 1, 1), 1)
    return var


def whiten(x, mask, shift_mean=True):
    """(x - mean) * rsqrt(var + 1e-8) with mean/var (unbiased) over valid entries (TRL).

    With ``shift_mean=False`` the mean is added back. Masked positions are not zeroed.
    """
    x = jnp.asarray(x)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


# ----------------------------------------------------------------------------- token level
def _scaled(logits, temperature):
    """logits / temperature in the compute dtype, over ALL T positions: slicing off the last
    position first would copy the whole [B, T, V] array; the [B, T] results are shifted instead."""
    z = logits.astype(compute_dtype(logits))
    if isinstance(temperature, (int, float)) and temperature == 1:
        return z
    return z / temperature


def next_token_stats(logits, input_ids, temperature):
    """(z, picked, lse), each position t scored against input_ids[:, t+1] (the last position's
    target is a dummy 0 and its values are dropped by `shift_to_tokens`). z [B,T,V], picked/lse
    [B,T]."""
    z = _scaled(logits, temperature)
    nxt = jnp.pad(input_ids[:, 1:].astype(jnp.int32), ((0, 0), (0, 1)))
    picked = jnp.take_along_axis(z, nxt[..., None], axis=-1)[..., 0]
    return z, picked, jax.nn.logsumexp(z, axis=-1)


def shift_to_tokens(x):
    """[B, T] per predicting position -> token-aligned: out[:, t] = x[:, t-1], out[:, 0] = 0."""
    return jnp.pad(x[:, :-1], ((0, 0), (1, 0)))


def token_logprobs(logits, input_ids, temperature=1.0):
    """Token-aligned log-probs [B, T] from logits [B, T, V] and input_ids [B, T].

    out[:, t] = log softmax(logits[:, t-1] / temperature)[input_ids[:, t]] for t >= 1,
    out[:, 0] = 0. Computed as gathered logit minus logsumexp (no [B, T, V] log-softmax or
    sliced copy), in float32 (float64 if the logits are float64).
    """
    _, picked, lse = next_token_stats(logits, input_ids, temperature)
    return shift_to_tokens(picked - lse)


def token_entropy(logits, temperature=1.0):
    """Entropy [B, T] of the distribution that predicted token t (from logits[:, t-1]); 0 at t=0."""
    z = _scaled(logits, temperature)
    lse = jax.nn.logsumexp(z, axis=-1)
    p = jnp.exp(z - lse[..., None])
    return shift_to_tokens(lse - jnp.sum(p * z, axis=-1))
