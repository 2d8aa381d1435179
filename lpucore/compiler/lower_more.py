"""Lowering of matmul, layout operations, gather and rope (the rest is in lower.py; which function
lowers which operation: :mod:`lpucore.compiler.registry`)."""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from .. import dtypes as dt
from ..errors import CompileError
from . import conv, kernels
from .kernels import E, Expr, MatMul, Piece, Taps, cvt, lanemove_kernel, map_kernel, matmul_kernel
from .memory import VT, release

F32, F16, I8, I32 = dt.FLOAT32, dt.FLOAT16, dt.INT8, dt.INT32


def _batch_index(shape_b, shape_out_batch):
    """Flat batch index of an operand for each flat output batch index (broadcasting)."""
    nd = len(shape_out_batch)
    sb = (1,) * (nd - len(shape_b)) + tuple(shape_b)
    if not shape_out_batch:
        return np.zeros(1, dtype=np.int64)
    grid = np.arange(int(np.prod(sb)) if sb else 1).reshape(sb or (1,))
    return np.broadcast_to(grid, shape_out_batch).ravel()


def matmul(c, a, b, t, name, kind):
    A, B = c.plain(a), c.plain(b)
    sa = a.shape if a.ndim > 1 else (1,) + a.shape
    sb = b.shape if b.ndim > 1 else b.shape + (1,)
    M, K, N = sa[-2], sa[-1], sb[-1]
    batch = tuple(np.broadcast_shapes(sa[:-2], sb[:-2]))
    ia = _batch_index(sa[:-2], batch)
    ib = _batch_index(sb[:-2], batch)
    if b.ndim == 1:
        # a matrix-vector product: multiply lane-wise with b broadcast over the rows, sum each row
        from ..graph import Tensor
        acc = F32 if a.dtype.is_float else I32
        prod = c.new_vt(f"_mv{t.id}", acc, a.shape, avoid=c.slices_of(A, B))
        c.map_into(prod, lambda: E("mul", acc, c.operand(a, a.shape, acc), c.operand(b, a.shape, acc)))
        ptensor = Tensor(c.g, c.scratch_id(), a.shape, acc)
        c.vts[ptensor.id] = prod
        last = c.reduce("sum", ptensor, t, name, kind)
        release(c.mem, prod)
        return last
    out_shape = batch + (M, N)
    out = c.part_vt(t, c.slices_of(A, B)) if kind == "temp" else None     # a part of a concatenation of rows
    if out is None:
        out = c.new_vt(name, t.dtype, out_shape, kind=kind, avoid=c.slices_of(A, B))
    c.vts[t.id] = out
    a_last = masked_last(c, A, B, (M, K, N), t.id) if len(ia) == 1 else None
    if getattr(B, "parts", None) and len(ia) == 1:
        last = _split_matmul(c, A, B, out, (M, K, N), t.id, a_last)
    else:
        last = 0
        for i in range(len(ia)):
            mm = MatMul(A, B, out, M, K, N,
                        a_row=lambda m, o=int(ia[i]) * M: o + m,
                        b_row=lambda k, o=int(ib[i]) * K: o + k,
                        o_row=lambda m, o=i * M: o + m, A_last=a_last)
            last = max(last, matmul_kernel(c.ctx, mm, c.planes, _planes_for(c, B)))
    if a_last is not None:
        release(c.mem, a_last)
    return last


# column tiles per MXM plane from which an int8 product of few rows masks its last partial chunk of K: the
# masking kernel delays the product's first use of that chunk by a MEM round trip, which pays only where the
# weight loads dominate (GPT-2-small's step: 43,801 cycles unmasked, 43,564 masking the head's 158 tiles
# alone (4 a plane or more), 43,687 masking the 8-10-tile q/k/v and MLP products too (2 to 2.5 a plane);
# bench_gemm's GEMV (c), 13 tiles (3.25 a plane): 1,009 cycles unmasked, 1,003 masked)
MASK_TILES_PER_PLANE = 3


def masked_last(c, A: VT, B: VT, dims: Tuple[int, int, int], tid: int) -> Optional[VT]:
    """For an int8 product of few rows (at most an accumulator block) by constant weights whose K ends in a
    partial chunk, over many column tiles (:data:`MASK_TILES_PER_PLANE` a plane or more): A's last chunk
    with its lanes past K zeroed (one VXM ``and`` a row, :class:`~lpucore.compiler.kernels.MatMul`'s
    ``A_last``), so that every tile's load of that chunk takes only its rows (K = 768: 8 LW cycles of 20)
    instead of zeros past them every other tile; else None."""
    M, K, N = dims
    L = c.L
    rest = K % L
    if (A.dtype != I8 or B.kind != "const" or not rest or K < L or M > c.cfg.mxm_accumulators // 2
            or -(-N // L) < MASK_TILES_PER_PLANE * c.cfg.mxm_planes):
        return None
    last = -(-K // L) - 1
    pad = c.new_vt(f"_al{tid}", I8, (M, L), avoid=c.slices_of(A, B))
    map_kernel(c.ctx, E("and", I8, Expr.input(A, lambda v: v * A.chunks + last),
                        Expr.input(c.mask(rest, 1), lambda v: 0)), pad)
    return pad


def conv_taps(c, x, w, t, name, kind, n):
    """A ``conv_taps`` node (:mod:`lpucore.compiler.conv`): the product of a channel-last image x
    [N*H*W, C] by the weight matrix w [taps * C, C_out], each output row's taps read straight from x's
    rows (:class:`~lpucore.compiler.kernels.Taps`; pads skipped). Returns the last landing cycle."""
    A, B = c.plain(x), c.plain(w)
    M, K, Nc = t.shape[0], w.shape[0], w.shape[1]
    out = c.new_vt(name, t.dtype, t.shape, kind=kind, avoid=c.slices_of(A, B))
    c.vts[t.id] = out
    rows = conv.tap_rows(n)
    order = _phase_order(rows, conv.phases(n.attrs))
    o_row = _same_row if order is None else (lambda m: int(order[m]))
    if order is not None:
        rows = rows[order]
    # a tap's K rows: the lanes of a row of x (Pi pixels' channels when packed)
    mm = MatMul(A, B, out, M, K, Nc, a_row=_same_row, b_row=_same_row, o_row=o_row,
                taps=Taps(rows=rows, C=x.shape[1]))
    return matmul_kernel(c.ctx, mm, c.planes, _planes_for(c, B))


def _phase_order(rows: np.ndarray, phases: int) -> Optional[np.ndarray]:
    """For a packed image's convolution into fewer pixels a row with ``phases`` > 1 (each output row's
    groups of taps are its phase's, :func:`conv.packed_groups`), the order of the output rows that puts
    rows of one phase together block by block (by their first input row, DEAL_ROWS at a time, then
    the set of groups they read), so that a dealt block of rows loads one phase's weights, not every
    phase's; else None (rows in order)."""
    if phases < 2:
        return None
    valid = rows >= 0
    _, pattern = np.unique(valid, axis=0, return_inverse=True)
    src = rows[np.arange(len(rows)), np.argmax(valid, axis=1)]
    return np.lexsort((np.arange(len(rows)), pattern.ravel(), src // kernels.DEAL_ROWS))


def _combine_cycles(cfg) -> int:
    """About what adding a split tile's partial sums costs after its last product (cycles): the partial
    sums go to MEM and come back to the VXM (a write and a read, each up to the chip's half-width away),
    one ALU add, and the sum's write."""
    far = max(abs(cfg.vxm_position - cfg.sxm_position(h)) for h in range(2))
    return 2 * cfg.mem_write_delay + cfg.mem_read_delay + cfg.vxm_alu_delay + 3 * far


def k_split(cfg, M: int, K: int, N: int) -> Optional[List[Tuple[int, int, int, int]]]:
    """How to share an int8 product's last column tiles over the MXM planes when they are fewer than the
    planes (a GEMV's 13 tiles on 4 planes: one plane would load a 13th tile's 13 chunks while three
    wait): their (tile, chunk of K) weight loads in order, cut into one run per plane of near-equal
    length, as parts (plane slot j, column tile, first chunk, end chunk), each tile on ``P / R`` planes
    (``R`` split tiles dividing the ``P`` planes). None when the busiest plane
    would not save at least twice :func:`_combine_cycles` of weight loads (each ``mxm_size /
    mxm_lw_streams`` LW cycles and an IW), when the rows fill more than one accumulator block, or with
    fewer tiles than planes (no whole round)."""
    L, P = cfg.lanes, cfg.mxm_planes
    nT, nK = -(-N // L), -(-K // L)
    R = nT % P
    # (P % R: each split tile on P / R planes of its own; runs crossing into a second tile measured
    # slower than no split)
    if P < 2 or nT < P or R == 0 or P % R or M > min(cfg.mxm_accumulators // 2, 256):
        return None
    load = -(-cfg.mxm_size // cfg.mxm_lw_streams) + 1
    if (nK - -(-R * nK // P)) * load < 2 * _combine_cycles(cfg):
        return None
    seq = [(nt, kc) for nt in range(nT - R, nT) for kc in range(nK)]
    parts: List[Tuple[int, int, int, int]] = []
    i = 0
    for j in range(P):
        seg = seq[i:i + R * nK // P + (1 if j < R * nK % P else 0)]
        i += len(seg)
        for nt in sorted({tile for tile, _ in seg}):
            ks = [kc for tile, kc in seg if tile == nt]
            parts.append((j, nt, ks[0], ks[-1] + 1))
    return parts


def weight_split(c, g, tid: int) -> Optional[List[Tuple[int, int, int, int]]]:
    """:func:`k_split` for weight constant ``tid`` when every product loading it is int8 x int8 -> int32
    with one batch and splits the same way (int32 partial sums add exactly, in any order); else None."""
    splits = set()
    for n in g.nodes:
        if tid not in n.inputs:
            continue
        if n.op != "matmul" or n.inputs[1] != tid or n.inputs[0] == tid:
            return None
        a, b, out = g.tensors[n.inputs[0]], g.tensors[tid], g.tensors[n.output]
        if (a.dtype, b.dtype, out.dtype) != (I8, I8, I32) or b.ndim != 2 or int(np.prod(a.shape[:-2])) != 1:
            return None
        M = a.shape[-2] if a.ndim > 1 else 1
        parts = k_split(c.cfg, M, b.shape[0], b.shape[1])
        if parts is None:
            return None
        splits.add(tuple(parts))
    return list(splits.pop()) if len(splits) == 1 else None


def _same_row(i: int) -> int:
    return i


def _split_matmul(c, A, B, out, dims: Tuple[int, int, int], tid: int, a_last: Optional[VT] = None) -> int:
    """A product whose weights keep their last column tiles as runs of rows (:func:`weight_split`,
    :class:`~lpucore.compiler.memory.TiledVT` parts): first each run on the plane of its slot into a
    temporary of one column tile, then the whole tiles on the planes in turn, while the VXM adds each
    split tile's partial sums into ``out`` (in the shadow of the whole tiles). Returns the last landing
    cycle."""
    M, K, N = dims
    order = _planes_for(c, B)
    temps: dict = {}
    C = out.chunks

    def row_of(v: int) -> int:          # out's vector v (row m, tile nt) -> a one-tile temporary's vector m
        return v // C

    def offset(r0: int):
        return lambda k: k - r0
    for nt, r0, r1, pv, j in B.parts:
        tmp = c.new_vt(f"_ks{tid}_{nt}_{r0}", I32, (M, pv.cols), avoid=c.slices_of(A, B))
        temps.setdefault(nt, []).append(tmp)
        part = MatMul(A, pv, tmp, M, K, pv.cols, a_row=_same_row, b_row=offset(r0), o_row=_same_row, A_last=a_last)
        matmul_kernel(c.ctx, part, c.planes, [order[j]], tiles=[0], chunks=(r0 // c.L, -(-r1 // c.L)))
    whole = MatMul(A, B, out, M, K, N, a_row=_same_row, b_row=_same_row, o_row=_same_row, A_last=a_last)
    last = matmul_kernel(c.ctx, whole, c.planes, order, tiles=range(B.whole))
    for nt, tmps in temps.items():
        root = Expr.input(tmps[0], row_of)
        for tmp in tmps[1:]:
            root = E("add", I32, root, Expr.input(tmp, row_of))
        last = max(last, map_kernel(c.ctx, root, out, vectors=[m * C + nt for m in range(M)]))
        for tmp in tmps:
            release(c.mem, tmp)
    return last


def _planes_by_free(c) -> List[int]:
    """The MXM planes, the one whose activations finish first leading (a product's column tiles go to
    them in turn, so independent products start on idle planes)."""
    P = c.cfg.mxm_planes
    return sorted(range(P), key=lambda p: (c.planes[p].abc_next if p in c.planes else 0, p))


def _planes_for(c, B) -> List[int]:
    """The planes in the order a product's column tiles take them: a weight kept as member tensors
    (TiledVT, member j holding tiles j, j + G, ...) gives member j the first free plane of member j's
    hemisphere, so its weight rows reach the plane without crossing the chip (shorter, and clear of
    the streams the VXM's kernels use in the middle)."""
    order = _planes_by_free(c)
    members = getattr(B, "members", None)
    if not members:
        return order
    per = c.cfg.mxm_planes_per_hemisphere
    chosen: List[int] = []
    for m in members:
        mine = [p for p in order if p not in chosen and p // per == m.hem]
        chosen.append(mine[0] if mine else next(p for p in order if p not in chosen))
    return chosen + [p for p in order if p not in chosen]


def relayout(c, out, srcs, src_of):
    """Fill `out` so that its flat element e is element src_of[1][e] of tensor srcs[src_of[0][e]]
    (flat, row-major).  Whole vectors that only move are copied by the VXM; lanes that
    change place go through lane moves (SXM shifts)."""
    L = c.L
    which, elem = src_of
    C = out.chunks
    cols = out.cols
    simple = True
    plan = []                      # per output vector: list of Piece
    for v in range(out.nvec):
        r, ch = divmod(v, C)
        j0 = ch * L
        n = min(L, cols - j0)
        e = r * cols + j0 + np.arange(n)
        src_id = which[e]
        fe = elem[e]
        pieces = []
        i = 0
        while i < n:
            sv = srcs[int(src_id[i])]
            sr, sc = divmod(int(fe[i]), sv.cols)
            k = i + 1
            while k < n and src_id[k] == src_id[i] and fe[k] == fe[k - 1] + 1:
                sr2, sc2 = divmod(int(fe[k]), sv.cols)
                if sr2 != sr or sc2 // L != sc // L:
                    break
                k += 1
            pieces.append(Piece(sv, sr * sv.chunks + sc // L, sc % L, k - i, i))
            i = k
        if not (len(pieces) == 1 and pieces[0].src_lane == 0 and pieces[0].n == n):
            simple = False
        plan.append(pieces)
    if simple:
        # every output vector is one source vector (its valid lanes, unshifted): copies
        groups = {}
        for v, pcs in enumerate(plan):
            pc = pcs[0]
            groups.setdefault(id(pc.src), (pc.src, []))[1].append((v, pc.src_v))
        last = 0
        for src, pairs in groups.values():
            mp = dict(pairs)
            vs = [v for v, _ in pairs]
            root = E("mov", out.dtype, Expr.input(src, lambda v, mp=mp: mp[v]))
            rem = out.cols % L
            # a row's last vector keeps zero past its columns: copied from a source vector that does too
            # (the last of a row as wide), or masked
            kept = not src.bcast and src.cols % L == rem
            full = [v for v in vs if not rem or v % C != C - 1 or (kept and mp[v] % src.chunks == src.chunks - 1)]
            tail = [v for v in vs if rem and v % C == C - 1 and not (kept and mp[v] % src.chunks == src.chunks - 1)]
            if full:
                last = max(last, map_kernel(c.ctx, root, out, vectors=full))
            if tail:
                m = c.mask(rem, out.planes)
                last = max(last, map_kernel(c.ctx, E("and", out.dtype, Expr.input(src, lambda v, mp=mp: mp[v]),
                                                      Expr.input(m, lambda v: 0)), out, vectors=tail))
        return last
    return lanemove_kernel(c.ctx, out, lambda v: plan[v], lambda a, b: c.span_mask(a, b, out.planes))


def gather(c, table, idx, t, name, kind):
    """table[idx]: a one-hot matrix (built on the VXM by comparing lane numbers with each
    index) times the table on the MXM; exact for int8 and float16 tables."""
    from ..graph import Tensor
    from .gather import GatherTable, gather_rows
    V, D = table.shape
    n = idx.size
    placed = c.vts.get(table.id)
    if isinstance(placed, GatherTable):
        out = c.new_vt(name, t.dtype, t.shape, kind=kind)
        c.vts[t.id] = out
        bc = _index_in_every_lane(c, idx, t)
        return gather_rows(c, placed, bc, n, out, t.id)
    if table.dtype.name not in ("int8", "float16"):
        raise CompileError(f"gather: tables of {table.dtype.name} are not supported (int8, float16)")
    d = table.dtype
    # the one-hot rows of an index tensor are built once and kept for every table it
    # indexes (a decode step's position selects several rotary tables)
    key = ("onehot", idx.id, V, d.name)
    oh = c.vts.get(key)
    if oh is None:
        oh = _onehot(c, idx, V, d, t)
        c.vts[key] = oh
    oh_t = Tensor(c.g, c.scratch_id(), (n, V), d)
    c.vts[oh_t.id] = oh
    prod_t = Tensor(c.g, c.scratch_id(), (n, D), I32 if d == I8 else F16)
    last = matmul(c, oh_t, table, prod_t, f"_gp{t.id}" if (d == I8 or t.shape != (n, D)) else name,
                  "temp" if (d == I8 or t.shape != (n, D)) else kind)
    pv = c.vts[prod_t.id]
    if d == I8:
        # int32 products of a one-hot row are the int8 entries: narrow back
        out = c.new_vt(name, t.dtype, t.shape, kind=kind, avoid=c.slices_of(pv))
        last = map_kernel(c.ctx, cvt(Expr.input(pv, lambda v: v), I8), out)
        release(c.mem, pv)
        c.vts[t.id] = out
        return last
    if t.shape != (n, D):
        out = c.new_vt(name, t.dtype, t.shape, kind=kind, avoid=c.slices_of(pv))
        last = map_kernel(c.ctx, E("mov", t.dtype, Expr.input(pv, lambda v: v)), out)
        release(c.mem, pv)
        c.vts[t.id] = out
        return last
    c.vts[t.id] = pv
    return last



def _index_in_every_lane(c, idx, t=None):
    """int32 [n, 1]: index i in every lane of vector i (a lane sum of the index masked to its lane).
    Made once per index tensor and kept (a few vectors): a decode step's position addresses the
    position embedding or rotary tables and every KV cache write."""
    from .allreduce import allreduce_kernel
    made = c.__dict__.setdefault("lane_index", {})
    if idx.id in made:
        return made[idx.id]
    n = idx.size
    iv = c.plain(idx)
    bc = c.new_vt(f"_gi{idx.id}", I32, (n, 1), avoid=c.slices_of(iv))
    made[idx.id] = bc

    def row(r):
        busy = c.slices_of(iv)
        copies = c.span_mask(r % c.L, r % c.L + 1, 4)
        m = next((m for m in copies if not busy & c.slices_of(m)), copies[0])
        return E("and", I32, Expr.input(iv, lambda v, k=r // c.L: k), Expr.input(m, lambda v: 0))
    allreduce_kernel(c.ctx, row, bc, "add", list(range(c.n_alu)))
    return bc


def _onehot(c, idx, V, d, t):
    """[n, V] rows of dtype d, 1 at column idx[r] (never released: see gather)."""
    n = idx.size
    bc = _index_in_every_lane(c, idx, t)
    oh = c.new_vt(f"_oh{t.id}", d, (n, V), avoid=c.slices_of(bc))
    chunks = oh.chunks
    iota = c.const_vt(f"_iota{t.id}", np.arange(V, dtype=np.int32).reshape(1, V))
    one_bits = 0x3C00 if d == F16 else 1              # 1.0 in float16, or 1

    def onehot():
        eq = E("eq", I32, Expr.input(iota, lambda v, C=chunks: v % C), Expr.input(bc, lambda v, C=chunks: v // C))
        bits = E("and", I32, eq, Expr.const(I32, one_bits))
        return E("cvt", {1: I8, 2: dt.INT16}[d.nbytes], bits, **{})
    c.map_into(oh, lambda: _as(onehot(), d))
    return oh

def _as(e, d):
    """Reinterpret an integer expression's bits as dtype d (same width)."""
    e.dtype = dt.INT16 if d.nbytes == 2 else e.dtype
    return e


def rope(c, x, pos, t, name, kind, base, positions):
    """Llama rotary embedding: y = x * cos + rotate_half(x) * sin_signed, the cos / sin rows
    gathered by position from tables of ``positions`` rows built at compile time (the node's
    ``max_positions``: the tables' SRAM and the lookup's MXM product grow with it)."""
    from ..graph import Tensor
    d = x.shape[-1]
    T = x.shape[-2]
    P = int(positions)
    half = d // 2
    inv = base ** (-np.arange(half, dtype=np.float64) * 2 / d)
    ang = np.arange(P, dtype=np.float64)[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(ang), np.cos(ang)], axis=1).astype(np.float16)
    sin = np.concatenate([-np.sin(ang), np.sin(ang)], axis=1).astype(np.float16)
    g = c.g
    # one pair of tables per (positions, width, base), shared by every rope of the graph
    key = (P, d, float(base))
    if key not in c.rope_tables:
        cos_t = Tensor(g, c.scratch_id(), (P, d), F16)
        sin_t = Tensor(g, c.scratch_id(), (P, d), F16)
        c.vts[cos_t.id] = c.const_vt(f"_rcos{t.id}", cos, stripes=c.cfg.mxm_lw_streams)
        c.vts[sin_t.id] = c.const_vt(f"_rsin{t.id}", sin, stripes=c.cfg.mxm_lw_streams)
        c.rope_tables[key] = (cos_t, sin_t)
    cos_t, sin_t = c.rope_tables[key]
    cr = Tensor(g, c.scratch_id(), (T, d), F16)
    sr = Tensor(g, c.scratch_id(), (T, d), F16)
    gather(c, cos_t, pos, cr, f"_rc{t.id}", "temp")
    gather(c, sin_t, pos, sr, f"_rs{t.id}", "temp")
    # rotate_half: lane i takes lane (i + d/2) mod d of its head
    X = c.plain(x)
    rot = c.new_vt(f"_rr{t.id}", x.dtype, x.shape, avoid=c.slices_of(X))
    grid = np.arange(x.size).reshape(-1, d)
    src = np.concatenate([grid[:, half:], grid[:, :half]], axis=1).ravel()
    relayout(c, rot, [X], (np.zeros(x.size, dtype=np.int64), src))
    rt = Tensor(g, c.scratch_id(), x.shape, x.dtype)
    c.vts[rt.id] = rot

    def f():
        xe = c.operand(x, t.shape, F32)
        return cvt(E("add", F32, E("mul", F32, xe, c.operand(cr, t.shape, F32)),
                     E("mul", F32, c.operand(rt, t.shape, F32), c.operand(sr, t.shape, F32))), t.dtype)
    last = c.map_op(t, name, kind, f)
    for tt in (cr, sr, rt):
        release(c.mem, c.vts[tt.id])
    return last
