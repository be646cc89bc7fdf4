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


# ----------------------------------------------------------------------------- top-k / top-p
def keep_mask(z, top_k: int = 0, top_p: float = 1.0):
    """The tokens top-k then top-p (nucleus) filtering keeps, bool [..., V], from
    temperature-scaled logits z [..., V]; None when neither is on (top_k = 0, top_p = 1).

    Exactly Hugging Face's `TopKLogitsWarper` then `TopPLogitsWarper` (min_tokens_to_keep=1):
    top-k keeps every token >= the k-th largest logit (ties with it included); top-p sorts the
    (top-k filtered) logits ascending, STABLY, removes the prefix whose cumulative probability is
    <= 1 - top_p and always keeps the most likely token. Among tokens tied with the cut-off
    logit, the ones of higher vocabulary index come later in a stable ascending sort and are kept
    first, so with probs [.4, .2, .2, .2] and top_p = 0.5 the tokens 0 and 3 are kept (HF's
    torch.sort is stable only for V <= 16 on CPU; beyond that HF keeps the same number of tied
    tokens, which ones is up to torch). One sort and a few O(V) passes, no scatter."""
    v = z.shape[-1]
    keep = None
    if 0 < top_k < v:
        kth = jax.lax.top_k(z, top_k)[0][..., -1:]
        keep = z >= kth
    if top_p < 1.0:
        zk = z if keep is None else jnp.where(keep, z, -jnp.inf)
        srt = jnp.sort(zk, axis=-1)  # ascending
        cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
        # removed: a prefix of the ascending order, never the last (most likely) entry
        n_rm = jnp.minimum(jnp.sum(cum <= 1 - top_p, axis=-1, keepdims=True), v - 1)
        thr = jnp.take_along_axis(srt, n_rm, axis=-1)  # the smallest kept logit
        tied = zk == thr
        below = jnp.sum(zk < thr, axis=-1, keepdims=True)
        tie_rank = jnp.cumsum(tied, axis=-1) - 1  # among the tied: index order = stable order
        keep_p = (zk > thr) | (tied & (tie_rank >= n_rm - below))
        keep = keep_p if keep is None else keep & keep_p
    return keep


def filtered_logprobs(logits, targets, temperature=1.0, top_k: int = 0, top_p: float = 1.0):
    """log-prob [...] of `targets` [...] under the distribution the sampler draws from: softmax of
    logits [..., V] / temperature restricted to the tokens `keep_mask` keeps (log softmax over
    the kept tokens). top_k = 0, top_p = 1: exactly log softmax(logits / temperature).

    A target outside the kept set (never the case for the sampler's own draws; possible when
    the logits differ from the sampler's: other parameters in a PPO update, or numerics) is
    scored as if it were kept too (normalized over the kept set plus itself), so the log-prob
    stays finite and its ratio / KL statistics stay usable. Gradients flow through the logits,
    not through which tokens are kept."""
    z = _scaled(logits, temperature)
    tgt = targets.astype(jnp.int32)
    picked = jnp.take_along_axis(z, tgt[..., None], axis=-1)[..., 0]
    keep = keep_mask(jax.lax.stop_gradient(z), top_k, top_p)
    if keep is None:
        return picked - jax.nn.logsumexp(z, axis=-1)
    keep = keep | (jnp.arange(z.shape[-1]) == tgt[..., None])
    return picked - jax.nn.logsumexp(jnp.where(keep, z, -jnp.inf), axis=-1)
