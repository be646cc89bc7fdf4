"""easyrl.losses against independent float64 numpy references (loops where it reads clearer)."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easyrl import losses as L

TOL = dict(rtol=1e-6, atol=1e-6)
SEEDS = [0, 1, 2]


@pytest.fixture(autouse=True)
def _x64():
    """float64 for this module only (do not leak x64 into other test modules)."""
    with jax.enable_x64(True):
        yield


def close(a, b):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), **TOL)


# ----------------------------------------------------------------------------- numpy references
def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def ref_token_logprobs(logits, ids, temp=1.0):
    b, t, _ = logits.shape
    out = np.zeros((b, t))
    for i in range(b):
        for j in range(1, t):
            out[i, j] = np_log_softmax(logits[i, j - 1] / temp)[ids[i, j]]
    return out


def ref_token_entropy(logits, temp=1.0):
    b, t, _ = logits.shape
    out = np.zeros((b, t))
    for i in range(b):
        for j in range(1, t):
            lp = np_log_softmax(logits[i, j - 1] / temp)
            out[i, j] = -(np.exp(lp) * lp).sum()
    return out


def ref_masked_mean(x, m):
    return (x * m).sum() / m.sum()


def ref_masked_var(x, m, unbiased=True):
    v = x[m.astype(bool)]
    return v.var(ddof=1 if unbiased else 0)


def ref_sft(logits, ids, mask):
    nll = correct = n = 0.0
    for i in range(ids.shape[0]):
        for j in range(1, ids.shape[1]):
            if mask[i, j]:
                lp = np_log_softmax(logits[i, j - 1])
                nll -= lp[ids[i, j]]
                correct += float(np.argmax(logits[i, j - 1]) == ids[i, j])
                n += 1
    return nll, correct, n


def log_sig(x):
    return -np.logaddexp(0.0, -x)


def ref_dpo(pc, pr, rc, rr, beta, loss_type, eps, ref_free, lc=None, lr=None):
    out, cr, rjr = [], [], []
    for i in range(len(pc)):
        rci, rri = (0.0, 0.0) if ref_free else (rc[i], rr[i])
        if loss_type == "ipo":
            h = (pc[i] - rci) / lc[i] - (pr[i] - rri) / lr[i]
            out.append((h - 1 / (2 * beta)) ** 2)
        else:
            h = (pc[i] - rci) - (pr[i] - rri)
            if loss_type == "sigmoid":
                out.append(-(1 - eps) * log_sig(beta * h) - eps * log_sig(-beta * h))
            elif loss_type == "robust":
                out.append((-(1 - eps) * log_sig(beta * h) + eps * log_sig(-beta * h)) / (1 - 2 * eps))
            else:
                out.append(max(0.0, 1 - beta * h))
        cr.append(beta * (pc[i] - rci))
        rjr.append(beta * (pr[i] - rri))
    return np.array(out), np.array(cr), np.array(rjr)


def sig(x):
    return math.exp(-np.logaddexp(0.0, -x))


def ref_dpo_trl(pc, pr, rc, rr, beta, loss_type, eps, ref_free, lc=None, tau=0.05):
    """TRL DPOTrainer.dpo_loss / the papers' formulas for the loss types beyond the original
    four, pair by pair (batch statistics by explicit loops, sorting by `sorted`)."""
    b = len(pc)
    rc = [0.0] * b if ref_free else list(rc)
    rr = [0.0] * b if ref_free else list(rr)
    c = [pc[i] - rc[i] for i in range(b)]  # chosen log-ratio
    r = [pr[i] - rr[i] for i in range(b)]  # rejected log-ratio
    smooth = lambda z: -(1 - eps) * log_sig(z) - eps * log_sig(-z)  # noqa: E731
    out = []
    if loss_type == "bco_pair":
        delta = 0.0
        for i in range(b):
            delta += beta * c[i] + beta * r[i]
        delta /= 2 * b
    if loss_type == "aot":
        d = [x - y for x, y in zip(sorted(pc[i] - pr[i] for i in range(b)),
                                   sorted(rc[i] - rr[i] for i in range(b)))]
    if loss_type in ("aot_pair", "aot_unpaired"):
        d = [x - y for x, y in zip(sorted(c), sorted(r))]
    if loss_type == "sft":
        tokens = nll = 0.0
        for i in range(b):
            nll -= pc[i]
            tokens += lc[i]
    for i in range(b):
        h = c[i] - r[i]
        if loss_type == "exo_pair":
            e = eps if eps > 0 else 1e-3
            z = beta * h
            out.append(sig(z) * (log_sig(z) - math.log(1 - e)) + sig(-z) * (log_sig(-z) - math.log(e)))
        elif loss_type == "nca_pair":
            out.append(-log_sig(beta * c[i]) - 0.5 * log_sig(-beta * c[i]) - 0.5 * log_sig(-beta * r[i]))
        elif loss_type == "bco_pair":
            out.append(-log_sig(beta * c[i] - delta) - log_sig(-(beta * r[i] - delta)))
        elif loss_type == "sppo_hard":
            out.append((c[i] - 0.5 / beta) ** 2 + (r[i] + 0.5 / beta) ** 2)
        elif loss_type in ("aot", "aot_pair", "aot_unpaired"):
            out.append(smooth(beta * d[i]))
        elif loss_type == "apo_zero":
            out.append((1 - sig(beta * c[i])) + sig(beta * r[i]))
        elif loss_type == "apo_down":
            out.append(sig(beta * c[i]) + (1 - sig(beta * h)))
        elif loss_type == "discopop":
            z = beta * h
            m = sig(z / tau)
            out.append(-log_sig(z) * (1 - m) + math.exp(-z) * m)
        elif loss_type == "sft":
            out.append(nll / tokens)
        else:
            raise AssertionError(loss_type)
    return np.array(out), beta * np.array(c), beta * np.array(r)


def ref_rrhf(logp, lengths, scores, valid, nll, alpha, w):
    b, n = logp.shape
    rank = 0.0
    pairs = good = 0
    sft = 0.0
    for i in range(b):
        p = [logp[i, k] / lengths[i, k] ** alpha for k in range(n)]
        for a in range(n):
            for c in range(n):
                if valid[i, a] and valid[i, c] and scores[i, a] < scores[i, c]:
                    rank += max(0.0, p[a] - p[c])
                    pairs += 1
                    good += p[a] < p[c]
        cands = [k for k in range(n) if valid[i, k]]
        if cands:
            best = max(cands, key=lambda k: (scores[i, k], -k))  # first index on ties
            sft += nll[i, best] / lengths[i, best]
    rank /= b
    sft /= b
    return w * rank + sft, rank, sft, pairs, good / max(pairs, 1)


def ref_kl(lp, ref, kind):
    d = lp - ref
    return {"k1": d, "k3": np.exp(-d) - 1 + d, "abs": np.abs(d), "mse": 0.5 * d * d}[kind]


def ref_ppo_rewards(scores, lp, ref, mask, kl_coef, kind, has_eos, pen):
    kl = np.where(mask > 0, ref_kl(np.where(mask > 0, lp, 0), np.where(mask > 0, ref, 0), kind), 0)
    rew = -kl_coef * kl
    for i in range(len(scores)):
        idx = np.nonzero(mask[i])[0]
        if len(idx):
            s = scores[i] - (pen if (pen is not None and not has_eos[i]) else 0.0)
            rew[i, idx[-1]] += s
    return rew, kl


def ref_gae(rew, val, mask, gamma, lam):
    b, r = rew.shape
    rew = np.where(mask > 0, rew, 0.0)
    val = np.where(mask > 0, val, 0.0)
    adv = np.zeros((b, r))
    for i in range(b):
        last = 0.0
        for t in reversed(range(r)):
            nv = val[i, t + 1] if t + 1 < r else 0.0
            delta = rew[i, t] + gamma * nv - val[i, t]
            last = delta + gamma * lam * last
            adv[i, t] = last
    adv = np.where(mask > 0, adv, 0.0)
    return adv, adv + val


# ----------------------------------------------------------------------------- random inputs
def rand_seq_batch(rng, b=4, t=9, v=11):
    """logits, ids, and a mask of [prompt zeros | response ones | pad zeros] per row."""
    logits = rng.normal(size=(b, t, v)) * 3
    ids = rng.integers(0, v, size=(b, t))
    mask = np.zeros((b, t))
    for i in range(b):
        p = rng.integers(1, t // 2)
        r = rng.integers(1, t - p + 1)
        mask[i, p:p + r] = 1
    mask[0, 0] = 1  # column 0 has no predictor: must be ignored by the SFT sums
    return logits, ids, mask


def rand_response_mask(rng, b=5, r=8, allow_empty=False):
    lens = rng.integers(0 if allow_empty else 1, r + 1, size=b)
    lens[0] = r  # one full row
    return (np.arange(r)[None] < lens[:, None]).astype(np.float64)


# ----------------------------------------------------------------------------- token level
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temp", [1.0, 0.7])
def test_token_logprobs_and_entropy(seed, temp):
    rng = np.random.default_rng(seed)
    logits, ids, mask = rand_seq_batch(rng)
    lp = jax.jit(L.token_logprobs)(jnp.asarray(logits), jnp.asarray(ids), temp)
    assert lp.dtype == jnp.float64  # the 1e-6 comparisons below really are float64
    close(lp, ref_token_logprobs(logits, ids, temp))
    ent = jax.jit(L.token_entropy)(jnp.asarray(logits), temp)
    close(ent, ref_token_entropy(logits, temp))
    # sequence log-prob == sum of a numpy log-softmax gather over the masked targets
    lsm = np_log_softmax(logits[:, :-1] / temp)
    gathered = np.take_along_axis(lsm, ids[:, 1:, None], -1)[..., 0]
    close(L.masked_sum(lp, mask, axis=-1), (gathered * mask[:, 1:]).sum(-1))


def test_token_logprobs_dtype_float32_from_bf16():
    with jax.enable_x64(False):
        logits = jnp.zeros((2, 3, 5), jnp.bfloat16)
        out = L.token_logprobs(logits, jnp.zeros((2, 3), jnp.int32))
        assert out.dtype == jnp.float32 and out.shape == (2, 3)
        close(out[:, 1:], np.full((2, 2), -math.log(5)))
        close(out[:, 0], 0.0)


def ref_keep(z, top_k, top_p):
    """transformers' TopKLogitsWarper then TopPLogitsWarper on one row z [V] (stable sort)."""
    keep = np.ones(z.shape, bool)
    if 0 < top_k < len(z):
        keep = z >= np.sort(z)[::-1][top_k - 1]
    if top_p < 1.0:
        zk = np.where(keep, z, -np.inf)
        order = np.argsort(zk, kind="stable")
        e = np.exp(zk[order] - zk.max())
        remove = np.cumsum(e / e.sum()) <= 1 - top_p
        remove[-1] = False
        keep = np.zeros(z.shape, bool)
        keep[order] = ~remove
    return keep


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("top_k,top_p", [(0, 0.61), (3, 1.0), (4, 0.83), (1, 0.45), (0, 1.0)])
def test_filtered_logprobs_vs_reference(seed, top_k, top_p):
    """log softmax over the tokens top-k / top-p keep (ties included as HF's warpers keep them);
    a target outside the kept set is normalized over the kept set plus itself; no filter =
    plain log softmax, bit for bit; gradients finite, none to dropped non-target tokens."""
    from easyrl.losses.common import filtered_logprobs, keep_mask
    rng = np.random.default_rng(seed)
    temp = 0.7
    logits = rng.integers(0, 5, size=(3, 6, 11)) * 0.8 + (rng.random((3, 6, 11)) < 0.3) * rng.normal(size=(3, 6, 11))
    ids = rng.integers(0, 11, size=(3, 6))
    z = logits / temp
    want, n_out = np.zeros(ids.shape), 0
    for idx in np.ndindex(ids.shape):
        k = ref_keep(z[idx], top_k, top_p)
        n_out += not k[ids[idx]]
        k[ids[idx]] = True
        want[idx] = np_log_softmax(np.where(k, z[idx], -np.inf))[ids[idx]]
        got_keep = keep_mask(jnp.asarray(z[idx][None]), top_k, top_p)
        assert np.array_equal(np.ones(11, bool) if got_keep is None else np.asarray(got_keep)[0],
                              ref_keep(z[idx], top_k, top_p))
    fn = jax.jit(filtered_logprobs, static_argnums=(2, 3, 4))
    got = fn(jnp.asarray(logits), jnp.asarray(ids), temp, top_k, top_p)
    close(got, want)
    if top_k == 0 and top_p == 1.0:  # = token_logprobs, bit for bit
        tl = jax.jit(L.token_logprobs)(jnp.asarray(logits), jnp.asarray(ids), temp)[:, 1:]
        aligned = fn(jnp.asarray(logits[:, :-1]), jnp.asarray(ids[:, 1:]), temp, 0, 1.0)
        np.testing.assert_array_equal(np.asarray(aligned), np.asarray(tl))
    else:
        assert n_out > 0  # the out-of-set rule is exercised
    g = jax.grad(lambda x: jnp.sum(filtered_logprobs(x, jnp.asarray(ids), temp, top_k, top_p)))(
        jnp.asarray(logits))
    assert np.all(np.isfinite(np.asarray(g)))
    for idx in np.ndindex(ids.shape):
        k = ref_keep(z[idx], top_k, top_p)
        k[ids[idx]] = True
        assert np.all(np.asarray(g)[idx][~k] == 0)


@pytest.mark.parametrize("seed", SEEDS)
def test_masked_stats_and_whiten(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4, 7)) * 2 + 1
    m = (rng.random((4, 7)) < 0.6).astype(np.float64)
    m[0, 0] = 1
    m[0, 1] = 1
    x_bad = np.where(m > 0, x, np.nan)  # garbage at masked positions must not leak
    close(L.masked_sum(x_bad, m), (x * m).sum())
    close(L.masked_mean(x_bad, m), ref_masked_mean(x, m))
    close(L.masked_mean(x, m, axis=1)[m.sum(1) > 0],
          ((x * m).sum(1) / np.maximum(m.sum(1), 1))[m.sum(1) > 0])
    close(L.masked_var(x, m), ref_masked_var(x, m))
    close(L.masked_var(x, m, unbiased=False), ref_masked_var(x, m, unbiased=False))
    mu, var = ref_masked_mean(x, m), ref_masked_var(x, m)
    close(L.whiten(x, m), (x - mu) / np.sqrt(var + 1e-8))
    close(L.whiten(x, m, shift_mean=False), (x - mu) / np.sqrt(var + 1e-8) + mu)
    assert float(L.masked_mean(x, np.zeros_like(m))) == 0.0


# ----------------------------------------------------------------------------- SFT
@pytest.mark.parametrize("seed", SEEDS)
def test_sft_sums_and_split_invariance(seed):
    rng = np.random.default_rng(seed)
    logits, ids, mask = rand_seq_batch(rng, b=6)
    s = jax.jit(L.sft_loss_sums)(logits, ids, mask)
    nll, correct, n = ref_sft(logits, ids, mask)
    close(s["nll_sum"], nll)
    close(s["correct_sum"], correct)
    close(s["n_tokens"], n)
    close(L.sft_loss(logits, ids, mask), nll / n)
    # accumulate over an uneven split, divide by the global count: same as the whole batch
    parts = [L.sft_loss_sums(logits[a:b], ids[a:b], mask[a:b]) for a, b in [(0, 1), (1, 4), (4, 6)]]
    close(sum(p["nll_sum"] for p in parts) / sum(p["n_tokens"] for p in parts), nll / n)



def ref_head_sft(hidden, kernel, ids, mask):
    """SFT sums and d nll_sum / d (hidden, kernel) for logits = hidden @ kernel, in float64 numpy:
    d nll / d z_t = softmax(z_t) - onehot(target) at each position t that predicts a target."""
    logits = hidden @ kernel
    nll, correct, n = ref_sft(logits, ids, mask)
    dz = np.zeros_like(logits)
    for i in range(ids.shape[0]):
        for j in range(1, ids.shape[1]):
            if mask[i, j]:
                p = np.exp(np_log_softmax(logits[i, j - 1]))
                p[ids[i, j]] -= 1
                dz[i, j - 1] = p
    return nll, correct, n, dz @ kernel.T, np.einsum("btd,btv->dv", hidden, dz)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("chunk", [1, 4, 9, 64])  # 4 does not divide T = 9: padded positions
def test_lm_head_loss_sums_vs_reference(seed, chunk):
    rng = np.random.default_rng(seed)
    b, t, d, v = 3, 9, 6, 11
    _, ids, mask = rand_seq_batch(rng, b=b, t=t, v=v)
    hidden, kernel = rng.normal(size=(b, t, d)), rng.normal(size=(d, v))
    hidden[1, -1] = np.nan  # the last position predicts nothing: must not leak
    hidden[2, np.nonzero(mask[2] == 0)[0][-1] - 1] = np.nan  # predicts a masked token
    nll, correct, n, gh, gk = ref_head_sft(np.nan_to_num(hidden), kernel, ids, mask)
    f = functools.partial(L.lm_head_loss_sums, input_ids=ids, loss_mask=mask, chunk=chunk)
    s = jax.jit(f)(hidden, kernel)
    assert s["nll_sum"].dtype == jnp.float64
    close(s["nll_sum"], nll)
    close(s["correct_sum"], correct)
    close(s["n_tokens"], n)
    # gradients of a function of nll_sum (the cotangent scales the precomputed gradient)
    got_h, got_k = jax.jit(jax.grad(lambda h, k: 0.37 * f(h, k)["nll_sum"] ** 2, (0, 1)))(
        hidden, kernel)
    scale = 0.37 * 2 * nll
    ok = ~np.isnan(hidden)
    close(np.where(ok, got_h, 0), scale * np.where(ok, gh, 0))
    close(got_k, scale * gk)
    # a frozen head (LoRA) or hidden: the gradient of the other input alone; metrics: none
    only_h = jax.grad(lambda h: 0.37 * f(h, kernel)["nll_sum"] ** 2)(hidden)
    close(np.where(ok, only_h, 0), np.where(ok, got_h, 0))
    close(jax.grad(lambda k: 0.37 * f(hidden, k)["nll_sum"] ** 2)(kernel), got_k)
    close(jax.grad(lambda k: f(hidden, k)["correct_sum"])(kernel), np.zeros_like(kernel))
    # and equal to the plain logits path (sft_loss_sums over hidden @ kernel)
    h0 = np.nan_to_num(hidden)
    plain = L.sft_loss_sums(jnp.einsum("btd,dv->btv", h0, kernel), ids, mask)
    close(s["nll_sum"], plain["nll_sum"])


def test_lm_head_loss_sums_bf16_float32_sums():
    with jax.enable_x64(False):
        h = jnp.zeros((2, 5, 4), jnp.bfloat16)
        k = jnp.zeros((4, 7), jnp.bfloat16)
        ids, m = jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 5))
        s = L.lm_head_loss_sums(h, k, ids, m, chunk=2)
        assert s["nll_sum"].dtype == jnp.float32
        close(s["nll_sum"], 8 * math.log(7))  # 2 rows x 4 targets, uniform over 7
        gh, gk = jax.grad(lambda h, k: L.lm_head_loss_sums(h, k, ids, m, chunk=2)["nll_sum"],
                          (0, 1))(h, k)
        assert gh.dtype == jnp.bfloat16 and gk.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- reward model
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("use_margin", [False, True])
def test_reward_loss(seed, use_margin):
    rng = np.random.default_rng(seed)
    rc, rr = rng.normal(size=8) * 2, rng.normal(size=8) * 2
    m = rng.random(8) if use_margin else None
    d = rc - rr - (m if use_margin else 0)
    per = np.logaddexp(0.0, -d)
    close(L.reward_losses(rc, rr, m), per)
    loss, met = jax.jit(L.reward_loss)(rc, rr, m)
    close(loss, per.mean())
    close(met["accuracy"], (rc > rr).mean())
    close(met["margin"], (rc - rr).mean())
    close(met["reward/chosen"], rc.mean())
    close(met["reward/rejected"], rr.mean())


# ----------------------------------------------------------------------------- DPO
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1),
                                           ("hinge", 0.0), ("ipo", 0.0)])
@pytest.mark.parametrize("ref_free", [False, True])
def test_dpo_losses_vs_reference(seed, loss_type, eps, ref_free):
    rng = np.random.default_rng(seed)
    b, beta = 6, 0.1
    pc, pr, rc, rr = (rng.normal(size=b) * 20 - 50 for _ in range(4))
    lc, lr = rng.integers(1, 40, size=b).astype(np.float64), rng.integers(1, 40, size=b).astype(np.float64)
    fn = jax.jit(functools.partial(L.dpo_losses, beta=beta, loss_type=loss_type, label_smoothing=eps,
                                   reference_free=ref_free))
    got = fn(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr)
    want = ref_dpo(pc, pr, rc, rr, beta, loss_type, eps, ref_free, lc, lr)
    for g, w in zip(got, want):
        close(g, w)


def test_dpo_properties():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(size=5) * 5 for _ in range(4))
    beta = 0.5
    h = (pc - rc) - (pr - rr)
    losses, cr, rjr = L.dpo_losses(pc, pr, rc, rr, beta=beta)
    close(losses, -jax.nn.log_sigmoid(beta * h))
    close(cr, beta * (pc - rc))
    close(rjr, beta * (pr - rr))
    # robust with eps=0 and sigmoid agree; hinge and ipo closed forms
    close(L.dpo_losses(pc, pr, rc, rr, beta=beta, loss_type="robust")[0], losses)
    close(L.dpo_losses(pc, pr, rc, rr, beta=beta, loss_type="hinge")[0], np.maximum(0, 1 - beta * h))
    ones = np.ones(5)
    close(L.dpo_losses(pc, pr, rc, rr, beta=beta, loss_type="ipo", chosen_lengths=ones,
                       rejected_lengths=ones)[0], (h - 1 / (2 * beta)) ** 2)
    # reference-free: ref terms are 0 (None accepted), rewards are beta * logp
    lf, cf, rf = L.dpo_losses(pc, pr, None, None, beta=beta, reference_free=True)
    close(lf, -jax.nn.log_sigmoid(beta * (pc - pr)))
    close(cf, beta * pc)
    close(rf, beta * pr)
    # rewards carry no gradient; the loss does
    g = jax.grad(lambda x: L.dpo_losses(x, pr, rc, rr, beta=beta)[1].sum())(jnp.asarray(pc))
    assert np.all(np.asarray(g) == 0)
    g = jax.grad(lambda x: L.dpo_losses(x, pr, rc, rr, beta=beta)[0].sum())(jnp.asarray(pc))
    close(g, -beta * jax.nn.sigmoid(-beta * h))


def test_dpo_errors_and_metrics():
    x = np.zeros(3)
    with pytest.raises(ValueError, match="sigmoid.*robust.*hinge.*ipo"):
        L.dpo_losses(x, x, x, x, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="chosen_lengths"):
        L.dpo_losses(x, x, x, x, beta=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="rejected_lengths"):
        L.dpo_losses(x, x, x, x, beta=0.1, loss_type="ipo", chosen_lengths=x + 1)
    cr, rjr = np.array([1.0, -1.0, 2.0, 0.5]), np.array([0.0, 0.0, 3.0, 0.5])
    pc, pr = np.array([-1.0, -2.0, -3.0, -4.0]), np.array([-5.0, -6.0, -7.0, -8.0])
    met = L.dpo_metrics(cr, rjr, pc, pr)
    want = {"rewards/chosen": cr.mean(), "rewards/rejected": rjr.mean(), "rewards/accuracies": 0.25,
            "rewards/margins": (cr - rjr).mean(), "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}
    assert set(met) == set(want)
    for k, v in want.items():
        close(met[k], v)


NEW_DPO_CASES = [("exo_pair", 0.0), ("exo_pair", 0.2), ("nca_pair", 0.0), ("bco_pair", 0.0),
                 ("sppo_hard", 0.0), ("aot", 0.0), ("aot", 0.15), ("aot_pair", 0.0),
                 ("aot_pair", 0.15), ("aot_unpaired", 0.15), ("apo_zero", 0.0), ("apo_down", 0.0),
                 ("discopop", 0.0), ("sft", 0.0)]


def random_pairs(seed, b=7):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = (rng.normal(size=b) * 20 - 50 for _ in range(4))
    lc, lr = (rng.integers(1, 40, size=b).astype(np.float64) for _ in range(2))
    return pc, pr, rc, rr, lc, lr


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("loss_type,eps", NEW_DPO_CASES)
@pytest.mark.parametrize("ref_free", [False, True])
def test_dpo_trl_loss_types_vs_reference(seed, loss_type, eps, ref_free):
    pc, pr, rc, rr, lc, lr = random_pairs(seed)
    beta, tau = (0.1, 0.05) if seed != 2 else (0.3, 0.2)
    fn = jax.jit(functools.partial(L.dpo_losses, beta=beta, loss_type=loss_type, label_smoothing=eps,
                                   reference_free=ref_free, discopop_tau=tau))
    got = fn(pc, pr, None if ref_free else rc, None if ref_free else rr,
             chosen_lengths=lc, rejected_lengths=lr)
    want = ref_dpo_trl(pc, pr, rc, rr, beta, loss_type, eps, ref_free, lc, tau)
    for g, w in zip(got, want):
        close(g, w)


def test_dpo_trl_loss_types_gradients():
    """Batch statistics carry no gradient (bco_pair's shift); aot's sort routes each gradient
    to the pair that holds the quantile; sppo_hard's gradient in closed form."""
    pc, pr, rc, rr, lc, lr = random_pairs(0, b=5)
    beta = 0.1
    grad = lambda kind, **kw: jax.grad(  # noqa: E731
        lambda x: L.dpo_losses(x, pr, rc, rr, beta=beta, loss_type=kind, **kw)[0].sum())(jnp.asarray(pc))
    c, r = pc - rc, pr - rr
    delta = beta * (c.sum() + r.sum()) / (2 * len(pc))
    close(grad("bco_pair"), -beta * np.array([sig(-(beta * x - delta)) for x in c]))
    close(grad("sppo_hard"), 2 * (c - 0.5 / beta))
    order = np.argsort(c)  # chosen ratio of rank k meets the rejected ratio of rank k
    d = np.sort(c) - np.sort(r)
    want = np.zeros(len(pc))
    want[order] = -beta * np.array([sig(-beta * x) for x in d])
    close(grad("aot_pair"), want)


def test_dpo_loss_combination_is_the_weighted_sum():
    pc, pr, rc, rr, lc, lr = random_pairs(1)
    kw = dict(beta=0.2, label_smoothing=0.1, chosen_lengths=lc, rejected_lengths=lr)
    kinds, weights = ("sigmoid", "sppo_hard", "bco_pair", "ipo", "exo_pair"), (1.0, 0.5, 0.0, 2.0, 0.3)
    single = {k: L.dpo_losses(pc, pr, rc, rr, loss_type=k, **kw) for k in kinds}
    want = sum(w * np.asarray(single[k][0], np.float64) for k, w in zip(kinds, weights))
    for lt, lw in ((",".join(kinds), ",".join(map(str, weights))), (kinds, weights),
                   (" sigmoid , sppo_hard,bco_pair, ipo,exo_pair", " 1, 0.5 ,0,2,0.3")):
        got, cr, rjr, terms = L.dpo_losses(pc, pr, rc, rr, loss_type=lt, loss_weights=lw,
                                           return_terms=True, **kw)
        close(got, want)
        close(cr, single["sigmoid"][1])  # rewards: plain beta * log-ratio, not weighted
        close(rjr, single["sigmoid"][2])
        assert set(terms) == {f"loss/{k}" for k in kinds}
        for k in kinds:
            close(terms[f"loss/{k}"], single[k][0])
    # default weights are 1 each; a single type with weight 2 doubles it
    close(L.dpo_losses(pc, pr, rc, rr, loss_type="sigmoid,hinge", **kw)[0],
          np.asarray(single["sigmoid"][0]) + np.asarray(L.dpo_losses(pc, pr, rc, rr, loss_type="hinge", **kw)[0]))
    close(L.dpo_losses(pc, pr, rc, rr, loss_type="sigmoid", loss_weights="2", **kw)[0],
          2 * np.asarray(single["sigmoid"][0]))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo,apo_zero"])
def test_rpo_alpha_adds_alpha_times_chosen_nll(loss_type):
    pc, pr, rc, rr, lc, lr = random_pairs(2)
    alpha, kw = 0.7, dict(beta=0.1, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr)
    nll = 0.0
    for i in range(len(pc)):
        nll -= pc[i]
    nll /= lc.sum()  # TRL nll_loss: token-mean cross-entropy over the batch's chosen responses
    base = np.asarray(L.dpo_losses(pc, pr, rc, rr, **kw)[0], np.float64)
    got, cr, rjr, terms = L.dpo_losses(pc, pr, rc, rr, rpo_alpha=alpha, return_terms=True, **kw)
    close(np.asarray(got) - base, np.full(len(pc), alpha * nll))
    close(terms["nll_loss"], np.full(len(pc), nll))
    close(L.chosen_nll(pc, lc), nll)
    # == the "sft" loss type with weight alpha (TRL's newer spelling of RPO)
    close(L.dpo_losses(pc, pr, rc, rr, **dict(kw, loss_type=loss_type + ",sft"),
                       loss_weights=",".join(["1"] * len(loss_type.split(",")) + [str(alpha)]))[0], got)
    # gradient of the added term: policy chosen log-probs only (-alpha / tokens per pair, summed
    # over the B pairs); nothing to the rejected, the reference or the lengths
    extra = lambda a, b, c, d, n: (L.dpo_losses(a, b, c, d, rpo_alpha=alpha, **dict(kw, chosen_lengths=n))[0]  # noqa: E731
                                   - L.dpo_losses(a, b, c, d, **dict(kw, chosen_lengths=n))[0]).sum()
    g = jax.grad(extra, argnums=(0, 1, 2, 3, 4))(*map(jnp.asarray, (pc, pr, rc, rr, lc)))
    close(g[0], np.full(len(pc), -alpha * len(pc) / lc.sum()))
    for gi in g[1:]:
        assert np.all(np.asarray(gi) == 0)
    # alpha = 0 is off: bit-identical to no RPO
    np.testing.assert_array_equal(L.dpo_losses(pc, pr, rc, rr, rpo_alpha=0.0, **kw)[0], base)


def test_dpo_loss_type_and_weight_errors():
    x = np.zeros(3)
    with pytest.raises(ValueError, match="'kto'.*valid: sigmoid.*sppo_hard"):
        L.dpo_losses(x, x, x, x, beta=0.1, loss_type="sigmoid,kto")
    with pytest.raises(ValueError, match="empty"):
        L.dpo_losses(x, x, x, x, beta=0.1, loss_type="sigmoid,")
    with pytest.raises(ValueError, match="3 weight.*2 loss type"):
        L.dpo_losses(x, x, x, x, beta=0.1, loss_type="sigmoid,hinge", loss_weights="1,1,1")
    with pytest.raises(ValueError, match="1 weight.*2 loss type"):
        L.dpo_losses(x, x, x, x, beta=0.1, loss_type="sigmoid,hinge", loss_weights="1")
    with pytest.raises(ValueError, match=">= 0"):
        L.dpo_losses(x, x, x, x, beta=0.1, loss_type="sigmoid", loss_weights="-1")
    with pytest.raises(ValueError, match="numbers"):
        L.dpo_losses(x, x, x, x, beta=0.1, loss_type="sigmoid", loss_weights="one")
    with pytest.raises(ValueError, match="chosen_lengths"):
        L.dpo_losses(x, x, x, x, beta=0.1, loss_type="sft")
    with pytest.raises(ValueError, match="chosen_lengths"):
        L.dpo_losses(x, x, x, x, beta=0.1, rpo_alpha=1.0)
    assert L.parse_loss_types(" sigmoid, sppo_hard ") == ("sigmoid", "sppo_hard")
    assert L.parse_loss_weights("", 3) == (1.0, 1.0, 1.0)
    assert L.parse_loss_weights((1, 0.5), 2) == (1.0, 0.5)


# ----------------------------------------------------------------------------- RRHF
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("alpha,w", [(1.0, 1.0), (0.7, 2.5)])
def test_rrhf_vs_reference(seed, alpha, w):
    rng = np.random.default_rng(seed)
    b, n = 4, 5
    lengths = rng.integers(1, 30, size=(b, n)).astype(np.float64)
    logp = -rng.random((b, n)) * lengths
    nll = rng.random((b, n)) * lengths
    scores = rng.integers(0, 4, size=(b, n)).astype(np.float64)  # small ints: ties happen
    valid = rng.random((b, n)) < 0.8
    valid[:, 0] = True
    valid[-1] = False  # a row with no valid response
    lengths[~valid] = 0  # padding rows may carry length 0
    fn = jax.jit(functools.partial(L.rrhf_loss, length_penalty=alpha, rank_weight=w))
    loss, met = fn(logp, lengths, scores, valid, nll)
    rl, rank, sft, pairs, acc = ref_rrhf(logp, np.maximum(lengths, 1), scores, valid, nll, alpha, w)
    close(loss, rl)
    close(met["loss/rank"], rank)
    close(met["loss/sft"], sft)
    close(met["rank_pairs"], pairs)
    close(met["rank_acc"], acc)


def test_rrhf_ties_give_no_pairs():
    one = np.ones((1, 3))
    loss, met = L.rrhf_loss(np.array([[-1.0, -5.0, -3.0]]), one, np.array([[2.0, 2.0, 2.0]]),
                            one.astype(bool), np.array([[4.0, 5.0, 6.0]]))
    assert float(met["rank_pairs"]) == 0 and float(met["loss/rank"]) == 0
    close(loss, 4.0)  # first of the tied best


# ----------------------------------------------------------------------------- PPO
@pytest.mark.parametrize("kind", ["k1", "k3", "abs", "mse"])
def test_kl_penalty(kind):
    rng = np.random.default_rng(0)
    lp, ref = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    close(L.kl_penalty(lp, ref, kind), ref_kl(lp, ref, kind))
    if kind != "k1":
        assert np.all(np.asarray(L.kl_penalty(lp, ref, kind)) >= 0)
    with pytest.raises(ValueError, match="k1.*k3.*abs.*mse"):
        L.kl_penalty(lp, ref, "full")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind,pen", [("k1", None), ("k3", 1.5)])
def test_ppo_rewards(seed, kind, pen):
    rng = np.random.default_rng(seed)
    b, r = 5, 8
    mask = rand_response_mask(rng, b, r, allow_empty=True)
    mask[1] = 0  # an empty row gets no score
    lp = np.where(mask > 0, rng.normal(size=(b, r)) - 2, 1e4)  # garbage on padding
    ref = np.where(mask > 0, rng.normal(size=(b, r)) - 2, -1e4)
    scores, has_eos = rng.normal(size=b), rng.random(b) < 0.5
    fn = jax.jit(functools.partial(L.ppo_rewards, kl_coef=0.05, kl_kind=kind, missing_eos_penalty=pen))
    rew, kl = fn(scores, lp, ref, mask, has_eos=has_eos)
    want_rew, want_kl = ref_ppo_rewards(scores, lp, ref, mask, 0.05, kind, has_eos, pen)
    close(rew, want_rew)
    close(kl, want_kl)
    with pytest.raises(ValueError, match="has_eos"):
        L.ppo_rewards(scores, lp, ref, mask, kl_coef=0.1, missing_eos_penalty=1.0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_vs_reference(seed, gamma, lam):
    rng = np.random.default_rng(seed)
    mask = rand_response_mask(rng, 5, 9)
    rew = rng.normal(size=mask.shape)
    val = rng.normal(size=mask.shape)
    adv, ret = jax.jit(L.gae)(rew, val, mask, gamma, lam)
    want_adv, want_ret = ref_gae(rew, val, mask, gamma, lam)
    close(adv, want_adv)
    close(ret, want_ret)


def test_gae_gamma_lam_one_is_reverse_cumsum():
    rng = np.random.default_rng(3)
    mask = rand_response_mask(rng, 4, 7)
    rew = rng.normal(size=mask.shape) * mask
    val = rng.normal(size=mask.shape)
    _, ret = L.gae(rew, val, mask, 1.0, 1.0)
    close(ret, np.cumsum(rew[:, ::-1], axis=1)[:, ::-1] * mask)


@pytest.mark.parametrize("seed", SEEDS)
def test_ppo_policy_loss(seed):
    rng = np.random.default_rng(seed)
    mask = rand_response_mask(rng, 5, 8)
    old = rng.normal(size=mask.shape) - 2
    lp = np.where(mask > 0, old + rng.normal(size=mask.shape) * 0.3, 50.0)  # padding garbage
    adv = rng.normal(size=mask.shape)
    c = 0.2
    loss, met = jax.jit(L.ppo_policy_loss)(lp, old, adv, mask, c)
    d = np.where(mask > 0, lp - old, 0)
    rho = np.exp(d)
    l1, l2 = -adv * rho, -adv * np.clip(rho, 1 - c, 1 + c)
    close(loss, ref_masked_mean(np.maximum(l1, l2), mask))
    close(met["policy/approxkl"], 0.5 * ref_masked_mean(d * d, mask))
    close(met["policy/clipfrac"], ref_masked_mean((l2 > l1).astype(float), mask))
    close(met["policy/ratio"], ref_masked_mean(rho, mask))
    assert 0 < float(met["policy/clipfrac"]) < 1
    # logp == old_logp: ratio 1, approx KL 0, no clipping, loss = -mean(A)
    loss, met = L.ppo_policy_loss(old, old, adv, mask, c)
    close(met["policy/ratio"], 1.0)
    close(met["policy/approxkl"], 0.0)
    close(met["policy/clipfrac"], 0.0)
    close(loss, -ref_masked_mean(adv, mask))


@pytest.mark.parametrize("seed", SEEDS)
def test_ppo_value_loss(seed):
    rng = np.random.default_rng(seed)
    mask = rand_response_mask(rng, 5, 8)
    old = rng.normal(size=mask.shape)
    v = old + rng.normal(size=mask.shape) * 0.5
    ret = rng.normal(size=mask.shape)
    c = 0.2
    loss, met = jax.jit(L.ppo_value_loss)(v, old, ret, mask, c)
    l1 = (v - ret) ** 2
    l2 = (np.clip(v, old - c, old + c) - ret) ** 2
    close(loss, 0.5 * ref_masked_mean(np.maximum(l1, l2), mask))
    close(met["val/clipfrac"], ref_masked_mean((l2 > l1).astype(float), mask))
    close(met["val/mean"], ref_masked_mean(v, mask))


@pytest.mark.parametrize("kl,want_e", [(6.0, 0.0), (9.0, 0.2), (1.0, -0.2), (6.6, 0.1)])
def test_adaptive_kl_update(kl, want_e):
    coef, n, target, horizon = 0.2, 256, 6.0, 10000
    want = coef * (1 + want_e * n / horizon)
    got = L.adaptive_kl_update(coef, kl, n, target=target, horizon=horizon)
    assert isinstance(got, float)
    close(got, want)
    got_j = jax.jit(functools.partial(L.adaptive_kl_update, target=target, horizon=horizon))(
        jnp.asarray(coef), jnp.asarray(kl), n)
    close(got_j, want)
