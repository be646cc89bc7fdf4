"""The synthetic letter-sorting task and its bundled tokenizer."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from easyrl.data import synthetic as S  # noqa: E402


def test_deterministic_by_seed():
    assert S.sft_examples(50, 3) == S.sft_examples(50, 3)
    assert S.preference_pairs(50, 3) == S.preference_pairs(50, 3)
    assert S.rrhf_examples(20, 3) == S.rrhf_examples(20, 3)
    assert S.prompts(50, 3) == S.prompts(50, 3)
    assert S.prompts(50, 3) != S.prompts(50, 4)


def test_rule_and_reward():
    assert S.target("sort: f b d a") == "a b d f"
    assert S.true_reward("sort: f b d a", "a b d f") == 1.0
    assert S.true_reward("sort: f b d a", "f b d a") < 1.0  # copy
    assert S.true_reward("sort: f b d a", "") == 0.0
    # graded: more of the rule satisfied -> more reward
    assert S.true_reward("sort: f b d a", "a b f d") > S.true_reward("sort: f b d a", "f d b a")
    for row in S.prompts(200, 0):
        p = row["prompt"]
        letters = S.parse_prompt(p)
        assert p.startswith("sort: ") and S.MIN_LEN <= len(letters) <= S.MAX_LEN
        assert len(set(letters)) == len(letters) and letters != sorted(letters)
        assert S.true_reward(p, S.target(p)) == 1.0


def test_preference_chosen_beats_rejected():
    for row in S.preference_pairs(500, 0):
        rc, rr = S.true_reward(row["prompt"], row["chosen"]), S.true_reward(row["prompt"], row["rejected"])
        assert rc == 1.0 and 0.0 <= rr < rc
        assert row["rejected"] != row["chosen"]
        assert set(row["rejected"].split()) <= set("abcdefghijklmnop")  # plausible: letters only


def test_sft_mixes_correct_and_wrong():
    rows = S.sft_examples(200, 1, correct_fraction=0.5)
    ok = [S.is_correct(r["prompt"], r["completion"]) for r in rows]
    assert sum(ok) == 100
    assert all(S.is_correct(r["prompt"], r["completion"]) for r in S.sft_examples(30, 1, correct_fraction=1.0))
    with pytest.raises(ValueError):
        S.sft_examples(3, 0, correct_fraction=1.5)


def test_rrhf_scores_are_true_reward():
    for row in S.rrhf_examples(100, 2, num_responses=4):
        assert len(row["responses"]) == len(row["scores"]) == 4
        assert row["scores"] == [S.true_reward(row["prompt"], r) for r in row["responses"]]
        assert sum(s == 1.0 for s in row["scores"]) == 1


def test_write_dataset_splits_disjoint(tmp_path):
    paths = S.write_dataset(str(tmp_path), n_train=300, n_eval=50, seed=0)
    assert set(paths) == {f"{k}_{s}" for k in ("sft", "preference", "rrhf", "prompts") for s in ("train", "eval")}

    def read(p):
        with open(p) as f:
            return [json.loads(line) for line in f]

    for kind in ("sft", "preference", "rrhf", "prompts"):
        train, ev = read(paths[f"{kind}_train"]), read(paths[f"{kind}_eval"])
        assert len(train) == 300 and len(ev) == 50
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in ev}


def test_tokenizer_asset_reproducible(tmp_path):
    out = S.train_synthetic_tokenizer(str(tmp_path / "spm.model"))
    with open(out, "rb") as a, open(S.synthetic_tokenizer_path(), "rb") as b:
        assert a.read() == b.read(), "bundled asset is stale: rerun train_synthetic_tokenizer()"


def test_tokenizer_ids_and_lengths():
    from easyrl.data import load_tokenizer, tokenize_prompt_completion

    tok = load_tokenizer(S.synthetic_tokenizer_path())
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert len(tok) <= 256
    letters = [tok.encode(c, add_special_tokens=False) for c in S.ALPHABET]
    assert all(len(ids) == 1 for ids in letters)  # each answer letter is one token
    for row in S.sft_examples(200, 0):
        p, c = tokenize_prompt_completion("tulu", row["prompt"], row["completion"], tok)
        assert len(c) <= 12 and len(p) + len(c) <= 32
        assert tok.unk_token_id not in p + c
