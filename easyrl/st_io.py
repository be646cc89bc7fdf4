"""Minimal streaming safetensors reader/writer on numpy memory maps.

Reading maps the file and returns zero-copy views, so a caller can slice one tensor (or one
shard of it) without reading the rest. Writing computes the header from shapes first, then
streams each tensor's bytes as it is produced, so only one tensor is in host memory at a time.
bfloat16 uses `ml_dtypes` (a JAX dependency).
"""
from __future__ import annotations

import json
import struct
from typing import Callable, Dict, Iterable, Tuple

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
    pass


class SafetensorsFile:
    """Lazy view of one .safetensors file: `names()`, `shape(name)`, `get(name) -> np.ndarray`."""

    def __init__(self, path: str):
        self.path = str(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{self.path}: not a readable safetensors file ({e})") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self._header = header
        self._offset = 8 + n
        self._mm = None

    def names(self):
        return list(self._header)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return _DTYPES[self._header[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        info = self._header[name]
        start, end = info["data_offsets"]
        raw = self._mm[self._offset + start:self._offset + end]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_streaming(path: str, specs: Iterable[Tuple[str, Tuple[int, ...], np.dtype]],
                    produce: Callable[[str], np.ndarray], metadata: Dict[str, str] = None) -> int:
    """Write tensors `specs` (name, shape, dtype) to `path`, calling `produce(name)` for each one in
    order. Returns the number of data bytes written."""
    specs = list(specs)
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
