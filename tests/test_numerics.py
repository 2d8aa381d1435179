"""The VXM arithmetic: the C helpers equal lpucore.numerics bit for bit, and the
float32 sequences meet their documented accuracy against float64."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lpucore import dtypes as dt
from lpucore import numerics as nm

E = pytest.importorskip("lpucore._engine")

RNG = np.random.default_rng(1234)
SPECIAL32 = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0, 3.4028235e38, -3.4028235e38,
                      1.1754944e-38, 1e-45, -1e-45, 88.72283, 88.72284, 89.0, -103.97, -104.0, -87.3,
                      0.625, -0.625, 0.62499994, 9.0, 44.0, 65504.0, 65520.0, 65519.996, 5.9604645e-08,
                      2.9802322e-08, 2.9802326e-08], dtype=np.float32)


def ulps(y, x64, dtype=np.float32):
    """|y - exact| in ulps of the result type, at the exact value (finite results only)."""
    ref = x64.astype(np.float64)
    y = y.astype(np.float64)
    info = np.finfo(dtype)
    ok = np.isfinite(ref) & (np.abs(ref) <= float(info.max))
    sp = np.spacing(np.abs(ref[ok]).astype(dtype)).astype(np.float64)
    sp = np.maximum(sp, float(info.smallest_subnormal))
    return np.abs(y[ok] - ref[ok]) / sp


def all_f32_samples(n=1_000_000):
    bits = RNG.integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([bits.view(np.float32), SPECIAL32])


def test_f16_to_f32_exhaustive():
    h = np.arange(65536, dtype=np.uint16)
    c = E._c_f16_to_f32(h)
    ref = h.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(c), nan)
    assert np.array_equal(c[~nan].view(np.uint32), ref[~nan].view(np.uint32))


def test_f32_to_f16_matches_numpy_round_to_nearest_even():
    x = all_f32_samples()
    # every float16 value, every midpoint between neighbours and its float32 neighbours (ties and near-ties)
    h = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    h = h[np.isfinite(h)]
    hs = np.sort(h)
    mid = ((hs[:-1].astype(np.float64) + hs[1:]) / 2).astype(np.float32)
    x = np.concatenate([x, h, mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf))])
    c = E._c_f32_to_f16(x)
    ref = nm.from_float(x, dt.FLOAT16).astype(np.uint16)
    assert np.array_equal(c, ref)
    assert c[np.isnan(x)].tolist() == [0x7E00] * int(np.isnan(x).sum())


@pytest.mark.parametrize("name", ["exp", "tanh", "sigmoid", "rsqrt", "recip", "sqrt", "relu"])
def test_c_sequences_equal_numpy_bit_for_bit(name):
    x = np.concatenate([all_f32_samples(400_000), RNG.uniform(-120, 120, 400_000).astype(np.float32),
                        RNG.uniform(-2, 2, 200_000).astype(np.float32)])
    ref = nm.from_float(nm._float_unary(name, x), dt.FLOAT32)
    c = nm.from_float(E._c_unary(name, x), dt.FLOAT32)
    assert np.array_equal(c, ref)


# Documented accuracy (README, "Numerics"): maximum error in float32 ulps against float64.
BOUNDS = {"exp": 1.0, "tanh": 1.5, "sigmoid": 2.5, "rsqrt": 1.5, "recip": 0.5, "sqrt": 0.5}
REF64 = {"exp": np.exp, "tanh": np.tanh, "sigmoid": lambda v: 1 / (1 + np.exp(-v)),
         "rsqrt": lambda v: 1 / np.sqrt(v), "recip": lambda v: 1 / v, "sqrt": np.sqrt}
DOMAIN = {"exp": (-103.9, 88.7), "tanh": (-30, 30), "sigmoid": (-103, 103), "rsqrt": (1e-30, 1e30),
          "recip": (1e-30, 1e30), "sqrt": (0, 1e30)}


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_accuracy_against_float64(name):
    lo, hi = DOMAIN[name]
    if lo > 0:
        x = np.exp(RNG.uniform(np.log(lo), np.log(hi), 1_000_000)).astype(np.float32)
    else:
        x = np.concatenate([RNG.uniform(lo, hi, 1_000_000), RNG.uniform(-1, 1, 300_000)]).astype(np.float32)
    x = x[(x >= lo) & (x <= hi)]
    with np.errstate(all="ignore"):
        y = nm._float_unary(name, x)
        err = ulps(y, REF64[name](x.astype(np.float64)))
    assert err.max() <= BOUNDS[name], f"{name}: {err.max():.3f} ulp"


def test_special_values():
    f = nm._float_unary
    inf, nan = np.float32(np.inf), np.float32(np.nan)
    x = np.array([-inf, inf, nan, 0.0, -0.0], dtype=np.float32)
    with np.errstate(all="ignore"):
        assert f("exp", x)[:2].tolist() == [0.0, np.inf] and np.isnan(f("exp", x)[2])
        assert f("tanh", x)[:2].tolist() == [-1.0, 1.0] and f("tanh", x)[3] == 0
        assert f("sigmoid", x)[:2].tolist() == [0.0, 1.0] and f("sigmoid", x)[3] == 0.5
        assert f("relu", x)[:2].tolist() == [0.0, np.inf] and np.isnan(f("relu", x)[2])
        assert not np.signbit(f("relu", x)[4])  # relu(-0) = +0
    # exp reaches the subnormal range instead of flushing
    assert 0 < nm.exp_f32(np.array([-100.0], np.float32))[0] < 1.2e-38


def test_canonical_nan_and_signed_zero_min_max():
    a = nm.from_float(np.array([0.0, -0.0, np.nan, 1.0], np.float32), dt.FLOAT32)
    b = nm.from_float(np.array([-0.0, 0.0, 2.0, np.nan], np.float32), dt.FLOAT32)
    mn = nm.vxm("min", dt.FLOAT32, a, b)
    mx = nm.vxm("max", dt.FLOAT32, a, b)
    assert mn.tolist()[:2] == [0x80000000, 0x80000000] and mx.tolist()[:2] == [0, 0]
    assert mn.tolist()[2:] == [0x7FC00000, 0x7FC00000] and mx.tolist()[2:] == [0x7FC00000, 0x7FC00000]
    neg_nan = np.array([0xFFC12345], dtype=np.uint32)
    assert nm.vxm("add", dt.FLOAT32, neg_nan, np.array([0], np.uint32)).tolist() == [0x7FC00000]
    assert nm.vxm("mov", dt.FLOAT32, neg_nan).tolist() == [0xFFC12345]       # bit moves keep payloads


@given(st.lists(st.integers(-2 ** 31, 2 ** 31 - 1), min_size=1, max_size=40),
       st.integers(-2 ** 31, 2 ** 31 - 1), st.integers(0, 62), st.integers(-128, 127))
def test_requant_is_exact_round_half_even(vals, mult, shift, zp):
    a = nm.from_int(np.array(vals, dtype=np.int64), dt.INT32)
    got = nm.to_int(nm.requant(a, mult, shift, zp), dt.INT8).tolist()
    want = [min(127, max(-128, round(Fraction(v * mult, 2 ** shift)) + zp)) for v in vals]
    assert got == want


@given(st.lists(st.floats(width=32, allow_nan=True), min_size=1, max_size=40),
       st.sampled_from(["int8", "int16", "int32"]))
def test_float_to_int_rounds_even_and_saturates(vals, to):
    d = dt.get(to)
    x = np.array(vals, dtype=np.float32)
    got = nm.to_int(nm.convert(nm.from_float(x, dt.FLOAT32), dt.FLOAT32, d), d).tolist()
    lo, hi = -(1 << (d.bits - 1)), (1 << (d.bits - 1)) - 1
    want = []
    for v in vals:
        v = float(np.float32(v))
        if v != v:
            want.append(0)
        elif v in (float("inf"), float("-inf")):
            want.append(hi if v > 0 else lo)
        else:
            want.append(min(hi, max(lo, round(v))))        # Python round(): half to even
    assert got == want
