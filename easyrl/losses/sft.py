"""Token-level cross-entropy (SFT): from logits, and fused with the LM head in chunks so that no
[B, T, V] logits exist (docs/algorithms.md, "SFT")."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from easyrl.losses.common import as_mask, masked_sum, next_token_stats, shift_to_tokens


def sft_loss_sums(logits, input_ids, loss_mask):
    """Sums for token-level cross-entropy: logits [B, T, V], input_ids [B, T], loss_mask [B, T].

    Returns dict(nll_sum, correct_sum, n_tokens) (scalars) over positions t >= 1 with
    loss_mask[:, t] != 0 (column 0 has no predictor and is ignored). Divide by the token count
    of the whole global batch so gradient accumulation gives the same value for any split.
    """
    z, picked, lse = next_token_stats(logits, input_ids, 1.0)
    lp = shift_to_tokens(picked - lse)
    m = as_mask(loss_mask, lp).at[:, 0].set(0)
    # "argmax == target" as "target logit == max logit": a plain max-reduce (fused with the
    # logsumexp's) instead of a variadic argmax over [B, T, V]; differs only on exact ties
    top = jax.lax.stop_gradient(jnp.max(z, axis=-1))
    correct = shift_to_tokens((jax.lax.stop_gradient(picked) >= top).astype(lp.dtype))
    return dict(nll_sum=masked_sum(-lp, m), correct_sum=masked_sum(correct, m), n_tokens=jnp.sum(m))


def sft_loss(logits, input_ids, loss_mask):
    """Mean token NLL over the masked targets of this batch: nll_sum / max(n_tokens, 1)."""
    s = sft_loss_sums(logits, input_ids, loss_mask)
    return s["nll_sum"] / jnp.maximum(s["n_tokens"], 1)


# ----------------------------------------------------------------------------- fused LM head + CE
LM_HEAD_CHUNK_TOKENS = 512  # a good chunk on CPU (measured): callers pass chunk = this // rows


def _head_chunk(h, kernel, y, w, grad_h: bool, grad_k: bool):
    """One chunk: h [B, c, D], kernel [D, V], next-token targets y [B, c], weights w [B, c].
    Returns (nll_sum, correct_sum, d nll_sum / d h [B, c, D] or None, d nll_sum / d kernel or
    None). The logits exist only for this chunk."""
    cdt = jnp.promote_types(jnp.promote_types(h.dtype, kernel.dtype), jnp.float32)
    z = jnp.einsum("bcd,dv->bcv", h, kernel, preferred_element_type=cdt)  # [B, c, V]
    top = jnp.max(z, axis=-1)
    lse = top + jnp.log(jnp.sum(jnp.exp(z - top[..., None]), axis=-1))
    picked = jnp.take_along_axis(z, y[..., None], axis=-1)[..., 0]
    ok = w != 0
    wc = w.astype(cdt)
    nll = jnp.sum(jnp.where(ok, (lse - picked) * wc, 0))
    correct = jnp.sum(jnp.where(ok & (picked >= top), wc, 0))  # argmax == target, up to ties
    gh = gk = None
    if grad_h or grad_k:  # d nll / d z = w * (softmax(z) - onehot(y))
        p = jnp.exp(z - lse[..., None])
        onehot = jax.lax.broadcasted_iota(jnp.int32, z.shape, 2) == y[..., None]
        dz = jnp.where(ok[..., None], (p - onehot.astype(cdt)) * wc[..., None], 0).astype(h.dtype)
        if grad_h:
            gh = jnp.einsum("bcv,dv->bcd", dz, kernel, preferred_element_type=cdt)
        if grad_k:
            hz = jnp.where(ok[..., None], h, 0)  # garbage where nothing is predicted stays out
            gk = jnp.einsum("bcd,bcv->dv", hz, dz, preferred_element_type=cdt)
    return nll, correct, gh, gk


def head_scan(hidden, kernel, targets, weights, chunk: int, grad_h=False, grad_k=False):
    """The LM head + cross-entropy over T in chunks of `chunk` positions (clipped to [1, T]; T
    padded with weight-0 positions): (nll_sum, correct_sum, d nll_sum / d hidden or None,
    d nll_sum / d kernel or None). hidden [B, T, D], kernel [D, V], targets / weights [B, T]
    (position t scored against targets[:, t] with weight weights[:, t])."""
    b, t, d = hidden.shape
    c = max(1, min(chunk, t))
    n = -(-t // c)
    pad = n * c - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    split = lambda x: x.reshape(b, n, c, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731 [n, B, c, ...]
    cdt = jnp.promote_types(jnp.promote_types(hidden.dtype, kernel.dtype), jnp.float32)

    def body(carry, xs):
        nll, correct, gk = carry
        h, y, w = xs
        a, hit, gh, gk_c = _head_chunk(h, kernel, y, w, grad_h, grad_k)
        return (nll + a, correct + hit, None if gk is None else gk + gk_c), gh

    zero = jnp.zeros((), cdt)
    gk0 = jnp.zeros(kernel.shape, cdt) if grad_k else None
    (nll, correct, gk), gh = jax.lax.scan(
        body, (zero, zero, gk0), (split(hidden), split(targets), split(weights)))
    if grad_h:
        gh = gh.swapaxes(0, 1).reshape(b, n * c, d)[:, :t]
    return nll, correct, gh, gk


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_head_ce(hidden, kernel, targets, weights, chunk):
    nll, correct, _, _ = head_scan(hidden, kernel, targets, weights, chunk)
    return nll, correct


def _fused_head_ce_fwd(hidden, kernel, targets, weights, chunk):
    # The gradient of nll_sum is formed here, chunk by chunk, while the logits are at hand (only
    # for the inputs being differentiated: a frozen LM head under LoRA costs no gradient matmul);
    # the backward pass only scales it by the incoming cotangent.
    gh_on, gk_on = hidden.perturbed, kernel.perturbed
    h, k = hidden.value, kernel.value
    nll, correct, gh, gk = head_scan(h, k, targets.value, weights.value, chunk, gh_on, gk_on)
    gh = gh.astype(h.dtype) if gh_on else None
    gk = gk.astype(k.dtype) if gk_on else None
    return (nll, correct), (gh, gk)


def _fused_head_ce_bwd(chunk, res, g):
    gh, gk = res
    g_nll = g[0]
    if isinstance(g_nll, jax.custom_derivatives.SymbolicZero):
        return None, None, None, None
    scale = lambda x: None if x is None else x * g_nll.astype(x.dtype)  # noqa: E731
    return scale(gh), scale(gk), None, None


_fused_head_ce.defvjp(_fused_head_ce_fwd, _fused_head_ce_bwd, symbolic_zeros=True)


def lm_head_loss_sums(hidden, kernel, input_ids, loss_mask, chunk: int = 128):
    """`sft_loss_sums` straight from final hidden states, never materializing [B, T, V] logits.

    hidden [B, T, D] (the final normed states), kernel [D, V] (the LM head, or the transposed
    tied embedding), input_ids / loss_mask [B, T] as in `sft_loss_sums`, whose values this
    returns for logits = hidden @ kernel (accumulated in float32, float64 for float64 inputs).

    The LM head and the cross-entropy run over `chunk` positions of every row at a time in a
    `lax.scan` (T padded to a multiple of `chunk` with masked positions; callers size it as
    `LM_HEAD_CHUNK_TOKENS // rows`). Under differentiation the forward pass also forms the
    gradient of nll_sum chunk by chunk (softmax minus one-hot, then the two matmuls), so only
    [B, chunk, V] logits are ever alive and no matmul is recomputed; the backward pass scales
    that gradient by the incoming cotangent. Gradients flow through nll_sum only (correct_sum and
    n_tokens are metrics).
    """
    mask = jnp.asarray(loss_mask)
    targets = jnp.pad(jnp.asarray(input_ids)[:, 1:].astype(jnp.int32), ((0, 0), (0, 1)))
    weights = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))  # position t predicts token t + 1
    nll, correct = _fused_head_ce(hidden, kernel, targets, jax.lax.stop_gradient(weights),
                                  int(chunk))
    n = jnp.sum(weights.astype(nll.dtype))
    return dict(nll_sum=nll, correct_sum=jax.lax.stop_gradient(correct), n_tokens=n)
