"""Nothing lost, nothing silent: non-finite steps, divergence warnings, interruption and resume
(the run scaffold and the loops on it)."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from easyrl import checkpoint
from easyrl import model as M
from easyrl.algorithms import sft
from easyrl.train.metrics import read_metrics, restart_jsonl
from easyrl.train.optim import make_optimizer
from easyrl.train.step import TrainState, make_train_step
from tiny_configs import make_config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SFT = ["--config", "configs/sft.py:tiny", "--config.mesh=dp:1", "--config.data.eval=",
       "--config.log.tensorboard=false"]


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "easyrl", *args], capture_output=True, text=True,
                          cwd=ROOT, **kw)


def _tiny_batch(cfg, b=4, t=12):
    ids = jax.random.randint(jax.random.PRNGKey(1), (b, t), 3, cfg.vocab_size)
    return dict(input_ids=ids, attention_mask=jnp.ones_like(ids), loss_mask=jnp.ones_like(ids))


def test_nonfinite_update_skips_the_step_and_keeps_the_params():
    """An infinite learning rate gives a finite loss and gradient but an infinite update: the
    step is skipped (counted), parameters and optimizer state stay as they were."""
    cfg = M.get_preset("tiny")
    params = M.init_params(cfg, jax.random.PRNGKey(0))
    optim = mlc.ConfigDict(dict(lr=float("inf"), schedule="constant", warmup=0, min_lr_ratio=0.0,
                                weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, clip=1.0))
    tx, sched = make_optimizer(optim, 10)
    step = jax.jit(make_train_step(sft.make_loss(cfg), tx, sched, sft.denom, 1))
    state, m = step(TrainState.create(params, tx), _tiny_batch(cfg), jax.random.PRNGKey(0))
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    assert int(m["nonfinite"]) == 1 and int(m["nonfinite_streak"]) == 1
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_max_nonfinite_zero_means_off(cache, tmp_path):
    res = sft.train(make_config("sft", tmp_path, **{"train.steps": 3, "log.every": 1,
                                                    "train.max_nonfinite": 0, "data.eval": ""}))
    assert res.final_step == 3 and len(read_metrics(str(tmp_path))) == 3


def test_nonfinite_stop_is_one_line_and_every_checkpoint_is_finite(cache, tmp_path):
    """lr=1e30 without clipping: after the first update every step is non-finite; the run stops
    at the streak limit (checked every step, not at log steps) with one line and exit 1."""
    r = cli("sft", *SFT, f"--config.output_dir={tmp_path}", "--config.optim.lr=1e30",
            "--config.optim.clip=0", "--config.train.steps=40", "--config.log.every=20",
            "--config.train.max_nonfinite=3", "--config.checkpoint.every=1",
            "--config.checkpoint.async_save=false")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("easyrl sft: stopped:") and "non-finite" in last, last
    step = checkpoint.latest_step(str(tmp_path))
    assert step is not None and step < 20  # stopped well before the first log step
    _, _, params = checkpoint.load_model(str(tmp_path))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_dead_model_warns(cache, tmp_path):
    """optim.lr=1e3 kills the model (grad norm 0, constant loss, nothing non-finite): a warning
    line says so."""
    r = cli("sft", *SFT, f"--config.output_dir={tmp_path}", "--config.optim.lr=1e3",
            "--config.train.steps=30", "--config.log.every=10")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning: grad_norm is exactly 0" in r.stdout or "warning: loss grew" in r.stdout, \
        r.stdout[-2000:]


def test_torn_jsonl_lines():
    import tempfile
    d = tempfile.mkdtemp()
    path = os.path.join(d, "metrics.jsonl")
    with open(path, "w") as f:
        f.write('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    restart_jsonl(path, 5)  # a kill mid-write: the torn last line goes, the rest stays
    assert [r["step"] for r in read_metrics(d)] == [1, 2]
    restart_jsonl(path, 1)
    assert [r["step"] for r in read_metrics(d)] == [1]
    with open(path, "w") as f:
        f.write('{"step": 1}\n{"step": oops}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2"):
        read_metrics(d)


def test_torn_run_config_names_the_file(tmp_path):
    (tmp_path / checkpoint.CONFIG_FILE).write_text('{"kind": "causal_lm", "mod')
    with pytest.raises(ValueError, match=checkpoint.CONFIG_FILE):
        checkpoint.read_model_config(str(tmp_path))


def test_resume_with_a_changed_config_is_refused(cache, tmp_path):
    over = {"train.steps": 2, "log.every": 1, "data.eval": "", "checkpoint.async_save": "false"}
    sft.train(make_config("sft", tmp_path, **over))
    with pytest.raises(ValueError, match=r"train.batch_size: 32 -> 16.*allow_changes"):
        sft.train(make_config("sft", tmp_path, **{**over, "train.steps": 3,
                                                  "train.batch_size": 16}))
    res = sft.train(make_config("sft", tmp_path, **{**over, "train.steps": 3,  # longer: fine
                                                    "checkpoint.allow_changes": "true",
                                                    "train.batch_size": 16}))
    assert res.final_step == 3


@pytest.mark.slow
def test_resume_mid_window_matches_an_uninterrupted_run(tmp_path):
    """Killed after the checkpoint of step 3 with rows every 4 steps: the resumed row of step 4
    averages steps 1-4, as the uninterrupted run's (the window is in the checkpoint)."""
    args = [*SFT, "--config.train.steps=8", "--config.log.every=4", "--config.checkpoint.every=3"]
    env = dict(os.environ, EASYRL_CACHE=str(tmp_path / "cache"))
    r = cli("sft", *args, f"--config.output_dir={tmp_path / 'straight'}", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = f"--config.output_dir={tmp_path / 'resumed'}"
    killed = subprocess.run([sys.executable, os.path.join(HERE, "kill_after_checkpoint.py"), "3",
                             "sft", *args, out], capture_output=True, text=True, cwd=ROOT, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    r = cli("sft", *args, out, env=env)
    assert r.returncode == 0 and "resuming from checkpoint at step 3" in r.stdout, r.stderr[-2000:]
    a, b = read_metrics(str(tmp_path / "straight")), read_metrics(str(tmp_path / "resumed"))
    assert [x["step"] for x in a] == [x["step"] for x in b] == [4, 8]
    for x, y in zip(a, b):
        for k in ("loss", "accuracy", "grad_norm", "lr", "nonfinite"):
            assert x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-7), (k, x["step"])


@pytest.mark.slow
def test_sigterm_at_a_checkpoint_step_saves_once_and_exits_143(tmp_path):
    """checkpoint.every=1: the signal always lands on a step that was just saved (the old loop
    saved it again and died with 'Checkpoint for step N already exists')."""
    p = subprocess.Popen([sys.executable, "-m", "easyrl", "sft", *SFT,
                          f"--config.output_dir={tmp_path}", "--config.train.steps=100000",
                          "--config.log.every=2", "--config.checkpoint.every=1",
                          "--config.checkpoint.keep=2"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(tmp_path / "metrics.jsonl") and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-2000:]
    step = checkpoint.latest_step(str(tmp_path))
    assert f"saving checkpoint at step {step}" in out


def test_run_config_json_is_written_atomically(tmp_path):
    checkpoint.write_json_atomic(str(tmp_path / "x.json"), {"a": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["x.json"]  # no temporary file left behind


@pytest.mark.slow
def test_two_process_preemption_saves_the_same_step_on_every_host(tmp_path):
    """SIGTERM to one of two processes: both reach orbax's synchronized preemption point, save
    the same step (one collective checkpoint) and exit 143."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    common = ["sft", *SFT, "--config.train.steps=100000", "--config.log.every=5",
              "--config.train.batch_size=8", "--config.mesh=dp:1,fsdp:-1,tp:1",
              f"--config.output_dir={out}"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-m", "easyrl", *common,
                               f"--config.distributed.coordinator=127.0.0.1:{port}",
                               "--config.distributed.num_processes=2",
                               f"--config.distributed.process_id={i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env=env) for i in range(2)]
    deadline = time.time() + 200
    while not os.path.exists(out / "metrics.jsonl") and time.time() < deadline:
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # not the coordinator
    outs = [p.communicate(timeout=200) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 143, e[-3000:]
    steps = os.listdir(out / "checkpoints")
    assert len(steps) == 1, steps
    assert f"saving checkpoint at step {steps[0]}" in outs[0][0]


def test_divergence_watch_warns_once_per_kind(capsys):
    from easyrl.train.run import DivergenceWatch
    w = DivergenceWatch()
    for step, (loss, g) in enumerate([(5.0, 2.0), (2.0, 1.0), (1.5, 1.2), (400.0, 3.0),
                                      (500.0, 0.0), (500.0, 0.0), (500.0, 0.0), (900.0, 0.0)], 1):
        w.observe(step, loss=loss, grad_norm=g)
    out = capsys.readouterr().out
    assert out.count("warning: loss grew from 1.5 to 400") == 1 and out.count("warning: loss") == 1
    assert out.count("warning: grad_norm is exactly 0 for 3 consecutive steps at step 7") == 1
    assert "grad_norm grew" not in out  # 3.0 is not 100x the best 1.0
