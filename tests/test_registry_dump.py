"""The compiler's op registry (lpucore.compiler.registry) and the program after each compiler stage
(Compiled.dump, lpucore.compiler.dump)."""

import ast
import pathlib

import numpy as np
import pytest

import lpucore
from lpucore import ChipConfig, CompileError, Graph, System
from lpucore.cli import main
from lpucore.compiler import fuse, registry
from lpucore.compiler.dump import STAGES
from lpucore.graph import Node

SMALL = ChipConfig.small()
GRAPH_PY = pathlib.Path(lpucore.__file__).parent / "graph.py"


def graph_ops():
    """Every operation name graph.py can put in a node: the literal first argument of its calls to
    _node, _binary, _unary and _reduce."""
    ops = set()
    for call in ast.walk(ast.parse(GRAPH_PY.read_text())):
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                and call.func.attr in ("_node", "_binary", "_unary", "_reduce") and call.args
                and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)):
            ops.add(call.args[0].value)
    return ops


def test_every_graph_operation_is_registered_and_nothing_else():
    ops = graph_ops()
    assert len(ops) >= 30 and {"matmul", "softmax", "rope", "allreduce", "sum"} <= ops
    assert ops == set(registry.OPS)
    for name, s in registry.OPS.items():
        assert s.name == name
        # lowered somehow: a map kernel, a lowering function, or across chips
        assert s.build is not None or s.lower is not None or s.collective, name
        # an operation whose map kernel depends on its attributes has a lowering for the rest
        assert s.map_if is None or s.lower is not None, name


def test_fusion_consults_the_registry():
    def node(op, **attrs):
        return Node(op, [0], attrs, 1)
    assert fuse.is_elementwise(node("add")) and fuse.is_elementwise(node("dequantize"))
    assert fuse.is_elementwise(node("gelu", approximate="tanh"))
    assert not fuse.is_elementwise(node("gelu", approximate="erf"))
    assert fuse.is_elementwise(node("sum", axis=-2)) and not fuse.is_elementwise(node("sum", axis=-1))
    assert not fuse.is_elementwise(node("matmul")) and not fuse.is_elementwise(node("softmax"))
    assert registry.spec("matmul").weight_input == 1 and registry.spec("gather").weight_input == 0
    assert registry.spec("allgather").collective and not registry.spec("add").collective


def test_an_unregistered_operation_is_a_clear_compile_error():
    g = Graph("fake")
    x = g.input("x", (4, 8), "float16")
    y = g._node("frobnicate", [x], x.shape, x.dtype)
    g.output("y", g.relu(y))
    with pytest.raises(CompileError, match="frobnicate") as e:
        lpucore.compile(g, SMALL)
    msg = str(e.value)
    assert "registry" in msg and f"%{y.id}" in msg and "matmul" in msg
    with pytest.raises(CompileError, match="'frobnicate'"):
        registry.spec("frobnicate")


@pytest.fixture(scope="module")
def small():
    """A graph with a matmul, a fused chain, gelu, softmax and a lane sum, compiled for the small chip."""
    r = np.random.default_rng(0)
    g = Graph("dumped")
    x = g.input("x", (20, 96), "float16")
    h = g.add(g.matmul(x, g.constant("w", (r.standard_normal((96, 200)) / 10).astype(np.float16))),
              g.constant("b", (r.standard_normal(200) / 10).astype(np.float16)))
    y = g.gelu(g.mul(h, 0.5))
    g.output("y", g.softmax(y))
    g.output("s", g.sum(g.exp(y), axis=-1))
    return g, lpucore.compile(g, SMALL)


def test_dump_graph_and_fused(small):
    g, c = small
    text = c.dump("graph")
    assert "== graph 'dumped': 7 operations" in text
    assert "input    x : float16[20, 96]" in text and "const    w : float16[96, 200]" in text
    for line in ("matmul(x, w) : float16[20, 200]", "gelu(%6, approximate='tanh')", "softmax(%7)",
                 "-> output y", "sum(%9, keepdims=False, axis=-1) : float16[20]"):
        assert line in text, line
    fused = c.dump("fused")
    assert "5 kernels for 7 operations" in fused
    kernel = next(ln for ln in fused.splitlines() if ln.startswith("kernel") and " gelu" in ln)
    assert "inlines %4 add, %6 mul" in kernel
    assert "immediates" in fused and "%5=0.5" in fused


def test_dump_placed(small):
    g, c = small
    text = c.dump("placed")
    lines = text.splitlines()
    x = next(ln for ln in lines if ln.startswith("x :"))
    assert "input float16[20, 96]" in x and "hem " in x and "{" in x
    for name in ("w@0 = w : const", "y = %8 : output float16[20, 200]", "s = %10 : output float16[1, 20]"):
        assert any(ln.startswith(name) for ln in lines), name
    # the slices and addresses are the program's tensor table's
    xt = c.program.tensors["x"]
    first = xt.planes[0].parts[0]
    assert f"{SMALL.slice_name(first[0])}:{first[1]:#x}" in x


def test_dump_scheduled_and_emitted(small):
    g, c = small
    text = c.dump("scheduled")
    rows = [ln.split() for ln in text.splitlines()[2:]]
    assert [r[1] for r in rows] == [op for op, _, _ in c.kernels]
    mm = rows[0]
    assert mm[1] == "matmul" and "MXM" in " ".join(mm) and int(mm[4]) == c.kernels[0][2]
    assert rows[1][4] == "fused"
    # every instruction the scheduler placed is counted in exactly one kernel (a Repeat stands for n more)
    placed = sum(ins["n"] if ins.op.mnemonic == "Repeat" else ins.op.mnemonic != "NOP"
                 for lst in c.program.queues.values() for ins in lst)
    assert sum(int(r[5]) for r in rows) == placed
    em = c.dump("emitted")
    for q, lst in c.program.queues.items():
        if lst:
            row = next(ln for ln in em.splitlines() if ln.split()[0] == q)
            assert int(row.split()[2]) == len(lst)
    assert "Read" in em


def test_dump_all_and_unknown_stage(small):
    g, c = small
    every = c.dump("all")
    for s in STAGES:
        assert f"== {s}" in every
    with pytest.raises(CompileError, match="graph, fused, placed, scheduled, emitted"):
        c.dump("lowered")


def test_dump_of_each_chip_of_a_system():
    r = np.random.default_rng(1)
    g = Graph("tp")
    x = g.input("x", (2, 64), "int8")
    g.output("y", g.matmul(x, g.constant("w", r.integers(-128, 128, (64, 256)).astype(np.int8))))
    sc = lpucore.compile(g, system=System(2, topology=[(0, 0, 1, 0)], config=SMALL), strategy="tensor")
    text = sc.dump("scheduled")
    assert text.count("=== chip") == 2 and "matmul" in text


def test_cli_dump(capsys):
    assert main(["dump", "--model", "tiny", "--stage", "fused", "--capacity", "4", "--config", "small"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("== fused:") and "kernel" in out
    assert main(["dump", "--model", "tiny", "--stage", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lpucore: error:") and "scheduled" in err[0]
