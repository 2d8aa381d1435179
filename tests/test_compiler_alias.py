"""Reshapes that keep the last axis: the output shares the input's placement (no instruction), whatever
made the input and whoever reads the output; values on both engines."""

import numpy as np
import pytest

from lpucore import ChipConfig, Graph, compile, execute


def _kernel(compiled, op):
    return [line for line in compiled.dump("scheduled").splitlines()[2:] if line.split()[1:2] == [op]]


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_a_matmul_output_reshaped_is_not_copied(engine):
    g = Graph()
    x = g.input("x", (6, 40), "float16")
    w = np.random.default_rng(0).standard_normal((40, 24)).astype(np.float16)
    y = g.matmul(x, g.constant("w", w), out_dtype="float32")                 # [6, 24]
    r = g.reshape(y, (2, 3, 24))
    g.output("s", g.add(r, 1.0))                                            # a reader that is not fused
    c = compile(g, ChipConfig.small())
    rows = _kernel(c, "reshape")
    assert len(rows) == 1 and rows[0].split()[5] == "0"                    # no instruction
    xv = np.random.default_rng(1).standard_normal((6, 40)).astype(np.float16)
    got = execute(c, {"x": xv}, engine=engine)[0]["s"]
    ref = (xv.astype(np.float32) @ w.astype(np.float32)).reshape(2, 3, 24)
    np.testing.assert_allclose(got, ref + 1, rtol=1e-5, atol=1e-4)


def test_reshapes_of_elementwise_outputs_alias_and_changed_rows_move_data():
    g = Graph()
    x = g.input("x", (4, 8), "float32")
    e = g.mul(x, 2.0)                                                      # elementwise output
    g.output("a", g.add(g.reshape(e, (2, 2, 8)), 1.0))
    g.output("b", g.add(g.reshape(x, (8, 4)), 1.0))                        # the last axis changes
    c = compile(g, ChipConfig.small())
    assert sorted(int(row.split()[5]) > 0 for row in _kernel(c, "reshape")) == [False, True]
    xv = np.arange(32, dtype=np.float32).reshape(4, 8)
    out = execute(c, {"x": xv})[0]
    np.testing.assert_array_equal(out["a"], (xv * 2).reshape(2, 2, 8) + 1)
    np.testing.assert_array_equal(out["b"], xv.reshape(8, 4) + 1)


@pytest.mark.parametrize("engine", ["fast", "reference"])
@pytest.mark.parametrize("seed", range(6))
def test_an_aliased_elementwise_output_keeps_its_values_for_every_reader(engine, seed):
    """An elementwise output read beside its reshape, the reshape read by a fused chain, a cast, a lane
    sum or a concatenation: the aliased space lives until every reader is done."""
    rng = np.random.default_rng(seed)
    R, C = int(rng.integers(1, 7)), int(rng.choice([8, 24, 64, 100, 130]))
    shape = (1, R, C) if seed % 2 else (R, 1, C)
    xv = rng.standard_normal((R, C)).astype(np.float32)
    g = Graph()
    x = g.input("x", (R, C), "float32")
    e = g.add(g.mul(x, 2.0), 1.0)
    ev = xv * np.float32(2) + np.float32(1)
    g.output("side", g.add(e, 3.0))
    r = g.reshape(e, shape)
    g.output("fused", g.mul(g.add(r, 1.0), 0.5))
    g.output("half", g.cast(r, "float16"))
    g.output("sum", g.sum(r, axis=-1, keepdims=True))
    g.output("cat", g.concat([g.reshape(g.add(r, 1.0), (R, C)), x], axis=0))
    out = execute(compile(g, ChipConfig.small()), {"x": xv}, engine=engine)[0]
    rv = ev.reshape(shape)
    np.testing.assert_array_equal(out["side"], ev + np.float32(3))
    np.testing.assert_array_equal(out["fused"], (rv + np.float32(1)) * np.float32(0.5))
    np.testing.assert_array_equal(out["half"], rv.astype(np.float16))
    np.testing.assert_allclose(out["sum"], rv.sum(axis=-1, keepdims=True), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(out["cat"], np.concatenate([(rv + np.float32(1)).reshape(R, C), xv]))
