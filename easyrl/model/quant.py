"""Weight-only quantization of frozen dense kernels: int8 (StackLLaMA's 8-bit base) and 4-bit NF4
with optional double quantization (QLoRA, Dettmers et al. 2023, as bitsandbytes stores it).

Pure `jax.numpy` primitives, no flax state. A kernel is stored [in, out] (flax orientation), or
stacked under `nn.scan` as [L, in, out] (any number of leading axes works: they are kept on every
array, so a scan that slices axis 0 of each leaf sees one layer's quantized kernel). A quantized
kernel is a dict of arrays only (a pytree; the static settings are recovered from the shapes):

int8 -- `quantize_int8(w, axis=-2)`, symmetric absmax per output channel (per layer):
    q      int8    [..., in, out]   round(w * (1/scale)) clipped to [-127, 127] (half to even)
    scale  float32 [..., 1, out]    absmax over `axis` * (1/127) (1.0 where the absmax is 0)
    w ~= q * scale.  (`axis` is the reduced axis, kept as size 1; -2 = the `in` axis.)

Divisions are written as float32 reciprocal multiplies (1/127 and 1/scale rounded to float32,
then one multiply), as bitsandbytes' kernels do: XLA rewrites `x / broadcast(y)` into exactly
that anyway, so writing it out makes the stored numbers the same on every backend and under jit
or not. They differ from a correctly rounded division by at most one float32 ulp.

NF4 -- `quantize_nf4(w, block=64)`: blocks of `block` consecutive values along `in` (axis -2)
of each output column (an in size that is not a multiple of block gets its last block padded
with zeros, as bitsandbytes pads: the arrays hold `padded_in(in, block)` rows and
`dequantize(qd, n_in=in)` cuts them off), so splitting `in` or `out` over a mesh axis
splits every array along the same axis, as long as each shard of `in` holds whole blocks
((in / shards) % block == 0; with double quant also (out / shards) % dq_block == 0):
    codes   uint8   [..., in/2, out]      two 4-bit codes per byte along `in`: the value at
                                          in-index 2i is the HIGH nibble, 2i+1 the LOW nibble
                                          (bitsandbytes' order: `q(v[2j]) << 4 | q(v[2j+1])`)
    absmax  float32 [..., in/block, out]  max |w| of each block
    w ~= NF4_LEVELS[code] * absmax (of its block); code = the nearest level to
    x = w * (1/absmax) (float32 reciprocal, as above; 0 for an all-zero block). The
    nearest level is found as bitsandbytes' `dQuantizeNF4` does, by comparisons with the 15
    midpoints (x > midpoint -> the upper level), so an exact tie goes to the lower level, as
    `argmin |x - level|` would. block = 2 * codes.shape[-2] / absmax.shape[-2].

NF4 + double quant -- `quantize_nf4(w, block, double_quant=True, dq_block=256)`: the block
absmaxes (a [..., in/block, out] float32 array) are themselves quantized, as QLoRA does:
    absmax_mean  float32 [..., 1, 1]                    mean of the absmaxes (per layer)
    absmax_q     int8    [..., in/block, out]           round((absmax - mean) / absmax_scale)
    absmax_scale float32 [..., in/block, out/dq_block]  absmax of (absmax - mean) over each run of
                                                        dq_block consecutive absmaxes along
                                                        `out`, / 127 (1.0 where that is 0)
    (the same reciprocal multiplies as int8)
    absmax ~= absmax_q * absmax_scale + absmax_mean (requires out % dq_block == 0);
    dq_block = absmax_q.shape[-1] / absmax_scale.shape[-1].
    Two deliberate differences from bitsandbytes' `compress_statistics`, both keeping every array
    a plain per-axis split of the kernel's sharding and every layer of a stacked kernel
    independent: the mean is taken per layer (bitsandbytes: one over the whole tensor), and the
    second-level code is linear symmetric int8 (bitsandbytes: its 8-bit dynamic map) over runs
    of dq_block absmaxes along `out` (bitsandbytes: along its flattened [out, in/block] order).

Memory (bits per parameter, large kernels): int8 8 + 32/in; NF4 4 + 32/block = 4.5 at block 64;
NF4 + double quant 4 + 8/block + 32/(block * dq_block) = 4.127 at 64 / 256 (plus 4 bytes of mean
per layer). `nbytes_per_param` gives these in bytes, `quantized_nbytes` the exact bytes of the
arrays for one kernel shape.

The 16 NF4 levels are bitsandbytes' table (`bitsandbytes/functional.py`, `get_4bit_type("nf4")`,
the same values as `dDequantizeNF4` in csrc/kernels.cu): equal-area quantiles of N(0, 1)
normalized to [-1, 1], with an exact zero and one more positive level than negative.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Dict, Optional, Sequence

import jax.numpy as jnp
import numpy as np

# bitsandbytes functional.get_4bit_type("nf4"), in code order 0..15.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)
NF4_ZERO_CODE = 7  # NF4_LEVELS[7] == 0.0: an all-zero block dequantizes to exact zeros
# Decision thresholds between adjacent levels (bitsandbytes' dQuantizeNF4 tree uses the same).
_NF4_MIDPOINTS = ((NF4_LEVELS[:-1].astype(np.float64) + NF4_LEVELS[1:]) / 2).astype(np.float32)

INT8_KEYS = frozenset({"q", "scale"})
NF4_KEYS = frozenset({"codes", "absmax"})
NF4_DQ_KEYS = frozenset({"codes", "absmax_q", "absmax_scale", "absmax_mean"})
KINDS = ("int8", "nf4")
_FLOAT_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}


def _label(name: Optional[str]) -> str:
    return f"kernel {name!r}" if name else "kernel"


def _check_float(w, fn: str, name: Optional[str]):
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"{fn}: {_label(name)} of shape {tuple(w.shape)} has dtype {w.dtype}; "
                         f"expected a floating-point kernel (already quantized?)")


def _check_block(value, what: str, fn: str):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{fn}: {what} must be a positive integer, got {value!r}")


def _nf4_dims(shape: Sequence[int], block: int, double_quant: bool, dq_block: int,
              fn: str, name: Optional[str]):
    """(in, out) of a kernel shape, or one clear ValueError for a shape NF4 can't store."""
    shape = tuple(int(s) for s in shape)
    _check_block(block, "block", fn)
    if block % 2:
        raise ValueError(f"{fn}: block must be even (two 4-bit codes per byte along the in axis), "
                         f"got {block}")
    if len(shape) < 2:
        raise ValueError(f"{fn}: {_label(name)} of shape {shape} is not a dense kernel; expected "
                         f"[in, out] or [L, in, out]")
    n_in, n_out = shape[-2], shape[-1]
    if double_quant:
        _check_block(dq_block, "dq_block", fn)
        if n_out % dq_block:
            raise ValueError(
                f"{fn}: {_label(name)} of shape {shape} has out = {n_out} (axis -1), which is not "
                f"a multiple of dq_block = {dq_block}; double quantization quantizes the block "
                f"absmaxes in runs of dq_block along the out axis, so use a dq_block that "
                f"divides {n_out}")
    return n_in, n_out


_INV127 = np.float32(1.0 / 127.0)


def _absmax_scale(absmax):
    """absmax * float32(1/127), 1.0 where absmax is 0 (no 0/0 downstream)."""
    return jnp.where(absmax > 0, absmax * _INV127, 1.0).astype(jnp.float32)


# ---- int8 ------------------------------------------------------------------------------------
def quantize_int8(w, axis: int = -2, name: Optional[str] = None) -> Dict[str, Any]:
    """Symmetric absmax int8 of kernel `w` with one scale per slice along `axis` (default -2, the
    `in` axis of [..., in, out]: one scale per output column, per layer). Returns
    {"q": int8 like w, "scale": float32 with `axis` kept as size 1}; `name` labels errors."""
    w = jnp.asarray(w)
    _check_float(w, "quantize_int8", name)
    if w.ndim < 1 or not -w.ndim <= axis < w.ndim:
        raise ValueError(f"quantize_int8: axis {axis} is out of range for {_label(name)} of "
                         f"shape {tuple(w.shape)}")
    w = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w), axis=axis, keepdims=True)
    scale = _absmax_scale(absmax)
    q = jnp.clip(jnp.round(w * (1.0 / scale)), -127, 127).astype(jnp.int8)
    return {"q": q, "scale": scale}


def dequantize_int8(qd: Mapping, dtype=jnp.float32):
    """q * scale, computed in float32 and returned in `dtype`."""
    return (qd["q"].astype(jnp.float32) * qd["scale"].astype(jnp.float32)).astype(dtype)


# ---- NF4 packing -----------------------------------------------------------------------------
def pack_nibbles(codes, axis: int = -2):
    """uint8 codes 0..15 -> two per byte along `axis` (its size must be even): the element at
    index 2i goes to the high nibble, 2i+1 to the low nibble. The axis halves."""
    codes = jnp.asarray(codes).astype(jnp.uint8)
    axis = axis % codes.ndim
    n = codes.shape[axis]
    if n % 2:
        raise ValueError(f"pack_nibbles: axis {axis} of shape {tuple(codes.shape)} has odd size")
    pairs = codes.reshape(codes.shape[:axis] + (n // 2, 2) + codes.shape[axis + 1:])
    hi = jnp.take(pairs, 0, axis=axis + 1)
    lo = jnp.take(pairs, 1, axis=axis + 1)
    return ((hi << 4) | (lo & 0x0F)).astype(jnp.uint8)


def unpack_nibbles(packed, axis: int = -2):
    """Inverse of `pack_nibbles`: uint8 [..., n/2, ...] -> codes uint8 [..., n, ...]."""
    packed = jnp.asarray(packed)
    axis = axis % packed.ndim
    hi = packed >> 4
    lo = packed & 0x0F
    both = jnp.stack([hi, lo], axis=axis + 1)
    shape = packed.shape[:axis] + (2 * packed.shape[axis],) + packed.shape[axis + 1:]
    return both.reshape(shape).astype(jnp.uint8)


def nf4_code(x):
    """Codes 0..15 of the nearest NF4 level to each x (x = w / absmax, in [-1, 1]); an exact tie
    between two levels goes to the lower one (bitsandbytes' dQuantizeNF4)."""
    x = jnp.asarray(x, jnp.float32)
    code = jnp.zeros(x.shape, jnp.uint8)
    for m in _NF4_MIDPOINTS:  # 15 compares, no [..., 16] intermediate
        code = code + (x > m).astype(jnp.uint8)
    return code


# ---- NF4 -------------------------------------------------------------------------------------
def _blocks(x, block: int):
    """[..., in, out] -> [..., in/block, block, out]."""
    return x.reshape(x.shape[:-2] + (x.shape[-2] // block, block, x.shape[-1]))


def _quantize_absmax(absmax, dq_block: int):
    """Double quantization of the block absmaxes [..., nb, out] (see the module docstring)."""
    mean = jnp.mean(absmax, axis=(-2, -1), keepdims=True)
    c = absmax - mean
    runs = c.reshape(c.shape[:-1] + (c.shape[-1] // dq_block, dq_block))
    scale2 = _absmax_scale(jnp.max(jnp.abs(runs), axis=-1))
    q2 = jnp.clip(jnp.round(runs * (1.0 / scale2)[..., None]), -127, 127).astype(jnp.int8)
    return {"absmax_q": q2.reshape(c.shape), "absmax_scale": scale2,
            "absmax_mean": mean.astype(jnp.float32)}


def padded_in(n_in: int, block: int) -> int:
    """The in size NF4 stores: `n_in` rounded up to whole blocks (the last block is padded with
    zeros, as bitsandbytes pads its flattened tensor to a multiple of the blocksize)."""
    return -(-int(n_in) // int(block)) * int(block)


def quantize_nf4(w, block: int = 64, double_quant: bool = False, dq_block: int = 256,
                 name: Optional[str] = None) -> Dict[str, Any]:
    """NF4 of kernel `w` [..., in, out] in blocks of `block` along `in` (see the module docstring
    for the arrays and the nibble order). `double_quant` also quantizes the block absmaxes (int8
    in runs of `dq_block` along `out`). `name` labels errors. Shapes must be static (jit-safe)."""
    w = jnp.asarray(w)
    _check_float(w, "quantize_nf4", name)
    n_in, _ = _nf4_dims(w.shape, block, double_quant, dq_block, "quantize_nf4", name)
    w = w.astype(jnp.float32)
    pad = padded_in(n_in, block) - n_in
    if pad:  # the last block padded with zeros (they dequantize to exact zeros, code 7)
        w = jnp.pad(w, [(0, 0)] * (w.ndim - 2) + [(0, pad), (0, 0)])
    xb = _blocks(w, block)                                          # [..., nb, block, out]
    absmax = jnp.max(jnp.abs(xb), axis=-2)                          # [..., nb, out]
    inv = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
    codes = nf4_code(xb * inv[..., None, :]).reshape(w.shape)       # zero block -> code 7
    out = {"codes": pack_nibbles(codes, axis=-2)}
    if double_quant:
        out.update(_quantize_absmax(absmax, dq_block))
    else:
        out["absmax"] = absmax
    return out


def nf4_absmax(qd: Mapping):
    """The float32 block absmaxes [..., in/block, out] of an NF4 dict (reconstructed from the
    second-level code under double quant)."""
    if "absmax" in qd:
        return qd["absmax"].astype(jnp.float32)
    q2, s2 = qd["absmax_q"], qd["absmax_scale"]
    dq = q2.shape[-1] // s2.shape[-1]
    runs = q2.reshape(q2.shape[:-1] + (s2.shape[-1], dq)).astype(jnp.float32)
    return (runs * s2[..., None]).reshape(q2.shape) + qd["absmax_mean"]


def dequantize_nf4(qd: Mapping, dtype=jnp.float32, n_in: Optional[int] = None):
    """NF4_LEVELS[code] * absmax of its block, computed in float32 and returned in `dtype`:
    [..., in, out] with in the stored (block-padded) size, or the first `n_in` rows (the
    kernel's true in size, when its last block was padded)."""
    codes = unpack_nibbles(qd["codes"], axis=-2)                    # [..., in_pad, out]
    absmax = nf4_absmax(qd)                                         # [..., nb, out]
    block = codes.shape[-2] // absmax.shape[-2]
    vals = jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)]
    out = (_blocks(vals, block) * absmax[..., None, :]).reshape(codes.shape).astype(dtype)
    if n_in is not None and n_in != out.shape[-2]:
        out = out[..., :n_in, :]
    return out


# ---- dispatch --------------------------------------------------------------------------------
def quant_kind(x) -> Optional[str]:
    """'int8', 'nf4' (with or without double quant) or None for anything else."""
    if not isinstance(x, Mapping):
        return None
    keys = frozenset(x.keys())
    if keys == INT8_KEYS:
        return "int8"
    if keys in (NF4_KEYS, NF4_DQ_KEYS):
        return "nf4"
    return None


def is_quantized(x) -> bool:
    """Is `x` a dict made by `quantize_int8` / `quantize_nf4` (judged by its exact key set)?"""
    return quant_kind(x) is not None


def dequantize(qd, dtype=jnp.float32, n_in: Optional[int] = None):
    """The dense kernel in `dtype` of a quantized dict (any kind), jit-compatible. `n_in`: the
    kernel's in size (NF4 stores whole blocks: a padded last block is cut off)."""
    kind = quant_kind(qd)
    if kind == "int8":
        return dequantize_int8(qd, dtype)
    if kind == "nf4":
        return dequantize_nf4(qd, dtype, n_in)
    keys = sorted(qd.keys()) if isinstance(qd, Mapping) else type(qd).__name__
    raise ValueError(f"dequantize: not a quantized kernel (keys {keys}); expected the keys "
                     f"{sorted(INT8_KEYS)}, {sorted(NF4_KEYS)} or {sorted(NF4_DQ_KEYS)}")


def quantize(w, kind: str, *, block: int = 64, double_quant: bool = False, dq_block: int = 256,
             name: Optional[str] = None) -> Dict[str, Any]:
    """`quantize_int8(w)` (kind 'int8') or `quantize_nf4(w, ...)` (kind 'nf4')."""
    if kind == "int8":
        return quantize_int8(w, name=name)
    if kind == "nf4":
        return quantize_nf4(w, block=block, double_quant=double_quant, dq_block=dq_block,
                            name=name)
    raise ValueError(f"quantize: unknown kind {kind!r}; expected one of {KINDS}")


# ---- memory ----------------------------------------------------------------------------------
def nbytes_per_param(kind: str, block: int = 64, double_quant: bool = False,
                     dq_block: int = 256, in_features: Optional[int] = None) -> float:
    """Bytes per parameter of a stored kernel, scales included, for a planner.

    'nf4': 0.5 + 4/block (0.5625 = 4.5 bits at 64), with double quant
    0.5 + 1/block + 4/(block*dq_block) (0.515869 = 4.127 bits at 64/256); the per-layer mean
    (4 bytes) is left out. 'int8': 1 + 4/in_features (1.0 when in_features is not given: the
    per-column scale is 4 bytes per column). 'float32' / 'bfloat16' / 'float16': 4 / 2 / 2, for
    an unquantized kernel. Exact counts for one shape: `quantized_nbytes`."""
    if kind == "int8":
        return 1.0 + (4.0 / in_features if in_features else 0.0)
    if kind == "nf4":
        _check_block(block, "block", "nbytes_per_param")
        if double_quant:
            _check_block(dq_block, "dq_block", "nbytes_per_param")
            return 0.5 + 1.0 / block + 4.0 / (block * dq_block)
        return 0.5 + 4.0 / block
    if kind in _FLOAT_BYTES:
        return _FLOAT_BYTES[kind]
    raise ValueError(f"nbytes_per_param: unknown kind {kind!r}; expected one of "
                     f"{KINDS + tuple(_FLOAT_BYTES)}")


def quantized_nbytes(shape: Sequence[int], kind: str, block: int = 64, double_quant: bool = False,
                     dq_block: int = 256, axis: int = -2) -> int:
    """Exact bytes of the arrays `quantize_int8(w, axis)` / `quantize_nf4(w, block, ...)` make
    for a kernel of `shape` (the sum of their `.nbytes`); the same shape checks as quantizing."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if kind == "int8":
        if not shape or not -len(shape) <= axis < len(shape):
            raise ValueError(f"quantized_nbytes: axis {axis} is out of range for shape {shape}")
        return n + 4 * (n // shape[axis] if shape[axis] else 0)
    if kind == "nf4":
        n_in, n_out = _nf4_dims(shape, block, double_quant, dq_block, "quantized_nbytes", None)
        lead = math.prod(shape[:-2])
        n = lead * padded_in(n_in, block) * n_out  # the last block padded
        n_abs = n // block
        if double_quant:
            return n // 2 + n_abs + 4 * (n_abs // dq_block) + 4 * lead
        return n // 2 + 4 * n_abs
    if kind in _FLOAT_BYTES:
        return int(_FLOAT_BYTES[kind]) * n
    raise ValueError(f"quantized_nbytes: unknown kind {kind!r}; expected one of "
                     f"{KINDS + tuple(_FLOAT_BYTES)}")
