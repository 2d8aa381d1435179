"""The compiler: every graph operation against NumPy, on both engines, with the
predicted cycle count equal to the measured one.  Accuracy bounds are those in
README.md ("Compiler: operations and their accuracy")."""

import os
import re

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import lpucore
from lpucore import ChipConfig, CompileError, Graph, GraphError

SMALL = ChipConfig.small()
GROQ = ChipConfig.groqchip1()
F16_ULP = 2.0 ** -10


def few(n: int) -> int:
    """Examples per property: compiling is slow, so the default profile runs a few and the
    thorough `ci` profile four times as many."""
    return 4 * n if os.environ.get("HYPOTHESIS_PROFILE") == "ci" else n


def run_graph(g, inputs, cfg=SMALL, engines=("fast", "reference")):
    c = lpucore.compile(g, cfg)
    results = []
    for eng in engines:
        out, st_ = lpucore.execute(c, inputs, engine=eng)
        assert st_.cycles == c.expected_cycles, (eng, st_.cycles, c.expected_cycles)
        results.append(out)
    for other in results[1:]:
        for k in results[0]:
            assert np.array_equal(results[0][k].view(np.uint8), other[k].view(np.uint8)), k
    return results[0], c


def values(shape, dtype, seed, scale=1.0):
    r = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return (r.standard_normal(shape) * scale).astype(dtype)
    info = np.iinfo(dtype)
    return r.integers(info.min, info.max + 1, shape).astype(dtype)


shapes = st.tuples(st.integers(1, 3), st.integers(1, 150)) | st.tuples(st.integers(1, 2), st.integers(1, 3),
                                                                     st.integers(1, 70))


def assert_product(y, A, B, dtype):
    """y is A @ B: exactly for int8 (int32 results), else within the float16 product bound (README:
    float32 accumulation over K, then one rounding to float16)."""
    ref = A.astype(np.float64) @ B.astype(np.float64)
    if dtype == "int8":
        assert np.array_equal(y, ref.astype(np.int32))
        return
    absref = np.abs(A.astype(np.float64)) @ np.abs(B.astype(np.float64))
    bound = (A.shape[-1] / 32 + 1) * 2.0 ** -24 * absref + np.spacing(np.abs(ref).astype(np.float16))
    assert (np.abs(y - ref) <= bound).all()


def ulps16(y, ref):
    y, ref = y.astype(np.float64), ref.astype(np.float64)
    return np.abs(y - ref) / np.maximum(np.spacing(np.abs(ref).astype(np.float16)).astype(np.float64), 2.0 ** -24)


# ---- elementwise: exactly NumPy's arithmetic in the same dtype -----------------------------------
@settings(max_examples=few(6))
@given(shapes, st.sampled_from(["add", "sub", "mul", "maximum", "minimum"]),
       st.sampled_from(["float16", "float32", "int8", "int16", "int32"]), st.integers(0, 99))
def test_binary_ops_match_numpy_exactly(shape, op, dtype, seed):
    g = Graph()
    a = g.input("a", shape, dtype)
    b = g.input("b", shape[-1:], dtype)                    # broadcast over the rows
    g.output("y", getattr(g, op)(a, b))
    A, B = values(shape, dtype, seed), values(shape[-1:], dtype, seed + 1)
    out, _ = run_graph(g, {"a": A, "b": B})
    with np.errstate(all="ignore"):
        ref = getattr(np, {"sub": "subtract", "mul": "multiply"}.get(op, op))(A, B).astype(dtype)
    assert np.array_equal(out["y"], ref)


@settings(max_examples=few(5))
@given(shapes, st.sampled_from(["neg", "abs", "relu", "div"]), st.integers(0, 99))
def test_unary_and_div(shape, op, seed):
    g = Graph()
    a = g.input("a", shape, "float16")
    y = g.div(a, 3.0) if op == "div" else getattr(g, op)(a)
    g.output("y", y)
    A = values(shape, np.float16, seed)
    out, _ = run_graph(g, {"a": A})
    ref = {"neg": -A, "abs": np.abs(A), "relu": np.maximum(A, np.float16(0)), "div": A / np.float16(3)}[op]
    assert np.array_equal(out["y"], ref.astype(np.float16))


@settings(max_examples=few(5))
@given(shapes, st.sampled_from(["exp", "tanh", "sigmoid", "sqrt", "rsqrt", "silu", "gelu", "gelu_erf"]),
       st.integers(0, 99))
def test_transcendental_ops_within_one_float16_ulp(shape, op, seed):
    g = Graph()
    a = g.input("a", shape, "float16")
    if op == "gelu_erf":
        y = g.gelu(a, approximate="erf")
    else:
        y = getattr(g, op)(a)
    g.output("y", y)
    A = values(shape, np.float16, seed, 2.0)
    if op in ("sqrt", "rsqrt"):
        A = np.abs(A) + np.float16(0.01)
    out, _ = run_graph(g, {"a": A})
    x = A.astype(np.float64)
    from math import erf
    ref = {"exp": np.exp(x), "tanh": np.tanh(x), "sigmoid": 1 / (1 + np.exp(-x)), "sqrt": np.sqrt(x),
           "rsqrt": 1 / np.sqrt(x), "silu": x / (1 + np.exp(-x)),
           "gelu": 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
           "gelu_erf": 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))}[op]
    if op == "gelu_erf":
        # Abramowitz & Stegun 7.1.26 approximates erf within 1.5e-7 (absolute)
        assert (np.abs(out["y"] - ref) <= np.maximum(np.spacing(np.abs(ref).astype(np.float16)),
                                                     0.5 * np.spacing(np.abs(ref).astype(np.float16))
                                                     + 1e-7 * np.abs(x))).all()
    else:
        assert ulps16(out["y"], ref).max() <= 1.0


@settings(max_examples=few(5))
@given(shapes, st.sampled_from(["sum", "max", "mean"]), st.booleans(), st.sampled_from(["float32", "float16"]),
       st.integers(0, 99))
def test_reductions(shape, op, keepdims, dtype, seed):
    # float32 sums take the SXM lane tree, float16 ones the MXM (a product with ones)
    g = Graph()
    a = g.input("a", shape, dtype)
    g.output("y", getattr(g, op)(a, keepdims=keepdims))
    A = values(shape, dtype, seed)
    out, _ = run_graph(g, {"a": A})
    ref = getattr(A.astype(np.float64), op)(-1, keepdims=keepdims)
    if op == "max":
        assert np.array_equal(out["y"], ref.astype(dtype))
    elif dtype == "float16":
        # the sum is within float32 rounding of exact; the result is rounded once to float16
        y = out["y"].astype(np.float64)
        assert (np.abs(y - ref) <= np.spacing(np.abs(ref).astype(np.float16)) / 2 * 1.001
                + 2.0 ** -22 * np.abs(A.astype(np.float64)).sum(-1, keepdims=keepdims)).all()
    else:
        # a tree of float32 additions: at most (chunks + log2 lanes) roundings of partial sums
        bound = (shape[-1] / SMALL.lanes + 1 + np.log2(SMALL.lanes)) * 2.0 ** -24 * np.abs(A).sum(-1, keepdims=keepdims)
        if op == "mean":
            bound = bound / shape[-1] + np.abs(ref) * 2.0 ** -23
        assert (np.abs(out["y"] - ref) <= bound + 1e-30).all()


@settings(max_examples=few(5))
@given(st.tuples(st.integers(1, 2), st.integers(1, 40), st.integers(1, 150)), st.sampled_from(["sum", "max", "mean"]),
       st.booleans(), st.sampled_from(["float32", "float16", "int8", "int32"]), st.integers(0, 99))
def test_reductions_across_rows(shape, op, keepdims, dtype, seed):
    # axis -2: a tree of VXM operations over the rows' vectors, float32 (int32 for integer sums)
    if op == "mean" and dtype in ("int8", "int32"):
        return
    g = Graph()
    a = g.input("a", shape, dtype)
    y = getattr(g, op)(a, axis=-2, keepdims=keepdims)
    g.output("y", y)
    A = values(shape, dtype, seed)
    out, c = run_graph(g, {"a": A})
    assert out["y"].shape == y.shape and c.bounds().critical_path > 0
    if op == "max":
        assert np.array_equal(out["y"], A.max(-2, keepdims=keepdims))
        return
    if dtype in ("int8", "int32"):
        # int32 additions wrap like NumPy's
        assert np.array_equal(out["y"], A.astype(np.int32).sum(-2, keepdims=keepdims, dtype=np.int32))
        return
    ref = getattr(A.astype(np.float64), op)(-2, keepdims=keepdims)
    # a balanced tree: each element passes ceil(log2 rows) float32 roundings (one more for a mean)
    bound = (np.ceil(np.log2(shape[-2])) + 1) * 2.0 ** -24 * np.abs(A.astype(np.float64)).sum(-2, keepdims=keepdims)
    if op == "mean":
        bound = bound / shape[-2] + np.abs(ref) * 2.0 ** -23
    if dtype == "float16":
        bound = bound + np.spacing(np.abs(ref).astype(np.float16)) / 2 * 1.001
    assert (np.abs(out["y"] - ref) <= bound + 1e-30).all()


def test_a_row_reduction_needs_two_axes():
    g = Graph()
    with pytest.raises(GraphError, match="only the last axis"):
        g.sum(g.input("a", (5,), "float32"), axis=-2)


def test_integer_sum_is_int32():
    g = Graph()
    a = g.input("a", (3, 70), "int8")
    g.output("y", g.sum(a))
    A = values((3, 70), np.int8, 1)
    out, _ = run_graph(g, {"a": A})
    assert out["y"].dtype == np.int32 and np.array_equal(out["y"], A.astype(np.int64).sum(-1))


@settings(max_examples=few(4))
@given(shapes, st.integers(0, 99))
@example((3, 65), 0)          # operand reads that ALAP layout gathered into one slice and cycle
def test_softmax_layernorm_rmsnorm_within_two_ulps(shape, seed):
    g = Graph()
    a = g.input("a", shape, "float16")
    n = shape[-1]
    gam = values((n,), np.float16, seed + 1)
    bet = values((n,), np.float16, seed + 2)
    g.output("sm", g.softmax(a))
    g.output("ln", g.layernorm(a, g.constant("g", gam), g.constant("b", bet), eps=1e-5))
    g.output("rms", g.rmsnorm(a, g.constant("g2", gam), eps=1e-6))
    A = values(shape, np.float16, seed, 3.0)
    out, _ = run_graph(g, {"a": A})
    x = A.astype(np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    sm = e / e.sum(-1, keepdims=True)
    ln = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * gam + bet
    rms = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * gam
    assert ulps16(out["sm"], sm).max() <= 2
    # layer norm amplifies the rounding of its input by 1/std: bound it in absolute terms too
    for k, ref in (("ln", ln), ("rms", rms)):
        err = np.abs(out[k].astype(np.float64) - ref)
        assert (err <= 2 * np.spacing(np.abs(ref).astype(np.float16)) + 1e-3 * np.abs(gam)).all(), k


@settings(max_examples=few(4))
@given(st.integers(1, 40), st.integers(1, 200), st.integers(1, 150), st.sampled_from(["int8", "float16"]),
       st.integers(0, 99))
def test_matmul(M, K, N, dtype, seed):
    g = Graph()
    a = g.input("a", (M, K), dtype)
    B = values((K, N), dtype, seed + 1, 0.5)
    g.output("y", g.matmul(a, g.constant("w", B)))
    g.output("z", g.matmul(a, g.input("b", (K, N), dtype)))       # runtime weights
    A = values((M, K), dtype, seed, 0.5)
    out, _ = run_graph(g, {"a": A, "b": B})
    ref = A.astype(np.float64) @ B.astype(np.float64)
    if dtype == "int8":
        assert np.array_equal(out["y"], ref.astype(np.int32)) and np.array_equal(out["z"], ref.astype(np.int32))
    else:
        absref = np.abs(A.astype(np.float64)) @ np.abs(B.astype(np.float64))
        bound = (K / 32 + 1) * 2.0 ** -24 * absref + np.spacing(np.abs(ref).astype(np.float16))
        assert (np.abs(out["y"] - ref) <= bound).all() and np.array_equal(out["y"], out["z"])


def int8_weight_product(cfg, M, K, N, seed):
    """y = a @ w, int8 [M, K] input by a constant int8 [K, N] weight: run (both engines on the small
    geometry, the fast one on the GroqChip) and checked exact; returns (graph, compiled)."""
    g = Graph()
    a = g.input("a", (M, K), "int8")
    B = values((K, N), np.int8, seed)
    g.output("y", g.matmul(a, g.constant("w", B), out_dtype="int32"))
    A = values((M, K), np.int8, seed + 1)
    out, c = run_graph(g, {"a": A}, cfg, engines=("fast", "reference") if cfg is SMALL else ("fast",))
    assert_product(out["y"], A, B, "int8")
    return g, c


@pytest.mark.parametrize("cfg, M, K, N", [(SMALL, 1, 1000, 300), (SMALL, 2, 2000, 430), (SMALL, 1, 130, 300),
                                           (GROQ, 1, 4096, 1920), (GROQ, 2, 3000, 1600)])
def test_gemv_last_tiles_split_over_the_planes(cfg, M, K, N, monkeypatch):
    """A GEMV whose column tiles do not fill the last round of planes shares those tiles' rows (by
    chunks of K) over every plane and adds the partial sums: exact, predicted cycles = measured, and
    sooner than one plane taking each tile (where lower_more.k_split chooses it)."""
    from lpucore.compiler import lower_more
    g, c = int8_weight_product(cfg, M, K, N, 7)
    split = lower_more.k_split(cfg, M, K, N)
    assert (split is not None) == ("w" in c.row_parts)
    if split is None:
        return
    # every row of every split tile in exactly one part
    for nt in {p[1] for p in split}:
        rows = sorted((r0, r1) for _, r0, r1, c0, _ in c.row_parts["w"] if c0 == nt * cfg.lanes)
        assert rows[0][0] == 0 and rows[-1][1] == K and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    monkeypatch.setattr(lower_more, "k_split", lambda *args: None)
    whole = lpucore.compile(g, cfg)
    assert "w" not in whole.row_parts and c.expected_cycles < whole.expected_cycles


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_one_tile_product_rows_over_every_plane(dtype):
    """A product of one column tile with more rows than a pair of planes holds in its accumulator blocks
    (a long cache's attention head sums) gives every plane a quarter of the rows: exact like any product,
    predicted cycles = measured on both engines, each plane issuing products."""
    M, K, N = 5 * SMALL.mxm_accumulators // 2 * SMALL.mxm_planes_per_hemisphere // 2, 150, 40
    g = Graph()
    a = g.input("a", (M, K), dtype)
    B = values((K, N), dtype, 3, 0.5)
    g.output("y", g.matmul(a, g.constant("w", B)))
    A = values((M, K), dtype, 4, 0.5)
    out, c = run_graph(g, {"a": A})
    assert_product(out["y"], A, B, dtype)
    busy = [q for q, ins in c.program.queues.items() if q.endswith(".ABC") and any(i.op.mnemonic == "ABC" for i in ins)]
    assert len(busy) == SMALL.mxm_planes, busy


@pytest.mark.parametrize("cfg, M, K", [(SMALL, 200, 150), (GROQ, 300, 700)])
def test_gemm_last_round_rows_over_every_plane(cfg, M, K, monkeypatch):
    """A GEMM's column tiles past the last whole round of planes (5 tiles on 4 planes) share their rows
    over every plane when kernels._rows_split_pays estimates it ends sooner (no partial sums: different
    rows): exact, predicted cycles = measured, and on the GroqChip sooner than one plane taking the fifth
    tile (the small geometry's streams make it slower there: the estimate does not model them)."""
    from lpucore.compiler import kernels
    g, c = int8_weight_product(cfg, M, K, 5 * cfg.lanes - 20, 5)
    if cfg is GROQ:
        monkeypatch.setattr(kernels, "_rows_split_pays", lambda *args: False)
        assert c.expected_cycles < lpucore.compile(g, cfg).expected_cycles


def test_batched_matmul_and_vector_operands():
    g = Graph()
    a = g.input("a", (2, 3, 40), "float16")
    b = g.input("b", (2, 40, 20), "float16")
    v = g.input("v", (40,), "float16")
    g.output("y", g.matmul(a, b))
    g.output("mv", g.matmul(a, v, out_dtype="float32"))
    A, B, V = values((2, 3, 40), np.float16, 1), values((2, 40, 20), np.float16, 2), values((40,), np.float16, 3)
    out, _ = run_graph(g, {"a": A, "b": B, "v": V})
    assert np.abs(out["y"] - A.astype(np.float64) @ B).max() < 0.02
    assert np.abs(out["mv"] - A.astype(np.float64) @ V).max() < 1e-3


@settings(max_examples=few(4))
@given(st.integers(1, 5), st.integers(1, 90), st.integers(0, 99))
def test_layout_ops_are_exact(R, C, seed):
    g = Graph()
    x = g.input("x", (R, C), "float16")
    g.output("t", g.transpose(x))
    g.output("r", g.reshape(x, (C, R)))
    g.output("s", x[:, C // 3:])
    g.output("c", g.concat([x, x[:, : max(1, C // 2)]], axis=1))
    g.output("c0", g.concat([x, x], axis=0))
    X = values((R, C), np.float16, seed)
    out, _ = run_graph(g, {"x": X})
    assert np.array_equal(out["t"], X.T) and np.array_equal(out["r"], X.reshape(C, R))
    assert np.array_equal(out["s"], X[:, C // 3:])
    assert np.array_equal(out["c"], np.concatenate([X, X[:, : max(1, C // 2)]], 1))
    assert np.array_equal(out["c0"], np.concatenate([X, X], 0))


def test_rope_tables_sized_by_max_positions():
    """Graph.rope's tables have max_positions rows (not a fixed 2,048): positions up to 4,095 rotate
    as NumPy does, and a small table is small."""
    g = Graph()
    x = g.input("x", (2, 4, 16), "float16")
    p = g.input("p", (4,), "int32")
    g.output("y", g.rope(x, p, max_positions=4096))
    X = values((2, 4, 16), np.float16, 5)
    P = np.array([0, 2047, 2048, 4095], np.int32)
    out, c = run_graph(g, {"x": X, "p": P})
    inv = 10000.0 ** (-np.arange(8) * 2 / 16)
    ang = P[:, None] * inv[None]
    x1, x2 = X[..., :8].astype(np.float64), X[..., 8:].astype(np.float64)
    ref = np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)
    assert np.abs(out["y"] - ref).max() <= 4e-3 * np.abs(X).max()
    assert sorted(v.shape for k, v in c.constants.items() if k.startswith(("_rcos", "_rsin"))) == [(4096, 16)] * 2
    g2 = Graph()
    g2.output("y", g2.rope(g2.input("x", (1, 1, 16), "float16"), g2.input("p", (1,), "int32"), max_positions=8))
    assert {v.shape for k, v in lpucore.compile(g2, SMALL).constants.items() if k.startswith("_rcos")} == {(8, 16)}
    for j, bad in enumerate((0, 1 << 17, 2.5, True)):
        with pytest.raises(GraphError, match="max_positions"):
            g2.rope(g2.input(f"x{j}", (1, 1, 16), "float16"), g2.input(f"p{j}", (1,), "int32"), max_positions=bad)


@settings(max_examples=few(3))
@given(st.integers(1, 6), st.integers(2, 130), st.sampled_from([8, 16, 34]), st.integers(1, 3), st.integers(1, 70),
       st.sampled_from(["int8", "float16"]), st.integers(0, 99))
def test_gather_rope_cast_quantize(n_idx, vocab, head, heads, cols, table_dtype, seed):
    r = np.random.default_rng(seed)
    g = Graph()
    table = values((vocab, 30), table_dtype, seed + 1)
    i = g.input("i", (n_idx,), "int32")
    T = max(1, n_idx)
    x = g.input("x", (heads, T, head), "float16")
    p = g.input("p", (T,), "int32")
    f = g.input("f", (3, cols), "float32")
    g.output("emb", g.gather(g.constant("tab", table), i))
    g.output("rope", g.rope(x, p))
    g.output("cast", g.cast(f, "int16"))
    scale = np.abs(r.standard_normal(cols)).astype(np.float32) + 0.1
    q = g.quantize(f, scale, zero_point=3, axis=-1)
    g.output("q", q)
    g.output("dq", g.dequantize(q, scale, zero_point=3, axis=-1, dtype="float32"))
    s1 = np.float32(r.uniform(0.05, 2))
    g.output("q1", g.quantize(f, s1))                                    # per-tensor scale
    idx = r.integers(0, vocab, n_idx).astype(np.int32)
    X = values((heads, T, head), np.float16, seed + 2)
    P = r.integers(0, 2048, T).astype(np.int32)
    F = (values((3, cols), np.float32, seed + 3) * 100).astype(np.float32)
    out, _ = run_graph(g, {"i": idx, "x": X, "p": P, "f": F})
    assert np.array_equal(out["emb"], table[idx])
    half = head // 2
    inv = 10000.0 ** (-np.arange(half) * 2 / head)
    ang = P[:, None] * inv[None]
    x1, x2 = X[..., :half].astype(np.float64), X[..., half:].astype(np.float64)
    ref = np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)
    assert np.abs(out["rope"] - ref).max() <= 4e-3 * np.abs(X).max()
    assert np.array_equal(out["cast"], np.clip(np.rint(F), -32768, 32767).astype(np.int16))
    qref = np.clip(np.rint(F / scale) + 3, -128, 127).astype(np.int8)
    assert np.array_equal(out["q"], qref)
    assert np.array_equal(out["dq"], ((qref.astype(np.int32) - 3).astype(np.float32) * scale).astype(np.float32))
    assert np.array_equal(out["q1"], np.clip(np.rint(F / s1), -128, 127).astype(np.int8))


def test_quantize_without_zero_point_rounds_saturates_and_zeroes_nan_in_one_conversion():
    """quantize / dequantize without a zero point take one VXM cvt each way (float32 -> int8 directly,
    int8 -> float32 directly): the same bits as through int32, on both engines."""
    F = np.array([[np.nan, np.inf, -np.inf, 1e30, -1e30, 2.5, -2.5, 3.5, 127.5, -128.5, -0.0, 0.49]], np.float32)
    g = Graph()
    q = g.quantize(g.input("f", F.shape, "float32"), np.float32(1.0))
    g.output("q", q)
    g.output("dq", g.dequantize(q, np.float32(0.5), dtype="float32"))
    out, c = run_graph(g, {"f": F})
    cvts = sum(1 for q_, ins in c.program.queues.items() if q_.startswith("VXM") for i in ins if i.op.mnemonic == "cvt")
    assert cvts == 2                                                  # one vector each way
    want = np.array([[0, 127, -128, 127, -128, 2, -2, 4, 127, -128, 0, 0]], np.int8)
    assert np.array_equal(out["q"], want)
    assert np.array_equal(out["dq"], want.astype(np.float32) * np.float32(0.5))


def test_groqchip_geometry_non_multiples_and_single_rows():
    g = Graph()
    x = g.input("x", (1, 700), "float16")
    w = values((700, 330), np.float16, 1, 0.05)
    y = g.gelu(g.matmul(x, g.constant("w", w)))
    g.output("y", g.softmax(y))
    X = values((1, 700), np.float16, 2)
    out, c = run_graph(g, {"x": X}, cfg=GROQ)
    h = X.astype(np.float64) @ w
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    e = np.exp(h - h.max(-1, keepdims=True))
    assert np.abs(out["y"] - e / e.sum(-1, keepdims=True)).max() < 2e-3


def test_graph_errors_name_the_operation():
    g = Graph()
    a = g.input("a", (3, 4), "float16")
    b = g.input("b", (5, 4), "float16")
    i8 = g.input("c", (3, 4), "int8")
    with pytest.raises(GraphError, match="add: shapes"):
        g.add(a, b)
    with pytest.raises(GraphError, match="add: dtypes"):
        g.add(a, i8)
    with pytest.raises(GraphError, match="matmul: inner"):
        g.matmul(a, a)
    with pytest.raises(GraphError, match="softmax: only the last axis"):
        g.softmax(a, axis=0)
    with pytest.raises(GraphError, match="exp: needs a float"):
        g.exp(i8)
    with pytest.raises(GraphError, match="reshape"):
        g.reshape(a, (5, 3))
    with pytest.raises(GraphError, match="input: name"):
        g.input("a", (1,), "int8")
    with pytest.raises(GraphError, match="no outputs"):
        lpucore.compile(Graph())


def test_a_graph_that_does_not_fit_says_how_much():
    g = Graph()
    x = g.input("x", (1, 320), "float16")
    big = np.zeros((320, 400_000), np.float16)          # 256 MB of weights > 220 MiB
    g.output("y", g.matmul(x, g.constant("w", big)))
    with pytest.raises(CompileError, match="bytes"):
        lpucore.compile(g, GROQ)


def test_execute_checks_inputs():
    g = Graph()
    x = g.input("x", (2, 8), "float16")
    g.output("y", g.relu(x))
    c = lpucore.compile(g, SMALL)
    with pytest.raises(GraphError, match="missing"):
        lpucore.execute(c, {})
    with pytest.raises(GraphError, match="must be float16"):
        lpucore.execute(c, {"x": np.zeros((2, 8), np.float32)})


def test_ops_front_end_and_cache():
    lpucore.ops.clear_cache()
    x = values((3, 90), np.float16, 5)
    y, st_ = lpucore.ops.softmax(x, config=SMALL, stats=True)
    e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    assert np.abs(y - e / e.sum(-1, keepdims=True)).max() < 1e-3 and st_.cycles > 0
    lpucore.ops.softmax(x * np.float16(2), config=SMALL)
    assert lpucore.ops.cache_info() == (1,)
    a = values((4, 50), np.int8, 6)
    b = values((50, 7), np.int8, 7)
    assert np.array_equal(lpucore.ops.matmul(a, b, config=SMALL), a.astype(np.int32) @ b)
    assert np.array_equal(lpucore.ops.transpose(a, config=SMALL), a.T)


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_state_persists_across_runs_and_updates_after_its_reads(engine):
    from lpucore import Chip
    g = Graph()
    x = g.input("x", (3, 70), "float32")
    acc = g.state("acc", (3, 70), "float32")
    cnt = g.state("cnt", (1,), "int32", init=np.array([5], np.int32))
    g.output("before", g.mul(acc, 2.0))                   # reads the value the run started with
    g.assign(acc, g.add(acc, x))
    g.assign(cnt, g.add(cnt, 1))
    c = lpucore.compile(g, SMALL)
    assert set(c.states) == {"acc", "cnt"}
    chip = Chip(SMALL, engine=engine)
    c.load(chip)
    total = np.zeros((3, 70), np.float32)
    for step in range(3):
        X = values((3, 70), np.float32, step)
        out, st_ = lpucore.execute(c, {"x": X}, chip=chip)
        assert st_.cycles == c.expected_cycles
        assert np.array_equal(out["before"], total * np.float32(2))
        total = total + X
        assert np.array_equal(c.read_state(chip, "acc"), total)
        assert c.read_state(chip, "cnt")[0] == 5 + step + 1


def test_state_errors():
    g = Graph()
    s = g.state("s", (2, 3), "float16")
    with pytest.raises(GraphError, match="assign: value"):
        g.assign(s, g.input("a", (2, 4), "float16"))
    with pytest.raises(GraphError, match="must be a state"):
        g.assign(g.input("b", (2, 3), "float16"), s)
    g.assign(s, s + 1.0)
    with pytest.raises(GraphError, match="already assigned"):
        g.assign(s, s)
    with pytest.raises(GraphError, match="taken"):
        g.input("s", (1,), "int8")
    with pytest.raises(GraphError, match="init must be"):
        g.state("t", (2,), "int8", init=np.zeros(3, np.int8))


def test_host_written_tensors_never_reuse_a_temporary_space():
    """A constant placed while lowering (a mask, a ones matrix) is written by the host before the run: it must
    not share addresses with a temporary that died earlier in the schedule, or that temporary overwrites it."""
    from lpucore import ChipConfig
    from lpucore.compiler.memory import Memory, place, release
    from lpucore.dtypes import INT8 as I8
    cfg = ChipConfig.tiny()
    mem = Memory(cfg)
    # fill every slice of both hemispheres, then free one temporary read until cycle 100
    temps = []
    while True:
        try:
            temps.append(place(mem, f"t{len(temps)}", I8, 8, cfg.lanes, cfg.lanes, len(temps) % 2))
        except Exception:
            break
    victim = temps[0]
    victim.last_read[:] = 100
    release(mem, victim)
    spots = {(g, a) for p in range(victim.planes) for g, b in zip(victim.slices[p], victim.bases[p])
             for a in range(b, b + 1)}
    t = place(mem, "again", I8, 8, cfg.lanes, cfg.lanes, victim.hem)       # a temporary may reuse it
    assert {(g, b) for g, b in zip(t.slices[0], t.bases[0])} & spots
    assert min(min(a) for a in t.after) >= 101
    release(mem, t)
    with pytest.raises(Exception, match="does not fit"):
        place(mem, "c", I8, 8, cfg.lanes, cfg.lanes, victim.hem, kind="const")


def test_weights_are_tiled_one_member_per_plane():
    """A weight with several column tiles is kept as one member tensor per MXM plane (the planes load
    weights in the same cycles); Compiled.constants keeps the whole array, and the product is unchanged."""
    K, N = 96, 5 * SMALL.lanes + 7
    g = Graph()
    W = values((K, N), np.int8, 3)
    g.output("y", g.matmul(g.input("x", (2, K), "int8"), g.constant("w", W)))
    X = values((2, K), np.int8, 4)
    out, c = run_graph(g, {"x": X})
    assert np.array_equal(out["y"], X.astype(np.int32) @ W.astype(np.int32))
    assert np.array_equal(c.constants["w"], W) and "w" not in c.program.tensors
    parts = c.tiles["w"]
    assert [m for m, _ in parts] == [f"w@{j}" for j in range(SMALL.mxm_planes)]
    assert sorted(np.concatenate([cols for _, cols in parts]).tolist()) == list(range(N))
    slices = [{s for s, _ in c.program.tensors[m].locations(0, SMALL.lanes)} for m, _ in parts]
    assert all(not (a & b) for i, a in enumerate(slices) for b in slices[i + 1:])     # each on its own slices


def test_the_largest_weights_are_placed_first_each_member_on_full_stripes():
    """Matmul weights are placed before the other constants, the largest first: a product's members
    then find slices of their own (the planes load them in the same cycles) before smaller tensors
    fragment the space; on a slice two weights share, the larger lies below. A tiled weight's stripes
    (the rows one LW cycle takes) are those of its narrowest piece."""
    rng = np.random.default_rng(0)
    g = Graph()
    x = g.input("x", (2, 128), "int8")
    small = [g.constant(f"w{i}", rng.integers(-5, 5, (128, 16 * SMALL.lanes)).astype(np.int8)) for i in range(8)]
    big = g.constant("big", rng.integers(-5, 5, (128, 64 * SMALL.lanes)).astype(np.int8))
    for i, w in enumerate(small + [big]):
        g.output(f"y{i}", g.matmul(x, w))
    c = lpucore.compile(g, SMALL)
    tensors = c.program.tensors

    def stripes(name):
        return dict(tensors[name].locations(0, SMALL.lanes))       # slice -> first address of its stripe
    big_members = [stripes(m) for m, _ in c.tiles["big"]]
    assert all(len(m) == SMALL.mxm_lw_streams for m in big_members)
    assert all(not (set(a) & set(b)) for i, a in enumerate(big_members) for b in big_members[i + 1:])
    lowest = {s: a for m in big_members for s, a in m.items()}
    for i in range(8):
        for m, _ in c.tiles[f"w{i}"]:
            assert all(a > lowest[s] for s, a in stripes(m).items() if s in lowest)


def test_a_tiled_weight_loads_as_many_rows_a_cycle_as_its_narrowest_piece_has_stripes():
    from lpucore import dtypes as dt
    from lpucore.compiler.memory import VT, TiledVT

    def vt(name, n):
        return VT(name, dt.get("int8"), 64, 64, 1, 0, [list(range(n))], [[1] * n], [[0] * n], kind="const")
    tiled = TiledVT("w", [vt("w@0", 8), vt("w@1", 6)], 3 * 64, 64, [(2, 0, 64, vt("w@k2.0", 5), 0)])
    assert tiled.stripes == 6           # the whole tiles' members; a part loads as a tensor of its own


def _gemv_lw_groups(tiles, seed):
    """An int8 product of two rows, K two chunks and 20 rows, over ``tiles`` column tiles on the small
    chip, checked against NumPy on both engines: the rows each weight load of planes W0 and E1 takes."""
    from test_conv import _lw_rows_per_install
    K, N = 2 * SMALL.lanes + 20, tiles * SMALL.lanes
    X, W = values((2, K), np.int8, seed), values((K, N), np.int8, seed + 1)
    g = Graph("gemv")
    g.output("y", g.matmul(g.input("x", (2, K), "int8"), g.constant("w", W)))
    out, c = run_graph(g, {"x": X})
    assert np.array_equal(out["y"], X.astype(np.int32) @ W.astype(np.int32))
    return [_lw_rows_per_install(c, q) for q in ("MXM.W0.LW", "MXM.E1.LW")]


FULL_LW, SHORT_LW = SMALL.mxm_size, 20        # rows loaded: the whole buffer, or the partial chunk's


def test_a_last_partial_chunk_loaded_after_another_skips_the_buffers_zero_rows():
    """An int8 product whose K ends in a partial chunk: a plane's weight buffer keeps the zeros a
    partial chunk's load put past its rows, so the next tile on that plane takes its partial chunk
    first and loads only its rows (20 rows, not 64); integer sums do not
    depend on the order. Both engines give NumPy's product in the predicted cycles. (Fewer tiles than
    would mask the last chunk.)"""
    from lpucore.compiler.lower_more import MASK_TILES_PER_PLANE
    for groups in _gemv_lw_groups((MASK_TILES_PER_PLANE - 1) * SMALL.mxm_planes, 5):
        assert groups[:6] == [FULL_LW, FULL_LW, FULL_LW, SHORT_LW, FULL_LW, FULL_LW]


def test_a_product_over_many_tiles_masks_its_last_chunk_and_loads_only_its_rows():
    """An int8 product of two rows over many column tiles (MASK_TILES_PER_PLANE a plane or more) whose K
    ends in a partial chunk zeroes that chunk's activation lanes past K once (a VXM and), so every tile's
    load of the chunk takes its 20 rows only, stale weights past them meeting zero lanes; both
    engines give NumPy's product in the predicted cycles."""
    from lpucore.compiler.lower_more import MASK_TILES_PER_PLANE
    for groups in _gemv_lw_groups(MASK_TILES_PER_PLANE * SMALL.mxm_planes, 7):
        assert groups[2::3] == [SHORT_LW] * (len(groups) // 3) and set(groups[0::3] + groups[1::3]) == {FULL_LW}


@pytest.mark.parametrize("superlanes", [3, 5, 7])
def test_lane_reductions_over_any_lane_count_are_exact(superlanes):
    """The all-reduce's radices multiply to exactly the lane count (48, 80 and 112 lanes: radices
    3, 5 and 7 with powers of two), so integer sums and maxima are exact in every lane."""
    import dataclasses
    cfg = dataclasses.replace(SMALL, superlanes=superlanes, mxm_size=16 * superlanes)
    g = Graph()
    shape = (2, 2 * cfg.lanes - 5)
    # int32 and float32 take the SXM tree (int8 and float16 sums go to the MXM)
    a, b = g.input("a", shape, "int32"), g.input("b", shape, "float32")
    g.output("s", g.sum(a, keepdims=True))
    g.output("m", g.max(a, keepdims=True))
    g.output("mf", g.max(b, keepdims=True))
    A = values(shape, np.int8, superlanes).astype(np.int32) * 1000
    B = values(shape, np.float32, superlanes)
    out, _ = run_graph(g, {"a": A, "b": B}, cfg=cfg)
    assert np.array_equal(out["s"], A.astype(np.int64).sum(-1, keepdims=True))
    assert np.array_equal(out["m"], A.max(-1, keepdims=True))
    assert np.array_equal(out["mf"], B.max(-1, keepdims=True))


def test_radix_plan_tiles_the_lanes_in_fewer_trips():
    from lpucore.compiler.allreduce import _Geometry, radix_plan
    from lpucore.compiler.kernels import Ctx
    from lpucore.compiler.schedule import Scheduler
    geo = _Geometry(Ctx(GROQ, Scheduler(GROQ)), 4)
    plan = radix_plan(GROQ.lanes, geo, GROQ.vxm_alus_per_lane)
    assert int(np.prod(plan)) == GROQ.lanes and len(plan) <= 3
    # each trip costs one SXM round trip plus its combine tree: below nine binary trips
    assert sum(geo.latency(k) for k in plan) < 9 * geo.latency(2)


def test_column_constants_are_written_in_every_lane():
    """A [R, 1] constant read only elementwise is placed with its value in every lane (no lane
    reduction to broadcast it): the product is exact and the program has no SXM work."""
    g = Graph()
    x = g.input("x", (3, 100), "float32")
    col = np.array([[2.0], [-0.5], [3.0]], dtype=np.float32)
    g.output("y", g.mul(x, g.constant("col", col)))
    X = values((3, 100), np.float32, 4)
    out, c = run_graph(g, {"x": X})
    assert np.array_equal(out["y"], X * col)
    assert not any(q.startswith("SXM") and any(i.op.name != "NOP" for i in ins)
                   for q, ins in c.program.queues.items())


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_a_product_of_one_tile_shares_its_weight_loads_between_two_planes(dtype, tmp_path):
    """One column tile and many rows: both planes of a hemisphere load its weights from the same
    reads in the same cycles and take half of the rows each; K past a whole chunk pads with zero
    rows read at address 0.  Exact (int8) or within the float16 bound on both engines."""
    from lpucore import trace as tr
    M, K, N = 24, 3 * SMALL.lanes // 2 + 5, 9
    g = Graph()
    W = values((K, N), dtype, 5, 0.5)
    g.output("y", g.matmul(g.input("x", (M, K), dtype), g.constant("w", W)))
    X = values((M, K), dtype, 6, 0.5)
    out, c = run_graph(g, {"x": X})
    assert_product(out["y"], X, W, dtype)
    chip = lpucore.Chip(SMALL)
    c.load(chip)
    chip.run(trace=tmp_path / "t.csv")          # the loads do not depend on the input's values
    _, rows = tr.read(tmp_path / "t.csv")
    lw = {}
    for cyc, kind, q, _unit, what in rows:
        if kind == "issue" and q.endswith(".LW"):
            lw.setdefault(q, []).append((int(cyc), what))
    hems = {}
    for q, recs in lw.items():
        hems.setdefault(q.split(".")[1][0], []).append(recs)
    assert any(len(v) == 2 and v[0] == v[1] for v in hems.values()), lw.keys()


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_gathered_tables_are_read_by_address(dtype, monkeypatch):
    """A constant table read only by gathers of few indices is kept for MEM Gather (one slice per
    block of rows and column chunk): the rows come back bit for bit on both engines, out-of-range
    indices give zero rows as the one-hot product does, and the lookup costs a fraction of the
    one-hot product's cycles (which streams the whole table through the MXM)."""
    from lpucore.compiler import gather
    V, D = 20000, 700
    table = values((V, D), dtype, 7, 4.0)
    idx = np.array([0, V - 1, 12345, V, -3], dtype=np.int32)

    def graph():
        g = Graph()
        g.output("emb", g.gather(g.constant("tab", table), g.input("i", (len(idx),), "int32")))
        return g
    out, c = run_graph(graph(), {"i": idx}, cfg=GROQ)
    ref = np.where(((idx >= 0) & (idx < V))[:, None], table[np.clip(idx, 0, V - 1)], 0).astype(table.dtype)
    assert np.array_equal(out["emb"].view(np.uint8), ref.view(np.uint8))
    assert "tab" in c.row_parts and "tab" not in c.program.tensors
    assert any(i.op.mnemonic == "Gather" for lst in c.program.queues.values() for i in lst)
    monkeypatch.setattr(gather, "MAX_INDICES", 0)
    out1, c1 = run_graph(graph(), {"i": idx}, cfg=GROQ, engines=("fast",))
    assert np.array_equal(out1["emb"].view(np.uint8), ref.view(np.uint8))
    assert 3 * c.expected_cycles < c1.expected_cycles, (c.expected_cycles, c1.expected_cycles)


def test_concatenated_rows_are_written_in_place(monkeypatch):
    """A concatenation of whole rows made by elementwise kernels costs no kernel of its own: each
    part's producer writes its rows of the concatenation in place (bit for bit the same result, in
    fewer cycles than copying the parts)."""
    from lpucore.compiler.lower import Compiler
    W = values((150, 40), np.int8, 11)

    def graph():
        g = Graph()
        x = g.input("x", (3, 150), "float32")
        parts = [g.cast(g.mul(x, 0.5), "int8"), g.cast(g.sub(x, 3.0), "int8")]
        g.output("y", g.matmul(g.concat(parts, axis=0), g.constant("w", W)))
        return g
    X = values((3, 150), np.float32, 12, 40.0)
    out, c = run_graph(graph(), {"x": X})
    A = np.concatenate([np.rint(X * 0.5), np.rint(X - 3.0)]).clip(-128, 127).astype(np.int8)
    assert np.array_equal(out["y"], A.astype(np.int32) @ W.astype(np.int32))
    lands = {op: last for op, _, last in c.kernels}
    assert lands["concat"] == max(last for op, _, last in c.kernels if op == "cast")
    monkeypatch.setattr(Compiler, "concat_parts", lambda self: {})
    out1, c1 = run_graph(graph(), {"x": X}, engines=("fast",))
    assert np.array_equal(out1["y"], out["y"]) and c.expected_cycles < c1.expected_cycles


@settings(max_examples=few(4))
@given(st.integers(1, 40), st.integers(1, 700), st.integers(1, 4), st.sampled_from(["float16", "int8", "float32"]),
       st.integers(0, 99))
def test_scatter_writes_rows_at_run_time_indices(R, D, n, dtype, seed):
    """Graph.scatter matches NumPy bit for bit on both engines: rows written at run-time indices
    (out-of-range ones write nothing, the later of equal indices wins), by MEM Scatter."""
    r = np.random.default_rng(seed)
    X, rows = values((R, D), dtype, seed), values((n, D), dtype, seed + 1)
    idx = r.integers(-2, R + 2, n).astype(np.int32)
    g = Graph()
    g.output("y", g.scatter(g.input("x", (R, D), dtype), g.input("i", (n,), "int32"), g.input("r", (n, D), dtype)))
    out, c = run_graph(g, {"x": X, "i": idx, "r": rows})
    ref = X.copy()
    for k in range(n):
        if 0 <= idx[k] < R:
            ref[idx[k]] = rows[k]
    assert np.array_equal(out["y"].view(np.uint8), ref.view(np.uint8))
    assert any(i.op.mnemonic == "Scatter" for lst in c.program.queues.values() for i in lst)


def test_a_state_scattered_and_assigned_is_written_in_place_run_after_run():
    """A state read only by a scatter whose result it is assigned keeps its other rows where they
    are: only the new row is written (a KV cache), and run after run on one chip the state holds
    every row written so far; the same on both engines, in the predicted cycles."""
    S, D = 33, 700
    init = values((S, D), np.float16, 3)
    g = Graph()
    K = g.state("k", (S, D), "float16", init=init)
    Kn = g.scatter(K, g.input("p", (1,), "int32"), g.input("row", (1, D), "float16"))
    g.assign(K, Kn)
    g.output("s", g.sum(g.cast(Kn, "float32"), axis=-2))
    c = lpucore.compile(g, SMALL)
    scatters = sum(i.op.mnemonic == "Scatter" for lst in c.program.queues.values() for i in lst)
    assert 0 < scatters <= 2 * -(-D // SMALL.lanes) * 8, scatters
    assert not [k for k in c.kernels if k[0] in ("assign", "copy")], c.kernels
    for eng in ("fast", "reference"):
        chip = lpucore.Chip(SMALL, engine=eng)
        c.load(chip)
        ref = init.copy()
        for p in (0, 5, 32, 40, 5):
            row = values((1, D), np.float16, 10 + p)
            out, st_ = lpucore.execute(c, {"p": np.array([p], np.int32), "row": row}, chip=chip)
            assert st_.cycles == c.expected_cycles
            if p < S:
                ref[p] = row[0]
            assert np.array_equal(chip.read_tensor("k").view(np.uint16), ref.view(np.uint16)), (eng, p)
            assert np.allclose(out["s"], ref.astype(np.float32).sum(0), rtol=1e-3, atol=1e-2)


def test_scatter_constants_placed_before_lowering(monkeypatch):
    """A graph with in-place scatters that does not fit is compiled once more with the scatters' constants
    placed before anything is lowered (lpucore.compiler.scatter.reserve); that program writes the same rows."""
    from lpucore.compiler import api
    from lpucore.compiler.lower import Compiler
    S, D = 33, 700
    init = values((S, D), np.float16, 3)
    g = Graph()
    K = g.state("k", (S, D), "float16", init=init)
    Kn = g.scatter(K, g.input("p", (2,), "int32"), g.input("row", (2, D), "float16"))
    g.assign(K, Kn)
    g.output("s", g.sum(g.cast(Kn, "float32"), axis=-2))
    run, tried = Compiler.run, []

    def run_or_not_fit(self):
        tried.append(self.reserve_scatter)
        if not self.reserve_scatter:
            raise CompileError("tensor 't' needs 9 bytes: the graph does not fit on this chip")
        return run(self)
    monkeypatch.setattr(Compiler, "run", run_or_not_fit)
    from lpucore.compiler import scatter
    reserve, reserved = scatter.reserve, []

    def reserve_and_note(comp):
        reserve(comp)
        reserved.append(sorted(comp.scatter_consts))
    monkeypatch.setattr(scatter, "reserve", reserve_and_note)
    c = api.compile_one(g, SMALL)
    assert tried == [False, True] and len(reserved) == 1
    assert [n[:4] for n in reserved[0]] == ["_sxb", "_sxc", "_sxs"] and set(reserved[0]) <= set(c.constants)
    chip = lpucore.Chip(SMALL)
    c.load(chip)
    rows = values((2, D), np.float16, 11)
    _, st_ = lpucore.execute(c, {"p": np.array([4, 40], np.int32), "row": rows}, chip=chip)
    ref = init.copy()
    ref[4] = rows[0]
    assert st_.cycles == c.expected_cycles
    assert np.array_equal(chip.read_tensor("k").view(np.uint16), ref.view(np.uint16))
    monkeypatch.setattr(Compiler, "run", lambda self: (_ for _ in ()).throw(CompileError("bad graph")))
    with pytest.raises(CompileError, match="bad graph"):     # another error is not retried
        api.compile_one(g, SMALL)


def test_a_tensor_without_room_says_when_the_free_space_is_in_pieces():
    """More bytes free than a tensor needs, but not as consecutive addresses in enough slices of one
    hemisphere: the error says so (it named only the free bytes, which read as a contradiction)."""
    g = Graph("t")
    x = g.input("x", (1, 3, 36, 36), "int8")
    w = g.constant("w", np.random.default_rng(0).integers(-128, 128, (65, 3, 3, 3)).astype(np.int8))
    g.output("y", g.conv2d(x, w, g.constant("b", np.zeros(65, np.int32)), padding=1))
    with pytest.raises(CompileError, match=r"needs ([\d,]+) bytes.*; ([\d,]+) bytes are free .*, but in pieces: "
                                           r".* consecutive free addresses in each of \d+ slices of one hemisphere"
                                           r".*: the graph does not fit on this chip") as e:
        lpucore.compile(g, ChipConfig.small())
    need, free = (int(v.replace(",", "")) for v in re.search(r"needs ([\d,]+) bytes.*; ([\d,]+) bytes are free",
                                                             str(e.value)).groups())
    assert free > need
    g = Graph("t")                             # more than a hemisphere holds, less than the chip
    x = g.input("x", (16369, 64), "int8")
    g.output("y", g.add(x, x))
    with pytest.raises(CompileError, match=r"bytes are free .*, but a tensor lives in one hemisphere and either "
                                           r"has at most [\d,]+: the graph does not fit"):
        lpucore.compile(g, ChipConfig.small())


def _issues(compiled, queue):
    """(cycle, instruction) of each issue on ``queue`` (a Repeat's repeats as its instruction's)."""
    out, t, prev = [], 0, None
    for ins in compiled.program.queues[queue]:
        op = ins.op.mnemonic
        if op == "NOP":
            t += ins["n"]
        elif op == "Repeat":
            out += [(t - 1 + k * ins["d"], prev) for k in range(1, ins["n"] + 1)]
            t = out[-1][0] + 1
        else:
            out.append((t, ins))
            prev, t = ins, t + 1
    return out


def test_a_gemv_loads_its_weights_back_to_back():
    """A GEMV's one activation row a chunk takes no stream of its own: its product issues at the cycle of
    its plane's next weight install, on one of that plane's streams (free then; the weights in effect are
    still its own), and an LW cycle some of whose streams or slices are taken loads the rows that fit
    rather than none. So on the GroqChip nearly every load past each plane's first runs its 20 LW cycles
    back to back, 16 rows each, and installs the next cycle (before: one cycle lost to each product);
    every load takes the whole buffer; both engines give NumPy's product in the predicted cycles."""
    K, N = 4 * GROQ.lanes, 8 * GROQ.lanes
    X, W = values((1, K), np.int8, 11), values((K, N), np.int8, 12)
    g = Graph("gemv")
    g.output("y", g.matmul(g.input("x", (1, K), "int8"), g.constant("w", W)))
    out, c = run_graph(g, {"x": X}, cfg=GROQ)
    assert np.array_equal(out["y"], X.astype(np.int32) @ W.astype(np.int32))
    full = GROQ.mxm_size // GROQ.mxm_lw_streams
    back_to_back, later = 0, 0
    for plane in range(GROQ.mxm_planes):
        loads, lws = [], []
        for t, ins in _issues(c, f"MXM.{GROQ.plane_name(plane)}.LW"):
            if ins.op.mnemonic == "LW":
                lws.append((t, ins["n"]))
            else:
                loads.append((lws, t))
                lws = []
        assert len(loads) == 8 and all(sum(n for _, n in lws) == GROQ.mxm_size for lws, _ in loads)
        later += len(loads) - 1
        back_to_back += sum(lws == [(t, GROQ.mxm_lw_streams) for t in range(iw - full, iw)] for lws, iw in loads[1:])
    assert back_to_back >= 0.8 * later, (back_to_back, later)
