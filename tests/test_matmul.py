"""The MXM numerics contract (lpucore.matmul): int8 exact; float16 dot products exact
and rounded once to float32; the fast path equal to the exact one bit for bit."""

from fractions import Fraction

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lpucore import matmul


def round_to_f32(fr: Fraction) -> np.float32:
    """Nearest float32 to an exact rational, ties to even (independent of lpucore)."""
    f = np.float32(float(fr))
    best = None
    for c in (np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))):
        if not np.isfinite(c):
            continue
        d = abs(Fraction(float(c)) - fr)
        key = (d, int(c.view(np.uint32)) & 1)
        if best is None or key < best[0]:
            best = (key, c)
    return best[1]


def reference_dot(x, w):
    """Exact rational dot products with IEEE special values, rounded once."""
    n, K = x.shape
    out = np.empty((n, w.shape[1]), np.float32)
    for r in range(n):
        for c in range(w.shape[1]):
            prods = [float(x[r, k]) * float(w[k, c]) if not (np.isinf(x[r, k]) or np.isinf(w[k, c]))
                     else np.float64(x[r, k]) * np.float64(w[k, c]) for k in range(K)]
            if any(np.isnan(p) for p in prods) or (np.inf in prods and -np.inf in prods):
                out[r, c] = np.nan
            elif np.inf in prods or -np.inf in prods:
                out[r, c] = np.inf if np.inf in prods else -np.inf
            else:
                s = sum(Fraction(float(x[r, k])) * Fraction(float(w[k, c])) for k in range(K))
                out[r, c] = round_to_f32(s) if s != 0 else np.float32(0.0)
    return out


def same_bits(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(
        a.view(np.uint32)[~np.isnan(a)], b.view(np.uint32)[~np.isnan(b)])


def test_int8_fast_is_exact_at_the_extremes():
    x = np.full((3, 320), -128, np.int8)
    w = np.full((320, 320), -128, np.int8)
    w[:, 1] = 127
    assert matmul.int8_dot_fast(x, w)[0, 0] == 320 * 128 * 128
    r = np.random.default_rng(0)
    x = r.integers(-128, 128, (50, 320)).astype(np.int8)
    w = r.integers(-128, 128, (320, 320)).astype(np.int8)
    assert np.array_equal(matmul.int8_dot_fast(x, w), matmul.int8_dot(x, w))


F16_SPECIAL = [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, -65504.0, 6e-08, -6e-08, 6.1e-05, 1.0, -1.0, 0.5]
f16 = hnp.arrays(np.float16, st.tuples(st.integers(1, 3), st.integers(1, 12)),
                 elements=st.one_of(st.floats(width=16, allow_nan=True), st.sampled_from(F16_SPECIAL)))


@settings(max_examples=60)
@given(st.data())
def test_fp16_exact_matches_an_independent_rational_reference(data):
    x = data.draw(f16)
    w = data.draw(hnp.arrays(np.float16, (x.shape[1], data.draw(st.integers(1, 5))),
                             elements=st.one_of(st.floats(width=16, allow_nan=True), st.sampled_from(F16_SPECIAL))))
    assert same_bits(matmul.fp16_dot_exact(x, w), reference_dot(x, w))


@settings(max_examples=60)
@given(st.data())
def test_fp16_fast_path_is_bit_exact(data):
    K = data.draw(st.integers(1, 160))
    n, N = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 24))
    mode = data.draw(st.sampled_from(["normal", "cancel", "wide", "special"]))
    r = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    if mode == "normal":
        x, w = r.standard_normal((n, K)), r.standard_normal((K, N))
    elif mode == "wide":                      # magnitudes from subnormal to 65504
        x = r.choice([-1, 1], (n, K)) * 2.0 ** r.uniform(-24, 15.9, (n, K))
        w = r.choice([-1, 1], (K, N)) * 2.0 ** r.uniform(-24, 15.9, (K, N))
    else:                                     # heavy cancellation: +-a pairs plus a little
        half = r.standard_normal((n, (K + 1) // 2)) * 1000
        x = np.concatenate([half, -half], axis=1)[:, :K] + r.standard_normal((n, K)) * 1e-3
        w = np.ones((K, N)) + r.standard_normal((K, N)) * 1e-3
    x, w = x.astype(np.float16), w.astype(np.float16)
    if mode == "special":
        x.flat[r.integers(0, x.size, 2)] = r.choice(F16_SPECIAL, 2)
        w.flat[r.integers(0, w.size, 2)] = r.choice(F16_SPECIAL, 2)
    assert same_bits(matmul.fp16_dot_fast(x, w), matmul.fp16_dot_exact(x, w))


def test_fp16_results_never_overflow_and_zero_is_positive():
    x = np.full((1, 160), 65504, np.float16)
    w = np.full((160, 2), 65504, np.float16)
    w[:, 1] = -65504
    out = matmul.fp16_dot_fast(x, w)
    assert np.isfinite(out).all() and out[0, 0] == np.float32(160 * 65504.0 ** 2)
    z = matmul.fp16_dot_fast(np.array([[1.0, -1.0]], np.float16), np.array([[-0.0], [-0.0]], np.float16))
    assert z[0, 0] == 0 and not np.signbit(z[0, 0])
