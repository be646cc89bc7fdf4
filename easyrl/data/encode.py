"""Tokenize canonical rows (see ``formats``) and collate them into numpy batches.

Conventions: ``loss_mask[t] == 1`` means token ``t`` is a target, predicted from tokens ``< t``
(prompt tokens, BOS, the first token of every segment and pads are 0; the EOS after an answer is 1).
All id/mask arrays are ``int32``; scores and margins ``float32``. Shapes: B batch, T ``seq_len``,
N responses per prompt (RRHF), P prompt length.

Batches
  SFT        ``input_ids, attention_mask, loss_mask, segment_ids, positions``: [B, T]. Right padded.
             ``segment_ids`` = 1, 2, 3.. per packed example in a row (0 on pad); ``positions``
             restart at 0 for each segment (0 on pad). Without packing, segment_ids == attention_mask.
  preference ``chosen_input_ids, chosen_attention_mask, chosen_loss_mask`` and ``rejected_...``:
             [B, T] right padded; ``margin``: float32 [B].
  unpaired   ``completion_input_ids, completion_attention_mask, completion_loss_mask`` (prompt +
             completion) and ``kl_...`` (the same prompt + another example's completion, for KTO's
             KL estimate): [B, T] right padded; ``label``: int32 [B] (1 desirable, 0 undesirable).
  RRHF       ``input_ids, attention_mask, loss_mask``: [B, N, T]; ``scores``: float32 [B, N];
             ``valid``: int32 [B, N] (0 for padding responses, whose other entries are 0 / pad).
  prompts    ``input_ids, attention_mask``: [B, P] LEFT padded; ``prompts``: list of B raw prompt
             strings (message prompts: the template-rendered text); ``columns``: the rows' other
             fields, ``{name: list of B values}`` over every name any row of the batch has (None
             where a row lacks it; ``{}`` when no row has any). Not arrays: hosts keep them.

Truncation: SFT examples are cut on the right to T (examples left with no target are dropped and
counted: ``num_dropped_no_target``, of which ``num_dropped_long_prompt`` had targets only past T).
Preference / RRHF keep the responses and cut the prompt from the LEFT (keeping BOS); a response
longer than the room left is cut on the right. Preference pairs whose chosen and rejected sequences
are identical are dropped and counted (``num_dropped_identical``, of which
``num_dropped_identical_truncated`` became identical only by the truncation); an empty response is
just EOS (``num_empty_responses``). Unpaired rows are cut like preference pairs (main and KL rows
each on their own); one left with no completion token is dropped (``num_dropped_no_target``).
Prompts longer than P are cut from the left (keeping BOS).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from easyrl.data import templates

Example = tuple[list[int], list[int]]  # (ids, loss_mask)


def _new_stats(num_rows: int) -> dict:
    return {"num_rows": num_rows, "num_examples": 0, "num_truncated": 0, "num_dropped_no_target": 0,
            "num_dropped_identical": 0}


# ----------------------------------------------------------------------------- SFT
def tokenize_sft_row(row: dict, tokenizer, template: str) -> Example:
    """Canonical SFT row -> (ids, loss_mask) before truncation (BOS included when the tokenizer has one)."""
    if "messages" in row:
        return templates.tokenize_messages(template, row["messages"], tokenizer)
    if "text" in row:
        ids = list(tokenizer.encode(row["text"], add_special_tokens=False))
        pre = templates.bos_prefix(tokenizer, ids)
        return pre + ids, [0] * len(pre) + [1] * len(ids)
    p, c = templates.tokenize_prompt_completion(template, row["prompt"], row["completion"], tokenizer)
    return p + c, [0] * len(p) + [1] * len(c)


def _empty_responses(row: dict) -> int:
    """Blank completions / assistant turns of a canonical SFT row (each trains as its EOS)."""
    if "messages" in row:
        return sum(m["role"] == "assistant" and not m["content"].strip() for m in row["messages"])
    if "completion" in row:
        return int(not row["completion"].strip())
    return 0


def tokenize_sft(rows: Sequence[dict], tokenizer, template: str, seq_len: int
                 ) -> tuple[list[Example], dict]:
    """Tokenize and right-truncate SFT rows to ``seq_len`` -> (examples, stats)."""
    stats = dict(_new_stats(len(rows)), num_dropped_long_prompt=0, num_empty_responses=0)
    out = []
    for row in rows:
        stats["num_empty_responses"] += _empty_responses(row)
        ids, mask = tokenize_sft_row(row, tokenizer, template)
        had_target = any(mask[1:])
        if len(ids) > seq_len:
            ids, mask = ids[:seq_len], mask[:seq_len]
            stats["num_truncated"] += 1
        if mask:
            mask = [0] + mask[1:]
        if not any(mask):
            stats["num_dropped_no_target"] += 1
            stats["num_dropped_long_prompt"] += int(had_target)
            continue
        out.append((ids, mask))
    stats["num_examples"] = len(out)
    return out, stats


def pack_examples(examples: Sequence[Example], seq_len: int) -> list[list[int]]:
    """Sequential (next-fit) packing of whole examples -> rows as lists of example indices.

    Examples are never split across rows (each must already be <= seq_len).
    """
    rows, cur, used = [], [], 0
    for i, (ids, _) in enumerate(examples):
        n = len(ids)
        if n > seq_len:
            raise ValueError(f"example {i} has {n} tokens > seq_len {seq_len}; truncate first")
        if cur and used + n > seq_len:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        rows.append(cur)
    return rows


def collate_sft(rows: Sequence[Sequence[Example]], seq_len: int, pad_id: int) -> dict:
    """Rows (each a list of examples that fit in ``seq_len``) -> SFT batch of [B, T] int32 arrays."""
    b = len(rows)
    batch = {k: np.zeros((b, seq_len), np.int32)
             for k in ("input_ids", "attention_mask", "loss_mask", "segment_ids", "positions")}
    batch["input_ids"][:] = pad_id
    for r, row in enumerate(rows):
        t = 0
        for s, (ids, mask) in enumerate(row, start=1):
            n = len(ids)
            if t + n > seq_len:
                raise ValueError(f"row {r} overflows seq_len {seq_len}")
            batch["input_ids"][r, t:t + n] = ids
            batch["attention_mask"][r, t:t + n] = 1
            batch["loss_mask"][r, t:t + n] = mask
            batch["loss_mask"][r, t] = 0
            batch["segment_ids"][r, t:t + n] = s
            batch["positions"][r, t:t + n] = np.arange(n)
            t += n
    return batch


# ----------------------------------------------------------------------------- prompt + responses
def fit_prompt_responses(prompt: Sequence[int], responses: Sequence[Sequence[int]], seq_len: int,
                         bos_id: int | None) -> tuple[list[int], list[list[int]], bool]:
    """Cut the prompt from the left (keeping a leading BOS) so the longest response fits.

    Responses longer than the room left are cut on the right. Returns (prompt, responses, truncated).
    """
    prompt = list(prompt)
    head = prompt[:1] if bos_id is not None and prompt[:1] == [bos_id] else []
    body = prompt[len(head):]
    longest = max(len(r) for r in responses)
    budget = max(seq_len - len(head) - longest, 0)
    truncated = budget < len(body)
    if truncated:
        body = body[len(body) - budget:] if budget else []
    room = seq_len - len(head) - len(body)
    out = [list(r[:room]) for r in responses]
    truncated = truncated or any(len(r) > room for r in responses)
    return head + body, out, truncated


def _prompt_and_answers(row: dict, answers: Sequence[str], tokenizer, template: str):
    pieces = [templates.tokenize_prompt_completion(template, row["prompt"], a, tokenizer) for a in answers]
    return pieces[0][0], [c for _, c in pieces]


def tokenize_preference(rows: Sequence[dict], tokenizer, template: str, seq_len: int
                        ) -> tuple[list[dict], dict]:
    """Preference rows -> examples ``{chosen, chosen_mask, rejected, rejected_mask, margin}``."""
    stats = dict(_new_stats(len(rows)), num_dropped_identical_truncated=0, num_empty_responses=0)
    out = []
    for row in rows:
        stats["num_empty_responses"] += sum(not row[k].strip() for k in ("chosen", "rejected"))
        p, (c0, r0) = _prompt_and_answers(row, [row["chosen"], row["rejected"]], tokenizer, template)
        p, (c, r), cut = fit_prompt_responses(p, [c0, r0], seq_len, tokenizer.bos_token_id)
        stats["num_truncated"] += int(cut)
        if c == r:
            stats["num_dropped_identical"] += 1
            stats["num_dropped_identical_truncated"] += int(c0 != r0)
            continue
        out.append({"chosen": p + c, "chosen_mask": [0] * len(p) + [1] * len(c),
                    "rejected": p + r, "rejected_mask": [0] * len(p) + [1] * len(r),
                    "margin": float(row.get("margin", 0.0))})
    stats["num_examples"] = len(out)
    return out, stats


def _kl_sources(keys: Sequence) -> tuple[list[int], int]:
    """For each i the nearest previous index j (cyclically) with ``keys[j] != keys[i]``; where no
    key differs, ``i - 1``. Returns (sources, how many fell back to a same-key ``i - 1``)."""
    n = len(keys)
    src: list = [None] * n
    last = None  # over the list twice: the nearest previous differing index, in O(n)
    for t in range(1, 2 * n):
        i, prev = t % n, (t - 1) % n
        if keys[prev] != keys[i]:
            last = prev  # else (same key as prev) prev's nearest differing index is i's too
        if t >= n:
            src[i] = last
    same = sum(j is None for j in src)
    return [(i - 1) % n if j is None else j for i, j in enumerate(src)], same


def tokenize_unpaired(rows: Sequence[dict], tokenizer, template: str, seq_len: int
                      ) -> tuple[list[dict], dict]:
    """Unpaired (KTO) rows -> examples ``{ids, mask, kl_ids, kl_mask, kl_from, label}``.

    ``ids``/``mask``: prompt + completion (loss on the completion), fit to ``seq_len`` with
    ``fit_prompt_responses``. ``kl_ids``/``kl_mask``: the same prompt + the completion of example
    ``kl_from`` (an index into the returned examples): the nearest previous kept example
    (cyclically, in dataset order) whose prompt (its template-rendered ids) differs. TRL
    KTOTrainer's ``_get_kl_dataset`` shifts completions by one the same way; skipping same-prompt
    examples means a pair's rejected row never gets its own chosen. When every prompt is the
    same: example ``i - 1``'s (``num_kl_same_prompt`` counts these). Fixed per example, so
    reference log-probs can be precomputed once per example.
    """
    stats = dict(_new_stats(len(rows)), num_empty_responses=0, num_kl_truncated=0,
                 num_kl_same_prompt=0, num_desirable=0, num_undesirable=0)
    bos = tokenizer.bos_token_id
    kept = []  # (prompt ids, completion ids before truncation, label, ids, loss mask)
    for row in rows:
        stats["num_empty_responses"] += int(not row["completion"].strip())
        p0, c0 = templates.tokenize_prompt_completion(template, row["prompt"], row["completion"],
                                                      tokenizer)
        p, (c,), cut = fit_prompt_responses(p0, [c0], seq_len, bos)
        stats["num_truncated"] += int(cut)
        mask = _target_mask(len(p), len(c))
        if not any(mask):  # no completion token left that is a target
            stats["num_dropped_no_target"] += 1
            continue
        kept.append((p0, c0, bool(row["label"]), p + c, mask))
    sources, stats["num_kl_same_prompt"] = _kl_sources([tuple(k[0]) for k in kept])
    out = []
    for (p0, _, label, ids, mask), j in zip(kept, sources):
        kp, (kc,), cut = fit_prompt_responses(p0, [kept[j][1]], seq_len, bos)
        stats["num_kl_truncated"] += int(cut)
        out.append({"ids": ids, "mask": mask, "kl_ids": kp + kc,
                    "kl_mask": _target_mask(len(kp), len(kc)), "kl_from": j, "label": label})
        stats["num_desirable" if label else "num_undesirable"] += 1
    stats["num_examples"] = len(out)
    return out, stats


def _target_mask(n_prompt: int, n_completion: int) -> list[int]:
    mask = [0] * n_prompt + [1] * n_completion
    return [0] + mask[1:] if mask else mask  # the first token is never a target


def collate_unpaired(examples: Sequence[dict], seq_len: int, pad_id: int) -> dict:
    """Unpaired examples -> ``{completion,kl}_{input_ids,attention_mask,loss_mask}`` [B, T] and
    ``label`` [B] (int32: 1 desirable, 0 undesirable)."""
    b = len(examples)
    batch = {}
    for side, key, mask_key in (("completion", "ids", "mask"), ("kl", "kl_ids", "kl_mask")):
        ids = np.full((b, seq_len), pad_id, np.int32)
        attn = np.zeros((b, seq_len), np.int32)
        mask = np.zeros((b, seq_len), np.int32)
        for i, ex in enumerate(examples):
            _fill(ids[i], attn[i], mask[i], ex[key], ex[mask_key])
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attn, f"{side}_loss_mask": mask})
    batch["label"] = np.array([int(ex["label"]) for ex in examples], np.int32)
    return batch


def _fill(ids_arr, attn_arr, mask_arr, ids, mask):
    n = len(ids)
    ids_arr[:n] = ids
    attn_arr[:n] = 1
    mask_arr[:n] = mask


def collate_preference(examples: Sequence[dict], seq_len: int, pad_id: int) -> dict:
    """Preference examples -> batch: ``{chosen,rejected}_{input_ids,attention_mask,loss_mask}`` [B, T], ``margin`` [B]."""
    b = len(examples)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = np.full((b, seq_len), pad_id, np.int32)
        attn = np.zeros((b, seq_len), np.int32)
        mask = np.zeros((b, seq_len), np.int32)
        for i, ex in enumerate(examples):
            _fill(ids[i], attn[i], mask[i], ex[side], ex[side + "_mask"])
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attn, f"{side}_loss_mask": mask})
    batch["margin"] = np.array([ex["margin"] for ex in examples], np.float32)
    return batch


def tokenize_rrhf(rows: Sequence[dict], tokenizer, template: str, seq_len: int,
                  num_responses: int | None = None) -> tuple[list[dict], dict]:
    """RRHF rows -> examples ``{seqs: [(ids, mask)], scores}``; keeps the first ``num_responses``."""
    stats = dict(_new_stats(len(rows)), num_responses_cut=0, num_empty_responses=0)
    out = []
    for row in rows:
        resp, scores = row["responses"], row["scores"]
        stats["num_empty_responses"] += sum(not r.strip() for r in resp)
        if num_responses is not None and len(resp) > num_responses:
            resp, scores = resp[:num_responses], scores[:num_responses]
            stats["num_responses_cut"] += 1
        p, rs = _prompt_and_answers(row, resp, tokenizer, template)
        p, rs, cut = fit_prompt_responses(p, rs, seq_len, tokenizer.bos_token_id)
        stats["num_truncated"] += int(cut)
        out.append({"seqs": [(p + r, [0] * len(p) + [1] * len(r)) for r in rs],
                    "scores": [float(s) for s in scores]})
    stats["num_examples"] = len(out)
    return out, stats


def collate_rrhf(examples: Sequence[dict], num_responses: int, seq_len: int, pad_id: int) -> dict:
    """RRHF examples -> ``input_ids, attention_mask, loss_mask`` [B, N, T], ``scores`` [B, N], ``valid`` [B, N]."""
    b, n = len(examples), num_responses
    ids = np.full((b, n, seq_len), pad_id, np.int32)
    attn = np.zeros((b, n, seq_len), np.int32)
    mask = np.zeros((b, n, seq_len), np.int32)
    scores = np.zeros((b, n), np.float32)
    valid = np.zeros((b, n), np.int32)
    for i, ex in enumerate(examples):
        if len(ex["seqs"]) > n:
            raise ValueError(f"example has {len(ex['seqs'])} responses > num_responses {n}")
        for j, (s, m) in enumerate(ex["seqs"]):
            _fill(ids[i, j], attn[i, j], mask[i, j], s, m)
            scores[i, j] = ex["scores"][j]
            valid[i, j] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": mask, "scores": scores, "valid": valid}


# ----------------------------------------------------------------------------- prompts
class PromptTooLong(ValueError):
    """A prompt longer than max_prompt_len with truncation refused (``truncate="error"``)."""

    def __init__(self, index: int, length: int):
        super().__init__(f"prompt of {length} tokens")
        self.index, self.length = index, length


def tokenize_prompts(rows: Sequence[dict], tokenizer, template: str, max_prompt_len: int,
                     truncate: str = "left") -> tuple[list[dict], dict]:
    """Prompt rows -> ``{ids, text, columns}`` with ids cut from the left (keeping BOS) to
    ``max_prompt_len`` (counted: ``num_truncated``), or, with ``truncate="error"``, a
    `PromptTooLong` for the first longer prompt; ``columns``: the row's other fields (``{}``
    when it has none)."""
    stats = _new_stats(len(rows))
    out = []
    bos = tokenizer.bos_token_id
    for i, row in enumerate(rows):
        prompt = row["prompt"]
        ids = templates.tokenize_prompt(template, prompt, tokenizer)
        if len(ids) > max_prompt_len and truncate == "error":
            raise PromptTooLong(i, len(ids))
        if len(ids) > max_prompt_len:
            head = [bos] if bos is not None and ids[:1] == [bos] else []
            keep = max_prompt_len - len(head)
            ids = head + (ids[len(ids) - keep:] if keep > 0 else [])
            stats["num_truncated"] += 1
        text = prompt if isinstance(prompt, str) else templates.render_prompt(template, prompt, tokenizer)
        out.append({"ids": ids, "text": text, "columns": dict(row.get("columns") or {}),
                    "messages": None if isinstance(prompt, str) else list(prompt)})
    stats["num_examples"] = len(out)
    return out, stats


def collate_prompts(examples: Sequence[dict], max_prompt_len: int, pad_id: int) -> dict:
    """Prompt examples -> LEFT-padded ``input_ids``, ``attention_mask`` [B, P], ``prompts`` (list of
    str), ``columns`` ({name: list of B values, None where a row lacks the name}) and
    ``messages`` (the prompts as message lists for conversational rows, else None)."""
    b = len(examples)
    ids = np.full((b, max_prompt_len), pad_id, np.int32)
    attn = np.zeros((b, max_prompt_len), np.int32)
    for i, ex in enumerate(examples):
        n = len(ex["ids"])
        if n:
            ids[i, -n:] = ex["ids"]
            attn[i, -n:] = 1
    names: dict = {}  # ordered union of the rows' column names
    for ex in examples:
        names.update(dict.fromkeys(ex.get("columns") or {}))
    columns = {k: [(ex.get("columns") or {}).get(k) for ex in examples] for k in names}
    msgs = [ex.get("messages") for ex in examples]
    return {"input_ids": ids, "attention_mask": attn, "prompts": [ex["text"] for ex in examples],
            "columns": columns, "messages": msgs if any(m is not None for m in msgs) else None}
