"""Final answers of math completions: the last number (GSM8K's `####` convention) and the last
`\\boxed{}` with a string normalisation of its LaTeX (MATH / Big-Math), for the built-in
rewards `gsm8k_exact` and `boxed_math` (`easyrl.rewards`)."""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _canonical_number(s: str) -> str | None:
    s = s.replace(",", "")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def answer_extraction(text: str) -> str | None:
    """The final numeric answer of ``text`` as a canonical string, or None if it has no number.

    Tulu 3 RLVR / DeepSeekMath style: if ``text`` contains ``####``, the first number after the
    last ``####``; otherwise the last number in the text. Thousands separators are dropped and the
    number is canonicalised (``"1,000.50"`` -> ``"1000.5"``, ``"72.0"`` -> ``"72"``, ``"-3"``)."""
    text = str(text)
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        num = found[0] if found else None
    else:
        found = _NUMBER.findall(text)
        num = found[-1] if found else None
    return None if num is None else _canonical_number(num)


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces
    balanced; None if there is none (or it is unclosed)."""
    text = str(text)
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


_LATEX_DROP = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\ |\$|\\%|%|\^\{?\\circ\}?|\s+")


def normalize_math(ans: str) -> str:
    """A canonical string for a final math answer (a string-normalised match, not a symbolic
    grader): ``\\text{..}`` unwrapped, ``\\left / \\right``, spacing, ``$``, ``%`` and degree
    signs dropped, ``dfrac / tfrac`` -> ``frac``, a trailing period dropped, and a plain number
    canonicalised (``"1,000.0"`` -> ``"1000"``)."""
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", str(ans))
    s = _LATEX_DROP.sub("", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.rstrip(".")
    num = _canonical_number(s) if re.fullmatch(r"-?[\d,]*\.?\d+", s) else None
    return num if num is not None else s
