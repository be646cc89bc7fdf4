"""Mistral, Qwen2 / Qwen2.5 and Qwen3 through the one easyrl model: logit parity with
transformers' own classes (fp32, random init, saved locally) for left- and right-padded batches
longer than the sliding window, greedy decoding (static sampler and rollout engine) equal to
their `generate`, sequence-classification parity, HF -> easyrl -> HF round trips, PEFT export,
and the config errors for what easyrl does not support."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from easyrl import hf
from easyrl import model as M
from easyrl.model import lora
from easyrl.model.config import LlamaConfig, check_hf_config

from hf_models import ARCH_VARIANTS, ARCHS, batch, left_pad, make_causal_lm, make_reward_model

TOL = 1e-4
WINDOWED = sorted(k for k, v in ARCH_VARIANTS.items() if v.get("sliding_window")
                  and v.get("use_sliding_window", v["arch"] == "mistral"))


def _hf_logits(m, ids, mask):
    with torch.no_grad():
        return m(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _max_diff(a, b, mask):
    return float(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask) > 0].max())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """variant -> (folder, transformers model, easyrl config, params)."""
    out = {}
    for name, kw in ARCH_VARIANTS.items():
        folder = str(tmp_path_factory.mktemp(name))
        ref = make_causal_lm(folder, **kw)
        out[name] = (folder, ref) + hf.load(folder)
    return out


def test_config_switches_read_from_each_architecture(models):
    c = {k: v[2] for k, v in models.items()}
    assert c["mistral"].model_type == "mistral" and c["mistral"].window is None
    assert c["mistral_window"].window == 5
    assert c["qwen2"].qkv_bias and not c["qwen2"].attention_bias and c["qwen2"].window is None
    assert c["qwen2"].tie_word_embeddings and c["qwen2"].rope_theta == 1e6
    assert c["qwen2_window"].window == 4
    assert c["qwen2_yarn"].rope_scaling_dict["rope_type"] == "yarn"
    assert c["qwen3"].qk_norm and c["qwen3"].head_dim == 24 and not c["qwen3"].qkv_bias
    assert c["qwen3_bias_window"].attention_bias and c["qwen3_bias_window"].window == 6
    for name, (_, ref, config, params) in models.items():  # parameter count = transformers'
        assert config.num_params == sum(p.numel() for p in ref.parameters()), name
        flat = {hf.path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
        assert ("layers/self_attn/q_norm/scale" in flat) == config.qk_norm, name
        assert ("layers/self_attn/q_proj/bias" in flat) == (config.qkv_bias
                                                            or config.attention_bias), name
        assert ("layers/self_attn/o_proj/bias" in flat) == config.attention_bias, name


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("variant", sorted(ARCH_VARIANTS))
def test_logits_match_transformers(models, variant, padding):
    """Batches of 12 tokens: longer than every window here (4, 5, 6), so keys fall out of it."""
    _, ref, config, params = models[variant]
    ids, mask = batch(config.vocab_size, padding=padding)
    want = _hf_logits(ref, ids, mask)
    got = np.asarray(M.forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    diff = _max_diff(got, want, mask)
    print(f"max |logit diff| {variant}/{padding}: {diff:.2e}")
    assert diff <= TOL
    if variant in WINDOWED:  # the window matters on these batches: without it they differ
        full = np.asarray(M.forward(config.replace(sliding_window=None), params,
                                    jnp.asarray(ids), jnp.asarray(mask)))
        assert _max_diff(full, want, mask) > 1e-3


def test_packed_segments_never_attend_across_under_a_window(models):
    """Two segments packed in one row under a window: each equals the segment alone."""
    _, _, config, params = models["mistral_window"]
    rs = np.random.RandomState(3)
    a, b = rs.randint(3, config.vocab_size, 9), rs.randint(3, config.vocab_size, 7)
    ids = np.concatenate([a, b])[None]
    seg = np.asarray([[1] * 9 + [2] * 7])
    pos = np.asarray([list(range(9)) + list(range(7))])
    packed = np.asarray(M.forward(config, params, jnp.asarray(ids), jnp.ones_like(ids),
                                  positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg)))
    for lo, x in ((0, a), (9, b)):
        alone = np.asarray(M.forward(config, params, jnp.asarray(x[None])))
        np.testing.assert_allclose(packed[0, lo:lo + len(x)], alone[0], atol=1e-5)


@pytest.mark.parametrize("variant", ["mistral_window", "qwen2", "qwen3_bias_window"])
def test_greedy_sampler_and_engine_match_transformers_generate(models, variant):
    """Mixed prompt lengths, 10 new tokens: responses run past the window (4-6), so decode
    steps drop keys; the static sampler (both decode loops), its shared prefixes (G = 2) and the
    engine (more requests than slots) all emit transformers' greedy tokens."""
    from easyrl.engine import Engine
    from easyrl.generate import generate
    _, ref, config, params = models[variant]
    rs = np.random.RandomState(0)
    plist = [rs.randint(3, config.vocab_size, n).tolist() for n in (7, 3, 9, 1)]
    n_new = 10
    ids, mask = left_pad(plist)
    ref.generation_config.eos_token_id = None
    with torch.no_grad():
        want = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                            do_sample=False, max_new_tokens=n_new, pad_token_id=0)
    want = want[:, ids.shape[1]:].numpy()
    for decode in ("unrolled", "scan"):
        out = generate(config, params, jnp.asarray(ids), jnp.asarray(mask),
                       jax.random.PRNGKey(0), max_new_tokens=n_new, temperature=0.0,
                       eos_token_id=(), decode=decode)
        np.testing.assert_array_equal(np.asarray(out["response"]), want, err_msg=decode)
    out = generate(config, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0),
                   max_new_tokens=n_new, temperature=0.0, eos_token_id=(), num_samples=2)
    np.testing.assert_array_equal(np.asarray(out["response"]), np.repeat(want, 2, axis=0))
    eng = Engine(config, slots=3, max_prompt_len=12, max_new_tokens=n_new, temperature=0.0,
                 eos_token_id=(), block=4, chunk=3)
    res = eng.run(params, [dict(prompt_ids=p, num_samples=2) for p in plist], seed=0)
    for r, o in enumerate(res):
        assert o["response_ids"] == [want[r].tolist()] * 2, r


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_reward_model_matches_sequence_classification(tmp_path, arch, padding):
    kw = {k: v for k, v in ARCH_VARIANTS[arch + ("_window" if arch == "mistral" else "")].items()}
    ref = make_reward_model(str(tmp_path), **kw)
    assert type(ref).__name__ == ARCHS[arch] + "ForSequenceClassification"
    config, params = hf.load(str(tmp_path), kind="reward")
    ids, mask = batch(config.vocab_size, padding=padding)
    ids = np.where(mask > 0, ids, ref.config.pad_token_id)
    with torch.no_grad():
        want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    got = np.asarray(M.score(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got, want, atol=TOL)
    # the export is the architecture's own class again, and loads with the same scores
    out = str(tmp_path / "export")
    hf.save(out, config, params, kind="reward")
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == [ARCHS[arch] + "ForSequenceClassification"]
    from transformers import AutoModelForSequenceClassification
    back = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(back).__name__ == ARCHS[arch] + "ForSequenceClassification"
    with torch.no_grad():
        again = back(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    np.testing.assert_allclose(again, want, atol=TOL)


# the config.json keys a round trip must keep (transformers' own save: the source of truth)
_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
         "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
         "rms_norm_eps", "tie_word_embeddings", "attention_bias", "mlp_bias", "sliding_window",
         "use_sliding_window", "max_window_layers", "layer_types", "bos_token_id",
         "eos_token_id", "pad_token_id", "hidden_act")


@pytest.mark.parametrize("variant", sorted(ARCH_VARIANTS))
def test_round_trip_identical_tensors_and_config(models, tmp_path, variant):
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    folder, ref, config, params = models[variant]
    out = str(tmp_path / "out")
    hf.save(out, config, params)
    a, b = load_file(os.path.join(folder, "model.safetensors")), \
        load_file(os.path.join(out, "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    src = json.load(open(os.path.join(folder, "config.json")))
    got = json.load(open(os.path.join(out, "config.json")))
    assert got["architectures"] == [ARCHS[ARCH_VARIANTS[variant]["arch"]] + "ForCausalLM"]
    for k in _KEYS:
        assert got.get(k) == src.get(k), k
    # rope: theta and scaling as transformers reads them back
    c1, c2 = AutoConfig.from_pretrained(folder), AutoConfig.from_pretrained(out)
    assert c1.rope_parameters == c2.rope_parameters
    assert (c1.head_dim if hasattr(c1, "head_dim") else None) == \
        (c2.head_dim if hasattr(c2, "head_dim") else None)
    assert LlamaConfig.from_hf(got) == config  # and easyrl reads its own export back
    m = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(m).__name__ == type(ref).__name__
    ids, mask = batch(config.vocab_size)
    np.testing.assert_allclose(_hf_logits(m, ids, mask), _hf_logits(ref, ids, mask), atol=1e-6)


@pytest.mark.parametrize("variant", ["mistral_window", "qwen2", "qwen3_bias_window"])
def test_lora_peft_export_loads_and_equals_merged(models, tmp_path, variant):
    """Adapters on every target (q, k, v, o, gate, up, down; biases and q/k norms stay base):
    the PEFT export loads in `peft` on the architecture's own base class and gives the logits
    of easyrl's model and of the merged export."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from easyrl.peft import save_peft
    folder, _, config, params = models[variant]
    cfg = config.replace(lora_rank=4, lora_alpha=8.0)
    p = lora.add_adapters(cfg, params, jax.random.PRNGKey(1))
    rs = np.random.RandomState(0)
    p = jax.tree_util.tree_map_with_path(
        lambda k, x: x + 0.05 * rs.standard_normal(x.shape).astype(x.dtype)
        if hf.path_str(k).endswith("lora_b") else x, p)
    ids, mask = batch(config.vocab_size)
    ours = np.asarray(M.forward(cfg, p, jnp.asarray(ids), jnp.asarray(mask)))
    base = np.asarray(M.forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    assert _max_diff(ours, base, mask) > 1e-3  # the adapters move the logits
    save_peft(str(tmp_path / "adapter"), cfg, p, base_model=folder)
    acfg = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert sorted(acfg["target_modules"]) == sorted(f"{t}_proj" for t in lora.TARGETS)
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder),
                                   str(tmp_path / "adapter")).eval()
    d_peft = _max_diff(_hf_logits(pm, ids, mask), ours, mask)
    hf.save(str(tmp_path / "merged"), config, lora.merge(cfg, p))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    d_merged = _max_diff(_hf_logits(merged, ids, mask), ours, mask)
    print(f"{variant} LoRA: PEFT on the base {d_peft:.2e}, merged export {d_merged:.2e}")
    assert d_peft < TOL and d_merged < TOL


def _tiny_hf(model_type, **kw):
    return dict(model_type=model_type, vocab_size=64, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64, **kw)


@pytest.mark.parametrize("hf_cfg, match", [
    (_tiny_hf("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1),
     "max_window_layers=1"),
    (_tiny_hf("qwen3", layer_types=["full_attention", "sliding_attention"],
              use_sliding_window=True, sliding_window=8), "layer_types"),
    (_tiny_hf("mistral", sliding_window=0), "sliding_window"),
    (_tiny_hf("qwen2", use_sliding_window="yes"), "use_sliding_window"),
    (_tiny_hf("qwen2", rope_scaling={"rope_type": "yarn"}), "factor"),
    (_tiny_hf("qwen2", rope_scaling={"rope_type": "longrope", "factor": 2.0}), "longrope"),
    (_tiny_hf("llama", rope_scaling={"rope_type": "linear", "factor": 2.0,
                                     "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
    (_tiny_hf("gemma2"), "model_type='gemma2'"),
])
def test_unsupported_config_keys_are_errors_naming_the_key(hf_cfg, match):
    with pytest.raises(ValueError, match=match):
        check_hf_config(hf_cfg, "x/config.json")
        LlamaConfig.from_hf(hf_cfg, source="x/config.json")


def test_published_presets_match_their_parameter_counts():
    """The planner's presets of the published configs: parameter counts as their model cards
    state them (Mistral-7B 7.24B, Qwen2.5-7B 7.62B, Qwen2.5-1.5B 1.54B, Qwen3-8B 8.19B)."""
    from easyrl.model.config import get_preset
    for name, billions in (("mistral_7b", 7.24), ("qwen25_7b", 7.62), ("qwen25_1_5b", 1.54),
                           ("qwen3_8b", 8.19)):
        assert round(get_preset(name).num_params / 1e9, 2) == billions, name
    assert get_preset("mistral_7b").window == 4096 and get_preset("qwen25_7b").window is None
