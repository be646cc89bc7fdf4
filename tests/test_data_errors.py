"""Clear errors for bad data and config values (issue 15): each names the file and line, or the
config key, instead of a traceback, a bare `datasets` error or silence."""
import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from easyrl.data import (DataError, load_data, load_tokenizer, preference_iterator,  # noqa: E402
                         sft_iterator, synthetic)
from easyrl.train import setup  # noqa: E402
from easyrl.train.config import base_config, load_config_file, validate  # noqa: E402

EOS = 2
GOOD = {"prompt": "sort: b a", "completion": "a b"}
PAIR = {"prompt": "sort: b a", "chosen": "a b", "rejected": "b a"}
LONG = {"prompt": "sort: " + "a " * 40, "completion": "a"}  # ~42 prompt tokens


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(synthetic.synthetic_tokenizer_path())


def write(path, lines) -> str:
    """JSON lines from dicts, str (as is) or bytes (as is)."""
    def raw(x):
        return x if isinstance(x, bytes) else (x if isinstance(x, str) else json.dumps(x)).encode()
    path.write_bytes(b"".join(raw(x) + b"\n" for x in lines))
    return str(path)


def config(**data):
    c = base_config("sft")
    c.train.steps = 1
    c.data.update(**data)
    return c


def messages(caplog, needle):
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


# ---- 1. invalid UTF-8 ------------------------------------------------------------------------
def test_invalid_utf8_names_file_and_line(tmp_path):
    path = write(tmp_path / "u.jsonl", [GOOD, GOOD, b'{"prompt": "sort: \xff a", "completion": "a"}', GOOD])
    with pytest.raises(DataError, match=r"u\.jsonl: line 3: invalid UTF-8 \(byte 0xff at column 19\)"):
        load_data(path, "sft")
    assert load_data(path, "sft", skip_bad_rows=True).num_bad == 1
    js = tmp_path / "u.json"
    js.write_bytes(b'[\n{"prompt": "a", "completion": "b"},\n{"prompt": "\xc3(", "completion": "b"}\n]\n')
    with pytest.raises(DataError, match=r"u\.json: line 3, column 13: invalid UTF-8 \(byte 0xc3\)"):
        load_data(str(js), "sft")
    from easyrl.generate_cli import read_prompts
    p = write(tmp_path / "p.jsonl", [{"prompt": "x"}, b'{"prompt": "\xff"}'])
    with pytest.raises(ValueError, match=r"p\.jsonl:2: invalid UTF-8 \(byte 0xff at column 13\)"):
        read_prompts(p)


# ---- 2. JSON syntax errors: the real line and column -----------------------------------------
def test_json_syntax_errors_report_real_line_and_column(tmp_path):
    cut = '{"prompt": "sort: c a",'
    path = write(tmp_path / "cut.jsonl", [GOOD, cut, GOOD])
    with pytest.raises(DataError) as e:
        load_data(path, "sft")
    msg = str(e.value)
    assert "cut.jsonl: line 2: invalid JSON" in msg, msg
    assert f"at column {len(cut) + 1}, the end of the line" in msg and "column 1)" not in msg, msg
    pretty = tmp_path / "pretty.json"  # one pretty-printed object, a comma missing on line 3
    pretty.write_text('{\n  "prompt": "a",\n  "completion": "b"\n  "x": 1\n}\n')
    with pytest.raises(DataError, match=r"pretty\.json: line 4, column 3: invalid JSON "
                                        r"\(Expecting ',' delimiter\)"):
        load_data(str(pretty), "sft")
    bom = tmp_path / "bom.jsonl"  # a UTF-8 byte order mark is not an error
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert load_data(str(bom), "sft").rows[0]["completion"] == "a b"
    from easyrl.generate_cli import read_prompts
    p = write(tmp_path / "p.jsonl", [{"prompt": "x"}, '{"prompt": '])
    with pytest.raises(ValueError) as e:
        read_prompts(p)
    msg = str(e.value)
    assert "p.jsonl:2: invalid JSON" in msg and "at column 12, the end of the line" in msg, msg
    assert "line 1" not in msg and "char" not in msg, msg


# ---- 3. a folder as data.train -----------------------------------------------------------------
def test_folder_as_data_train_names_key_and_path(tmp_path, tok):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("not data")
    mixed = tmp_path / "mixed"  # json files datasets cannot combine
    mixed.mkdir()
    (mixed / "a.json").write_text('{"a": 1}')
    (mixed / "b.json").write_text('{"b": "x"}')
    run = tmp_path / "run"  # a model folder: its json files are no dataset
    run.mkdir()
    (run / "config.json").write_text('{"hidden_size": 8}')
    (run / "model.safetensors").write_bytes(b"")
    for folder in (empty, mixed, run):
        c = config(train=str(folder), eval="")
        with pytest.raises(DataError) as e:
            sft_iterator(setup.data_source(c, "sft", "train"), tok, seq_len=16, global_batch_size=1)
        msg = str(e.value)
        assert f"data.train {folder}" in msg and "folder" in msg, msg
        assert "DatasetGenerationError" not in msg and "\n" not in msg, msg
    import datasets  # a folder of parquet files is a dataset folder: still loads
    pq = tmp_path / "pq"
    pq.mkdir()
    datasets.Dataset.from_list([GOOD] * 4).to_parquet(str(pq / "train.parquet"))
    datasets.Dataset.from_list([GOOD] * 3).save_to_disk(str(tmp_path / "saved"))
    for folder, n in ((pq, 4), (tmp_path / "saved", 3)):
        it = sft_iterator(setup.data_source(config(train=str(folder), eval=""), "sft", "train"), tok,
                          seq_len=16, global_batch_size=2)
        assert it.stats["num_examples"] == n


# ---- 4. output_dir a file ------------------------------------------------------------------------
def test_output_dir_that_is_a_file_is_a_config_error(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    for out in (f, f / "run"):
        c = config()
        c.output_dir = str(out)
        with pytest.raises(ValueError, match=r"config output_dir: .*file\.txt.* is a file"):
            validate(c)
    from easyrl import cli
    with pytest.raises(SystemExit) as e:
        cli.main(["sft", "--config", "configs/sft.py:tiny", f"--config.output_dir={f}",
                  "--config.train.steps=1", "--config.mesh=dp:1,fsdp:1,tp:1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("easyrl sft: error: config output_dir:") and err.count("\n") == 1, err


# ---- 5. dropped rows: one warning; all dropped: an error with counts and reasons ---------------
def test_dropped_rows_warn_once_with_counts_and_reasons(tmp_path, tok, caplog):
    path = write(tmp_path / "foo.jsonl", [GOOD] * 6 + [LONG] * 2)
    c = config(train=path, eval="")
    with caplog.at_level(logging.WARNING):
        it = sft_iterator(setup.data_source(c, "sft", "train"), tok, seq_len=16, global_batch_size=2)
    assert messages(caplog, "dropped") == [
        f"data.train {path}: dropped 2 of 8 rows (2 prompt longer than train.seq_len=16)"]
    assert it.stats["num_examples"] == 6
    caplog.clear()
    pairs = write(tmp_path / "pairs.jsonl", [PAIR] * 3 + [dict(PAIR, rejected="a b")] * 2)
    with caplog.at_level(logging.WARNING):
        preference_iterator(setup.data_source(config(train=pairs), "preference", "train"), tok,
                            seq_len=32, global_batch_size=1)
    assert messages(caplog, "dropped") == [
        f"data.train {pairs}: dropped 2 of 5 rows (2 chosen == rejected)"]
    caplog.clear()
    # every row dropped: the error names the file, the counts and the reasons
    bad = write(tmp_path / "all.jsonl", [LONG] * 3 + [GOOD])
    with pytest.raises(DataError) as e:
        sft_iterator(setup.data_source(config(train=bad), "sft", "train"), tok, seq_len=16,
                     global_batch_size=2)
    msg = str(e.value)
    assert f"data.train {bad}:" in msg and "dropped 3 of 4 rows" in msg, msg
    assert "3 prompt longer than train.seq_len=16" in msg and "fewer than one global batch" in msg, msg
    same = write(tmp_path / "same.jsonl", [dict(PAIR, rejected="a b")] * 4)
    with pytest.raises(DataError, match=r"same\.jsonl: no examples left: dropped 4 of 4 rows "
                                        r"\(4 chosen == rejected\)"):
        preference_iterator(same, tok, seq_len=32, global_batch_size=2)
    # truncation that makes the pair identical is its own reason
    cut = [{"prompt": "sort: c a", "chosen": "a b c d e f g h", "rejected": "a b c d e f g i"}] * 2
    with pytest.raises(DataError, match=r"2 chosen == rejected after truncation to seq_len=6"):
        preference_iterator(cut, tok, seq_len=6, global_batch_size=1)


# ---- 6. empty responses: just EOS --------------------------------------------------------------
def test_empty_preference_response_is_just_eos(tok):
    hh = {"chosen": "\n\nHuman: sort: b a\n\nAssistant: a b", "rejected": "\n\nHuman: sort: b a\n\nAssistant:"}
    rows = [PAIR, dict(PAIR, rejected=""), dict(PAIR, chosen=" ")]
    it = preference_iterator(rows, tok, seq_len=16, global_batch_size=1, shuffle=False)
    assert it.stats["num_empty_responses"] == 2 and it.stats["num_examples"] == 3
    batches = [next(it) for _ in range(3)]
    hh_it = preference_iterator([hh, hh], tok, seq_len=32, global_batch_size=1)  # HH-style
    assert hh_it.stats["num_empty_responses"] == 2 and hh_it.stats["format"] == "implicit_preference"
    for b, side in ((batches[1], "rejected"), (batches[2], "chosen"), (next(hh_it), "rejected")):
        ids, mask = b[f"{side}_input_ids"][0], b[f"{side}_loss_mask"][0]
        assert ids[mask > 0].tolist() == [EOS], side
    with pytest.raises(DataError, match=r"row 2: missing field 'rejected'"):  # missing: an error
        load_data([PAIR, {"prompt": "p", "chosen": "a"}], "preference")
    with pytest.raises(DataError, match=r"row 2: missing field 'chosen'"):
        load_data([PAIR, {"prompt": "p", "chosen": None, "rejected": "a"}], "preference")


# ---- 7. non-finite margins -----------------------------------------------------------------------
def test_nonfinite_margin_is_a_bad_row(tmp_path):
    path = write(tmp_path / "m.jsonl", [
        PAIR, dict(PAIR, margin=1.5),
        '{"prompt": "sort: b a", "chosen": "a b", "rejected": "b a", "margin": NaN}',
        dict(PAIR, margin="inf"),
        '{"prompt": "sort: b a", "chosen": "a b", "rejected": "b a", "margin": -Infinity}'])
    with pytest.raises(DataError, match=r"m\.jsonl: line 3: field 'margin' must be a finite "
                                        r"number, got nan \(and 2 more bad rows\)"):
        load_data(path, "preference")
    loaded = load_data(path, "preference", skip_bad_rows=True)
    assert loaded.num_bad == 3 and [r["margin"] for r in loaded.rows] == [0.0, 1.5]
    assert any("line 4" in m and "got inf" in m for m in loaded.bad_examples)


# ---- 9. evaluation follows the user's data ------------------------------------------------------
def test_synthetic_eval_only_with_synthetic_train(tmp_path, tok, capsys):
    from easyrl.algorithms import sft
    path = write(tmp_path / "my.jsonl", [{"text": f"sort: {i} a"} for i in range(40)])
    c = load_config_file("configs/sft.py:tiny")
    assert c.data.eval == "synthetic"
    c.data.update(train=path, format="text")
    capsys.readouterr()
    train, ev = sft.iterators(c, tok)
    assert ev is None and train.stats["num_rows"] == 40
    out = [x for x in capsys.readouterr().out.splitlines() if "data.eval" in x]
    assert len(out) == 1 and "no evaluation" in out[0], out
    c = load_config_file("configs/sft.py:tiny")  # synthetic training data: the synthetic eval set
    assert setup.data_source(c, "sft", "eval").endswith("sft_eval.jsonl")


def test_eval_fraction_holds_out_rows(tmp_path, tok):
    rows = [{"prompt": f"sort: {i}", "completion": str(i)} for i in range(20)]
    path = write(tmp_path / "d.jsonl", rows)
    c = config(train=path, eval_fraction=0.25)
    validate(c)

    def split(c):
        tr = load_data(setup.data_source(c, "sft", "train"), "sft").rows
        ev = load_data(setup.data_source(c, "sft", "eval"), "sft").rows
        return [r["completion"] for r in tr], [r["completion"] for r in ev]
    tr, ev = split(c)
    assert len(ev) == 5 and len(tr) == 15 and sorted(tr + ev, key=int) == [str(i) for i in range(20)]
    assert split(c) == (tr, ev)  # deterministic
    c.seed = 1
    assert split(c)[1] != ev  # by seed
    from easyrl.algorithms import common
    pairs = write(tmp_path / "pairs.jsonl", [dict(PAIR, margin=float(i)) for i in range(16)])
    c = config(train=pairs, eval_fraction=0.25)
    c.train.batch_size = 4
    train, ev = common.pair_iterators(c, tok)
    assert (train.stats["num_rows"], ev.stats["num_rows"]) == (12, 4)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="config data.eval_fraction"):
            validate(config(train=path, eval_fraction=bad))
    with pytest.raises(ValueError, match="config data.eval_fraction"):
        validate(config(train=path, eval=path, eval_fraction=0.1))


# ---- 10. learning rates and max_nonfinite --------------------------------------------------------
@pytest.mark.parametrize("key,value", [
    ("optim.lr", float("inf")), ("optim.lr", float("nan")), ("optim.lr", -1e-3),
    ("value_optim.lr", float("nan")), ("value_optim.lr", -1.0), ("train.max_nonfinite", -1)])
def test_bad_lr_and_max_nonfinite_name_the_key(key, value):
    import ml_collections as mlc
    c = config()
    c.value_optim = mlc.ConfigDict(c.optim.to_dict())
    validate(c)
    c.optim.lr = c.value_optim.lr = 0.0  # lr 0 stays allowed
    validate(c)
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ValueError, match=rf"config {key}: "):
        validate(c)


def test_hub_dataset_config_name_and_online_rl_batch_counts(monkeypatch):
    """NAME@CONFIG[:SPLIT] passes the dataset config to load_dataset (openai/gsm8k@main); the
    online-RL trainers' prompt counts are not checked against the mesh as rows are."""
    import datasets

    from easyrl.data.reading import load_rows
    seen = []

    def fake(**spec):
        seen.append(spec)
        return datasets.Dataset.from_list([{"question": "q", "answer": "#### 1"}])
    monkeypatch.setattr(datasets, "load_dataset", fake)
    label, rows, _ = load_rows("openai/gsm8k@main:test")
    assert seen[-1] == {"path": "openai/gsm8k", "name": "main", "split": "test"}
    assert rows[0][1]["question"] == "q"
    load_rows("open-r1/Big-Math-RL-Verified-Processed@all", split="train")
    assert seen[-1] == {"path": "open-r1/Big-Math-RL-Verified-Processed", "name": "all",
                        "split": "train"}
    load_rows("trl-lib/tldr")
    assert seen[-1] == {"path": "trl-lib/tldr", "split": "train"}
    with pytest.raises(DataError, match="NAME@CONFIG"):
        load_rows("openai/gsm8k@:train")
    # grpo: micro-batch 1 prompt x G rows on 8 data-parallel devices is the trainer's to check
    c = base_config("grpo")
    c.train.update(batch_size=16, micro_batch_size=1, steps=1)
    validate(c, dp_size=8)
    s = base_config("sft")
    s.train.update(batch_size=16, micro_batch_size=1, steps=1)
    with pytest.raises(ValueError, match="data-parallel size 8"):
        validate(s, dp_size=8)
