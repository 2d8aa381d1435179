"""Schedule bounds (lpucore.compiler.bounds), checked by hand on programs small enough to reason
about, and checked to be lower bounds: no compiled program beats them, on either engine."""

import numpy as np
import pytest

import lpucore
from lpucore import ChipConfig, Graph
from lpucore.compiler.bounds import LATENCY, VXM_OPS, graph_bounds, latency

GROQ = ChipConfig.groqchip1()
TINY = ChipConfig.tiny()
SMALL = ChipConfig.small()


def test_gemv_bounds_by_hand():
    """x int8 [1, 4096] @ W int8 [4096, 4096] (a constant) -> int32 [1, 4096] on a GroqChip."""
    g = Graph("gemv")
    x = g.input("x", (1, 4096), "int8")
    w = g.constant("w", np.zeros((4096, 4096), np.int8))
    g.output("y", g.matmul(x, w))
    b = graph_bounds(g, GROQ, cycles=1000)
    assert b.weight_stream == 4096 * 4096 / (4 * 16 * 320)                       # 819.2: 20,480 B a cycle
    assert b.sram == (4096 + 4096 * 4096 + 4096 * 4) / (88 * 320)               # read x and W, write y
    assert b.mxm == 4096 * 4096 / (4 * 320 * 320)                               # 409,600 int8 MACs a cycle
    assert b.vxm == 0
    assert b.critical_path == 2 + 47 + 3 + 2 + 20        # read, mxm_delay, mxm_acc_delay, write, stagger
    assert b.binding == "weight streams" and b.efficiency == pytest.approx(819.2 / 1000)


def test_elementwise_chain_bounds_by_hand():
    """relu(exp(a) + b) on float16 [4, 64] on the tiny chip: a chain of three VXM operations."""
    g = Graph("chain")
    a, c = g.input("a", (4, 64), "float16"), g.input("b", (4, 64), "float16")
    g.output("y", g.relu(g.add(g.exp(a), c)))
    b = graph_bounds(g, TINY, cycles=100)
    assert b.weight_stream == 0 and b.mxm == 0
    assert b.sram == 3 * 256 * 2 / (8 * 16)                                     # two inputs, one output
    assert b.vxm == 3 * 256 / (4 * 16)                                          # exp, add, relu per element
    assert b.critical_path == 2 + (4 + 2 + 2) + 2 + 2    # read, exp + add + relu, write, stagger
    assert b.binding == "critical path"


def test_float16_matmul_runs_at_the_fp16_rate():
    g = Graph("fp16")
    g.output("y", g.matmul(g.input("x", (320, 320), "float16"), g.input("w", (320, 320), "float16")))
    b = graph_bounds(g, GROQ, cycles=1)
    assert b.mxm == 320 ** 3 / (4 * 160 * 320 / 2)                              # 102,400 fp16 MACs a cycle


def test_every_graph_operation_has_a_latency_and_a_vxm_cost():
    assert set(LATENCY) == set(VXM_OPS)
    assert latency("softmax", GROQ) == 2 * (GROQ.sxm_delay + GROQ.vxm_alu_delay) + GROQ.vxm_alu_delay \
        + 2 * GROQ.vxm_transcendental_delay
    with pytest.raises(KeyError, match="no latency"):
        latency("conv3d", GROQ)


def _graphs():
    """A few small graphs of different kinds (matmul, row operations, a state update)."""
    r = np.random.default_rng(0)
    g1 = Graph("mlp")
    x = g1.input("x", (2, 40), "float16")
    h = g1.gelu(g1.matmul(x, g1.constant("w1", r.standard_normal((40, 48)).astype(np.float16))))
    g1.output("y", g1.softmax(g1.rmsnorm(h, np.ones(48, np.float16))))
    g2 = Graph("state")
    s = g2.state("s", (3, 20), "float32")
    v = g2.add(s, g2.input("v", (3, 20), "float32"))
    g2.assign(s, v)
    g2.output("m", g2.max(v))
    g3 = Graph("int8")
    q = g3.matmul(g3.input("q", (5, 64), "int8"), g3.constant("k", r.integers(-9, 9, (64, 24)).astype(np.int8)))
    g3.output("o", g3.sum(q))
    return [g1, g2, g3]


@pytest.mark.parametrize("index", range(3))
def test_no_compiled_program_beats_its_bounds(index, engine):
    """The bounds are lower bounds: each compiled program's measured cycles are at least each one."""
    g = _graphs()[index]
    compiled = lpucore.compile(g, SMALL)
    b = compiled.bounds()
    assert b.cycles == compiled.expected_cycles
    inputs = {n: np.ones(t.shape, t.dtype.numpy) for n, t in g.inputs.items()}
    _, stats = lpucore.execute(compiled, inputs, engine=engine)
    assert stats.cycles == compiled.expected_cycles
    assert all(v <= stats.cycles for v in b.as_dict().values()), b.table()
    assert 0 < b.efficiency <= 1


def test_decode_stats_report_the_efficiency():
    from lpucore.llm import Decoder
    res = Decoder.random("tiny", seed=0, capacity=8).generate([1, 2], max_new_tokens=1)
    st = res.stats
    assert set(st.bounds) == {"weight streams", "SRAM", "MXM compute", "VXM compute", "critical path"}
    assert 0 < st.schedule_efficiency <= 1
    assert "schedule efficiency" in st.table()
