"""GRPO family trainer: lr=0 identities, off-policy ratio with num_iterations, micro-batch split
invariance of the update, advantages against numpy, reward functions with dataset columns,
dynamic sampling, LoRA reference, exact resume, two processes, and the tiny preset learning."""
import json
import os
import socket
import subprocess
import sys
import textwrap

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
def policy_dir(random_models, tmp_path_factory):
    """The shared random tiny policy / RM (conftest) plus a reward file whose values differ
    between samples."""
    d = tmp_path_factory.mktemp("grpo_models")
    for name in ("policy", "rm"):
        os.symlink(random_models / name, d / name)
    (d / "varied.py").write_text("def varied(prompts, completions, completion_ids, **kw):\n"
                                 "    return [float(sum(x) % 7) for x in completion_ids]\n")
    return d


def varied(models):
    """A reward that differs between the samples of a random policy (so advantages are not 0)."""
    return f"--config.reward.functions={models / 'varied.py'}:varied"


def grpo_args(models, out, *extra):
    return ["--config", "configs/grpo.py:tiny", f"--config.output_dir={out}",
            f"--config.model.path={models / 'policy'}", "--config.mesh=dp:1",
            "--config.train.batch_size=4", "--config.grpo.num_generations=4",
            "--config.grpo.max_new_tokens=8", "--config.log.tensorboard=false", *extra]


def run_grpo(models, out, *extra):
    from easyrl.algorithms import grpo
    res = grpo.train(launch.parse_config("grpo", grpo_args(models, out, *extra)))
    return res, read_metrics(str(out))


TRL_KEYS = ("reward", "reward_std", "rewards/synthetic/mean", "rewards/synthetic/std",
            "frac_reward_zero_std", "completions/mean_length", "completions/min_length",
            "completions/max_length", "completions/clipped_ratio",
            "completions/mean_terminated_length", "kl", "entropy", "clip_ratio/low_mean",
            "clip_ratio/high_mean", "clip_ratio/region_mean", "num_tokens")


def test_lr_zero_ratio_one_kl_zero_no_clipping(policy_dir, tmp_path):
    _, rows = run_grpo(policy_dir, tmp_path, "--config.train.steps=2", "--config.optim.lr=0",
                       "--config.grpo.beta=0.04", "--config.grpo.num_iterations=2",
                       "--config.grpo.num_minibatches=2")
    assert len(rows) == 2
    for r in rows:
        assert r["ratio/first"] == pytest.approx(1.0, abs=1e-6)
        assert r["ratio/last"] == pytest.approx(1.0, abs=1e-6)  # params never move
        assert r["kl"] == pytest.approx(0.0, abs=1e-7)  # policy == reference
        for k in ("low", "high", "region"):
            assert r[f"clip_ratio/{k}_mean"] == 0.0
    for key in TRL_KEYS:
        assert key in rows[-1], key
    assert rows[1]["num_tokens"] > rows[0]["num_tokens"] > 0  # cumulative


def test_second_iteration_ratio_moves_with_old_logprobs_fixed(policy_dir, tmp_path):
    _, rows = run_grpo(policy_dir, tmp_path, "--config.train.steps=1", "--config.optim.lr=1e-2",
                       "--config.grpo.num_iterations=2", varied(policy_dir))
    r = rows[0]
    assert r["ratio/first"] == pytest.approx(1.0, abs=1e-6)
    assert abs(r["ratio/last"] - 1.0) > 1e-4  # old log-probs are not recomputed


def test_beta_zero_holds_no_reference(policy_dir, tmp_path):
    """beta = 0: no reference parameters are allocated (the built run's frozen models hold
    none, the plan has no reference role); beta > 0: a reference as large as the policy."""
    from easyrl import parallel
    from easyrl.algorithms import grpo
    from easyrl.train import setup
    from easyrl.train.rl_loop import RLEnv
    frozen = {}
    for beta in (0.0, 0.04):
        c = launch.parse_config("grpo", grpo_args(policy_dir, tmp_path / str(beta),
                                                  f"--config.grpo.beta={beta}"))
        mesh = parallel.create_mesh("dp:1")
        tok = setup.load_tokenizer(c)
        pcfg = setup.model_config(c, tok)
        built = grpo.build(RLEnv(c, mesh, tok, pcfg, 1))
        frozen[beta] = built.frozen
        n_policy = sum(x.size for x in jax.tree.leaves(built.state.params))
    assert frozen[0.0]["ref"] is None and frozen[0.0]["ref_adapters"] is None
    assert not jax.tree.leaves(frozen[0.0]["ref"])
    assert sum(x.size for x in jax.tree.leaves(frozen[0.04]["ref"])) == n_policy
    _, rows = run_grpo(policy_dir, tmp_path / "run", "--config.train.steps=1")
    assert "kl" not in rows[0]


# ----------------------------------------------------------------------------- pure pieces
def _tiny_policy():
    cfg = M.get_preset("tiny").replace(vocab_size=64)
    return cfg, M.init_params(cfg, jax.random.PRNGKey(0))


def _section(**over):
    g = dict(max_prompt_len=4, max_new_tokens=6, temperature=1.0, top_k=0, top_p=1.0,
             num_generations=4, advantage="grpo", scale_rewards="group", adv_eps=1e-4,
             loss_type="dapo", beta=0.0, epsilon_low=0.2, epsilon_high=0.28,
             importance_sampling_level="token", num_iterations=1, num_minibatches=1,
             mask_truncated_completions=False)
    g.update(over)
    return mlc.ConfigDict(g)


def _batch(cfg, params, n=8, seed=0):
    from easyrl.rollout import response_logprobs
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, cfg.vocab_size, (n, 10)).astype(np.int32)
    attn = np.ones((n, 10), np.int32)
    attn[::3, :2] = 0  # some left padding of the prompts
    lengths = rng.integers(1, 7, n)
    mask = (np.arange(6)[None] < lengths[:, None]).astype(np.float32)
    attn[:, 4:] = mask
    lp, _ = response_logprobs(cfg, params, jnp.asarray(tokens), jnp.asarray(attn), 4)
    old = np.asarray(lp) + rng.normal(0, 0.3, lp.shape)  # ratios around 1, some clipped
    return dict(tokens=jnp.asarray(tokens), attn=jnp.asarray(attn), loss_mask=jnp.asarray(mask),
                advantages=jnp.asarray(np.repeat(rng.normal(size=(n, 1)), 6, 1), jnp.float32),
                old_logprobs=jnp.asarray(old * mask, jnp.float32))


@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo", "grpo", "bnpo", "rloo"])
def test_update_loss_and_grads_under_micro_batch_splits(loss_type):
    """dapo / dr_grpo / grpo: the same loss and gradient for 1, 2 or 4 micro-batches (global
    normalisers). bnpo averages the micro-batches' token means, as TRL does under gradient
    accumulation, so it depends on the split (documented in docs/algorithms.md)."""
    from easyrl.algorithms import grpo
    from easyrl.train.step import accumulate
    cfg, params = _tiny_policy()
    g = _section(loss_type=loss_type, num_iterations=2)
    batch = _batch(cfg, params)
    fn = grpo.make_loss(cfg, g)
    out = {}
    for n in (1, 2, 4):
        loss, _, grads = accumulate(fn, params, None, batch, jax.random.PRNGKey(0),
                                    grpo.denominators(batch["loss_mask"], g, n), n)
        out[n] = (float(loss), grads)
    # a float64 numpy reference of the full-batch loss from the per-token formula
    from easyrl.rollout import response_logprobs
    lp = np.asarray(response_logprobs(cfg, params, batch["tokens"], batch["attn"], 4)[0], np.float64)
    m = np.asarray(batch["loss_mask"], np.float64)
    old, a = np.asarray(batch["old_logprobs"], np.float64), np.asarray(batch["advantages"], np.float64)
    rho = np.exp(lp - old)
    per = -np.minimum(rho * a, np.clip(rho, 0.8, 1.28) * a) * m
    rho_seq = np.exp(((lp - old) * m).sum(1))  # TRL RLOOTrainer: one summed ratio per sequence
    a0 = a[:, 0]
    ref = {"dapo": per.sum() / m.sum(), "dr_grpo": per.sum() / (8 * 6),
           "grpo": np.mean(per.sum(1) / np.maximum(m.sum(1), 1)), "bnpo": per.sum() / m.sum(),
           "rloo": np.mean(-np.minimum(rho_seq * a0, np.clip(rho_seq, 0.8, 1.28) * a0))}
    assert out[1][0] == pytest.approx(ref[loss_type], rel=1e-5, abs=1e-7)
    if loss_type == "bnpo":  # TRL under accumulation: the mean of the micro-batches' token means
        for n in (2, 4):  # micro-batch j holds rows j, j + n, ... (train.step.split_micro)
            want = np.mean([per[j::n].sum() / m[j::n].sum() for j in range(n)])
            assert out[n][0] == pytest.approx(want, rel=1e-5, abs=1e-7)
    same = [np.allclose(out[1][0], out[n][0], rtol=1e-5, atol=1e-7) and all(
        np.allclose(x, y, rtol=1e-4, atol=1e-7) for x, y in
        zip(jax.tree.leaves(out[1][1]), jax.tree.leaves(out[n][1]))) for n in (2, 4)]
    if loss_type == "bnpo":
        assert not all(same)
    else:
        assert all(same)


def test_advantages_against_numpy():
    from easyrl.algorithms import grpo
    rng = np.random.default_rng(3)
    n, t, gsz = 8, 5, 4
    rewards = rng.normal(size=n).astype(np.float32)
    mask = (rng.random((n, t)) < 0.8).astype(np.int32)
    has_eos = np.array([1, 0, 1, 1, 0, 1, 1, 1], bool)
    old = (rng.normal(size=(n, t)) * mask).astype(np.float32)
    ref = (rng.normal(size=(n, t)) * mask).astype(np.float32)
    roll = dict(resp_mask=jnp.asarray(mask), has_eos=jnp.asarray(has_eos),
                rewards=jnp.asarray(rewards), tokens=jnp.zeros((n, t + 2), jnp.int32),
                attn=jnp.ones((n, t + 2), jnp.int32), logprobs=jnp.asarray(old))
    scored = dict(old_logprobs=jnp.asarray(old), ref_logprobs=jnp.asarray(ref))
    r64 = rewards.astype(np.float64).reshape(-1, gsz)
    # grpo, group-scaled (unbiased std, eps 1e-4)
    inp, st = grpo.advantages(scored, roll, _section(beta=0.0))
    want = ((r64 - r64.mean(1, keepdims=True)) / (r64.std(1, ddof=1, keepdims=True) + 1e-4))
    np.testing.assert_allclose(np.asarray(inp["advantages"])[:, 0], want.reshape(-1), rtol=1e-5)
    assert float(st["reward_std"]) == pytest.approx(r64.std(1, ddof=1).mean(), rel=1e-5)
    # rloo with the k1 KL penalty in the reward (TRL RLOO)
    beta = 0.1
    inp, st = grpo.advantages(scored, roll, _section(advantage="rloo", beta=beta))
    pen = (rewards - beta * ((old - ref) * mask).sum(1)).astype(np.float64).reshape(-1, gsz)
    loo = np.array([[pen[b, i] - np.mean([pen[b, j] for j in range(gsz) if j != i])
                     for i in range(gsz)] for b in range(pen.shape[0])])
    np.testing.assert_allclose(np.asarray(inp["advantages"])[:, 0], loo.reshape(-1), rtol=1e-4,
                               atol=1e-6)
    assert "ref_logprobs" not in inp  # the KL is in the reward, not the loss
    # mask_truncated_completions drops rows without EOS from the loss only
    inp, _ = grpo.advantages(scored, roll, _section(mask_truncated_completions=True))
    np.testing.assert_array_equal(np.asarray(inp["loss_mask"]), mask * has_eos[:, None])


def test_pick_groups_keeps_groups_on_their_host():
    from easyrl.train.rl_loop import pick_groups
    g = 2
    r0 = np.array([1, 1, 0, 1, 2, 2, 0, 3], np.float32)  # host 0: groups (1,1) (0,1); host 1: (2,2) (0,3)
    r1 = np.array([0, 5, 4, 4, 7, 7, 1, 2], np.float32)
    done, idx, flat = pick_groups([r0], g, 2)
    assert not done and flat == 2
    done, idx, flat = pick_groups([r0, r1], g, 2)
    assert done and flat == 0
    # host 0 takes its varied group of round 0 then of round 1; host 1 likewise
    assert idx.tolist() == [2, 3, 8, 9, 6, 7, 14, 15]


# ----------------------------------------------------------------------------- reward functions
USER = textwrap.dedent("""
    import json, os
    def by_answer(prompts, completions, completion_ids, answer, **kw):
        path = os.environ.get("GRPO_TEST_LOG")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "prompts": prompts, "answer": answer}) + "\\n")
        return [float(len(c.split()) == len(a.split())) for c, a in zip(completions, answer)]
    def noisy(prompts, completions, completion_ids, **kw):
        return [float(len(x)) for x in completion_ids]
    def boom(prompts, completions, completion_ids, **kw):
        raise RuntimeError("bad row")
    def short(prompts, completions, completion_ids, **kw):
        return [0.0]
""")


@pytest.fixture()
def user_rewards(tmp_path):
    from easyrl.data import synthetic
    f = tmp_path / "outside" / "my_rewards.py"
    f.parent.mkdir()
    f.write_text(USER)
    rows = [dict(prompt=r["prompt"], answer=synthetic.target(r["prompt"]), id=i)
            for i, r in enumerate(synthetic.prompts(64, seed=0))]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f, data


def test_user_reward_file_with_a_column_and_weight_zero(policy_dir, tmp_path, user_rewards):
    f, data = user_rewards
    log = tmp_path / "calls.jsonl"
    os.environ["GRPO_TEST_LOG"] = str(log)
    try:
        common = ("--config.train.steps=2", f"--config.data.train={data}",
                  "--config.data.shuffle=false", "--config.grpo.true_reward=")
        a, rows = run_grpo(policy_dir, tmp_path / "a", *common,
                           f"--config.reward.functions={f}:by_answer")
        b, rows_b = run_grpo(policy_dir, tmp_path / "b", *common,
                             f"--config.reward.functions={f}:by_answer,{f}:noisy",
                             "--config.reward.weights=1.0,0.0")
    finally:
        del os.environ["GRPO_TEST_LOG"]
    calls = [json.loads(x) for x in open(log)]
    rows_in = [json.loads(x) for x in open(data)]
    gold = {r["prompt"]: r["answer"] for r in rows_in}
    assert len(calls[0]["prompts"]) == 16  # 4 prompts x G 4, consecutive groups
    assert calls[0]["prompts"][:4] == [rows_in[0]["prompt"]] * 4
    assert all(gold[p] == a for c in calls for p, a in zip(c["prompts"], c["answer"]))
    assert "rewards/by_answer/mean" in rows[0] and "rewards/noisy/mean" in rows_b[0]
    assert rows_b[0]["rewards/noisy/mean"] > 0
    # weight 0: the source is reported but does not change training at all
    for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert rows[-1]["reward"] == rows_b[-1]["reward"]


@pytest.mark.parametrize("fn,needle", [("boom", "reward function 'boom'"),
                                       ("short", "returned 1 values for 16 completions")])
def test_failing_reward_function_is_one_line(policy_dir, tmp_path, user_rewards, fn, needle):
    f, data = user_rewards
    r = subprocess.run([sys.executable, "-m", "easyrl", "grpo", *grpo_args(
        policy_dir, tmp_path / "run", "--config.train.steps=1", f"--config.data.train={data}",
        f"--config.reward.functions={f}:{fn}")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert needle in last and "Traceback" not in r.stderr, r.stderr[-1500:]


def test_config_errors(policy_dir, tmp_path):
    from easyrl.algorithms import grpo
    for extra, needle in [(("--config.reward.functions=",), "reward.functions"),
                          (("--config.grpo.advantage=ppo",), "grpo.advantage"),
                          (("--config.grpo.num_generations=1",), "grpo.num_generations"),
                          (("--config.grpo.loss_type=mean",), "grpo.loss_type"),
                          (("--config.grpo.num_minibatches=3",), "grpo.num_minibatches"),
                          (("--config.grpo.epsilon_high=-0.1",), "config grpo.epsilon_high"),
                          (("--config.grpo.epsilon_low=1.5",), "config grpo.epsilon_low"),
                          (("--config.grpo.max_new_tokens=0",), "config grpo.max_new_tokens"),
                          (("--config.grpo.loss_type=rloo",), "config grpo.loss_type: rloo"),
                          (("--config.rollout.is_cap_min=3",), "config rollout.is_cap_min"),
                          (("--config.reward.num_workers=-2",), "config reward.num_workers"),
                          (("--config.reward.on_error=skip",), "config reward.on_error"),
                          (("--config.data.truncate_prompts=right",), "data.truncate_prompts")]:
        with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
            grpo.train(launch.parse_config("grpo", grpo_args(policy_dir, tmp_path / "e", *extra)))


# ----------------------------------------------------------------------------- variants
@pytest.mark.parametrize("extra", [
    ("--config.grpo.advantage=rloo", "--config.grpo.beta=0.05", "--config.grpo.loss_type=rloo"),
    ("--config.grpo.advantage=reinforce_pp", "--config.grpo.beta=0.01",
     "--config.grpo.loss_type=bnpo"),
    ("--config.grpo.advantage=reinforce_pp_baseline", "--config.grpo.loss_type=dr_grpo",
     "--config.grpo.importance_sampling_level=sequence", "--config.grpo.num_minibatches=2",
     "--config.train.micro_batch_size=1"),
    ("--config.grpo.dynamic_sampling=true", "--config.grpo.max_resample=2",
     "--config.grpo.scale_rewards=batch", "--config.grpo.mask_truncated_completions=true"),
])
def test_variants_run(policy_dir, tmp_path, extra):
    """Each variant runs finite and shows its defining property in what it logs: rloo's
    leave-one-out advantages sum to 0 over each group (samples.jsonl, one advantage per
    completion); REINFORCE++'s token advantages are whitened over the batch (logged token mean
    0); GSPO (sequence level) counts clipping per sequence (a multiple of 1 / rows); dynamic
    sampling trains on groups whose rewards differ (or says it kept flat ones)."""
    _, rows = run_grpo(policy_dir, tmp_path, "--config.train.steps=2",
                       "--config.grpo.samples_every=1", "--config.grpo.num_samples=16",
                       varied(policy_dir), *extra)
    for r in rows:
        assert all(np.isfinite(v) for v in r.values() if isinstance(v, float)), r
        assert r["nonfinite_updates"] == 0
    samples = [json.loads(x) for x in open(tmp_path / "samples.jsonl")]
    assert len(samples) == 2 * 16
    groups = [samples[i:i + 4] for i in range(0, len(samples), 4)]
    opts = " ".join(extra)
    if "advantage=rloo" in opts:
        for grp in groups:  # A_i = r'_i - mean_{j != i} r'_j sums to 0 (r' = r - beta KL)
            assert abs(sum(x["advantage"] for x in grp)) < 1e-4, grp
        assert any(abs(x["advantage"]) > 1e-3 for x in samples)
    if "advantage=reinforce_pp" in opts:  # both REINFORCE++ variants whiten over the batch
        for r in rows:
            assert abs(r["advantages/mean"]) < 1e-4, r["advantages/mean"]
    if "importance_sampling_level=sequence" in opts:
        for r in rows:  # 2 minibatch steps of 8 rows: each clip fraction is k / 8, averaged
            for k in ("low", "high", "region"):
                v = r[f"clip_ratio/{k}_mean"] * 2 * 8
                assert abs(v - round(v)) < 1e-4, (k, v)
    if "dynamic_sampling=true" in opts:
        assert 1 <= rows[0]["dynamic_sampling/rounds"] <= 3
        for r, step in zip(rows, (1, 2)):
            trained = [g for g in groups if g[0]["step"] == step]
            flat = sum(len({x["score"] for x in g}) == 1 for g in trained)
            assert flat == r.get("dynamic_sampling/zero_std_groups_kept", 0.0)


def test_lora_reference_is_the_base_with_adapters_off(policy_dir, tmp_path):
    _, rows = run_grpo(policy_dir, tmp_path, "--config.train.steps=2", "--config.optim.lr=0",
                       "--config.grpo.beta=0.1", "--config.model.lora.rank=4",
                       "--config.model.lora.alpha=8")
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # fresh adapters (B = 0): pi == base
    _, rows = run_grpo(policy_dir, tmp_path / "moves", "--config.train.steps=3",
                       "--config.optim.lr=3e-2", "--config.grpo.beta=0.1",
                       "--config.model.lora.rank=4", "--config.model.lora.alpha=8",
                       varied(policy_dir))
    assert rows[-1]["kl"] > 1e-6  # the adapters moved away from the base


def test_tiny_rm_preset_scores_with_the_reward_model(policy_dir, tmp_path):
    from easyrl.algorithms import grpo
    c = launch.parse_config("grpo", ["--config", "configs/grpo.py:tiny_rm",
                                     f"--config.output_dir={tmp_path}",
                                     f"--config.model.path={policy_dir / 'policy'}",
                                     f"--config.reward.path={policy_dir / 'rm'}",
                                     "--config.mesh=dp:1", "--config.train.batch_size=4",
                                     "--config.grpo.num_generations=2", "--config.train.steps=1",
                                     "--config.log.tensorboard=false"])
    grpo.train(c)
    r = read_metrics(str(tmp_path))[0]
    assert r["reward"] == pytest.approx(r["rewards/reward_model/mean"], rel=1e-5)


# ----------------------------------------------------------------------------- resume, hosts
@pytest.mark.slow
def test_resume_after_sigkill_is_exact(policy_dir, tmp_path):
    args = grpo_args(policy_dir, "OUT", "--config.train.steps=4", "--config.checkpoint.every=2",
                     "--config.grpo.samples_every=0", "--config.grpo.num_iterations=2")

    def go(out, killer=False):
        a = [x.replace("OUT", str(out)) for x in args]
        cmd = ([sys.executable, os.path.join(HERE, "kill_after_checkpoint.py"), "2", "grpo", *a]
               if killer else [sys.executable, "-m", "easyrl", "grpo", *a])
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)

    assert go(tmp_path / "straight").returncode == 0
    assert go(tmp_path / "resumed", killer=True).returncode != 0
    r = go(tmp_path / "resumed")
    assert r.returncode == 0 and "resuming from checkpoint at step 2" in r.stdout, r.stderr[-2000:]
    a, b = read_metrics(str(tmp_path / "straight")), read_metrics(str(tmp_path / "resumed"))
    assert [x["step"] for x in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for k in ("reward", "loss", "entropy", "num_tokens", "ratio/last"):
            assert x[k] == pytest.approx(y[k], abs=1e-5), (k, x["step"])


@pytest.mark.slow
def test_two_processes_match_one_and_groups_stay_on_a_host(policy_dir, tmp_path, user_rewards):
    """2 processes x 1 CPU device vs 1 process x 2 devices, same global batch: the same metrics;
    each host's reward calls see whole groups of its own prompts."""
    f, data = user_rewards
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["grpo", *grpo_args(policy_dir, "OUT", "--config.train.steps=2",
                                 f"--config.data.train={data}", "--config.grpo.true_reward=",
                                 f"--config.reward.functions={f}:by_answer",
                                 "--config.grpo.loss_type=dapo", "--config.grpo.num_minibatches=2",
                                 "--config.mesh=dp:1,fsdp:-1,tp:1")]
    one = [x.replace("OUT", str(tmp_path / "one")) for x in common]
    two = [x.replace("OUT", str(tmp_path / "two")) for x in common]
    env1 = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                JAX_PLATFORMS="cpu", GRPO_TEST_LOG=str(tmp_path / "one.log"))
    r = subprocess.run([sys.executable, "-m", "easyrl", *one], capture_output=True, text=True,
                       cwd=ROOT, env=env1)
    assert r.returncode == 0, r.stderr[-3000:]
    env2 = dict(env1, XLA_FLAGS="--xla_force_host_platform_device_count=1",
                GRPO_TEST_LOG=str(tmp_path / "two.log"))
    procs = [subprocess.Popen([sys.executable, "-m", "easyrl", *two,
                               f"--config.distributed.coordinator=127.0.0.1:{port}",
                               "--config.distributed.num_processes=2",
                               f"--config.distributed.process_id={i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env=env2) for i in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    a, b = read_metrics(str(tmp_path / "one")), read_metrics(str(tmp_path / "two"))
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        for k in ("reward", "rewards/by_answer/mean", "loss", "entropy", "reward_std"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (k, x["step"])
    calls = [json.loads(x) for x in open(tmp_path / "two.log")]
    assert len({c["pid"] for c in calls}) == 2
    for c in calls:  # 8 rows per host per call: 2 whole groups of 4
        ps = c["prompts"]
        assert len(ps) == 8 and all(ps[i] == ps[i - i % 4] for i in range(8))


# ----------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_tiny_preset_beats_sft_sampled_and_greedy(sft_run, tmp_path):
    """configs/grpo.py:tiny from the tiny SFT run raises the held-out rule-based reward (256
    eval-split prompts, the pipeline's evaluation), both sampled (T = 1, 8 per prompt) and
    greedy, above the SFT policy's."""
    from easyrl.algorithms import grpo
    from easyrl.pipeline.evaluate import evaluate
    from easyrl.train.config import load_config_file
    from tiny_configs import make_config
    res = grpo.train(make_config("grpo", tmp_path / "grpo", **{"model.path": sft_run,
                                                               "log.every": 10}))
    assert res.final_step == 150
    ec = load_config_file("configs/pipeline.py:tiny").eval
    out = evaluate({"sft": sft_run, "grpo": str(tmp_path / "grpo")}, sft_dir=sft_run,
                   rm_dir=None, ec=ec, template="plain", mesh_spec="dp:1", log=lambda *a: None)
    print({k: {m: round(v, 3) for m, v in d.items() if isinstance(v, float)}
           for k, d in out.items()})
    s, g = out["sft"], out["grpo"]
    assert g["true_reward"] > s["true_reward"] + 0.03
    assert g["true_reward_greedy"] > s["true_reward_greedy"]


# ----------------------------------------------------------------------------- behaviour log-probs
def test_sampler_logprobs_as_old_equal_a_scoring_pass(policy_dir, tmp_path):
    """fp32: the sampler's own log-probs as the behaviour (old) log-probs (no scoring pass for
    the policy) give the same update as the trainer's scoring pass, and the logged
    sampler-vs-trainer difference is ~0; the IS correction runs on the trainer's."""
    common = ("--config.train.steps=1", "--config.optim.lr=1e-2",
              "--config.grpo.num_iterations=2", "--config.grpo.num_minibatches=2",
              varied(policy_dir))
    a, ra = run_grpo(policy_dir, tmp_path / "sampler", *common,
                     "--config.rollout.behaviour_logprobs=sampler")
    b, rb = run_grpo(policy_dir, tmp_path / "trainer", *common,
                     "--config.rollout.behaviour_logprobs=trainer",
                     "--config.rollout.is_correction=token_truncate")
    assert ra[0]["rollout/logprob_diff_max"] < 1e-5 and rb[0]["rollout/logprob_diff_max"] < 1e-5
    assert rb[0]["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert ra[0]["reward"] == rb[0]["reward"]  # the same rollout
    for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="rollout.is_correction"):
        run_grpo(policy_dir, tmp_path / "bad", "--config.rollout.behaviour_logprobs=sampler",
                 "--config.rollout.is_correction=token_truncate")


def test_continuous_engine_rollouts(policy_dir, tmp_path):
    """rollout.engine=continuous (fewer slots than rollout rows): the engine's log-probs are the
    behaviour log-probs and equal the trainer's (fp32), the run trains as with the static
    sampler."""
    _, rows = run_grpo(policy_dir, tmp_path, "--config.train.steps=2",
                       "--config.rollout.engine=continuous", "--config.rollout.slots=5",
                       "--config.grpo.num_iterations=2", varied(policy_dir))
    for r in rows:
        assert r["rollout/logprob_diff_max"] < 1e-5
        assert r["ratio/first"] == pytest.approx(1.0, abs=1e-5)
        assert r["nonfinite_updates"] == 0 and np.isfinite(r["loss"])
    with pytest.raises(ValueError, match="rollout.engine"):
        run_grpo(policy_dir, tmp_path / "bad", "--config.rollout.engine=paged")


@pytest.mark.slow
def test_lora_on_nf4_base_reference_is_the_quantized_base(policy_dir, tmp_path):
    """GRPO over an NF4 base: the reference (adapters off) reads the same quantized kernels,
    so fresh adapters give KL 0; training moves them."""
    q = ["--config.grpo.beta=0.1", "--config.model.lora.rank=4", "--config.model.lora.alpha=8",
         "--config.model.lora.base_quant=nf4", "--config.model.lora.quant_block=32"]
    _, rows = run_grpo(policy_dir, tmp_path, "--config.train.steps=1", "--config.optim.lr=0", *q)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    _, rows = run_grpo(policy_dir, tmp_path / "moves", "--config.train.steps=2",
                       "--config.optim.lr=3e-2", varied(policy_dir), *q)
    assert rows[-1]["kl"] > 1e-6


def test_sequence_level_with_a_length_weighted_loss_warns(policy_dir, tmp_path, caplog):
    """As TRL's GRPOTrainer (grpo_trainer.py ~l.903): GSPO's sequence ratio with bnpo / dr_grpo /
    dapo weights sequences by length: one warning naming the key; grpo's loss does not warn."""
    import logging

    from easyrl import parallel
    from easyrl.algorithms import grpo
    mesh = parallel.create_mesh("dp:1")
    for loss_type, warns in (("dapo", True), ("grpo", False)):
        c = launch.parse_config("grpo", grpo_args(
            policy_dir, tmp_path, "--config.grpo.importance_sampling_level=sequence",
            f"--config.grpo.loss_type={loss_type}"))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="easyrl.grpo"):
            grpo.validate(c, mesh, 4096)
        hits = [r for r in caplog.records if "importance_sampling_level=sequence" in r.message]
        assert len(hits) == int(warns), caplog.records


@pytest.mark.parametrize("section", ["grpo", "online_dpo"])
def test_missing_eos_penalty_in_the_reward_totals(policy_dir, tmp_path, section):
    """TRL (grpo_trainer / online_dpo_trainer `missing_eos_penalty`): the penalty is subtracted
    from the total reward of each completion without EOS; unscorable rows stay NaN."""
    from easyrl import parallel
    from easyrl.train import setup
    from easyrl.train.rl_loop import RLEnv, host_rewards
    c = launch.parse_config(section, [
        "--config", f"configs/{section}.py:tiny", f"--config.output_dir={tmp_path}",
        f"--config.model.path={policy_dir / 'policy'}", "--config.mesh=dp:1",
        f"--config.{section}.missing_eos_penalty=0.75",
        "--config.reward.functions=exact_match,length_penalty", "--config.reward.weights=2,0"])
    mesh = parallel.create_mesh("dp:1")
    tok = setup.load_tokenizer(c)
    hr, _ = host_rewards(c, RLEnv(c, mesh, tok, setup.model_config(c, tok), 1), mesh, section)
    vals = np.array([[1.0, -0.1], [0.0, -0.2], [1.0, -0.3], [np.nan, np.nan]])
    has_eos = np.array([True, False, False, False])
    total, m = hr.total(vals, has_eos)
    want = [2.0, 0.0 - 0.75, 2.0 - 0.75, np.nan]
    np.testing.assert_allclose(total, want, rtol=1e-6)
    assert m["reward"] == pytest.approx(np.mean([2.0, -0.75, 1.25]))
