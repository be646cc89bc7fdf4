"""The training core, proven on SFT: overfit, masking, packing, accumulation, resume, sharding,
multi-host, config validation and bad data."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easyrl import checkpoint, model as M
from easyrl.algorithms import sft
from easyrl.data.iterator import sft_iterator
from easyrl.data.synthetic import synthetic_tokenizer_path
from easyrl.data.tokenizer import load_tokenizer
from easyrl.train import launch, setup
from easyrl.train.metrics import read_metrics
from easyrl.train.optim import make_optimizer
from easyrl.train.step import TrainState, make_train_step

HERE = os.path.dirname(os.path.abspath(__file__))


def cfg(out, *overrides):
    return launch.parse_config("sft", ["--config", "configs/sft.py:tiny",
                                       f"--config.output_dir={out}", *overrides])


def cli(*args, env=None, **kw):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "easyrl", *args], capture_output=True, text=True,
                          env=e, **kw)


def losses_of(out):
    return [r["loss"] for r in read_metrics(str(out))]


# ---- learning -------------------------------------------------------------------------------
def test_tiny_preset_loss_falls_by_half(tmp_path):
    c = cfg(tmp_path, "--config.train.steps=120", "--config.log.every=10", "--config.mesh=dp:1")
    sft.train(c)
    rows = read_metrics(str(tmp_path))
    first, last = rows[0]["loss"], rows[-1]["loss"]
    print(f"SFT tiny: loss {first:.3f} -> {last:.3f}, eval/loss {rows[-1]['eval/loss']:.3f}")
    assert last <= 0.5 * first
    for key in ("loss", "accuracy", "lr", "grad_norm", "tokens_per_sec", "eval/loss"):
        assert key in rows[-1]


# ---- unit-level properties of the step --------------------------------------------------------
def _tiny_setup(n=8, seq_len=48, packing=False):
    tok = load_tokenizer(synthetic_tokenizer_path())
    c = cfg("/tmp/unused")
    mcfg = setup.model_config(c, tok)
    params = M.init_params(mcfg, jax.random.PRNGKey(0))
    it = sft_iterator(setup.data_source(c, "sft", "train"), tok, seq_len=seq_len,
                      global_batch_size=n, packing=packing, shuffle=False)
    return c, mcfg, params, next(it)


def test_prompt_labels_change_neither_loss_nor_gradient():
    c, mcfg, params, batch = _tiny_setup()
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    loss_fn = sft.make_loss(mcfg)
    denom = sft.denom(batch)
    prompt = (batch["attention_mask"] > 0) & (batch["loss_mask"] == 0)
    assert int(prompt.sum()) > 0
    garbage = jax.random.randint(jax.random.PRNGKey(3), batch["input_ids"].shape, 0, mcfg.vocab_size)
    b2 = dict(batch, labels=jnp.where(prompt, garbage, batch["input_ids"]))
    g = jax.grad(lambda p, b: loss_fn(p, None, b, None, denom)[0])
    (l1, _), (l2, _) = loss_fn(params, None, batch, None, denom), loss_fn(params, None, b2, None, denom)
    assert float(l1) == float(l2)
    for a, b in zip(jax.tree.leaves(g(params, batch)), jax.tree.leaves(g(params, b2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and changing a completion label does change the loss
    resp = batch["loss_mask"] > 0
    b3 = dict(batch, labels=jnp.where(resp, garbage, batch["input_ids"]))
    assert float(loss_fn(params, None, b3, None, denom)[0]) != float(l1)


def test_packed_row_logits_equal_examples_alone():
    c, mcfg, params, batch = _tiny_setup(n=4, seq_len=64, packing=True)
    row = int(np.argmax(batch["segment_ids"].max(-1)))
    nseg = int(batch["segment_ids"][row].max())
    assert nseg >= 2
    g = lambda k: jnp.asarray(batch[k][row:row + 1])  # noqa: E731
    packed = np.asarray(M.forward(mcfg, params, g("input_ids"), g("attention_mask"),
                                  positions=g("positions"), segment_ids=g("segment_ids")))[0]
    for s in range(1, nseg + 1):
        idx = np.where(batch["segment_ids"][row] == s)[0]
        alone = np.asarray(M.forward(mcfg, params, jnp.asarray(batch["input_ids"][row, idx][None])))[0]
        np.testing.assert_allclose(packed[idx], alone, atol=1e-5)


def test_grad_accumulation_1x8_equals_4x2():
    c, mcfg, params, batch = _tiny_setup(n=8)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    tx, sched = make_optimizer(c.optim, 100)
    outs = []
    for micro in (1, 4):
        step = jax.jit(make_train_step(sft.make_loss(mcfg), tx, sched, sft.denom, micro))
        state = TrainState.create(params, tx)
        state, metrics = step(state, batch, jax.random.PRNGKey(0))
        outs.append((state, metrics))
    (s1, m1), (s4, m4) = outs
    np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m4["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_nonfinite_loss_skips_update_and_stops_run(tmp_path):
    c, mcfg, params, batch = _tiny_setup(n=8)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    tx, sched = make_optimizer(c.optim, 100)
    nan_loss = lambda p, f, b, r, d: (sft.make_loss(mcfg)(p, f, b, r, d)[0] * jnp.nan, {})  # noqa: E731
    step = jax.jit(make_train_step(nan_loss, tx, sched, sft.denom, 1))
    state = TrainState.create(params, tx)
    state, m = step(state, batch, jax.random.PRNGKey(0))
    state, m = step(state, batch, jax.random.PRNGKey(0))
    assert int(m["nonfinite"]) == 2 and int(m["nonfinite_streak"]) == 2
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    r = cli("sft", "--config", "configs/sft.py:tiny", f"--config.output_dir={tmp_path}",
            "--config.optim.lr=1e30", "--config.optim.clip=0", "--config.train.steps=40",
            "--config.log.every=5", "--config.train.max_nonfinite=3", "--config.mesh=dp:1",
            cwd=os.path.dirname(HERE))
    assert r.returncode != 0 and "non-finite" in r.stderr


# ---- resume -------------------------------------------------------------------------------------
def _final_params(out):
    _, _, p = checkpoint.load_model(str(out))
    return p


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path):
    args = ["--config", "configs/sft.py:tiny", "--config.train.steps=6", "--config.log.every=1",
            "--config.checkpoint.every=3", "--config.mesh=dp:1", "--config.eval.every=0",
            "--config.data.eval="]
    root = os.path.dirname(HERE)
    r = cli("sft", *args, f"--config.output_dir={tmp_path / 'straight'}", cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    killed = subprocess.run([sys.executable, os.path.join(HERE, "kill_after_checkpoint.py"), "3",
                             "sft", *args, f"--config.output_dir={tmp_path / 'resumed'}"],
                            capture_output=True, text=True, cwd=root)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert checkpoint.latest_step(str(tmp_path / "resumed")) == 3
    r = cli("sft", *args, f"--config.output_dir={tmp_path / 'resumed'}", cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from checkpoint at step 3" in r.stdout
    a, b = losses_of(tmp_path / "straight"), losses_of(tmp_path / "resumed")
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    for x, y in zip(jax.tree.leaves(_final_params(tmp_path / "straight")),
                    jax.tree.leaves(_final_params(tmp_path / "resumed"))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


@pytest.mark.slow
def test_sigterm_saves_checkpoint_before_exit(tmp_path):
    root = os.path.dirname(HERE)
    p = subprocess.Popen([sys.executable, "-m", "easyrl", "sft", "--config", "configs/sft.py:tiny",
                          f"--config.output_dir={tmp_path}", "--config.train.steps=100000",
                          "--config.log.every=5", "--config.mesh=dp:1"], cwd=root,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(tmp_path / "metrics.jsonl") and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-2000:]
    step = checkpoint.latest_step(str(tmp_path))
    assert step is not None and step >= 5
    assert f"saving checkpoint at step {step}" in out


# ---- sharding and multi-host ----------------------------------------------------------------------
def test_sharded_8_devices_equals_single_device(tmp_path):
    common = ["--config.train.steps=3", "--config.log.every=1", "--config.data.eval=",
              "--config.train.batch_size=8"]
    sft.train(cfg(tmp_path / "one", "--config.mesh=dp:1,fsdp:1,tp:1", *common))
    sft.train(cfg(tmp_path / "eight", "--config.mesh=dp:2,fsdp:2,tp:2", *common))
    a, b = losses_of(tmp_path / "one"), losses_of(tmp_path / "eight")
    print("1 device:", a, "8 devices:", b)
    np.testing.assert_allclose(a, b, atol=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_multihost_matches_single_process(tmp_path):
    root = os.path.dirname(HERE)
    common = ["sft", "--config", "configs/sft.py:tiny", "--config.train.steps=3",
              "--config.log.every=1", "--config.data.eval=", "--config.train.batch_size=8",
              "--config.mesh=dp:1,fsdp:-1,tp:1"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    single = subprocess.run([sys.executable, "-m", "easyrl", *common,
                             f"--config.output_dir={tmp_path / 'single'}"],
                            capture_output=True, text=True, cwd=root,
                            env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert single.returncode == 0, single.stderr[-2000:]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "easyrl", *common,
                               f"--config.output_dir={tmp_path / 'multi'}",
                               f"--config.distributed.coordinator=127.0.0.1:{port}",
                               "--config.distributed.num_processes=2",
                               f"--config.distributed.process_id={i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root,
                              env=env) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    a, b = losses_of(tmp_path / "single"), losses_of(tmp_path / "multi")
    print("single:", a, "two processes:", b)
    assert len(b) == 3
    np.testing.assert_allclose(a, b, atol=1e-5)


# ---- validation and bad data -----------------------------------------------------------------------
def test_invalid_config_values_name_the_key(tmp_path):
    root = os.path.dirname(HERE)
    cases = [
        (["--config.train.stepz=3"], "train.stepz"),
        (["--config.data.train=/nope/train.jsonl"], "data.train"),
        (["--config.train.batch_size=6", "--config.mesh=dp:4", "--config.train.steps=1"], "train.batch_size"),
        (["--config.train.seq_len=100000"], "train.seq_len"),
        (["--config.train.micro_batch_size=5"], "train.micro_batch_size"),
        (["--config.train.steps=abc"], "train.steps"),
    ]
    for extra, key in cases:
        t0 = time.time()
        r = cli("sft", "--config", "configs/sft.py:tiny", f"--config.output_dir={tmp_path}", *extra,
                cwd=root)
        assert r.returncode == 2, (extra, r.stderr[-1500:])
        assert key in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
        assert time.time() - t0 < 60


BAD_LINES = [
    ('{"prompt": "sort: b a"}', "completion"),
    ('{"prompt": "sort: b a", "completion": 5}', "must be a string"),  # "" trains as EOS
    ('{"prompt": "sort: b a", "completion": "a b"', "JSON"),
]


def _bad_rows_args(tmp_path, bad_lines):
    good = json.dumps({"prompt": "sort: c a b", "completion": "a b c"})
    path = tmp_path / "bad.jsonl"
    lines = [good] * 20
    for bad in bad_lines:
        lines += [bad] + [good] * 20
    path.write_text("\n".join(lines) + "\n")
    return ["sft", "--config", "configs/sft.py:tiny", f"--config.output_dir={tmp_path / 'o'}",
            f"--config.data.train={path}", "--config.data.eval=", "--config.train.steps=2",
            "--config.train.batch_size=8", "--config.mesh=dp:1"]


@pytest.mark.parametrize("line,needle", BAD_LINES)
def test_bad_rows_name_file_and_line(tmp_path, line, needle):
    r = cli(*_bad_rows_args(tmp_path, [line]), cwd=os.path.dirname(HERE))
    assert r.returncode == 2
    assert "bad.jsonl" in r.stderr and "line 21" in r.stderr and needle.lower() in r.stderr.lower(), r.stderr[-1500:]
    assert "Traceback" not in r.stderr


def test_skip_bad_rows_trains_and_counts(tmp_path):
    args = _bad_rows_args(tmp_path, [line for line, _ in BAD_LINES])  # bad lines 21, 42, 63
    r = cli(*args, "--config.data.skip_bad_rows=True", cwd=os.path.dirname(HERE))
    assert r.returncode == 0, r.stderr[-1500:]
    assert "skipped 3 bad rows" in r.stdout
    assert read_metrics(str(tmp_path / "o"))[-1]["data/num_bad_rows"] == 3
