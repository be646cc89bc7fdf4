"""The built-in reward functions (``easyrl.rewards:NAME``; documented in `easyrl.rewards`).
Each takes TRL's keyword arguments and accepts conversational completions (message lists:
the last message's content is the text)."""
from __future__ import annotations

import re

import numpy as np

from easyrl.math_answers import answer_extraction, last_boxed, normalize_math

DEFAULT_MAX_COMPLETION_LENGTH = 256
DEFAULT_FORMAT_PATTERN = r"^<think>.*?</think>.*$"


def as_text(x) -> str:
    """A completion or prompt as text: a string as is, a message list's last content."""
    if isinstance(x, (list, tuple)) and x and isinstance(x[-1], dict):
        return str(x[-1].get("content", ""))
    return x


# ----------------------------------------------------------------------------- built-ins
def _row(value, i):
    """``value[i]`` for a per-row column (list/tuple/array), else the scalar ``value``."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return value[i]
    return value


def _column(kwargs: dict, key: str, n: int) -> list:
    """The per-row values of ``key`` (scalar broadcast, missing -> ``None`` for every row)."""
    v = kwargs.get(key)
    return [_row(v, i) for i in range(n)]


def synthetic(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """The synthetic sort task's graded reward: ``easyrl.data.synthetic.true_reward``."""
    from easyrl.data.synthetic import true_reward
    return [true_reward(as_text(p), as_text(c)) for p, c in zip(prompts, completions)]


def exact_match(prompts, completions, completion_ids=None, **kwargs) -> list[float | None]:
    """1.0 if the stripped completion equals the stripped ``answer``; None where no answer."""
    answers = _column(kwargs, "answer", len(completions))
    return [None if a is None else float(as_text(c).strip() == str(a).strip())
            for c, a in zip(completions, answers)]


def gsm8k_exact(prompts, completions, completion_ids=None, **kwargs) -> list[float | None]:
    """1.0 if the completion's final number equals the ``answer``'s (see ``answer_extraction``),
    else 0.0; None where the row has no answer (or the answer has no number)."""
    answers = _column(kwargs, "answer", len(completions))
    out = []
    for c, a in zip(completions, answers):
        gold = None if a is None else answer_extraction(a)
        if gold is None:
            out.append(None)
        else:
            out.append(float(answer_extraction(as_text(c)) == gold))
    return out


def boxed_math(prompts, completions, completion_ids=None, **kwargs) -> list[float | None]:
    """1.0 if the completion's last ``\\boxed{}`` equals the ``answer`` (its own last boxed
    value when it has one, else the whole answer) after `normalize_math`, else 0.0 (no boxed
    answer: 0.0); None where the row has no answer. The MATH / Big-Math convention of
    boxed final answers; a string match, so equivalent forms (0.5 vs \\frac{1}{2}) do not
    match: pass a symbolic grader as reward.functions=FILE.py:FN for that."""
    answers = _column(kwargs, "answer", len(completions))
    out = []
    for c, a in zip(completions, answers):
        if a is None:
            out.append(None)
            continue
        gold = last_boxed(a)
        gold = normalize_math(gold if gold is not None else a)
        got = last_boxed(as_text(c))
        out.append(float(got is not None and normalize_math(got) == gold))
    return out


def regex_format(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """1.0 if ``re.match(pattern, completion.strip(), re.DOTALL)``, else 0.0; ``pattern`` is the
    row's ``format_pattern`` (column or keyword) or ``DEFAULT_FORMAT_PATTERN``."""
    patterns = _column(kwargs, "format_pattern", len(completions))
    return [float(re.match(p if p is not None else DEFAULT_FORMAT_PATTERN, as_text(c).strip(),
                           re.DOTALL)
                  is not None) for c, p in zip(completions, patterns)]


def _lengths(completion_ids, n: int, who: str) -> list[int]:
    if completion_ids is None:
        raise ValueError(f"{who} needs completion_ids")
    return [len(completion_ids[i]) for i in range(n)]


def length_penalty(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """``-len(completion_ids[i]) / max_completion_length`` (default 256)."""
    n = len(completions)
    lmax = _column(kwargs, "max_completion_length", n)
    return [-L / (m if m is not None else DEFAULT_MAX_COMPLETION_LENGTH)
            for L, m in zip(_lengths(completion_ids, n, "length_penalty"), lmax)]


def overlong_penalty(length: int, max_completion_length: int, overlong_cache: int) -> float:
    """DAPO's soft overlong punishment of one completion of ``length`` tokens (module doc)."""
    lmax, lc = int(max_completion_length), int(overlong_cache)
    if lc <= 0 or lc > lmax:
        raise ValueError(f"overlong_cache must be in [1, max_completion_length={lmax}], got {lc}")
    if length <= lmax - lc:
        return 0.0
    if length <= lmax:
        return ((lmax - lc) - length) / lc
    return -1.0


def overlong(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """DAPO soft overlong punishment; ``max_completion_length`` (default 256), ``overlong_cache``
    (default ``max(1, max_completion_length // 4)``)."""
    n = len(completions)
    lmaxs = _column(kwargs, "max_completion_length", n)
    caches = _column(kwargs, "overlong_cache", n)
    out = []
    for L, lmax, lc in zip(_lengths(completion_ids, n, "overlong"), lmaxs, caches):
        lmax = DEFAULT_MAX_COMPLETION_LENGTH if lmax is None else lmax
        lc = max(1, int(lmax) // 4) if lc is None else lc
        out.append(overlong_penalty(L, lmax, lc))
    return out


