"""Data that real users have: empty completions train as EOS alone in every format (KTO's
unpaired rows and HH-RLHF's empty final turns included), BOS follows the tokenizer, chat-template
keyword arguments reach apply_chat_template, and prompts longer than max_prompt_len are never cut
silently."""
import json

import pytest

from easyrl.data import encode, formats, load_tokenizer, synthetic, templates
from easyrl.data.iterator import prompt_iterator, unpaired_iterator


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(synthetic.synthetic_tokenizer_path())


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _targets(ids, mask):
    return [t for t, m in zip(ids, mask) if m]


HH_EMPTY = {"chosen": "\n\nHuman: sort: b a\n\nAssistant: a b",
            "rejected": "\n\nHuman: sort: b a\n\nAssistant:"}  # an empty final assistant turn
MSGS_EMPTY = {"chosen": [{"role": "user", "content": "sort: b a"},
                         {"role": "assistant", "content": "a b"}],
              "rejected": [{"role": "user", "content": "sort: b a"},
                           {"role": "assistant", "content": ""}]}


def test_empty_completion_is_eos_alone_in_every_format(tok, tmp_path):
    eos = tok.eos_token_id
    # SFT: prompt / completion, and a messages row whose assistant turn is empty
    for name, row in (("pc", {"prompt": "sort: b a", "completion": ""}),
                      ("msgs", {"messages": [{"role": "user", "content": "sort: c a"},
                                             {"role": "assistant", "content": " "}]})):
        sft = formats.load_data(_jsonl(tmp_path / f"sft_{name}.jsonl", [row]), "sft")
        ex, stats = encode.tokenize_sft(sft.rows, tok, "plain", 64)
        assert [_targets(ids, m) for ids, m in ex] == [[eos]], name
        assert stats["num_empty_responses"] == 1
    # preference: explicit, HH-RLHF implicit strings, implicit messages
    for name, rows in (("pref", [{"prompt": "sort: b a", "chosen": "a b", "rejected": ""}]),
                       ("hh", [HH_EMPTY]), ("msgs", [MSGS_EMPTY])):
        pref = formats.load_data(_jsonl(tmp_path / f"{name}.jsonl", rows), "preference")
        ex, stats = encode.tokenize_preference(pref.rows, tok, "plain", 64)
        assert _targets(ex[0]["rejected"], ex[0]["rejected_mask"]) == [eos], name
        assert stats["num_empty_responses"] == 1, name
    # RRHF: an empty response among the ranked ones
    rr = formats.load_data(_jsonl(tmp_path / "rr.jsonl", [
        {"prompt": "sort: b a", "responses": ["a b", ""], "scores": [1.0, 0.0]}]), "rrhf")
    ex, stats = encode.tokenize_rrhf(rr.rows, tok, "plain", 64)
    assert _targets(*ex[0]["seqs"][1]) == [eos] and stats["num_empty_responses"] == 1


@pytest.mark.parametrize("rows", [
    [{"prompt": "sort: b a", "completion": "", "label": False},
     {"prompt": "sort: c a", "completion": "a c", "label": True}],
    [{"prompt": [{"role": "user", "content": "sort: b a"}],
      "completion": [{"role": "assistant", "content": ""}], "label": False},
     {"prompt": [{"role": "user", "content": "sort: c a"}],
      "completion": [{"role": "assistant", "content": "a c"}], "label": True}],
    [HH_EMPTY, MSGS_EMPTY],  # paired HH-RLHF rows split into KTO's unpaired rows
], ids=["unpaired", "unpaired_messages", "hh_rlhf_pairs"])
def test_kto_trains_on_empty_completions(tok, tmp_path, rows):
    paired = "chosen" in rows[0]
    n = 2 * len(rows) if paired else len(rows)
    it = unpaired_iterator(_jsonl(tmp_path / "kto.jsonl", rows), tok, seq_len=64,
                           global_batch_size=n, template="plain", shuffle=False)
    assert it.stats["num_empty_responses"] == (2 if paired else 1)
    assert it.stats["num_examples"] == n  # nothing dropped
    batch = next(it)
    targets = [[int(t) for t in _targets(i, m)] for i, m in zip(batch["completion_input_ids"],
                                                                batch["completion_loss_mask"])]
    empty = [j for j, x in enumerate(targets) if x == [tok.eos_token_id]]
    assert len(empty) == (2 if paired else 1)
    assert all(batch["label"][j] == 0 for j in empty)  # the empty answers were the bad ones


def _no_bos_tokenizer(tmp_path, tok):
    from transformers import AutoTokenizer
    d = tmp_path / "nobos"
    tok.save_pretrained(str(tmp_path / "bos"))
    AutoTokenizer.from_pretrained(str(tmp_path / "bos"), add_bos_token=False).save_pretrained(
        str(d))
    t = AutoTokenizer.from_pretrained(str(d))  # the saved config keeps add_bos_token=False
    assert t.bos_token_id is not None and t("a b")["input_ids"][0] != t.bos_token_id
    return t, str(d)


def test_bos_follows_the_tokenizer(tok, tmp_path):
    nobos, _ = _no_bos_tokenizer(tmp_path, tok)
    assert templates.adds_bos(tok) and not templates.adds_bos(nobos)
    for t in (tok, nobos):
        p, c = templates.tokenize_prompt_completion("plain", "sort: b a", "a b", t)
        assert p == t("sort: b a")["input_ids"]
        ex, _ = encode.tokenize_sft([{"text": "sort: b a"}], t, "plain", 64)
        assert (ex[0][0][0] == t.bos_token_id) == (t is tok)
        assert templates.tokenize_prompt("plain", "sort: c a", t) == t("sort: c a")["input_ids"]


CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined and not "
        "enable_thinking %}<think></think>{% endif %}{% endif %}")


def test_template_kwargs_reach_apply_chat_template(tmp_path):
    from easyrl.train import launch, setup
    t = load_tokenizer(synthetic.synthetic_tokenizer_path())
    t.chat_template = CHAT
    t.save_pretrained(str(tmp_path / "chat_tok"))
    msgs = [{"role": "user", "content": "sort: b a"}]
    plain = templates.tokenize_prompt("chat", msgs, t)
    c = launch.parse_config("sft", ["--config", "configs/sft.py:tiny",
                                    f"--config.tokenizer.path={tmp_path / 'chat_tok'}",
                                    '--config.data.template_kwargs={"enable_thinking": false}'])
    kw = setup.load_tokenizer(c)
    thinking_off = templates.tokenize_prompt("chat", msgs, kw)
    assert thinking_off != plain
    assert kw.decode(thinking_off).endswith("<think></think>")
    with pytest.raises(ValueError, match="config data.template_kwargs"):
        templates.parse_template_kwargs("[1, 2]")
    with pytest.raises(ValueError, match="config data.template_kwargs: not JSON"):
        templates.parse_template_kwargs("{enable_thinking: false}")


def test_long_prompts_are_counted_or_refused(tok, tmp_path):
    rows = [{"prompt": "sort: " + " ".join("abcdefghijklmnopqrstuvwxyz")}, {"prompt": "sort: b a"}]
    src = _jsonl(tmp_path / "p.jsonl", rows)
    it = prompt_iterator(src, tok, max_prompt_len=16, global_batch_size=2)
    assert it.stats["num_truncated"] == 1
    with pytest.raises(formats.DataError, match=r"prompt row 0 has \d+ tokens, more than config "
                                                r"grpo.max_prompt_len=16"):
        prompt_iterator(src, tok, max_prompt_len=16, global_batch_size=2, truncate="error",
                        max_prompt_len_key="grpo.max_prompt_len")
