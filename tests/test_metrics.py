"""The metric sinks for real: a tiny SFT run logs the same scalars, at the same steps, to
metrics.jsonl, TensorBoard (tensorboardX events read back with TensorBoard's own reader) and an
offline W&B run (its .wandb transaction log read back); resume truncation of every sink."""
import glob
import json
import math
import os
import struct
import time
import zlib

import numpy as np
import pytest

pytest.importorskip("tensorboardX")
pytest.importorskip("wandb")
event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator")

from easyrl.algorithms import sft  # noqa: E402
from easyrl.train.metrics import MetricsWriter, read_metrics  # noqa: E402

from tiny_configs import make_config  # noqa: E402


def jsonl_scalars(rows):
    """{tag: [(step, value)]} of every real-number value in metrics.jsonl rows (`step` aside)."""
    out = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)):
                out.setdefault(k, []).append((r["step"], v))
    return out


def tensorboard_scalars(logdir):
    ea = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.SCALARS: 0})
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def wandb_records(path):
    """The protobuf Records of a .wandb file: wandb's leveldb-log format (a 7-byte ':W&B' header,
    then 32 KiB blocks of crc32-checked chunks: FULL=1 or FIRST=2, MIDDLE=3..., LAST=4). The
    installed wandb has no Python reader for it (its Go core writes and reads it)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:7]
    block, pos, parts = 32768, 7, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero fill (preallocated / unwritten tail)
            break
        chunk = data[pos + 7:pos + 7 + n]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, pos
        pos += 7 + n
        parts.append(chunk)
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            parts = []
            yield rec


def wandb_history(path):
    """[(step, {key: value})] of the run's history rows, wandb's own `_...` keys left out."""
    out = []
    for rec in wandb_records(path):
        if rec.WhichOneof("record_type") != "history":
            continue
        items = {}
        for it in rec.history.item:
            key = "/".join(it.nested_key) if it.nested_key else it.key
            if not key.startswith("_"):
                items[key] = json.loads(it.value_json)
        out.append((rec.history.step.num, items))
    return out


def test_jsonl_tensorboard_and_wandb_get_the_same_scalars(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    c = make_config("sft", out, **{"train.steps": 6, "log.every": 2, "log.tensorboard": "true",
                                   "log.wandb_project": "easyrl-test", "data.eval": "",
                                   "checkpoint.async_save": "false"})
    sft.train(c)

    rows = read_metrics(str(out))
    assert [r["step"] for r in rows] == [2, 4, 6]
    want = jsonl_scalars(rows)
    for k in ("loss", "accuracy", "lr", "grad_norm", "tokens_per_sec", "nonfinite"):
        assert k in want, k
    assert any(isinstance(v, int) and not isinstance(v, bool)
               for r in rows for v in r.values()), rows[0]  # int metrics (data/num_*) covered

    # TensorBoard: same tags, steps and values (stored as float32)
    tb = tensorboard_scalars(str(out / "tensorboard"))
    assert set(tb) == set(want), (sorted(tb), sorted(want))
    for k, pts in want.items():
        assert [s for s, _ in tb[k]] == [s for s, _ in pts], k
        for (s, got), (_, v) in zip(tb[k], pts):
            assert got == float(np.float32(v)) or (math.isnan(got) and math.isnan(v)), (k, s, got, v)

    # W&B: one history row per metrics.jsonl row, at its step, with exactly its scalars
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, runs
    hist = wandb_history(runs[0])
    assert [s for s, _ in hist] == [r["step"] for r in rows]
    for (s, items), r in zip(hist, rows):
        expect = {k: v for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
        assert set(items) == set(expect), (s, sorted(items), sorted(expect))
        for k, v in expect.items():
            # (W&B's JSON writes an integral float as an int: 0.0 comes back as 0)
            assert isinstance(items[k], (int, float)) and not isinstance(items[k], bool), (k, s)
            assert items[k] == pytest.approx(v, rel=1e-12, abs=0), (k, s)


def test_resume_truncates_every_sink_after_the_resume_step(tmp_path):
    out = str(tmp_path)
    w = MetricsWriter(out, tensorboard=True)
    for s in (1, 2, 3, 4):
        w.write(s, {"loss": np.float32(1.0 / s), "hist": np.arange(3), "n": np.int32(s)})
    w.close()
    rows = read_metrics(out)
    assert rows[0] == {"step": 1, "loss": 1.0, "hist": [0, 1, 2], "n": 1}  # lists stay in jsonl
    time.sleep(1.1)  # tensorboardX names event files by the second: keep them apart and in order

    w = MetricsWriter(out, tensorboard=True, resume_step=2)  # as after resuming from step 2
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    for s in (3, 4):
        w.write(s, {"loss": 10.0 * s, "n": s})
    w.close()
    rows = read_metrics(out)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 30.0), (4, 40.0)]
    tb = tensorboard_scalars(os.path.join(out, "tensorboard"))
    assert set(tb) == {"loss", "n"}  # the list is in metrics.jsonl only
    assert tb["loss"] == [(1, 1.0), (2, 0.5), (3, 30.0), (4, 40.0)]
    assert tb["n"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    time.sleep(1.1)

    w = MetricsWriter(out, tensorboard=True)  # a fresh run in the same folder starts over
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))
    w.write(1, {"loss": 7.0})
    w.close()
    assert read_metrics(out) == [{"step": 1, "loss": 7.0}]
    assert tensorboard_scalars(os.path.join(out, "tensorboard")) == {"loss": [(1, 7.0)]}
