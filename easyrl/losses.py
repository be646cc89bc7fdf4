"""Every loss of easyrl as a pure, jit-compatible function of arrays.

Shape letters: B batch, T sequence length, V vocab, R response length (PPO), N responses per
prompt (RRHF). Formulas follow the "Formulas" section of DESIGN.md.

Alignment convention: token-level arrays are aligned with the tokens they score.
``token_logprobs(logits, ids)[:, t]`` is the log-probability of ``ids[:, t]`` under the
distribution predicted at position ``t - 1``; column 0 has no predictor and is 0. A loss mask
``mask[b, t] = 1`` marks token ``t`` as a response/target token, so a sequence log-prob is
``masked_sum(token_logprobs(logits, ids), mask, axis=-1)``.

Masks may be bool or float. Masked reductions ignore whatever sits at masked positions (even
inf/nan), and a reduction over an empty mask returns 0 instead of nan.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")
KL_KINDS = ("k1", "k3", "abs", "mse")


def _compute_dtype(x):
    """At least float32 (bf16/f16 logits are upcast; float64 stays float64)."""
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _as_mask(mask, like):
    return jnp.asarray(mask).astype(jnp.result_type(like))


# ----------------------------------------------------------------------------- masked stats
def masked_sum(x, mask, axis=None):
    """sum(x * mask) over ``axis``; masked positions contribute exactly 0."""
    x = jnp.asarray(x)
    m = _as_mask(mask, x)
    return jnp.sum(jnp.where(m != 0, x * m, 0), axis=axis)


def masked_mean(x, mask, axis=None):
    """sum(x * mask) / sum(mask) over ``axis``; 0 where the mask is empty."""
    x = jnp.asarray(x)
    m = _as_mask(mask, x)
    count = jnp.sum(m, axis=axis)
    safe = jnp.where(count != 0, count, 1)
    return jnp.where(count != 0, masked_sum(x, m, axis) / safe, 0)


def masked_var(x, mask, unbiased=True):
    """Variance of the valid entries of ``x`` (all axes), TRL semantics.

    ``unbiased`` applies Bessel's correction n / (n - 1) with n = sum(mask); with n <= 1 the
    correction is skipped (TRL raises there; a jitted function cannot).
    """
    x = jnp.asarray(x)
    m = _as_mask(mask, x)
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
    z = logits.astype(_compute_dtype(logits))
    if isinstance(temperature, (int, float)) and temperature == 1:
        return z
    return z / temperature


def _next_token_stats(logits, input_ids, temperature):
    """(z, picked, lse), each position t scored against input_ids[:, t+1] (the last position's
    target is a dummy 0 and its values are dropped by `_shift`). z [B,T,V], picked/lse [B,T]."""
    z = _scaled(logits, temperature)
    nxt = jnp.pad(input_ids[:, 1:].astype(jnp.int32), ((0, 0), (0, 1)))
    picked = jnp.take_along_axis(z, nxt[..., None], axis=-1)[..., 0]
    return z, picked, jax.nn.logsumexp(z, axis=-1)


def _shift(x):
    """[B, T] per predicting position -> token-aligned: out[:, t] = x[:, t-1], out[:, 0] = 0."""
    return jnp.pad(x[:, :-1], ((0, 0), (1, 0)))


def token_logprobs(logits, input_ids, temperature=1.0):
    """Token-aligned log-probs [B, T] from logits [B, T, V] and input_ids [B, T].

    out[:, t] = log softmax(logits[:, t-1] / temperature)[input_ids[:, t]] for t >= 1,
    out[:, 0] = 0. Computed as gathered logit minus logsumexp (no [B, T, V] log-softmax or
    sliced copy), in float32 (float64 if the logits are float64).
    """
    _, picked, lse = _next_token_stats(logits, input_ids, temperature)
    return _shift(picked - lse)


def token_entropy(logits, temperature=1.0):
    """Entropy [B, T] of the distribution that predicted token t (from logits[:, t-1]); 0 at t=0."""
    z = _scaled(logits, temperature)
    lse = jax.nn.logsumexp(z, axis=-1)
    p = jnp.exp(z - lse[..., None])
    return _shift(lse - jnp.sum(p * z, axis=-1))


# ----------------------------------------------------------------------------- SFT
def sft_loss_sums(logits, input_ids, loss_mask):
    """Sums for token-level cross-entropy: logits [B, T, V], input_ids [B, T], loss_mask [B, T].

    Returns dict(nll_sum, correct_sum, n_tokens) (scalars) over positions t >= 1 with
    loss_mask[:, t] != 0 (column 0 has no predictor and is ignored). Divide by the token count
    of the whole global batch so gradient accumulation gives the same value for any split.
    """
    z, picked, lse = _next_token_stats(logits, input_ids, 1.0)
    lp = _shift(picked - lse)
    m = _as_mask(loss_mask, lp).at[:, 0].set(0)
    # "argmax == target" as "target logit == max logit": a plain max-reduce (fused with the
    # logsumexp's) instead of a variadic argmax over [B, T, V]; differs only on exact ties
    top = jax.lax.stop_gradient(jnp.max(z, axis=-1))
    correct = _shift((jax.lax.stop_gradient(picked) >= top).astype(lp.dtype))
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


def _head_scan(hidden, kernel, targets, weights, chunk: int, grad_h=False, grad_k=False):
    """`_head_chunk` over T in chunks of `chunk` positions (T padded with weight-0 positions)."""
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
    nll, correct, _, _ = _head_scan(hidden, kernel, targets, weights, chunk)
    return nll, correct


def _fused_head_ce_fwd(hidden, kernel, targets, weights, chunk):
    # The gradient of nll_sum is formed here, chunk by chunk, while the logits are at hand (only
    # for the inputs being differentiated: a frozen LM head under LoRA costs no gradient matmul);
    # the backward pass only scales it by the incoming cotangent.
    gh_on, gk_on = hidden.perturbed, kernel.perturbed
    h, k = hidden.value, kernel.value
    nll, correct, gh, gk = _head_scan(h, k, targets.value, weights.value, chunk, gh_on, gk_on)
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


# ----------------------------------------------------------------------------- reward model
def reward_losses(r_chosen, r_rejected, margin=None):
    """Per-pair loss [B] = -log sigmoid(r_c - r_r - m) = softplus(-(r_c - r_r - m))."""
    d = r_chosen - r_rejected
    if margin is not None:
        d = d - margin
    return jax.nn.softplus(-d)


def reward_loss(r_chosen, r_rejected, margin=None):
    """Mean pairwise reward-model loss over B pairs, and metrics.

    Metrics: accuracy = mean(r_c > r_r), margin = mean(r_c - r_r), reward/chosen, reward/rejected.
    """
    loss = jnp.mean(reward_losses(r_chosen, r_rejected, margin))
    metrics = {
        "accuracy": jnp.mean((r_chosen > r_rejected).astype(loss.dtype)),
        "margin": jnp.mean(r_chosen - r_rejected),
        "reward/chosen": jnp.mean(r_chosen),
        "reward/rejected": jnp.mean(r_rejected),
    }
    return loss, metrics


# ----------------------------------------------------------------------------- DPO
def dpo_losses(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
               *, beta, loss_type="sigmoid", label_smoothing=0.0, reference_free=False,
               chosen_lengths=None, rejected_lengths=None):
    """DPO-family losses from summed response log-probs (all [B]).

    h = (pc - rc) - (pr - rr) (reference terms 0 when ``reference_free``; the ref arrays may
    then be None). loss_type:
      sigmoid: -(1-eps) log sig(beta h) - eps log sig(-beta h)
      robust:  (-(1-eps) log sig(beta h) + eps log sig(-beta h)) / (1 - 2 eps)
      hinge:   relu(1 - beta h)
      ipo:     (h - 1/(2 beta))^2, each log-ratio divided by its response length
               (``chosen_lengths``/``rejected_lengths`` [B] required).
    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]); implicit rewards are
    beta * (logp - logp_ref) on the summed log-probs, stop_gradient'ed.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if reference_free:
        ref_c = jnp.zeros_like(policy_chosen_logps)
        ref_r = jnp.zeros_like(policy_rejected_logps)
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError("ref_chosen_logps and ref_rejected_logps are required unless "
                             "reference_free=True")
        ref_c, ref_r = ref_chosen_logps, ref_rejected_logps
    eps = label_smoothing
    chosen_ratio = policy_chosen_logps - ref_c
    rejected_ratio = policy_rejected_logps - ref_r
    if loss_type == "ipo":
        for name, val in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
            if val is None:
                raise ValueError(f"dpo_losses(loss_type='ipo') requires {name} (response lengths [B])")
        h = (chosen_ratio / jnp.maximum(chosen_lengths, 1)
             - rejected_ratio / jnp.maximum(rejected_lengths, 1))
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        h = chosen_ratio - rejected_ratio
        pos, neg = jax.nn.log_sigmoid(beta * h), jax.nn.log_sigmoid(-beta * h)
        if loss_type == "sigmoid":
            losses = -(1.0 - eps) * pos - eps * neg
        elif loss_type == "robust":
            if isinstance(eps, (int, float)) and eps >= 0.5:
                raise ValueError(f"robust DPO needs label_smoothing < 0.5, got {eps}")
            losses = (-(1.0 - eps) * pos + eps * neg) / (1.0 - 2.0 * eps)
        else:  # hinge
            losses = jax.nn.relu(1.0 - beta * h)
    chosen_rewards = jax.lax.stop_gradient(beta * chosen_ratio)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_ratio)
    return losses, chosen_rewards, rejected_rewards


def dpo_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps):
    """Batch means (TRL names) of implicit rewards, their accuracy/margin, and policy log-probs."""
    return {
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(chosen_rewards.dtype)),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
        "logps/chosen": jnp.mean(policy_chosen_logps),
        "logps/rejected": jnp.mean(policy_rejected_logps),
    }


# ----------------------------------------------------------------------------- RRHF
def rrhf_loss(logp_sums, lengths, scores, valid, nll_sums, *, length_penalty=1.0, rank_weight=1.0):
    """RRHF loss for N candidate responses per prompt (all inputs [B, N]).

    p_i = logp_sums_i / lengths_i ** length_penalty (true response lengths). Ranking term: per
    prompt, sum over ordered pairs (i, j) of valid responses with score_i < score_j of
    relu(p_i - p_j) (ties give no pair), averaged over B. SFT term: nll_sums / lengths of the
    best-scored valid response (first one on ties), averaged over B; a row with no valid
    response contributes 0 to both terms. L = rank_weight * rank + sft.
    Metrics: loss/rank, loss/sft, rank_pairs (ordered pairs in the batch), rank_acc (fraction
    of those pairs with p_i < p_j).
    """
    dt = _compute_dtype(logp_sums)
    lengths = jnp.maximum(jnp.asarray(lengths, dt), 1)
    valid = jnp.asarray(valid, bool)
    scores = jnp.asarray(scores, dt)
    p = jnp.where(valid, logp_sums.astype(dt) / lengths ** length_penalty, 0)
    pair = valid[:, :, None] & valid[:, None, :] & (scores[:, :, None] < scores[:, None, :])
    diff = p[:, :, None] - p[:, None, :]  # [B, N, N]: p_i - p_j
    b = logp_sums.shape[0]
    rank = jnp.sum(jnp.where(pair, jax.nn.relu(diff), 0)) / b
    best = jnp.argmax(jnp.where(valid, scores, -jnp.inf), axis=-1)
    best_nll = jnp.take_along_axis(nll_sums.astype(dt) / lengths, best[:, None], axis=-1)[:, 0]
    sft = jnp.sum(jnp.where(jnp.any(valid, axis=-1), best_nll, 0)) / b
    n_pairs = jnp.sum(pair).astype(dt)
    metrics = {
        "loss/rank": rank,
        "loss/sft": sft,
        "rank_pairs": n_pairs,
        "rank_acc": jnp.sum(pair & (diff < 0)) / jnp.maximum(n_pairs, 1),
    }
    return rank_weight * rank + sft, metrics


# ----------------------------------------------------------------------------- PPO
def kl_penalty(logp, ref_logp, kind="k1"):
    """Per-token KL estimate [B, R]: k1 = logp - ref; k3 = exp(ref - logp) - 1 - (ref - logp);
    abs = |logp - ref|; mse = 0.5 (logp - ref)^2."""
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k3":
        return jnp.expm1(-d) + d
    if kind == "abs":
        return jnp.abs(d)
    if kind == "mse":
        return 0.5 * d * d
    raise ValueError(f"unknown kl kind {kind!r}; valid: {', '.join(KL_KINDS)}")


def ppo_rewards(scores, logp, ref_logp, mask, *, kl_coef, kl_kind="k1", has_eos=None,
                missing_eos_penalty=None):
    """Per-token PPO rewards from scores [B] and response log-probs [B, R] with mask [B, R].

    r_t = -kl_coef * kl_t (0 where mask is 0); at the last valid token of each row the score is
    added (minus ``missing_eos_penalty`` where ``has_eos`` [B] is False, if a penalty is given).
    Rows with an empty mask get no score. Returns (rewards [B, R], kl [B, R] masked to 0).
    """
    m = _as_mask(mask, logp)
    diff_ok = m != 0
    kl = jnp.where(diff_ok, kl_penalty(jnp.where(diff_ok, logp, 0), jnp.where(diff_ok, ref_logp, 0),
                                       kl_kind), 0)
    score = jnp.asarray(scores, logp.dtype)
    if missing_eos_penalty is not None:
        if has_eos is None:
            raise ValueError("ppo_rewards: missing_eos_penalty given without has_eos [B]")
        score = score - jnp.where(jnp.asarray(has_eos, bool), 0.0, missing_eos_penalty)
    r = m.shape[-1]
    last = r - 1 - jnp.argmax(diff_ok[:, ::-1], axis=-1)  # last index with mask != 0
    at_last = (jnp.arange(r)[None, :] == last[:, None]) & jnp.any(diff_ok, axis=-1, keepdims=True)
    rewards = -kl_coef * kl + jnp.where(at_last, score[:, None], 0)
    return rewards, kl


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation over response tokens (all [B, R]), reverse lax.scan.

    rewards and values are zeroed where mask == 0; V after the last token is 0.
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, returns = A + V.
    Advantages are 0 at masked positions. Returns (advantages, returns), not whitened.
    """
    m = _as_mask(mask, values)
    ok = m != 0
    r = jnp.where(ok, rewards, 0)
    v = jnp.where(ok, values, 0)

    def step(carry, xs):
        next_v, next_a = carry
        r_t, v_t = xs
        a_t = r_t + gamma * next_v - v_t + gamma * lam * next_a
        return (v_t, a_t), a_t

    zero = jnp.zeros(r.shape[0], r.dtype)
    _, adv = jax.lax.scan(step, (zero, zero), (r.T, v.T), reverse=True)
    adv = jnp.where(ok, adv.T, 0)
    return adv, adv + v


def ppo_policy_loss(logp, old_logp, advantages, mask, clip):
    """Clipped PPO policy loss over response tokens (all [B, R]).

    rho = exp(logp - old_logp); loss = masked_mean(max(-A rho, -A clip(rho, 1-c, 1+c))).
    Metrics: policy/approxkl = 0.5 masked_mean((logp - old_logp)^2), policy/clipfrac (fraction
    where the clipped branch is strictly larger), policy/ratio = masked_mean(rho).
    """
    ok = _as_mask(mask, logp) != 0
    d = jnp.where(ok, logp - old_logp, 0)
    rho = jnp.exp(d)
    l1 = -advantages * rho
    l2 = -advantages * jnp.clip(rho, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(l1, l2), mask)
    metrics = {
        "policy/approxkl": 0.5 * masked_mean(d * d, mask),
        "policy/clipfrac": masked_mean((l2 > l1).astype(rho.dtype), mask),
        "policy/ratio": masked_mean(rho, mask),
    }
    return loss, metrics


def ppo_value_loss(values, old_values, returns, mask, clip):
    """Clipped value loss over response tokens (all [B, R]).

    0.5 masked_mean(max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2)).
    Metrics: val/clipfrac (fraction where the clipped branch is strictly larger), val/mean.
    """
    v_clipped = jnp.clip(values, old_values - clip, old_values + clip)
    l1 = (values - returns) ** 2
    l2 = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(l1, l2), mask)
    metrics = {
        "val/clipfrac": masked_mean((l2 > l1).astype(l1.dtype), mask),
        "val/mean": masked_mean(values, mask),
    }
    return loss, metrics


def adaptive_kl_update(kl_coef, current_kl, n_steps, *, target, horizon):
    """Adaptive KL controller (Ziegler et al.): e = clip(kl / target - 1, -0.2, 0.2);
    new_coef = kl_coef * (1 + e * n_steps / horizon). Python floats in -> python float out."""
    if all(isinstance(x, (int, float)) for x in (kl_coef, current_kl, n_steps)):
        e = min(max(current_kl / target - 1.0, -0.2), 0.2)
        return float(kl_coef * (1.0 + e * n_steps / horizon))
    e = jnp.clip(jnp.asarray(current_kl) / target - 1.0, -0.2, 0.2)
    return kl_coef * (1.0 + e * n_steps / horizon)
