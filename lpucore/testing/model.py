"""An independent NumPy model of the VXM, for expected results in tests.

It uses NumPy's own typed arithmetic (int8 arrays wrap, float16 arrays round
through float32) and Python integers for requantisation, not lpucore.numerics,
except for exp/tanh/sigmoid, whose float32 sequences *are* lpucore's
definition (their accuracy against float64 is tested separately).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Dict, List

import numpy as np

from .. import dtypes as dt
from .. import numerics

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def from_planes(planes: List[np.ndarray], d: dt.DType) -> np.ndarray:
    """Byte planes -> typed array of d."""
    raw = np.stack(planes, axis=-1).astype(np.uint8)
    return np.ascontiguousarray(raw).view(d.numpy.newbyteorder("<")).reshape(-1).astype(d.numpy)


def to_planes(values: np.ndarray, d: dt.DType) -> List[np.ndarray]:
    raw = np.ascontiguousarray(np.asarray(values, dtype=d.numpy).astype(d.numpy.newbyteorder("<"))).view(np.uint8)
    raw = raw.reshape(-1, d.nbytes)
    return [raw[:, i].copy() for i in range(d.nbytes)]


def _u(x: np.ndarray) -> np.ndarray:
    return x.view(_UINT[x.dtype.itemsize])


def _cvt(a: np.ndarray, src: dt.DType, to: dt.DType) -> np.ndarray:
    if src == to:
        return a.copy()
    if not src.is_float and not to.is_float:
        info = np.iinfo(to.numpy)
        return np.clip(a.astype(np.int64), info.min, info.max).astype(to.numpy)
    if src.is_float and to.is_float:
        with np.errstate(over="ignore"):
            return a.astype(np.float32).astype(to.numpy)
    if not src.is_float:
        with np.errstate(over="ignore"):
            return a.astype(np.float32).astype(to.numpy)
    info = np.iinfo(to.numpy)
    with np.errstate(invalid="ignore"):
        r = np.rint(a.astype(np.float32)).astype(np.float64)
    r = np.where(np.isnan(r), 0, np.clip(r, info.min, info.max))
    return r.astype(np.int64).astype(to.numpy)


def _requant(a: np.ndarray, mult: int, shift: int, zp: int) -> np.ndarray:
    out = []
    for x in a.astype(np.int64).tolist():
        q = round(Fraction(x * mult, 1 << shift)) + zp          # round() on a Fraction: half to even
        out.append(min(127, max(-128, q)))
    return np.array(out, dtype=np.int8)


def canonical_nan(x: np.ndarray) -> np.ndarray:
    """Float arithmetic on the VXM returns the default quiet NaN (sign clear)."""
    if x.dtype.kind != "f":
        return x
    out = x.copy()
    out[np.isnan(out)] = np.nan
    out = np.where(np.isnan(out), np.abs(out), out).astype(x.dtype)   # clear the sign some hosts set
    return out


def vxm(op, d: dt.DType, to: dt.DType, operands: Dict[str, np.ndarray], imm: Dict[str, int], lanes: int) -> np.ndarray:
    """Expected typed result of one VXM instruction."""
    r = _vxm(op, d, to, operands, imm, lanes)
    if op.cls in ("bits", "select", "const", "cmp") or (op.cls == "cvt" and d == to):
        return r
    return canonical_nan(r)


def _vxm_bits(mn, a, b, m, d):
    """Bitwise and/or/xor/not/mov/select on the raw bits of a (and b, m)."""
    ua = _u(a)
    if mn == "and":
        r = ua & _u(b)
    elif mn == "or":
        r = ua | _u(b)
    elif mn == "xor":
        r = ua ^ _u(b)
    elif mn == "not":
        r = ~ua
    elif mn == "mov":
        r = ua.copy()
    else:
        r = np.where(_u(m) != 0, ua, _u(b))
    return r.astype(ua.dtype).view(d.numpy)


def _vxm_cmp(mn, a, b, d):
    """A comparison: all-ones bits where it holds, zero elsewhere."""
    t = {"eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal,
         "gt": np.greater, "ge": np.greater_equal}[mn](a, b)
    ones = _UINT[d.nbytes](np.iinfo(_UINT[d.nbytes]).max)
    return np.where(t, ones, _UINT[d.nbytes](0)).astype(_UINT[d.nbytes]).view(d.numpy)


def _vxm_float_fn(mn, a, d):
    """sqrt/recip/rsqrt/exp/tanh/sigmoid, computed in float32 and rounded to d."""
    x = a.astype(np.float32)
    if mn == "sqrt":
        r = np.sqrt(x)
    elif mn == "recip":
        r = np.float32(1) / x
    elif mn == "rsqrt":
        r = np.float32(1) / np.sqrt(x)
    elif mn == "exp":
        r = numerics.exp_f32(x)
    elif mn == "tanh":
        r = numerics.tanh_f32(x)
    elif mn == "sigmoid":
        r = numerics.sigmoid_f32(x)
    else:
        raise KeyError(mn)
    return r.astype(d.numpy)


def _vxm(op, d, to, operands, imm, lanes):
    """Expected typed result of one VXM instruction, before NaN canonicalisation."""
    mn = op.mnemonic
    a, b, m = operands.get("a"), operands.get("b"), operands.get("m")
    with np.errstate(all="ignore"):
        if mn == "const":
            bits = imm["value"] & ((1 << d.bits) - 1)
            return np.full(lanes, bits, dtype=_UINT[d.nbytes]).view(d.numpy)
        if mn == "cvt":
            return _cvt(a, d, to)
        if mn == "requant":
            return _requant(a, imm["mult"], imm["shift"], imm["zp"])
        if mn in ("and", "or", "xor", "not", "mov", "select"):
            return _vxm_bits(mn, a, b, m, d)
        if mn in ("eq", "ne", "lt", "le", "gt", "ge"):
            return _vxm_cmp(mn, a, b, d)
        if mn in ("shl", "shr"):
            s = (_u(b).astype(np.int64) & (d.bits - 1)).astype(d.numpy)
            return (np.left_shift(a, s) if mn == "shl" else np.right_shift(a, s)).astype(d.numpy)
        if mn in ("add", "sub", "mul", "div", "min", "max"):
            f = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
                 "min": np.minimum, "max": np.maximum}[mn]
            return f(a, b).astype(d.numpy)
        if mn == "neg":
            return np.negative(a).astype(d.numpy)
        if mn == "abs":
            return np.abs(a).astype(d.numpy)
        if mn == "relu":
            if d.is_float:
                return np.where(np.isnan(a) | (a > 0), a, d.numpy.type(0)).astype(d.numpy)
            return np.maximum(a, 0).astype(d.numpy)
        return _vxm_float_fn(mn, a, d)


def same_float(actual: np.ndarray, expected: np.ndarray, signed_zero: bool = True) -> np.ndarray:
    """Lane-wise equality for floats: NaN equals NaN (any payload); +0 and -0 are
    told apart unless signed_zero is False."""
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    eq = (a == e) | (np.isnan(a) & np.isnan(e))
    if signed_zero:
        eq &= (np.signbit(a) == np.signbit(e)) | np.isnan(a)
    return eq


def compare_outputs(gen, chip) -> List[str]:
    """Differences between a chip's MEM and a GeneratedProgram's expected vectors.
    Integer and raw-bit results must match byte for byte; float results element by
    element (any NaN matches any NaN; the sign of zero is ignored for min/max,
    whose NumPy twins do not define it)."""
    cfg = chip.config
    problems = []
    in_float = {loc for locs, _, _ in gen.float_groups for loc in locs}
    for (g, a), vec in sorted(gen.expected.items()):
        if (g, a) in in_float:
            continue
        got = chip.engine.read_mem(g, a, 1)[0]
        if not np.array_equal(got, vec):
            bad = np.nonzero(got != vec)[0]
            problems.append(f"{cfg.slice_name(g)}:{a}: lanes {bad[:8].tolist()} got {got[bad[:8]].tolist()} "
                            f"expected {vec[bad[:8]].tolist()}")
    for locs, dname, op in gen.float_groups:
        d = dt.get(dname)
        got = from_planes([chip.engine.read_mem(g, a, 1)[0] for g, a in locs], d)
        exp = from_planes([gen.expected[x] for x in locs], d)
        ok = same_float(got, exp, signed_zero=op not in ("min", "max"))
        if not ok.all():
            bad = np.nonzero(~ok)[0]
            problems.append(f"{op} {dname} -> {[(cfg.slice_name(g), a) for g, a in locs]}: lanes {bad[:8].tolist()} "
                            f"got {got[bad[:8]].tolist()} expected {exp[bad[:8]].tolist()}")
    return problems


def sxm(mnemonic: str, data: Dict[str, np.ndarray], imm: Dict[str, int], cfg) -> np.ndarray:
    """Expected output vector (uint8 lanes) of a one-output SXM instruction."""
    L, n = cfg.lanes, cfg.lanes_per_superlane
    if mnemonic == "Shift":
        x, k = data["src"], imm["n"]
        return np.array([x[ln - k] if 0 <= ln - k < L else 0 for ln in range(L)], dtype=np.uint8)
    if mnemonic == "Permute":
        x, m = data["src"], data["map"].astype(np.int64)
        return np.array([x[m[ln]] if 0 <= m[ln] < L else 0 for ln in range(L)], dtype=np.uint8)
    if mnemonic == "Distribute":
        x, m = data["src"], data["map"].astype(np.int64)
        return np.array([x[(ln // n) * n + m[ln]] if m[ln] < n else 0 for ln in range(L)], dtype=np.uint8)
    if mnemonic == "Select":
        return np.where(data["m"] != 0, data["a"], data["b"]).astype(np.uint8)
    raise KeyError(mnemonic)
