"""Tensor parallelism: ``lpucore.compile(graph, system=...)`` / ``compile_system``
(shard.py splits the graph, collective.py schedules the all-gathers and all-reduces).

Covered: an int8 MLP with a concatenation along the split axis (P = 2 and 4, both
engines) equal bit for bit to one chip and to NumPy's int32 arithmetic, with the weight
slices each chip holds; an fp16 MLP within a stated bound of float64; the tiny Llama
decode step on 2 chips (attention heads and KV caches split) equal to one chip, step by
step; identical programs from two compiles; the compile errors; and an 8-chip GroqNode
(GroqChip geometry) splitting a 5120 x 5120 matmul by columns.  In every run the
predicted cycle count is the measured one, chip by chip.
"""

import functools

import numpy as np
import pytest

import lpucore
from lpucore import ChipConfig, CompileError, Graph, System
from lpucore.compiler.tensor_parallel import compile_system

SMALL = ChipConfig.small()                  # 64 lanes, 16 links, 500-cycle link latency
U16 = 2.0 ** -11                            # float16 unit roundoff (half an ulp at 1.0)


def matmul_bound(a, b):
    """README's float16 matmul bound against float64: (K/32 + 1) 2^-24 (|a| @ |b|) + 1 ulp."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    ref = a @ b
    ulp = np.spacing(np.abs(ref).astype(np.float16)).astype(np.float64)
    return ref, (a.shape[-1] / 32 + 1) * 2.0 ** -24 * (np.abs(a) @ np.abs(b)) + ulp


def pairwise(P):
    """Links wiring P chips pairwise (link (b - a) % P - 1 of chip a goes to chip b)."""
    return [(a, (b - a) % P - 1, b, (a - b) % P - 1) for a in range(P) for b in range(a + 1, P)]


def run_system(sc, system, inputs):
    """Run once; check the cycles chip by chip; return the outputs of every chip of the group."""
    sc.load(system)
    out, st = sc.run(inputs, system=system)
    assert st.finished and st.cycles == sc.expected_cycles
    assert [st.chips[c].cycles for c in sc.chips] == [p.expected_cycles for p in sc.parts]
    every = [p.read_outputs(system.chips[c]) for c, p in zip(sc.chips, sc.parts)]
    for k in out:
        assert np.array_equal(every[0][k], out[k])
    return every, st


# ---- int8: exact ------------------------------------------------------------------------------------
def int8_mlp(M=2, d=64, h=256, seed=0):
    """relu(concat(x @ Wa, x @ Wb)) (int32) -> float32 -> per-channel int8 -> @ W2 (int32)."""
    r = np.random.default_rng(seed)
    Wa, Wb = (r.integers(-128, 128, (d, h)).astype(np.int8) for _ in range(2))
    W2 = r.integers(-128, 128, (2 * h, d)).astype(np.int8)
    scale = (2.0 ** r.integers(8, 12, 2 * h)).astype(np.float32)     # powers of two: exact division
    x = r.integers(-128, 128, (M, d)).astype(np.int8)
    g = Graph("int8_mlp")
    xi = g.input("x", (M, d), "int8")
    hid = g.relu(g.concat([g.matmul(xi, g.constant("wa", Wa)), g.matmul(xi, g.constant("wb", Wb))], axis=-1))
    q = g.quantize(g.cast(hid, "float32"), scale, axis=-1)
    g.output("y", g.matmul(q, g.constant("w2", W2)))
    g.output("h", hid)
    H = np.maximum(np.concatenate([x.astype(np.int32) @ Wa, x.astype(np.int32) @ Wb], axis=-1), 0)
    Q = np.clip(np.round(H / scale.astype(np.float64)), -128, 127).astype(np.int32)   # half to even
    return g, {"x": x}, {"y": Q @ W2.astype(np.int32), "h": H}, (Wa, Wb, W2)


@pytest.mark.parametrize("P", [2, 4])
def test_int8_mlp_is_exact_and_really_split(P, engine):
    g, inputs, ref, (Wa, Wb, W2) = int8_mlp()
    one = lpucore.compile(g, SMALL)
    single, st1 = lpucore.execute(one, inputs, engine=engine)
    assert st1.cycles == one.expected_cycles
    system = System(P, topology=pairwise(P), config=SMALL, engine=engine)
    sc = lpucore.compile(g, system=system)
    every, st = run_system(sc, system, inputs)
    for out in every:                           # every chip holds the same bits
        for k in ("y", "h"):
            assert out[k].dtype == np.int32
            assert np.array_equal(out[k], ref[k]) and np.array_equal(out[k], single[k]), k
    # W_a, W_b by columns (chip r: the r-th P-th), W2 by the matching rows of both halves,
    # one int32 all-reduce for y and one all-gather for the output h
    h = Wa.shape[1]
    assert sorted(op for op, _, _ in sc.partition.collectives) == ["allgather", "allreduce"]
    for r, part in enumerate(sc.parts):
        ix = np.arange(r * h // P, (r + 1) * h // P)
        assert np.array_equal(part.constants["wa"], Wa[:, ix])
        assert np.array_equal(part.constants["wb"], Wb[:, ix])
        assert np.array_equal(part.constants["w2"], W2[np.concatenate([ix, h + ix])])
    assert st.c2c_bytes == P * sc.link_bytes > 0                  # lane-aligned parts: no padding


# ---- fp16: within a bound ---------------------------------------------------------------------------
def gelu(v):
    return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))


@pytest.mark.parametrize("P,seed", [(2, 0), (4, 1)])
def test_fp16_mlp_within_bound(P, seed):
    """y = gelu(x @ W1) @ W2 + x.  Bound, elementwise: (P + 5) * u * S with u = 2^-11 and
    S = (|x| @ |W1|) @ |W2| + |x|: h rounded to float16 (1 u, 1.13 u through gelu), gelu
    (1 ulp = 2 u), each chip's partial product rounded (1 u), P - 1 float16 all-reduce adds
    and the residual add (1 u each); float32 accumulation is far below u.  Observed: about
    1 ulp of max |y|; <= 4 ulps is asserted as well."""
    r = np.random.default_rng(seed)
    d, h = 64, 256
    W1 = (r.standard_normal((d, h)) * 0.1).astype(np.float16)
    W2 = (r.standard_normal((h, d)) * 0.1).astype(np.float16)
    x = r.standard_normal((2, d)).astype(np.float16)
    g = Graph("mlp")
    xi = g.input("x", (2, d), "float16")
    g.output("y", g.add(g.matmul(g.gelu(g.matmul(xi, g.constant("w1", W1))), g.constant("w2", W2)), xi))
    system = System(P, topology=pairwise(P), config=SMALL)
    sc = lpucore.compile(g, system=system)
    assert [op for op, _, _ in sc.partition.collectives] == ["allreduce"]
    assert np.array_equal(np.hstack([p.constants["w1"] for p in sc.parts]), W1)    # by columns
    assert np.array_equal(np.vstack([p.constants["w2"] for p in sc.parts]), W2)    # by rows
    (out, *_), _ = run_system(sc, system, {"x": x})
    x64, W1_, W2_ = (a.astype(np.float64) for a in (x, W1, W2))
    ref = gelu(x64 @ W1_) @ W2_ + x64
    S = (np.abs(x64) @ np.abs(W1_)) @ np.abs(W2_) + np.abs(x64)
    err = np.abs(out["y"].astype(np.float64) - ref)
    assert (err <= (P + 5) * U16 * S).all()
    assert err.max() <= 4 * np.spacing(np.float16(np.abs(ref).max()))


# ---- the tiny Llama decode step on 2 chips ------------------------------------------------------------
def llm_graph(precision):
    from lpucore.llm import Decoder
    from lpucore.llm.program import build_step
    dec = Decoder.random("tiny", seed=1, precision=precision, config=SMALL, capacity=8)
    graph, _ = build_step(dec.cfg, dec.ref.w, dec.ref.quantized, dec.precision, dec.capacity, dec.block)
    return graph


def llm_system():
    return System(2, topology=[(0, 0, 1, 0)], config=SMALL)


@functools.lru_cache(maxsize=None)
def llm(precision):
    """(graph, its 2-chip compile, its one-chip compile), compiled once per module."""
    graph = llm_graph(precision)
    return graph, compile_system(graph, llm_system(), min_cols=1), lpucore.compile(graph, SMALL)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_llm_step_heads_split_matches_one_chip(precision):
    graph, sc, one = llm(precision)
    system = llm_system()
    states = ("k0", "v0", "k1", "v1")
    # caches [S, Hkv * hd]: kept whole (each chip scatters the new rows into its copy), split by cache
    # rows or by heads, whichever crosses the links least
    axis = sc.state_axes["k0"]
    assert axis in (None, 0, 1) and sc.state_axes == {n: axis for n in states}
    for n in states:
        full = list(graph.states[n].shape)
        if axis is not None:
            full[axis] //= 2
        assert all(p.states[n][0] == tuple(full) for p in sc.parts)
    # same graph structure on both chips, the same tables, different weight slices
    g0, g1 = sc.partition.graphs
    assert [(n.op, g0.tensors[n.output].shape) for n in g0.nodes] == \
        [(n.op, g1.tensors[n.output].shape) for n in g1.nodes]
    p0, p1 = sc.parts
    assert (p0.inputs, p0.outputs, p0.states) == (p1.inputs, p1.outputs, p1.states)
    assert {k: v.shape for k, v in p0.constants.items()} == {k: v.shape for k, v in p1.constants.items()}
    assert any(not np.array_equal(p0.constants[k], p1.constants[k]) for k in p0.constants)
    assert sum(v.nbytes for v in p0.constants.values()) < sum(v.nbytes for v in one.constants.values())
    chip = lpucore.Chip(SMALL)
    one.load(chip)
    sc.load(system)
    cycles = set()
    for tok, pos in [(3, 0), (7, 1), (11, 2)]:
        inp = {"tok": np.array([tok], np.int32), "pos": np.array([pos], np.int32)}
        chip.reset(clear_memory=False)
        one.write_inputs(chip, inp)
        assert chip.run().cycles == one.expected_cycles
        want = one.read_outputs(chip)["logits"]
        out, st = sc.run(inp, system=system)
        assert st.cycles == sc.expected_cycles
        assert [c.cycles for c in st.chips] == [p.expected_cycles for p in sc.parts]
        cycles.add(st.cycles)
        np.testing.assert_allclose(out["logits"], want, rtol=0, atol=1e-3)
        assert np.abs(want).max() > 0.01                       # not trivially equal
        for n in states:
            assert np.array_equal(sc.read_state(system, n), one.read_state(chip, n)), (pos, n)
        assert np.abs(sc.read_state(system, "k1")[pos]).max() > 0          # the step wrote cache row pos
    assert len(cycles) == 1                                    # every step takes the same cycles
    if precision == "fp16":
        # caches split by heads: each chip scatters its columns of the new rows into its part
        by_heads = compile_system(graph, system, state_axes={n: 1 for n in states}, min_cols=1)
        by_heads.load(system)
        for tok, pos in [(3, 0), (7, 1)]:
            inp = {"tok": np.array([tok], np.int32), "pos": np.array([pos], np.int32)}
            chip.reset(clear_memory=False)
            one.write_inputs(chip, inp)
            chip.run()
            out, st = by_heads.run(inp, system=system)
            np.testing.assert_allclose(out["logits"], one.read_outputs(chip)["logits"], rtol=0, atol=1e-3)


def test_compiles_are_deterministic():
    _, sc, _ = llm("fp16")
    again = compile_system(llm_graph("fp16"), llm_system(), min_cols=1)     # a graph built anew
    assert again.expected_cycles == sc.expected_cycles and again.state_axes == sc.state_axes
    for a, b in zip(sc.parts, again.parts):
        assert a.program == b.program and a.program.to_bytes() == b.program.to_bytes()
        assert a.expected_cycles == b.expected_cycles and sorted(a.constants) == sorted(b.constants)
        assert all(np.array_equal(a.constants[k], b.constants[k]) for k in a.constants)
    g, _, _, _ = int8_mlp()
    s4 = System(4, topology=pairwise(4), config=SMALL)
    c1, c2 = lpucore.compile(g, system=s4), lpucore.compile(g, system=s4)
    assert [p.program.to_bytes() for p in c1.parts] == [p.program.to_bytes() for p in c2.parts]


# ---- errors and groups ------------------------------------------------------------------------------
def test_compile_errors():
    g = Graph("e")
    x = g.input("x", (2, 64), "float16")
    k = g.state("k0", (2, 4, 3), "float16")
    g.output("y", g.matmul(x, g.constant("w", np.ones((64, 128), np.float16))))
    g.assign(k, g.add(k, 1.0))
    two = System(2, topology=[(0, 0, 1, 0)], config=SMALL)
    line = System(3, topology=[(0, 0, 1, 0), (1, 1, 2, 0)], config=SMALL)
    with pytest.raises(CompileError, match="direct link"):
        lpucore.compile(g, system=line, strategy="tensor")
    # chips not wired pairwise: "auto" falls back to pipeline stages
    assert type(lpucore.compile(g, system=line)).__name__ == "PipelineCompiled"
    with pytest.raises(CompileError, match="strategy"):
        lpucore.compile(g, system=line, strategy="data")
    with pytest.raises(CompileError, match="nope"):
        lpucore.compile(g, system=two, state_axes={"nope": 0})
    with pytest.raises(CompileError, match="axis 2"):
        lpucore.compile(g, system=two, state_axes={"k0": 2})        # 3 does not divide by 2
    with pytest.raises(CompileError, match="at least 2 chips"):
        compile_system(g, two, chips=[0])
    with pytest.raises(CompileError, match="distinct"):
        compile_system(g, two, chips=[0, 0])
    with pytest.raises(CompileError, match="config"):
        lpucore.compile(g, ChipConfig.tiny(), system=two)
    for op in ("allgather", "allreduce"):
        c = Graph("c")
        c.output("y", getattr(c, op)(c.input("a", (1, 64), "float16"), 2))
        with pytest.raises(CompileError, match="system"):
            lpucore.compile(c, SMALL)
        with pytest.raises(CompileError, match="must not have collectives"):
            lpucore.compile(c, system=two)


def test_group_of_wired_chips_in_a_line():
    """Chips 1 and 2 of a 3-chip line are wired to each other: they form a group; chip 0 idles."""
    g = Graph("line")
    W = (np.random.default_rng(3).standard_normal((64, 128)) * 0.1).astype(np.float16)
    g.output("y", g.matmul(g.input("x", (2, 64), "float16"), g.constant("w", W)))
    line = System(3, topology=[(0, 0, 1, 0), (1, 1, 2, 0)], config=SMALL)
    sc = lpucore.compile(g, system=line, chips=[1, 2])
    X = np.random.default_rng(4).standard_normal((2, 64)).astype(np.float16)
    (out, _), st = run_system(sc, line, {"x": X})
    assert st.chips[0].cycles == 0
    ref, bound = matmul_bound(X, W)
    assert (np.abs(out["y"] - ref) <= bound).all()


# ---- a GroqNode ---------------------------------------------------------------------------------------
def test_groqnode_wide_matmul_column_split():
    """8 GroqChips: [1, 5120] @ [5120, 5120] splits into 640 columns per chip (two vectors);
    each column is computed as on one chip, so the result is bit-exact with one chip's, and
    within README's matmul bound (K/32 + 1) 2^-24 (|x| @ |W|) + 1 ulp of float64."""
    K = N = 5120
    r = np.random.default_rng(5)
    W = (r.standard_normal((K, N)) / np.sqrt(K)).astype(np.float16)
    x = r.standard_normal((1, K)).astype(np.float16)
    g = Graph("wide")
    g.output("y", g.matmul(g.input("x", (1, K), "float16"), g.constant("w", W)))
    node = System(8, topology="node")
    sc = lpucore.compile(g, system=node)
    assert np.array_equal(np.hstack([p.constants["w"] for p in sc.parts]), W)     # 640 columns each
    assert [op for op, _, _ in sc.partition.collectives] == ["allgather"]
    (out, *_), st = run_system(sc, node, {"x": x})
    one = lpucore.compile(g)
    single, st1 = lpucore.execute(one, {"x": x})
    assert np.array_equal(out["y"], single["y"])
    assert st.cycles < st1.cycles                              # 8 chips are faster here (two planes each)
    ref, bound = matmul_bound(x, W)
    assert (np.abs(out["y"] - ref) <= bound).all()
    assert st.c2c_bytes == 8 * sc.link_bytes
