"""`python -m easyrl <trainer> --config configs/<trainer>.py:PRESET [--config.KEY=VALUE ...]`.

Config files and overrides go through ml_collections.config_flags, each parse on a fresh
absl `FlagValues` (never the global FLAGS): the file through `DEFINE_config_file`
(`--config=path:arg` calls the file's `get_config(arg)`), the overrides through
`DEFINE_config_dict` on the loaded ConfigDict (`apply_overrides`, which tests call as well), so
every value is parsed by config_flags' parser for the key's type (int, float, bool, str). The
config is locked while overrides apply (only existing keys can be set) and handed back unlocked
as before. Failures are one-line ValueError / FileNotFoundError naming the key; easyrl.cli
prints them.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence, Tuple

import ml_collections as mlc
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
USAGE = "use --config FILE:PRESET and --config.KEY=VALUE"


class _BoolParser(flags.BooleanParser):
    """absl's booleans (true/t/1, false/f/0, any case) plus yes/no, which easyrl took before."""

    def parse(self, argument):
        if isinstance(argument, str) and argument.lower() in ("yes", "no"):
            return argument.lower() == "yes"
        return super().parse(argument)


config_flags.register_flag_parser_for_type(bool, _BoolParser())


def _one_line(e) -> str:
    return " ".join(str(e).split())


# ---- the config file ------------------------------------------------------------------------
def _resolve(spec: str) -> str:
    """FILE[:ARG] with FILE found relative to the working directory, else to the repo root."""
    path, colon, arg = spec.partition(":")
    if not os.path.isfile(path) and os.path.isfile(os.path.join(REPO, path)):
        path = os.path.join(REPO, path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config: config file {spec.partition(':')[0]!r} not found")
    return path + colon + arg


def _load_file(spec: str) -> mlc.ConfigDict:
    """`FILE[:ARG]` -> FILE's `get_config(ARG)` through `config_flags.DEFINE_config_file`."""
    argv = ["easyrl", f"--config={_resolve(spec)}"]
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True,
                                             sys_argv=argv)
    try:
        fv(argv)
    except flags.IllegalFlagValueError as e:
        # absl's "flag --config=...: " around ml_collections' "Error whilst parsing config
        # file: <traceback>" around what get_config raised
        err = e
        for _ in range(2):
            err = err.__context__ if err.__context__ is not None else err
        if isinstance(err, ValueError):
            raise ValueError(_one_line(err)) from None
        raise ValueError(f"config file {spec}: get_config failed: {type(err).__name__}: "
                         f"{_one_line(err)}") from None
    except AttributeError as e:  # a broken preset: name it, no deep traceback
        raise ValueError(f"config file {spec}: get_config failed: AttributeError: {e}") from None
    c = holder.value
    if not isinstance(c, mlc.ConfigDict):
        try:  # config_flags defers an IOError inside get_config to the first use of the config
            c.lock()
        except OSError as e:
            raise (e.__cause__ or e) from None
        except Exception:  # noqa: BLE001  (None, a dict, ...)
            pass
        raise ValueError(f"config file {spec}: get_config returned {type(c).__name__}, "
                         f"not a ConfigDict")
    c.unlock()
    return c


# ---- overrides ------------------------------------------------------------------------------
def _joined(args: Sequence[str]) -> List[str]:
    """`--config.KEY VALUE` -> `--config.KEY=VALUE` (config_flags would read a boolean
    `--config.KEY` as true and leave VALUE behind)."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if (a.startswith("--config.") and "=" not in a and i + 1 < len(args)
                and not args[i + 1].startswith("--")):
            a, i = f"{a}={args[i + 1]}", i + 1
        out.append(a)
        i += 1
    return out


def _key(arg: str) -> str:
    """`--config.a.b=v` / `--noconfig.a.b` -> 'a.b'; anything else is not an override."""
    name = arg.split("=", 1)[0]
    for prefix in ("--config.", "--noconfig."):
        if name.startswith(prefix) and len(name) > len(prefix):
            return name[len(prefix):]
    raise ValueError(f"unexpected argument {arg!r} ({USAGE})")


def _check_key(c: mlc.ConfigDict, key: str) -> None:
    try:
        parts = config_path.split(key)
    except ValueError:
        raise ValueError(f"unknown config key {key!r}") from None
    node = c
    for i, p in enumerate(parts):
        if not isinstance(node, mlc.ConfigDict) or p not in node:
            known = sorted(node.keys()) if isinstance(node, mlc.ConfigDict) else "-"
            missing = ".".join(map(str, parts[:i + 1]))
            raise ValueError(f"unknown config key {key!r} (no {missing!r}; known here: {known})")
        node = node[p]
    if isinstance(node, mlc.ConfigDict):
        raise ValueError(f"config {key}: is a section, set one of its keys")


def _value_error(c: mlc.ConfigDict, pairs: List[Tuple[str, Optional[str]]], e: Exception) -> str:
    """absl's 'flag --config.KEY=VALUE: why' as 'config KEY: expected TYPE, got VALUE'."""
    msg = str(e)
    for key, value in pairs:
        if msg == f"Missing value for flag --config.{key}":
            return f"config {key}: missing value (--config.{key}=VALUE)"
        head = f"flag --config.{key}={value}: "
        if msg.startswith(head):
            t = config_path.get_type(key, c)
            if t is bool:
                return f"config {key}: expected a boolean, got {value!r}"
            if t in (int, float):
                return f"config {key}: expected {t.__name__}, got {value!r}"
            return f"config {key}: {_one_line(msg[len(head):])}"
    return _one_line(msg)


def _override(c: mlc.ConfigDict, args: Sequence[str]) -> None:
    """Apply `--config.KEY=VALUE` / `--config.KEY VALUE` arguments to `c` in place."""
    args = _joined(args)
    pairs = [(_key(a), a.split("=", 1)[1] if "=" in a else None) for a in args]
    for key, _ in pairs:
        _check_key(c, key)
    if not args:
        return
    was_locked = c.is_locked
    argv = ["easyrl", *args]
    fv = flags.FlagValues()
    try:
        config_flags.DEFINE_config_dict("config", c, flag_values=fv, lock_config=True,
                                        sys_argv=argv)
        fv(argv)
    except flags.Error as e:  # IllegalFlagValueError, a missing value
        raise ValueError(_value_error(c, pairs, e)) from None
    finally:
        if not was_locked:
            c.unlock()


def apply_overrides(c: mlc.ConfigDict, overrides: Sequence[str]) -> None:
    """`['a.b=v', ...]` on `c` in place: the same config_flags parse as `--config.a.b=v`."""
    args = []
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"config override {item!r}: expected KEY=VALUE")
        args.append(f"--config.{item}")
    _override(c, args)


def parse_config(command: Optional[str], argv: Sequence[str]) -> mlc.ConfigDict:
    """`--config FILE[:PRESET]` (default configs/<command>.py:tiny) and `--config.a.b=v`
    overrides, in any order. `command` None (easyrl plan) takes any trainer's config file.
    Unknown keys and bad values raise a one-line ValueError naming the key."""
    spec, overrides, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise ValueError(f"--config: expected FILE:PRESET ({USAGE})")
            spec, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            spec = a[len("--config="):]
        else:
            overrides.append(a)
        i += 1
    if spec is None:
        if command is None:
            raise ValueError(f"--config FILE:PRESET is required ({USAGE})")
        spec = f"configs/{command}.py:tiny"
    c = _load_file(spec)
    if command is not None and c.get("command", command) != command:
        raise ValueError(f"config file {spec.partition(':')[0]} is for {c.command!r}, "
                         f"not {command!r}")
    _override(c, overrides)
    return c


def main(command: str, argv=None) -> None:
    from easyrl.algorithms import registry
    argv = sys.argv[2:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: easyrl {command} --config configs/{command}.py:PRESET [--config.KEY=VALUE ...]\n"
              f"  presets and keys: see configs/{command}.py")
        return
    c = parse_config(command, argv)
    registry.get(command).train(c)
