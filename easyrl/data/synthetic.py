"""A tiny synthetic RLHF task: sort the letters.

Rule
----
A prompt is ``"sort: " + letters`` where ``letters`` are 3..6 *distinct* letters from ``a..p``
separated by single spaces, e.g. ``"sort: f b d a"``. The correct answer is the same letters in
alphabetical order, space separated: ``"a b d f"``. A 2-layer LLaMA with hidden 64 learns this in
a few hundred CPU steps (each output letter is "the smallest input letter after the previous one").

Wrong-but-plausible answers ("close" answers) are: a copy of the input order, the sorted answer
with two adjacent letters swapped, with one letter dropped, with one letter replaced by a letter
not in the prompt, with one letter duplicated, or in descending order.

``true_reward(prompt, response)`` is graded in [0, 1] so RL gets a signal:

    reward = 0.5 * content + 0.5 * order
    content = |multiset(response) & multiset(target)| / max(len(response), len(target))
    order   = #{i : response[i] == target[i]} / max(len(response), len(target))

where ``response`` is the whitespace-split response (anything after a stray EOS text is ignored).
The reward is 1.0 exactly when the response is the sorted answer, and < 1 otherwise.

Datasets are deterministic functions of ``(n, seed)``. Prompts are assigned to a ``split`` by a
hash of the prompt text (1 in 8 prompts are "eval"), so train and eval never share a prompt.

The tokenizer shipped in ``assets/synthetic_spm.model`` is a sentencepiece BPE model trained on
this task's text rendered through the ``plain``, ``tulu`` and ``stackllama`` templates;
``train_synthetic_tokenizer`` rebuilds it. Ids: unk=0, bos=1, eos=2, pad=3 (LLaMA-like).
"""

from __future__ import annotations

import json
import os
import random
import string
import zlib
from collections import Counter

ALPHABET = "abcdefghijklmnop"
MIN_LEN, MAX_LEN = 3, 6
PREFIX = "sort: "
_EVAL_MOD = 8  # 1 in _EVAL_MOD prompts belongs to the eval split

SPLITS = (None, "train", "eval")

_ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
TOKENIZER_FILE = "synthetic_spm.model"


# ----------------------------------------------------------------------------- rule
def parse_prompt(prompt: str) -> list[str]:
    """Letters of a prompt (text after the last ``"sort:"``), whitespace split."""
    i = prompt.rfind("sort:")
    body = prompt[i + len("sort:"):] if i >= 0 else prompt
    return body.split()


def target(prompt: str) -> str:
    """The correct answer for a prompt: its letters sorted, space separated."""
    return " ".join(sorted(parse_prompt(prompt)))


def true_reward(prompt: str, response: str) -> float:
    """Graded reward in [0, 1]: 0.5 * content overlap + 0.5 * positional match (see module doc)."""
    gold = sorted(parse_prompt(prompt))
    resp = response.split("</s>")[0].split()
    denom = max(len(resp), len(gold))
    if denom == 0:
        return 0.0
    content = sum((Counter(resp) & Counter(gold)).values()) / denom
    order = sum(a == b for a, b in zip(resp, gold)) / denom
    return float(0.5 * content + 0.5 * order)


def is_correct(prompt: str, response: str) -> bool:
    return true_reward(prompt, response) == 1.0


# ----------------------------------------------------------------------------- generation
def _split_of(prompt: str) -> str:
    return "eval" if zlib.crc32(prompt.encode()) % _EVAL_MOD == 0 else "train"


def _sample_prompt(rng: random.Random, split: str | None) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    while True:
        k = rng.randint(MIN_LEN, MAX_LEN)
        letters = rng.sample(ALPHABET, k)
        if letters == sorted(letters):  # keep the copy answer wrong
            continue
        p = PREFIX + " ".join(letters)
        if split is None or _split_of(p) == split:
            return p


_BAD_KINDS = ("copy", "swap", "drop", "replace", "duplicate", "descending", "truncate", "suffix",
              "subset", "insert", "repeat", "random")
VERSION = 5  # bump when generated data changes (cached datasets are keyed by it)


def _bad_answer(rng: random.Random, prompt: str, kind: str | None = None) -> str:
    """A plausible wrong answer for ``prompt`` (never the correct one)."""
    letters = parse_prompt(prompt)
    gold = sorted(letters)
    while True:
        k = kind or rng.choice(_BAD_KINDS)
        ans = list(gold)
        if k == "copy":
            ans = list(letters)
        elif k == "swap":
            i = rng.randrange(len(ans) - 1)
            ans[i], ans[i + 1] = ans[i + 1], ans[i]
        elif k == "drop":
            del ans[rng.randrange(len(ans))]
        elif k == "replace":
            ans[rng.randrange(len(ans))] = rng.choice([c for c in ALPHABET if c not in gold])
        elif k == "duplicate":
            i = rng.randrange(len(ans))
            ans.insert(i, ans[i])
        elif k == "truncate":  # a short prefix of the answer
            ans = gold[:rng.randint(1, max(1, len(gold) - 2))]
        elif k == "suffix":  # the answer with its first letters missing
            ans = gold[rng.randint(1, len(gold) - 1):]
        elif k == "subset":  # a sorted subsequence missing some letters
            ans = sorted(rng.sample(gold, rng.randint(1, len(gold) - 1)))
        elif k == "insert":  # an extra letter not in the prompt, in sorted position
            ans = sorted(gold + [rng.choice([c for c in ALPHABET if c not in gold])])
        elif k == "repeat":  # one letter stuttered 2-4 extra times
            i = rng.randrange(len(ans))
            ans[i:i] = [ans[i]] * rng.randint(2, 4)
        elif k == "random":  # random letters, random length
            ans = rng.sample(ALPHABET, rng.randint(1, MAX_LEN))
        else:  # descending
            ans = gold[::-1]
        if ans != gold:
            return " ".join(ans)
        kind = None  # e.g. "copy" of an already sorted prompt: try another kind


def prompts(n: int, seed: int, split: str | None = None) -> list[dict]:
    """``n`` rows ``{"prompt"}``."""
    rng = random.Random(f"prompts-{seed}")
    return [{"prompt": _sample_prompt(rng, split)} for _ in range(n)]


def sft_examples(n: int, seed: int, correct_fraction: float = 0.5,
                 split: str | None = None) -> list[dict]:
    """``n`` rows ``{"prompt", "completion"}``; exactly ``round(n * correct_fraction)`` correct.

    The rest are close-but-wrong answers, so a policy trained on this is imperfect.
    """
    if not 0.0 <= correct_fraction <= 1.0:
        raise ValueError(f"correct_fraction must be in [0, 1], got {correct_fraction}")
    rng = random.Random(f"sft-{seed}")
    good = set(rng.sample(range(n), int(round(n * correct_fraction))))
    rows = []
    for i in range(n):
        p = _sample_prompt(rng, split)
        c = target(p) if i in good else _bad_answer(rng, p)
        rows.append({"prompt": p, "completion": c})
    return rows


def preference_pairs(n: int, seed: int, split: str | None = None) -> list[dict]:
    """``n`` rows ``{"prompt", "chosen", "rejected"}``: chosen is correct, rejected is close but wrong."""
    rng = random.Random(f"pref-{seed}")
    rows = []
    for _ in range(n):
        p = _sample_prompt(rng, split)
        rows.append({"prompt": p, "chosen": target(p), "rejected": _bad_answer(rng, p)})
    return rows


def rrhf_examples(n: int, seed: int, num_responses: int = 4, split: str | None = None) -> list[dict]:
    """``n`` rows ``{"prompt", "responses": [N], "scores": [N]}``; one correct, scores = true reward."""
    if num_responses < 2:
        raise ValueError("num_responses must be >= 2")
    rng = random.Random(f"rrhf-{seed}")
    rows = []
    for _ in range(n):
        p = _sample_prompt(rng, split)
        resp = [target(p)] + [_bad_answer(rng, p) for _ in range(num_responses - 1)]
        rng.shuffle(resp)
        rows.append({"prompt": p, "responses": resp, "scores": [true_reward(p, r) for r in resp]})
    return rows


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def write_dataset(directory: str, n_train: int = 4000, n_eval: int = 256, seed: int = 0) -> dict:
    """Write ``{sft,preference,rrhf,prompts}_{train,eval}.jsonl`` into ``directory``.

    Train rows use ``seed`` and the train split; eval rows use ``seed + 1`` and the eval split
    (no prompt is shared). Returns ``{"sft_train": path, ...}``.
    """
    os.makedirs(directory, exist_ok=True)
    makers = {"sft": sft_examples, "preference": preference_pairs, "rrhf": rrhf_examples,
              "prompts": prompts}
    paths = {}
    for kind, fn in makers.items():
        for split, n, s in (("train", n_train, seed), ("eval", n_eval, seed + 1)):
            path = os.path.join(directory, f"{kind}_{split}.jsonl")
            write_jsonl(path, fn(n, s, split=split))
            paths[f"{kind}_{split}"] = path
    return paths


# ----------------------------------------------------------------------------- tokenizer
def synthetic_tokenizer_path() -> str:
    """Path of the bundled sentencepiece model for this task."""
    return os.path.join(_ASSET_DIR, TOKENIZER_FILE)


def _tokenizer_corpus() -> list[str]:
    """Task text as the templates render it (prompt and answer as separate sentences too)."""
    lines = []
    for row in sft_examples(1500, seed=12345, correct_fraction=0.5):
        p, c = row["prompt"], row["completion"]
        lines += [p, c, f"<|user|>\n{p}\n<|assistant|>\n", f"Question: {p}\n\nAnswer: ",
                  f"<|user|>\n{p}\n<|assistant|>\n{c}", f"Question: {p}\n\nAnswer: {c}",
                  f"\n\nHuman: {p}\n\nAssistant: {c}"]
    # every printable ASCII character, so arbitrary English text never maps to <unk>
    lines += list(string.ascii_letters + string.digits + string.punctuation)
    return lines


def train_synthetic_tokenizer(out_path: str | None = None, vocab_size: int = 160) -> str:
    """Train (deterministically) the synthetic sentencepiece BPE model and write it to ``out_path``.

    Defaults to the bundled asset path. Pieces: unk=0 ``<unk>``, bos=1 ``<s>``, eos=2 ``</s>``,
    pad=3 ``<pad>``; the newline is a user-defined piece so templates with ``\\n`` round-trip.
    """
    import io

    import sentencepiece as spm

    out_path = out_path or synthetic_tokenizer_path()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tokenizer_corpus()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        byte_fallback=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "wb") as f:
        f.write(buf.getvalue())
    return out_path
