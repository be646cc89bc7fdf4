"""Read raw rows (``load_rows``) from a local ``.jsonl`` / ``.json`` / ``.parquet`` file, a local
folder, a hub dataset name or memory, with errors that name the file and the line.

JSON lines are read as bytes and decoded line by line, so invalid UTF-8 or a JSON syntax error is
a bad row at ``line N`` (with its column) that ``skip_bad_rows`` can skip; a UTF-8 byte order mark
is accepted. A ``.json`` file holds a list, a single object or columns (``{"col": [...]}``); one
whose lines are JSON objects is read as JSON lines; a syntax error names its line and column.

A folder goes through ``datasets`` (``load_from_disk`` for a ``save_to_disk`` folder, else
``load_dataset``, e.g. a folder of parquet files); one without data files, or one ``datasets``
cannot load, is a ``DataError`` naming the folder and the cause.

``Source`` / ``SourceSpec`` (``tag``): a source (a path or name, or a ``load_dataset`` spec dict)
that knows where it came from: its config ``key`` (named in every message), an optional
deterministic held-out split ``holdout = (fraction, seed, part)`` (``holdout_split``) and the
config keys of the iterator arguments (``names``).
"""
from __future__ import annotations

import codecs
import json
import math
import os
from typing import Any, Iterator

import numpy as np

DATA_EXTENSIONS = (".jsonl", ".json", ".parquet", ".arrow", ".csv", ".tsv", ".txt")
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip")
# names (or endings) that make a folder a model / tokenizer / easyrl run folder, not a dataset
_MODEL_FILES = (".safetensors", ".bin", ".pt", ".ckpt", "easyrl_config.json", "checkpoints",
                "tokenizer.json", "tokenizer_config.json")


class DataError(ValueError):
    """A bad data row or source; the message names the file and row."""


# ----------------------------------------------------------------------------- sources
class SourceInfo:
    """Where a source came from; see the module docstring."""

    key: str = ""
    holdout: tuple | None = None
    names: dict = {}

    def where(self, label: str) -> str:
        """``label`` (the file or name) as messages show it: ``"data.train foo.jsonl"``."""
        out = f"{self.key} {label}" if self.key else label
        if self.holdout and self.holdout[2] == "eval":
            name = self.names.get("eval_fraction", "eval_fraction")
            out += f" [held-out eval rows, {name}={self.holdout[0]:g}]"
        return out


class Source(SourceInfo, str):
    """A path or dataset name (a ``str``) with ``SourceInfo``."""


class SourceSpec(SourceInfo, dict):
    """A ``datasets.load_dataset`` spec dict (``path``, ``split``, ``columns``) with ``SourceInfo``."""


def tag(source, key: str = "", holdout: tuple | None = None, names: dict | None = None):
    """``source`` as a ``Source`` / ``SourceSpec`` carrying ``key``, ``holdout`` and ``names``."""
    out = SourceSpec(source) if isinstance(source, dict) else Source(source)
    out.key, out.holdout, out.names = key, holdout, dict(names or {})
    return out


def source_info(source) -> SourceInfo:
    return source if isinstance(source, SourceInfo) else SourceInfo()


def holdout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) row indices, each sorted: ``ceil(fraction * n)`` eval rows drawn by
    ``np.random.default_rng(seed).permutation(n)`` (the split of ``datasets``'
    ``train_test_split(test_size=fraction, seed=seed)``)."""
    n_eval = math.ceil(fraction * n)
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in perm[n_eval:]), sorted(int(i) for i in perm[:n_eval])


def apply_holdout(raw: list, bad: list, info: SourceInfo, where: str) -> tuple[list, list]:
    """Keep the rows (and bad rows) of ``info.holdout``'s part."""
    fraction, seed, part = info.holdout
    entries = sorted([(loc, r, False) for loc, r in raw] + [(loc, e, True) for loc, e in bad],
                     key=lambda x: int(x[0].split()[-1]))
    train, ev = holdout_split(len(entries), fraction, seed)
    if entries and not train:
        name = info.names.get("eval_fraction", "eval_fraction")
        raise DataError(f"{where}: {name}={fraction:g} of {len(entries)} rows leaves no training rows")
    keep = [entries[i] for i in (train if part == "train" else ev)]
    return [(loc, r) for loc, r, b in keep if not b], [(loc, r) for loc, r, b in keep if b]


# ----------------------------------------------------------------------------- JSON lines
def utf8_error(raw: bytes, e: UnicodeDecodeError) -> str:
    col = len(raw[:e.start].decode("utf-8", "replace")) + 1
    return f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {col})"


def json_error(text: str, e: json.JSONDecodeError) -> str:
    """A one-line JSON error of ``text`` (one line, without its line ending)."""
    end = ", the end of the line" if e.pos >= len(text.rstrip()) else ""
    return f"invalid JSON ({e.msg} at column {e.colno}{end})"


def iter_jsonl(path: str) -> Iterator[tuple[int, Any, str | None]]:
    """``(line number, value, None)`` or ``(line number, None, error)`` for each non-blank line."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            if i == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield i, None, utf8_error(raw, e)
                continue
            if not text.strip():
                continue
            try:
                yield i, json.loads(text), None
            except json.JSONDecodeError as e:
                yield i, None, json_error(text, e)


def read_jsonl(path: str) -> tuple[list[tuple[str, Any]], list[tuple[str, str]]]:
    """-> ([(location, row)], [(location, error)]); blank lines are ignored."""
    rows, bad = [], []
    for i, value, err in iter_jsonl(path):
        (bad if err else rows).append((f"line {i}", err or value))
    return rows, bad


def _is_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _looks_like_jsonl(text: str, err: json.JSONDecodeError | None = None) -> bool:
    """JSON lines in a .json file: the first value ends and more follows, or most lines are
    objects on their own (a pretty-printed object has almost none)."""
    if not text.lstrip().startswith("{"):
        return False
    if err is not None and err.msg == "Extra data":
        return True
    lines = [x for x in text.split("\n") if x.strip()]
    return len(lines) > 1 and 2 * sum(map(_is_object, lines)) >= len(lines)


def read_json(path: str):
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if _looks_like_jsonl(data.decode("utf-8", "replace")):
            return read_jsonl(path)
        start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        col = len(data[start:e.start].decode("utf-8", "replace")) + 1
        raise DataError(f"{path}: line {line}, column {col}: invalid UTF-8 "
                        f"(byte 0x{data[e.start]:02x})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if _looks_like_jsonl(text, e):
            return read_jsonl(path)
        raise DataError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if value and len(lists) == len(value) and len({len(v) for v in lists}) == 1:  # columnar
            n = len(lists[0])
            value = [{k: v[i] for k, v in value.items()} for i in range(n)]
        else:  # a single row
            value = [value]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of objects")
    return [(f"row {i}", r) for i, r in enumerate(value, start=1)], []


# ----------------------------------------------------------------------------- datasets
def _cause(e: BaseException) -> str:
    """The error on one line; for datasets' generic DatasetGenerationError, the one it wraps."""
    while type(e).__name__ == "DatasetGenerationError" and (e.__cause__ or e.__context__):
        e = e.__cause__ or e.__context__
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:300]}{'...' if len(msg) > 300 else ''}"


def _rows(ds, where: str, label: str):
    import datasets
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"dataset {where}: pick a split (one of {list(ds)}), e.g. '{label}:train'")
    return [(f"row {i}", r) for i, r in enumerate(ds, start=1)], []


def read_datasets(spec: dict, where: str, label: str):
    import datasets

    try:
        ds = datasets.load_dataset(**spec)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"could not load dataset {where}: {_cause(e)}") from e
    return _rows(ds, where, label)


def _data_files(folder: str) -> tuple[list[str], list[str]]:
    """(data files, other files) under ``folder`` (relative paths; hidden ones skipped)."""
    data, other = [], []
    for d, dirs, files in os.walk(folder):
        dirs[:] = sorted(x for x in dirs if not x.startswith((".", "__")))
        for name in sorted(files):
            if name.startswith("."):
                continue
            rel = os.path.relpath(os.path.join(d, name), folder)
            base = name.lower()
            for c in _COMPRESSION:
                base = base[:-len(c)] if base.endswith(c) else base
            (data if base.endswith(DATA_EXTENSIONS) else other).append(rel)
    return data, other


def _listing(files: list[str], n: int = 4) -> str:
    return ", ".join(files[:n]) + (f", ... ({len(files)} files)" if len(files) > n else "")


def read_folder(folder: str, split: str | None, where: str):
    import datasets

    if any(os.path.exists(os.path.join(folder, f)) for f in ("state.json", "dataset_dict.json")):
        try:
            ds = datasets.load_from_disk(folder)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{where}: could not load the saved dataset folder: {_cause(e)}") from e
        if isinstance(ds, datasets.DatasetDict) and split:
            if split not in ds:
                raise DataError(f"{where}: no split {split!r} (splits: {list(ds)})")
            ds = ds[split]
        return _rows(ds, where, folder)
    data, other = _data_files(folder)
    model = [f for f in sorted(os.listdir(folder)) if f.endswith(_MODEL_FILES) or f in _MODEL_FILES]
    if model:
        raise DataError(f"{where}: the folder looks like a model or training run folder "
                        f"({_listing(model, 2)}), not a dataset; give a data file (.jsonl, .json, "
                        f".parquet) or a folder of data files")
    if not data:
        found = f"it holds {_listing(other)}" if other else "it is empty"
        raise DataError(f"{where}: the folder has no data files ({', '.join(DATA_EXTENSIONS)}); "
                        f"{found}. Give a data file, or a folder of data files")
    try:
        ds = datasets.load_dataset(folder, split=split or "train")
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{where}: could not load the folder as a dataset (files: {_listing(data)}): "
                        f"{_cause(e)}") from e
    return _rows(ds, where, folder)


# ----------------------------------------------------------------------------- any source
def load_rows(source, split: str | None = None) -> tuple[str, list[tuple[str, Any]], list[tuple[str, str]]]:
    """Read raw rows -> ``(label, [(location, row)], [(location, json_error)])``."""
    info = source_info(source)
    try:
        import datasets
        if isinstance(source, datasets.Dataset):
            return "<dataset>", [(f"row {i}", r) for i, r in enumerate(source, start=1)], []
    except ImportError:  # pragma: no cover
        pass
    if isinstance(source, (list, tuple)):
        return "<rows>", [(f"row {i}", r) for i, r in enumerate(source, start=1)], []
    if isinstance(source, dict):
        spec = dict(source)
        path = spec.get("path")
        plain = set(spec) <= {"path", "split"}  # no other load_dataset arguments
        if isinstance(path, str) and (os.path.isfile(path) or (plain and os.path.isdir(path))):
            return load_rows(tag(path, info.key, info.holdout, info.names), spec.get("split") or split)
        spec.setdefault("split", split or "train")
        return (str(path),) + read_datasets(spec, info.where(str(path)), str(path))
    source = str(os.fspath(source))
    where = info.where(source)
    if os.path.isfile(source):
        ext = source.lower().rsplit(".", 1)[-1]
        if ext == "jsonl":
            return (source,) + read_jsonl(source)
        if ext == "json":
            return (source,) + read_json(source)
        if ext == "parquet":
            return (source,) + read_datasets({"path": "parquet", "data_files": source, "split": "train"},
                                             where, source)
        raise DataError(f"{where}: unsupported file type .{ext} (use .jsonl, .json or .parquet)")
    if os.path.isdir(source):
        return (source,) + read_folder(source, split, where)
    name, sep, sp = source.rpartition(":")
    if not (sep and name and sp and "/" not in sp):
        name, sp = source, split or "train"
    if name.startswith((".", "/", "~")) or name.lower().endswith((".jsonl", ".json", ".parquet")):
        raise DataError(f"data file not found: {info.where(name)}")
    spec = {"path": name, "split": sp}
    if "@" in name:  # NAME@CONFIG: a dataset with several configs (openai/gsm8k@main)
        spec["path"], _, spec["name"] = name.partition("@")
        if not (spec["path"] and spec["name"]):
            raise DataError(f"{where}: expected NAME@CONFIG[:SPLIT], e.g. openai/gsm8k@main:train")
    return (source,) + read_datasets(spec, where, source)
