"""Load rows from local files or HF datasets, detect their format, validate them.

Sources (``load_rows``, in ``easyrl.data.reading``): a local ``.jsonl`` / ``.json`` / ``.parquet``
file, a local folder or hub dataset name (``"name"``, ``"name:split"``, or a dict of
``datasets.load_dataset`` kwargs such as ``{"path": "Anthropic/hh-rlhf", "split": "test",
"data_dir": ...}``), a ``datasets.Dataset``, or an in-memory list of dicts. JSON / JSON lines are
parsed there (line by line for ``.jsonl``) so that a bad line (invalid UTF-8 or JSON) is reported
with its 1-based line number and column; parquet, folders and hub names go through ``datasets``
(offline: local files or the local cache only). A ``reading.Source`` from the trainer config also
names its config key in every message (``data.train foo.jsonl: line 3: ...``) and may select one
part of a deterministic held-out split (``data.eval_fraction``).

Formats (``FORMATS``; a row is normalized to the canonical dict on the right):
  SFT         ``messages``          {"messages": [{"role","content"}...]}      loss on assistant turns
              ``prompt_completion`` {"prompt": str|messages, "completion": str}
              ``text``              {"text": str}                              loss on all tokens
  preference  ``preference``        {"prompt", "chosen", "rejected", "margin"} (explicit; chosen/
                                    rejected are strings or message lists; margin optional -> 0.0,
                                    must be finite; an empty (or blank) response is kept as "" and
                                    trains as just EOS, as in TRL; a missing one is a bad row)
              ``implicit_preference`` Anthropic-HH style whole conversations ``chosen``/``rejected``
                                    (strings ``"\\n\\nHuman: ..\\n\\nAssistant: .."`` or message lists):
                                    prompt = shared text up to and including the last
                                    ``Assistant:`` both share; responses = what follows.
  unpaired    ``unpaired``          {"prompt": str|messages, "completion": str, "label": bool} (KTO;
                                    TRL's unpaired preference format: completion as for
                                    ``prompt_completion``; label true = desirable, a real boolean,
                                    not 1 / "yes"). ``preference`` / ``implicit_preference`` rows
                                    also work: each pair becomes two rows, chosen -> label true then
                                    rejected -> label false (bad rows named by their source row).
  RRHF        ``rrhf``              {"prompt", "responses": [str], "scores": [float]}
  prompts     ``prompt``            {"prompt": str|messages, "columns": {name: value}};
                                    ``messages`` rows also work for prompts (trailing assistant
                                    turns are dropped). ``columns``: every other field of the raw row
                                    (after the ``data.columns`` renames) whose value is JSON-like
                                    (str, int, float, bool, None, lists / str-keyed dicts of those);
                                    other values are left out. The online-RL trainers pass them to
                                    reward functions (TRL: ``fn(prompts, completions, ..., **columns)``).

Bad rows raise ``DataError`` naming the file and the row (``line N`` for JSON lines, else
``row N``, 1-based), or with ``skip_bad_rows=True`` are skipped and counted.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import numpy as np

from easyrl.data.reading import DataError, apply_holdout, load_rows, source_info, tag

__all__ = ["FORMATS", "KINDS", "DataError", "Loaded", "detect_format", "load_data", "load_rows",
           "normalize_row", "parse_columns", "rename_columns", "split_implicit", "unpair"]

KINDS = ("sft", "preference", "unpaired", "rrhf", "prompts")
FORMATS = {
    "sft": ("messages", "prompt_completion", "text"),
    "preference": ("preference", "implicit_preference"),
    "unpaired": ("unpaired", "preference", "implicit_preference"),
    "rrhf": ("rrhf",),
    "prompts": ("prompt", "messages"),
}
_ROLES = ("system", "user", "assistant")
_ASSISTANT_TAG = "Assistant:"


class BadRow(ValueError):
    """Internal: reason a single row is invalid."""


@dataclasses.dataclass
class Loaded:
    """Validated rows: ``rows`` (canonical dicts), their ``format``, ``num_bad`` skipped rows;
    ``where``: the source as messages name it (with its config key); ``names``: config keys of
    the iterator arguments (``reading.SourceInfo.names``)."""

    rows: list[dict]
    format: str
    num_bad: int
    source: str
    bad_examples: list[str] = dataclasses.field(default_factory=list)
    where: str = ""
    names: dict = dataclasses.field(default_factory=dict)


def parse_columns(spec: str) -> dict:
    """"question:prompt,response_j:chosen" -> {"question": "prompt", "response_j": "chosen"}."""
    out = {}
    for part in str(spec).split(","):
        if not part.strip():
            continue
        src, sep, dst = (x.strip() for x in part.partition(":"))
        if not (sep and src and dst):
            raise ValueError(f"{spec!r}: expected comma-separated SOURCE:TARGET column pairs, "
                             f"got {part.strip()!r}")
        if src in out:
            raise ValueError(f"{spec!r}: column {src!r} mapped twice")
        out[src] = dst
    if len(set(out.values())) != len(out):
        raise ValueError(f"{spec!r}: two columns mapped to the same target")
    return out


def rename_columns(raw: list, columns: dict, label: str) -> list:
    """Apply a SOURCE -> TARGET column mapping to raw rows (rows that are not objects pass through
    and fail validation later, named by their location)."""
    if not columns:
        return raw
    present = set()
    for _, r in raw[:1000]:
        if isinstance(r, dict):
            present |= set(r)
    missing = [c for c in columns if c not in present]
    if raw and missing:
        raise DataError(f"{label}: data.columns maps {missing[0]!r}, which is not a column "
                        f"(columns: {sorted(present)})")
    out = []
    for loc, r in raw:
        if isinstance(r, dict):
            r = {columns.get(k, k): v for k, v in r.items() if k not in columns.values() or k in columns}
        out.append((loc, r))
    return out


# ----------------------------------------------------------------------------- detection
def _no_label(cols) -> str:
    return (f"the 'label' column is missing (columns: {sorted(cols)}); unpaired rows need prompt, "
            f"completion and label true/false (true = desirable)")


def detect_format(columns: Iterable[str], kind: str | None = None) -> str:
    """Format name for a set of column names (optionally restricted to a ``kind`` in ``KINDS``)."""
    cols = set(columns)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; known: {', '.join(KINDS)}")
    order = [
        ("rrhf", {"prompt", "responses", "scores"}),
        ("preference", {"prompt", "chosen", "rejected"}),
        ("implicit_preference", {"chosen", "rejected"}),
        ("unpaired", {"prompt", "completion", "label"}),
        ("messages", {"messages"}),
        ("prompt_completion", {"prompt", "completion"}),
        ("text", {"text"}),
        ("prompt", {"prompt"}),
    ]
    allowed = FORMATS[kind] if kind else tuple(f for fs in FORMATS.values() for f in fs)
    for fmt, need in order:
        if need <= cols and fmt in allowed:
            return fmt
    if kind == "unpaired" and {"prompt", "completion"} <= cols:
        raise ValueError(_no_label(cols))
    want = {f: sorted(n) for f, n in order if f in allowed}
    raise ValueError(f"cannot detect a {kind or 'data'} format from columns {sorted(cols)}; "
                     f"expected one of {want}")


# ----------------------------------------------------------------------------- validation
def _field(row: dict, key: str):
    if key not in row or row[key] is None:
        raise BadRow(f"missing field {key!r}")
    return row[key]


def _messages(value, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRow(f"field {key!r} must be a non-empty list of {{role, content}} messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise BadRow(f"{key}[{j}] must be {{'role': one of {_ROLES}, 'content': str}}, got {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _text(row: dict, key: str, allow_empty: bool = False) -> str:
    v = _field(row, key)
    if not isinstance(v, str):
        raise BadRow(f"field {key!r} must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise BadRow(f"field {key!r} is empty")
    return v


def _prompt(row: dict, allow_empty: bool = True):
    v = _field(row, "prompt")
    if isinstance(v, list):
        return _messages(v, "prompt")
    return _text(row, "prompt", allow_empty=allow_empty)


def _response(row: dict, key: str, allow_empty: bool = False) -> str:
    """A chosen/rejected/completion value: a string or messages ending in an assistant turn.
    ``allow_empty``: a blank response is "" (chosen / rejected: it trains as just EOS)."""
    v = _field(row, key)
    if isinstance(v, list):
        msgs = _messages(v, key)
        if msgs[-1]["role"] != "assistant":
            raise BadRow(f"field {key!r}: last message must be an assistant turn")
        v = msgs[-1]["content"]
    elif not isinstance(v, str):
        raise BadRow(f"field {key!r} must be a string or a message list")
    if not v.strip():
        if allow_empty:
            return ""
        raise BadRow(f"field {key!r} is empty")
    return v


def split_implicit(chosen: str, rejected: str) -> tuple[str, str, str]:
    """HH-style split -> ``(prompt, chosen_response, rejected_response)``.

    prompt = the shared text up to and including the last ``Assistant:`` both strings share.
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = chosen.rfind(_ASSISTANT_TAG, 0, n)
    if cut < 0 or cut + len(_ASSISTANT_TAG) > n:
        raise BadRow("chosen and rejected share no prefix ending in 'Assistant:'")
    cut += len(_ASSISTANT_TAG)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _implicit(row: dict) -> dict:
    c, r = _field(row, "chosen"), _field(row, "rejected")
    if isinstance(c, list) and isinstance(r, list):
        c, r = _messages(c, "chosen"), _messages(r, "rejected")
        if c[:-1] != r[:-1] or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
            raise BadRow("chosen and rejected must share all turns but a final assistant turn")
        prompt, cr, rr = c[:-1], c[-1]["content"], r[-1]["content"]
    elif isinstance(c, str) and isinstance(r, str):
        prompt, cr, rr = split_implicit(c, r)
    else:
        raise BadRow("chosen and rejected must both be strings or both message lists")
    cr, rr = (v if v.strip() else "" for v in (cr, rr))  # empty responses train as just EOS
    return {"prompt": prompt, "chosen": cr, "rejected": rr, "margin": _margin(row)}


def _margin(row: dict) -> float:
    m = row.get("margin")
    if m is None:
        return 0.0
    try:
        m = float(m)
    except (TypeError, ValueError):
        raise BadRow(f"field 'margin' must be a number, got {m!r}") from None
    if not math.isfinite(m):
        raise BadRow(f"field 'margin' must be a finite number, got {m}")
    return m


_UNPAIRED = "unpaired rows: prompt, completion, label true/false"


def _label(row: dict) -> bool:
    """An unpaired row's ``label``: a real boolean (bool or numpy.bool_), not 1, "true" or null."""
    if "label" not in row:
        raise BadRow(f"missing 'label' ({_UNPAIRED})")
    v = row["label"]
    if not isinstance(v, (bool, np.bool_)):
        raise BadRow(f"'label' must be true or false, got {v!r}")
    return bool(v)


def unpair(row: dict) -> list[dict]:
    """A canonical preference row -> two unpaired rows: chosen (label True), rejected (False)."""
    return [{"prompt": row["prompt"], "completion": row[k], "label": k == "chosen"}
            for k in ("chosen", "rejected")]


def _json_like(v) -> bool:
    if v is None or isinstance(v, (str, bool, int, float)):
        return True
    if isinstance(v, list):
        return all(_json_like(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _json_like(x) for k, x in v.items())
    return False


def _columns(row: dict, prompt_key: str) -> dict:
    """The row's other (JSON-like) fields: the ``columns`` of a prompt row."""
    return {k: v for k, v in row.items() if k != prompt_key and _json_like(v)}


def normalize_row(row: Any, fmt: str) -> dict:
    """Validate one raw row and return its canonical dict (raises ``BadRow``)."""
    if not isinstance(row, dict):
        raise BadRow(f"expected a JSON object, got {type(row).__name__}")
    if fmt == "messages":
        msgs = _messages(_field(row, "messages"), "messages")
        if not any(m["role"] == "assistant" for m in msgs):
            raise BadRow("messages contain no assistant turn")
        for m in msgs:  # a blank assistant turn trains as its EOS alone (as a blank completion)
            if m["role"] == "assistant" and not m["content"].strip():
                m["content"] = ""
        return {"messages": msgs}
    if fmt == "prompt_completion":
        return {"prompt": _prompt(row), "completion": _response(row, "completion", allow_empty=True)}
    if fmt == "text":
        return {"text": _text(row, "text")}
    if fmt == "unpaired":
        return {"prompt": _prompt(row), "completion": _response(row, "completion", allow_empty=True),
                "label": _label(row)}
    if fmt == "preference":
        p = _prompt(row)
        return {"prompt": p, "chosen": _response(row, "chosen", allow_empty=True),
                "rejected": _response(row, "rejected", allow_empty=True), "margin": _margin(row)}
    if fmt == "implicit_preference":
        return _implicit(row)
    if fmt == "rrhf":
        p = _prompt(row)
        resp, scores = _field(row, "responses"), _field(row, "scores")
        if not isinstance(resp, list) or not resp or not all(isinstance(x, str) for x in resp):
            raise BadRow("field 'responses' must be a non-empty list of strings")
        if not isinstance(scores, list) or len(scores) != len(resp):
            raise BadRow(f"field 'scores' must be a list with one number per response ({len(resp)})")
        try:
            scores = [float(s) for s in scores]
        except (TypeError, ValueError):
            raise BadRow("field 'scores' must hold numbers") from None
        return {"prompt": p, "responses": list(resp), "scores": scores}
    if fmt == "prompt":
        return {"prompt": _prompt(row, allow_empty=False), "columns": _columns(row, "prompt")}
    raise ValueError(f"unknown format {fmt!r}")


def _prompt_from_messages(row: dict) -> dict:
    msgs = _messages(_field(row, "messages"), "messages")
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    if not msgs or msgs[-1]["role"] != "user":
        raise BadRow("messages must contain a user turn to prompt with")
    return {"prompt": msgs, "columns": _columns(row, "messages")}


def load_data(source, kind: str, format: str | None = None, skip_bad_rows: bool = False,
              split: str | None = None) -> Loaded:
    """Load, detect (unless ``format`` is given) and validate rows for ``kind`` in ``KINDS``."""
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; known: {', '.join(KINDS)}")
    columns = {}
    info = source_info(source)
    if isinstance(source, dict) and "columns" in source:
        spec = dict(source)
        columns = spec.pop("columns") or {}
        if not spec.get("split"):
            spec.pop("split", None)
        source = tag(spec, info.key, info.holdout, info.names)
    label, raw, bad_json = load_rows(source, split)
    where = info.where(label)
    if info.holdout:
        raw, bad_json = apply_holdout(raw, bad_json, info, where)
    raw = rename_columns(raw, columns, where)
    cols: set[str] = set()
    for _, r in raw[:1000]:
        if isinstance(r, dict):
            cols |= set(r)
    if format is None:
        try:
            format = detect_format(cols, kind)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
    elif format not in FORMATS[kind]:
        raise ValueError(f"format {format!r} is not a {kind} format; choose from {FORMATS[kind]}")
    elif format == "unpaired" and cols and "label" not in cols:
        raise DataError(f"{where}: {_no_label(cols)}")
    errors = list(bad_json)
    rows = []
    for loc, r in raw:
        try:
            if kind == "prompts" and format == "messages":
                rows.append(_prompt_from_messages(r) if isinstance(r, dict) else normalize_row(r, "prompt"))
            elif kind == "unpaired" and format != "unpaired":
                rows.extend(unpair(normalize_row(r, format)))
            else:
                rows.append(normalize_row(r, format))
        except BadRow as e:
            errors.append((loc, str(e)))
    if errors:
        errors.sort(key=lambda x: int(x[0].split()[-1]))
        msgs = [f"{where}: {loc}: {why}" for loc, why in errors]
        if not skip_bad_rows:
            more = f" (and {len(msgs) - 1} more bad rows)" if len(msgs) > 1 else ""
            raise DataError(msgs[0] + more)
    if not rows:
        raise DataError(f"{where}: no valid rows")
    return Loaded(rows=rows, format=format, num_bad=len(errors), source=label, bad_examples=[
        f"{where}: {loc}: {why}" for loc, why in errors[:5]], where=where, names=dict(info.names))
