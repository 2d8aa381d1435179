"""Fusion of elementwise chains (lpucore.compiler.fuse): a fused program computes the same bits
as the unfused one, in fewer cycles, and still predicts its cycle count exactly."""

import numpy as np
import pytest

import lpucore
from lpucore import ChipConfig, Graph
from lpucore.compiler import fuse

SMALL = ChipConfig.small()          # 8 ALUs a lane: long chains are split into temporaries
GROQ = ChipConfig.groqchip1()       # 16


def compile_both(build, cfg, monkeypatch):
    """(fused, unfused) compilations of the graph build() makes."""
    fused = lpucore.compile(build(), cfg)
    monkeypatch.setattr(fuse, "ENABLED", False)
    plain = lpucore.compile(build(), cfg)
    monkeypatch.setattr(fuse, "ENABLED", True)
    return fused, plain


def run_all(c, inputs):
    """Outputs on both engines (identical bits), each run's cycles equal to the prediction."""
    outs = []
    for eng in ("fast", "reference"):
        out, st = lpucore.execute(c, inputs, engine=eng)
        assert st.cycles == c.expected_cycles, (eng, st.cycles, c.expected_cycles)
        outs.append(out)
    for k in outs[0]:
        assert np.array_equal(outs[0][k].view(np.uint8), outs[1][k].view(np.uint8)), k
    return outs[0]


def same_bits(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), k


def fused_count(c):
    return sum(1 for _op, _name, last in c.kernels if last is None)


def chain_graph(R, C):
    """Chains of every fusable kind: float16 -> float32 arithmetic, transcendental functions,
    quantize / dequantize, gelu, integer wrap-around, and a [R, 1] chain of broadcast values."""
    g = Graph()
    x = g.input("x", (R, C), "float16")
    s = g.input("s", (C,), "float32")
    i8 = g.input("i", (R, C), "int8")
    y = g.mul(g.add(g.mul(g.cast(x, "float32"), 0.5), s), 3.0)
    y = g.silu(g.maximum(g.tanh(g.sub(y, 1.0)), -0.25))
    d = g.dequantize(g.quantize(y, 0.01), 0.01, dtype="float32")
    g.output("y", g.cast(g.gelu(g.div(d, 1.5)), "float16"))
    k = g.cast(g.mul(g.add(g.cast(i8, "int32"), 100), 3), "int8")
    g.output("k", g.abs(g.neg(g.sub(k, 7))))
    m = g.max(g.abs(g.cast(x, "float32")), keepdims=True)                  # [R, 1], broadcast
    r = g.rsqrt(g.add(g.mul(m, 2.0), 1.0))
    g.output("n", g.mul(g.exp(g.mul(g.cast(x, "float32"), 0.1)), r))
    g.output("r", g.sqrt(g.add(g.mul(m, 0.5), 1.0)))
    return g


@pytest.mark.parametrize("cfg,R,C", [(SMALL, 3, 150), (SMALL, 1, 64), (GROQ, 2, 700)])
def test_fused_chains_compute_the_same_bits_in_fewer_cycles(cfg, R, C, monkeypatch):
    fused, plain = compile_both(lambda: chain_graph(R, C), cfg, monkeypatch)
    rng = np.random.default_rng(R * C)
    inputs = {"x": rng.standard_normal((R, C)).astype(np.float16),
              "s": rng.standard_normal(C).astype(np.float32),
              "i": rng.integers(-128, 128, (R, C)).astype(np.int8)}
    same_bits(run_all(fused, inputs), run_all(plain, inputs))
    assert fused_count(fused) > 10 and fused_count(plain) == 0
    assert len(fused.kernels) == len(plain.kernels)
    assert fused.expected_cycles < plain.expected_cycles


def reduction_matmul_graph():
    """Chains that feed a reduction, softmax, layernorm and a matmul (those read placed tensors),
    and chains after them."""
    rng = np.random.default_rng(5)
    g = Graph()
    x = g.input("x", (4, 150), "float16")
    b = g.constant("b", rng.standard_normal(150).astype(np.float16))
    a = g.mul(g.add(x, b), 0.5)
    g.output("sum", g.add(g.mul(g.sum(g.cast(g.abs(a), "float32")), 2.0), 1.0))
    g.output("sm", g.softmax(g.mul(g.sub(x, 1.0), 0.25)))
    g.output("ln", g.layernorm(g.relu(g.add(x, b)), g.constant("ga", np.ones(150, np.float16)),
                               g.constant("be", np.zeros(150, np.float16))))
    w = g.constant("w", (rng.standard_normal((150, 40)) * 0.1).astype(np.float16))
    h = g.cast(g.relu(g.sub(g.cast(x, "float32"), 0.1)), "float16")
    mm = g.matmul(h, w, out_dtype="float32")
    g.output("mm", g.cast(g.add(g.mul(mm, 2.0), 0.5), "float16"))
    return g


def test_chains_into_reductions_and_matmul(monkeypatch):
    fused, plain = compile_both(reduction_matmul_graph, SMALL, monkeypatch)
    x = np.random.default_rng(9).standard_normal((4, 150)).astype(np.float16)
    out = run_all(fused, {"x": x})
    same_bits(out, run_all(plain, {"x": x}))
    assert fused_count(fused) > 0
    assert fused.expected_cycles < plain.expected_cycles
    ref = np.maximum(x.astype(np.float32) - np.float32(0.1), 0).astype(np.float16).astype(np.float32)
    w = reduction_matmul_graph().constants
    assert out["mm"].shape == (4, 40) and np.isfinite(out["mm"]).all()
    W = [a for a in w.values() if a.shape == (150, 40)][0].astype(np.float32)
    assert np.allclose(out["mm"].astype(np.float32), (ref @ W) * 2 + 0.5, rtol=1e-2, atol=1e-2)


def test_outputs_states_and_shared_values_are_not_deferred():
    g = Graph()
    x = g.input("x", (2, 30), "float32")
    st = g.state("st", (2, 30), "float32")
    a = g.add(x, 1.0)                     # an output, and read by the next op
    g.output("a", a)
    b = g.mul(a, 2.0)                     # assigned to the state
    g.assign(st, b)
    c = g.exp(g.exp(g.exp(g.exp(x))))     # read twice, four operations: too long to recompute
    d = g.sub(g.mul(c, c), st)            # the mul is read once: deferred
    g.output("d", d)
    ids = fuse.deferrable(g)
    assert a.id not in ids and b.id not in ids and c.id not in ids and d.id not in ids
    # the three inner exps are read once (deferred into c), and the mul
    assert len(ids) == 4


def test_cheap_shared_values_are_recomputed_on_small_tensors_only():
    g = Graph()
    x = g.input("x", (1, 300), "float32")
    big = g.input("big", (40, 300), "float32")
    c = g.cast(x, "float16")              # read by two elementwise ops: recomputed by each
    g.output("y", g.add(g.abs(c), g.neg(c)))
    e = g.exp(big)                        # read twice, but 12,000 elements: stays in MEM
    g.output("z", g.mul(e, e))
    k = g.neg(x)                          # one row read by a [40, 300] consumer: too big to inline
    g.output("w", g.add(big, k))
    ids = fuse.deferrable(g)
    assert c.id in ids and e.id not in ids and k.id not in ids
    assert fuse.RECOMPUTE_ELEMENTS < 40 * 300


def random_chains(seed):
    """Random chains of elementwise operations over a few shapes (rows of 1 and [..., 1]
    columns among them) and dtypes, with values read once, twice, or by a reduction."""
    rng = np.random.default_rng(seed)
    R, C = int(rng.integers(1, 4)), int(rng.choice([1, 5, 64, 100]))
    g = Graph()
    x = g.input("x", (R, C), "float32")
    pool = [x, g.input("b", (C,), "float32")]
    for _ in range(int(rng.integers(8, 16))):
        a = pool[-1] if rng.random() < 0.6 else pool[int(rng.integers(len(pool)))]
        if a.shape != (R, C):
            a = g.add(x, a)
        kind = rng.choice(["bin", "un", "cast", "red"])
        if kind == "bin":
            o = pool[int(rng.integers(len(pool)))]
            y = getattr(g, rng.choice(["add", "sub", "mul", "maximum", "minimum"]))(a, o)
        elif kind == "un":
            y = getattr(g, rng.choice(["neg", "abs", "relu", "tanh", "sigmoid", "silu"]))(a)
        elif kind == "cast":
            d = rng.choice(["float16", "int32", "int8", "int16"])
            y = g.cast(g.cast(g.mul(a, 10.0), d), "float32")
        else:
            y = g.mul(a, g.max(a, keepdims=True))
        pool.append(y)
    g.output("y", pool[-1])
    g.output("z", g.sum(pool[len(pool) // 2], keepdims=True))
    return g, (R, C)


@pytest.mark.parametrize("seed", range(6))
def test_random_chains_fused_and_unfused_agree(seed, monkeypatch):
    fused, plain = compile_both(lambda: random_chains(seed)[0], SMALL, monkeypatch)
    R, C = random_chains(seed)[1]
    rng = np.random.default_rng(100 + seed)
    inputs = {"x": rng.standard_normal((R, C)).astype(np.float32), "b": rng.standard_normal(C).astype(np.float32)}
    same_bits(run_all(fused, inputs), run_all(plain, inputs))
    assert fused.expected_cycles <= plain.expected_cycles or fused_count(fused) > 0


def lane_reduction_graph():
    """Lane reductions of deferred expressions: inlined into the all-reduce's row expression (max of
    abs; a float32 sum of products), placed first where they cannot be (a float16 sum goes to the
    MXM; a chain too long for the ALUs the all-reduce leaves)."""
    g = Graph()
    x = g.input("x", (3, 700), "float16")
    xf = g.cast(x, "float32")
    g.output("m", g.max(g.abs(xf), keepdims=True))
    g.output("s", g.sum(g.mul(xf, xf)))
    g.output("h", g.sum(g.mul(x, x)))
    long = xf
    for _ in range(6):
        long = g.sub(g.mul(long, 0.5), 0.25)
    g.output("l", g.max(long))
    return g


@pytest.mark.parametrize("cfg", [SMALL, GROQ], ids=["small", "groq"])
def test_lane_reductions_inline_or_place_their_deferred_inputs(cfg, monkeypatch):
    fused, plain = compile_both(lane_reduction_graph, cfg, monkeypatch)
    x = (np.random.default_rng(3).standard_normal((3, 700)) * 4).astype(np.float16)
    out = run_all(fused, {"x": x})
    same_bits(out, run_all(plain, {"x": x}))
    assert fused.expected_cycles < plain.expected_cycles
    assert np.array_equal(out["m"], np.abs(x.astype(np.float32)).max(-1, keepdims=True))


def per_row_scale_graph():
    """One value per row (a lane max, then a maximum with a constant) read by two elementwise
    operations that broadcast it over the row's lanes."""
    g = Graph()
    x = g.input("x", (3, 150), "float32")
    m = g.maximum(g.max(g.abs(x), keepdims=True), 1e-3)
    g.output("y1", g.div(x, m))
    g.output("y2", g.mul(g.add(x, 1.0), m))
    return g


def test_one_value_per_row_held_in_every_lane_is_recomputed_by_its_consumers(monkeypatch):
    fused, plain = compile_both(per_row_scale_graph, SMALL, monkeypatch)
    x = np.random.default_rng(4).standard_normal((3, 150)).astype(np.float32)
    out = run_all(fused, {"x": x})
    same_bits(out, run_all(plain, {"x": x}))
    assert [last for op, _, last in fused.kernels if op == "maximum"] == [None]
    assert fused.expected_cycles < plain.expected_cycles
    m = np.maximum(np.abs(x).max(-1, keepdims=True), np.float32(1e-3))
    assert np.array_equal(out["y1"], x / m) and np.array_equal(out["y2"], (x + np.float32(1)) * m)


def residual_graph():
    """Two products of one input joined by one elementwise kernel (a residual block's last
    requantisation and its downsample shortcut): each product's int32 results requantised, the later
    one's by per-channel constants. Returns the graph, the shortcut and the later product."""
    rng = np.random.default_rng(5)
    g = Graph("residual")
    x = g.input("x", (96, 16), "int8")            # 96 vectors: more than a hemisphere's 44 slices
    a = g.matmul(x, g.constant("wa", rng.integers(-9, 9, (16, 8)).astype(np.int8)))
    b = g.matmul(x, g.constant("wb", rng.integers(-9, 9, (16, 8)).astype(np.int8)))
    short = g.quantize(g.add(g.mul(g.cast(a, "float32"), 0.5), 1.0), 2.0)
    m = g.constant("m", rng.uniform(0.1, 0.3, 8).astype(np.float32))
    y = g.add(g.mul(g.cast(b, "float32"), m), g.dequantize(short, 2.0, dtype="float32"))
    g.output("y", g.quantize(g.relu(y), 1.5))
    return g, short, b


def test_a_kernel_inlines_the_results_of_one_product_the_earlier_cut_where_smallest(monkeypatch):
    """The later product's chain is inlined into the kernel joining the two; the earlier product's
    is cut at its int8 quantize (not the float32 dequantize after it) and runs as its own kernel."""
    g, short, _ = residual_graph()
    d = fuse.deferrable(g)
    chain = [n.output for n in g.nodes if n.op in ("cast", "mul", "add", "dequantize", "relu")]
    assert short.id not in d and all(t in d for t in chain)
    fused, plain = compile_both(lambda: residual_graph()[0], GROQ, monkeypatch)
    x = np.random.default_rng(6).integers(-128, 128, (96, 16)).astype(np.int8)
    same_bits(run_all(fused, {"x": x}), run_all(plain, {"x": x}))


def test_an_elementwise_kernels_operands_are_placed_on_distinct_slices():
    """A tensor an elementwise kernel reads beside others already placed (the joining kernel reads the
    later product's results, the shortcut and the per-channel constant of every vector) is placed off
    their slices (Compiler.co_slices): its kernel reads a vector's operands in one cycle. The
    shortcut's kernel comes after the later product here, so the shortcut keeps off the product."""
    from lpucore.compiler.lower import Compiler
    g, short, b = residual_graph()
    c = Compiler(g, GROQ)
    c.run()
    m = next(t for t, name in g.constant_names.items() if name == "m")
    co = c.slices_of(c.vts[b.id], c.vts[m])
    assert co <= c.clear_hints[f"_t{short.id}"]
    assert not c.slices_of(c.vts[short.id]) & co
