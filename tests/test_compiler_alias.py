"""Reshapes that keep the last axis: the output shares the input's placement (no instruction) when the
input is not an elementwise kernel's output and no reader of the output is fused; values on both engines."""

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


def test_reshapes_of_elementwise_outputs_and_changed_rows_still_move_data():
    g = Graph()
    x = g.input("x", (4, 8), "float32")
    e = g.mul(x, 2.0)                                                      # elementwise output
    g.output("a", g.add(g.reshape(e, (2, 2, 8)), 1.0))
    g.output("b", g.add(g.reshape(x, (8, 4)), 1.0))                        # the last axis changes
    c = compile(g, ChipConfig.small())
    assert all(int(row.split()[5]) > 0 for row in _kernel(c, "reshape"))
    xv = np.arange(32, dtype=np.float32).reshape(4, 8)
    out = execute(c, {"x": xv})[0]
    np.testing.assert_array_equal(out["a"], (xv * 2).reshape(2, 2, 8) + 1)
    np.testing.assert_array_equal(out["b"], xv.reshape(8, 4) + 1)
