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

A result read by *several* elementwise operations of its shape is deferred too when its whole
expression (with its own deferred inputs) is at most :data:`RECOMPUTE_MAX` operations: each
consumer recomputes it on its own ALUs, which costs no latency, where a MEM round trip costs
about 25 cycles (a cast read by both an ``abs`` and a ``mul``, a ``maximum`` with a constant
read by every block of a matmul's epilogue), and when it has at most
:data:`RECOMPUTE_ELEMENTS` elements.

A value per row held in every lane (a lane reduction's result, or an elementwise function of
such values and constants: the int8 activations' ``max(max|x|, eps)``) is recomputed by each
consumer that broadcasts it over the row's lanes, under the same limits.
A reduction across rows (``axis=-2``) is one map kernel too: it is deferred like an elementwise
operation, and inlines a deferred input row by row.  A reduction over the lanes inlines a deferred
input into the row expression its lane all-reduce starts from (an ``abs`` before a ``max``).

A kernel inlines the results of one product (``matmul``, ``conv_taps``) at most: where the
elementwise chains of two products meet (a residual block's downsample shortcut beside its last
convolution), the earlier product's chain is cut where its tensor is smallest (the int8
``quantize``, not the float32 ``dequantize`` after it) and runs as its own kernel as soon as its
product lands, instead of inside the kernel that waits for the later product
(:func:`_one_product_each`; ResNet-50's layer1.0 requantisation took 10,212 cycles past its last
product with both chains inlined).

What is never deferred: graph outputs, values assigned to states (they must land in
MEM), and results read by anything but a plain elementwise operation (lane reductions,
softmax, norms, matmul, layout operations, gather, rope, collectives read placed
tensors).

:data:`ENABLED` turns fusion on or off for the compilers made after it is set (tests
compare fused and unfused programs: same outputs, fewer cycles).
"""

from __future__ import annotations

from typing import Dict, List, Set

import numpy as np

from ..graph import Graph, Node
from . import registry

# fusion of elementwise chains on (True) or off (False): read by every new Compiler
ENABLED = True

# operations a result read by several elementwise consumers may take to be recomputed by each,
# and the elements it may have: recomputing re-reads the operands for every vector, a loss where
# the streams, not the latency, bound a kernel (a KV cache update), a gain on one activation row
RECOMPUTE_MAX = 3
RECOMPUTE_ELEMENTS = 8192


def is_elementwise(n: Node) -> bool:
    """n is lowered as one map kernel over its output's vectors (its registry entry says so:
    :meth:`OpSpec.is_map <lpucore.compiler.registry.OpSpec.is_map>`; gelu's erf form takes two
    kernels; a reduction across rows is a tree of VXM operations over its input's vectors)."""
    return registry.spec(n.op).is_map(n)


_across_rows = registry.across_rows
# a reduction over the lanes: its row expression reads each vector of its input once, so it
# inlines a deferred input (or, when the expression does not fit, places it first)
_across_lanes = registry.across_lanes


def _inlining(g: Graph, tid: int, consumer: Node, in_lanes: bool = False) -> str:
    """How the consumer can inline tensor tid's expression: "same" (vector v of tid is vector v of
    the consumer's output: shapes equal but for leading ones; or the consumer reduces tid across
    its rows, reading each vector once), "rows" (tid is one row the consumer broadcasts over its
    rows: the expression is recomputed for every row, :meth:`Compiler.operand
    <lpucore.compiler.lower.Compiler.operand>`), "lanes" (tid is one value per row, computed from
    values held in every lane, ``in_lanes``, that the consumer broadcasts over its lanes: recomputed
    for every vector of the row), or "" (it cannot)."""
    if _across_rows(consumer) or _across_lanes(consumer):
        return "same"
    a, b = g.tensors[tid].shape, g.tensors[consumer.output].shape
    if len(a) > len(b):
        return ""
    if (1,) * (len(b) - len(a)) + tuple(a) == tuple(b):
        return "same"
    if len(a) >= 1 and int(np.prod(a[:-1])) == 1 and a[-1] == b[-1] and int(np.prod(b)) <= RECOMPUTE_ELEMENTS:
        return "rows"
    a = (1,) * (len(b) - len(a)) + tuple(a)
    if in_lanes and len(b) >= 1 and a[-1] == 1 and a[:-1] == tuple(b[:-1]) and int(np.prod(b)) <= RECOMPUTE_ELEMENTS:
        return "lanes"
    return ""


def _in_every_lane(g: Graph, n: Node, lanes: Set[int], consumers: Dict[int, List[Node]]) -> bool:
    """n's inputs are all held in every lane once placed: one-element constants (VXM immediates),
    one-value-per-row constants read only elementwise (written in every lane), lane reductions'
    results, and deferred values computed from such inputs (``lanes``)."""
    for i in n.inputs:
        t = g.tensors[i]
        if i in g.constants:
            if t.size == 1 or (t.shape[-1] == 1 and all(registry.spec(u.op).scalar_operands
                                                          for u in consumers.get(i, []))):
                continue
            return False
        p = g.producer.get(i)
        if i in lanes or (p is not None and _across_lanes(p) and t.shape[-1] == 1):
            continue
        return False
    return True


def _cost(g: Graph, n: Node, size: Dict[int, int]) -> int:
    """VXM operations of n's expression with its deferred inputs inlined (a reduction across R
    rows reads its input R times)."""
    reads = g.tensors[n.inputs[0]].shape[-2] if _across_rows(n) else 1
    return reads + sum(size.get(i, 0) for i in set(n.inputs)) * reads


def deferrable(g: Graph) -> Set[int]:
    """Ids of the tensors whose producer need not write them to MEM (module docstring)."""
    consumers: Dict[int, List[Node]] = {}
    for n in g.nodes:
        for i in n.inputs:
            consumers.setdefault(i, []).append(n)
    kept = {t.id for t in g.outputs.values()} | {v.id for v in g.assigns.values()}
    out: Set[int] = set()
    lanes: Set[int] = set()            # deferred values held in every lane (see _inlining)
    size: Dict[int, int] = {}          # operations of a deferred result's inlined expression
    for n in g.nodes:
        tid = n.output
        users = consumers.get(tid, [])
        if tid in kept or not users or not is_elementwise(n):
            continue
        in_lanes = g.tensors[tid].shape[-1:] == (1,) and _in_every_lane(g, n, lanes, consumers)
        how = [_inlining(g, tid, u, in_lanes) if is_elementwise(u) or _across_lanes(u) else "" for u in users]
        # an expression of constants only would read no tensor: nothing to say it is broadcast
        if "" in how or all(i in g.constants for i in n.inputs):
            continue
        cost = _cost(g, n, size)
        if (len(users) == 1 and how[0] == "same") or (
                cost <= RECOMPUTE_MAX and int(np.prod(g.tensors[tid].shape)) <= RECOMPUTE_ELEMENTS):
            out.add(tid)
            size[tid] = cost
            if in_lanes:
                lanes.add(tid)
    _one_product_each(g, out)
    return out


def _one_product_each(g: Graph, out: Set[int]) -> None:
    """Undefer results until no kernel inlines the results of two products (matmul, conv_taps): the
    earlier product's elementwise chain is cut where its tensor is smallest (an int8 ``quantize``
    rather than the float32 ``dequantize`` after it; on a tie nearer the kernel) and runs as its own
    kernel as soon as that product lands, instead of inside the kernel waiting for the later product
    (a residual block's downsample shortcut, requantised beside the block's last convolution: its
    operations and operand reads off the block's critical path, the kernel that joins them shorter)."""
    index = {n.output: k for k, n in enumerate(g.nodes)}
    memo: Dict[int, Set[int]] = {}

    def reach(inputs: List[int]) -> Set[int]:
        """Products (their nodes' indices) whose results these inputs are or inline."""
        got: Set[int] = set()
        for i in set(inputs):
            p = g.producer.get(i)
            if i in out:
                if i not in memo:
                    memo[i] = reach(g.producer[i].inputs)
                got |= memo[i]
            elif p is not None and registry.spec(p.op).kind == "matmul":
                got.add(index[i])
        return got

    for n in g.nodes:
        if n.output in out or not is_elementwise(n):
            continue
        while True:
            memo.clear()
            products = reach(n.inputs)
            if len(products) < 2:
                break
            inlined = inlined_by(g, n, out)
            cuts = [i for i in inlined if memo.get(i) and max(products) not in memo[i]]
            if not cuts:            # the earlier products read straight from MEM: nothing inlined to cut
                break
            out.discard(min(cuts, key=lambda i: (g.tensors[i].dtype.nbytes, -index[i])))


def inlined_by(g: Graph, n: Node, out: Set[int]) -> List[int]:
    """The deferred results (ids in ``out``) node n's kernel inlines, with theirs in turn."""
    got: List[int] = []
    stack = [i for i in set(n.inputs) if i in out]
    while stack:
        i = stack.pop()
        if i not in got:
            got.append(i)
            stack += [j for j in set(g.producer[i].inputs) if j in out]
    return got
