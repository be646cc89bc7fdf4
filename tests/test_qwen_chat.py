"""Qwen3 + ChatML end to end: a ChatML tokenizer built locally (byte-level BPE with Qwen's special
tokens and Qwen2.5-Instruct's chat template), `data.template=chat` rendering and loss masks on
token ids, then a short SFT and a short DPO run on a tiny random Qwen3 and its HF export."""
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from easyrl import checkpoint, cli
from easyrl import model as M
from easyrl.data import encode, synthetic, templates
from easyrl.data.iterator import preference_iterator, prompt_iterator, sft_iterator
from easyrl.data.tokenizer import load_tokenizer
from easyrl.train.metrics import read_metrics

from hf_models import make_causal_lm

# Qwen2.5-Instruct's `chat_template` (tokenizer_config.json of Qwen/Qwen2.5-*-Instruct), verbatim:
# ChatML turns, a default system prompt when the conversation has none, tool-call branches.
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
# the minimal ChatML form of the same turns (no default system prompt, no tools)
CHATML_SIMPLE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHAT_TEMPLATES = {"qwen2.5": QWEN25_CHAT_TEMPLATE, "chatml": CHATML_SIMPLE}
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # Qwen's order: ids n, n + 1, n + 2
# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2 / Qwen2.5 / Qwen3), then byte-level BPE
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
              r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SEQ_LEN = 48


def build_chatml_tokenizer(folder, chat_template=QWEN25_CHAT_TEMPLATE, vocab_size=384):
    """A Qwen-style tokenizer folder: byte-level BPE trained on the synthetic task's ChatML text
    (no network), special tokens after the BPE vocabulary as in Qwen, no BOS, pad
    <|endoftext|>, eos <|im_end|> (Qwen2.5-Instruct / Qwen3), tokenizer_class Qwen2Tokenizer."""
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                            pre_tokenizers, processors, trainers)
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.decoder = decoders.ByteLevel()
    system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    corpus = [f"system\n{system}\nuser\n{r['prompt']}\nassistant\n{r['completion']}\n"
              for r in synthetic.sft_examples(300, seed=7)]
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=None, unk_token=None,
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                  chat_template=chat_template)
    tok.save_pretrained(str(folder))
    cfg_path = os.path.join(str(folder), "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "Qwen2Tokenizer"  # what Qwen checkpoints name
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    return str(folder)


@pytest.fixture(scope="module", params=sorted(CHAT_TEMPLATES))
def chat_tok(request, tmp_path_factory):
    folder = build_chatml_tokenizer(tmp_path_factory.mktemp(f"tok_{request.param}"),
                                    CHAT_TEMPLATES[request.param])
    return request.param, folder, load_tokenizer(folder)


# ---- helpers: what the ids and masks must be, computed from the tokenizer alone ----------------
def enc(tok, text):
    return list(tok.encode(text, add_special_tokens=False))


def render(tok, messages, generation_prompt=False):
    return tok.apply_chat_template(messages, tokenize=False,
                                   add_generation_prompt=generation_prompt)


def expected_mask(tok, ids, messages):
    """1 exactly on each assistant turn's content ids and its <|im_end|>, found after the k-th
    `<|im_start|>assistant\\n` opener in `ids`."""
    opener = enc(tok, "<|im_start|>assistant\n")
    starts = [i + len(opener) for i in range(len(ids) - len(opener) + 1)
              if ids[i:i + len(opener)] == opener]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(starts) == len(answers)
    mask = [0] * len(ids)
    for s, a in zip(starts, answers):
        span = enc(tok, a) + [tok.eos_token_id]
        assert ids[s:s + len(span)] == span
        mask[s:s + len(span)] = [1] * len(span)
    return mask


def check_conversation(tok, ids, mask, messages):
    """ids = the whole rendered conversation except its final "\\n"; mask = assistant answers."""
    full = enc(tok, render(tok, messages))
    nl = enc(tok, "\n")
    assert ids == full[:len(ids)] and full[len(ids):] == nl
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # no BOS: Qwen has none
    assert list(mask) == expected_mask(tok, ids, messages)
    im_end = tok.eos_token_id
    for i, m in enumerate(mask):  # the "\n" after a target <|im_end|> is never a target
        if m and ids[i] == im_end and i + 1 < len(ids):
            assert ids[i + 1:i + 2] == nl and mask[i + 1] == 0


# ---- the tokenizer ----------------------------------------------------------------------------
def test_chatml_tokenizer_folder_loads_like_qwen(chat_tok):
    name, folder, tok = chat_tok
    assert type(tok).__name__.startswith("Qwen2Tokenizer")
    n = len(tok)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIALS] == [n - 3, n - 2, n - 1]
    assert tok.bos_token_id is None
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == n - 3
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == n - 1
    assert tok.chat_template == CHAT_TEMPLATES[name]
    # the special tokens are single ids in running text; byte-level BPE never needs an unk
    ids = enc(tok, "x<|im_start|>user\nsort: f b<|im_end|>\né 中")
    assert ids.count(n - 2) == 1 and ids.count(n - 1) == 1
    assert tok.decode(ids) == "x<|im_start|>user\nsort: f b<|im_end|>\né 中"
    msgs = [{"role": "user", "content": "sort: c a"}, {"role": "assistant", "content": "a c"}]
    head = "" if name == "chatml" else ("<|im_start|>system\nYou are Qwen, created by Alibaba "
                                        "Cloud. You are a helpful assistant.<|im_end|>\n")
    assert render(tok, msgs) == (head + "<|im_start|>user\nsort: c a<|im_end|>\n"
                                 "<|im_start|>assistant\na c<|im_end|>\n")
    assert templates.render_prompt("chat", "sort: c a", tok) == (
        head + "<|im_start|>user\nsort: c a<|im_end|>\n<|im_start|>assistant\n")


# ---- data.template=chat: rendering and loss masks on token ids --------------------------------
def test_chat_template_sft_rows_mask_only_assistant_turns(chat_tok, tmp_path):
    _, _, tok = chat_tok
    pc_rows = synthetic.sft_examples(4, seed=1)
    convs = [
        [{"role": "user", "content": "sort: f b d a"}, {"role": "assistant", "content": "a b d f"}],
        [{"role": "system", "content": "Sort the letters."},
         {"role": "user", "content": "sort: c a"}, {"role": "assistant", "content": "a c"},
         {"role": "user", "content": "sort: e d b"}, {"role": "assistant", "content": "b d e"}],
        [{"role": "user", "content": "sort: b a"}, {"role": "assistant", "content": "a b"},
         {"role": "user", "content": "again: d c"}, {"role": "assistant", "content": "c d"},
         {"role": "user", "content": "and: g e f"}, {"role": "assistant", "content": "e f g"}],
    ]
    # prompt / completion rows: [user prompt, assistant completion]
    for row in pc_rows:
        msgs = [{"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["completion"]}]
        ids, mask = encode.tokenize_sft_row(row, tok, "chat")
        check_conversation(tok, ids, mask, msgs)
        assert sum(mask) == len(enc(tok, row["completion"])) + 1
    for msgs in convs:
        ids, mask = templates.tokenize_messages("chat", msgs, tok)
        check_conversation(tok, ids, mask, msgs)
        # only assistant turns: no system / user content id is ever a target
        n_answers = sum(len(enc(tok, m["content"])) + 1 for m in msgs if m["role"] == "assistant")
        assert sum(mask) == n_answers
    # the iterator the trainer uses: the same ids and masks in the [B, T] batch, right padded
    for rows, expect in ((pc_rows, [[{"role": "user", "content": r["prompt"]},
                                     {"role": "assistant", "content": r["completion"]}]
                                    for r in pc_rows]),
                         ([{"messages": c} for c in convs], convs)):
        path = tmp_path / "sft.jsonl"
        synthetic.write_jsonl(str(path), rows)
        it = sft_iterator(str(path), tok, seq_len=2 * SEQ_LEN, global_batch_size=len(rows),
                          template="chat", shuffle=False)
        assert it.stats["num_truncated"] == 0
        b = next(it)
        for i, msgs in enumerate(expect):
            n = int(b["attention_mask"][i].sum())
            ids = b["input_ids"][i, :n].tolist()
            check_conversation(tok, ids, b["loss_mask"][i, :n].tolist(), msgs)
            assert (b["input_ids"][i, n:] == tok.pad_token_id).all()
            assert not b["loss_mask"][i, n:].any()


def test_chat_template_preference_and_prompt_rows(chat_tok, tmp_path):
    _, _, tok = chat_tok
    rows = synthetic.preference_pairs(6, seed=2)
    path = tmp_path / "pairs.jsonl"
    synthetic.write_jsonl(str(path), rows)
    it = preference_iterator(str(path), tok, seq_len=SEQ_LEN, global_batch_size=len(rows),
                             template="chat", shuffle=False)
    assert it.stats["num_truncated"] == 0
    b = next(it)
    for i, row in enumerate(rows):
        user = [{"role": "user", "content": row["prompt"]}]
        prompt_ids = enc(tok, render(tok, user, generation_prompt=True))
        for side in ("chosen", "rejected"):
            n = int(b[f"{side}_attention_mask"][i].sum())
            ids = b[f"{side}_input_ids"][i, :n].tolist()
            msgs = user + [{"role": "assistant", "content": row[side]}]
            check_conversation(tok, ids, b[f"{side}_loss_mask"][i, :n].tolist(), msgs)
            assert ids[:len(prompt_ids)] == prompt_ids
            assert ids[len(prompt_ids):] == enc(tok, row[side]) + [tok.eos_token_id]
    # prompt rows (PPO / GRPO / generation): the ChatML prompt with the assistant opener, left
    # padded, no BOS; a message prompt renders through the same template
    prompts = synthetic.prompts(3, seed=4) + [{"prompt": [
        {"role": "system", "content": "Sort."}, {"role": "user", "content": "sort: d a"}]}]
    path = tmp_path / "prompts.jsonl"
    synthetic.write_jsonl(str(path), prompts)
    b = next(prompt_iterator(str(path), tok, max_prompt_len=SEQ_LEN, global_batch_size=4,
                             template="chat", shuffle=False))
    opener = enc(tok, "<|im_start|>assistant\n")
    for i, row in enumerate(prompts):
        p = row["prompt"]
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else p
        text = render(tok, msgs, generation_prompt=True)
        want = enc(tok, text)
        n = int(b["attention_mask"][i].sum())
        assert b["input_ids"][i, SEQ_LEN - n:].tolist() == want
        assert want[-len(opener):] == opener
        assert want[0] == tok.convert_tokens_to_ids("<|im_start|>")
        assert (b["input_ids"][i, :SEQ_LEN - n] == tok.pad_token_id).all()
        assert b["prompts"][i] == (p if isinstance(p, str) else text)


# ---- SFT -> DPO on a tiny random Qwen3, then the HF export --------------------------------------
def _run(*argv):
    cli.main(list(argv))


def _common(out, steps, batch):
    return [f"--config.output_dir={out}", "--config.mesh=dp:1,fsdp:1,tp:1",
            "--config.data.eval=", "--config.data.template=chat", f"--config.train.steps={steps}",
            f"--config.train.batch_size={batch}", f"--config.train.seq_len={SEQ_LEN}",
            "--config.log.every=1", "--config.log.tensorboard=false",
            "--config.checkpoint.async_save=false"]


def _stored_config(run_dir):
    """(the model entry of the run's easyrl_config.json, the LlamaConfig read back from it).
    The file holds the HF-layout config plus runtime options: qk_norm / qkv_bias follow from
    model_type when it is read."""
    with open(os.path.join(str(run_dir), checkpoint.CONFIG_FILE)) as f:
        raw = json.load(f)["model"]
    return raw, checkpoint.read_model_config(str(run_dir))[0]


@pytest.mark.slow  # two trainers and an export: ~1 min on 2 CPU cores
def test_sft_then_dpo_on_tiny_qwen3_with_chatml(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM
    hf_dir = tmp_path / "qwen3"
    build_chatml_tokenizer(hf_dir)
    tok = load_tokenizer(str(hf_dir))
    pad, eos = tok.pad_token_id, tok.eos_token_id
    ref = make_causal_lm(str(hf_dir), seed=5, arch="qwen3", vocab_size=len(tok),
                         num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                         pad_token_id=pad, bos_token_id=pad, eos_token_id=eos)
    sft_data, pairs = tmp_path / "sft.jsonl", tmp_path / "pairs.jsonl"
    synthetic.write_jsonl(str(sft_data), synthetic.sft_examples(64, seed=0, correct_fraction=1.0))
    synthetic.write_jsonl(str(pairs), synthetic.preference_pairs(64, seed=3, split="train"))

    # SFT from the HF folder (its tokenizer files are picked up with it)
    sft_out = tmp_path / "sft"
    _run("sft", "--config", "configs/sft.py:tiny", *_common(sft_out, 30, 8),
         f"--config.model.path={hf_dir}", f"--config.data.train={sft_data}",
         "--config.optim.warmup=2")
    rows = read_metrics(str(sft_out))
    losses = [r["loss"] for r in rows]
    print(f"SFT qwen3/chatml: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(len(tok)), rel=0.15)  # random init: ~uniform
    assert np.mean(losses[-3:]) < 0.6 * losses[0]
    assert checkpoint.latest_step(str(sft_out)) == 30
    raw, stored = _stored_config(sft_out)
    assert raw["model_type"] == "qwen3" and raw["head_dim"] == 16
    assert stored.model_type == "qwen3" and stored.qk_norm is True and stored.qkv_bias is False
    assert stored.head_dim == 16 and stored.tie_word_embeddings is True
    assert stored.vocab_size == len(tok) and stored.eos_token_id == eos
    assert stored.bos_token_id == pad and stored.pad_token_id == pad
    run_tok = load_tokenizer(str(sft_out / "tokenizer"))  # the run keeps the ChatML tokenizer
    assert run_tok.chat_template == QWEN25_CHAT_TEMPLATE and run_tok.eos_token_id == eos

    # DPO from the SFT run (policy and reference), chat template on the pairs
    dpo_out = tmp_path / "dpo"
    _run("dpo", "--config", "configs/dpo.py:tiny", *_common(dpo_out, 12, 8),
         f"--config.model.path={sft_out}", f"--config.data.train={pairs}",
         "--config.optim.warmup=0")
    rows = read_metrics(str(dpo_out))
    assert len(rows) == 12
    print("DPO qwen3/chatml (loss, margin):",
          [(round(r["loss"], 4), round(r["rewards/margins"], 4)) for r in rows])
    for r in rows:
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
            assert math.isfinite(r[k]), (r["step"], k)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert abs(rows[0]["rewards/margins"]) < 1e-5
    assert np.mean([r["loss"] for r in rows[-3:]]) < math.log(2) - 0.02
    assert np.mean([r["rewards/margins"] for r in rows[-3:]]) > 0
    assert checkpoint.latest_step(str(dpo_out)) == 12
    raw, stored = _stored_config(dpo_out)
    assert raw["model_type"] == "qwen3" and stored.qk_norm is True and stored.head_dim == 16
    config, kind, params = checkpoint.load_model(str(dpo_out))
    assert kind == "causal_lm" and config.model_type == "qwen3" and config.qk_norm

    # HF export: transformers loads a Qwen3ForCausalLM that computes easyrl's logits
    export = tmp_path / "export"
    _run("convert", "easyrl-to-hf", "--ckpt", str(dpo_out), "--out", str(export))
    with open(export / "config.json") as f:
        hf_cfg = json.load(f)
    assert hf_cfg["model_type"] == "qwen3" and hf_cfg["architectures"] == ["Qwen3ForCausalLM"]
    assert hf_cfg["head_dim"] == 16 and hf_cfg["tie_word_embeddings"] is True
    assert hf_cfg["eos_token_id"] == eos and hf_cfg["pad_token_id"] == pad
    model = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    assert isinstance(model, Qwen3ForCausalLM)
    exp_tok = AutoTokenizer.from_pretrained(str(export))
    assert exp_tok.chat_template == QWEN25_CHAT_TEMPLATE
    b = next(preference_iterator(str(pairs), tok, seq_len=SEQ_LEN, global_batch_size=4,
                                 template="chat", shuffle=False))
    ids, mask = b["chosen_input_ids"], b["chosen_attention_mask"]
    assert enc(exp_tok, tok.decode(ids[0][mask[0] > 0])) == ids[0][mask[0] > 0].tolist()
    with torch.no_grad():
        want = model(torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).logits.float().numpy()
        before = ref(torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).logits.float().numpy()
    got = np.asarray(M.forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    m = mask > 0
    assert np.abs(got - want)[m].max() <= 1e-4
    assert np.abs(want - before)[m].max() > 1e-2  # the export carries the trained weights


# Qwen3's template in the part that matters here: the assistant turn after the last user query
# opens with an (empty) <think></think> block, the earlier turns do not (as the real template
# renders an empty reasoning_content), so renderings of a conversation's prefixes are not
# prefixes of its full rendering
QWEN3_LIKE_TEMPLATE = (
    "{%- for message in messages %}{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{%- if loop.last %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{{- message.content + '<|im_end|>\\n' }}{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_qwen3_style_template_multi_turn_masks_by_content(tmp_path):
    """A template that is not incremental (Qwen3's think block on the last turn): the assistant
    turns are located by their content in the one rendering; each target runs from the end of
    that turn's generation prompt through its <|im_end|>; system / user turns are never
    targets."""
    tok = load_tokenizer(build_chatml_tokenizer(tmp_path / "tok3", QWEN3_LIKE_TEMPLATE))
    msgs = [{"role": "user", "content": "sort: c a"}, {"role": "assistant", "content": "a c"},
            {"role": "user", "content": "sort: e d b"}, {"role": "assistant", "content": "b d e"}]
    ids, mask = templates.tokenize_messages("chat", msgs, tok)
    text = render(tok, msgs)
    assert text.count("<think>") == 1
    assert tok.decode(ids) == text[:-1]  # the whole rendering but its final "\n"
    # the targets: what the model emits after each turn's generation prompt (the last turn's
    # empty think block included, as Qwen3 answers in non-thinking mode), answers + <|im_end|>
    targets = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(targets) == "a c<|im_end|><think>\n\n</think>\n\nb d e<|im_end|>"
    rest = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "think" not in rest and "sort: e d b" in rest and "a c" not in rest
    # one turn: the same rule (the template is incremental there)
    ids1, mask1 = templates.tokenize_messages("chat", msgs[:2], tok)
    assert tok.decode([i for i, m in zip(ids1, mask1) if m]) == \
        "<think>\n\n</think>\n\na c<|im_end|>"
    # prompts for generation: the conversation so far plus the assistant opener
    assert templates.render_prompt("chat", msgs[:3], tok) == render(tok, msgs[:3], True)
