"""HF <-> easyrl conversion: round trips, exports that transformers loads, and clear errors."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from easyrl import checkpoint, convert, hf
from easyrl import model as M

from hf_models import batch, make_causal_lm, make_reward_model


def _all_tensors(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def test_round_trip_hf_easyrl_hf_identical(tmp_path):
    src, ck, dst = tmp_path / "src", tmp_path / "ck", tmp_path / "dst"
    make_causal_lm(src, num_key_value_heads=2, attention_bias=True)
    convert.hf_to_easyrl(str(src), str(ck))
    convert.easyrl_to_hf(str(ck), str(dst))
    a, b = _all_tensors(src), _all_tensors(dst)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_export_loads_in_transformers_and_reproduces_logits(tmp_path):
    from transformers import AutoModelForCausalLM
    config = M.get_preset("tiny").replace(vocab_size=250, num_key_value_heads=2)
    params = M.init_params(config)
    hf.save(str(tmp_path), config, params)
    assert os.path.exists(tmp_path / "generation_config.json")
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids, mask = batch(config.vocab_size, padding="left")
    with torch.no_grad():
        want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(M.forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(got - want)[mask > 0].max() <= 1e-4


def test_reward_export_loads_as_sequence_classification(tmp_path):
    from transformers import AutoModelForSequenceClassification
    config = M.get_preset("tiny")
    params = M.init_params(config, kind="reward")
    hf.save(str(tmp_path), config, params, kind="reward")
    ref = AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    ids, mask = batch(config.vocab_size)
    ids = np.where(mask > 0, ids, ref.config.pad_token_id)
    with torch.no_grad():
        want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()[:, 0]
    got = np.asarray(M.score(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(got - want).max() <= 1e-4


def test_sharded_safetensors_with_index_and_bf16(tmp_path):
    config = M.get_preset("tiny")
    params = M.init_params(config)
    hf.save(str(tmp_path), config, params, dtype="bfloat16", max_shard_size=60_000)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    files = set(index["weight_map"].values())
    assert len(files) > 1
    c2, p2 = hf.load(str(tmp_path), dtype="bfloat16")
    assert p2["layers"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(p2["layers"]["mlp"]["up_proj"]["kernel"]),
        np.asarray(params["layers"]["mlp"]["up_proj"]["kernel"].astype(jnp.bfloat16)))


def test_load_pytorch_bin(tmp_path):
    ref = make_causal_lm(tmp_path / "st", num_key_value_heads=2)
    binp = tmp_path / "bin"
    ref.save_pretrained(binp, safe_serialization=False) if "safe_serialization" in \
        ref.save_pretrained.__code__.co_varnames else None
    if not (binp / "pytorch_model.bin").exists():  # transformers 5 always writes safetensors
        os.makedirs(binp, exist_ok=True)
        torch.save(ref.state_dict(), binp / "pytorch_model.bin")
        (binp / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    c1, p1 = hf.load(str(tmp_path / "st"))
    c2, p2 = hf.load(str(binp))
    for a, b in zip(np.asarray(p1["layers"]["self_attn"]["q_proj"]["kernel"]).ravel()[:100],
                    np.asarray(p2["layers"]["self_attn"]["q_proj"]["kernel"]).ravel()[:100]):
        assert a == b


def test_reward_from_causal_checkpoint_inits_head(tmp_path):
    make_causal_lm(tmp_path)
    with pytest.raises(KeyError, match="score.weight"):
        hf.load(str(tmp_path), kind="reward")
    config, params = hf.load(str(tmp_path), kind="reward", init_missing_head=True)
    k = np.asarray(params["score"]["kernel"])
    assert k.shape == (64, 1) and 0.05 < k.std() < 0.25  # N(0, 1/(D+1)): std ~ 0.124


# ---- bad input ------------------------------------------------------------------------------
def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        hf.load(str(tmp_path))


def test_wrong_shape_names_tensor_and_file(tmp_path):
    make_causal_lm(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.safetensors.*mlp\.\w+_proj\.weight.*shape"):
        hf.load(str(tmp_path))


def test_missing_tensor_named(tmp_path):
    make_causal_lm(tmp_path)
    from safetensors.numpy import save_file
    t = load_file(str(tmp_path / "model.safetensors"))
    del t["model.layers.1.mlp.down_proj.weight"]
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        hf.load(str(tmp_path))


def test_no_weights(tmp_path):
    make_causal_lm(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model weights"):
        hf.load(str(tmp_path))


def test_cli_convert_both_ways_and_errors(tmp_path):
    src = tmp_path / "src"
    make_reward_model(src)
    env = dict(os.environ, XLA_FLAGS="")
    run = lambda *a: subprocess.run([sys.executable, "-m", "easyrl", "convert", *a],  # noqa: E731
                                    capture_output=True, text=True, env=env)
    r = run("hf-to-easyrl", "--hf", str(src), "--out", str(tmp_path / "ck"), "--kind", "reward")
    assert r.returncode == 0, r.stderr
    r = run("easyrl-to-hf", "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "out"),
            "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]
    config, kind, params = checkpoint.load_model(str(tmp_path / "ck"))
    assert kind == "reward"
    r = run("hf-to-easyrl", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr
