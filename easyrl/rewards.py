"""Programmatic reward sources shared by the online RL trainers.

A *reward function* follows TRL's convention::

    fn(prompts, completions, completion_ids, **columns) -> list[float | None]

``prompts`` / ``completions`` are lists of N strings, ``completion_ids`` a list of N token-id
sequences (unpadded), and ``columns`` the prompt rows' other fields (e.g. ``answer``), each a
list of N values aligned with ``prompts``, plus any scalar ``context`` keyword arguments the
trainer sets (e.g. ``max_completion_length``; a column of the same name wins). A function takes
only what it needs and swallows the rest with ``**kwargs``. It returns one reward per row;
``None`` means "not applicable to this row" (e.g. the row has no ``answer``).

``load_reward_functions(names, weights)`` turns config strings such as
``--config.reward.functions=my_rewards:accuracy,easyrl.rewards:overlong`` into a
:class:`RewardSet`. A name is ``module:function`` where ``module`` is an importable module
(on ``sys.path``) or a file path (``path/to/file.py:fn``, loaded by path, never ``eval``-ed);
a bare built-in name (``exact_match``) means ``easyrl.rewards:exact_match``. A reward model
joins as one more source with :meth:`RewardSet.add_model`.

``RewardSet(prompts, completions, completion_ids, columns)`` returns ``(total, metrics)``:
``total[i] = sum_k w_k * r_k[i]`` over the sources whose ``r_k[i]`` is not ``None`` (a row where
every source is ``None`` gets 0 and is counted in ``rewards/none_rows``), a float32 numpy array.
Metrics (TRL names): ``rewards/<name>/mean`` and ``rewards/<name>/std`` for each source over its
non-``None`` values in the batch (population std; left out when a source applies to no row),
``reward`` and ``reward_std`` of the total. A weight of 0 removes a source from the total while
it is still computed and reported. A function that raises, returns the wrong length, a
non-number or a non-finite number stops the batch with a :class:`RewardError` (a ``ValueError``:
the CLI prints it as one line) naming the function and what was wrong.

Built-ins (``easyrl.rewards:NAME``)
-----------------------------------
``synthetic``       the bundled sort-the-letters task's graded reward in [0, 1],
                    ``easyrl.data.synthetic.true_reward(prompt, completion)``.
``exact_match``     1.0 if ``completion.strip() == str(answer).strip()`` else 0.0; ``None`` where
                    the row has no ``answer`` (column missing or value ``None``).
``gsm8k_exact``     1.0 if :func:`answer_extraction` of the completion equals that of the
                    ``answer`` column (GSM8K gold answers end in ``#### 72``), else 0.0 (also when
                    the completion has no number); ``None`` where the row has no answer.
``regex_format``    1.0 if ``re.match(pattern, completion.strip(), re.DOTALL)`` else 0.0, where
                    ``pattern`` is the row's ``format_pattern`` column / keyword (if given and not
                    ``None``) or :data:`DEFAULT_FORMAT_PATTERN` ``^<think>.*?</think>.*$``: the
                    completion starts with a ``<think>...</think>`` block.
``length_penalty``  ``-len(completion_ids[i]) / max_completion_length`` (in [-1, 0] for
                    completions within the budget); ``max_completion_length`` defaults to 256.
``overlong``        DAPO's soft overlong punishment with ``L = len(completion_ids[i])``,
                    ``Lmax = max_completion_length`` (default 256), ``Lc = overlong_cache``
                    (default ``max(1, Lmax // 4)``)::

                        0                       if L <= Lmax - Lc
                        ((Lmax - Lc) - L) / Lc  if Lmax - Lc < L <= Lmax   (0 .. -1)
                        -1                      if L > Lmax

``max_completion_length``, ``overlong_cache`` and ``format_pattern`` may each be a scalar
keyword (``RewardSet.context``) or a per-row column.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
import re
import sys
import zlib
from typing import Callable, Sequence

import numpy as np

from easyrl.math_answers import answer_extraction, last_boxed, normalize_math  # noqa: F401

DEFAULT_MAX_COMPLETION_LENGTH = 256
DEFAULT_FORMAT_PATTERN = r"^<think>.*?</think>.*$"
BUILTINS = ("synthetic", "exact_match", "gsm8k_exact", "boxed_math", "regex_format",
            "length_penalty", "overlong")
_RESERVED = ("prompts", "completions", "completion_ids")
_CFG = "config reward.functions"


class RewardError(ValueError):
    """A reward source failed on a batch (one line: which source, and what was wrong)."""


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
    return [true_reward(p, c) for p, c in zip(prompts, completions)]


def exact_match(prompts, completions, completion_ids=None, **kwargs) -> list[float | None]:
    """1.0 if the stripped completion equals the stripped ``answer``; None where no answer."""
    answers = _column(kwargs, "answer", len(completions))
    return [None if a is None else float(c.strip() == str(a).strip())
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
            out.append(float(answer_extraction(c) == gold))
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
        got = last_boxed(c)
        out.append(float(got is not None and normalize_math(got) == gold))
    return out


def regex_format(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """1.0 if ``re.match(pattern, completion.strip(), re.DOTALL)``, else 0.0; ``pattern`` is the
    row's ``format_pattern`` (column or keyword) or ``DEFAULT_FORMAT_PATTERN``."""
    patterns = _column(kwargs, "format_pattern", len(completions))
    return [float(re.match(p if p is not None else DEFAULT_FORMAT_PATTERN, c.strip(), re.DOTALL)
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


# ----------------------------------------------------------------------------- RewardSet
class _Source:
    def __init__(self, name: str, weight: float, fn: Callable, spec: str, takes_columns: bool):
        self.name, self.weight, self.fn, self.spec = name, weight, fn, spec
        self.takes_columns = takes_columns

    def label(self) -> str:
        return f"reward function '{self.name}'" + (f" ({self.spec})" if self.spec else "")


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if len(msg) > 300:
        msg = msg[:297] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _check_weight(weight, what: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) \
            or not math.isfinite(float(weight)):
        raise ValueError(f"{what}: weight must be a finite number, got {weight!r}")
    return float(weight)


def _to_values(result, n: int, label: str) -> list[float | None]:
    """Validate a source's return: N numbers or None -> a list of float | None."""
    if isinstance(result, (str, bytes, dict)) or not hasattr(result, "__len__"):
        raise RewardError(f"{label} returned {type(result).__name__}, expected a list of {n} "
                          f"floats (or None)")
    if not isinstance(result, (list, tuple)):
        arr = np.asarray(result)
        if arr.ndim != 1:
            raise RewardError(f"{label} returned an array of shape {arr.shape}, expected ({n},)")
        result = arr.tolist()
    if len(result) != n:
        raise RewardError(f"{label} returned {len(result)} values for {n} completions")
    out = []
    for i, v in enumerate(result):
        if v is None:
            out.append(None)
            continue
        if not isinstance(v, numbers.Real):
            a = np.asarray(v) if hasattr(v, "__array__") else None
            if a is None or a.shape != () or not np.issubdtype(a.dtype, np.number):
                raise RewardError(f"{label} returned a non-number at row {i}: {v!r:.60} "
                                  f"({type(v).__name__})")
        f = float(v)
        if not math.isfinite(f):
            raise RewardError(f"{label} returned a non-finite value at row {i}: {f}")
        out.append(f)
    return out


class RewardSet:
    """Weighted reward sources: ``total = sum_k w_k * r_k`` (``None`` entries skipped).

    ``context``: scalar keyword arguments passed to every function (e.g.
    ``max_completion_length``, ``overlong_cache``); a column of the same name wins."""

    def __init__(self, context: dict | None = None):
        self.sources: list[_Source] = []
        self.context = dict(context or {})

    def _unique(self, name: str) -> str:
        taken = {s.name for s in self.sources}
        if name not in taken:
            return name
        k = 2
        while f"{name}_{k}" in taken:
            k += 1
        return f"{name}_{k}"

    def add(self, name: str, weight: float, fn: Callable, spec: str = "") -> str:
        """Add a reward function (TRL convention); returns its (unique) metric name."""
        if not callable(fn):
            raise ValueError(f"reward source '{name}' is not callable")
        name = self._unique(name)
        self.sources.append(_Source(name, _check_weight(weight, f"reward source '{name}'"), fn,
                                    spec, True))
        return name

    def add_model(self, name: str, weight: float,
                  score_fn: Callable[[Sequence[str], Sequence[str], Sequence], np.ndarray]) -> str:
        """Add a reward model ``score_fn(prompts, completions, completion_ids) -> [N]`` as a
        source (no columns are passed to it); returns its (unique) metric name."""
        if not callable(score_fn):
            raise ValueError(f"reward model '{name}' is not callable")
        name = self._unique(name)
        self.sources.append(_Source(name, _check_weight(weight, f"reward model '{name}'"),
                                    score_fn, "reward model", False))
        return name

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def weights(self) -> list[float]:
        return [s.weight for s in self.sources]

    def __len__(self) -> int:
        return len(self.sources)

    def __repr__(self) -> str:
        return "RewardSet(" + ", ".join(f"{s.name}*{s.weight:g}" for s in self.sources) + ")"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 completion_ids: Sequence | None, columns: dict | None = None):
        """``(total [N] float32, metrics)`` for a batch; see the module doc."""
        return self.combine(self.values(prompts, completions, completion_ids, columns))

    def values(self, prompts: Sequence[str], completions: Sequence[str],
               completion_ids: Sequence | None, columns: dict | None = None) -> np.ndarray:
        """Every source's rewards for a batch: float64 ``[N, K]`` (K sources, in order), NaN
        where a source returned ``None``. ``combine`` turns (rows of) it into the total; the
        online-RL loop computes it on each host's own rows and gathers the rows of all hosts."""
        if not self.sources:
            raise ValueError("no reward sources configured (reward.functions or a reward model)")
        prompts, completions = list(prompts), list(completions)
        n = len(prompts)
        if len(completions) != n or (completion_ids is not None and len(completion_ids) != n):
            raise ValueError(f"rewards: {n} prompts, {len(completions)} completions, "
                             f"{'no' if completion_ids is None else len(completion_ids)} "
                             f"completion_ids: they must align")
        columns = dict(columns or {})
        for k, v in columns.items():
            if k in _RESERVED:
                raise ValueError(f"rewards: a prompt column may not be named {k!r}")
            if len(v) != n:
                raise ValueError(f"rewards: column {k!r} has {len(v)} values for {n} prompts")
        kwargs = {**{k: v for k, v in self.context.items() if k not in _RESERVED}, **columns}
        out = np.full((n, len(self.sources)), np.nan, np.float64)
        for j, s in enumerate(self.sources):
            label = s.label()
            try:
                if s.takes_columns:
                    result = s.fn(prompts, completions, completion_ids, **kwargs)
                else:
                    result = s.fn(prompts, completions, completion_ids)
            except Exception as e:  # user code: one line naming the source
                raise RewardError(f"{label} raised {_one_line(e)}") from None
            for i, v in enumerate(_to_values(result, n, label)):
                if v is not None:
                    out[i, j] = v
        return out

    def combine(self, values: np.ndarray):
        """``(total [N] float32, metrics)`` from ``values`` [N, K] (see ``values``)."""
        values = np.asarray(values, np.float64)
        n = values.shape[0]
        if values.ndim != 2 or values.shape[1] != len(self.sources):
            raise ValueError(f"rewards: values of shape {values.shape} for {len(self.sources)} "
                             f"sources")
        total = np.zeros(n, np.float64)
        applicable = np.zeros(n, bool)
        metrics: dict[str, float] = {}
        for j, s in enumerate(self.sources):
            col = values[:, j]
            got = ~np.isnan(col)
            vals = col[got]
            if vals.size:
                metrics[f"rewards/{s.name}/mean"] = float(vals.mean())
                metrics[f"rewards/{s.name}/std"] = float(vals.std())
            applicable |= got
            if s.weight != 0.0:
                total[got] += s.weight * vals
        metrics["rewards/none_rows"] = float(n - applicable.sum())
        total = total.astype(np.float32)
        metrics["reward"] = float(total.mean()) if n else 0.0
        metrics["reward_std"] = float(total.std()) if n else 0.0
        return total, metrics


# ----------------------------------------------------------------------------- loading
def _split_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    return list(value)


def _is_path(module: str) -> bool:
    return module.endswith(".py") or "/" in module or os.sep in module


def _load_file(module: str, entry: str):
    path = os.path.abspath(os.path.expanduser(module))
    if not os.path.isfile(path):
        raise ValueError(f"{_CFG}: {entry!r}: no such file {module!r}")
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    mod_name = f"_easyrl_reward_{stem}_{zlib.crc32(path.encode()):08x}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{_CFG}: {entry!r}: cannot load {module!r} as a Python file")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        del sys.modules[mod_name]
        raise ValueError(f"{_CFG}: {entry!r}: loading {module!r} raised {_one_line(e)}") from None
    return mod


def _load_module(module: str, entry: str):
    if _is_path(module):
        return _load_file(module, entry)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            raise ValueError(f"{_CFG}: {entry!r}: no module named {e.name!r} (is its folder on "
                             f"sys.path / PYTHONPATH? or give a file path, path/to/file.py:fn)"
                             ) from None
        raise ValueError(f"{_CFG}: {entry!r}: importing module {module} raised "
                         f"{_one_line(e)}") from None
    except Exception as e:
        raise ValueError(f"{_CFG}: {entry!r}: importing module {module} raised "
                         f"{_one_line(e)}") from None


def resolve_reward_function(entry: str) -> tuple[str, Callable]:
    """``(name, fn)`` for one ``module:function`` entry (or a bare built-in name)."""
    entry = str(entry).strip()
    if ":" not in entry or entry.endswith(":"):
        if entry in BUILTINS:
            return entry, getattr(sys.modules[__name__], entry)
        raise ValueError(f"{_CFG}: {entry!r}: expected 'module:function' or 'path/to/file.py:"
                         f"function' (built-ins: {', '.join(BUILTINS)})")
    module, attr = entry.rsplit(":", 1)
    module, attr = module.strip(), attr.strip()
    if not module or not attr.isidentifier():
        raise ValueError(f"{_CFG}: {entry!r}: expected 'module:function'")
    mod = _load_module(module, entry)
    if not hasattr(mod, attr):
        where = f"module {module}" if not _is_path(module) else f"file {module}"
        extra = f" (built-ins: {', '.join(BUILTINS)})" if mod is sys.modules[__name__] else ""
        raise ValueError(f"{_CFG}: {entry!r}: {where} has no function {attr!r}{extra}")
    fn = getattr(mod, attr)
    if not callable(fn):
        raise ValueError(f"{_CFG}: {entry!r}: {attr!r} is a {type(fn).__name__}, not callable")
    return attr, fn


def load_reward_functions(names, weights=None, context: dict | None = None) -> RewardSet:
    """A :class:`RewardSet` from ``names`` (list or comma-separated ``module:function``) and
    ``weights`` (list or comma-separated floats; default 1.0 each). ``context``: scalar keyword
    arguments for every function (see :class:`RewardSet`)."""
    entries = [str(e).strip() for e in _split_list(names)]
    ws = _split_list(weights)
    if not ws:
        ws = [1.0] * len(entries)
    if len(ws) != len(entries):
        raise ValueError(f"config reward.weights: {len(ws)} weights for {len(entries)} reward "
                         f"functions ({', '.join(entries) or 'none'})")
    rs = RewardSet(context)
    for entry, w in zip(entries, ws):
        if isinstance(w, str):
            try:
                w = float(w)
            except ValueError:
                raise ValueError(f"config reward.weights: {w!r} (for {entry!r}) is not a "
                                 f"number") from None
        w = _check_weight(w, f"config reward.weights: {entry!r}")
        name, fn = resolve_reward_function(entry)
        rs.add(name, w, fn, spec=entry)
    return rs
