"""Reward model: tiny preset accuracy (SFT -> RM), HF export parity, loss wiring, bad data."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easyrl import checkpoint
from easyrl import model as M
from easyrl.algorithms import common, rm
from easyrl.data import synthetic
from easyrl.train import setup
from easyrl.train.config import load_config_file
from easyrl.train.metrics import read_metrics
from easyrl.train.step import accumulate, make_eval_step

from tiny_configs import ONE_DEVICE, make_config


@pytest.fixture(scope="module")
def rm_run(sft_run, heldout_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm_tiny")
    rm.train(make_config("rm", out, **{"model.path": sft_run, "data.eval": heldout_pairs,
                                       "eval.every": 250}))
    return str(out)


@pytest.mark.slow
def test_rm_tiny_heldout_accuracy(rm_run):
    rows = read_metrics(rm_run)
    evals = [r for r in rows if "eval/accuracy" in r]
    print("RM eval/accuracy by step:", [(r["step"], round(r["eval/accuracy"], 4)) for r in evals])
    for k in ("loss", "accuracy", "margin", "reward/chosen", "reward/rejected", "eval/margin"):
        assert k in rows[-1], k
    assert evals[-1]["eval/accuracy"] >= 0.95
    assert evals[-1]["eval/margin"] > evals[0]["eval/margin"] > 0
    cfg, kind, params = checkpoint.load_model(rm_run)
    assert kind == "reward" and "score" in params and "lm_head" not in params


@pytest.mark.slow
def test_rm_export_loads_in_transformers(rm_run, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from easyrl import cli
    out = str(tmp_path / "hf_rm")
    cli.main(["convert", "easyrl-to-hf", "--ckpt", rm_run, "--out", out, "--kind", "reward"])
    hf_model = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf_model).__name__ == "LlamaForSequenceClassification"

    cfg, _, params = checkpoint.load_model(rm_run)
    c = make_config("rm", tmp_path / "unused", **{"model.path": rm_run})
    tok = setup.load_tokenizer(c)
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "sort: d b c"
    assert hf_tok.encode(text) == tok.encode(text)
    _, ev = common.pair_iterators(c, tok)
    batch = next(ev)
    ids, attn = (np.asarray(x) for x in common.pair_inputs(batch))
    ours = np.asarray(M.score(cfg, params, jnp.asarray(ids), jnp.asarray(attn)))
    with torch.no_grad():
        theirs = hf_model(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(attn, dtype=torch.long)).logits[:, 0].numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)


def _loss_batch(c, tok):
    train, _ = common.pair_iterators(c, tok)
    return next(train)


def test_rm_loss_matches_reference_and_any_micro_split(cache, tmp_path):
    """loss = mean softplus(-(r_c - r_r - m)) over pairs; identical for any micro-batch split."""
    path = tmp_path / "pairs_small.jsonl"
    synthetic.write_jsonl(str(path), synthetic.preference_pairs(64, seed=3, split="train"))
    c = make_config("rm", tmp_path, **{"data.train": str(path), "data.eval": ""})
    tok = setup.load_tokenizer(c)
    cfg = setup.model_config(c, tok)
    params = jax.jit(lambda r: M.init_params(cfg, r, "reward"))(jax.random.PRNGKey(0))
    batch = {k: jnp.asarray(v) for k, v in _loss_batch(c, tok).items()}
    batch["margin"] = jnp.linspace(-1.0, 1.0, batch["margin"].shape[0])
    rc, rr = jax.jit(lambda p, b: (
        M.score(cfg, p, b["chosen_input_ids"], b["chosen_attention_mask"]),
        M.score(cfg, p, b["rejected_input_ids"], b["rejected_attention_mask"])))(params, batch)
    d = np.float64(rc) - np.float64(rr) - np.float64(batch["margin"])
    want = np.mean(np.logaddexp(0.0, -d))
    loss_fn = rm.make_loss(cfg, use_margin=True)
    ev1 = jax.jit(make_eval_step(loss_fn, common.pair_denom))
    m1, denom = ev1(params, None, batch, jax.random.PRNGKey(0))
    assert float(denom) == batch["margin"].shape[0]
    np.testing.assert_allclose(float(m1["loss"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(m1["accuracy"]), np.mean(d + np.float64(batch["margin"]) > 0))
    loss4, m4, _ = jax.jit(lambda p, b: accumulate(loss_fn, p, None, b, jax.random.PRNGKey(0),
                                                   common.pair_denom(b), 4, with_grad=False))(params, batch)
    np.testing.assert_allclose(float(loss4), float(m1["loss"]), rtol=1e-6)
    for k in ("accuracy", "margin", "reward/chosen", "reward/rejected"):
        np.testing.assert_allclose(float(m4[k]), float(m1[k]), rtol=1e-5, atol=1e-6)


def test_rm_bad_row_names_file_and_line(cache, tmp_path, capsys):
    from easyrl import cli
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "sort: b a", "chosen": "a b", "rejected": "b a"}] * 40
    lines = [json.dumps(r) for r in rows]
    lines[6] = json.dumps({"prompt": "sort: c a", "chosen": "a c"})  # line 7: no rejected
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["rm", "--config", "configs/rm.py:tiny", f"--config.data.train={path}",
                  "--config.data.eval=", f"--config.output_dir={tmp_path / 'out'}",
                  f"--config.mesh={ONE_DEVICE}", "--config.log.tensorboard=false"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert str(path) in err and "line 7" in err and "rejected" in err, err
    assert "Traceback" not in err


def test_rm_presets_load():
    for preset in ("tiny", "stackllama_7b", "stackllama_7b_lora", "tulu25_13b"):
        c = load_config_file(f"configs/rm.py:{preset}")
        assert c.command == "rm" and "use_margin" in c.rm
    with pytest.raises(ValueError, match="unknown rm preset"):
        load_config_file("configs/rm.py:nope")


def test_reward_model_lora_on_int8_base_trains_head_and_adapters(sft_run, tmp_path):
    """A reward model from the SFT run with LoRA over an int8 base: the score head and the
    adapters train (finite loss), the quantized kernels are stored as int8."""
    out = tmp_path / "rm_int8"
    rm.train(make_config("rm", out, **{"model.path": sft_run, "data.eval": "",
                                       "train.steps": 3, "model.lora.rank": 4,
                                       "model.lora.alpha": 8.0,
                                       "model.lora.base_quant": "int8"}))
    rows = read_metrics(str(out))
    assert len(rows) >= 1 and all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    cfg, kind, params = checkpoint.load_model(str(out))
    assert kind == "reward" and cfg.base_quant == "int8"
    assert params["layers"]["self_attn"]["q_proj"]["kernel"]["q"].dtype == jnp.int8
    assert float(jnp.abs(params["layers"]["self_attn"]["q_proj"]["lora_b"]).max()) > 0
