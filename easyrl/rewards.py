"""Programmatic reward sources shared by the online RL trainers.

A *reward function* is called exactly as TRL's GRPOTrainer calls it (trl/trainer/grpo_trainer.py
``_calculate_rewards``), with keyword arguments only::

    fn(prompts=[...], completions=[...], completion_ids=[...], **columns,
       trainer_state=..., log_metric=..., log_extra=...) -> list[float | None]

so ``def reward_len(completions, **kwargs)`` and ``def f(completions, target, **kwargs)`` (TRL's
documentation examples) work unchanged. ``prompts`` / ``completions`` are lists of N strings, or,
for conversational data (a row's ``prompt`` / ``messages`` is a list of messages), the prompts'
message lists and completions ``[{"role": "assistant", "content": text}]``, as TRL passes them.
``completion_ids`` holds N token-id lists (unpadded); ``columns`` are the prompt rows' other
fields (e.g. ``answer``), each a list of N values, plus any scalar ``context`` keyword arguments
the trainer sets (e.g. ``max_completion_length``; a column of the same name wins);
``trainer_state`` has ``global_step``, ``max_steps`` and ``epoch``; ``log_metric(name, value)``
logs a scalar with the iteration's metrics (``log_extra`` is accepted and ignored). The return
is one reward per row, a list or a 1-D numpy array; ``None`` (or NaN) means "not applicable to
this row". ``async def`` functions are awaited, all of them concurrently (``asyncio.gather``).

``load_reward_functions(names, weights)`` turns config strings such as
``--config.reward.functions=my_rewards:accuracy,easyrl.rewards:overlong`` into a
:class:`RewardSet`. A name is ``module:function`` where ``module`` is an importable module
(on ``sys.path``) or a file path (``path/to/file.py:fn``, loaded by path, never ``eval``-ed);
a bare built-in name (``exact_match``) means ``easyrl.rewards:exact_match``. A reward model
joins as one more source with :meth:`RewardSet.add_model`.

``RewardSet(prompts, completions, completion_ids, columns)`` returns ``(total, metrics)``:
``total[i] = sum_k w_k * r_k[i]`` over the sources whose ``r_k[i]`` is not ``None``; a row where
every source is ``None`` is unscorable: NaN (as TRL), counted in ``rewards/none_rows``, left out
of its group's statistics and given advantage 0 by the trainers. Metrics (TRL names):
``rewards/<name>/mean`` and ``rewards/<name>/std`` for each source over its non-``None`` values
in the batch (population std; left out when a source applies to no row), ``reward`` and
``reward_std`` of the scorable totals. A weight of 0 removes a source from the total while it is
still computed and reported. A function that raises, returns the wrong length, a non-number or
an infinite number stops the batch with a :class:`RewardError` (a ``ValueError``: the CLI prints
it as one line) naming the function and what was wrong.

Isolation (``reward.num_workers``, ``reward.timeout``, ``reward.on_error``): with ``num_workers=0``
(default) the functions run in the trainer's process and one still running after
``reward_set.SLOW_WARNING_S`` (60 s) prints a line naming it. With ``num_workers=N > 0`` they run
in N worker processes (`easyrl.reward_workers`), each call bounded by ``timeout`` seconds (default
600); a hung or crashed worker is killed and replaced. Then a call that raised, timed out or
crashed stops the run with one line naming the function and the limit (``on_error=raise``,
default), or its rows count as not applicable (``on_error=none``), counted in
``rewards/<name>/errors``.

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
from typing import Callable

from easyrl.math_answers import answer_extraction, last_boxed, normalize_math  # noqa: F401
from easyrl.reward_builtins import (  # noqa: F401  (easyrl.rewards:NAME names them)
    DEFAULT_FORMAT_PATTERN, DEFAULT_MAX_COMPLETION_LENGTH, boxed_math,
    exact_match, gsm8k_exact, length_penalty, overlong, overlong_penalty, regex_format, synthetic)
from easyrl.reward_set import (  # noqa: F401  (the public names of easyrl.rewards)
    DEFAULT_TIMEOUT, ON_ERROR, SLOW_WARNING_S, RewardError, RewardSet, TrainerState, check_weight,
    one_line, reward_stats, unscorable_warning)

BUILTINS = ("synthetic", "exact_match", "gsm8k_exact", "boxed_math", "regex_format",
            "length_penalty", "overlong")
_CFG = "config reward.functions"


# ----------------------------------------------------------------------------- loading
def check_isolation(num_workers, timeout, on_error) -> None:
    """The reward.num_workers / reward.timeout / reward.on_error keys, checked before loading."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"config reward.num_workers: {num_workers!r} must be an int >= 0 "
                         f"(0 = call the reward functions in the trainer's process)")
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) \
            or not float(timeout) > 0 or not math.isfinite(float(timeout)):
        raise ValueError(f"config reward.timeout: {timeout!r} must be a number of seconds > 0")
    if on_error not in ON_ERROR:
        raise ValueError(f"config reward.on_error: {on_error!r}; valid: {', '.join(ON_ERROR)}")


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
        raise ValueError(f"{_CFG}: {entry!r}: loading {module!r} raised {one_line(e)}") from None
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
                         f"{one_line(e)}") from None
    except Exception as e:
        raise ValueError(f"{_CFG}: {entry!r}: importing module {module} raised "
                         f"{one_line(e)}") from None


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


def load_reward_functions(names, weights=None, context: dict | None = None, *,
                          num_workers: int = 0, timeout: float = DEFAULT_TIMEOUT,
                          on_error: str = "raise") -> RewardSet:
    """A :class:`RewardSet` from ``names`` (list or comma-separated ``module:function``) and
    ``weights`` (list or comma-separated floats; default 1.0 each). ``context``: scalar keyword
    arguments for every function; ``num_workers``, ``timeout``, ``on_error``: see
    :class:`RewardSet` (config ``reward.num_workers``, ``reward.timeout``, ``reward.on_error``)."""
    check_isolation(num_workers, timeout, on_error)
    entries = [str(e).strip() for e in _split_list(names)]
    ws = _split_list(weights)
    if not ws:
        ws = [1.0] * len(entries)
    if len(ws) != len(entries):
        raise ValueError(f"config reward.weights: {len(ws)} weights for {len(entries)} reward "
                         f"functions ({', '.join(entries) or 'none'})")
    rs = RewardSet(context, num_workers=num_workers, timeout=timeout, on_error=on_error,
                   resolver=resolve_reward_function)
    for entry, w in zip(entries, ws):
        if isinstance(w, str):
            try:
                w = float(w)
            except ValueError:
                raise ValueError(f"config reward.weights: {w!r} (for {entry!r}) is not a "
                                 f"number") from None
        w = check_weight(w, f"config reward.weights: {entry!r}")
        name, fn = resolve_reward_function(entry)
        rs.add(name, w, fn, spec=entry)
    return rs
