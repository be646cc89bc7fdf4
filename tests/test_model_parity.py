"""Logit parity with transformers (fp32, random init, saved locally)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from easyrl import hf
from easyrl import model as M

from hf_models import VARIANTS, batch, make_causal_lm, make_reward_model

TOL = 1e-4
MEASURED = {}


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_causal_lm_logits_match_transformers(tmp_path, variant, padding):
    ref = make_causal_lm(tmp_path, **VARIANTS[variant])
    config, params = hf.load(str(tmp_path))
    ids, mask = batch(config.vocab_size, padding=padding)
    with torch.no_grad():
        want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(M.forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    assert got.dtype == np.float32 and got.shape == want.shape
    diff = float(np.abs(got - want)[mask > 0].max())
    MEASURED[(variant, padding)] = diff
    print(f"max |logit diff| {variant}/{padding}: {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("padding", ["right", "left"])
def test_causal_block_skipping_matches_transformers(tmp_path, monkeypatch, padding):
    """`attend` skips key blocks above the diagonal in query blocks of CAUSAL_CHUNK (256): with a
    chunk of 5, T = 12 runs as blocks of 5, 5, 2 and must still match transformers."""
    from easyrl.model import llama
    monkeypatch.setattr(llama, "CAUSAL_CHUNK", 5)
    ref = make_causal_lm(tmp_path, num_key_value_heads=2)
    config, params = hf.load(str(tmp_path))
    ids, mask = batch(config.vocab_size, padding=padding)
    with torch.no_grad():
        want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(M.forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    assert float(np.abs(got - want)[mask > 0].max()) <= TOL


def test_left_padded_row_equals_row_alone(tmp_path):
    make_causal_lm(tmp_path, num_key_value_heads=2)
    config, params = hf.load(str(tmp_path))
    ids, mask = batch(config.vocab_size, padding="left")
    full = np.asarray(M.forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        alone = np.asarray(M.forward(config, params, jnp.asarray(ids[i:i + 1, -n:])))
        np.testing.assert_allclose(full[i, -n:], alone[0], atol=1e-5)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_reward_model_matches_sequence_classification(tmp_path, padding):
    ref = make_reward_model(tmp_path, num_key_value_heads=2)
    config, params = hf.load(str(tmp_path), kind="reward")
    ids, mask = batch(config.vocab_size, padding=padding)
    ids = np.where(mask > 0, ids, ref.config.pad_token_id)
    with torch.no_grad():
        want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()[:, 0]
    got = np.asarray(M.score(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    diff = float(np.abs(got - want).max())
    print(f"max |score diff| {padding}: {diff:.2e}")
    assert diff <= TOL
    vals = np.asarray(M.values(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    assert vals.shape == ids.shape


@pytest.mark.parametrize("chunk", [None, 4])  # 4: causal block skipping across segments
def test_packed_segments_equal_examples_alone(tmp_path, monkeypatch, chunk):
    if chunk:
        from easyrl.model import llama
        monkeypatch.setattr(llama, "CAUSAL_CHUNK", chunk)
    make_causal_lm(tmp_path, num_key_value_heads=2)
    config, params = hf.load(str(tmp_path))
    rs = np.random.RandomState(1)
    a, b = rs.randint(3, 256, 5), rs.randint(3, 256, 7)
    ids = np.zeros((1, 14), np.int32)
    ids[0, :5], ids[0, 5:12] = a, b
    seg = np.array([[1] * 5 + [2] * 7 + [0] * 2])
    pos = np.array([list(range(5)) + list(range(7)) + [0, 0]])
    out = np.asarray(M.forward(config, params, jnp.asarray(ids), jnp.asarray((seg > 0).astype(np.int32)),
                               positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg)))
    np.testing.assert_allclose(out[0, :5], np.asarray(M.forward(config, params, jnp.asarray(a[None])))[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 5:12], np.asarray(M.forward(config, params, jnp.asarray(b[None])))[0], atol=1e-5)


def test_bf16_compute_close_to_fp32(tmp_path):
    make_causal_lm(tmp_path)
    config, params = hf.load(str(tmp_path))
    ids, mask = batch(config.vocab_size)
    f32 = np.asarray(M.forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    c16 = config.replace(dtype="bfloat16", remat="full")
    b16 = np.asarray(M.forward(c16, params, jnp.asarray(ids), jnp.asarray(mask)))
    assert b16.dtype == np.float32
    assert np.abs(b16 - f32)[mask > 0].max() < 0.05


@pytest.mark.parametrize("variant", ["gqa", "bias"])
def test_gradients_match_transformers(tmp_path, variant):
    """The backward pass (the dense layers' hand-written VJP, attention, norms, rope) against
    torch autograd: d/d params of sum(logits * R) over non-pad positions, every tensor by its HF
    name (the easyrl gradient tree written through `hf.save`, so kernels come back [out, in])."""
    import jax
    from safetensors.numpy import load_file
    ref = make_causal_lm(tmp_path / "m", **VARIANTS[variant])
    config, params = hf.load(str(tmp_path / "m"))
    ids, mask = batch(config.vocab_size, padding="left")
    r = np.random.RandomState(0).randn(*ids.shape, config.vocab_size).astype(np.float32)
    r *= mask[..., None]

    def f(p):
        return jnp.sum(M.forward(config, p, jnp.asarray(ids), jnp.asarray(mask)) * r)

    grads = jax.grad(f)(params)
    hf.save(str(tmp_path / "g"), config, grads)
    got = load_file(str(tmp_path / "g" / "model.safetensors"))
    ref.zero_grad()
    logits = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    (logits * torch.tensor(r)).sum().backward()
    want = {n: t.grad.numpy() for n, t in ref.named_parameters()}
    assert set(got) == set(want)
    for name, g in want.items():
        scale = max(float(np.abs(g).max()), 1.0)
        np.testing.assert_allclose(got[name], g, atol=1e-4 * scale, err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5)])
def test_dense_matmul_values_and_grads(dtype, shape):
    """`dense_matmul` (the dense layers' matmul with its own VJP) against float64 numpy: value,
    d x and d W of sum(y * g) on random inputs; bf16 within bf16 rounding of the result."""
    import jax
    from easyrl.model.matmul import dense_matmul
    rs = np.random.RandomState(1)
    x64, w64 = rs.randn(*shape), rs.randn(5, 7)
    g64 = rs.randn(*shape[:-1], 7)
    dt = jnp.dtype(dtype)
    x, w, g = (jnp.asarray(a, dt) for a in (x64, w64, g64))
    # the reference starts from the same rounded inputs
    x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
    y, vjp = jax.vjp(dense_matmul, x, w)
    dx, dw = vjp(g)
    assert y.dtype == dt and dx.dtype == dt and dw.dtype == dt
    tol = 1e-5 if dtype == "float32" else 2e-2
    want_dw = x64.reshape(-1, 5).T @ g64.reshape(-1, 7)
    for got, want in [(y, x64 @ w64), (dx, g64 @ w64.T), (dw, want_dw)]:
        got = np.asarray(got, np.float64)
        assert np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max())
    # the flax layers route through it (same numbers as a plain dot in float32)
    from easyrl.model.matmul import dense_dot_general
    dims = (((len(shape) - 1,), (0,)), ((), ()))
    np.testing.assert_array_equal(np.asarray(dense_dot_general(x, w, dims)), np.asarray(y))


def test_wgrad_barrier_is_lowered_where_the_platform_tuning_sets_it():
    """The optimization barrier in `dense_matmul`'s backward is chosen when the computation is
    lowered (`platform_tuning.wgrad_operands`): present in the CPU program, absent from the
    CUDA / ROCm / TPU ones, as `tuning_for(platform).wgrad_barrier` says."""
    import jax
    from easyrl.model.matmul import dense_matmul
    from easyrl.platform_tuning import tuning_for
    x, w = jnp.ones((2, 3, 5)), jnp.ones((5, 7))
    f = jax.jit(jax.grad(lambda x, w: jnp.sum(dense_matmul(x, w) ** 2), argnums=(0, 1)))
    for lowering, platform in (("cpu", "cpu"), ("cuda", "gpu"), ("rocm", "gpu"), ("tpu", "tpu")):
        text = f.trace(x, w).lower(lowering_platforms=(lowering,)).as_text()
        assert ("optimization_barrier" in text) == tuning_for(platform).wgrad_barrier, lowering
    assert tuning_for("cpu").wgrad_barrier and not tuning_for("gpu").wgrad_barrier


def test_bf16_attention_backward_matches_float32_autodiff():
    """`attend_core` in bf16 runs its own backward (`_attend_lowp`: bf16 dots accumulating in
    float32, softmax recomputed). Its value and d q / d k^T / d v match float32 autodiff of the
    plain path on the same (bf16-rounded) inputs to bf16 precision, with masked keys."""
    import jax
    from easyrl.model.llama import attend_core
    rs = np.random.RandomState(0)
    b, k, g, t, s, dh = 2, 2, 2, 5, 7, 8
    q, kt, v = rs.randn(b, k, g, t, dh), rs.randn(b, k, dh, s), rs.randn(b, k, s, dh)
    mask = rs.rand(b, t, s) > 0.3
    mask[:, :, 0] = True  # every query sees a key
    dout = rs.randn(b, k, g, t, dh)
    bf = [jnp.asarray(a, jnp.bfloat16) for a in (q, kt, v, dout)]
    f32 = [a.astype(jnp.float32) for a in bf]

    def run(q, kt, v, dout):
        out, vjp = jax.vjp(lambda q, kt, v: attend_core(q, kt, v, jnp.asarray(mask)), q, kt, v)
        return (out,) + vjp(dout)

    got = run(*bf)
    want = run(*f32)
    for name, x, y in zip(["out", "dq", "dkt", "dv"], got, want):
        assert x.dtype == jnp.bfloat16, name
        x, y = np.asarray(x, np.float32), np.asarray(y)
        err = np.abs(x - y).max() / max(1.0, np.abs(y).max())
        assert err < 3e-2, (name, err)
