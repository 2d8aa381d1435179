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
engine calls :func:`fp16_dot_fast`, which computes the same bits at BLAS speed:
one float64 matrix product (exact products, summation error at most
``K * 2**-53 * max|x| * sum|w|``) gives an interval around each exact dot
product; where both ends of the interval round to the same float32, that is the
answer (rounding is monotonic), and the rare remaining elements, and any row or
column holding an infinity or NaN, go through :func:`fp16_dot_exact`.
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


def fp16_dot_exact(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """float16 [n, K] x float16 [K, N] -> float32 [n, N], each element the exact dot
    product rounded once (see the module docstring).  Plain and slow; K <= 160."""
    x = np.asarray(x, dtype=np.float16)
    w = np.asarray(w, dtype=np.float16)
    n, K = x.shape
    N = w.shape[1]
    out = np.empty((n, N), dtype=np.float32)
    mw, ew = _decompose(w)
    wf = w.astype(np.float64)
    wnan, winf = np.isnan(wf), np.isinf(wf)
    for r in range(n):
        mx, ex = _decompose(x[r])
        mm = mx[:, None] * mw                        # exact, |mm| < 2**22
        q = ex[:, None] + ew + 48                    # 0..58
        # exact sum in three int64 buckets of 29 bits: sum = P0 + P1 * 2**29 + P2 * 2**58
        parts = []
        for h in range(3):
            sel = (q // 29) == h
            parts.append(np.where(sel, mm << np.where(sel, q - 29 * h, 0), 0).sum(axis=0))
        xf = x[r].astype(np.float64)
        xnan, xinf = np.isnan(xf), np.isinf(xf)
        # special values: products that are NaN or infinite
        pnan = (xnan[:, None] | wnan) | (xinf[:, None] & (wf == 0)) | ((xf == 0)[:, None] & winf)
        pinf = (xinf[:, None] & ~wnan & (wf != 0)) | ((~xnan & (xf != 0))[:, None] & winf)
        psign = np.signbit(xf)[:, None] ^ np.signbit(wf)
        any_nan = pnan.any(axis=0)
        pos_inf = (pinf & ~psign).any(axis=0)
        neg_inf = (pinf & psign).any(axis=0)
        for c in range(N):
            if any_nan[c] or (pos_inf[c] and neg_inf[c]):
                out[r, c] = np.nan
            elif pos_inf[c]:
                out[r, c] = np.inf
            elif neg_inf[c]:
                out[r, c] = -np.inf
            else:
                total = int(parts[0][c]) + (int(parts[1][c]) << 29) + (int(parts[2][c]) << 58)
                out[r, c] = _round_fixed_to_f32(total)
    return out


def fp16_dot_fast(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The bits of :func:`fp16_dot_exact`, from one float64 BLAS product plus a filter."""
    x = np.asarray(x, dtype=np.float16)
    w = np.asarray(w, dtype=np.float16)
    K = x.shape[1]
    xd = x.astype(np.float64)
    wd = w.astype(np.float64)
    bad_rows = ~np.isfinite(xd).all(axis=1)
    bad_cols = ~np.isfinite(wd).all(axis=0)
    xs = np.where(bad_rows[:, None], 0.0, xd)
    ws = np.where(bad_cols[None, :], 0.0, wd)
    s = xs @ ws
    # error bound of any summation order of K exact products, plus the rounding of s +- bound
    bound = (1.5 * K * 2.0 ** -53) * np.abs(xs).max(axis=1)[:, None] * np.abs(ws).sum(axis=0)[None, :] \
        + np.abs(s) * 2.0 ** -50
    lo = (s - bound).astype(np.float32)
    hi = (s + bound).astype(np.float32)
    out = lo.copy()
    out[out == 0] = 0.0                              # an exact zero is +0
    unsure = (lo != hi) | bad_rows[:, None] | bad_cols[None, :]
    if unsure.any():
        rows, cols = np.nonzero(unsure)
        for r in np.unique(rows):
            cs = cols[rows == r]
            out[r, cs] = fp16_dot_exact(x[r:r + 1], w[:, cs])[0]
    return out
