"""`python -m easyrl <trainer> --config configs/<trainer>.py:PRESET [--config.KEY=VALUE ...]`."""
from __future__ import annotations

import json
import os
import sys

from easyrl.train.config import load_config_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_config_path(command: str) -> str:
    return os.path.join(REPO, "configs", f"{command}.py")


def _coerce(key: str, old, text: str):
    if isinstance(old, bool):
        low = text.lower()
        if low not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"config {key}: expected a boolean, got {text!r}")
        return low in ("true", "1", "yes")
    try:
        if isinstance(old, int):
            return int(text)
        if isinstance(old, float):
            return float(text)
    except ValueError:
        raise ValueError(f"config {key}: expected {type(old).__name__}, got {text!r}") from None
    if isinstance(old, str):
        return text
    try:  # None / lists / tuples: JSON literal, else the raw string
        return json.loads(text)
    except ValueError:
        return text


def apply_overrides(c, overrides) -> None:
    """`['a.b=v', ...]`: set existing keys only, coercing to the key's current type."""
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq:
            raise ValueError(f"config override {item!r}: expected --config.KEY=VALUE")
        node, parts = c, key.split(".")
        for i, p in enumerate(parts):
            if not hasattr(node, "keys") or p not in node:
                raise ValueError(f"unknown config key {key!r} (no {'.'.join(parts[:i + 1])!r}; "
                                 f"known here: {sorted(node.keys()) if hasattr(node, 'keys') else '-'})")
            if i < len(parts) - 1:
                node = node[p]
        old = node[parts[-1]]
        if hasattr(old, "keys"):
            raise ValueError(f"config {key}: is a section, set one of its keys")
        node[parts[-1]] = _coerce(key, old, text)


def parse_config(command: str, argv):
    """`--config FILE[:PRESET]` then `--config.a.b=v` overrides. Unknown keys and bad values
    raise ValueError naming the key."""
    spec, overrides = None, []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            spec, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            spec = a.split("=", 1)[1]
        elif a.startswith("--config."):
            body = a[len("--config."):]
            if "=" not in body and i + 1 < len(argv):
                body, i = f"{body}={argv[i + 1]}", i + 1
            overrides.append(body)
        else:
            raise ValueError(f"unexpected argument {a!r} (use --config FILE:PRESET and --config.KEY=VALUE)")
        i += 1
    spec = spec or f"configs/{command}.py:tiny"
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path) and os.path.isfile(os.path.join(REPO, path)):
        path = os.path.join(REPO, path)
    c = load_config_file(f"{path}:{arg}" if arg else path)
    if c.get("command", command) != command:
        raise ValueError(f"config file {path} is for {c.command!r}, not {command!r}")
    apply_overrides(c, overrides)
    return c


def main(command: str, argv=None) -> None:
    import importlib
    argv = sys.argv[2:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: easyrl {command} --config configs/{command}.py:PRESET [--config.KEY=VALUE ...]\n"
              f"  presets and keys: see configs/{command}.py")
        return
    c = parse_config(command, argv)
    mod = importlib.import_module(f"easyrl.algorithms.{command}")
    mod.train(c)
