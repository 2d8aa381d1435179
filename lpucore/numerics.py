"""The VXM's arithmetic, defined once in plain NumPy.

This module is the specification of every VXM operation; the reference engine
calls it directly and the Cython engine (``src_pyx/_numerics.pxi``) repeats it
step for step, so the two are bit-identical.  Rules:

* Values travel as raw bits: a ``uint32`` array with one element per lane, of
  which the low ``dtype.bits`` bits count.
* Integers are two's complement; ``add``/``sub``/``mul``/``neg``/``abs``/shifts
  wrap to the width.
* Floats are IEEE 754 binary16/binary32 with round-to-nearest-even, no flush of
  subnormals, no fused multiply-add.  float16 arithmetic is done in float32 and
  rounded once to float16, which for + - * / sqrt equals correctly rounded
  float16 (float32 has 24 >= 2 x 11 + 2 significand bits).
* Every float *arithmetic* result that is NaN is the canonical quiet NaN
  (``0x7FC00000`` / ``0x7E00``); bit operations (and/or/xor/not/mov/select)
  move raw bits untouched.
* Transcendental functions are fixed sequences of float32 operations
  (:func:`exp_f32`, :func:`tanh_f32`, :func:`sigmoid_f32`); their accuracy
  against float64 is measured by ``tests/test_numerics.py`` and listed in the
  README.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import numpy.typing as npt

from . import dtypes as dt

# (The scalars are annotated: NumPy's stubs type scalar constructors as Any before Python 3.11.)
F32 = np.float32
QNAN32: np.uint32 = np.uint32(0x7FC00000)
QNAN16: np.uint32 = np.uint32(0x7E00)
NAN32: np.float32 = F32(np.nan)

# exp: Cody-Waite range reduction and the Cephes expf polynomial.
EXP_LO: np.float32 = F32(-104.0)                # beyond these exp is 0 / inf in float32
EXP_HI: np.float32 = F32(89.0)
LOG2E: np.float32 = F32(1.44269504088896341)
EXP_C1: np.float32 = F32(0.693359375)           # ln 2 = C1 + C2, C1 exact in 9 bits
EXP_C2: np.float32 = F32(-2.12194440e-4)
EXP_P: Tuple[np.float32, ...] = tuple(F32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                                       4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))
# tanh: the Cephes tanhf odd polynomial below 0.625, 1 - 2/(e^2x + 1) above.
TANH_SMALL: np.float32 = F32(0.625)
TANH_P: Tuple[np.float32, ...] = tuple(F32(c) for c in (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2,
                                                        1.33314422036e-1, -3.33332819422e-1))
ONE: np.float32 = F32(1.0)
TWO: np.float32 = F32(2.0)
ZERO: np.float32 = F32(0.0)


def mask_of(d: dt.DType) -> np.uint32:
    m: np.uint32 = np.uint32((1 << d.bits) - 1)
    return m


# ---------------------------------------------------------------------------
# bits <-> values
# ---------------------------------------------------------------------------
def to_int(bits: npt.NDArray[np.uint32], d: dt.DType) -> npt.NDArray[np.int64]:
    """Sign-extend raw bits of an integer dtype to int64."""
    b = bits.astype(np.uint32) & mask_of(d)
    return b.astype(np.uint32).view(np.int32).astype(np.int64) if d.bits == 32 else \
        b.astype(np.int64) - ((b.astype(np.int64) >> (d.bits - 1)) << d.bits)


def from_int(values: npt.NDArray[np.integer[Any]], d: dt.DType) -> npt.NDArray[np.uint32]:
    """Keep the low bits of integer values (wrap-around)."""
    return (np.asarray(values, dtype=np.int64) & int(mask_of(d))).astype(np.uint32)


def to_float(bits: npt.NDArray[np.uint32], d: dt.DType) -> npt.NDArray[np.float32]:
    """Raw bits of a float dtype to float32 values (exact for float16)."""
    b = bits.astype(np.uint32)
    if d.nbytes == 2:
        return (b & 0xFFFF).astype(np.uint16).view(np.float16).astype(F32)
    out: npt.NDArray[np.float32] = b.view(F32).copy()
    return out


def from_float(values: npt.NDArray[np.floating[Any]], d: dt.DType) -> npt.NDArray[np.uint32]:
    """float32 values to raw bits of ``d``: float16 rounds to nearest even; NaN is canonical."""
    v = np.asarray(values, dtype=F32)
    nan = np.isnan(v)
    if d.nbytes == 2:
        with np.errstate(over="ignore"):
            out = v.astype(np.float16).view(np.uint16).astype(np.uint32)
        out[nan] = QNAN16
    else:
        out = v.view(np.uint32).copy()
        out[nan] = QNAN32
    return out


# ---------------------------------------------------------------------------
# transcendental sequences (float32 in, float32 out)
# ---------------------------------------------------------------------------
def _pow2(k: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    """2**k as float32 for integer k in [-126, 127], built from the exponent bits."""
    return ((k.astype(np.int64) + 127) << 23).astype(np.uint32).view(F32)


def exp_f32(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    x = np.asarray(x, dtype=F32)
    with np.errstate(all="ignore"):
        nan = np.isnan(x)
        xc = np.minimum(np.maximum(np.where(nan, ZERO, x), EXP_LO), EXP_HI)
        n = np.rint(xc * LOG2E)
        r = xc - n * EXP_C1
        r = r - n * EXP_C2
        z = r * r
        p = EXP_P[0]
        for c in EXP_P[1:]:
            p = p * r + c
        p = p * z + r
        p = p + ONE
        ni = n.astype(np.int64)
        n1 = ni >> 1                      # floor(n / 2): both halves stay normal powers of two
        n2 = ni - n1
        y = (p * _pow2(n1)) * _pow2(n2)
        return np.where(nan, NAN32, y).astype(F32)


def tanh_f32(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    x = np.asarray(x, dtype=F32)
    with np.errstate(all="ignore"):
        ax = np.abs(x)
        z = x * x
        p = TANH_P[0]
        for c in TANH_P[1:]:
            p = p * z + c
        small = p * z * x + x
        e = exp_f32(ax + ax)
        big: npt.NDArray[np.float32] = ONE - TWO / (e + ONE)
        big = np.where(x < ZERO, -big, big)
        return np.where(ax < TANH_SMALL, small, big).astype(F32)


def sigmoid_f32(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """1 / (1 + e**-x) for x >= 0, e**x / (1 + e**x) below, so that the tail towards
    -inf keeps its (subnormal) precision instead of flushing to zero."""
    x = np.asarray(x, dtype=F32)
    with np.errstate(all="ignore"):
        e = exp_f32(-np.abs(x))
        d: npt.NDArray[np.float32] = ONE + e
        return np.where(x >= ZERO, ONE / d, e / d).astype(F32)


def _float_unary(name: str, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    r: npt.NDArray[np.float32]              # (NumPy's stubs type scalar / array as Any)
    with np.errstate(all="ignore"):
        if name == "exp":
            return exp_f32(x)
        if name == "tanh":
            return tanh_f32(x)
        if name == "sigmoid":
            return sigmoid_f32(x)
        if name == "rsqrt":
            r = ONE / np.sqrt(x)
            return r
        if name == "recip":
            r = ONE / x
            return r
        if name == "sqrt":
            return np.sqrt(x)
        if name == "neg":
            return -x
        if name == "abs":
            return np.abs(x)
        if name == "relu":
            return np.where(np.isnan(x), x, np.where(x > ZERO, x, ZERO))
    raise KeyError(name)


# ---------------------------------------------------------------------------
# conversions
# ---------------------------------------------------------------------------
def _int_range(d: dt.DType) -> Tuple[int, int]:
    return -(1 << (d.bits - 1)), (1 << (d.bits - 1)) - 1


def convert(bits: npt.NDArray[np.uint32], src: dt.DType, to: dt.DType) -> npt.NDArray[np.uint32]:
    """The ``cvt`` instruction."""
    if src == to:
        return bits.astype(np.uint32) & mask_of(to)
    if not src.is_float and not to.is_float:
        lo, hi = _int_range(to)
        return from_int(np.clip(to_int(bits, src), lo, hi), to)
    if src.is_float and to.is_float:
        return from_float(to_float(bits, src), to)
    if not src.is_float:                         # int -> float, through float32
        return from_float(to_int(bits, src).astype(F32), to)
    x = to_float(bits, src)                      # float -> int
    lo, hi = _int_range(to)
    with np.errstate(invalid="ignore"):
        r = np.rint(x).astype(np.float64)
        r = np.where(np.isnan(r), 0.0, np.clip(r, lo, hi))
    return from_int(r.astype(np.int64), to)


def requant(bits: npt.NDArray[np.uint32], mult: int, shift: int, zp: int) -> npt.NDArray[np.uint32]:
    """int32 -> int8: saturate(round_half_even(a * mult / 2**shift) + zp)."""
    p = to_int(bits, dt.INT32) * np.int64(mult)
    if shift:
        q = p >> shift
        rem = p - (q << shift)
        half = np.int64(1) << (shift - 1)
        q = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).astype(np.int64)
    else:
        q = p
    return from_int(np.clip(q + zp, -128, 127), dt.INT8)


# ---------------------------------------------------------------------------
# one VXM instruction
# ---------------------------------------------------------------------------
def vxm(mnemonic: str, d: dt.DType, a: Optional[npt.NDArray[np.uint32]] = None,
        b: Optional[npt.NDArray[np.uint32]] = None, m: Optional[npt.NDArray[np.uint32]] = None, *,
        to: Optional[dt.DType] = None, imm: int = 0, shift: int = 0, zp: int = 0,
        lanes: int = 0) -> npt.NDArray[np.uint32]:
    """Result bits of one VXM instruction given its operands' raw bits."""
    mk = mask_of(d)
    if mnemonic == "const":
        return np.full(lanes, np.uint32(imm & 0xFFFFFFFF) & mk, dtype=np.uint32)
    a = _need(a, mnemonic, "a")
    if mnemonic == "cvt":
        if to is None:
            raise TypeError("VXM cvt needs the dtype to convert to")
        return convert(a, d, to)
    if mnemonic == "requant":
        return requant(a, imm, shift, zp)
    if mnemonic in ("and", "or", "xor", "not", "mov", "select"):
        return _vxm_bits(mnemonic, mk, a, b, m)
    if mnemonic in ("eq", "ne", "lt", "le", "gt", "ge"):
        return _vxm_compare(mnemonic, d, mk, a, _need(b, mnemonic, "b"))
    if d.is_float:
        return _vxm_float(mnemonic, d, a, b)
    return _vxm_int(mnemonic, d, a, b)


def _need(x: Optional[npt.NDArray[np.uint32]], mnemonic: str, name: str) -> npt.NDArray[np.uint32]:
    """An operand the instruction cannot do without."""
    if x is None:
        raise TypeError(f"VXM {mnemonic} needs operand {name}")
    return x


def _vxm_bits(mnemonic: str, mk: np.uint32, a: npt.NDArray[np.uint32], b: Optional[npt.NDArray[np.uint32]],
              m: Optional[npt.NDArray[np.uint32]]) -> npt.NDArray[np.uint32]:
    """and/or/xor/not/mov/select: raw bits, untouched but for the width."""
    a32 = a.astype(np.uint32)
    if mnemonic == "not":
        return (~a32) & mk
    if mnemonic == "mov":
        return a32 & mk
    b = _need(b, mnemonic, "b")
    if mnemonic == "and":
        return (a32 & b) & mk
    if mnemonic == "or":
        return (a32 | b) & mk
    if mnemonic == "xor":
        return (a32 ^ b) & mk
    sel: npt.NDArray[np.uint32] = np.where((_need(m, mnemonic, "m") & mk) != 0, a32, b)
    return sel & mk


def _vxm_compare(mnemonic: str, d: dt.DType, mk: np.uint32, a: npt.NDArray[np.uint32],
                 b: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint32]:
    """eq/ne/lt/le/gt/ge: a mask of all ones where true."""
    x, y = (to_float(a, d), to_float(b, d)) if d.is_float else (to_int(a, d), to_int(b, d))
    with np.errstate(invalid="ignore"):
        t = {"eq": x == y, "ne": x != y, "lt": x < y, "le": x <= y, "gt": x > y, "ge": x >= y}[mnemonic]
    out: npt.NDArray[np.uint32] = np.where(t, mk, np.uint32(0)).astype(np.uint32)
    return out


def _vxm_float(mnemonic: str, d: dt.DType, a: npt.NDArray[np.uint32],
               b: Optional[npt.NDArray[np.uint32]]) -> npt.NDArray[np.uint32]:
    """Float arithmetic: unary (b is None) or binary."""
    x = to_float(a, d)
    if b is None:
        return from_float(_float_unary(mnemonic, x), d)
    y = to_float(b, d)
    with np.errstate(all="ignore"):
        if mnemonic == "add":
            r = x + y
        elif mnemonic == "sub":
            r = x - y
        elif mnemonic == "mul":
            r = x * y
        elif mnemonic == "div":
            r = x / y
        elif mnemonic in ("min", "max"):
            # Equal operands (including +0 and -0) combine their bits, so that
            # min(-0, +0) = -0 and max(-0, +0) = +0 whatever the order.
            xb, yb = x.view(np.uint32), y.view(np.uint32)
            tie = (xb | yb) if mnemonic == "min" else (xb & yb)
            first = (x < y) if mnemonic == "min" else (x > y)
            second = (y < x) if mnemonic == "min" else (y > x)
            r = np.where(first, x, np.where(second, y, tie.view(F32)))
            r = np.where(np.isnan(x) | np.isnan(y), NAN32, r)
        else:
            raise KeyError(mnemonic)
    return from_float(np.asarray(r, dtype=F32), d)


def _vxm_int(mnemonic: str, d: dt.DType, a: npt.NDArray[np.uint32],
             b: Optional[npt.NDArray[np.uint32]]) -> npt.NDArray[np.uint32]:
    """Integer arithmetic: unary (b is None) or binary; wraps to the width."""
    x = to_int(a, d)
    if b is None:
        if mnemonic == "neg":
            return from_int(-x, d)
        if mnemonic == "abs":
            return from_int(np.abs(x), d)
        if mnemonic == "relu":
            return from_int(np.maximum(x, 0), d)
        raise KeyError(mnemonic)
    if mnemonic in ("shl", "shr"):
        s = (b.astype(np.int64) & (d.bits - 1))
        return from_int(x << s if mnemonic == "shl" else x >> s, d)
    y = to_int(b, d)
    if mnemonic == "add":
        return from_int(x + y, d)
    if mnemonic == "sub":
        return from_int(x - y, d)
    if mnemonic == "mul":
        # int64 products of int32 operands do not overflow; keep the low bits.
        return from_int(x * y, d)
    if mnemonic == "min":
        return from_int(np.minimum(x, y), d)
    if mnemonic == "max":
        return from_int(np.maximum(x, y), d)
    raise KeyError(mnemonic)


# ---------------------------------------------------------------------------
# byte planes
# ---------------------------------------------------------------------------
def planes_to_bits(planes: Sequence[npt.NDArray[np.uint8]], d: dt.DType) -> npt.NDArray[np.uint32]:
    """Byte planes (least significant first) of one stream group -> uint32 bits per lane."""
    out = np.zeros(len(planes[0]), dtype=np.uint32)
    for i, p in enumerate(planes[: d.nbytes]):
        out |= np.asarray(p, dtype=np.uint32) << (8 * i)
    return out


def bits_to_planes(bits: npt.NDArray[np.uint32], d: dt.DType) -> List[npt.NDArray[np.uint8]]:
    """uint32 bits per lane -> list of ``d.nbytes`` uint8 byte planes."""
    return [((bits >> (8 * i)) & 0xFF).astype(np.uint8) for i in range(d.nbytes)]
