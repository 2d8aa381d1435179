"""Elementwise kernels over many vectors: when a lane mask is not needed, and copies of the constants
every vector reads.

* **Padding lanes.** The compiler keeps lanes past a row's last column zero (:mod:`.lower`'s
  conventions); an elementwise kernel whose row width is not a multiple of the lanes ends each row's
  last vector with an ``and`` against a lane mask, one more ALU operation and one more MEM read of a
  single-vector constant *every* such vector (so at most one such vector a cycle: a slice reads one
  vector a cycle). :func:`pads_stay_zero` finds the expressions that give zero there anyway (a
  requantisation ``cast``, ``mul``, ``add``, ``relu``, ``div`` of zero-padded operands), which need no mask.
* **Replicated constants.** :func:`~lpucore.compiler.kernels.map_kernel` runs several vectors a cycle
  on disjoint sets of ALUs when the expression is short; but a one-row constant every vector reads (a
  per-channel scale or shift) sits in one slice per byte plane, which reads one vector a cycle.
  :func:`map_sets` gives each ALU set its own copy of such constants, on other slices (each copy a
  member of the constant, written with it: ``Compiled.members``), so the sets do run side by side.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..errors import CompileError
from .kernels import MAX_ALU_SETS, E, Expr, NeedsSplit, _chains, _topo, map_kernel
from .memory import VT, TiledVT

# fewest output vectors per ALU set for copies to pay (each copy is a MEM vector and a host write)
MIN_VECTORS_PER_SET = 8


# operations whose result is +0 (all bits zero) when every argument is, in every dtype the VXM runs them in
_ZERO_KEEPING = {"add", "sub", "max", "min", "and", "or", "xor", "abs", "relu", "mov", "cvt", "sqrt", "shl",
                 "shr"}


def _zero_bits(e: Expr) -> bool:
    return e.op == "const" and e.imm["value"] & ((1 << e.dtype.bits) - 1) == 0


def _positive_const(e: Expr) -> bool:
    """A finite constant above zero (or, for integers, any constant: 0 times it is 0)."""
    if e.op != "const":
        return False
    if not e.dtype.is_float:
        return True
    raw = np.array([e.imm["value"] & 0xFFFFFFFF], dtype=np.uint32)
    v = raw.astype({2: np.uint16, 4: np.uint32}[e.dtype.nbytes]).view(e.dtype.numpy)[0]
    return bool(np.isfinite(v) and v > 0)


def pads_stay_zero(root: Expr, cols: int, lanes: int) -> bool:
    """Whether ``root`` gives all-zero bits in the padding lanes of a tensor of ``cols`` columns (lanes past
    the last chunk's ``cols % lanes``) from its operands alone, so that no ``and`` with a lane mask is
    needed to keep the convention that those lanes are zero (the module docstring). Conservative: an operand
    tensor of the same columns (not broadcast) has zero there by the convention; a constant is zero when
    its bits are; ``add``, ``relu``, ``cvt``, ... of zeros are +0; ``mul`` of a zero by a zero or by a
    positive constant, and ``div`` of a zero by one, are +0 (a negative one would give -0); anything else
    (``exp``, ``neg``, comparisons, broadcast operands) is taken as not zero."""
    zero: Dict[int, bool] = {}
    for n in _topo(root):
        if n.op == "in":
            vt = n.source()[0]
            z = not vt.bcast and vt.cols == cols
        elif n.op == "const":
            z = _zero_bits(n)
        elif n.op in _ZERO_KEEPING:
            z = all(zero[id(a)] for a in n.args)
        elif n.op == "mul" and n.dtype.is_float:
            a, b = n.args
            z = (zero[id(a)] and (zero[id(b)] or _positive_const(b))) or (zero[id(b)] and _positive_const(a))
        elif n.op == "mul":
            z = any(zero[id(a)] for a in n.args)
        elif n.op == "div":
            z = zero[id(n.args[0])] and _positive_const(n.args[1])
        else:
            z = False
        zero[id(n)] = z
    return zero[id(root)]


def _hot(root: Expr, out: VT, constants: Dict[str, np.ndarray]) -> Dict[int, VT]:
    """The one-row constants ``root`` reads for every row of a many-row ``out`` (each of their vectors
    read at least :data:`MIN_VECTORS_PER_SET` times: a copy is worth its space), by id."""
    if out.rows < 2:
        return {}
    found: Dict[int, VT] = {}
    for n in _topo(root):
        if n.op == "in":
            vt = n.source()[0]
            if (vt.kind == "const" and vt.rows == 1 and vt.nvec * MIN_VECTORS_PER_SET <= out.nvec
                    and vt.name in constants and not isinstance(vt, TiledVT)):
                found[id(vt)] = vt
    return found


def replica(c: Any, vt: VT, j: int, near: Sequence[VT] = ()) -> VT:
    """ALU set j's copy of the one-row constant ``vt`` (made once, in its hemisphere, on slices none of its
    other copies nor the tensors ``near`` use), registered as a member of the constant so that writing the
    constant writes it too."""
    key = (vt.name, j)
    got = c.replicas.get(key)
    if got is None:
        others = [vt, *near] + [c.replicas[(vt.name, i)] for i in range(1, j) if (vt.name, i) in c.replicas]
        got = c.new_vt(f"{vt.name}~{j}", vt.dtype, (vt.rows, vt.cols), kind="const", avoid=c.slices_of(*others),
                       hem=vt.hem)
        c.replicas[key] = got
        cols = np.arange(vt.cols)
        c.tiles.setdefault(vt.name, [(vt.name, cols)]).append((got.name, cols))
    return got


def swap_sources(root: Expr, swap: Dict[int, VT]) -> Expr:
    """``root`` with every read of a tensor in ``swap`` (by id) reading its replacement instead."""
    memo: Dict[int, Expr] = {}
    for n in _topo(root):
        if n.op == "in" and id(n.source()[0]) in swap:
            memo[id(n)] = dataclasses.replace(n, src=(swap[id(n.source()[0])], n.source()[1]))
        elif any(id(a) in memo for a in n.args):
            memo[id(n)] = dataclasses.replace(n, args=tuple(memo.get(id(a), a) for a in n.args))
    return memo.get(id(root), root)


def map_sets(c: Any, out: VT, root: Expr, alus: Optional[Sequence[int]] = None) -> int:
    """:func:`~lpucore.compiler.kernels.map_kernel` of ``root`` over every vector of ``out``; when the
    expression leaves room for several ALU sets and reads one-row constants for every vector, vector i
    goes to set ``i % k`` reading set k's copies of them (:func:`replica`). Returns the last landing cycle."""
    al = list(alus if alus is not None else range(c.n_alu))
    ops = max(1, len([x for x in _topo(root) if x.op != "in"]))
    k = min(len(al) // ops, MAX_ALU_SETS, out.nvec // MIN_VECTORS_PER_SET)
    hot = _hot(root, out, c.constants) if k >= 2 else {}
    if not hot:
        return map_kernel(c.ctx, root, out, alus=alus)
    per = len(al) // k
    # each copy off the slices of the kernel's other operands and of the copies made before it: a set
    # reads its copies of two constants in one cycle (a slice reads one vector a cycle)
    base = [out] + [n.source()[0] for n in _topo(root) if n.op == "in"]
    near = list(base)
    sets: List[tuple] = []
    for j in range(k):
        swap: Dict[int, VT] = {}
        for i, vt in hot.items():
            if j:
                try:
                    swap[i] = replica(c, vt, j, near)
                except CompileError:                  # crowded: off the copies of the same constant only
                    swap[i] = replica(c, vt, j, near[:len(base)])
                near.append(swap[i])
        rj = swap_sources(root, swap) if swap else root
        sets.append((rj, list(range(j, out.nvec, k)), al[j * per:(j + 1) * per]))
    try:
        for rj, vs, a in sets:
            _chains(c.ctx, rj if rj.op != "in" else E("mov", rj.dtype, rj), vs, a)   # NeedsSplit: before any commit
    except NeedsSplit:
        return map_kernel(c.ctx, root, out, alus=alus)
    return max(map_kernel(c.ctx, rj, out, vectors=vs, alus=a) for rj, vs, a in sets)
