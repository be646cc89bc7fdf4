"""Data layer: tokenizer, templates, formats, batching, iterator."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from easyrl.data import (BatchIterator, DataError, TokenizerLoadError, detect_format,  # noqa: E402
                         load_data, load_tokenizer, preference_iterator, prompt_iterator,
                         render_prompt, rrhf_iterator, save_tokenizer, sft_iterator,
                         tokenize_messages, tokenize_prompt_completion)
from easyrl.data import encode, synthetic  # noqa: E402
from easyrl.data.formats import split_implicit  # noqa: E402

BOS, EOS, PAD = 1, 2, 3


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(synthetic.synthetic_tokenizer_path())


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_from_model_roundtrip(tok, tmp_path):
    from transformers import AutoTokenizer

    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, EOS, PAD)
    assert tok.encode("a b")[0] == BOS  # LLaMA-style: BOS added by default
    save_tokenizer(tok, str(tmp_path / "tk"))
    back = AutoTokenizer.from_pretrained(str(tmp_path / "tk"))
    for text in ["<|user|>\nsort: f b d a\n<|assistant|>\n", "a b d f", "Hello, World 42!", "é?"]:
        assert back.encode(text) == tok.encode(text)
        assert back.encode(text, add_special_tokens=False) == enc(tok, text)
    assert back.pad_token_id == PAD
    again = load_tokenizer(str(tmp_path / "tk"))
    assert again.encode("sort: c a") == tok.encode("sort: c a")


def test_tokenizer_pad_fallback_and_errors(tok, tmp_path):
    d = tmp_path / "nopad"
    save_tokenizer(tok, str(d))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(str(d)).pad_token_id == tok.unk_token_id
    with pytest.raises(TokenizerLoadError, match="missing.model"):
        load_tokenizer(str(tmp_path / "missing.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerLoadError, match="bad.model"):
        load_tokenizer(str(bad))


def test_llama_like_byte_fallback_model(tmp_path):
    """A LLaMA-like .model (byte fallback, no pad piece): pad falls back to unk, class survives save."""
    import io

    import sentencepiece as spm
    from transformers import AutoTokenizer

    lines = [r["prompt"] for r in synthetic.prompts(200, 0)] + ["The quick brown fox jumps."] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, model_type="bpe",
                                   vocab_size=300, byte_fallback=True, pad_id=-1, unk_id=0, bos_id=1,
                                   eos_id=2, character_coverage=1.0, minloglevel=2, num_threads=1)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(path))
    t = load_tokenizer(str(path))
    assert t.pad_token_id == t.unk_token_id == 0 and t.bos_token_id == 1 and t.eos_token_id == 2
    for text in ["sort: f b d a", "The lazy fox \u00e9 \u4e2d !"]:
        assert t.encode(text, add_special_tokens=False) == sp.encode(text)
    save_tokenizer(t, str(tmp_path / "out"))
    back = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert type(back).__name__ == "LlamaTokenizer"
    assert back.encode("The lazy fox \u00e9") == t.encode("The lazy fox \u00e9")


# ----------------------------------------------------------------------------- templates
def test_templates_render_exact(tok):
    assert render_prompt("tulu", "hi", tok) == "<|user|>\nhi\n<|assistant|>\n"
    assert render_prompt("stackllama", "hi", tok) == "Question: hi\n\nAnswer: "
    assert render_prompt("plain", "hi", tok) == "hi"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}]
    assert render_prompt("tulu", msgs, tok) == "<|user|>\na\n<|assistant|>\nb</s>\n<|user|>\nc\n<|assistant|>\n"
    with pytest.raises(ValueError, match="tulu, stackllama, plain, chat"):
        render_prompt("nope", "hi", tok)
    with pytest.raises(ValueError, match="chat_template"):
        render_prompt("chat", "hi", tok)


def test_chat_template(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = ("{% for m in messages %}{{ '[' + m['role'] + ']' + m['content'] }}"
                       "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                       "{% if add_generation_prompt %}{{ '[assistant]' }}{% endif %}")
    msgs = [{"role": "user", "content": "sort: c a"}]
    assert render_prompt("chat", msgs, t) == "[user]sort: c a[assistant]"
    conv = msgs + [{"role": "assistant", "content": "a c"}]
    ids, mask = tokenize_messages("chat", conv, t)
    assert ids[0] == BOS and ids[-1] == EOS
    assert [i for i, m in zip(ids, mask) if m] == enc(t, "a c") + [EOS]


def test_prompt_completion_masking(tok):
    p, c = tokenize_prompt_completion("tulu", "sort: c a", "a c", tok)
    assert p == [BOS] + enc(tok, "<|user|>\nsort: c a\n<|assistant|>\n")
    assert c == enc(tok, "a c") + [EOS]
    it = sft_iterator([{"prompt": "sort: c a", "completion": "a c"}], tok, seq_len=32,
                      global_batch_size=1, template="tulu")
    b = next(it)
    n = len(p) + len(c)
    assert b["input_ids"][0, :n].tolist() == p + c
    assert b["loss_mask"][0].tolist() == [0] * len(p) + [1] * len(c) + [0] * (32 - n)
    assert b["attention_mask"][0].tolist() == [1] * n + [0] * (32 - n)
    assert (b["segment_ids"] == b["attention_mask"]).all()
    assert b["positions"][0, :n].tolist() == list(range(n)) and not b["positions"][0, n:].any()
    assert (b["input_ids"][0, n:] == PAD).all()
    assert all(v.dtype == np.int32 and v.shape == (1, 32) for v in b.values())


def test_multiturn_loss_only_on_assistant(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort: c a"},
            {"role": "assistant", "content": "a c"}, {"role": "user", "content": "sort: b a"},
            {"role": "assistant", "content": "a b"}]
    for template in ("tulu", "stackllama", "plain"):
        ids, mask = tokenize_messages(template, msgs, tok)
        assert ids[0] == BOS and len(ids) == len(mask)
        assert [i for i, m in zip(ids, mask) if m] == enc(tok, "a c") + [EOS] + enc(tok, "a b") + [EOS]


# ----------------------------------------------------------------------------- packing
def test_packing_segments_and_positions(tok):
    rows = synthetic.sft_examples(40, 0)
    examples, _ = encode.tokenize_sft(rows, tok, "plain", 40)
    it = sft_iterator(rows, tok, seq_len=40, global_batch_size=4, template="plain", packing=True,
                      shuffle=False)
    assert it.stats["num_packed_rows"] < len(rows)
    seen = []
    for _ in range(len(it)):
        b = next(it)
        for r in range(4):
            seg, pos = b["segment_ids"][r], b["positions"][r]
            assert ((seg > 0) == (b["attention_mask"][r] == 1)).all()
            n_seg = seg.max()
            assert n_seg >= 2 or seen  # several examples share a row
            for s in range(1, n_seg + 1):
                where = np.nonzero(seg == s)[0]
                assert (np.diff(where) == 1).all()  # contiguous
                assert pos[where].tolist() == list(range(len(where)))  # positions restart
                assert b["loss_mask"][r, where[0]] == 0
                seen.append((b["input_ids"][r, where].tolist(), b["loss_mask"][r, where].tolist()))
            assert not pos[seg == 0].any()
    # every packed segment is one whole example (none split across rows)
    full = [(list(i), list(m)) for i, m in examples]
    assert all(s in full for s in seen)


def test_sft_truncation_and_text_format(tok):
    rows = [{"text": "sort: a b c d e f"}, {"prompt": "sort: " + "a " * 40, "completion": "a"}]
    it = sft_iterator(rows[:1] * 2, tok, seq_len=6, global_batch_size=2)
    b = next(it)
    assert b["attention_mask"].sum(1).tolist() == [6, 6]
    assert b["loss_mask"][0].tolist() == [0, 1, 1, 1, 1, 1]  # BOS is not a target
    assert it.stats["num_truncated"] == 2
    with pytest.raises(ValueError):  # the only example has no target after truncation
        sft_iterator(rows[1:], tok, seq_len=8, global_batch_size=1)


# ----------------------------------------------------------------------------- formats
def test_detect_format():
    assert detect_format(["messages"]) == "messages"
    assert detect_format(["prompt", "completion"]) == "prompt_completion"
    assert detect_format(["text", "id"]) == "text"
    assert detect_format(["prompt", "chosen", "rejected"]) == "preference"
    assert detect_format(["chosen", "rejected"]) == "implicit_preference"
    assert detect_format(["prompt", "responses", "scores"]) == "rrhf"
    assert detect_format(["prompt", "chosen", "rejected"], kind="prompts") == "prompt"
    with pytest.raises(ValueError, match="columns"):
        detect_format(["foo"])


def test_hh_implicit_prefix_split():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: sort c a\n\nAssistant: a c"
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: sort c a\n\nAssistant: c a"
    p, c, r = split_implicit(chosen, rejected)
    assert p == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: sort c a\n\nAssistant:"
    assert (c, r) == (" a c", " c a")
    # shared text running into the response still cuts at the last shared "Assistant:"
    p, c, r = split_implicit("\n\nHuman: q\n\nAssistant: yes sir", "\n\nHuman: q\n\nAssistant: yes no")
    assert p == "\n\nHuman: q\n\nAssistant:" and (c, r) == (" yes sir", " yes no")
    # three shared turns, responses differ only in the last turn
    p, c, r = split_implicit(chosen + "\n\nHuman: thanks\n\nAssistant: welcome",
                             chosen + "\n\nHuman: thanks\n\nAssistant: bye")
    assert p == chosen + "\n\nHuman: thanks\n\nAssistant:" and (c, r) == (" welcome", " bye")
    # responses that differ at the first answer keep their later turns whole
    p, c, r = split_implicit("\n\nHuman: q\n\nAssistant: x\n\nHuman: more\n\nAssistant: y",
                             "\n\nHuman: q\n\nAssistant: z")
    assert (p, c, r) == ("\n\nHuman: q\n\nAssistant:", " x\n\nHuman: more\n\nAssistant: y", " z")
    loaded = load_data([{"chosen": chosen, "rejected": rejected}], "preference")
    assert loaded.format == "implicit_preference"
    assert loaded.rows[0]["prompt"].endswith("Assistant:") and loaded.rows[0]["margin"] == 0.0
    msgs = [{"role": "user", "content": "q"}]
    loaded = load_data([{"chosen": msgs + [{"role": "assistant", "content": "x"}],
                         "rejected": msgs + [{"role": "assistant", "content": "y"}]}], "preference")
    assert loaded.rows[0] == {"prompt": msgs, "chosen": "x", "rejected": "y", "margin": 0.0}


def test_bad_rows_named_and_skipped(tok, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "p1", "completion": "c1"},
        {"prompt": "p2"},                                # line 2: missing field
        {"prompt": "p3", "completion": 7},               # line 3: not a string (an empty
                                                         # completion is fine: EOS alone)
        '{"prompt": "p4", "completion": ',               # line 4: invalid JSON
        {"prompt": "p5", "completion": "c5"},
    ])
    with pytest.raises(DataError) as e:
        load_data(path, "sft")
    assert "sft.jsonl" in str(e.value) and "line 2" in str(e.value) and "completion" in str(e.value)
    loaded = load_data(path, "sft", skip_bad_rows=True)
    assert loaded.num_bad == 3 and [r["prompt"] for r in loaded.rows] == ["p1", "p5"]
    assert any("line 4" in m and "invalid JSON" in m for m in loaded.bad_examples)
    assert any("line 3" in m and "must be a string" in m for m in loaded.bad_examples)
    good = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "p", "completion": "c"}] * 3 + ['{"prompt": 1'])
    with pytest.raises(DataError, match=r"ok\.jsonl: line 4: invalid JSON"):
        load_data(good, "sft")
    it = sft_iterator(str(path), tok, seq_len=16, global_batch_size=2, skip_bad_rows=True)
    assert it.stats["num_bad_rows"] == 3
    arr = tmp_path / "pref.json"
    arr.write_text(json.dumps([{"prompt": "p", "chosen": "a", "rejected": "b"},
                               {"prompt": "p", "chosen": "a"}]))
    with pytest.raises(DataError, match=r"pref\.json: row 2: missing field 'rejected'"):
        load_data(str(arr), "preference")


def test_parquet_via_datasets(tmp_path):
    import datasets

    rows = synthetic.preference_pairs(8, 0)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    loaded = load_data(str(tmp_path / "p.parquet"), "preference")
    assert loaded.format == "preference" and [r["chosen"] for r in loaded.rows] == [r["chosen"] for r in rows]


# ----------------------------------------------------------------------------- preference / rrhf / prompts
def test_preference_left_truncation_and_identical_drop(tok):
    long_prompt = "sort: " + " ".join("abcdefghijklmnop")
    rows = [{"prompt": long_prompt, "chosen": "a b c", "rejected": "c b a", "margin": 0.5}]
    it = preference_iterator(rows, tok, seq_len=10, global_batch_size=1)
    b = next(it)
    c = enc(tok, "a b c") + [EOS]
    p = [BOS] + enc(tok, long_prompt)
    ids = b["chosen_input_ids"][0].tolist()
    assert ids[0] == BOS and ids[-len(c):] == c  # response kept whole
    assert ids[1:-len(c)] == p[len(p) - (10 - 1 - len(c)):]  # prompt cut from the left
    assert b["chosen_loss_mask"][0].tolist() == [0] * (10 - len(c)) + [1] * len(c)
    assert b["margin"].tolist() == [0.5] and b["margin"].dtype == np.float32
    assert it.stats["num_truncated"] == 1
    # responses differing only after the cut become identical -> dropped and counted
    rows = [{"prompt": "sort: c a", "chosen": "a b c d e f g h", "rejected": "a b c d e f g i"},
            {"prompt": "sort: c a", "chosen": "a c", "rejected": "c a"}]
    it = preference_iterator(rows, tok, seq_len=6, global_batch_size=1)
    assert it.stats["num_dropped_identical"] == 1 and it.stats["num_examples"] == 1


def test_rrhf_batch_shapes(tok):
    rows = [{"prompt": "sort: c a", "responses": ["a c", "c a", "a"], "scores": [1.0, 0.5, 0.2]},
            {"prompt": "sort: b a", "responses": ["a b", "b a"], "scores": [1.0, 0.4]}]
    it = rrhf_iterator(rows, tok, seq_len=16, global_batch_size=2, template="tulu", shuffle=False)
    b = next(it)
    assert b["input_ids"].shape == b["attention_mask"].shape == b["loss_mask"].shape == (2, 3, 16)
    assert b["scores"].shape == b["valid"].shape == (2, 3) and b["scores"].dtype == np.float32
    assert b["valid"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["scores"][1].tolist() == pytest.approx([1.0, 0.4, 0.0])
    assert not b["attention_mask"][1, 2].any() and (b["input_ids"][1, 2] == PAD).all()
    assert b["loss_mask"][0, 0].sum() == len(enc(tok, "a c")) + 1


def test_prompt_left_padding(tok):
    rows = [{"prompt": "sort: c a"}, {"prompt": "sort: " + " ".join("abcdefghijklmnop")}]
    it = prompt_iterator(rows, tok, max_prompt_len=8, global_batch_size=2, shuffle=False)
    b = next(it)
    short = [BOS] + enc(tok, "sort: c a")
    assert b["input_ids"][0].tolist() == [PAD] * (8 - len(short)) + short
    assert b["attention_mask"][0].tolist() == [0] * (8 - len(short)) + [1] * len(short)
    long = enc(tok, rows[1]["prompt"])
    assert b["input_ids"][1].tolist() == [BOS] + long[-7:]  # cut from the left, BOS kept
    assert b["prompts"] == [r["prompt"] for r in rows]
    msgs = [{"messages": [{"role": "user", "content": "sort: c a"}, {"role": "assistant", "content": "a c"}]}]
    b = next(prompt_iterator(msgs, tok, max_prompt_len=16, global_batch_size=1, template="tulu"))
    assert b["prompts"] == ["<|user|>\nsort: c a\n<|assistant|>\n"]


def _gsm_rows(n=8):
    rows = [{"question": f"sort: {'abcdefgh'[i]} a", "answer": f"a {'abcdefgh'[i]} #### {i}", "id": i}
            for i in range(n)]
    del rows[3]["answer"]  # a row that lacks a field: None in its batch
    rows[5]["meta"] = {"level": [1, 2], "ok": True}
    return rows


def _check_columns(b, by_prompt):
    """Every batch row's columns are its own row's fields (None where the row lacks one)."""
    names = set().union(*(by_prompt[p] for p in b["prompts"]))
    assert set(b["columns"]) == names
    for k, vals in b["columns"].items():
        assert len(vals) == len(b["prompts"])
        assert vals == [by_prompt[p].get(k) for p in b["prompts"]]


def test_prompt_columns_through_iterator(tok, tmp_path):
    rows = _gsm_rows()
    path = write_jsonl(tmp_path / "gsm.jsonl", rows)
    src = {"path": path, "columns": {"question": "prompt"}}
    by_prompt = {r["question"]: {k: v for k, v in r.items() if k != "question"} for r in rows}
    loaded = load_data(src, "prompts")
    assert loaded.format == "prompt"
    assert loaded.rows[0] == {"prompt": "sort: a a", "columns": {"answer": "a a #### 0", "id": 0}}
    assert loaded.rows[3]["columns"] == {"id": 3}

    it = prompt_iterator(src, tok, max_prompt_len=8, global_batch_size=4, shuffle=False)
    b = next(it)
    assert b["prompts"] == [r["question"] for r in rows[:4]]
    assert b["columns"] == {"answer": ["a a #### 0", "a b #### 1", "a c #### 2", None], "id": [0, 1, 2, 3]}
    b = next(it)
    assert b["columns"]["meta"] == [None, {"level": [1, 2], "ok": True}, None, None]
    _check_columns(b, by_prompt)

    # shuffled, over epochs, and two simulated hosts: each host's columns follow its own prompts
    its = [prompt_iterator(src, tok, max_prompt_len=8, global_batch_size=4, seed=7,
                           process_index=i, process_count=2) for i in range(2)]
    for _ in range(5):
        bs = [next(x) for x in its]
        for b in bs:
            assert len(b["prompts"]) == 2 and b["input_ids"].shape == (2, 8)
            _check_columns(b, by_prompt)
        assert not set(bs[0]["prompts"]) & set(bs[1]["prompts"])


def test_prompt_columns_renames_and_plain_rows(tok, tmp_path):
    # a rename to a name other than prompt; the clashing original column gives way to it
    rows = [{"q": "sort: c a", "solution": "a c", "answer": "dropped"}, {"q": "sort: b a", "solution": "a b"}]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    b = next(prompt_iterator({"path": path, "columns": {"q": "prompt", "solution": "answer"}}, tok,
                             max_prompt_len=8, global_batch_size=2, shuffle=False))
    assert b["columns"] == {"answer": ["a c", "a b"]}
    # rows with no other fields (e.g. the synthetic source) give an empty dict
    b = next(prompt_iterator(synthetic.prompts(4, 0), tok, max_prompt_len=16, global_batch_size=4))
    assert b["columns"] == {} and len(b["prompts"]) == 4
    # values that are not JSON-like are left out
    assert load_data([{"prompt": "sort: a", "x": (1, 2), "y": b"z", "z": [1, None]}], "prompts"
                     ).rows[0]["columns"] == {"z": [1, None]}
    # other kinds are unchanged
    assert load_data([{"prompt": "p", "completion": "c", "id": 1}], "sft").rows[0] == {
        "prompt": "p", "completion": "c"}


def test_prompt_columns_messages_rows(tok):
    msgs = [{"messages": [{"role": "user", "content": "sort: c a"}, {"role": "assistant", "content": "a c"}],
             "answer": "a c", "id": 7},
            {"messages": [{"role": "user", "content": "sort: b a"}], "answer": "a b"}]
    loaded = load_data(msgs, "prompts")
    assert loaded.format == "messages"
    assert loaded.rows[0] == {"prompt": [{"role": "user", "content": "sort: c a"}],
                              "columns": {"answer": "a c", "id": 7}}
    b = next(prompt_iterator(msgs, tok, max_prompt_len=16, global_batch_size=2, template="tulu",
                             shuffle=False))
    assert b["prompts"][0] == "<|user|>\nsort: c a\n<|assistant|>\n"
    assert b["columns"] == {"answer": ["a c", "a b"], "id": [7, None]}


# ----------------------------------------------------------------------------- iterator
def _ident(items):
    return {"x": np.array(items, np.int32)}


def test_iterator_resume_exact():
    a = BatchIterator(list(range(50)), _ident, 8, seed=3)
    for _ in range(9):  # crosses an epoch boundary (6 batches per epoch)
        next(a)
    state = json.loads(json.dumps(a.get_state()))
    assert state == {"epoch": 1, "index": 3}
    want = [next(a)["x"].tolist() for _ in range(5)]
    b = BatchIterator(list(range(50)), _ident, 8, seed=3)
    b.set_state(state)
    assert [next(b)["x"].tolist() for _ in range(5)] == want
    e0 = [BatchIterator(list(range(50)), _ident, 8, seed=3).global_indices(e, 0).tolist() for e in (0, 1)]
    assert e0[0] != e0[1]  # reshuffled each epoch


def test_iterator_host_slices_and_epochs():
    items = list(range(20))
    full = BatchIterator(items, _ident, 4, seed=1)
    hosts = [BatchIterator(items, _ident, 4, seed=1, process_index=i, process_count=2) for i in range(2)]
    for _ in range(7):
        g = next(full)["x"].tolist()
        parts = [next(h)["x"].tolist() for h in hosts]
        assert len(parts[0]) == len(parts[1]) == 2 and parts[0] + parts[1] == g
    with pytest.raises(ValueError, match="divisible"):
        BatchIterator(items, _ident, 6, process_count=4)
    finite = BatchIterator(items, _ident, 6, num_epochs=2)
    assert len(list(finite)) == 6  # 3 full batches per epoch, remainder dropped


def test_columns_mapping(tmp_path):
    """data.columns renames source columns (stack-exchange-paired's question/response_j/response_k)."""
    from easyrl.data.formats import parse_columns
    rows = [{"qid": 1, "question": "sort: b a", "response_j": "a b", "response_k": "b a",
             "date": "2023"}] * 3
    path = write_jsonl(tmp_path / "se.jsonl", rows)
    cols = parse_columns("question:prompt, response_j:chosen,response_k:rejected")
    loaded = load_data({"path": str(path), "columns": cols}, "preference")
    assert loaded.format == "preference"
    assert loaded.rows[0] == {"prompt": "sort: b a", "chosen": "a b", "rejected": "b a", "margin": 0.0}
    sft = load_data({"path": str(path), "columns": parse_columns("question:prompt,response_j:completion")}, "sft")
    assert sft.format == "prompt_completion" and sft.rows[0]["completion"] == "a b"
    with pytest.raises(DataError, match=r"se\.jsonl: data.columns maps 'answer'"):
        load_data({"path": str(path), "columns": {"answer": "chosen"}}, "preference")
    for bad in ("question", "question:prompt,question:chosen", "a:prompt,b:prompt"):
        with pytest.raises(ValueError):
            parse_columns(bad)
    from easyrl.train import setup
    from easyrl.train.config import base_config, validate
    c = base_config("sft")
    c.data.train, c.data.columns = str(path), "question:prompt,response_j:completion"
    assert setup.data_source(c, "sft", "train")["columns"] == {"question": "prompt", "response_j": "completion"}
    c.data.columns, c.train.steps = "question=prompt", 10
    with pytest.raises(ValueError, match="config data.columns"):
        validate(c)
