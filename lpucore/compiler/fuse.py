"""Which elementwise results the compiler keeps out of MEM (fusion of elementwise chains).

Every graph node lowered on its own writes its result to MEM and its consumer reads it
back: about 25 cycles of latency per operation (MEM read, stream to the VXM, the ALU,
stream back, MEM write).  The VXM chains up to 16 ALUs per lane, so a chain of
elementwise operations can run as one kernel: an elementwise result read exactly once,
by another elementwise operation of the same shape, is *deferred*: the compiler keeps
the expression that computes it (:meth:`Compiler.builder
<lpucore.compiler.lower.Compiler.builder>`) and inlines it where the consumer reads its
operand (:meth:`Compiler.operand <lpucore.compiler.lower.Compiler.operand>`).  The
result is bit-identical: each expression node keeps its dtype (a VXM latch holds the
same bits a MEM vector would), and ``cvt`` nodes round as the separate kernels did.

What is never deferred: graph outputs, values assigned to states (they must land in
MEM), and results read by anything but a plain elementwise operation (reductions,
softmax, norms, matmul, layout operations, gather, rope, collectives read placed
tensors).

:data:`ENABLED` turns fusion on or off for the compilers made after it is set (tests
compare fused and unfused programs: same outputs, fewer cycles).
"""

from __future__ import annotations

from typing import Dict, List, Set

from ..graph import Graph, Node

# fusion of elementwise chains on (True) or off (False): read by every new Compiler
ENABLED = True

# operations lowered as one map kernel whose builder reads each input once through operand()
ELEMENTWISE = frozenset(("add", "sub", "mul", "div", "maximum", "minimum", "neg", "abs", "relu", "exp",
                         "tanh", "sigmoid", "sqrt", "rsqrt", "silu", "cast", "quantize", "dequantize"))


def is_elementwise(n: Node) -> bool:
    """n is lowered as one map kernel over its output's vectors (gelu's erf form takes two)."""
    return n.op in ELEMENTWISE or (n.op == "gelu" and n.attrs.get("approximate") == "tanh")


def _same_vectors(g: Graph, tid: int, consumer: Node) -> bool:
    """Vector v of tensor tid is vector v of the consumer's output: the shapes are equal
    but for leading ones (then an inlined expression reads its inputs as it would have)."""
    a, b = g.tensors[tid].shape, g.tensors[consumer.output].shape
    if len(a) > len(b):
        return False
    return (1,) * (len(b) - len(a)) + tuple(a) == tuple(b)


def deferrable(g: Graph) -> Set[int]:
    """Ids of the tensors whose producer need not write them to MEM (module docstring)."""
    consumers: Dict[int, List[Node]] = {}
    for n in g.nodes:
        for i in n.inputs:
            consumers.setdefault(i, []).append(n)
    kept = {t.id for t in g.outputs.values()} | {v.id for v in g.assigns.values()}
    out: Set[int] = set()
    for n in g.nodes:
        tid = n.output
        users = consumers.get(tid, [])
        if tid in kept or len(users) != 1 or not is_elementwise(n) or not is_elementwise(users[0]):
            continue
        # an expression of constants only would read no tensor: nothing to say it is broadcast
        if all(i in g.constants for i in n.inputs):
            continue
        if _same_vectors(g, tid, users[0]):
            out.add(tid)
    return out
