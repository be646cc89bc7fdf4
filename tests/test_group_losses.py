"""easyrl.losses.group (GRPO family, RLOO, REINFORCE++) against float64 numpy references written
from the papers' formulas (loops; never calling the code under test)."""
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


def make_batch(seed, n=6, t=7):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-1.0, 0.5, (n, t))
    old = logp + rng.normal(0, 0.3, (n, t))
    ref = logp + rng.normal(0, 0.3, (n, t))
    lengths = rng.integers(1, t + 1, n)
    lengths[0] = t
    mask = np.zeros((n, t))
    for i in range(n):
        mask[i, :lengths[i]] = 1
    adv = rng.normal(0, 1, n)
    return logp, old, ref, mask, adv


# ----------------------------------------------------------------------------- references
def sample_std(xs):
    """torch.std: sqrt(sum (x - mean)^2 / (n - 1)); 0 for a single element."""
    n = len(xs)
    if n < 2:
        return 0.0
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1))


def ref_group_adv(r, g, kind, scale, eps):
    n = len(r)
    out = np.zeros(n)
    batch_std = sample_std(list(r))
    for b in range(n // g):
        grp = [r[b * g + k] for k in range(g)]
        mu = sum(grp) / g
        for k in range(g):
            i = b * g + k
            if kind == "rloo":
                out[i] = r[i] - (sum(grp) - r[i]) / (g - 1)
            elif scale == "group":
                out[i] = (r[i] - mu) / (sample_std(grp) + eps)
            elif scale == "batch":
                out[i] = (r[i] - mu) / (batch_std + eps)
            else:
                out[i] = r[i] - mu
    return out


def ref_policy_loss(logp, old, adv, mask, el, eh, level):
    n, t = logp.shape
    loss = np.zeros((n, t))
    low = np.zeros((n, t), bool)
    high = np.zeros((n, t), bool)
    for i in range(n):
        valid = [j for j in range(t) if mask[i, j]]
        seq_ratio = math.exp(sum(logp[i, j] - old[i, j] for j in valid) / max(len(valid), 1))
        for j in valid:
            rho = seq_ratio if level == "sequence" else math.exp(logp[i, j] - old[i, j])
            a = adv[i] if np.ndim(adv) == 1 else adv[i, j]
            loss[i, j] = -min(rho * a, min(max(rho, 1 - el), 1 + eh) * a)
            low[i, j] = rho < 1 - el and a < 0
            high[i, j] = rho > 1 + eh and a > 0
    return loss, low, high


def ref_aggregate(x, mask, loss_type, lmax=None, global_tokens=None, global_seqs=None):
    n, t = x.shape
    if loss_type == "grpo":
        return sum(sum(x[i, j] for j in range(t) if mask[i, j]) / max(mask[i].sum(), 1)
                   for i in range(n)) / n
    total = sum(x[i, j] for i in range(n) for j in range(t) if mask[i, j])
    if loss_type == "bnpo":
        return total / max(mask.sum(), 1)
    if loss_type == "dr_grpo":
        return total / ((global_seqs or n) * lmax)
    return total / (global_tokens if global_tokens is not None else mask.sum())


def ref_reinforce_pp(scores, logp, ref, mask, beta, baseline, g):
    n, t = logp.shape
    s = np.array(scores, np.float64)
    if baseline:
        for b in range(n // g):
            mu = sum(scores[b * g + k] for k in range(g)) / g
            for k in range(g):
                s[b * g + k] = scores[b * g + k] - mu
    rets = np.zeros((n, t))
    for i in range(n):
        valid = [j for j in range(t) if mask[i, j]]
        rew = np.zeros(t)
        for j in valid:
            rew[j] = -beta * (logp[i, j] - ref[i, j])
        if valid:
            rew[valid[-1]] += s[i]
        acc = 0.0
        for j in reversed(range(t)):
            acc += rew[j] if mask[i, j] else 0.0
            rets[i, j] = acc if mask[i, j] else 0.0
    vals = [rets[i, j] for i in range(n) for j in range(t) if mask[i, j]]
    mu = sum(vals) / len(vals)
    var = sum((v - mu) ** 2 for v in vals) / len(vals)
    adv = np.where(mask != 0, (rets - mu) / math.sqrt(max(var, 1e-8)), 0.0)
    return adv, rets


# ----------------------------------------------------------------------------- advantages
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind,scale", [("grpo", "group"), ("grpo", "batch"), ("grpo", "none"),
                                        ("rloo", "group")])
def test_group_advantages(seed, kind, scale):
    rng = np.random.default_rng(seed)
    g = 4
    r = rng.normal(0, 2, 3 * g)
    r[:g] = 1.5  # a constant group: advantage 0, no nan
    want = ref_group_adv(r, g, kind, scale, 1e-4)
    close(L.group_advantages(jnp.asarray(r), g, kind, scale_rewards=scale), want)
    close(L.group_advantages(jnp.asarray(r.reshape(-1, g)), g, kind, scale_rewards=scale), want)
    close(jax.jit(L.group_advantages, static_argnums=(1, 2, 3))(jnp.asarray(r), g, kind, scale),
          want)


def test_group_advantages_single_generation_and_errors():
    r = jnp.asarray([1.0, -2.0, 3.0])
    close(L.group_advantages(r, 1), np.zeros(3))
    with pytest.raises(ValueError):
        L.group_advantages(r, 1, "rloo")
    with pytest.raises(ValueError):
        L.group_advantages(r, 2)
    with pytest.raises(ValueError):
        L.group_advantages(r, 3, "grpo", scale_rewards="bad")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("baseline", [False, True])
def test_reinforce_pp_returns(seed, baseline):
    logp, _, ref, mask, _ = make_batch(seed)
    mask[3] = 0  # an empty response: no score, no contribution to the statistics
    scores = np.random.default_rng(seed + 10).normal(0, 1, logp.shape[0])
    want_adv, want_ret = ref_reinforce_pp(scores, logp, ref, mask, 0.05, baseline, 3)
    adv, ret = L.reinforce_pp_returns(jnp.asarray(scores), jnp.asarray(logp), jnp.asarray(ref),
                                      jnp.asarray(mask), 0.05, baseline, 3)
    close(ret, want_ret)
    close(adv, want_adv)


# ----------------------------------------------------------------------------- KL, policy loss
@pytest.mark.parametrize("seed", SEEDS)
def test_k3_kl(seed):
    logp, _, ref, mask, _ = make_batch(seed)
    want = np.zeros_like(logp)
    for i in range(logp.shape[0]):
        for j in range(logp.shape[1]):
            if mask[i, j]:
                x = ref[i, j] - logp[i, j]
                want[i, j] = math.exp(x) - x - 1
    logp_bad = np.where(mask != 0, logp, np.inf)
    close(L.k3_kl(jnp.asarray(logp_bad), jnp.asarray(ref), jnp.asarray(mask)), want)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("token_adv", [False, True])
def test_clipped_policy_loss(seed, level, token_adv):
    logp, old, ref, mask, adv = make_batch(seed)
    if token_adv:
        adv = np.random.default_rng(seed + 5).normal(0, 1, logp.shape)
    el, eh = 0.2, 0.28
    want, low, high = ref_policy_loss(logp, old, adv, mask, el, eh, level)
    got, clip = L.clipped_policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv),
                                      jnp.asarray(mask), el, eh, level)
    close(got, want)
    np.testing.assert_array_equal(np.asarray(clip["low"]), low)
    np.testing.assert_array_equal(np.asarray(clip["high"]), high)
    np.testing.assert_array_equal(np.asarray(clip["region"]), low | high)
    assert low.any() or high.any() or level == "sequence"
    metrics = L.clip_metrics(clip, jnp.asarray(mask))
    n = mask.sum()
    close(metrics["clip_ratio/low_mean"], low.sum() / n)
    close(metrics["clip_ratio/high_mean"], high.sum() / n)
    close(metrics["clip_ratio/region_mean"], (low | high).sum() / n)
    # with the KL term: + beta * k3 per valid token
    beta = 0.04
    got_kl, _ = L.clipped_policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv),
                                      jnp.asarray(mask), el, eh, level, ref_logp=jnp.asarray(ref),
                                      beta=beta)
    x = ref - logp
    close(got_kl, want + np.where(mask != 0, beta * (np.exp(x) - x - 1), 0))


def test_sequence_ratio_is_shared_and_gspo_gradient():
    """GSPO: one ratio per sequence; d loss / d logp_t is the same for every valid token."""
    logp, old, _, mask, adv = make_batch(0)

    def f(lp):
        per, _ = L.clipped_policy_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                                       10.0, 10.0, "sequence")
        return jnp.sum(per)

    grad = np.asarray(jax.grad(f)(jnp.asarray(logp)))
    for i in range(logp.shape[0]):
        k = int(mask[i].sum())
        # sum_t -A rho = -k A rho with rho = exp(mean d): d/d logp_t = -A rho (unclipped)
        rho = math.exp(sum(logp[i, j] - old[i, j] for j in range(k)) / k)
        close(grad[i, :k], np.full(k, -adv[i] * rho))
        close(grad[i, k:], np.zeros(logp.shape[1] - k))


# ----------------------------------------------------------------------------- aggregation
def full_loss(lp, old, adv, mask, loss_type, **kw):
    per, _ = L.clipped_policy_loss(lp, old, adv, mask, 0.2, 0.28, "token")
    return L.aggregate(per, mask, loss_type, **kw)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_aggregate_values(seed, loss_type):
    logp, old, _, mask, adv = make_batch(seed)
    per = ref_policy_loss(logp, old, adv, mask, 0.2, 0.28, "token")[0]
    per_bad = np.where(mask != 0, per, np.nan)  # masked positions are ignored
    kw = dict(max_completion_length=9) if loss_type == "dr_grpo" else {}
    want = ref_aggregate(per, mask, loss_type, lmax=9)
    close(L.aggregate(jnp.asarray(per_bad), jnp.asarray(mask), loss_type, **kw), want)
    if loss_type == "dapo":
        close(L.aggregate(jnp.asarray(per), jnp.asarray(mask), "dapo", global_tokens=50.0),
              ref_aggregate(per, mask, "dapo", global_tokens=50.0))


SPLITS = [[6], [3, 3], [1, 5], [2, 1, 3], [1, 1, 1, 1, 1, 1]]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo"])
def test_dapo_dr_grpo_split_invariant(seed, loss_type):
    """Summed micro-batch values with the global normalizer = the full batch's loss and
    gradient (w.r.t. logp) for any split."""
    logp, old, _, mask, adv = make_batch(seed)
    lp, old, adv, mask = map(jnp.asarray, (logp, old, adv, mask))
    n = lp.shape[0]
    kw = (dict(global_tokens=jnp.sum(mask)) if loss_type == "dapo"
          else dict(max_completion_length=9, global_sequences=n))
    want = full_loss(lp, old, adv, mask, loss_type, **kw)
    want_grad = jax.grad(full_loss)(lp, old, adv, mask, loss_type, **kw)

    for split in SPLITS:
        bounds = np.cumsum([0] + split)

        def summed(x, bounds=bounds):
            return sum(full_loss(x[a:b], old[a:b], adv[a:b], mask[a:b], loss_type, **kw)
                       for a, b in zip(bounds[:-1], bounds[1:]))

        close(summed(lp), want)
        close(jax.grad(summed)(lp), want_grad)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_grpo_bnpo_depend_on_split(loss_type):
    """grpo / bnpo normalise by local quantities: the mean of micro-batch values differs from
    the full batch's value (the sum does too)."""
    logp, old, _, mask, adv = make_batch(0)
    lp, old, adv, mask = map(jnp.asarray, (logp, old, adv, mask))
    whole = float(full_loss(lp, old, adv, mask, loss_type))
    parts = [float(full_loss(lp[a:b], old[a:b], adv[a:b], mask[a:b], loss_type))
             for a, b in [(0, 1), (1, 6)]]
    assert abs(np.mean(parts) - whole) > 1e-3
    assert abs(np.sum(parts) - whole) > 1e-3


def test_aggregate_errors():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError):
        L.aggregate(x, x, "bad")
    with pytest.raises(ValueError):
        L.aggregate(x, x, "dr_grpo")
    with pytest.raises(ValueError):
        L.clipped_policy_loss(x, x, jnp.zeros(2), x, level="bad")


# ----------------------------------------------------------------------------- overlong
def test_overlong_penalty():
    lmax, lc = 20, 4
    lengths = np.arange(0, 26)
    want = []
    for n in lengths:
        if n <= lmax - lc:
            want.append(0.0)
        elif n <= lmax:
            want.append(((lmax - lc) - n) / lc)
        else:
            want.append(-1.0)
    got = L.overlong_penalty(jnp.asarray(lengths), lmax, lc)
    close(got, want)
    assert float(got[lmax]) == -1.0 and float(got[lmax - lc]) == 0.0


@pytest.mark.parametrize("mode", ["none", "token_truncate", "token_mask", "sequence_truncate",
                                  "sequence_mask"])
def test_is_weights(mode):
    """TRL GRPOTrainer's vLLM importance-sampling correction, from its definition, in float64."""
    rng = np.random.default_rng(7)
    n, t, cap = 6, 5, 1.5
    mask = (rng.random((n, t)) < 0.8).astype(np.float64)
    old = rng.normal(size=(n, t))
    samp = old + rng.normal(0, 0.3, size=(n, t))
    want = np.zeros((n, t))
    for i in range(n):
        seq = np.exp(sum((old[i, j] - samp[i, j]) for j in range(t) if mask[i, j]))
        for j in range(t):
            if not mask[i, j]:
                continue
            w = 1.0 if mode == "none" else (np.exp(old[i, j] - samp[i, j])
                                             if mode.startswith("token") else seq)
            if mode.endswith("truncate"):
                w = min(w, cap)
            elif mode.endswith("mask"):
                w = w if w <= cap else 0.0
            want[i, j] = w
    from easyrl.losses import group as G
    got = G.is_weights(jnp.asarray(old, jnp.float32), jnp.asarray(samp, jnp.float32),
                       jnp.asarray(mask), mode, cap)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- unscorable rows
def _trl_advantages_with_nan(r, g, kind, scale, eps=1e-4):
    """TRL's GRPOTrainer (grpo_trainer.py ~l.2679-2728, sum_then_normalize) and RLOOTrainer
    (rloo_trainer.py ~l.1512-1560) with unscorable (NaN) rows, in float64 loops."""
    r = np.asarray(r, np.float64).reshape(-1, g)
    out = np.zeros_like(r)

    def nanstd(x):  # trl.trainer.utils.nanstd: Bessel-corrected over the non-NaN values
        x = x[~np.isnan(x)]
        return np.sqrt(np.sum((x - x.mean()) ** 2) / (len(x) - 1)) if len(x) > 1 else np.nan
    flat = r.reshape(-1)
    bstd = nanstd(flat)
    for b in range(r.shape[0]):
        ok = ~np.isnan(r[b])
        for i in range(g):
            if not ok[i]:
                continue  # advantage 0 (nan_to_num)
            if kind == "rloo":
                others = [r[b, j] for j in range(g) if j != i and ok[j]]
                a = r[b, i] - (sum(others) / len(others) if others else np.nan)
            else:
                a = r[b, i] - np.mean(r[b][ok])
                if scale == "group":
                    a = a / (nanstd(r[b]) + eps)
                elif scale == "batch":
                    a = a / (bstd + eps)
            out[b, i] = 0.0 if np.isnan(a) else a
    return out.reshape(-1)


@pytest.mark.parametrize("kind, scale", [("grpo", "group"), ("grpo", "batch"), ("grpo", "none"),
                                         ("rloo", "group")])
def test_group_advantages_leave_unscorable_rows_out(kind, scale):
    rng = np.random.default_rng(3)
    g = 4
    r = rng.normal(size=(5, g))
    r[0, 1] = np.nan            # one unscorable row
    r[1, :3] = np.nan           # a single scorable row left: advantage 0
    r[2, :] = np.nan            # a whole group unscorable
    got = np.asarray(L.group.group_advantages(jnp.asarray(r.reshape(-1), jnp.float32), g, kind,
                                             scale))
    want = _trl_advantages_with_nan(r, g, kind, scale)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    assert np.all(got[np.isnan(r.reshape(-1))] == 0)
    # the scorable rows of group 0 get what they get without the NaN row in the group
    alone = np.asarray(L.group.group_advantages(jnp.asarray(r[0, [0, 2, 3]], jnp.float32), 3, kind,
                                          scale if scale != "batch" else "none"))
    if scale != "batch":
        np.testing.assert_allclose(got[[0, 2, 3]], alone, rtol=2e-5, atol=2e-6)


# ----------------------------------------------------------------------------- TRL composition
def test_is_weight_multiplies_the_policy_term_only():
    """TRL GRPOTrainer (_compute_loss, ~l.3117-3121): per_token_loss = policy term * IS ratio,
    THEN + beta * k3. A float64 loop reference with weights far from 1 and beta > 0."""
    rng = np.random.default_rng(7)
    n, t, beta, cap, cap_min = 3, 5, 0.3, 2.0, 0.5
    lp = rng.normal(-1.5, 0.5, (n, t))
    old = lp + rng.normal(0, 0.2, (n, t))
    samp = old + rng.choice([-1.2, -0.4, 0.3, 1.5], size=(n, t))  # weights e^-1.5 .. e^1.2
    ref = lp + rng.normal(0, 0.3, (n, t))
    adv = rng.normal(size=n)
    mask = np.ones((n, t))
    mask[1, 3:] = 0
    want = np.zeros((n, t))
    for i in range(n):
        for j in range(t):
            if not mask[i, j]:
                continue
            rho = math.exp(lp[i, j] - old[i, j])
            pol = -min(rho * adv[i], min(max(rho, 0.8), 1.2) * adv[i])
            w = min(max(math.exp(old[i, j] - samp[i, j]), cap_min), cap)  # token_truncate
            k3 = math.exp(ref[i, j] - lp[i, j]) - (ref[i, j] - lp[i, j]) - 1
            want[i, j] = w * pol + beta * k3
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    w = L.group.is_weights(f32(old), f32(samp), f32(mask), "token_truncate", cap, cap_min)
    got, _ = L.group.grpo_token_loss(f32(lp), f32(old), f32(adv), f32(mask), 0.2, 0.2,
                                     ref_logp=f32(ref), beta=beta, is_weight=w)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)
    assert np.any(np.asarray(w)[mask > 0] == cap) and np.any(np.asarray(w)[mask > 0] == cap_min)
    k3 = np.asarray(L.group.k3_kl(f32(lp), f32(ref), f32(mask)))
    wrong = want - beta * k3 + np.asarray(w) * beta * k3  # the old composition: w * (pol + kl)
    assert not np.allclose(np.asarray(got), wrong, atol=1e-3)


@pytest.mark.parametrize("mode", ["token_mask", "sequence_mask"])
def test_is_lower_bound_masks(mode):
    old = jnp.asarray([[0.0, 0.0, 0.0]], jnp.float32)
    samp = jnp.asarray([[1.0, 0.0, -1.5]], jnp.float32)  # token weights e^-1, 1, e^1.5
    w = np.asarray(L.group.is_weights(old, samp, jnp.ones((1, 3)), mode, 3.0, 0.5))
    if mode == "token_mask":
        np.testing.assert_allclose(w, [[0.0, 1.0, 0.0]])  # e^-1 < 0.5, e^1.5 > 3: masked
    else:  # sequence weight e^0.5 in [0.5, 3]: kept for every token
        np.testing.assert_allclose(w, [[math.exp(0.5)] * 3], rtol=1e-6)


def test_rloo_sequence_loss_gradient_is_trl_s():
    """TRL RLOOTrainer (_compute_loss, ~l.1683-1694): rho_i = exp(sum_t m (logp - old)),
    loss = mean_i -min(rho_i A_i, clip(rho_i) A_i). d loss / d logp_it = -A_i rho_i m_it / N
    where the unclipped term is the active one, else 0: never divided by the length."""
    rng = np.random.default_rng(11)
    n, t, el, eh = 6, 7, 0.2, 0.28
    lp = rng.normal(-1.0, 0.3, (n, t))
    old = lp + rng.normal(0, 0.15, (n, t))
    adv = rng.normal(size=n)
    mask = np.ones((n, t))
    for i, L_ in enumerate([7, 2, 5, 1, 7, 3]):
        mask[i, L_:] = 0
    want_loss, want_grad = 0.0, np.zeros((n, t))
    for i in range(n):
        rho = math.exp(sum((lp[i, j] - old[i, j]) * mask[i, j] for j in range(t)))
        unclipped, clipped = rho * adv[i], min(max(rho, 1 - el), 1 + eh) * adv[i]
        want_loss += -min(unclipped, clipped) / n
        active = unclipped <= clipped or (1 - el) <= rho <= (1 + eh)
        for j in range(t):
            want_grad[i, j] = -adv[i] * rho * mask[i, j] / n if active else 0.0
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731

    def loss(x):
        return jnp.mean(L.group.rloo_sequence_loss(x, f32(old), f32(adv), f32(mask), el, eh)[0])
    val, grad = jax.value_and_grad(loss)(f32(lp))
    assert float(val) == pytest.approx(want_loss, rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=2e-5, atol=1e-7)
