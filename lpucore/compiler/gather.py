"""Row lookups by MEM ``Gather``: a constant table read by address instead of through the MXM.

A gathered table (an embedding) would otherwise be multiplied by a one-hot row on the MXM, which
streams the whole table through the weight buffers (GPT-2's 50,257 x 768 int8 token table: about
2,500 cycles a lookup).  A slice's ``Gather`` reads, per superlane, the address held in lane 0 of
that superlane of a map stream group (int16), so a row found by index costs a few reads:

* the table is kept as :class:`GatherTable` members, one per block of rows and column chunk, each
  byte plane in one slice at consecutive addresses (row r of a block at ``base + r - first``);
* a map kernel computes, for every index and member, the address of the row in that member's
  slice, or 0 (the zero vector every slice holds at address 0) when the row is not in the member;
* each member's slice gathers its piece onto a stream, written into a pieces tensor; a last map
  kernel ORs each chunk's pieces (one of them holds the row, the others are zero: exact bit for
  bit, whatever the table's dtype).

Maps and pieces are kept in both hemispheres (a member reads its map from, and sends its piece
to, the hemisphere it is not in, so the streams always have a direction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from .. import dtypes as dt
from ..errors import CompileError
from .kernels import E, Expr, NeedsSplit, Plan, _find, cvt, map_kernel
from .memory import VT, release

I16, I32 = dt.INT16, dt.INT32
MAX_INDICES = 64          # more indices than this: the one-hot product (its cost does not grow with them)


@dataclass
class Member:
    """Rows [first, first + count) of column chunk ``chunk`` of a gathered table, in ``vt`` (one
    stripe per byte plane: row r at address base + r - first of its slice)."""

    vt: VT
    first: int
    count: int
    chunk: int

    @property
    def hem(self) -> int:
        return self.vt.hem


class GatherTable:
    """A constant table placed for MEM Gather (see the module docstring)."""

    def __init__(self, name: str, dtype: dt.DType, rows: int, cols: int, members: List[Member]):
        self.name, self.dtype, self.rows, self.cols, self.members = name, dtype, rows, cols, members
        self.bcast = False
        self.kind = "const"


def place_table(c, name: str, arr2d: np.ndarray) -> Optional[GatherTable]:
    """Place ``arr2d`` as a GatherTable: the largest block of rows (at most a slice's addresses but
    address 0) for which every block of every chunk finds a slice per byte plane; None if none."""
    cfg, L = c.cfg, c.L
    d = dt.get(arr2d.dtype)
    V, D = arr2d.shape
    C = -(-D // L)
    free = sorted((c.mem.longest(g, fresh=True) for g in range(cfg.mem_slices)), reverse=True)
    block = min(V, cfg.addresses_per_slice - 1)
    while block >= 1:
        need = -(-V // block) * C * d.nbytes
        if need <= len(free) and free[need - 1] >= block:
            break
        block //= 2
    else:
        return None
    members, parts = [], []
    for ch in range(C):
        c0, c1 = ch * L, min(D, (ch + 1) * L)
        for first in range(0, V, block):
            count = min(block, V - first)
            mname = f"{name}#{first}.{ch}"
            vt = c.new_vt(mname, d, (count, c1 - c0), kind="const", stripes=1)
            members.append(Member(vt, first, count, ch))
            parts.append((mname, first, first + count, c0, c1))
    c.constants[name] = np.ascontiguousarray(arr2d)
    c.row_parts[name] = parts
    return GatherTable(name, d, V, D, members)


def _maps(c, table: GatherTable, bc: VT, n: int, t_id: int) -> List[VT]:
    """Per hemisphere h, an int16 [n * members, 1] tensor (in every lane) placed in h: the address of
    index i's row in member m (row i * members + m), or 0 when the row is elsewhere."""
    G = len(table.members)
    lo = np.array([[m.first] for m in table.members], dtype=np.int32)
    hi = np.array([[m.first + m.count] for m in table.members], dtype=np.int32)
    shift = np.array([[m.vt.bases[0][0] - m.first] for m in table.members], dtype=np.int32)
    consts: List[VT] = []
    for what, col in (("lo", lo), ("hi", hi), ("shift", shift)):
        name = f"_gx{what}{t_id}"
        vt = c.new_vt(name, I32, (G, c.L), kind="const", avoid=c.slices_of(bc, *consts))
        c.constants[name] = np.repeat(col, c.L, axis=1)
        vt.bcast = True
        consts.append(vt)
    lo_vt, hi_vt, sh_vt = consts
    if any(m.vt.bases[p][0] != m.vt.bases[0][0] for m in table.members for p in range(m.vt.planes)):
        raise CompileError(f"internal: gathered table {table.name!r} has planes at different addresses")

    def root() -> Expr:
        idx = Expr.input(bc, lambda v: v // G)
        inside = E("and", I32, E("ge", I32, idx, Expr.input(lo_vt, lambda v: v % G)),
                   E("lt", I32, idx, Expr.input(hi_vt, lambda v: v % G)))
        return cvt(E("and", I32, E("add", I32, idx, Expr.input(sh_vt, lambda v: v % G)), inside), I16)
    out = []
    for h in range(c.cfg.hemispheres):
        vt = c.new_vt(f"_gmap{h}_{t_id}", I16, (n * G, 1), hem=h, avoid=c.slices_of(bc, *consts), strict=True)
        vt.bcast = True
        c.map_into(vt, root)
        out.append(vt)
    return out


def addressed(c, g: int, maps: VT, mrow: int, lo: int, io, what: str) -> int:
    """Issue one MEM ``Gather`` or ``Scatter`` in slice g, its addresses in row mrow of maps, at
    the first cycle T from lo that fits: ``io(plan, used, T)`` plans the instruction's other
    stream and returns ``(mnemonic, data stream, cycle of its MEM access)``, or None. The address
    is known only at run time, so the access keeps both banks. Returns T."""
    ctx = c.ctx
    pos = ctx.slice_pos[g]

    def build(T: int) -> Optional[Plan]:
        plan, used = Plan(), {}     # type: Plan, dict
        if not ctx._queues_free([(g, 0)], [T], used):
            return None
        used[("q", g, T)] = 1
        b_map = ctx.read_group(plan, maps, mrow, pos, T, used)
        if b_map is None:
            return None
        got = io(plan, used, T)
        if got is None:
            return None
        mnemonic, data, at = got
        plan.issues.append((ctx.mem_q[g], T, mnemonic, (data, b_map)))
        (plan.reads if mnemonic == "Gather" else plan.writes).extend([(g, at, 0), (g, at, 1)])
        return plan
    T = _find(ctx, lo, build, what)
    maps.last_read[mrow] = max(int(maps.last_read[mrow]), T)
    return T


def _piece(c, m: Member, p: int, maps: VT, mrow: int, pieces: VT, v: int, lo: int) -> int:
    """Gather byte plane p of member m's row (address in row mrow of maps) into vector v of
    pieces, at the first cycle from lo that fits; returns the landing cycle."""
    g = m.vt.slices[p][0]
    pos = c.ctx.slice_pos[g]
    holder: List[int] = []

    def io(plan: Plan, used: dict, T: int):
        wr = c.ctx.write_group(plan, pieces, v, pos, T + c.cfg.mem_read_delay, used, planes=[p])
        if wr is None:
            return None
        holder[:] = [wr[1]]
        return "Gather", wr[0], T
    addressed(c, g, maps, mrow, lo, io, f"a MEM gather from {m.vt.name}")
    return holder[0]


def _or_into(c, terms: List[Expr], out: VT, v: int) -> int:
    """Vector v of out := the bitwise or of terms (vectors of one dtype); terms whose reads cannot
    share one kernel are or-ed in halves through temporaries first. Returns the landing cycle."""
    d = out.dtype
    root = terms[0] if len(terms) > 1 else E("mov", d, terms[0])
    for x in terms[1:]:
        root = E("or", d, root, x)
    try:
        return map_kernel(c.ctx, root, out, vectors=[v])
    except NeedsSplit:
        if len(terms) < 3:
            raise
    halves = []
    for half, part in enumerate((terms[:len(terms) // 2], terms[len(terms) // 2:])):
        tmp = c.new_vt(f"_gor{out.name}.{v}.{len(terms)}.{half}", d, (1, out.cols if out.chunks == 1 else c.L))
        _or_into(c, part, tmp, 0)
        halves.append(tmp)
    last = _or_into(c, [Expr.input(h, _fixed(0)) for h in halves], out, v)
    for h in halves:
        release(c.mem, h)
    return last


def _choose(c, m: Member, vts: List[VT], slices_of, planes=None) -> int:
    """The index of the first of vts (the one in the other hemisphere first) whose slices
    ``slices_of(vt, p)`` for each byte plane p of m all lie on one side of m's slice for p (a stream
    carries them between the two)."""
    pos = c.ctx.slice_pos
    order = sorted(range(len(vts)), key=lambda h: vts[h].hem == m.hem)
    for h in order:
        ok = True
        for p in (range(m.vt.planes) if planes is None else planes):
            x = pos[m.vt.slices[p][0]]
            sides = {pos[g] > x for g in slices_of(vts[h], p)}
            if any(pos[g] == x for g in slices_of(vts[h], p)) or len(sides) > 1:
                ok = False
        if ok:
            return h
    raise CompileError(f"no placement found to gather from {m.vt.name}: its slice shares a position with "
                       f"the maps or pieces it needs")


def _fixed(v: int):
    """The index function of an input read at vector v whatever the output vector."""
    return lambda _: v


def gather_rows(c, table: GatherTable, bc: VT, n: int, out: VT, t_id: int) -> int:
    """out[i] = table[index i] for the n indices in bc (int32 [n, 1], in every lane); returns the
    last landing cycle."""
    G = len(table.members)
    C = -(-table.cols // c.L)
    blocks = G // C
    maps = _maps(c, table, bc, n, t_id)
    held = c.slices_of(*[m.vt for m in table.members])
    pieces = [c.new_vt(f"_gp{h}_{t_id}", table.dtype, (n * blocks, table.cols), hem=h, avoid=held, strict=True)
              for h in range(c.cfg.hemispheres)]
    where = {}
    for mi, m in enumerate(table.members):
        j = m.first // table.members[0].count
        for i in range(n):
            v = (i * blocks + j) * C + m.chunk
            row = i * G + mi
            h = _choose(c, m, pieces, lambda vt, p, v=v: [vt.loc(v, p)[0]])
            land = 0
            for p in range(m.vt.planes):
                mp = maps[_choose(c, m, maps, lambda vt, q, row=row: [vt.loc(row, k)[0] for k in range(2)], [p])]
                land = max(land, _piece(c, m, p, mp, row, pieces[h], v, int(mp.ready[row])))
            pieces[h].ready[v] = max(int(pieces[h].ready[v]), land)
            where[(i, j, m.chunk)] = h
    last = 0
    for i in range(n):
        for ch in range(C):
            # each chunk's pieces: one holds the row, the others are zero vectors
            terms = [Expr.input(pieces[where[(i, j, ch)]], _fixed((i * blocks + j) * C + ch)) for j in range(blocks)]
            last = max(last, _or_into(c, terms, out, i * C + ch))
    for vt in maps + pieces:
        release(c.mem, vt)
    return last
