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
from easyrl.train import launch
from easyrl.train.metrics import read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


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
        assert r["rollout/logprob_diff_max"] < 1e-5  # fp32: the sampler's == the scoring pass's
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


@pytest.mark.slow
def test_killed_before_a_checkpoint_redoes_samples_once(random_models, tmp_path):
    """A run killed after writing the samples of steps 3-4 but before their checkpoint resumes
    at step 2: samples.jsonl and metrics.jsonl end as an uninterrupted run's (no duplicates)."""
    import shutil
    env = dict(os.environ, EASYRL_CACHE=str(tmp_path / "cache"))
    args = ppo_args(random_models, tmp_path / "a", "--config.train.steps=4",
                    "--config.checkpoint.every=2", "--config.ppo.samples_every=1",
                    "--config.checkpoint.async_save=false")
    r = subprocess.run([sys.executable, "-m", "easyrl", "ppo", *args], capture_output=True,
                       text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")  # killed before step 4's checkpoint
    with open(tmp_path / "b" / "samples.jsonl", "a") as f:
        f.write('{"step": 4, "prom')  # ... and in the middle of a line
    r = subprocess.run([sys.executable, "-m", "easyrl", "ppo",
                        *[x.replace(str(tmp_path / "a"), str(tmp_path / "b")) for x in args]],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0 and "resuming from checkpoint at step 2" in r.stdout, r.stderr[-2000:]
    rows = lambda d, f: [json.loads(x) for x in open(tmp_path / d / f)]  # noqa: E731
    sa, sb = rows("a", "samples.jsonl"), rows("b", "samples.jsonl")
    assert [x["step"] for x in sb] == [x["step"] for x in sa]
    assert [(x["prompt"], x["response"]) for x in sb] == [(x["prompt"], x["response"]) for x in sa]
    for x, y in zip(sa, sb):
        assert x["score"] == pytest.approx(y["score"], abs=1e-5)
    ma, mb = read_metrics(str(tmp_path / "a")), read_metrics(str(tmp_path / "b"))
    assert [x["step"] for x in mb] == [1, 2, 3, 4]
    for x, y in zip(ma, mb):
        assert x["objective/scores"] == pytest.approx(y["objective/scores"], abs=1e-5)


def test_missing_reward_model_is_a_config_error(random_models, tmp_path):
    r = subprocess.run([sys.executable, "-m", "easyrl", "ppo",
                        *ppo_args(random_models, tmp_path, "--config.reward.path=")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "reward.path" in r.stderr and "Traceback" not in r.stderr


# ---- fidelity (issue 15): filtered behaviour log-probs, a real ratio, config errors ----------
@pytest.fixture(scope="module")
def tiny_ppo():
    """A random tiny policy / value / reward model and left-padded prompts [8, 4] (shared: the
    tests below copy what a donating update would consume)."""
    import jax.numpy as jnp
    b, plen = 8, 4
    cfg = M.get_preset("tiny")
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    models = dict(policy=M.init_params(cfg, k[0]), value=M.init_params(cfg, k[1], "value"),
                  reward=M.init_params(cfg, k[2], "reward"))
    ids = jax.random.randint(k[3], (b, plen), 3, cfg.vocab_size)
    mask = jnp.ones((b, plen), jnp.int32).at[0, :2].set(0)  # one left-padded row
    return cfg, models, dict(input_ids=jnp.where(mask > 0, ids, 0), attention_mask=mask)


def _ppo_state(models, tx):
    import jax.numpy as jnp
    from easyrl.algorithms import ppo
    return ppo.PPOState(step=jnp.zeros((), jnp.int32), policy=models["policy"],
                        value=models["value"], policy_opt=tx.init(models["policy"]),
                        value_opt=tx.init(models["value"]))


def test_top_k_top_p_logprobs_are_of_the_sampled_distribution(tiny_ppo):
    """With c.ppo.top_k / top_p (threaded by make_iteration into the scoring pass and the update):
    the sampler's log-probs equal the scoring pass's old log-probs (both of the filtered
    distribution, not the unfiltered one), and at lr 0 every minibatch's ratio is 1."""
    import jax.numpy as jnp
    import optax
    from easyrl import rollout
    from easyrl.algorithms import ppo
    from easyrl.generate import make_sampler
    from easyrl.train.config import load_config_file
    from easyrl.train.rl_loop import iterate
    cfg, models, prompts = tiny_ppo
    p = load_config_file("configs/ppo.py:tiny").ppo
    p.update(max_prompt_len=4, max_new_tokens=6, temperature=0.8, top_k=5, top_p=0.9,
             ppo_epochs=2, num_minibatches=2)
    tx = optax.adam(0.0)
    it = ppo.make_iteration(dict(policy=cfg, ref=cfg, value=cfg, reward=cfg), p, tx, tx)
    sampler = make_sampler(cfg, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                           top_k=p.top_k, top_p=p.top_p, eos_token_id=(2,))
    ref = jax.tree.map(jnp.copy, models["policy"])
    state = _ppo_state(jax.tree.map(jnp.copy, models), tx)
    state, metrics, roll, scored = iterate(it, sampler, state, dict(ref=ref, reward=models["reward"]),
                                           prompts, jax.random.PRNGKey(1), dict(kl_coef=0.1))
    m = np.asarray(roll["resp_mask"]) > 0
    got, want = np.asarray(roll["logprobs"]), np.asarray(scored["logprobs"])
    assert np.max(np.abs(np.where(m, got - want, 0))) < 1e-5
    plain, _ = rollout.response_logprobs(cfg, models["policy"], roll["tokens"], roll["attn"], 4, 0.8)
    assert np.all(np.where(m, got - np.asarray(plain), 1.0) > 1e-3)  # renormalized over the kept
    assert np.asarray(scored["ref_logprobs"]) == pytest.approx(np.asarray(plain) * m, abs=1e-6)
    assert metrics["policy/ratio_first"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["policy/approxkl_first"] == pytest.approx(0.0, abs=1e-10)
    assert metrics["policy/ratio"] == pytest.approx(1.0, abs=1e-6)  # lr 0: every minibatch
    assert metrics["policy/clipfrac"] == 0.0


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 0.9)])
def test_update_ratio_moves_after_first_minibatch(tiny_ppo, top_k, top_p):
    """lr > 0, 2 epochs x 2 minibatches: the first minibatch has ratio 1, the later ones do not
    (approxkl > 0) and some clip. Recomputing the old log-probs from the current parameters (the
    EasyLM-fork defect) would keep every ratio at 1 and clipfrac at 0."""
    import jax.numpy as jnp
    import optax
    from easyrl import generate
    from easyrl.algorithms import ppo
    cfg, models, prompts = tiny_ppo
    plen, n, t = 4, 6, 0.8
    roll = generate.generate(cfg, models["policy"], prompts["input_ids"], prompts["attention_mask"],
                             jax.random.PRNGKey(1), max_new_tokens=n, temperature=t, top_k=top_k,
                             top_p=top_p, eos_token_id=())
    tokens, resp = roll["tokens"], roll["response_mask"]
    attn = jnp.concatenate([prompts["attention_mask"], resp], axis=1)
    adv = jax.random.normal(jax.random.PRNGKey(2), resp.shape) * 3
    inputs = dict(tokens=tokens, attn=attn, resp_mask=resp, logprobs=roll["logprobs"],
                  values=jnp.zeros(resp.shape), advantages=adv, returns=adv)
    tx = optax.adam(3e-2)
    update = jax.jit(ppo.make_update(cfg, cfg, tx, tx, prompt_len=plen, temperature=t,
                                     ppo_epochs=2, num_minibatches=2, cliprange=0.2,
                                     cliprange_value=0.2, vf_coef=0.1, top_k=top_k, top_p=top_p))
    _, metrics = update(_ppo_state(models, tx), inputs, jax.random.PRNGKey(3))
    metrics = {k: float(v) for k, v in metrics.items()}
    assert metrics["policy/ratio_first"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["policy/approxkl_first"] == pytest.approx(0.0, abs=1e-8)
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert metrics["policy/approxkl"] > 1e-4, metrics  # mean over 4 minibatches, the first 0
    assert metrics["policy/clipfrac"] > 0.0, metrics
    assert abs(metrics["policy/ratio"] - 1.0) > 1e-3, metrics


@pytest.mark.parametrize("key,value", [("ppo.temperature", "0"), ("ppo.temperature", "-0.5"),
                                       ("ppo.top_p", "0"), ("ppo.top_p", "1.5"),
                                       ("ppo.top_k", "-1")])
def test_sampling_settings_are_config_errors(random_models, tmp_path, key, value):
    from easyrl import parallel
    from easyrl.algorithms import ppo
    c = launch.parse_config("ppo", ppo_args(random_models, tmp_path, f"--config.{key}={value}"))
    mesh = parallel.create_mesh("dp:1")
    with pytest.raises(ValueError, match=f"config {key}:"):
        ppo.validate(c, mesh, 512)
    ok = launch.parse_config("ppo", ppo_args(random_models, tmp_path, "--config.ppo.top_k=5",
                                             "--config.ppo.top_p=0.9"))
    ppo.validate(ok, mesh, 512)


def test_nonfinite_updates_are_skipped_and_stop_the_run(random_models, tmp_path):
    """lr=1e30 without clipping: the PPO updates turn non-finite, are skipped (counted), the run
    stops at train.max_nonfinite with one line and exit 1, and its checkpoints are finite."""
    env = dict(os.environ, EASYRL_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "easyrl", "ppo", *ppo_args(
        random_models, tmp_path / "run", "--config.train.steps=20", "--config.optim.lr=1e30",
        "--config.optim.clip=0", "--config.value_optim.lr=1e30", "--config.value_optim.clip=0",
        "--config.train.max_nonfinite=2", "--config.checkpoint.every=1",
        "--config.checkpoint.async_save=false", "--config.ppo.samples_every=0")],
        capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("easyrl ppo: stopped:") and "non-finite" in last, last
    rows = read_metrics(str(tmp_path / "run"))
    assert rows and rows[-1]["nonfinite_updates"] > 0
    step = checkpoint.latest_step(str(tmp_path / "run"))
    assert step is not None and step < 20
    _, _, params = checkpoint.load_model(str(tmp_path / "run"))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


# ---- reward sources shared with the group trainers (issue 16) -------------------------------
def test_reward_functions_beside_or_instead_of_the_reward_model(random_models, tmp_path):
    """reward.functions join the reward model's score (weighted by reward.weight); with
    reward.weight=0 the score is the functions' total alone; without reward.path the critic
    starts from value.path (an LM: fresh value head)."""
    from easyrl.algorithms import ppo
    c = launch.parse_config("ppo", ppo_args(random_models, tmp_path / "both", "--config.train.steps=2",
                                            "--config.reward.functions=length_penalty",
                                            "--config.reward.weight=0"))
    ppo.train(c)
    for r in read_metrics(str(tmp_path / "both")):
        assert r["objective/scores"] == pytest.approx(r["reward"], abs=1e-6)
        assert r["rewards/length_penalty/mean"] < 0
    c = launch.parse_config("ppo", ppo_args(random_models, tmp_path / "fn", "--config.train.steps=1",
                                            "--config.reward.path=",
                                            "--config.reward.functions=synthetic",
                                            f"--config.value.path={random_models / 'policy'}"))
    ppo.train(c)
    r = read_metrics(str(tmp_path / "fn"))[0]
    assert r["objective/scores"] == pytest.approx(r["rewards/synthetic/mean"], abs=1e-6)
    assert r["objective/scores"] == pytest.approx(r["objective/true_reward"], abs=1e-6)


def test_no_reward_source_names_the_keys(random_models, tmp_path):
    from easyrl.algorithms import ppo
    c = launch.parse_config("ppo", ppo_args(random_models, tmp_path, "--config.reward.path=",
                                            "--config.reward.functions=synthetic"))
    with pytest.raises(ValueError, match=r"value\.path"):
        ppo.train(c)


def test_continuous_engine_rollouts(random_models, tmp_path):
    from easyrl.algorithms import ppo
    c = launch.parse_config("ppo", ppo_args(random_models, tmp_path, "--config.train.steps=2",
                                            "--config.rollout.engine=continuous",
                                            "--config.rollout.slots=6", "--config.optim.lr=0",
                                            "--config.value_optim.lr=0"))
    ppo.train(c)
    for r in read_metrics(str(tmp_path)):
        assert r["rollout/logprob_diff_max"] < 1e-5  # the engine's == the scoring pass's
        assert r["policy/ratio_first"] == pytest.approx(1.0, abs=1e-6)


def test_sampler_behaviour_logprobs_skip_the_policy_pass(random_models, tmp_path):
    """rollout.behaviour_logprobs=sampler: the sampler's log-probs are the old ones (no policy
    forward in the scoring pass); at lr 0 the metrics equal the trainer-log-prob run's, the
    entropy and the sampler-vs-trainer difference now measured in the update."""
    from easyrl.algorithms import ppo
    rows = {}
    for mode in ("trainer", "sampler"):
        out = tmp_path / mode
        ppo.train(launch.parse_config("ppo", ppo_args(
            random_models, out, "--config.train.steps=2", "--config.optim.lr=0",
            "--config.value_optim.lr=0", f"--config.rollout.behaviour_logprobs={mode}")))
        rows[mode] = read_metrics(str(out))
    for a, b in zip(rows["trainer"], rows["sampler"]):
        for k in ("objective/scores", "objective/entropy", "objective/kl", "policy/ratio_first",
                  "loss/value"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
        assert b["rollout/logprob_diff_max"] < 1e-5


@pytest.mark.slow
def test_lora_on_nf4_base_starts_at_its_reference_and_moves(cache, random_models, tmp_path):
    """PPO with LoRA over an NF4 base (policy, value and the adapters-off reference read the
    same quantized kernels): lr 0 -> ratio 1 and KL 0; with lr the adapters move the policy."""
    from easyrl.algorithms import ppo
    q = ["--config.model.lora.rank=4", "--config.model.lora.alpha=8",
         "--config.model.lora.base_quant=nf4", "--config.model.lora.quant_block=32"]
    ppo.train(launch.parse_config("ppo", ppo_args(
        random_models, tmp_path / "a", "--config.train.steps=1", "--config.optim.lr=0",
        "--config.value_optim.lr=0", *q)))
    r = read_metrics(str(tmp_path / "a"))[0]
    assert r["policy/ratio_first"] == pytest.approx(1.0, abs=1e-6)
    assert r["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    ppo.train(launch.parse_config("ppo", ppo_args(
        random_models, tmp_path / "b", "--config.train.steps=2", "--config.optim.lr=3e-2", *q)))
    rows = read_metrics(str(tmp_path / "b"))
    assert all(np.isfinite(x["loss/policy"]) for x in rows) and rows[-1]["objective/kl"] != 0
    from easyrl import checkpoint
    cfg, _, params = checkpoint.load_model(str(tmp_path / "b"))
    assert cfg.base_quant == "nf4"
    assert params["layers"]["mlp"]["up_proj"]["kernel"]["codes"].dtype == np.uint8
