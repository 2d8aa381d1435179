"""Blocks of rows read and written at a run-time block index (``Graph.gather_blocks``,
``Graph.scatter_blocks``): a tile of a KV cache kept with its positions on the lanes.

Block ``k`` of ``x [R, W]`` (``R`` a multiple of the block's ``n`` rows) is rows ``k * n .. k * n + n - 1``.
``x`` is striped over ``ns`` slices per byte plane, ``ns`` a power of two dividing ``n``
(:func:`lpucore.compiler.memory.place`, ``stripe_divides``): vector ``(r, c)`` of plane ``b`` lies in stripe
``(r + c) % ns`` at ``base[b][s] + (r // ns) * C + c``. Row ``k * n + r``'s stripe is then ``(r + c) % ns``
whatever ``k`` (a slice known when compiling) and its address the static ``base[b][s] + (r // ns) * C + c``
plus ``k * (n / ns) * C``, one add on the VXM. So a block costs one MEM ``Gather`` or ``Scatter`` per
vector and byte plane, each in the slice that holds it, with one address vector per distinct static
address (rows in different stripes at the same offset share one), where :func:`Graph.scatter` must try
every stripe for every row.

Out of range: a block index outside ``0 .. R / n - 1`` reads zeros (address 0 of every slice holds a
zero vector) and writes nothing (the target's sink, :mod:`lpucore.compiler.scatter`). Equal block
indices: the later block's rows land last.

A state written in place by ``scatter_blocks`` may also be read by ``gather_blocks`` whose outputs the
written rows are made from (:func:`lpucore.compiler.scatter.in_place`): the scatter's first write is
planned after the gathers' last read.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from .. import dtypes as dt
from ..errors import CompileError
from .gather import addressed
from .kernels import E, Expr, Plan, cvt, map_kernel
from .lower_more import _index_in_every_lane
from .memory import VT, release
from .scatter import _column, _one, _source, in_place

I16, I32 = dt.INT16, dt.INT32


def blocked(c, x, n: int, name: str) -> VT:
    """x's placement when its stripes divide ``n`` (a power of two of them), else a copy that is so."""
    vt = c.plain(x)
    ns = vt.stripes
    if not ns & (ns - 1) and n % ns == 0:
        return vt
    out = c.new_vt(name, x.dtype, x.shape, pow2=True, stripe_divides=n, spare=1)
    map_kernel(c.ctx, E("mov", x.dtype, Expr.input(vt, lambda v: v)), out)
    return out


def _slots(x: VT, n: int, fallback: str) -> Tuple[List[Tuple[int, int, int, int]], List[int], List[int]]:
    """For every vector of a block and byte plane, ``(row, chunk, plane, slot)``, and per slot its static
    address and its fallback (0 to read zeros, ``"sink"`` the stripe's sink to write nothing)."""
    ns, C = x.stripes, x.chunks
    per = -(-x.rows // ns) * C
    keys: Dict[Tuple[int, int], int] = {}
    todo = []
    for r in range(n):
        for ch in range(C):
            s = (r + ch) % ns
            for b in range(x.planes):
                base = x.bases[b][s]
                key = (base + (r // ns) * C + ch, base + per if fallback == "sink" else 0)
                todo.append((r, ch, b, keys.setdefault(key, len(keys))))
    order = sorted(keys, key=lambda k: keys[k])
    static = [k[0] for k in order]
    falls = [k[1] for k in order]
    return todo, static, falls


def _maps(c, x: VT, blocks, n: int, static: List[int], falls: List[int], t_id: int, avoid) -> VT:
    """int16 ``[m * U, 1]`` (in every lane), in the hemisphere x is not in: row ``i * U + u`` is slot u's
    address for block ``blocks[i]``, or the slot's fallback when the block is out of range."""
    U, m = len(static), blocks.size
    stride = (n // x.stripes) * x.chunks
    nb = x.rows // n
    bc = _index_in_every_lane(c, blocks)
    st = _column(c, f"_bkst{t_id}", static, I32, c.slices_of(bc))
    fb = _column(c, f"_bkfb{t_id}", falls, I32, c.slices_of(bc, st))

    def root() -> Expr:
        k = Expr.input(bc, lambda v: v // U)
        inside = E("and", I32, E("ge", I32, k, Expr.const(I32, 0)), E("lt", I32, k, Expr.const(I32, nb)))
        addr = E("add", I32, Expr.input(st, lambda v: v % U), E("mul", I32, k, Expr.const(I32, stride)))
        f = Expr.input(fb, lambda v: v % U)
        # the address where the block is in range, else the fallback: f ^ ((addr ^ f) & inside)
        return cvt(E("xor", I32, f, E("and", I32, E("xor", I32, addr, f), inside)), I16)
    maps = c.new_vt(f"_bkmap{t_id}", I16, (m * U, 1), hem=1 - x.hem, avoid=tuple(avoid) + tuple(c.slices_of(bc)),
                    strict=True, stripes=4)
    maps.bcast = True
    c.map_into(maps, root)
    return maps


def _check(x: VT, n: int, what: str) -> None:
    if x.rows % n:
        raise CompileError(f"{what}: {x.rows} rows are not whole blocks of {n}")


def gather_blocks(c, x, blocks, t, name: str, kind: str) -> int:
    """t := the rows of blocks ``blocks`` of x (module docstring); returns the last landing cycle."""
    m, n = blocks.size, t.shape[1]
    src = blocked(c, x, n, f"_bkx{t.id}")
    _check(src, n, "gather_blocks")
    out = c.new_vt(name, t.dtype, t.shape, kind=kind, hem=1 - src.hem, strict=kind == "temp",
                   avoid=c.slices_of(src))
    c.vts[t.id] = out
    todo, static, falls = _slots(src, n, "zero")
    maps = _maps(c, src, blocks, n, static, falls, t.id, c.slices_of(out))
    U, C = len(static), src.chunks
    lo0 = int(src.ready.max())            # the block is known only at run time: wait for every row
    last, last_read = 0, 0
    for i in range(m):
        for r, ch, b, u in todo:
            g = src.slices[b][(r + ch) % src.stripes]
            v = (i * n + r) * C + ch
            holder: List[int] = []

            def io(plan: Plan, used: dict, T: int, v=v, b=b, g=g, holder=holder):
                wr = c.ctx.write_group(plan, out, v, c.ctx.slice_pos[g], T + c.cfg.mem_read_delay, used, planes=[b])
                if wr is None:
                    return None
                holder[:] = [wr[1]]
                return "Gather", wr[0], T
            row = i * U + u
            T = addressed(c, g, maps, row, max(lo0, int(maps.ready[row])), io, f"a MEM gather from {src.name}")
            out.ready[v] = max(int(out.ready[v]), holder[0])
            last = max(last, holder[0])
            last_read = max(last_read, T)
    # which rows were read is known only at run time: every vector counts as read at the last gather
    src.last_read[:] = np.maximum(src.last_read, last_read)
    release(c.mem, maps)
    if src is not c.vts.get(x.id):
        release(c.mem, src)
    return last


def scatter_blocks(c, x, blocks, rows, t, name: str, kind: str) -> int:
    """t := x with blocks ``blocks`` replaced by ``rows`` (module docstring), in place when x is a state
    so written (:func:`lpucore.compiler.scatter.in_place`); returns the cycle the last write lands."""
    cfg = c.cfg
    m = blocks.size
    n = rows.size // rows.shape[-1] // m
    placed = c.vts.get(x.id)
    if kind == "temp" and in_place(c.g, x.id) and placed.spare and not placed.stripes & (placed.stripes - 1) \
            and n % placed.stripes == 0:
        out, start = placed, 0
    else:
        out = c.new_vt(name, t.dtype, t.shape, kind=kind, pow2=True, stripe_divides=n, spare=1)
        start = map_kernel(c.ctx, E("mov", t.dtype, c.operand(x, t.shape)), out) + 1
    _check(out, n, "scatter_blocks")
    c.vts[t.id] = out
    # after every read of the rows they replace (a gather of the old block: known only at run time)
    start = max(start, int(out.last_read.max()) + 1)
    src = _source(c, rows, 1 - out.hem)
    copies = [src] if src is not c.vts.get(rows.id) else []
    todo, static, falls = _slots(out, n, "sink")
    maps = _maps(c, out, blocks, n, static, falls, t.id, c.slices_of(src))
    if c.slices_of(src) & c.slices_of(maps):
        src = _source(c, rows, 1 - out.hem, tuple(c.slices_of(maps)))
        copies.append(src)
    U, C = len(static), out.chunks
    last: Dict[int, int] = {}               # slice -> its last scatter's issue cycle (block order)
    land = start
    for i in range(m):
        for r, ch, b, u in todo:
            s = (r + ch) % out.stripes
            g = out.slices[b][s]
            v = (i * n + r) * C + ch
            lo = max(int(maps.ready[i * U + u]), int(src.ready[v])) + cfg.mem_read_delay
            lo = max(lo, out.after[b][s] - cfg.mem_write_delay, start - cfg.mem_write_delay, last.get(g, -1) + 1)
            last[g] = _one(c, out, g, src, v, b, maps, i * U + u, lo)
            land = max(land, last[g] + cfg.mem_write_delay)
    out.ready[:] = np.maximum(out.ready, land)
    release(c.mem, maps)
    for vt in copies:
        release(c.mem, vt)
    return land
