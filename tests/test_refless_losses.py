"""KTO, ORPO, CPO / SimPO losses (easyrl.losses.kto, easyrl.losses.refless): float32 JAX against
independent float64 numpy references written from the formulas (loops over rows)."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easyrl import losses as L

RTOL = 1e-5
ATOL = 1e-6
SEEDS = [0, 1, 2]


def close(got, want, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                               rtol=rtol, atol=atol)


def f32(*xs):
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


# ----------------------------------------------------------------------------- numpy references
def np_sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def np_log_sigmoid(x):
    # log sig(x) = -log(1 + e^-x)
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def ref_kto_z(pkl, rkl):
    total = 0.0
    for a, b in zip(pkl, rkl):
        total += a - b
    return max(0.0, total / len(pkl))


def ref_kto(pl, rl, labels, z, beta, wd, wu, loss_type):
    losses, rewards = [], []
    for p, q, y in zip(pl, rl, labels):
        r = p - q
        if loss_type == "kto":
            loss = wd * (1.0 - np_sigmoid(beta * (r - z))) if y else \
                wu * (1.0 - np_sigmoid(beta * (z - r)))
        else:  # apo_zero_unpaired
            loss = wd * (1.0 - np_sigmoid(beta * r)) if y else wu * np_sigmoid(beta * r)
        losses.append(loss)
        rewards.append(beta * r)
    return np.array(losses), np.array(rewards)


def ref_orpo_row(sc, sr, nc, nr, beta):
    """(or_loss, reward_c, reward_r, log sig(log_odds), log_odds) of one pair, plain math."""
    ac = sc / max(nc, 1)
    ar = sr / max(nr, 1)
    # odds(p) = p / (1 - p) with p = exp(avg log-prob); log odds ratio of chosen over rejected
    pc_, pr_ = math.exp(min(ac, -1e-7)), math.exp(min(ar, -1e-7))
    log_odds = math.log(pc_ / (1.0 - pc_)) - math.log(pr_ / (1.0 - pr_))
    ls = np_log_sigmoid(log_odds)
    return -beta * ls, beta * ac, beta * ar, ls, log_odds


def ref_orpo(pc, pr, lc, lr, beta):
    rows = [ref_orpo_row(*a, beta) for a in zip(pc, pr, lc, lr)]
    return tuple(np.array(c) for c in zip(*rows))


def ref_cpo_row(sc, sr, nc, nr, beta, loss_type, eps, gamma):
    if loss_type in ("ipo", "simpo"):
        c, r = sc / max(nc, 1), sr / max(nr, 1)
    else:
        c, r = sc, sr
    if loss_type == "sigmoid":
        u = beta * (c - r)
        loss = -(1 - eps) * np_log_sigmoid(u) - eps * np_log_sigmoid(-u)
    elif loss_type == "hinge":
        loss = max(0.0, 1.0 - beta * (c - r))
    elif loss_type == "ipo":
        loss = (c - r - 1.0 / (2.0 * beta)) ** 2
    else:  # simpo (Meng et al. 2024, Eq. 6 with TRL's label smoothing)
        u = beta * c - beta * r - gamma
        loss = -(1 - eps) * np_log_sigmoid(u) - eps * np_log_sigmoid(-u)
    return loss, beta * c, beta * r


def ref_cpo(pc, pr, lc, lr, beta, loss_type, eps, gamma):
    rows = [ref_cpo_row(*a, beta, loss_type, eps, gamma) for a in zip(pc, pr, lc, lr)]
    return tuple(np.array(c) for c in zip(*rows))


def fd_grad(fn, x, h=1e-6):
    """Central finite differences of a scalar float64 function of a vector."""
    g = np.zeros_like(x)
    for i in range(len(x)):
        e = np.zeros_like(x)
        e[i] = h
        g[i] = (fn(x + e) - fn(x - e)) / (2 * h)
    return g


# ----------------------------------------------------------------------------- inputs
def kto_batch(seed, b=9, kl_sign=1.0):
    """Random labelled rows (both labels present) and KL rows whose mean log-ratio has sign
    kl_sign (so z > 0 for +1 and z clamps to 0 for -1)."""
    rng = np.random.default_rng(seed)
    ref = -rng.uniform(5.0, 60.0, b)
    pol = ref + rng.normal(0.0, 4.0, b)
    labels = rng.random(b) < 0.5
    labels[0], labels[1] = True, False
    rkl = -rng.uniform(5.0, 60.0, b)
    pkl = rkl + rng.normal(0.0, 1.0, b)
    pkl = pkl - np.mean(pkl - rkl) + kl_sign * rng.uniform(0.5, 3.0)
    return pol, ref, labels, pkl, rkl


def pair_batch(seed, b=8):
    """Summed response log-probs and integer lengths; per-token means in (-3, -0.01)."""
    rng = np.random.default_rng(seed)
    lc = rng.integers(1, 25, b)
    lr = rng.integers(1, 25, b)
    pc = -lc * rng.uniform(0.01, 3.0, b)
    pr = -lr * rng.uniform(0.01, 3.0, b)
    return pc, pr, lc.astype(np.float64), lr.astype(np.float64)


# ----------------------------------------------------------------------------- KTO
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kl_sign", [1.0, -1.0])
def test_kto_kl(seed, kl_sign):
    _, _, _, pkl, rkl = kto_batch(seed, kl_sign=kl_sign)
    z = L.kto_kl(*f32(pkl, rkl))
    want = ref_kto_z(pkl, rkl)
    assert (want > 0) == (kl_sign > 0)
    if kl_sign < 0:
        assert float(z) == 0.0
    close(z, want)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kl_sign", [1.0, -1.0])
@pytest.mark.parametrize("loss_type", L.KTO_LOSS_TYPES)
def test_kto_losses_vs_reference(seed, kl_sign, loss_type):
    pol, ref, labels, pkl, rkl = kto_batch(seed, kl_sign=kl_sign)
    beta, wd, wu = 0.1 + 0.2 * seed, 1.0 + 0.5 * seed, 1.33
    fn = jax.jit(functools.partial(L.kto_losses, beta=beta, desirable_weight=wd,
                                   undesirable_weight=wu, loss_type=loss_type))
    z = L.kto_kl(*f32(pkl, rkl))
    losses, rewards = fn(*f32(pol, ref), jnp.asarray(labels), z)
    want_l, want_r = ref_kto(pol, ref, labels, ref_kto_z(pkl, rkl), beta, wd, wu, loss_type)
    close(losses, want_l)
    close(rewards, want_r)
    # 0/1 float labels give the same as bool labels
    close(fn(*f32(pol, ref), jnp.asarray(labels, jnp.float32), z)[0], want_l)


def test_kto_z_matters_and_apo_ignores_it():
    pol, ref, labels, pkl, rkl = kto_batch(3, kl_sign=1.0)
    a = L.kto_losses(*f32(pol, ref), labels, 0.0, beta=0.5)[0]
    b = L.kto_losses(*f32(pol, ref), labels, 2.0, beta=0.5)[0]
    assert not np.allclose(a, b)
    a = L.kto_losses(*f32(pol, ref), labels, 0.0, beta=0.5, loss_type="apo_zero_unpaired")[0]
    b = L.kto_losses(*f32(pol, ref), labels, None, beta=0.5, loss_type="apo_zero_unpaired")[0]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("loss_type", L.KTO_LOSS_TYPES)
def test_kto_gradients(loss_type):
    pol, ref, labels, pkl, rkl = kto_batch(4, kl_sign=1.0)
    beta, wd, wu = 0.3, 1.0, 1.5

    def loss(p, q, a, b):
        losses, _ = L.kto_losses(p, q, labels, L.kto_kl(a, b), beta=beta, desirable_weight=wd,
                                 undesirable_weight=wu, loss_type=loss_type)
        return jnp.mean(losses)

    gp, gq, ga, gb = jax.grad(loss, argnums=(0, 1, 2, 3))(*f32(pol, ref, pkl, rkl))
    # z is detached: exactly no gradient to the KL rows
    np.testing.assert_array_equal(ga, np.zeros_like(pkl))
    np.testing.assert_array_equal(gb, np.zeros_like(rkl))
    z = ref_kto_z(pkl, rkl)
    want = fd_grad(lambda x: ref_kto(x, ref, labels, z, beta, wd, wu, loss_type)[0].mean(), pol)
    assert np.all(np.abs(want) > 0)
    close(gp, want, rtol=1e-4, atol=1e-8)
    close(gq, -want, rtol=1e-4, atol=1e-8)
    # the rewards output carries no gradient
    g = jax.grad(lambda p: jnp.sum(L.kto_losses(p, f32(ref)[0], labels, 0.0, beta=beta,
                                                loss_type=loss_type)[1]))(f32(pol)[0])
    np.testing.assert_array_equal(g, np.zeros_like(pol))


@pytest.mark.parametrize("seed", SEEDS)
def test_kto_metric_sums(seed):
    pol, ref, labels, _, _ = kto_batch(seed)
    beta = 0.2
    _, rewards = L.kto_losses(*f32(pol, ref), labels, 0.0, beta=beta)
    got = jax.jit(L.kto_metric_sums)(rewards, f32(pol)[0], jnp.asarray(labels))
    want = {k: 0.0 for k in ("rewards/chosen_sum", "rewards/rejected_sum", "logps/chosen_sum",
                             "logps/rejected_sum", "count/chosen", "count/rejected")}
    for p, q, y in zip(pol, ref, labels):
        side = "chosen" if y else "rejected"
        want[f"rewards/{side}_sum"] += beta * (p - q)
        want[f"logps/{side}_sum"] += p
        want[f"count/{side}"] += 1
    assert set(got) == set(want)
    for k in want:
        assert jnp.issubdtype(got[k].dtype, jnp.floating), k
        close(got[k], want[k])
    g = jax.grad(lambda p: sum(jnp.sum(v) for v in L.kto_metric_sums(p, p, labels).values()))(
        f32(pol)[0])
    np.testing.assert_array_equal(g, np.zeros_like(pol))


# ----------------------------------------------------------------------------- ORPO
@pytest.mark.parametrize("seed", SEEDS)
def test_orpo_vs_reference(seed):
    pc, pr, lc, lr = pair_batch(seed)
    beta = 0.1 + 0.2 * seed
    fn = jax.jit(functools.partial(L.orpo_losses, beta=beta))
    losses, cr, rr, terms = fn(*f32(pc, pr, lc, lr))
    want_l, want_c, want_r, want_ratio, want_odds = ref_orpo(pc, pr, lc, lr, beta)
    close(losses, want_l)
    close(cr, want_c)
    close(rr, want_r)
    assert set(terms) == {"log_odds_ratio", "log_odds_chosen"}
    close(terms["log_odds_ratio"], want_ratio)
    close(terms["log_odds_chosen"], want_odds)
    # integer lengths work too
    close(fn(*f32(pc, pr), lc.astype(np.int32), lr.astype(np.int32))[0], want_l)


def test_orpo_extremes_finite():
    """lp -> 0 (an empty response, probability ~1) is clamped to -1e-7; very negative lp is fine."""
    pc = np.array([0.0, -1e-9, -2e-3, -400.0, -5.0, -1e-7])
    pr = np.array([-3.0, -0.5, 0.0, -2.0, -600.0, -1.0])
    lc = np.array([0.0, 1.0, 2.0, 4.0, 1.0, 1.0])
    lr = np.array([3.0, 1.0, 0.0, 2.0, 2.0, 1.0])
    beta = 0.25
    losses, cr, rr, terms = L.orpo_losses(*f32(pc, pr, lc, lr), beta=beta)
    for x in (losses, cr, rr, terms["log_odds_chosen"]):
        assert np.all(np.isfinite(np.asarray(x)))
    want_l, want_c, _, _, want_odds = ref_orpo(pc, pr, lc, lr, beta)
    close(losses, want_l, rtol=1e-4)
    close(terms["log_odds_chosen"], want_odds, rtol=1e-4)
    close(cr, want_c)  # rewards are beta * the unclamped mean log-probs
    g = jax.grad(lambda a, b: jnp.sum(L.orpo_losses(a, b, lc, lr, beta=beta)[0]),
                 argnums=(0, 1))(*f32(pc, pr))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in g)


@pytest.mark.parametrize("seed", SEEDS)
def test_orpo_gradients(seed):
    pc, pr, lc, lr = pair_batch(seed)
    beta = 0.2

    def loss(a, b):
        return jnp.mean(L.orpo_losses(a, b, lc, lr, beta=beta)[0])

    gc, gr = jax.grad(loss, argnums=(0, 1))(*f32(pc, pr))
    want_c = fd_grad(lambda x: ref_orpo(x, pr, lc, lr, beta)[0].mean(), pc)
    want_r = fd_grad(lambda x: ref_orpo(pc, x, lc, lr, beta)[0].mean(), pr)
    close(gc, want_c, rtol=1e-4, atol=1e-8)
    close(gr, want_r, rtol=1e-4, atol=1e-8)
    assert np.all(np.asarray(gc) < 0) and np.all(np.asarray(gr) > 0)
    # rewards and terms carry no gradient
    g = jax.grad(lambda a: sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(
        L.orpo_losses(a, f32(pr)[0], lc, lr, beta=beta)[1:])))(f32(pc)[0])
    np.testing.assert_array_equal(g, np.zeros_like(pc))


# ----------------------------------------------------------------------------- CPO / SimPO
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("loss_type", L.CPO_LOSS_TYPES)
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_cpo_vs_reference(seed, loss_type, eps):
    pc, pr, lc, lr = pair_batch(seed)
    beta = 0.1 + 0.4 * seed
    gamma = 0.3 + 0.5 * seed
    fn = jax.jit(functools.partial(L.cpo_losses, beta=beta, loss_type=loss_type,
                                   label_smoothing=eps, simpo_gamma=gamma))
    losses, cr, rr = fn(*f32(pc, pr, lc, lr))
    want_l, want_c, want_r = ref_cpo(pc, pr, lc, lr, beta, loss_type, eps, gamma)
    close(losses, want_l)
    close(cr, want_c)
    close(rr, want_r)


def test_simpo_is_minus_log_sigmoid_of_margin():
    pc, pr, lc, lr = pair_batch(5)
    beta, gamma = 2.0, 0.7
    got = L.cpo_losses(*f32(pc, pr, lc, lr), beta=beta, loss_type="simpo", simpo_gamma=gamma)[0]
    want = [-np_log_sigmoid(beta * a / n - beta * b / m - gamma)
            for a, b, n, m in zip(pc, pr, lc, lr)]
    close(got, want)


@pytest.mark.parametrize("loss_type", L.CPO_LOSS_TYPES)
def test_cpo_gradients(loss_type):
    pc, pr, lc, lr = pair_batch(7)
    beta, eps, gamma = 0.05 if loss_type == "hinge" else 0.5, 0.1, 0.6

    def loss(a, b):
        return jnp.mean(L.cpo_losses(a, b, lc, lr, beta=beta, loss_type=loss_type,
                                     label_smoothing=eps, simpo_gamma=gamma)[0])

    gc, gr = jax.grad(loss, argnums=(0, 1))(*f32(pc, pr))
    ref = functools.partial(ref_cpo, beta=beta, loss_type=loss_type, eps=eps, gamma=gamma)
    want_c = fd_grad(lambda x: ref(x, pr, lc, lr)[0].mean(), pc)
    want_r = fd_grad(lambda x: ref(pc, x, lc, lr)[0].mean(), pr)
    if loss_type == "hinge":  # keep away from the kink of relu
        margin = 1.0 - beta * (pc - pr)
        assert np.all(np.abs(margin) > 1e-3)
    assert np.any(np.abs(want_c) > 0)
    close(gc, want_c, rtol=1e-4, atol=1e-7)
    close(gr, want_r, rtol=1e-4, atol=1e-7)
    g = jax.grad(lambda a: jnp.sum(L.cpo_losses(a, f32(pr)[0], lc, lr, beta=beta,
                                                loss_type=loss_type)[1]))(f32(pc)[0])
    np.testing.assert_array_equal(g, np.zeros_like(pc))


# ----------------------------------------------------------------------------- errors
def test_unknown_loss_types_raise():
    x = jnp.zeros(3)
    with pytest.raises(ValueError, match="kto, apo_zero_unpaired"):
        L.kto_losses(x, x, x, 0.0, beta=0.1, loss_type="sigmoid")
    with pytest.raises(ValueError, match="requires kl"):
        L.kto_losses(x, x, x, None, beta=0.1)
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo, simpo"):
        L.cpo_losses(x, x, x + 1, x + 1, beta=0.1, loss_type="orpo")
