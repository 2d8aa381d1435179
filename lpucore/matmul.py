"""The MXM's arithmetic: one plane multiplies activation vectors by its weights.

Numerics contract (both engines implement it bit for bit):

* **int8**: each output is the exact int32 dot product of up to 320 int8 x int8
  products (at most 320 x 128 x 128 < 2**24 in magnitude, so it never wraps).
  Accumulators add in int32 with two's-complement wrap-around.
* **float16**: each output is the dot product of 160 float16 x float16 products,
  computed *exactly* and rounded *once* to float32, nearest-even (P20 describes a
  dot product rounded once).  Products of finite float16 values are exact and the
  exact sum is a multiple of 2**-48 below 2**41, so it never overflows float32 nor
  lands in its subnormal range.  An exact zero is +0.  If any product is NaN
  (a NaN operand, or infinity times zero) or products of both infinite signs
  occur, the result is NaN; otherwise an infinite product gives that infinity.
  Accumulators add in float32 (round to nearest even, canonical NaN).

The reference engine calls :func:`fp16_dot_exact` for every product.  The fast
engine calls :func:`fp16_dot_fast`, which computes the same bits at BLAS speed
from two float64 matrix products (see its docstring); the rare elements it
cannot settle, and any row or column holding an infinity or NaN, go through
:func:`fp16_dot_exact`.
"""

from __future__ import annotations

import numpy as np

F16_BIAS = 15


def int8_dot(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Exact int8 [n, K] x int8 [K, N] -> int32 [n, N] (reference: integer arithmetic)."""
    return (x.astype(np.int64) @ w.astype(np.int64)).astype(np.int32)


def int8_dot_fast(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Same result through float32 BLAS: every partial sum is an integer below 2**24, exact."""
    assert x.shape[-1] <= 1024, "exactness needs K * 128 * 128 < 2**24"
    return (x.astype(np.float32) @ w.astype(np.float32)).astype(np.int32)


def _decompose(h: np.ndarray):
    """float16 -> (signed integer significand, exponent) with value = m * 2**e exactly."""
    bits = h.view(np.uint16).astype(np.int64)
    sign = np.where(bits >> 15, -1, 1)
    ex = (bits >> 10) & 0x1F
    frac = bits & 0x3FF
    m = np.where(ex == 0, frac, frac | 0x400) * sign
    e = np.where(ex == 0, 1, ex) - F16_BIAS - 10
    return m, e


def _round_fixed_to_f32(total: int) -> np.float32:
    """Round total * 2**-48 (a Python int) to float32, nearest-even.  |total| < 2**89."""
    if total == 0:
        return np.float32(0.0)
    neg = total < 0
    n = -total if neg else total
    b = n.bit_length()
    if b > 24:
        sh = b - 24
        q = n >> sh
        rem = n & ((1 << sh) - 1)
        half = 1 << (sh - 1)
        if rem > half or (rem == half and q & 1):
            q += 1
        exp = sh - 48
    else:
        q, exp = n, -48
    v = np.float32(np.ldexp(np.float64(q), exp))      # q < 2**25 and exp in range: exact
    return -v if neg else v


def _exact_pairs(xr: np.ndarray, wc: np.ndarray) -> np.ndarray:
    """Dot products of pairs: xr[i] . wc[i] (float16 [n, K] each), exactly rounded to float32."""
    n, K = xr.shape
    out = np.empty(n, dtype=np.float32)
    if n == 0:
        return out
    mx, ex = _decompose(xr)
    mw, ew = _decompose(wc)
    mm = mx * mw                                  # exact, |mm| < 2**22
    q = ex + ew + 48                              # 0..58 for finite values
    # exact sum in three int64 buckets of 29 bits: sum = P0 + P1 * 2**29 + P2 * 2**58
    parts = []
    for h in range(3):
        sel = (q // 29) == h
        parts.append(np.where(sel, mm << np.where(sel, q - 29 * h, 0), 0).sum(axis=1))
    xf, wf = xr.astype(np.float64), wc.astype(np.float64)
    xnan, wnan, xinf, winf = np.isnan(xf), np.isnan(wf), np.isinf(xf), np.isinf(wf)
    pnan = xnan | wnan | (xinf & (wf == 0)) | ((xf == 0) & winf)
    pinf = ((xinf | winf) & ~pnan)
    psign = np.signbit(xf) ^ np.signbit(wf)
    any_nan = pnan.any(axis=1) | ((pinf & ~psign).any(axis=1) & (pinf & psign).any(axis=1))
    pos_inf = (pinf & ~psign).any(axis=1)
    neg_inf = (pinf & psign).any(axis=1)
    for i in range(n):
        if any_nan[i]:
            out[i] = np.nan
        elif pos_inf[i]:
            out[i] = np.inf
        elif neg_inf[i]:
            out[i] = -np.inf
        else:
            out[i] = _round_fixed_to_f32(int(parts[0][i]) + (int(parts[1][i]) << 29) + (int(parts[2][i]) << 58))
    return out


def fp16_dot_exact(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """float16 [n, K] x float16 [K, N] -> float32 [n, N], each element the exact dot
    product rounded once (see the module docstring).  Plain and slow."""
    x = np.asarray(x, dtype=np.float16)
    w = np.asarray(w, dtype=np.float16)
    n, N = x.shape[0], w.shape[1]
    rr, cc = np.divmod(np.arange(n * N), N)
    return _exact_pairs(x[rr], w.T[cc]).reshape(n, N)


def _ulp16(h: np.ndarray) -> np.ndarray:
    """The unit in the last place of each float16 value, as float64 (0 for zeros)."""
    bits = h.view(np.uint16).astype(np.int64)
    ex = (bits >> 10) & 0x1F
    ulp = np.ldexp(1.0, np.where(ex == 0, 1, ex) - 25)
    return np.where((bits & 0x7FFF) == 0, 0.0, ulp)


def fp16_dot_fast(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The bits of :func:`fp16_dot_exact` at BLAS speed.

    ``s = x @ w`` in float64: the products are exact, so the exact dot product lies
    within ``b = (K + 2) * 2**-53 * ||x|| * ||w||`` of ``s`` whatever order BLAS sums
    in (``sum |x_k w_k| <= ||x|| ||w||``).  Every product, hence the exact sum, is a
    multiple of ``g = min ulp(x row) * min ulp(w column)``; when ``b < g / 2`` the exact
    sum is ``s`` rounded to a multiple of g, computed exactly in float64 and rounded
    once to float32.  Otherwise, if both ends of ``[s - b, s + b]`` round to the same
    float32, that is the answer.  The rest (rare), and rows or columns holding an
    infinity or a NaN, go through :func:`fp16_dot_exact`.  The one pass over ``s`` is
    C (``lpucore._engine._fp16_filter``); :func:`_fp16_filter_numpy` is its twin.
    """
    x = np.ascontiguousarray(x, dtype=np.float16)
    w = np.ascontiguousarray(w, dtype=np.float16)
    xd = x.astype(np.float64)
    wd = w.astype(np.float64)
    xd[~np.isfinite(xd)] = 0.0
    wd[~np.isfinite(wd)] = 0.0
    s = np.ascontiguousarray(xd @ wd)
    out = np.empty(s.shape, dtype=np.float32)
    try:
        from ._engine import _fp16_filter
    except ImportError:                              # the reference engine never needs this
        _fp16_filter = _fp16_filter_numpy
    unsure = _fp16_filter(x.view(np.uint16), w.view(np.uint16), s, out)
    if unsure.any():
        rows, cols = np.nonzero(unsure)
        out[rows, cols] = _exact_pairs(x[rows], w.T[cols])
    return out


def _fp16_filter_numpy(x16, w16, s, out):
    x, w = x16.view(np.float16), w16.view(np.float16)
    K = x.shape[1]
    xd, wd = x.astype(np.float64), w.astype(np.float64)
    bad_rows = ~np.isfinite(xd).all(axis=1)
    bad_cols = ~np.isfinite(wd).all(axis=0)
    xd[~np.isfinite(xd)] = 0.0
    wd[~np.isfinite(wd)] = 0.0
    t = np.sqrt((xd * xd).sum(axis=1))[:, None] * np.sqrt((wd * wd).sum(axis=0))[None, :]
    b = t * ((K + 2) * 2.0 ** -53 * 1.01)
    ux, uw = _ulp16(x), _ulp16(w)
    gx = np.where(ux > 0, ux, np.inf).min(axis=1)
    gw = np.where(uw > 0, uw, np.inf).min(axis=0)
    gx[~np.isfinite(gx)] = 1.0
    gw[~np.isfinite(gw)] = 1.0
    g = gx[:, None] * gw[None, :]
    with np.errstate(invalid="ignore", over="ignore"):
        snap = (b < g * 0.5) & (np.abs(s) < g * 2.0 ** 52)
        res = np.where(snap, np.rint(s / g) * g, s).astype(np.float32)
        lo, hi = (s - b).astype(np.float32), (s + b).astype(np.float32)
    res[res == 0] = 0.0
    out[...] = res
    return ((~snap & (lo != hi)) | bad_rows[:, None] | bad_cols[None, :]).astype(np.uint8)


def fp16_dot_fp32(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """float16 products (exact in float32) summed by float32 BLAS: the fast engine's
    ``fp16_mxm="fp32"`` mode.  Differs from :func:`fp16_dot_exact` by at most
    ``(K - 1) * 2**-24 * sum|x_k w_k| / (1 - (K - 1) * 2**-24)`` plus half an ulp of the
    result; special values (NaN, infinities) are the same."""
    x = np.asarray(x, dtype=np.float16).astype(np.float32)
    w = np.asarray(w, dtype=np.float16).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        out = x @ w
    out[out == 0] = 0.0
    return out
