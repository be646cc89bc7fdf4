"""Online DPO trainer: pair selection against plain python, the lr=0 identities (policy ==
reference: implicit rewards 0, sigmoid loss log 2), micro-batch split invariance of the update,
config errors, the CLI, exact resume, and the tiny preset learning the synthetic task."""
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from easyrl import model as M
from easyrl.train import launch
from easyrl.train.metrics import read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def models(random_models, tmp_path_factory):
    """The shared random tiny policy / RM (conftest) plus a reward file whose values differ
    between samples (so pairs have a margin)."""
    d = tmp_path_factory.mktemp("online_dpo_models")
    for name in ("policy", "rm"):
        os.symlink(random_models / name, d / name)
    (d / "varied.py").write_text("def varied(prompts, completions, completion_ids, **kw):\n"
                                 "    return [float(sum(x) % 7) for x in completion_ids]\n")
    return d


def args(models, out, *extra):
    return ["--config", "configs/online_dpo.py:tiny", f"--config.output_dir={out}",
            f"--config.model.path={models / 'policy'}", "--config.mesh=dp:1",
            "--config.train.batch_size=4", "--config.online_dpo.max_new_tokens=8",
            f"--config.reward.functions={models / 'varied.py'}:varied",
            "--config.log.tensorboard=false", "--config.checkpoint.async_save=false", *extra]


def run(models, out, *extra):
    from easyrl.algorithms import online_dpo
    res = online_dpo.train(launch.parse_config("online_dpo", args(models, out, *extra)))
    return res, read_metrics(str(out))


TRL_KEYS = ("objective/kl", "objective/entropy", "objective/non_score_reward",
            "objective/rlhf_reward", "objective/scores", "objective/scores_margin",
            "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "val/contain_eos_token", "beta", "loss",
            "time/rollout", "time/rewards", "time/score", "time/update")


# ----------------------------------------------------------------------------- pair selection
def _pairs_python(rewards, g):
    out = []
    for b in range(len(rewards) // g):
        r = list(rewards[b * g:(b + 1) * g])
        if g == 2:  # TRL: mask = first_half >= second_half -> the first sample is chosen
            c, j = (0, 1) if r[0] >= r[1] else (1, 0)
        else:
            c = r.index(max(r))
            j = r.index(min(r))
            if max(r) == min(r):
                j = (c + 1) % g
        out.append((b * g + c, b * g + j))
    return out


@pytest.mark.parametrize("g", [2, 3, 4, 8])
def test_select_pairs_against_python(g):
    from easyrl.algorithms.online_dpo import select_pairs
    rng = np.random.default_rng(g)
    for trial in range(20):
        # few distinct values: many ties, some all-equal groups
        r = rng.integers(0, 3 if trial % 2 else 2, size=16 * g).astype(np.float32)
        r[:g] = 1.0  # one all-equal group for sure
        ci, ri = select_pairs(jnp.asarray(r), g)
        got = list(zip(np.asarray(ci).tolist(), np.asarray(ri).tolist()))
        assert got == _pairs_python(r.tolist(), g)
        assert all(c != j for c, j in got)  # always two distinct samples
        assert all(r[c] >= r[j] for c, j in got)


# ----------------------------------------------------------------------------- lr = 0
def test_lr_zero_policy_equals_reference(models, tmp_path):
    res, rows = run(models, tmp_path, "--config.train.steps=2", "--config.optim.lr=0")
    assert len(rows) == 2
    for r in rows:
        # 0 up to float32 rounding: the reference pass and the update's forward are separate
        # XLA programs (different row order and fusion), ~1e-7 apart in summed log-probs
        for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "objective/kl",
                  "objective/non_score_reward"):
            assert abs(r[k]) < 1e-5, (k, r[k])
        assert 0.0 <= r["rewards/accuracies"] <= 1.0  # margin > 0 on rounding noise only
        assert r["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert r["objective/rlhf_reward"] == pytest.approx(r["objective/scores"], abs=1e-6)
        assert r["objective/scores_margin"] >= 0 and r["beta"] == pytest.approx(0.1)
        assert r["objective/entropy"] > 0 and r["logps/chosen"] < 0
        assert r["nonfinite_updates"] == 0
    for k in TRL_KEYS:
        assert k in rows[-1], k


def test_ipo_and_weighted_loss_types_run(models, tmp_path):
    _, rows = run(models, tmp_path, "--config.train.steps=1", "--config.optim.lr=0",
                  "--config.online_dpo.loss_type=sigmoid,ipo",
                  "--config.online_dpo.loss_weights=1.0,0.5")
    r = rows[0]
    assert r["loss/sigmoid"] == pytest.approx(math.log(2), abs=1e-6)
    assert r["loss/ipo"] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-5)  # h = 0
    assert r["loss"] == pytest.approx(math.log(2) + 0.5 * 25.0, rel=1e-5)


# ----------------------------------------------------------------------------- the update
def _pair_inputs(cfg, params, b=8, p=4, t=6, seed=0):
    from easyrl.rollout import response_logprobs
    rng = np.random.default_rng(seed)
    out = {}
    for side in ("chosen", "rejected"):
        tokens = rng.integers(3, cfg.vocab_size, (b, p + t)).astype(np.int32)
        attn = np.ones((b, p + t), np.int32)
        attn[::3, :2] = 0  # some left padding of the prompts
        mask = (np.arange(t)[None] < rng.integers(1, t + 1, b)[:, None]).astype(np.float32)
        attn[:, p:] = mask
        lp, _ = response_logprobs(cfg, params, jnp.asarray(tokens), jnp.asarray(attn), p)
        ref = np.sum(np.asarray(lp) * mask, -1) + rng.normal(0, 0.5, b)  # a reference != pi
        out.update({f"{side}_tokens": jnp.asarray(tokens), f"{side}_attn": jnp.asarray(attn),
                    f"{side}_mask": jnp.asarray(mask),
                    f"{side}_ref": jnp.asarray(ref, jnp.float32),
                    f"{side}_score": jnp.asarray(rng.normal(size=b), jnp.float32)})
    return out


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_update_is_the_same_under_micro_batch_splits(loss_type):
    """One optimizer step accumulated over 1 or 4 micro-batches: the same loss, metrics and
    parameters; and the loss equals a float64 numpy reference of the DPO formula."""
    import optax

    from easyrl.algorithms import online_dpo
    from easyrl.rollout import response_logprobs
    from easyrl.train.step import TrainState
    cfg = M.get_preset("tiny").replace(vocab_size=64)
    params = M.init_params(cfg, jax.random.PRNGKey(0))
    d = mlc.ConfigDict(dict(max_prompt_len=4, temperature=0.7, beta=0.1, loss_type=loss_type,
                            loss_weights="", label_smoothing=0.0, num_minibatches=1))
    inputs = _pair_inputs(cfg, params)
    tx = optax.sgd(0.5)  # linear in the gradient (Adam's first step is ~sign(g): noise-sized
    # gradient entries would flip)
    out = {}
    for n in (1, 4):
        st = TrainState.create(jax.tree.map(jnp.copy, params), tx)
        upd = jax.jit(online_dpo.make_update(cfg, tx, d, n_micro=n))
        st, metrics = upd(st, inputs, jax.random.PRNGKey(1))
        out[n] = (st.params, jax.device_get(metrics))
    for n in (4,):
        for k, v in out[1][1].items():
            assert np.allclose(v, out[n][1][k], rtol=1e-5, atol=1e-6), (n, k)
        for x, y in zip(jax.tree.leaves(out[1][0]), jax.tree.leaves(out[n][0])):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    # the loss against numpy (float64), log-probs of logits / temperature
    seq, lens = {}, {}
    for s in ("chosen", "rejected"):
        lp, _ = response_logprobs(cfg, params, inputs[f"{s}_tokens"], inputs[f"{s}_attn"], 4, 0.7)
        m = np.asarray(inputs[f"{s}_mask"], np.float64)
        seq[s] = (np.asarray(lp, np.float64) * m).sum(-1) - np.asarray(inputs[f"{s}_ref"])
        lens[s] = m.sum(-1)
    if loss_type == "sigmoid":
        want = np.mean(np.log1p(np.exp(-0.1 * (seq["chosen"] - seq["rejected"]))))
    else:  # easyrl / TRL DPOTrainer ipo: each log-ratio divided by its length
        h = seq["chosen"] / lens["chosen"] - seq["rejected"] / lens["rejected"]
        want = np.mean((h - 1 / (2 * 0.1)) ** 2)
    assert out[1][1]["loss"] == pytest.approx(want, rel=1e-5)
    assert not all(np.allclose(x, y) for x, y in zip(jax.tree.leaves(params),
                                                      jax.tree.leaves(out[1][0])))


# ----------------------------------------------------------------------------- config errors
def test_config_errors(models, tmp_path):
    from easyrl.algorithms import online_dpo
    for extra, needle in [(("--config.reward.functions=",), "reward.functions"),
                          (("--config.online_dpo.num_generations=1",),
                           "online_dpo.num_generations"),
                          (("--config.online_dpo.temperature=0",), "online_dpo.temperature"),
                          (("--config.online_dpo.beta=0",), "online_dpo.beta"),
                          (("--config.online_dpo.loss_type=nope",), "online_dpo.loss_type"),
                          (("--config.online_dpo.loss_type=sigmoid,ipo",
                            "--config.online_dpo.loss_weights=1"), "online_dpo.loss_weights"),
                          (("--config.online_dpo.num_minibatches=3",),
                           "online_dpo.num_minibatches"),
                          (("--config.online_dpo.num_minibatches=2",
                            "--config.train.micro_batch_size=4"), "train.micro_batch_size"),
                          (("--config.online_dpo.max_new_tokens=100000",),
                           "online_dpo.max_new_tokens")]:
        with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
            online_dpo.train(launch.parse_config("online_dpo", args(models, tmp_path / "e",
                                                                    *extra)))


def test_presets_load():
    from easyrl.train.config import load_config_file
    c = load_config_file("configs/online_dpo.py:tulu25_13b_online")
    assert c.command == "online_dpo" and c.online_dpo.num_generations == 2
    assert c.reward.path and c.train.batch_size % c.train.micro_batch_size == 0
    with pytest.raises(ValueError, match="unknown online_dpo preset"):
        load_config_file("configs/online_dpo.py:nope")


# ----------------------------------------------------------------------------- CLI, resume
@pytest.mark.slow
def test_cli_resume_gives_the_same_params(models, tmp_path, capsys):
    """`python -m easyrl online_dpo` (the registry's command) trains 2 of 4 iterations and
    checkpoints; resumed in-process to 4 it ends with the params of a straight 4-iteration run."""
    from easyrl import checkpoint
    common = ("--config.checkpoint.every=2", "--config.optim.lr=1e-2",
              "--config.online_dpo.samples_every=0")
    r = subprocess.run([sys.executable, "-m", "easyrl", "online_dpo",
                        *args(models, tmp_path / "resumed", *common, "--config.train.steps=2")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    b, rb = run(models, tmp_path / "resumed", *common, "--config.train.steps=4")
    assert "resuming from checkpoint at step 2" in capsys.readouterr().out
    a, ra = run(models, tmp_path / "straight", *common, "--config.train.steps=4")
    assert checkpoint.latest_step(str(tmp_path / "resumed")) == 4
    assert [x["step"] for x in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb):
        for k in ("objective/scores", "loss", "objective/kl", "rewards/margins"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (k, x["step"])
    for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_tiny_preset_improves_the_synthetic_reward(sft_run, tmp_path):
    """configs/online_dpo.py:tiny (150 iterations) from the tiny SFT run: the rule-based
    reward of its own samples (objective/true_reward = objective/scores here) rises from the
    first 10 iterations to the last 10."""
    from easyrl.algorithms import online_dpo
    from tiny_configs import make_config
    res = online_dpo.train(make_config("online_dpo", tmp_path, **{
        "model.path": sft_run, "online_dpo.samples_every": 0, "checkpoint.async_save": "false"}))
    assert res.final_step == 150  # the preset as it is
    rows = read_metrics(str(tmp_path))
    tr = np.array([r["objective/true_reward"] for r in rows])
    blocks = [round(float(x), 3) for x in tr.reshape(-1, 10).mean(1)]
    print(f"online_dpo tiny: true_reward per 10 iterations {blocks}; objective/scores "
          f"{rows[0]['objective/scores']:.3f} -> {rows[-1]['objective/scores']:.3f}; last kl "
          f"{rows[-1]['objective/kl']:.3f}, val/contain_eos_token "
          f"{rows[-1]['val/contain_eos_token']:.3f}")
    assert all(r["nonfinite_updates"] == 0 for r in rows)
    assert all(r["objective/true_reward"] == pytest.approx(r["objective/scores"], abs=1e-6)
               for r in rows)  # reward.functions=synthetic is the true reward
    assert blocks[-1] > blocks[0] + 0.04


def test_unscorable_rows_never_form_a_pair():
    """A row every reward function returned None for (NaN) is neither chosen nor rejected while
    its group has scorable rows, and a pair with an unscorable side has weight 0."""
    from easyrl.algorithms.online_dpo import pair_ok, select_pairs
    nan = float("nan")
    r = jnp.asarray([nan, 0.2, 0.9, 0.5,     # best 2, worst 1 (row 0 skipped)
                     0.3, nan, nan, nan,     # one scorable row: no pair
                     nan, nan, nan, nan], jnp.float32)
    ci, ri = select_pairs(r, 4)
    assert ci[0] == 2 and ri[0] == 1
    np.testing.assert_array_equal(np.asarray(pair_ok(r, ci, ri)), [1.0, 0.0, 0.0])
