"""PPO: the lr=0 identities, exact resume, and the tiny preset improving score and true reward."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from easyrl import checkpoint, model as M
from easyrl.data.synthetic import synthetic_tokenizer_path
from easyrl.data.tokenizer import load_tokenizer
from easyrl.train import launch
from easyrl.train.metrics import read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    """Random-init tiny policy and reward model as easyrl checkpoints (synthetic tokenizer)."""
    d = tmp_path_factory.mktemp("ppo_models")
    tok = load_tokenizer(synthetic_tokenizer_path())
    cfg = M.get_preset("tiny").replace(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    checkpoint.save_model(str(d / "policy"), cfg, M.init_params(cfg, jax.random.PRNGKey(1)))
    checkpoint.save_model(str(d / "rm"), cfg, M.init_params(cfg, jax.random.PRNGKey(2), "reward"),
                          kind="reward")
    return d


def ppo_args(models, out, *extra):
    return ["--config", "configs/ppo.py:tiny", f"--config.output_dir={out}",
            f"--config.model.path={models / 'policy'}", f"--config.reward.path={models / 'rm'}",
            "--config.mesh=dp:1", "--config.train.batch_size=16", "--config.ppo.num_minibatches=2",
            "--config.ppo.ppo_epochs=2", "--config.ppo.max_new_tokens=8", *extra]


def test_lr_zero_ratio_one_and_zero_kl(cache, random_models, tmp_path):
    from easyrl.algorithms import ppo
    c = launch.parse_config("ppo", ppo_args(random_models, tmp_path, "--config.train.steps=2",
                                            "--config.optim.lr=0", "--config.value_optim.lr=0"))
    ppo.train(c)
    rows = read_metrics(str(tmp_path))
    assert len(rows) == 2
    for r in rows:
        assert r["policy/ratio_first"] == pytest.approx(1.0, abs=1e-6)
        assert r["policy/approxkl_first"] == pytest.approx(0.0, abs=1e-10)
        assert r["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
        assert r["policy/clipfrac"] == 0.0
    for key in ("objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward",
                "objective/kl_coef", "policy/approxkl", "policy/clipfrac", "policy/ratio",
                "loss/policy", "loss/value", "val/clipfrac", "val/mean", "tokens/response_len",
                "val/num_eos_tokens", "objective/true_reward", "time/rollout", "time/update"):
        assert key in rows[-1], key


def test_adaptive_kl_and_samples(cache, random_models, tmp_path):
    from easyrl.algorithms import ppo
    c = launch.parse_config("ppo", ppo_args(random_models, tmp_path, "--config.train.steps=2",
                                            "--config.ppo.adaptive_kl=True",
                                            "--config.ppo.kl_target=0.01",
                                            "--config.ppo.kl_horizon=100",
                                            "--config.ppo.samples_every=1",
                                            "--config.ppo.kl_estimator=k3"))
    ppo.train(c)
    rows = read_metrics(str(tmp_path))
    kl0, kl1 = rows[0]["objective/kl_coef"], rows[1]["objective/kl_coef"]
    e = np.clip(rows[0]["objective/kl"] / 0.01 - 1, -0.2, 0.2)
    assert kl1 == pytest.approx(kl0 * (1 + e * 16 / 100), rel=1e-5)
    samples = [json.loads(ln) for ln in open(tmp_path / "samples.jsonl")]
    assert samples and {"prompt", "response", "score", "step"} <= set(samples[0])


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(random_models, tmp_path):
    args = ppo_args(random_models, "OUT", "--config.train.steps=4", "--config.checkpoint.every=2",
                    "--config.ppo.samples_every=0")
    env = dict(os.environ, EASYRL_CACHE=str(tmp_path / "cache"))

    def go(out, killer=False):
        a = [x.replace("OUT", str(out)) for x in args]
        cmd = ([sys.executable, os.path.join(HERE, "kill_after_checkpoint.py"), "2", "ppo", *a]
               if killer else [sys.executable, "-m", "easyrl", "ppo", *a])
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)

    r = go(tmp_path / "straight")
    assert r.returncode == 0, r.stderr[-2000:]
    r = go(tmp_path / "resumed", killer=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    r = go(tmp_path / "resumed")
    assert r.returncode == 0 and "resuming from checkpoint at step 2" in r.stdout, r.stderr[-2000:]
    a, b = read_metrics(str(tmp_path / "straight")), read_metrics(str(tmp_path / "resumed"))
    assert [x["step"] for x in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for k in ("objective/scores", "objective/kl", "loss/policy", "loss/value", "objective/kl_coef"):
            assert x[k] == pytest.approx(y[k], abs=1e-5), (k, x["step"])


@pytest.mark.slow
def test_sigterm_saves_checkpoint_before_exit(random_models, tmp_path):
    """The online-RL loop stops on SIGTERM through the run scaffold: checkpoint, then exit 143;
    a rerun resumes from it."""
    env = dict(os.environ, EASYRL_CACHE=str(tmp_path / "cache"))
    args = ppo_args(random_models, tmp_path / "run", "--config.train.steps=100000",
                    "--config.ppo.samples_every=0")
    p = subprocess.Popen([sys.executable, "-m", "easyrl", "ppo", *args], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not os.path.exists(tmp_path / "run" / "metrics.jsonl") and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=180)
    assert p.returncode == 143, err[-2000:]
    step = checkpoint.latest_step(str(tmp_path / "run"))
    assert step is not None and step >= 1
    assert f"saving checkpoint at step {step}" in out
    r = subprocess.run([sys.executable, "-m", "easyrl", "ppo", *args[:-2],
                        f"--config.train.steps={step + 1}", "--config.ppo.samples_every=0"],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0 and f"resuming from checkpoint at step {step}" in r.stdout, r.stderr[-2000:]
    assert [x["step"] for x in read_metrics(str(tmp_path / "run"))][-1] == step + 1


def test_missing_reward_model_is_a_config_error(random_models, tmp_path):
    r = subprocess.run([sys.executable, "-m", "easyrl", "ppo",
                        *ppo_args(random_models, tmp_path, "--config.reward.path=")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "reward.path" in r.stderr and "Traceback" not in r.stderr
