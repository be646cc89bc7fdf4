"""Unpaired preference data (KTO): rows prompt / completion / label, paired rows unpaired, KL rows."""
import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from easyrl.data import (DataError, detect_format, load_data, load_tokenizer,  # noqa: E402
                         preference_iterator, sft_iterator, synthetic, tokenize_prompt_completion,
                         unpaired_iterator)
from easyrl.data import encode  # noqa: E402
from easyrl.data.reading import tag  # noqa: E402

BOS, EOS, PAD = 1, 2, 3
KEYS = {"completion_input_ids", "completion_attention_mask", "completion_loss_mask", "kl_input_ids",
        "kl_attention_mask", "kl_loss_mask", "label"}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(synthetic.synthetic_tokenizer_path())


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def row(prompt, completion, label):
    return {"prompt": prompt, "completion": completion, "label": label}


def pc(tok, prompt, completion, template="plain"):
    return tokenize_prompt_completion(template, prompt, completion, tok)


def all_batches(it):
    return [next(it) for _ in range(len(it))]


# ----------------------------------------------------------------------------- format
def test_detect_and_normalize():
    assert detect_format(["prompt", "completion", "label"]) == "unpaired"
    assert detect_format(["prompt", "completion", "label"], kind="unpaired") == "unpaired"
    assert detect_format(["prompt", "chosen", "rejected"], kind="unpaired") == "preference"
    assert detect_format(["chosen", "rejected"], kind="unpaired") == "implicit_preference"
    # other kinds are unaffected by a label column
    assert detect_format(["prompt", "completion", "label"], kind="sft") == "prompt_completion"
    assert detect_format(["prompt", "completion", "label"], kind="prompts") == "prompt"
    with pytest.raises(ValueError, match="cannot detect a preference format"):
        detect_format(["prompt", "completion", "label"], kind="preference")
    with pytest.raises(ValueError, match="format 'unpaired' is not a preference format"):
        load_data([row("p", "c", True)], "preference", format="unpaired")
    loaded = load_data([row("p", "c", True), row("q", "d", np.bool_(False))], "unpaired")
    assert loaded.format == "unpaired"
    assert loaded.rows == [row("p", "c", True), row("q", "d", False)]
    assert all(type(r["label"]) is bool for r in loaded.rows)


def test_batch_shapes_keys_and_masks_exact(tok, tmp_path):
    rows = [row("sort: c a", "a c", True), row("sort: b a", "a b", False),
            row("sort: d c b", "b c d", False), row("sort: e a", "a e", True)]
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    T = 20
    it = unpaired_iterator(path, tok, seq_len=T, global_batch_size=4, template="tulu", shuffle=False)
    assert it.stats["format"] == "unpaired" and it.stats["num_examples"] == 4
    assert (it.stats["num_desirable"], it.stats["num_undesirable"]) == (2, 2)
    assert it.stats["num_kl_same_prompt"] == 0 and it.stats["num_truncated"] == 0
    b = next(it)
    assert set(b) == KEYS
    for k, v in b.items():
        assert v.dtype == np.int32, k
        assert v.shape == ((4,) if k == "label" else (4, T)), k
    assert b["label"].tolist() == [1, 0, 0, 1]
    for i, r in enumerate(rows):
        p, c = pc(tok, r["prompt"], r["completion"], "tulu")
        assert p[0] == BOS and c[-1] == EOS
        n = len(p) + len(c)
        assert b["completion_input_ids"][i].tolist() == p + c + [PAD] * (T - n)
        assert b["completion_attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        assert b["completion_loss_mask"][i].tolist() == [0] * len(p) + [1] * len(c) + [0] * (T - n)
        # KL row: this prompt, the previous example's completion (all prompts differ)
        j = (i - 1) % 4
        _, cj = pc(tok, rows[j]["prompt"], rows[j]["completion"], "tulu")
        m = len(p) + len(cj)
        assert b["kl_input_ids"][i].tolist() == p + cj + [PAD] * (T - m)
        assert b["kl_attention_mask"][i].tolist() == [1] * m + [0] * (T - m)
        assert b["kl_loss_mask"][i].tolist() == [0] * len(p) + [1] * len(cj) + [0] * (T - m)


def test_kl_rows_pair_each_prompt_with_another_prompts_completion(tok):
    prompts = ["sort: a b", "sort: a b", "sort: c d", "sort: e f", "sort: e f", "sort: a b"]
    rows = [row(p, f"{'abcdef'[i]} x", i % 2 == 0) for i, p in enumerate(prompts)]
    examples, stats = encode.tokenize_unpaired(rows, tok, "plain", 32)
    # nearest previous (cyclic) example with a different prompt
    assert [ex["kl_from"] for ex in examples] == [4, 4, 1, 2, 2, 4]
    assert stats["num_kl_same_prompt"] == 0
    it = unpaired_iterator(rows, tok, seq_len=32, global_batch_size=6, shuffle=False)
    b = next(it)
    for i, ex in enumerate(examples):
        j = ex["kl_from"]
        assert j != i and prompts[j] != prompts[i]
        p, _ = pc(tok, prompts[i], rows[i]["completion"])
        _, cj = pc(tok, prompts[j], rows[j]["completion"])
        n = len(p) + len(cj)
        assert b["kl_input_ids"][i, :n].tolist() == p + cj and (b["kl_input_ids"][i, n:] == PAD).all()
        assert b["kl_loss_mask"][i].tolist() == [0] * len(p) + [1] * len(cj) + [0] * (32 - n)
    # every prompt the same: the previous example's completion, counted
    same = [row("sort: a b", c, True) for c in ("a b", "b a", "a")]
    examples, stats = encode.tokenize_unpaired(same, tok, "plain", 32)
    assert [ex["kl_from"] for ex in examples] == [2, 0, 1] and stats["num_kl_same_prompt"] == 3


def test_paired_rows_unpaired_automatically(tok, tmp_path):
    pairs = [{"prompt": "sort: c a", "chosen": "a c", "rejected": "c a", "margin": 1.0},
             {"prompt": "sort: c a", "chosen": "a c", "rejected": "a"},  # same prompt, another pair
             {"prompt": "sort: d b", "chosen": "b d", "rejected": "d b"},
             {"prompt": "sort: f e", "chosen": "e f", "rejected": ""}]   # empty: just EOS
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    loaded = load_data(path, "unpaired")
    assert loaded.format == "preference" and len(loaded.rows) == 8
    assert [r["label"] for r in loaded.rows] == [True, False] * 4
    assert [r["completion"] for r in loaded.rows[:2]] == ["a c", "c a"]
    it = unpaired_iterator(path, tok, seq_len=24, global_batch_size=8, shuffle=False)
    s = it.stats
    assert (s["num_examples"], s["num_pairs_unpaired"], s["num_desirable"], s["num_undesirable"]) == (8, 4, 4, 4)
    assert s["num_empty_responses"] == 1
    b = next(it)
    assert b["label"].tolist() == [1, 0] * 4
    for i, ex in enumerate(it.items):
        j = ex["kl_from"]
        assert j // 2 != i // 2  # never the same pair
        assert loaded.rows[j]["prompt"] != loaded.rows[i]["prompt"]
    last = b["completion_input_ids"][7][b["completion_loss_mask"][7] > 0].tolist()
    assert last == [EOS]
    # Anthropic-HH style whole conversations too
    hh = [{"chosen": f"\n\nHuman: sort {x}\n\nAssistant: {y}", "rejected": f"\n\nHuman: sort {x}\n\nAssistant: no"}
          for x, y in (("b a", "a b"), ("d c", "c d"))]
    it = unpaired_iterator(hh, tok, seq_len=32, global_batch_size=4, shuffle=False)
    assert it.stats["format"] == "implicit_preference" and it.stats["num_pairs_unpaired"] == 2
    assert [ex["kl_from"] for ex in it.items] == [3, 3, 1, 1]
    # a bad pair is named by its source row
    with pytest.raises(DataError, match=r"pairs2\.jsonl: line 2: missing field 'rejected'"):
        load_data(write_jsonl(tmp_path / "pairs2.jsonl", [pairs[0], {"prompt": "p", "chosen": "a"}]),
                  "unpaired")


def test_messages_prompts_and_completions(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort: c a"}]
    rows = [{"prompt": msgs, "completion": [{"role": "assistant", "content": "a c"}], "label": True},
            {"prompt": [{"role": "user", "content": "sort: b a"}], "completion": "b a", "label": False}]
    loaded = load_data(rows, "unpaired")
    assert loaded.rows[0] == {"prompt": msgs, "completion": "a c", "label": True}
    it = unpaired_iterator(rows, tok, seq_len=40, global_batch_size=2, template="tulu", shuffle=False)
    b = next(it)
    p, c = pc(tok, msgs, "a c", "tulu")
    assert p == [BOS] + tok.encode("<|system|>\nbe brief\n<|user|>\nsort: c a\n<|assistant|>\n",
                                   add_special_tokens=False)
    assert b["completion_input_ids"][0, :len(p) + len(c)].tolist() == p + c
    _, c1 = pc(tok, rows[1]["prompt"], "b a", "tulu")
    assert b["kl_input_ids"][0, :len(p) + len(c1)].tolist() == p + c1
    with pytest.raises(DataError, match="row 1: field 'completion': last message must be an assistant turn"):
        load_data([dict(rows[0], completion=msgs)], "unpaired")


def test_truncation_to_seq_len(tok):
    long_prompt = "sort: " + " ".join("abcdefghijklmnop")
    rows = [row(long_prompt, "a b c", True), row("sort: b a", "a b c d e f g h i j k l", False)]
    T = 10
    it = unpaired_iterator(rows, tok, seq_len=T, global_batch_size=2, shuffle=False)
    assert it.stats["num_truncated"] == 2 and it.stats["num_kl_truncated"] == 1
    b = next(it)
    assert (b["completion_attention_mask"].sum(1) == T).all()
    p, c = pc(tok, long_prompt, "a b c")
    ids = b["completion_input_ids"][0].tolist()
    assert ids[0] == BOS and ids[-len(c):] == c  # completion kept whole
    assert ids[1:-len(c)] == p[len(p) - (T - 1 - len(c)):]  # prompt cut from the left, BOS kept
    assert b["completion_loss_mask"][0].tolist() == [0] * (T - len(c)) + [1] * len(c)
    p1, c1 = pc(tok, "sort: b a", "a b c d e f g h i j k l")
    assert len(c1) > T  # longer than seq_len: just BOS and the completion's start remain
    assert b["completion_input_ids"][1].tolist() == [BOS] + c1[:T - 1]
    assert b["completion_loss_mask"][1].tolist() == [0] + [1] * (T - 1)
    assert b["kl_input_ids"][0].tolist() == [BOS] + c1[:T - 1]  # long prompt + the long completion
    assert len(p1) + len(c) < T  # short prompt + the short completion: fits, not cut
    assert b["kl_input_ids"][1].tolist() == p1 + c + [PAD] * (T - len(p1) - len(c))
    assert b["kl_loss_mask"][1].tolist() == [0] * len(p1) + [1] * len(c) + [0] * (T - len(p1) - len(c))
    # nothing of the completion left (seq_len 1 = just BOS): dropped and counted
    with pytest.raises(DataError, match=r"no examples left: dropped 2 of 2 rows \(2 no target tokens\)"):
        unpaired_iterator(rows, tok, seq_len=1, global_batch_size=1)


BAD = ["'label' must be true or false, got 'yes'", "'label' must be true or false, got 1",
       "'label' must be true or false, got None", "'label' must be true or false, got 'true'",
       "'label' must be true or false, got 0.0"]


def test_bad_labels_name_file_and_line(tok, tmp_path):
    good = row("sort: b a", "a b", True)
    lines = [good, {"prompt": "sort: b a", "completion": "a b"}, row("sort: c a", "a c", "yes"),
             row("p", "c", 1), '{"prompt": "p", "completion": "c", "label": null}',
             row("p", "c", "true"), row("p", "c", 0.0), row("sort: d a", "a d", False)]
    path = write_jsonl(tmp_path / "f.jsonl", lines)
    with pytest.raises(DataError) as e:
        load_data(path, "unpaired")
    assert str(e.value) == (f"{path}: line 2: missing 'label' (unpaired rows: prompt, completion, "
                            f"label true/false) (and 5 more bad rows)")
    for n, bad in enumerate(lines[2:7], start=3):
        one = write_jsonl(tmp_path / f"one{n}.jsonl", [good, good, bad])
        src = tag(one, "data.train")
        with pytest.raises(DataError) as e:
            load_data(src, "unpaired")
        assert str(e.value) == f"data.train {one}: line 3: {BAD[n - 3]}"
    loaded = load_data(path, "unpaired", skip_bad_rows=True)
    assert loaded.num_bad == 6 and [r["label"] for r in loaded.rows] == [True, False]
    assert loaded.bad_examples[1] == f"{path}: line 3: 'label' must be true or false, got 'yes'"
    it = unpaired_iterator(path, tok, seq_len=16, global_batch_size=2, skip_bad_rows=True)
    assert it.stats["num_bad_rows"] == 6 and it.stats["num_examples"] == 2


def test_missing_label_column_is_one_line_error(tok, tmp_path):
    path = write_jsonl(tmp_path / "nolabel.jsonl", [{"prompt": "sort: b a", "completion": "a b"}] * 3)
    src = tag(path, "data.train")
    for fmt in (None, "unpaired"):
        for skip in (False, True):
            with pytest.raises(DataError) as e:
                unpaired_iterator(src, tok, seq_len=16, global_batch_size=1, format=fmt, skip_bad_rows=skip)
            msg = str(e.value)
            assert msg.startswith(f"data.train {path}: the 'label' column is missing"), msg
            assert "\n" not in msg
    # the same file still is fine SFT data
    assert sft_iterator(path, tok, seq_len=16, global_batch_size=1).stats["num_examples"] == 3


def test_one_class_warning(tok, tmp_path, caplog):
    def warnings():
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "KTO" in r.getMessage()]
    for label, text in ((True, "desirable (label true): KTO sees no undesirable examples"),
                        (False, "undesirable (label false): KTO sees no desirable examples")):
        path = write_jsonl(tmp_path / f"{label}.jsonl", [row(f"sort: {c} a", f"a {c}", label) for c in "bcd"])
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            it = unpaired_iterator(tag(path, "data.train"), tok, seq_len=16, global_batch_size=1)
        assert warnings() == [f"data.train {path}: all 3 examples are {text} (TRL warns the same way)"]
        assert it.stats["num_examples"] == 3
        caplog.clear()
        with caplog.at_level(logging.WARNING):  # only process 0 says it
            unpaired_iterator(path, tok, seq_len=16, global_batch_size=2, process_index=1, process_count=2)
        assert warnings() == []
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        unpaired_iterator([row("sort: b a", "a b", True), row("sort: c a", "c a", False)], tok,
                          seq_len=16, global_batch_size=1)
    assert warnings() == []


def test_deterministic_across_constructions(tok):
    rows = []
    for r in synthetic.preference_pairs(12, 3):
        rows += [row(r["prompt"], r["chosen"], True), row(r["prompt"], r["rejected"], False)]
    its = [unpaired_iterator(rows, tok, seq_len=24, global_batch_size=4, seed=5) for _ in range(2)]
    assert its[0].items == its[1].items
    for a, b in zip(all_batches(its[0]), all_batches(its[1])):
        assert set(a) == KEYS and all((a[k] == b[k]).all() for k in KEYS)
    # resuming continues at the same batch
    it = unpaired_iterator(rows, tok, seq_len=24, global_batch_size=4, seed=5)
    next(it)
    fresh = unpaired_iterator(rows, tok, seq_len=24, global_batch_size=4, seed=5)
    fresh.set_state(it.get_state())
    a, b = next(it), next(fresh)
    assert all((a[k] == b[k]).all() for k in KEYS)


def test_existing_formats_unaffected(tok):
    pairs = [{"prompt": "sort: b a", "chosen": "a b", "rejected": "b a"}] * 2
    it = preference_iterator(pairs, tok, seq_len=16, global_batch_size=2)
    assert it.stats["format"] == "preference" and "chosen_input_ids" in next(it)
    rows = [row("sort: b a", "a b", True)] * 2  # a label column is just another column for SFT
    it = sft_iterator(rows, tok, seq_len=16, global_batch_size=2)
    assert it.stats["format"] == "prompt_completion"
