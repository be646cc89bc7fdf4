"""DPO: tiny preset learning (SFT -> DPO), precomputed vs live reference, every loss type, the
CLI, bad data."""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest

from easyrl import model as M
from easyrl.algorithms import common, dpo
from easyrl.data import synthetic
from easyrl.data.formats import DataError
from easyrl.train import setup
from easyrl.train.config import load_config_file
from easyrl.train.metrics import read_metrics
from easyrl.train.optim import make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from tiny_configs import make_config
TRL_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def dpo_run(sft_run, heldout_pairs, tmp_path_factory):
    """Tiny preset from the SFT run, live frozen reference, metrics logged every step."""
    out = tmp_path_factory.mktemp("dpo_tiny")
    res = dpo.train(make_config("dpo", out, **{"model.path": sft_run, "log.every": 1,
                                               "data.eval": heldout_pairs, "eval.every": 100}))
    assert res.state.frozen is not None  # the live reference rides in the train state
    return str(out)


@pytest.mark.slow
def test_dpo_tiny_heldout_accuracy_and_rising_margins(dpo_run):
    rows = read_metrics(dpo_run)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    for k in TRL_KEYS + ("loss",):
        assert k in rows[0], k
    # step 1: policy == reference, so every implicit reward is exactly 0 and the loss is log 2
    assert abs(rows[0]["rewards/chosen"]) < 1e-6 and abs(rows[0]["rewards/margins"]) < 1e-6
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    evals = [r for r in rows if "eval/rewards/accuracies" in r]
    print("DPO eval (step, accuracy, margin):",
          [(r["step"], round(r["eval/rewards/accuracies"], 4), round(r["eval/rewards/margins"], 3))
           for r in evals])
    assert evals[-1]["eval/rewards/accuracies"] >= 0.90
    assert evals[-1]["eval/rewards/margins"] > evals[0]["eval/rewards/margins"] > 0
    early = np.mean([r["rewards/margins"] for r in rows[:20]])
    late = np.mean([r["rewards/margins"] for r in rows[-20:]])
    print(f"DPO train rewards/margins: first 20 steps {early:.3f}, last 20 steps {late:.3f}")
    assert late > early + 0.5


@pytest.mark.slow
def test_precomputed_reference_matches_live(dpo_run, sft_run, heldout_pairs, tmp_path):
    """Step-1 metrics with dpo.precompute_ref equal those of the live frozen reference."""
    res = dpo.train(make_config("dpo", tmp_path, **{"model.path": sft_run, "log.every": 1,
                                                    "data.eval": heldout_pairs, "train.steps": 1,
                                                    "dpo.precompute_ref": "true"}))
    assert res.state.frozen is None  # no reference model held while training
    pre = read_metrics(str(tmp_path))[0]
    live = read_metrics(dpo_run)[0]
    assert pre["step"] == live["step"] == 1
    for k in ("loss",) + TRL_KEYS:
        assert pre[k] == pytest.approx(live[k], abs=1e-6), k
    assert "eval/rewards/accuracies" in pre


def small_pairs(tmp_path, n=64):
    """A small synthetic preference file (fast to tokenize)."""
    path = tmp_path / "pairs_small.jsonl"
    synthetic.write_jsonl(str(path), synthetic.preference_pairs(n, seed=3, split="train"))
    return str(path)


def test_every_loss_type_runs(cache, tmp_path):
    """Each variant takes two optimizer steps through the real model gradient: the policy
    log-probs' forward and vector-Jacobian product are compiled once and the variant's
    `dpo.objective` (the head `make_loss` applies) sits on top. At step 1 policy == reference,
    so h = 0 and each loss has its closed form."""
    c = make_config("dpo", tmp_path, **{"data.train": small_pairs(tmp_path), "data.eval": "",
                                        "train.batch_size": 16, "optim.warmup": 0})
    tok = setup.load_tokenizer(c)
    cfg = setup.model_config(c, tok)
    train, _ = common.pair_iterators(c, tok)
    batches = [{k: jnp.asarray(v) for k, v in next(train).items()} for _ in range(2)]
    params0 = jax.jit(lambda r: M.init_params(cfg, r))(jax.random.PRNGKey(0))
    tx, schedule = make_optimizer(c.optim, 10)
    fwd = jax.jit(lambda p, b: dpo.pair_logps(cfg, p, b))

    @jax.jit
    def bwd(p, b, g_c, g_r):
        out, vjp = jax.vjp(lambda q: dpo.pair_logps(cfg, q, b), p)
        return vjp((g_c, g_r, jnp.zeros_like(out[2]), jnp.zeros_like(out[3])))[0]

    @jax.jit
    def update(p, opt, g):
        u, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, u), opt, optax.global_norm(g)

    opt0 = jax.jit(tx.init)(params0)

    refs = [fwd(params0, b)[:2] for b in batches]  # the reference = the initial policy
    beta = 0.1
    e = 1e-3  # exo_pair's eps when label_smoothing is 0
    cases = [("sigmoid", 0.2, False, math.log(2)), ("robust", 0.2, False, math.log(2)),
             ("hinge", 0.0, False, 1.0), ("ipo", 0.0, False, (1 / (2 * beta)) ** 2),
             ("sigmoid", 0.0, True, None),
             ("exo_pair", 0.0, False, 0.5 * (math.log(0.5 / (1 - e)) + math.log(0.5 / e))),
             ("nca_pair", 0.0, False, 2 * math.log(2)), ("bco_pair", 0.0, False, 2 * math.log(2)),
             ("sppo_hard", 0.0, False, 2 * (0.5 / beta) ** 2), ("aot", 0.1, False, math.log(2)),
             ("aot_pair", 0.1, False, math.log(2)), ("apo_zero", 0.0, False, 1.0),
             ("apo_down", 0.0, False, 1.0), ("discopop", 0.0, False, (math.log(2) + 1) / 2),
             ("sigmoid,sppo_hard", 0.0, False, math.log(2) + 0.5 * 2 * (0.5 / beta) ** 2)]
    for loss_type, eps, free, at_init in cases:
        d = mlc.ConfigDict(dict(beta=beta, loss_type=loss_type, label_smoothing=eps,
                                reference_free=free, precompute_ref=False,
                                **({"loss_weights": "1,0.5"} if "," in loss_type else {})))
        head = jax.jit(jax.value_and_grad(
            lambda pc, pr, rc, rr, lc, lr: dpo.objective(d, pc, pr, rc, rr, lc, lr, 16.0),
            argnums=(0, 1), has_aux=True))
        params, opt = params0, opt0
        out = []
        for b, (rc, rr) in zip(batches, refs):
            pc, pr, lc, lr = fwd(params, b)
            (loss, m), (g_c, g_r) = head(pc, pr, None if free else rc, None if free else rr, lc, lr)
            params, opt, gnorm = update(params, opt, bwd(params, b, g_c, g_r))
            out.append(dict({k: float(v) for k, v in m.items()}, loss=float(loss), gnorm=float(gnorm)))
        name = f"{loss_type} eps={eps} reference_free={free}"
        assert all(np.isfinite(o["loss"]) and np.isfinite(o["gnorm"]) for o in out), name
        if at_init is not None:
            assert out[0]["loss"] == pytest.approx(at_init, rel=1e-5), name
            assert out[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6), name
        if free:  # reference-free: rewards are beta * policy log-probs
            assert out[0]["rewards/chosen"] == pytest.approx(beta * out[0]["logps/chosen"], rel=1e-5)
        assert out[0]["gnorm"] > 0 and out[1]["loss"] != out[0]["loss"], name


def test_combined_loss_with_rpo_runs(cache, tmp_path):
    """`dpo` with a weighted sigmoid + sppo_hard combination and the RPO term: finite metrics,
    the components and nll_loss logged; at step 1 (policy == reference) the loss is
    log 2 + 0.5 * 2 (1/(2 beta))^2 + 0.5 * nll_loss."""
    c = make_config("dpo", tmp_path, **{
        "data.train": small_pairs(tmp_path, n=16), "data.eval": "", "train.batch_size": 8,
        "train.steps": 2, "log.every": 1, "optim.warmup": 0, "checkpoint.every": 0,
        "dpo.loss_type": "sigmoid,sppo_hard", "dpo.loss_weights": "1.0,0.5", "dpo.rpo_alpha": 0.5})
    dpo.train(c)
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for k in ("loss", "nll_loss", "loss/sigmoid", "loss/sppo_hard") + TRL_KEYS:
            assert k in r and np.isfinite(r[k]), (r["step"], k)
    first, beta = rows[0], c.dpo.beta
    assert first["loss/sigmoid"] == pytest.approx(math.log(2), rel=1e-5)
    assert first["loss/sppo_hard"] == pytest.approx(2 * (0.5 / beta) ** 2, rel=1e-5)
    assert first["nll_loss"] > 0
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * first["loss/sppo_hard"]
                                          + 0.5 * first["nll_loss"], rel=1e-5)
    assert rows[1]["loss"] != first["loss"]


def test_bad_config_and_bad_data(cache, tmp_path):
    c = make_config("dpo", tmp_path)
    c.dpo.loss_type = "kto"
    with pytest.raises(ValueError, match="dpo.loss_type"):
        dpo.check_config(c.dpo)
    c.dpo.loss_type, c.dpo.label_smoothing = "robust", 0.5
    with pytest.raises(ValueError, match="dpo.label_smoothing"):
        dpo.check_config(c.dpo)
    c.dpo.label_smoothing = 0.0
    for key, value, msg in (("loss_type", "sigmoid,kto", r"dpo\.loss_type: unknown .*'kto'"),
                            ("loss_type", "sigmoid,,hinge", r"dpo\.loss_type: .*empty"),
                            ("loss_weights", "1.0,0.5", r"dpo\.loss_weights: .*2 weight.*1 loss type"),
                            ("loss_weights", "-1", r"dpo\.loss_weights: .*>= 0"),
                            ("rpo_alpha", -0.5, r"dpo\.rpo_alpha: .*>= 0"),
                            ("discopop_tau", 0.0, r"dpo\.discopop_tau")):
        bad = mlc.ConfigDict(c.dpo.to_dict())
        bad.loss_type = "sigmoid"
        bad[key] = value
        with pytest.raises(ValueError, match=msg):
            dpo.check_config(bad)
    ok = mlc.ConfigDict(c.dpo.to_dict())
    ok.update(loss_type="sigmoid,sppo_hard,sft", loss_weights="1,0.5,0.1", rpo_alpha=1.0)
    dpo.check_config(ok)
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"prompt": "sort: b a", "chosen": "a b", "rejected": "b a"})] * 40
    lines[11] = '{"prompt": "sort: c a", "chosen": "a c", "rejected": '  # line 12: cut short
    path.write_text("\n".join(lines) + "\n")
    c = make_config("dpo", tmp_path, **{"data.train": str(path), "data.eval": ""})
    with pytest.raises(DataError) as e:
        common.pair_iterators(c, setup.load_tokenizer(c))
    assert str(path) in str(e.value) and "line 12" in str(e.value) and "JSON" in str(e.value)


@pytest.mark.slow
def test_cli_dpo_precomputed_on_8_devices(cache, tmp_path):
    """`python -m easyrl dpo` end to end on the default mesh (8 simulated devices, fsdp=8)."""
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "easyrl", "dpo", "--config", "configs/dpo.py:tiny",
           "--config.train.steps=2", f"--config.output_dir={out}", "--config.dpo.precompute_ref=true",
           f"--config.data.train={small_pairs(tmp_path)}", "--config.data.eval_fraction=0.5",
           "--config.eval.max_batches=2", "--config.log.tensorboard=false"]
    env = dict(os.environ)
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_metrics(str(out))
    assert rows[-1]["step"] == 2
    for k in TRL_KEYS + ("eval/rewards/accuracies", "eval/rewards/margins"):
        assert k in rows[-1], k
    assert os.path.isdir(out / "checkpoints" / "2")


def test_dpo_presets_load():
    for preset in ("tiny", "stackllama2_7b", "stackllama2_7b_lora"):
        c = load_config_file(f"configs/dpo.py:{preset}")
        assert c.command == "dpo" and c.dpo.beta == 0.1 and c.dpo.loss_type == "sigmoid"
        dpo.check_config(c.dpo)
    with pytest.raises(ValueError, match="unknown dpo preset"):
        load_config_file("configs/dpo.py:nope")
