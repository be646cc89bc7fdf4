"""RRHF: tiny preset (SFT -> RRHF) ranks better and raises the best response's likelihood;
true lengths; micro-batch exactness; bad data."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easyrl import checkpoint
from easyrl import model as M
from easyrl.algorithms import rrhf
from easyrl.data import synthetic
from easyrl.data.formats import DataError
from easyrl.train import setup
from easyrl.train.config import load_config_file
from easyrl.train.metrics import read_metrics
from easyrl.train.step import accumulate

from tiny_configs import make_config


def heldout_metrics(c, run_dir) -> dict:
    """RRHF metrics of the params in `run_dir` over the whole eval split (prompt-weighted)."""
    cfg, _, params = checkpoint.load_model(run_dir)
    _, ev = rrhf.iterators(c, setup.load_tokenizer(c))
    fn = jax.jit(rrhf.make_loss(cfg, c.rrhf))
    sums, n = {}, 0
    ev.set_state({"epoch": 0, "index": 0})
    for _ in range(ev.steps_per_epoch):
        b = next(ev)
        _, m = fn(params, None, b, None, 1.0)  # denom 1: sums over the batch's prompts
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += b["input_ids"].shape[0]
    return {k: v / n for k, v in sums.items()}


@pytest.mark.slow
def test_rrhf_tiny_ranks_better_and_best_gains_likelihood(sft_run, tmp_path):
    c = make_config("rrhf", tmp_path, **{"model.path": sft_run})
    rrhf.train(c)
    rows = read_metrics(str(tmp_path))
    for k in ("loss", "loss/rank", "loss/sft", "rank_acc", "logps/best", "eval/loss/rank"):
        assert k in rows[-1], k
    before = heldout_metrics(c, sft_run)  # the SFT policy RRHF starts from
    after = {k: rows[-1][f"eval/{k}"] for k in before}  # the loop's eval at the last step
    np.testing.assert_allclose(after["rank_pairs"], before["rank_pairs"], rtol=1e-6)
    print("RRHF held-out before/after:",
          {k: (round(before[k], 4), round(after[k], 4)) for k in before})
    print("RRHF train loss/rank first/last window:", rows[0]["loss/rank"], rows[-1]["loss/rank"])
    assert after["loss/rank"] < 0.85 * before["loss/rank"]
    assert after["logps/best"] > before["logps/best"] + 0.03  # per-token log-likelihood
    assert after["rank_acc"] > before["rank_acc"]
    assert rows[-1]["loss/rank"] < rows[0]["loss/rank"]
    assert rows[-1]["logps/best"] > rows[0]["logps/best"]


def test_rrhf_true_lengths_and_micro_batch_exactness(cache, tmp_path):
    """Padding (seq_len) does not change the loss (true lengths); any micro split gives the
    same loss and metrics."""
    path = tmp_path / "rrhf_small.jsonl"
    synthetic.write_jsonl(str(path), synthetic.rrhf_examples(16, seed=3, split="train"))
    c = make_config("rrhf", tmp_path, **{"data.train": str(path), "data.eval": "",
                                         "train.batch_size": 8})
    tok = setup.load_tokenizer(c)
    cfg = setup.model_config(c, tok)
    params = jax.jit(lambda r: M.init_params(cfg, r))(jax.random.PRNGKey(1))
    loss_fn = rrhf.make_loss(cfg, c.rrhf)

    def run(batch, micro):
        f = jax.jit(lambda p, b: accumulate(loss_fn, p, None, b, jax.random.PRNGKey(0),
                                            rrhf.denom(b), micro, with_grad=False))
        loss, m, _ = f(params, {k: jnp.asarray(v) for k, v in batch.items()})
        return float(loss), {k: float(v) for k, v in m.items()}

    b24 = next(rrhf.iterators(c, tok)[0])
    c.train.seq_len = 40
    b40 = next(rrhf.iterators(c, tok)[0])
    assert b40["input_ids"].shape[-1] == 40 and b24["input_ids"].shape[-1] == 24
    np.testing.assert_array_equal(b24["loss_mask"].sum(-1), b40["loss_mask"].sum(-1))
    l24, m24 = run(b24, 1)
    l40, m40 = run(b40, 1)
    l24x4, m24x4 = run(b24, 4)
    assert l40 == pytest.approx(l24, rel=1e-5)
    assert l24x4 == pytest.approx(l24, rel=1e-6)
    for k in m24:
        assert m40[k] == pytest.approx(m24[k], rel=1e-5, abs=1e-6), k
        assert m24x4[k] == pytest.approx(m24[k], rel=1e-5, abs=1e-6), k
    assert m24["rank_pairs"] > 0 and m24["loss/sft"] == pytest.approx(-m24["logps/best"], rel=1e-6)


def test_rrhf_bad_rows_name_file_and_line(cache, tmp_path):
    good = {"prompt": "sort: b a", "responses": ["a b", "b a"], "scores": [1.0, 0.5]}
    for bad, words in (({"prompt": "sort: b a", "responses": ["a b", "b a"], "scores": [1.0]},
                        "scores"),
                       ('{"prompt": "sort: b a", "responses": ["a b"', "JSON")):
        path = tmp_path / "rrhf.jsonl"
        lines = [json.dumps(good)] * 20
        lines[4] = bad if isinstance(bad, str) else json.dumps(bad)
        path.write_text("\n".join(lines) + "\n")
        c = make_config("rrhf", tmp_path, **{"data.train": str(path), "data.eval": "",
                                             "train.batch_size": 4})
        with pytest.raises(DataError) as e:
            rrhf.iterators(c, setup.load_tokenizer(c))
        msg = str(e.value)
        assert str(path) in msg and "line 5" in msg and words in msg, msg


def test_rrhf_presets_load():
    for preset in ("tiny", "wombat_7b"):
        c = load_config_file(f"configs/rrhf.py:{preset}")
        assert c.command == "rrhf" and c.rrhf.length_penalty == 1.0 and c.rrhf.rank_weight == 1.0
    c = load_config_file("configs/rrhf.py:wombat_7b")
    assert c.optim.lr == 2e-5 and c.optim.warmup == 0.03 and c.train.epochs == 3
    with pytest.raises(ValueError, match="unknown rrhf preset"):
        load_config_file("configs/rrhf.py:nope")


def test_rrhf_lora_on_nf4_base_runs_and_keeps_the_base(sft_run, tmp_path):
    """RRHF with LoRA over an NF4 base: finite losses, the kernels the SFT run's quantized and
    left unchanged by training."""
    from easyrl.model import qlora
    c = make_config("rrhf", tmp_path, **{"model.path": sft_run, "train.steps": 2,
                                         "data.eval": "", "model.lora.rank": 4,
                                         "model.lora.alpha": 8.0,
                                         "model.lora.base_quant": "nf4",
                                         "model.lora.quant_block": 32})
    res = rrhf.train(c)
    rows = read_metrics(str(tmp_path))
    assert rows and all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    cfg, _, params = checkpoint.load_model(str(tmp_path))
    assert cfg.base_quant == "nf4"
    got = params["layers"]["mlp"]["up_proj"]["kernel"]["codes"]
    _, _, start = checkpoint.load_model(sft_run, merge_lora=True)
    want = qlora.quantize_params(cfg, start)["layers"]["mlp"]["up_proj"]["kernel"]["codes"]
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert float(jnp.abs(res.state.params["layers"]["mlp"]["up_proj"]["lora_b"]).max()) > 0
