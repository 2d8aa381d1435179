"""Row writes at run-time positions by MEM ``Scatter`` (``Graph.scatter``: a KV cache's new row).

A static program cannot name the address of a row chosen at run time, but a slice's ``Scatter``
writes, per superlane, to the address held in lane 0 of that superlane of a map stream group
(int16). The target is striped over ``ns`` slices per byte plane, ``ns`` a power of two
(:func:`lpucore.compiler.memory.place` with ``pow2``): vector ``(r, c)`` of plane ``b`` lies in
stripe ``s = (r + c) & (ns - 1)`` at ``base[b][s] + (r >> log2 ns) * C + c``. So for each index and
each (plane, chunk, stripe) the VXM computes one address:

* the row's address in that stripe's slice when the row's chunk lies there,
* else the slice's *sink*, an address of its own that no tensor uses (one per slice, taken once),

and every (plane, chunk, stripe) slice issues one ``Scatter`` of the new row's chunk: exactly one
stripe per chunk and plane writes the row, the others write their sinks. An index outside
``0..R-1`` hits no stripe, so it writes nothing. Equal indices: a slice issues its scatters in index
order, so the later row lands last.

In place: when ``x`` is a state read only by the scatter and the scatter's result is assigned back
to it (:func:`in_place`), the rows are written into the state itself; otherwise ``x`` is copied
into a new tensor first. Every vector of the result counts as written when the last scatter lands
(which row changed is known only at run time).
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np

from .. import dtypes as dt
from ..errors import CompileError
from ..graph import Graph, Tensor
from .gather import addressed
from .kernels import E, Expr, Plan, cvt, map_kernel
from .lower_more import _index_in_every_lane
from .memory import VT, release

I16, I32 = dt.INT16, dt.INT32


def in_place(g: Graph, sid: int) -> bool:
    """State ``sid`` is written by one scatter (``scatter`` or ``scatter_blocks``) whose result is assigned
    back to it, and otherwise read only by ``gather_blocks`` whose outputs the written rows are made from
    or by matmuls (directly or through reshapes) placed before the write in the graph: every such read is
    lowered before the write, which waits for it (:func:`scatter`, :mod:`lpucore.compiler.blocks`)."""
    users = [n for n in g.nodes if sid in n.inputs]
    value = g.assigns.get(sid)
    writes = [n for n in users if n.op in ("scatter", "scatter_blocks")]
    if len(writes) != 1 or value is None:
        return False
    w = writes[0]
    if w.inputs[0] != sid or sid in w.inputs[1:] or value.id != w.output \
            or value.id in {t.id for t in g.outputs.values()}:
        return False
    made_from = _ancestors(g, w.inputs[2])
    before = g.nodes.index(w)
    for n in users:
        if n is w:
            continue
        if n.op == "gather_blocks" and w.op == "scatter_blocks" and n.inputs[0] == sid and sid not in n.inputs[1:] \
                and n.output in made_from:
            continue
        if not _read_before(g, n, before):
            return False
    return True


def _read_before(g: Graph, n, before: int) -> bool:
    """Node ``n`` reads a tensor only as a matmul or through reshapes into matmuls, all of them among the
    graph's first ``before`` nodes (lowered in that order, never fused)."""
    if g.nodes.index(n) >= before:
        return False
    if n.op == "matmul":
        return True
    if n.op != "reshape":
        return False
    return all(_read_before(g, m, before) for m in g.nodes if n.output in m.inputs)


def _ancestors(g: Graph, tid: int) -> set:
    """The tensors ``tid`` is computed from (itself included)."""
    producer = {n.output: n for n in g.nodes}
    seen, todo = set(), [tid]
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in producer:
            todo.extend(producer[t].inputs)
    return seen


def read_as_weights(g: Graph, sid: int) -> bool:
    """State ``sid`` or its written value (its scatter's result), or a reshape of either, is a matmul's
    weights."""
    value = g.assigns.get(sid)
    if value is None:
        return False
    seen, todo = set(), [sid, value.id]
    while todo:
        tid = todo.pop()
        seen.add(tid)
        for n in g.nodes:
            if tid in n.inputs:
                if n.op == "matmul" and n.inputs[1] == tid:
                    return True
                if n.op == "reshape" and n.output not in seen:
                    todo.append(n.output)
    return False


def block_rows(g: Graph, sid: int) -> int:
    """The rows of a block of state ``sid``'s ``scatter_blocks`` (0 when it has none): its stripes must
    divide it (:mod:`lpucore.compiler.blocks`)."""
    for n in g.nodes:
        if n.op == "scatter_blocks" and n.inputs[0] == sid:
            rows = g.tensors[n.inputs[2]]
            return rows.size // rows.shape[-1] // g.tensors[n.inputs[1]].size
    return 0


def _column(c, name: str, col, dtype, avoid=()) -> VT:
    """The constant ``name``: value ``col[r]`` in every lane of row r (kept: :func:`reserve` may have made it)."""
    made: Dict[str, VT] = c.__dict__.setdefault("scatter_consts", {})
    if name not in made:
        vt = c.new_vt(name, dtype, (len(col), c.L), kind="const", avoid=avoid)
        c.constants[name] = np.repeat(np.array(col, dtype=dtype.numpy).reshape(-1, 1), c.L, axis=1)
        vt.bcast = True
        made[name] = vt
    return made[name]


def _stripe_consts(c, out: VT, idx_id: int, avoid=()) -> List[VT]:
    """The chunk and stripe numbers of the (chunk, stripe) rows of a scatter into ``out`` by index tensor
    ``idx_id`` (:func:`_offsets`)."""
    ns, C = out.stripes, out.chunks
    M = C * ns
    ch = _column(c, f"_sxch{M}s{ns}.{idx_id}", [m // ns for m in range(M)], I32, avoid)
    st = _column(c, f"_sxs{M}s{ns}.{idx_id}", [m % ns for m in range(M)], I32, tuple(avoid) + tuple(c.slices_of(ch)))
    return [ch, st]


def _base_const(c, out: VT, t_id: int, avoid=()) -> VT:
    """The bases of the (plane, chunk, stripe) slices of ``out`` for the scatter whose output is ``t_id``."""
    ns, M = out.stripes, out.chunks * out.stripes
    return _column(c, f"_sxbase{t_id}", [out.bases[j // M][j % ns] for j in range(out.planes * M)], I16, avoid)


def reserve(c) -> None:
    """Place the constants of every in-place scatter before anything is lowered. A constant is written
    when the program loads, so it only gets space no temporary ever uses, and lowering uses that space
    up: the wide temporaries of a prompt chunk of 32 rows of GPT-2-small left none for its first
    scatter's bases (:func:`lpucore.compiler.api.compile_one` calls for this only when a graph does
    not fit otherwise). An in-place target is a state, placed first, so its bases are known."""
    g = c.g
    for n in g.nodes:
        if n.op != "scatter" or not in_place(g, n.inputs[0]):
            continue
        out = c.vts.get(n.inputs[0])
        if out is not None and out.spare and not out.stripes & (out.stripes - 1):
            _stripe_consts(c, out, n.inputs[1])
            _base_const(c, out, n.output)


def _per(vt: VT) -> int:
    """Addresses of one stripe's vectors: its sink is the next one (``spare``)."""
    return -(-vt.rows // vt.stripes) * vt.chunks


def _offsets(c, idx: Tensor, out: VT) -> VT:
    """int16 ``[n * C * ns, 1]`` (in every lane): row ``i * C * ns + ch * ns + s`` is the offset from
    stripe s's base of index i's chunk ch when it lies in stripe s, else the sink's offset. It
    depends on the index and the target's shape and stripes only, so it is computed once for
    every target alike (kept for them)."""
    ns, C, R, n = out.stripes, out.chunks, out.rows, idx.size
    key = (idx.id, ns, C, R)
    made: Dict[tuple, VT] = c.__dict__.setdefault("scatter_offsets", {})
    if key in made:
        return made[key]
    M, shift, per = C * ns, ns.bit_length() - 1, _per(out)
    bc = _index_in_every_lane(c, idx)
    ch_vt, s_vt = _stripe_consts(c, out, idx.id, c.slices_of(bc))

    def root() -> Expr:
        i = Expr.input(bc, lambda v: v // M)
        ch = Expr.input(ch_vt, lambda v: v % M)
        inside = E("and", I32, E("ge", I32, i, Expr.const(I32, 0)), E("lt", I32, i, Expr.const(I32, R)))
        here = E("eq", I32, E("and", I32, E("add", I32, i, ch), Expr.const(I32, ns - 1)),
                 Expr.input(s_vt, lambda v: v % M))
        off = E("add", I32, ch, E("mul", I32, E("shr", I32, i, Expr.const(I32, shift)), Expr.const(I32, C)))
        sink = Expr.const(I32, per)
        # the sink, or the row's offset where the row lies in this stripe: sink ^ ((off ^ sink) & hit)
        return cvt(E("xor", I32, sink, E("and", I32, E("xor", I32, off, sink), E("and", I32, inside, here))), I16)
    offs = c.new_vt(f"_soff{M}.{idx.id}", I16, (n * M, 1), avoid=c.slices_of(bc, ch_vt, s_vt))
    offs.bcast = True
    c.map_into(offs, root)
    made[key] = offs
    return offs


def _maps(c, out: VT, idx: Tensor, t_id: int, avoid) -> VT:
    """int16 ``[n * G, 1]`` (in every lane), in the hemisphere out is not in and off the slices in
    avoid (the new rows': a map and a row read for one scatter pass the target at the same time):
    row ``i * G + j`` is the address index i's row takes in the slice of (plane, chunk, stripe)
    ``j``: the offset plus that stripe's base."""
    ns, C, P, n = out.stripes, out.chunks, out.planes, idx.size
    M, G = C * ns, P * C * ns
    offs = _offsets(c, idx, out)
    base = _base_const(c, out, t_id, c.slices_of(offs))
    maps = c.new_vt(f"_smap{t_id}", I16, (n * G, 1), hem=1 - out.hem, avoid=avoid, strict=True, stripes=4)
    maps.bcast = True
    c.map_into(maps, lambda: E("add", I16, Expr.input(offs, lambda v: v // G * M + v % G % M),
                               Expr.input(base, lambda v: v % G)))
    return maps


def _one(c, out: VT, g: int, src: VT, v: int, b: int, maps: VT, mrow: int, lo: int) -> int:
    """Scatter plane b of src's vector v in slice g, the address in maps' row mrow, at the first
    cycle from lo that fits; returns the issue cycle."""
    pos = c.ctx.slice_pos[g]

    def io(plan: Plan, used: dict, T: int):
        b_src = c.ctx.read_group(plan, src, v, pos, T, used)
        return None if b_src is None else ("Scatter", b_src + b, T + c.cfg.mem_write_delay)
    T = addressed(c, g, maps, mrow, lo, io, f"a MEM scatter into {out.name}")
    src.last_read[v] = max(int(src.last_read[v]), T)
    return T


def _source(c, rows: Tensor, hem: int, avoid=()) -> VT:
    """The new rows in hemisphere hem (a stream carries them to the target's slices), on slices
    not in avoid (a map and a row read for one scatter pass the target at the same time, so they
    cannot come from one slice): rows' own placement when it is so, else a copy."""
    src = c.plain(rows)
    if src.hem == hem and not c.slices_of(src) & set(avoid):
        return src
    out = c.new_vt(f"_ssrc{rows.id}_{len(avoid)}", rows.dtype, rows.shape, hem=hem, strict=True,
                   avoid=tuple(avoid) + tuple(c.slices_of(src)), stripes=2)
    if c.slices_of(out) & set(avoid):
        raise CompileError(f"scatter: no room for the rows of {rows} apart from the addresses' slices")
    map_kernel(c.ctx, E("mov", rows.dtype, Expr.input(src, lambda v: v)), out)
    return out


def scatter(c, x: Tensor, idx: Tensor, rows: Tensor, t: Tensor, name: str, kind: str) -> int:
    """t := x with rows written at the row indices idx (module docstring); returns the cycle the
    last write lands."""
    cfg = c.cfg
    placed = c.vts.get(x.id)
    if kind == "temp" and in_place(c.g, x.id) and placed.spare and not placed.stripes & (placed.stripes - 1):
        out = c.vts[x.id]
        start = 0
    else:
        out = c.new_vt(name, t.dtype, t.shape, kind=kind, pow2=True, spare=1)
        start = map_kernel(c.ctx, E("mov", t.dtype, c.operand(x, t.shape)), out) + 1
    c.vts[t.id] = out
    # after every read of the old value (in place: matmuls placed before the write, in_place)
    start = max(start, int(out.last_read.max()) + 1 if out.nvec else 0)
    n = idx.size
    src = _source(c, rows, 1 - out.hem)
    copies = [src] if src is not c.vts.get(rows.id) else []
    maps = _maps(c, out, idx, t.id, c.slices_of(src))
    if c.slices_of(src) & c.slices_of(maps):
        src = _source(c, rows, 1 - out.hem, tuple(c.slices_of(maps)))
        copies.append(src)
    ns, C, P = out.stripes, out.chunks, out.planes
    G = P * C * ns
    last: Dict[int, int] = {}           # slice -> its last scatter's issue cycle (index order)
    lands = np.full((C, ns), start, dtype=np.int64)     # (chunk, stripe) -> its last scatter's landing
    for i in range(n):
        for j in range(G):
            b, ch, s = j // (C * ns), (j // ns) % C, j % ns
            g = out.slices[b][s]
            lo = max(int(maps.ready[i * G + j]), int(src.ready[i * C + ch])) + cfg.mem_read_delay
            lo = max(lo, out.after[b][s] - cfg.mem_write_delay, start - cfg.mem_write_delay, last.get(g, -1) + 1)
            last[g] = _one(c, out, g, src, i * C + ch, b, maps, i * G + j, lo)
            lands[ch, s] = max(lands[ch, s], last[g] + cfg.mem_write_delay)
    # vector (r, ch) is written (if at all) by the scatters of its chunk in its stripe (r + ch) % ns
    r, ch = np.divmod(np.arange(out.nvec), C)
    out.ready[:] = np.maximum(out.ready, lands[ch, (r + ch) % ns])
    land = int(lands.max())
    release(c.mem, maps)
    for vt in copies:
        release(c.mem, vt)
    return land
