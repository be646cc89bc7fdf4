"""easyrl.model.quant against a float64 numpy reference written from the formulas (loops over
layers, columns and blocks; the code under test is never called inside a reference)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easyrl.model import quant

# QLoRA's NF4 levels as bitsandbytes lists them (functional.get_4bit_type("nf4")).
NF4_TABLE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044006, 0.5626170039176941, 0.7229568362236023, 1.0]
TIE = 1e-5  # inputs this close (in units of w/scale) to a rounding boundary are left out


def kernel(shape, seed=0, std=0.02):
    return np.random.default_rng(seed).normal(0.0, std, size=shape).astype(np.float32)


# ---- references --------------------------------------------------------------------------------
def ref_int8(w):
    """Per-column (per leading index) absmax int8 of w [..., in, out] over `in`, float64.
    Returns q, scale [..., 1, out] (float32-valued, as stored) and a mask of near-tie elements."""
    w = np.asarray(w, np.float64)
    lead, n_out = w.shape[:-2], w.shape[-1]
    q = np.zeros(w.shape, np.int64)
    scale = np.zeros(lead + (1, n_out), np.float64)
    near = np.zeros(w.shape, bool)
    for idx in np.ndindex(*lead):
        for j in range(n_out):
            col = w[idx][:, j]
            amax = np.max(np.abs(col))
            # scale = absmax * float32(1/127), then w * float32(1/scale): the float64 products
            # of two float32 numbers are exact, rounded once to float32 as stored
            s = float(np.float32(amax * np.float64(np.float32(1 / 127)))) if amax > 0 else 1.0
            scale[idx + (0, j)] = s
            t = col * np.float64(np.float32(1 / s))
            q[idx + (slice(None), j)] = np.clip(np.round(t), -127, 127)
            near[idx + (slice(None), j)] = np.abs(np.abs(t - np.floor(t)) - 0.5) < TIE
    return q, scale, near


def ref_nf4(w, block):
    """NF4 codes (nearest level of w / block absmax), absmax [..., in/block, out], the packed
    bytes (in-index 2i high nibble, 2i+1 low), and a mask of near-tie elements; float64."""
    w = np.asarray(w, np.float64)
    levels = np.array(NF4_TABLE, np.float64)
    lead, (n_in, n_out) = w.shape[:-2], w.shape[-2:]
    codes = np.zeros(w.shape, np.int64)
    absmax = np.zeros(lead + (n_in // block, n_out), np.float64)
    near = np.zeros(w.shape, bool)
    for idx in np.ndindex(*lead):
        for b in range(n_in // block):
            rows = slice(b * block, (b + 1) * block)
            for j in range(n_out):
                seg = w[idx][rows, j]
                a = np.max(np.abs(seg))
                absmax[idx + (b, j)] = a
                x = seg * np.float64(np.float32(1 / a)) if a > 0 else np.zeros_like(seg)
                d = np.abs(x[:, None] - levels[None, :])
                codes[idx + (rows, j)] = np.argmin(d, axis=1)
                d2 = np.sort(d, axis=1)
                near[idx + (rows, j)] = (d2[:, 1] - d2[:, 0]) < TIE
    packed = np.zeros(lead + (n_in // 2, n_out), np.int64)
    for i in range(n_in // 2):
        packed[..., i, :] = codes[..., 2 * i, :] * 16 + codes[..., 2 * i + 1, :]
    return codes, absmax, packed, near


def ref_double_quant(absmax, dq_block):
    """Per-layer mean, int8 absmax code of (absmax - mean) in runs of dq_block along out."""
    absmax = np.asarray(absmax, np.float64)
    lead, (nb, n_out) = absmax.shape[:-2], absmax.shape[-2:]
    mean = np.zeros(lead + (1, 1))
    scale2 = np.zeros(lead + (nb, n_out // dq_block))
    rec = np.zeros(absmax.shape)
    for idx in np.ndindex(*lead):
        m = np.mean(absmax[idx])
        mean[idx + (0, 0)] = m
        for b in range(nb):
            for r in range(n_out // dq_block):
                cols = slice(r * dq_block, (r + 1) * dq_block)
                c = absmax[idx][b, cols] - m
                a = np.max(np.abs(c))
                s = a / 127.0 if a > 0 else 1.0
                scale2[idx + (b, r)] = s
                rec[idx + (b, cols)] = np.clip(np.round(c / s), -127, 127) * s + m
    return mean, scale2, rec


# ---- int8 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(64, 48), (3, 40, 24)])
def test_int8_matches_reference(shape):
    w = kernel(shape, seed=1)
    w[..., 0, 0] = 0.3  # an outlier in one column
    qd = quant.quantize_int8(jnp.asarray(w))
    assert set(qd) == {"q", "scale"}
    assert qd["q"].dtype == jnp.int8 and qd["q"].shape == shape
    assert qd["scale"].dtype == jnp.float32 and qd["scale"].shape == shape[:-2] + (1, shape[-1])
    q_ref, s_ref, near = ref_int8(w)
    np.testing.assert_array_equal(np.asarray(qd["scale"], np.float64), s_ref)
    assert near.mean() < 1e-3
    q = np.asarray(qd["q"], np.int64)
    np.testing.assert_array_equal(q[~near], q_ref[~near])
    assert np.all(np.abs(q - q_ref) <= 1)
    assert np.max(np.abs(q)) == 127
    deq = np.asarray(quant.dequantize_int8(qd, jnp.float32), np.float64)
    err = np.abs(deq - w.astype(np.float64))
    assert np.all(err <= s_ref / 2 * (1 + 1e-4) + 1e-9)


def test_int8_other_axis_and_bf16_input():
    w = kernel((16, 32), seed=2)
    qd = quant.quantize_int8(jnp.asarray(w, jnp.bfloat16), axis=-1)
    assert qd["scale"].shape == (16, 1)
    w_bf = np.asarray(jnp.asarray(w, jnp.bfloat16).astype(jnp.float32), np.float64)
    q_ref, s_ref, near = ref_int8(w_bf.T)  # reducing over axis -1 = per-row scales
    np.testing.assert_array_equal(np.asarray(qd["scale"]).T, s_ref)
    np.testing.assert_array_equal(np.asarray(qd["q"]).T[~near], q_ref[~near])


# ---- NF4 ---------------------------------------------------------------------------------------
def test_nf4_levels_are_the_bitsandbytes_table():
    np.testing.assert_array_equal(quant.NF4_LEVELS, np.array(NF4_TABLE, np.float32))
    assert quant.NF4_LEVELS.dtype == np.float32 and quant.NF4_LEVELS.shape == (16,)
    assert np.all(np.diff(quant.NF4_LEVELS) > 0)
    assert quant.NF4_LEVELS[quant.NF4_ZERO_CODE] == 0.0
    assert quant.NF4_LEVELS[0] == -1.0 and quant.NF4_LEVELS[-1] == 1.0


@pytest.mark.parametrize("shape,block", [((128, 24), 64), ((2, 96, 16), 32), ((64, 8), 64)])
def test_nf4_matches_reference(shape, block):
    w = kernel(shape, seed=3)
    qd = quant.quantize_nf4(jnp.asarray(w), block=block)
    assert set(qd) == {"codes", "absmax"}
    n_in, n_out = shape[-2:]
    assert qd["codes"].dtype == jnp.uint8
    assert qd["codes"].shape == shape[:-2] + (n_in // 2, n_out)
    assert qd["absmax"].dtype == jnp.float32
    assert qd["absmax"].shape == shape[:-2] + (n_in // block, n_out)
    codes_ref, absmax_ref, packed_ref, near = ref_nf4(w, block)
    np.testing.assert_array_equal(np.asarray(qd["absmax"], np.float64), absmax_ref)
    assert near.mean() < 1e-3
    codes = np.asarray(quant.unpack_nibbles(qd["codes"]), np.int64)
    np.testing.assert_array_equal(codes[~near], codes_ref[~near])
    if not near.any():
        np.testing.assert_array_equal(np.asarray(qd["codes"], np.int64), packed_ref)
    levels = np.array(NF4_TABLE, np.float64)
    expect = levels[codes_ref] * np.repeat(absmax_ref, block, axis=-2)
    deq = np.asarray(quant.dequantize_nf4(qd, jnp.float32), np.float64)
    np.testing.assert_allclose(deq[~near], expect[~near], rtol=1e-6, atol=0)
    # the error of the nearest level is at most half the widest gap (-1 to -0.696: 0.1519) times
    # the block absmax
    half_gap = np.max(np.diff(np.array(NF4_TABLE))) / 2
    assert np.all(np.abs(deq - w) <= half_gap * np.repeat(absmax_ref, block, axis=-2) * (1 + 1e-6))


def test_nf4_packed_bytes_exact():
    # hand-placed values (absmax 1 in both columns): codes 0, 15, 7, 8 and 13, 1, 15, 6
    w = np.zeros((64, 2), np.float32)
    w[:4, 0] = [-1.0, 1.0, 0.0, 0.0796]
    w[:4, 1] = [0.5626, -0.6962, 1.0, -0.0911]
    qd = quant.quantize_nf4(jnp.asarray(w), block=64)
    packed = np.asarray(qd["codes"])
    assert packed[0, 0] == 0x0F and packed[1, 0] == 0x78
    assert packed[0, 1] == 0xD1 and packed[1, 1] == 0xF6
    assert np.all(packed[2:, 0] == 0x77)  # zeros: code 7 in both nibbles


def test_pack_unpack_round_trip():
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 16, size=(3, 10, 7)).astype(np.uint8)
    for axis in (-2, 1):
        packed = quant.pack_nibbles(jnp.asarray(codes), axis=axis)
        assert packed.dtype == jnp.uint8 and packed.shape == (3, 5, 7)
        np.testing.assert_array_equal(np.asarray(packed),
                                      codes[:, 0::2, :] * 16 + codes[:, 1::2, :])
        np.testing.assert_array_equal(np.asarray(quant.unpack_nibbles(packed, axis=axis)), codes)
    assert int(quant.pack_nibbles(jnp.asarray([[1], [2]], jnp.uint8))[0, 0]) == 0x12


def test_nf4_code_ties_go_down():
    lv = np.array(NF4_TABLE, np.float32).astype(np.float64)
    mids = (lv[:-1] + lv[1:]) / 2
    x = np.float32(mids)
    codes = np.asarray(quant.nf4_code(jnp.asarray(x)))
    # exactly at a float32 midpoint the lower level wins, as in bitsandbytes' dQuantizeNF4
    np.testing.assert_array_equal(codes, np.arange(15))
    above = np.nextafter(x, np.float32(2))
    np.testing.assert_array_equal(np.asarray(quant.nf4_code(jnp.asarray(above))),
                                  np.arange(1, 16))


@pytest.mark.parametrize("shape,block,dq_block", [((128, 512), 64, 256), ((2, 64, 32), 16, 8)])
def test_nf4_double_quant(shape, block, dq_block):
    w = kernel(shape, seed=5)
    single = quant.quantize_nf4(jnp.asarray(w), block=block)
    qd = quant.quantize_nf4(jnp.asarray(w), block=block, double_quant=True, dq_block=dq_block)
    assert set(qd) == {"codes", "absmax_q", "absmax_scale", "absmax_mean"}
    lead, (n_in, n_out) = shape[:-2], shape[-2:]
    nb = n_in // block
    assert qd["absmax_q"].dtype == jnp.int8 and qd["absmax_q"].shape == lead + (nb, n_out)
    assert qd["absmax_scale"].dtype == jnp.float32
    assert qd["absmax_scale"].shape == lead + (nb, n_out // dq_block)
    assert qd["absmax_mean"].dtype == jnp.float32 and qd["absmax_mean"].shape == lead + (1, 1)
    np.testing.assert_array_equal(np.asarray(qd["codes"]), np.asarray(single["codes"]))
    _, absmax_ref, _, _ = ref_nf4(w, block)
    mean_ref, s2_ref, rec_ref = ref_double_quant(absmax_ref, dq_block)
    np.testing.assert_allclose(np.asarray(qd["absmax_mean"]), mean_ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(qd["absmax_scale"]), s2_ref, rtol=1e-5)
    rec = np.asarray(quant.nf4_absmax(qd), np.float64)
    s2_full = np.repeat(s2_ref, dq_block, axis=-1)
    tol = s2_full / 2 * (1 + 1e-4) + 1e-6 * absmax_ref
    assert np.all(np.abs(rec - absmax_ref) <= tol)
    assert np.all(np.abs(rec - rec_ref) <= s2_full + 1e-6 * absmax_ref)
    # dequant: |level| <= 1, so it moves by at most the absmax error
    deq = np.asarray(quant.dequantize(qd, jnp.float32), np.float64)
    deq1 = np.asarray(quant.dequantize(single, jnp.float32), np.float64)
    assert np.all(np.abs(deq - deq1) <= np.repeat(tol, block, axis=-2) + 1e-9)
    np.testing.assert_allclose(deq, deq1, atol=2e-2 * np.abs(w).max())


# ---- zeros, dtypes, jit, errors ----------------------------------------------------------------
@pytest.mark.parametrize("how", ["int8", "nf4", "nf4dq"])
def test_zero_blocks_give_zeros(how):
    w = kernel((2, 128, 16), seed=6)
    w[0] = 0.0          # a whole layer
    w[1, 64:, 3] = 0.0  # one block of one column
    w[1, :, 5] = 0.0    # one whole column
    make = {"int8": lambda x: quant.quantize_int8(x),
            "nf4": lambda x: quant.quantize_nf4(x, block=64),
            "nf4dq": lambda x: quant.quantize_nf4(x, block=64, double_quant=True, dq_block=8)}
    qd = make[how](jnp.asarray(w))
    assert all(np.all(np.isfinite(np.asarray(v, np.float64))) for v in qd.values())
    for dtype in (jnp.float32, jnp.bfloat16):
        deq = np.asarray(quant.dequantize(qd, dtype).astype(jnp.float32))
        assert np.all(np.isfinite(deq))
        assert np.all(deq[w == 0] == 0)
    zero = make[how](jnp.zeros((64, 16), jnp.float32))
    assert np.all(np.asarray(quant.dequantize(zero, jnp.float32)) == 0)


@pytest.mark.parametrize("how", ["int8", "nf4", "nf4dq"])
def test_dequant_dtypes_and_jit(how):
    w = jnp.asarray(kernel((2, 128, 16), seed=7))
    qd = {"int8": lambda: quant.quantize_int8(w),
          "nf4": lambda: quant.quantize_nf4(w, block=64),
          "nf4dq": lambda: quant.quantize_nf4(w, block=64, double_quant=True, dq_block=8)}[how]()
    f32 = quant.dequantize(qd, jnp.float32)
    bf16 = quant.dequantize(qd, jnp.bfloat16)
    assert f32.dtype == jnp.float32 and bf16.dtype == jnp.bfloat16 and bf16.shape == w.shape
    np.testing.assert_array_equal(np.asarray(bf16.astype(jnp.float32)),
                                  np.asarray(f32.astype(jnp.bfloat16).astype(jnp.float32)))
    jitted = jax.jit(quant.dequantize, static_argnums=1)
    # under jit XLA may fuse the double-quant absmax's q * scale + mean into one FMA: 1 ulp
    np.testing.assert_allclose(np.asarray(jitted(qd, jnp.float32)), np.asarray(f32),
                               rtol=3e-7, atol=0)
    np.testing.assert_allclose(np.asarray(jitted(qd, jnp.bfloat16).astype(jnp.float32)),
                               np.asarray(bf16.astype(jnp.float32)), rtol=2 ** -8, atol=0)
    assert jitted(qd, jnp.bfloat16).dtype == jnp.bfloat16
    # quantizing under jit gives the same arrays
    if how == "int8":
        qj = jax.jit(quant.quantize_int8)(w)
    else:
        qj = jax.jit(quant.quantize_nf4, static_argnames=("block", "double_quant", "dq_block"))(
            w, block=64, double_quant=how == "nf4dq", dq_block=8)
    assert set(qj) == set(qd)
    for k in qd:
        np.testing.assert_array_equal(np.asarray(qj[k]), np.asarray(qd[k]))


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match=r"shape \(128, 48\) has out = 48 .* dq_block = 256"):
        quant.quantize_nf4(jnp.zeros((128, 48)), double_quant=True)
    with pytest.raises(ValueError, match="block must be even"):
        quant.quantize_nf4(jnp.zeros((63, 8)), block=63)
    with pytest.raises(ValueError, match="not a dense kernel"):
        quant.quantize_nf4(jnp.zeros((128,)))
    with pytest.raises(ValueError, match="floating-point"):
        quant.quantize_int8(jnp.zeros((4, 4), jnp.int8))
    with pytest.raises(ValueError, match="unknown kind"):
        quant.nbytes_per_param("int4")
    with pytest.raises(ValueError, match="not a quantized kernel"):
        quant.dequantize({"q": jnp.zeros(3)}, jnp.float32)


def test_is_quantized():
    w = jnp.asarray(kernel((64, 16)))
    assert quant.is_quantized(quant.quantize_int8(w))
    assert quant.is_quantized(quant.quantize_nf4(w))
    assert quant.is_quantized(quant.quantize_nf4(w, double_quant=True, dq_block=16))
    assert not quant.is_quantized(w)
    assert not quant.is_quantized(None)
    assert not quant.is_quantized({"kernel": w})
    assert not quant.is_quantized({**quant.quantize_int8(w), "bias": w[0]})
    assert quant.quant_kind(quant.quantize_nf4(w)) == "nf4"


# ---- memory ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(128, 512), (2, 64, 32), (3, 256, 256)])
@pytest.mark.parametrize("how", [("int8", {}), ("nf4", {"block": 64}), ("nf4", {"block": 32}),
                                 ("nf4", {"block": 64, "double_quant": True, "dq_block": 16}),
                                 ("nf4", {"block": 32, "double_quant": True, "dq_block": 32})])
def test_exact_byte_counts(shape, how):
    kind, kw = how
    qd = quant.quantize(jnp.zeros(shape, jnp.float32), kind, **kw)
    assert quant.quantized_nbytes(shape, kind, **kw) == sum(v.nbytes for v in qd.values())


def test_bytes_per_param():
    assert quant.nbytes_per_param("nf4") == 0.5625                   # 4.5 bits
    dq = quant.nbytes_per_param("nf4", double_quant=True)
    assert dq == 0.5 + 1 / 64 + 4 / (64 * 256)
    assert abs(8 * dq - 4.127) < 1e-3                                # QLoRA's 4.127 bits
    assert quant.nbytes_per_param("int8") == 1.0
    assert quant.nbytes_per_param("int8", in_features=4096) == 1 + 4 / 4096
    assert quant.nbytes_per_param("bfloat16") == 2.0
    shape = (32, 4096, 11008)  # LLaMA-7B's stacked gate/up kernels
    n = np.prod(shape, dtype=np.int64)
    for kind, kw in [("nf4", {}), ("nf4", {"double_quant": True})]:
        exact = quant.quantized_nbytes(shape, kind, **kw) / n
        assert abs(exact - quant.nbytes_per_param(kind, **kw)) < 1e-6
    assert abs(quant.quantized_nbytes(shape, "int8") / n
               - quant.nbytes_per_param("int8", in_features=4096)) < 1e-12


# ---- reconstruction error ----------------------------------------------------------------------
def test_relative_rms_error_on_gaussian_kernel():
    w = kernel((512, 512), seed=8, std=0.02)
    w64 = w.astype(np.float64)

    def rel(qd):
        d = np.asarray(quant.dequantize(qd, jnp.float32), np.float64) - w64
        return float(np.sqrt(np.mean(d ** 2)) / np.sqrt(np.mean(w64 ** 2)))

    e_int8 = rel(quant.quantize_int8(jnp.asarray(w)))
    e_nf4 = rel(quant.quantize_nf4(jnp.asarray(w), block=64))
    e_dq = rel(quant.quantize_nf4(jnp.asarray(w), block=64, double_quant=True, dq_block=256))
    print(f"\nrelative RMS reconstruction error, N(0, 0.02) [512, 512]: int8 {e_int8:.3e}, "
          f"nf4 (block 64) {e_nf4:.3e}, nf4 + double quant (64/256) {e_dq:.3e}")
    assert e_int8 < 1e-2
    assert 0.05 < e_nf4 < 0.15
    assert abs(e_dq - e_nf4) < 0.02 * e_nf4


@pytest.mark.parametrize("shape,block", [((100, 8), 64), ((3, 100, 8), 64), ((2, 70, 6), 32)])
def test_nf4_pads_the_last_block_of_any_shape(shape, block):
    """As bitsandbytes (which pads its flattened tensor to whole blocks): an in size that is not
    a multiple of the block gets its last block padded with zeros; the padded rows cost bytes
    (`quantized_nbytes` counts them) and `dequantize(n_in=)` returns the kernel's own shape
    within the NF4 bound, each block's absmax taken over its real values only."""
    w = kernel(shape, seed=5)
    n_in, n_out = shape[-2:]
    pad = quant.padded_in(n_in, block)
    assert pad % block == 0 and pad > n_in
    qd = quant.quantize_nf4(jnp.asarray(w), block=block)
    assert qd["codes"].shape == shape[:-2] + (pad // 2, n_out)
    assert qd["absmax"].shape == shape[:-2] + (pad // block, n_out)
    assert sum(int(x.nbytes) for x in qd.values()) == quant.quantized_nbytes(shape, "nf4", block)
    deq = np.asarray(quant.dequantize(qd, jnp.float32, n_in=n_in), np.float64)
    assert deq.shape == shape
    full = np.asarray(quant.dequantize(qd, jnp.float32))
    assert full.shape == shape[:-2] + (pad, n_out) and np.all(full[..., n_in:, :] == 0)
    # reference absmax per block over the real rows only (the padding is zeros)
    wp = np.concatenate([w, np.zeros(shape[:-2] + (pad - n_in, n_out))], axis=-2)
    absmax = np.abs(wp.reshape(shape[:-2] + (pad // block, block, n_out))).max(axis=-2)
    np.testing.assert_array_equal(np.asarray(qd["absmax"], np.float64), absmax.astype(np.float32))
    half_gap = np.max(np.diff(np.array(NF4_TABLE))) / 2
    bound = np.repeat(absmax, block, axis=-2)[..., :n_in, :]
    assert np.all(np.abs(deq - w) <= half_gap * bound * (1 + 1e-6))
