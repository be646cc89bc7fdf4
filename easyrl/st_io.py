"""Minimal streaming safetensors reader/writer on numpy memory maps.

Reading maps the file and returns zero-copy views, so a caller can slice one tensor (or one
shard of it) without reading the rest. Writing computes the header from shapes first, then
streams each tensor's bytes as it is produced, so only one tensor is in host memory at a time.
bfloat16 uses `ml_dtypes` (a JAX dependency).

The reader checks a file as the `safetensors` package does before any tensor is touched: the
header length is capped (100 MB) and must fit in the file; the header is a UTF-8 JSON object with
no repeated names; `__metadata__` maps str to str; every tensor has a known dtype, a shape of
non-negative ints and `data_offsets` [start, end] with end - start = itemsize x prod(shape); the
byte ranges, sorted, tile the data region exactly (start at 0, no gap, no overlap, nothing left
over). Any violation is one `SafetensorsError` naming the file and, where it applies, the tensor.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Dict, Iterable, Tuple

import ml_dtypes
import numpy as np

# the dtypes easyrl reads and writes; the rest of the format's (F8_*, U16-U64, C64, ...) are refused
_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
# valid in the format, not read by easyrl
_OTHER_DTYPES = ("F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F6_E2M3",
                 "F6_E3M2", "F4", "U16", "U32", "U64", "C64")
MAX_HEADER_BYTES = 100_000_000  # the safetensors package's cap


class SafetensorsError(ValueError):
    pass


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _no_repeats(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise SafetensorsError(f"name {k!r} appears twice in one JSON object")
        out[k] = v
    return out


def read_header(path: str) -> Tuple[dict, dict, int]:
    """(tensor infos, metadata, data offset) of safetensors file `path`, fully checked (see the
    module docstring); raises SafetensorsError."""
    def bad(msg, name=None):
        where = f" tensor {name!r}:" if name is not None else ""
        return SafetensorsError(f"{path}:{where} {msg}")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise bad(f"not a safetensors file ({size} bytes, shorter than the 8-byte header "
                          f"length)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise bad(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap (corrupt "
                          f"or not a safetensors file)")
            if 8 + n > size:
                raise bad(f"header length {n} runs past the end of the file ({size} bytes)")
            blob = f.read(n)
    except OSError as e:
        raise bad(f"not readable ({e})") from e
    try:
        header = json.loads(blob.decode("utf-8"), object_pairs_hook=_no_repeats)
    except SafetensorsError as e:
        raise bad(f"invalid header: {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad(f"header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad(f"__metadata__ must map str to str, got {json.dumps(metadata)[:80]}")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise bad("entry must be an object with dtype, shape and data_offsets", name)
        dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dt not in _DTYPES:
            why = "is not read by easyrl" if dt in _OTHER_DTYPES else "is not a safetensors dtype"
            raise bad(f"dtype {dt!r} {why} (easyrl reads {sorted(_DTYPES)})", name)
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise bad(f"shape {shape!r} must be a list of non-negative ints", name)
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_uint(o) for o in offs)
                and offs[0] <= offs[1]):
            raise bad(f"data_offsets {offs!r} must be [start, end] with 0 <= start <= end", name)
        want = _DTYPES[dt].itemsize * int(np.prod(shape, dtype=object))
        if offs[1] - offs[0] != want:
            raise bad(f"data_offsets {offs} span {offs[1] - offs[0]} bytes, {dt} x {shape} needs "
                      f"{want}", name)
        spans.append((offs[0], offs[1], name))
    pos, prev = 0, None
    for s, e, name in sorted(spans):
        if s != pos:
            what = f"overlaps tensor {prev!r}" if s < pos else f"leaves a gap after byte {pos}"
            raise bad(f"data_offsets [{s}, {e}] {what}", name)
        pos, prev = e, name
    if pos > data_len:
        raise bad(f"data_offsets end at byte {pos}, past the end of the data ({data_len} bytes)",
                  prev)
    if pos != data_len:
        raise bad(f"{data_len - pos} bytes after the last tensor are not covered by the header "
                  f"(truncated header or trailing data)")
    return header, metadata, 8 + n


class SafetensorsFile:
    """Lazy view of one .safetensors file: `names()`, `shape(name)`, `get(name) -> np.ndarray`.
    The whole header is checked on open (`read_header`)."""

    def __init__(self, path: str):
        self.path = str(path)
        self._header, self.metadata, self._offset = read_header(self.path)
        self._mm = None

    def names(self):
        return list(self._header)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return _DTYPES[self._header[name]["dtype"]]

    def is_float(self, name: str) -> bool:
        return self._header[name]["dtype"] in ("F64", "F32", "F16", "BF16")

    def get(self, name: str) -> np.ndarray:
        info = self._header[name]
        start, end = info["data_offsets"]
        dt = _DTYPES[info["dtype"]]
        if start == end:
            return np.zeros(info["shape"], dt)
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mm[self._offset + start:self._offset + end]
        return raw.view(dt).reshape(info["shape"])


def write_streaming(path: str, specs: Iterable[Tuple[str, Tuple[int, ...], np.dtype]],
                    produce: Callable[[str], np.ndarray], metadata: Dict[str, str] = None) -> int:
    """Write tensors `specs` (name, shape, dtype) to `path`, calling `produce(name)` for each one in
    order. Returns the number of data bytes written."""
    specs = list(specs)
    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SafetensorsError(f"{path}: __metadata__ must map str to str, got {metadata!r}")
    header, offset = {}, 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in specs:
            arr = np.ascontiguousarray(np.asarray(produce(name)).astype(dtype, copy=False))
            if arr.shape != tuple(shape):
                raise SafetensorsError(f"{path}: tensor {name} has shape {arr.shape}, header says {tuple(shape)}")
            f.write(arr.tobytes())
    return offset
