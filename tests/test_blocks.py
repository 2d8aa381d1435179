"""Graph.gather_blocks / Graph.scatter_blocks: blocks of rows at run-time block indices, by MEM Gather and
Scatter (lpucore.compiler.blocks), against NumPy bit for bit on both engines."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_compiler import SMALL, few, run_graph, values

import lpucore
from lpucore import Graph, GraphError


def _mnemonics(c, name):
    return sum(i.op.mnemonic == name for lst in c.program.queues.values() for i in lst)


def ref_gather(X, blocks, n):
    out = np.zeros((len(blocks), n, X.shape[1]), X.dtype)
    for i, k in enumerate(blocks):
        if 0 <= k < X.shape[0] // n:
            out[i] = X[k * n:(k + 1) * n]
    return out


def ref_scatter(X, blocks, rows):
    n = rows.shape[0] // len(blocks)
    out = X.copy()
    for i, k in enumerate(blocks):
        if 0 <= k < X.shape[0] // n:
            out[k * n:(k + 1) * n] = rows[i * n:(i + 1) * n]
    return out


@settings(max_examples=few(4))
@given(st.integers(1, 4), st.integers(1, 24), st.integers(1, 700), st.integers(1, 2),
       st.sampled_from(["float16", "int8", "float32"]), st.integers(0, 99))
def test_gather_blocks_reads_blocks_at_run_time_indices(nb, n, D, m, dtype, seed):
    r = np.random.default_rng(seed)
    X = values((nb * n, D), dtype, seed)
    blocks = r.integers(-1, nb + 1, m).astype(np.int32)
    g = Graph()
    g.output("y", g.gather_blocks(g.input("x", X.shape, dtype), g.input("b", (m,), "int32"), n))
    out, c = run_graph(g, {"x": X, "b": blocks})
    assert np.array_equal(out["y"].view(np.uint8), ref_gather(X, blocks, n).view(np.uint8))
    assert _mnemonics(c, "Gather") == m * n * -(-D // SMALL.lanes) * X.dtype.itemsize


@settings(max_examples=few(4))
@given(st.integers(1, 4), st.integers(1, 24), st.integers(1, 700), st.integers(1, 2),
       st.sampled_from(["float16", "int8", "float32"]), st.integers(0, 99))
def test_scatter_blocks_writes_blocks_at_run_time_indices(nb, n, D, m, dtype, seed):
    r = np.random.default_rng(seed)
    X, rows = values((nb * n, D), dtype, seed), values((m * n, D), dtype, seed + 1)
    blocks = r.integers(-1, nb + 1, m).astype(np.int32)
    g = Graph()
    g.output("y", g.scatter_blocks(g.input("x", X.shape, dtype), g.input("b", (m,), "int32"),
                                   g.input("r", rows.shape, dtype)))
    out, c = run_graph(g, {"x": X, "b": blocks, "r": rows})
    assert np.array_equal(out["y"].view(np.uint8), ref_scatter(X, blocks, rows).view(np.uint8))
    assert _mnemonics(c, "Scatter") == m * n * -(-D // SMALL.lanes) * X.dtype.itemsize


def test_a_state_updated_by_blocks_in_place_run_after_run():
    """A KV-cache tile written one column at a time: the block read, one lane blended, the block written
    back in place (no copy of the state), run after run on one chip, both engines, predicted cycles."""
    T, n, W = 3, 16, 40
    g = Graph()
    K = g.state("k", (T * n, W), "float16")
    blk = g.input("b", (1,), "int32")
    col = g.input("col", (n, W), "float16")          # the new value in every lane of its row
    onehot = g.input("oh", (1, W), "float16")
    old = g.reshape(g.gather_blocks(K, blk, n), (n, W))
    new = g.add(g.mul(old, g.sub(1.0, onehot)), g.mul(col, onehot))
    Kn = g.scatter_blocks(K, blk, new)
    g.assign(K, Kn)
    g.output("s", g.sum(g.cast(Kn, "float32"), axis=-2))
    c = lpucore.compile(g, SMALL)
    assert not [k for k in c.kernels if k[0] in ("assign", "copy")], c.kernels
    assert _mnemonics(c, "Scatter") == n * 2
    for eng in ("fast", "reference"):
        chip = lpucore.Chip(SMALL, engine=eng)
        c.load(chip)
        ref = np.zeros((T * n, W), np.float16)
        for p in (0, 5, 17, 40, 33, 200):
            k, lane = divmod(p, W)
            kcol = values((n, 1), np.float16, p)
            oh = (np.arange(W) == lane).astype(np.float16).reshape(1, W)
            inp = {"b": np.array([k], np.int32), "col": np.repeat(kcol, W, axis=1), "oh": oh}
            out, st_ = lpucore.execute(c, inp, chip=chip)
            assert st_.cycles == c.expected_cycles
            if k < T:
                ref[k * n:(k + 1) * n, lane] = kcol[:, 0]
            assert np.array_equal(chip.read_tensor("k").view(np.uint16), ref.view(np.uint16)), (eng, p)


def test_block_operands_are_checked():
    g = Graph()
    x = g.input("x", (12, 8), "float16")
    with pytest.raises(GraphError, match="n must be"):
        g.gather_blocks(x, g.input("b", (1,), "int32"), 5)
    with pytest.raises(GraphError, match="blocks must be int32"):
        g.gather_blocks(x, g.input("f", (1,), "float32"), 4)
    with pytest.raises(GraphError, match="rows must be"):
        g.scatter_blocks(x, g.input("b2", (2,), "int32"), g.input("r", (5, 8), "float16"))
