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
