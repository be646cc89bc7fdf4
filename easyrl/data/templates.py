"""Prompt templates and template-aware tokenization with prompt masking.

Templates (``TEMPLATES``):
  * ``tulu``:       ``<|user|>\\n{prompt}\\n<|assistant|>\\n{answer}</s>`` (the newline after the
                    assistant tag matters). Multi-turn: ``<|system|>\\n..\\n``, ``<|user|>\\n..\\n``,
                    ``<|assistant|>\\n{answer}</s>\\n``.
  * ``stackllama``: ``Question: {prompt}\\n\\nAnswer: {answer}</s>``.
  * ``plain``:      ``{prompt}{answer}</s>`` (prompt and answer tokenized separately, no separator).
  * ``chat``:       the tokenizer's own ``chat_template`` (``apply_chat_template``).

``</s>`` stands for the EOS *id* (``tokenizer.eos_token_id``), appended after every answer, never
the literal text. A conversation (``messages``: list of ``{"role", "content"}`` with roles
``system``/``user``/``assistant``) is rendered to segments ``(text, is_target)``; only assistant
turns (and their EOS) are targets. Each segment is tokenized on its own (``add_special_tokens=
False``) and the ids concatenated; BOS is prepended when the tokenizer has one and the rendered
text does not already start with it.
"""

from __future__ import annotations

from typing import Sequence

TEMPLATES = ("tulu", "stackllama", "plain", "chat")
ROLES = ("system", "user", "assistant")

Messages = Sequence[dict]
# A rendered segment: (text, is_target, append_eos_id)
Segment = tuple[str, bool, bool]


def check_template(template: str) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known templates: {', '.join(TEMPLATES)}")
    return template


def _as_messages(prompt_or_messages: str | Messages) -> list[dict]:
    if isinstance(prompt_or_messages, str):
        return [{"role": "user", "content": prompt_or_messages}]
    return [dict(m) for m in prompt_or_messages]


# ---------------------------------------------------------------------------- own templates
_TURN = {  # template -> role -> (text before content, text after content)
    "tulu": {"system": ("<|system|>\n", "\n"), "user": ("<|user|>\n", "\n"),
             "assistant": ("<|assistant|>\n", "\n")},
    "stackllama": {"system": ("", "\n\n"), "user": ("Question: ", "\n\nAnswer: "),
                   "assistant": ("", "\n\n")},
    "plain": {"system": ("", "\n"), "user": ("", ""), "assistant": ("", "")},
}


def _own_segments(template: str, messages: Messages, generation_prompt: bool) -> list[Segment]:
    turns = _TURN[template]
    segs: list[Segment] = []
    pending = ""  # non-target text waiting to be emitted
    for m in messages:
        role, content = m["role"], m["content"]
        before, after = turns[role]
        if role == "assistant":
            segs.append((pending + before, False, False))
            segs.append((content, True, True))
            pending = after
        else:
            pending += before + content + after
    if generation_prompt and (not messages or messages[-1]["role"] != "assistant"):
        pending += turns["assistant"][0]
        segs.append((pending, False, False))
    elif pending and not segs:
        segs.append((pending, False, False))
    return [s for s in segs if s[0] or s[2]]


# ---------------------------------------------------------------------------- chat template
def parse_template_kwargs(value, key: str = "data.template_kwargs") -> dict:
    """``data.template_kwargs`` (TRL's ``chat_template_kwargs``): a dict, or a JSON object string
    from the command line (``'{"enable_thinking": false}'``); "" = none."""
    import json
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"config {key}: not JSON ({e.msg} at character {e.pos}): "
                             f"{value!r}") from None
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"config {key}: must be a JSON object of keyword arguments for "
                         f"apply_chat_template, got {value!r}")
    return dict(value)


def set_template_kwargs(tokenizer, kwargs: dict):
    """Attach the keyword arguments every ``apply_chat_template`` call of this run passes (e.g.
    ``enable_thinking=False`` for Qwen3), to the run's tokenizer: training, scoring,
    generation and evaluation all render through `_apply_chat`. Returns the tokenizer."""
    tokenizer._easyrl_template_kwargs = dict(kwargs or {})
    return tokenizer


def _apply_chat(tokenizer, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=generation_prompt,
                                         **getattr(tokenizer, "_easyrl_template_kwargs", {}))


def _require_chat(tokenizer):
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None) or "this tokenizer"
        raise ValueError(f"template 'chat' needs a tokenizer with a chat_template; {name} has none "
                         f"(use one of {', '.join(t for t in TEMPLATES if t != 'chat')})")


def _chat_segments(tokenizer, messages: Messages, generation_prompt: bool) -> list[Segment]:
    _require_chat(tokenizer)
    try:
        return _chat_segments_incremental(tokenizer, messages, generation_prompt)
    except _NotIncremental:
        # e.g. Qwen3's template, which renders an empty <think></think> block on the last
        # assistant turn only: locate each assistant turn's content in the whole rendering
        segs = _chat_segments_by_search(tokenizer, messages, generation_prompt)
        if segs is None:
            raise ValueError("the tokenizer's chat_template does not render conversations "
                             "incrementally, and the assistant turns' contents are not found "
                             "verbatim in its rendering; cannot locate assistant turns for loss "
                             "masking") from None
        return segs


class _NotIncremental(Exception):
    pass


def _chat_segments_by_search(tokenizer, messages: Messages, generation_prompt: bool):
    """Segments from one rendering of the whole conversation: each assistant content (and the
    EOS right after it) is a target, found in order; None when a content is not in the text."""
    eos = tokenizer.eos_token
    ends_with_answer = bool(messages) and messages[-1]["role"] == "assistant"
    full = _apply_chat(tokenizer, messages, generation_prompt and not ends_with_answer)
    segs: list[Segment] = []
    pos = 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant" or not m["content"]:
            continue
        i = full.find(m["content"], pos)
        if i < 0:
            return None
        end = i + len(m["content"])
        # the target starts where the generation prompt of the conversation so far ends, so
        # text the template puts before the content (Qwen3's empty think block on the last
        # turn) is what the model learns to emit after that prompt
        opener = _apply_chat(tokenizer, messages[:k], True)
        if full.startswith(opener) and pos <= len(opener) <= i:
            i = len(opener)
        if eos and full.startswith(eos, end):
            end += len(eos)
        segs += [(full[pos:i], False, False), (full[i:end], True, False)]
        pos = end
    if not (ends_with_answer and segs):  # the rest: the last turns, the generation prompt
        segs.append((full[pos:], False, False))
    return [s for s in segs if s[0]]


def _chat_segments_incremental(tokenizer, messages: Messages,
                               generation_prompt: bool) -> list[Segment]:
    eos = tokenizer.eos_token
    segs: list[Segment] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _apply_chat(tokenizer, messages[:i], True)
        full = _apply_chat(tokenizer, messages[: i + 1], False)
        if not before.startswith(done) or not full.startswith(before):
            raise _NotIncremental()
        answer, rest = full[len(before):], ""
        if eos and eos in answer:
            cut = answer.rindex(eos) + len(eos)
            answer, rest = answer[:cut], answer[cut:]
        segs.append((before[len(done):], False, False))
        segs.append((answer, True, False))
        done = full[: len(full) - len(rest)]
    last = _apply_chat(tokenizer, messages, bool(generation_prompt and messages
                                                 and messages[-1]["role"] != "assistant"))
    if not last.startswith(done):  # an earlier turn renders differently once it is not last
        raise _NotIncremental()
    if generation_prompt and (not messages or messages[-1]["role"] != "assistant"):
        full = _apply_chat(tokenizer, messages, True)
        segs.append((full[len(done):], False, False))
    elif not segs:
        segs.append((_apply_chat(tokenizer, messages, False), False, False))
    return [s for s in segs if s[0]]


# ---------------------------------------------------------------------------- public API
def render_segments(template: str, messages: Messages, tokenizer=None,
                    generation_prompt: bool = False) -> list[Segment]:
    """Render a conversation to ``[(text, is_target, append_eos)]``; targets = assistant turns.

    With ``generation_prompt`` the text that opens an assistant turn is appended (when the last
    message is not already an assistant turn).
    """
    check_template(template)
    for m in messages:
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"bad message {m!r}: need role in {ROLES} and string content")
    if template == "chat":
        return _chat_segments(tokenizer, messages, generation_prompt)
    return _own_segments(template, messages, generation_prompt)


def render_prompt(template: str, prompt_or_messages: str | Messages, tokenizer=None) -> str:
    """The text fed to the model before its answer (with the assistant-turn opener), no BOS/EOS ids.

    ``render_prompt("tulu", "hi")`` -> ``"<|user|>\\nhi\\n<|assistant|>\\n"``.
    """
    msgs = _as_messages(prompt_or_messages)
    segs = render_segments(template, msgs, tokenizer, generation_prompt=True)
    out = []
    for text, _, eos in segs:
        out.append(text)
        if eos:
            out.append(tokenizer.eos_token if tokenizer is not None else "</s>")
    return "".join(out)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; templates need one to end answers")
    return int(eos)


def adds_bos(tokenizer) -> bool:
    """Does ``tokenizer(text)`` put a BOS first, as ``transformers`` encodes text (and as
    ``apply_chat_template`` renders it, for templates that write ``{{ bos_token }}``)? Decided
    once per tokenizer from the tokenizer itself: a tokenizer whose config does not add BOS
    (``add_bos_token=False``, Qwen's, ...) gets none in training, scoring and generation."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    cached = getattr(tokenizer, "_easyrl_adds_bos", None)
    if cached is not None:
        return cached
    try:
        ids = list(tokenizer("a")["input_ids"])
        out = bool(ids) and ids[0] == bos
    except Exception:  # not a transformers tokenizer: the old rule (BOS when it has one)
        out = True
    try:
        tokenizer._easyrl_adds_bos = out
    except Exception:
        pass
    return out


def bos_prefix(tokenizer, ids: Sequence[int]) -> list[int]:
    """``[bos]`` if the tokenizer adds a BOS when it encodes text (`adds_bos`) and ``ids`` do
    not already start with it, else ``[]``."""
    if not adds_bos(tokenizer) or (len(ids) and ids[0] == tokenizer.bos_token_id):
        return []
    return [int(tokenizer.bos_token_id)]


def encode_segments(segments: Sequence[Segment], tokenizer, add_bos: bool = True
                    ) -> tuple[list[int], list[int]]:
    """Tokenize segments -> ``(ids, loss_mask)`` of equal length; mask 1 on target tokens."""
    ids: list[int] = []
    mask: list[int] = []
    for text, target, eos in segments:
        piece = _encode(tokenizer, text) + ([_eos_id(tokenizer)] if eos else [])
        ids += piece
        mask += [int(target)] * len(piece)
    if add_bos:
        pre = bos_prefix(tokenizer, ids)
        ids, mask = pre + ids, [0] * len(pre) + mask
    return ids, mask


def tokenize_prompt(template: str, prompt_or_messages: str | Messages, tokenizer,
                    add_bos: bool = True) -> list[int]:
    """Prompt ids for generation: ``[bos] + ids(render_prompt(...))``."""
    msgs = _as_messages(prompt_or_messages)
    segs = render_segments(template, msgs, tokenizer, generation_prompt=True)
    ids, _ = encode_segments([(t, False, e) for t, _, e in segs], tokenizer, add_bos)
    return ids


def tokenize_prompt_completion(template: str, prompt_or_messages: str | Messages, completion: str,
                               tokenizer, add_bos: bool = True) -> tuple[list[int], list[int]]:
    """``(prompt_ids, completion_ids)``: prompt with BOS + template, completion ending with EOS.

    Train on ``prompt_ids + completion_ids`` with loss only on ``completion_ids``.
    """
    check_template(template)
    msgs = _as_messages(prompt_or_messages)
    if template == "chat":
        prompt_text = render_prompt("chat", msgs, tokenizer)
        segs = render_segments("chat", msgs + [{"role": "assistant", "content": completion}], tokenizer)
        answer = [s for s in segs if s[1]][-1][0]
        p_ids, _ = encode_segments([(prompt_text, False, False)], tokenizer, add_bos)
        return p_ids, _encode(tokenizer, answer)
    p_ids = tokenize_prompt(template, msgs, tokenizer, add_bos)
    return p_ids, _encode(tokenizer, completion) + [_eos_id(tokenizer)]


def tokenize_messages(template: str, messages: Messages, tokenizer, add_bos: bool = True
                      ) -> tuple[list[int], list[int]]:
    """A whole conversation -> ``(ids, loss_mask)``; loss only on assistant turns (and their EOS)."""
    return encode_segments(render_segments(template, messages, tokenizer), tokenizer, add_bos)
