"""Elementwise kernels over many vectors (lpucore.compiler.elementwise): no lane mask where the padding
lanes stay zero anyway, and each ALU set reading its own copy of the per-channel constants."""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lpucore
from lpucore import ChipConfig, Graph
from lpucore.compiler import elementwise
from lpucore.compiler.kernels import E, Expr
from lpucore.compiler.memory import VT
from lpucore.dtypes import get as dtype

GROQ = ChipConfig.groqchip1()


def few(n: int) -> int:
    """Examples per property: the `ci` profile runs four times as many."""
    return 4 * n if os.environ.get("HYPOTHESIS_PROFILE") == "ci" else n
F32, I32 = dtype("float32"), dtype("int32")


def _vt(cols, d=F32, bcast=False):
    vt = VT("t", d, 4, cols, 1, 0, [[0]] * d.nbytes, [[1]] * d.nbytes, [[0]] * d.nbytes)
    vt.bcast = bcast
    return vt


def _in(vt):
    return Expr.input(vt, lambda v: v)


@pytest.mark.parametrize("expr, zero", [
    # a requantisation of zero-padded int32 sums by zero-padded per-channel vectors: +0 in the pads
    (lambda a, m: E("cvt", dtype("int8"), E("div", F32, E("relu", F32, E("add", F32, E("mul", F32, E(
        "cvt", F32, _in(a)), _in(m)), _in(m))), Expr.const(F32, 0.05))), True),
    (lambda a, m: E("add", F32, _in(m), Expr.const(F32, 1.0)), False),           # 1 in the pads
    (lambda a, m: E("add", F32, _in(m), Expr.const(F32, 0.0)), True),
    (lambda a, m: E("mul", F32, _in(m), Expr.const(F32, -2.0)), False),          # -0
    (lambda a, m: E("mul", F32, _in(m), Expr.const(F32, 2.0)), True),
    (lambda a, m: E("mul", I32, _in(a), Expr.const(I32, -3)), True),             # integers: 0
    (lambda a, m: E("div", F32, _in(m), _in(m)), False),                          # 0 / 0
    (lambda a, m: E("exp", F32, _in(m)), False),                                  # 1
    (lambda a, m: E("neg", F32, _in(m)), False),                                  # -0
    (lambda a, m: E("max", F32, _in(m), Expr.const(F32, float("nan"))), False),
    (lambda a, m: E("add", F32, _in(m), _in(_vt(1, bcast=True))), False),        # a value in every lane
    (lambda a, m: E("add", F32, _in(m), _in(_vt(128))), False),                  # other columns
])
def test_which_expressions_keep_the_padding_lanes_zero(expr, zero):
    a, m = _vt(64, I32), _vt(64)
    assert elementwise.pads_stay_zero(expr(a, m), 64, 320) is zero


def _requant_graph(P, C, seed=0, summed=0):
    """int32 sums [P, C] requantised per channel (scale, shift), ReLU'd and quantised; ``summed``: the sums
    of that many first rows of the result too (lane reductions, which read the padding lanes)."""
    rng = np.random.default_rng(seed)
    m = rng.uniform(0.001, 0.01, C).astype(np.float32)
    sh = rng.normal(0, 0.1, C).astype(np.float32)
    g = Graph("requant")
    a = g.input("a", (P, C), "int32")
    q = g.quantize(g.relu(g.add(g.mul(g.cast(a, "float32"), m), sh)), 0.05)
    g.output("q", q)
    if summed:
        g.output("s", g.sum(g.cast(g.slice(q, (slice(0, summed), slice(0, C))), "float32"), axis=-1, keepdims=True))
    return g, m, sh


def _reference(a, m, sh):
    y = np.maximum(a.astype(np.float32) * m + sh, np.float32(0))
    q = np.clip(np.rint(y / np.float32(0.05)), -128, 127).astype(np.int8)
    return q, q.astype(np.float32).sum(axis=-1, keepdims=True)


def _run(c, inputs, engine):
    chip = lpucore.Chip(c.config, engine=engine)
    c.load(chip)
    c.write_inputs(chip, inputs)
    assert chip.run().cycles == c.expected_cycles
    return c.read_outputs(chip)


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_a_requantisation_runs_two_vectors_a_cycle_without_a_mask(engine):
    P, C = 256, 64
    g, m, sh = _requant_graph(P, C)
    c = lpucore.compile(g, GROQ)
    a = np.random.default_rng(1).integers(-5000, 5000, (P, C), dtype=np.int32)
    q, s = _reference(a, m, sh)
    assert np.array_equal(_run(c, {"a": a}, engine)["q"], q)
    assert not [n for n in c.constants if n.startswith("_mask")]       # no lane mask
    copies = [members for name, members in c.tiles.items() if any("~" in mm for mm, _ in members)]
    assert len(copies) == 2                             # scale and shift, each with a copy per ALU set
    # two sets of ALUs side by side: well under one vector a cycle (one set took P + 24 cycles)
    assert c.expected_cycles < 0.75 * P
    # the padding lanes the requantisation left are zero: the sums of its rows across the lanes
    g, m, sh = _requant_graph(P, C, summed=8)
    c = lpucore.compile(g, GROQ)
    assert np.array_equal(_run(c, {"a": a}, engine)["s"], s[:8])


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_a_residual_requantisation_reads_copies_of_three_constants_two_rows_a_cycle(engine):
    """A block end's requantisation with the output's scale folded in (ResNet's, lpucore.vision.nets):
    ``cvt``, ``mul`` and ``add`` per channel, the shortcut's ``cvt`` and ``mul`` by its scale ratio,
    ``relu`` and a quantize with scale 1 (a lone ``cvt``, no ``div``): 8 operations, two ALU sets. Each
    set reads its own copies of the three one-row constants, and no two copies one set reads share a
    slice (they did: the second set's scale and ratio on the same four slices read one row every
    other cycle, 3,188 cycles for 3,136 rows of 256 channels; 1,622 after). Both engines exact."""
    P, C = 1024, 256
    rng = np.random.default_rng(4)
    m = rng.uniform(0.001, 0.01, C).astype(np.float32)
    sh = rng.normal(0, 0.1, C).astype(np.float32)
    ratio = np.full(C, 0.7, np.float32)
    g = Graph("block end")
    acc, res = g.input("acc", (P, C), "int32"), g.input("res", (P, C), "int8")
    y = g.add(g.add(g.mul(g.cast(acc, "float32"), m), sh), g.mul(g.cast(res, "float32"), ratio))
    g.output("q", g.quantize(g.relu(y), 1.0))
    c = lpucore.compile(g, GROQ)
    ops = [ins.op.mnemonic for name, q in c.program.queues.items() if name.startswith("VXM") for ins in q]
    assert "div" not in ops and ops.count("cvt") == 3 * P
    A = rng.integers(-20000, 20000, (P, C), dtype=np.int32)
    R = rng.integers(-128, 128, (P, C), dtype=np.int8)
    want = np.maximum(A.astype(np.float32) * m + sh + R.astype(np.float32) * ratio, np.float32(0))
    want = np.clip(np.rint(want), -128, 127).astype(np.int8)
    assert np.array_equal(_run(c, {"acc": A, "res": R}, engine)["q"], want)
    copies = [t for name, t in c.program.tensors.items() if name.endswith("~1")]     # the second set's
    slices = [{g for p in range(4) for g, _ in t.locations(p, GROQ.lanes)} for t in copies]
    assert len(copies) == 3 and all(not (a & b) for i, a in enumerate(slices) for b in slices[i + 1:])
    assert c.expected_cycles < 0.6 * P


def test_writing_a_replicated_constant_writes_its_copies():
    P, C = 64, 64
    g, m, sh = _requant_graph(P, C)
    c = lpucore.compile(g, GROQ)
    name = next(n for n, members in c.tiles.items() if any("~" in mm for mm, _ in members)
                and np.array_equal(c.constants[n].ravel(), m))
    assert len(c.members(name)) >= 2
    a = np.random.default_rng(2).integers(-5000, 5000, (P, C), dtype=np.int32)
    m2 = (m * 1.5).astype(np.float32)
    chip = lpucore.Chip(c.config)
    c.load(chip)
    c.write_constant(chip, name, m2.reshape(1, -1))
    c.write_inputs(chip, {"a": a})
    chip.run()
    q, _ = _reference(a, m2, sh)
    assert np.array_equal(c.read_outputs(chip)["q"], q)  # every ALU set read the new scale


def _pads(chip, c, name):
    """The bytes past each row's columns in the last vector of every row of output ``name`` (all planes)."""
    t = c.program.tensors[name]
    L = c.config.lanes
    rem, ch = t.cols % L, t.chunks(L)
    mem = chip.memory()
    got = [mem[g, a, rem:] for p in range(t.dtype.nbytes)
           for v, (g, a) in enumerate(t.locations(p, L)) if v % ch == ch - 1]
    return np.concatenate(got) if got else np.zeros(0, np.uint8)


@settings(max_examples=few(6), deadline=None)
@given(st.integers(2, 40), st.sampled_from([64, 100, 250, 330]), st.integers(0, 2 ** 16),
       st.sampled_from(["requant", "affine", "copy", "plus one"]))
def test_padding_lanes_stay_zero_without_masks(rows, C, seed, kind):
    """The convention the masks were dropped for (lower.py: lanes past a row's columns are zero), read
    back from SRAM after a run: outputs of unmasked kernels (requantisation, a per-channel affine map with
    a ReLU, a copy of rows) hold zeros there, and so does a kernel that needs its mask (x + 1), on both
    engines."""
    rng = np.random.default_rng(seed)
    m = rng.uniform(0.001, 0.01, C).astype(np.float32)
    g = Graph("pads")
    a = g.input("a", (rows, C), "int32")
    y = g.cast(a, "float32")
    if kind == "requant":
        out = g.quantize(g.relu(g.add(g.mul(y, m), m)), 0.05)
    elif kind == "affine":
        out = g.relu(g.mul(y, m))
    elif kind == "copy":
        out = g.slice(g.cast(g.mul(y, m), "float16"), (slice(1, rows), slice(0, C)))
    else:
        out = g.add(y, 1.0)
    g.output("y", out)
    c = lpucore.compile(g, GROQ)
    x = rng.integers(-5000, 5000, (rows, C), dtype=np.int32)
    for engine in ("fast", "reference"):
        chip = lpucore.Chip(c.config, engine=engine)
        c.load(chip)
        c.write_inputs(chip, {"a": x})
        chip.run()
        assert not _pads(chip, c, "y").any(), (engine, kind)
